"""``comzy``: the stock agent. ``comzy 3000`` exposes localhost:3000; ``comzy login``, ``logout``,
``status`` and ``aliases`` manage the saved login."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import socket
import sys
from typing import NoReturn

import anyio

from comzy import __version__
from comzy.agent import account, inspector
from comzy.agent.capture import DEFAULT_MAX_BODY, DEFAULT_MAX_REQUESTS, Capture
from comzy.agent.client import Agent, AgentConfig, AgentError, Rejected, TLSMisconfigured, Unreachable
from comzy.agent.forward import LocalForwarder
from comzy.agent.output import ERROR_PREFIX, Output, Printer, make_output
from comzy.agent.policies import BASIC_AUTH, HEADERS, IP_FILTER, RATE_LIMIT, BasicAuth, HeaderRules, IpFilter, RateLimit
from comzy.agent.tunnels import find_config, load_config, plans_from_config, plans_from_ports, read_words
from comzy.core.aliases import ALIAS_RE
from comzy.core.control import Welcome
from comzy.core.eventloop import EVENT_LOOPS, backend_options
from comzy.core.logs import printable
from comzy.core.memory import tune_gc, tune_malloc

DEFAULT_SERVER = "ws://localhost:8191"
#: Words that are commands, not a port.
COMMANDS = ("login", "logout", "status", "aliases", "completion")


#: Every environment variable the agent reads, as ``comzy --help`` lists them (a test keeps this
#: list and the code together): a pip user has no docs/ folder to look them up in.
ENVIRONMENT = (
    ("COMZY_WS_SERVER", f"agent listener URL, or a comma list tried in turn (as --server; default {DEFAULT_SERVER})"),
    ("COMZY_TOKEN", "a token to use instead of the saved login in ~/.comzy/.user (CI jobs)"),
    ("COMZY_LOGIN_URL", "where your server's users get a token; `comzy login` shows it at its prompt"),
    ("SSL_CERT_FILE", "CA certificates (PEM) trusted for wss:// servers, by every command (as --cacert)"),
    ("COMZY_EVENT_LOOP", f"event loop: {', '.join(EVENT_LOOPS)} (default auto: uvloop where installed)"),
    ("NO_COLOR", "no colour, even on a terminal"),
    ("FORCE_COLOR", "colour even when piped"),
    ("TERM", "dumb: plain lines instead of the live status screen"),
    ("COMZY_ANONYMOUS_TIMEOUT", "ignored (the original Comzy's agents read it): the server decides"),
)


def environment_help(names: tuple[str, ...] | None = None) -> str:
    """The ``environment:`` section of an epilog: ``names`` (default all) from ENVIRONMENT, one a line."""
    rows = [(name, text) for name, text in ENVIRONMENT if names is None or name in names]
    width = max(len(name) for name, _ in rows)
    return "environment:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows)


EPILOG = f"""\
examples:
  comzy 3000                        expose localhost:3000 at a new public URL
  comzy 3000 --subdomain myapp      ask for myapp.<the server's domain>
  comzy 5173 --host-header rewrite  for dev servers that check Host (Vite, webpack, Rails)
  comzy 3000 --server wss://tunnel.example.com:8191
  comzy 3000 --basic-auth ana:s3cret-pw  visitors must log in (enforced by the server)
  comzy 3000 8080                   two tunnels (one per port) on one connection
  comzy start web api               the tunnels web and api of ./comzy.yml (or --config FILE; --all)
  comzy 3000 --rate-limit 60/min    at most 60 requests a minute from each visitor's address
  comzy 3000 --cidr-allow 203.0.113.0/24  only visitors from that network (others get 403)
  comzy 3000 --response-header-add 'X-Robots-Tag: noindex'  a header on every response
  comzy login                       save your token (from the server's operator) for lasting aliases
  comzy status                      is the server reachable, who am I, which aliases are mine

commands (comzy COMMAND --help):
  {", ".join(COMMANDS)}

{environment_help()}
"""


class Parser(argparse.ArgumentParser):
    """argparse with the agent's one error prefix: usage, then ``comzy: <what is wrong>``."""

    def error(self, message: str) -> NoReturn:
        """Print this (sub)command's usage and the error, then exit 2."""
        self.print_usage(sys.stderr)
        self.exit(2, f"{ERROR_PREFIX} {message}\n")


def build_parser() -> Parser:
    """The parser of ``comzy [PORT] [options]`` (the commands have theirs, in comzy.agent.commands)."""
    parser = Parser(
        prog="comzy",
        description="Expose a local web service at a public URL through a Comzy server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("port", nargs="*", default=[], metavar="PORT",
                        help="local port to expose (default 3000); several: a tunnel each, on one connection. "
                        "Or `start NAME...`: the tunnels NAME of the config file")
    parser.add_argument("--subdomain", "-s", help="ask for this alias (e.g. myapp -> myapp.<domain>)")
    parser.add_argument("--host-header", choices=["preserve", "rewrite"], default="preserve",
                        help="'rewrite' sends Host: localhost:PORT to the local service (for dev servers "
                        "that check Host); default passes the visitor's Host through")
    parser.add_argument("--local-host", default="localhost", help="host of the local service (default localhost)")
    parser.add_argument("--config", metavar="FILE", help="with `start`: the config file that declares the tunnels "
                        "(default ./comzy.yml, else ~/.comzy/comzy.yml)")
    parser.add_argument("--all", action="store_true", help="with `start`: every tunnel of the config file")
    parser.add_argument("--server", help=f"agent listener URL(s), comma-separated (default {DEFAULT_SERVER})")
    parser.add_argument("--cacert", metavar="FILE", help="trust the CA certificates in FILE (PEM) for a wss:// "
                        "server instead of the system's; SSL_CERT_FILE=FILE does the same for every command")
    parser.add_argument("--basic-auth", action="append", default=[], metavar="USER:PASSWORD",
                        help="visitors must log in with these credentials (repeatable; passwords of 8 or more "
                        "characters, sent to the server only as salted hashes); a server that cannot enforce "
                        "it refuses the tunnel")
    parser.add_argument("--basic-auth-forward", action="store_true",
                        help="pass the visitor's Authorization header on to the local app (default: removed)")
    parser.add_argument("--rate-limit", metavar="N/UNIT",
                        help="at most N requests per second, minute or hour from each client address (N/s, "
                        "N/min, N/h); over it visitors get 429 with Retry-After; the server's own limit, if any, "
                        "applies too; a server that cannot enforce it refuses the tunnel")
    parser.add_argument("--cidr-allow", action="append", default=[], metavar="CIDR",
                        help="only client addresses in this network may visit (repeatable; IPv4 or IPv6, e.g. "
                        "203.0.113.0/24); others get 403. X-Forwarded-For counts only from the server's trusted "
                        "proxies; a server that cannot enforce it refuses the tunnel")
    parser.add_argument("--cidr-deny", action="append", default=[], metavar="CIDR",
                        help="client addresses in this network get 403 (repeatable; wins over --cidr-allow)")
    parser.add_argument("--request-header-add", action="append", default=[], metavar="'NAME: VALUE'",
                        help="add this header to every request the local app gets (repeatable; after removals)")
    parser.add_argument("--request-header-remove", action="append", default=[], metavar="NAME",
                        help="remove this header from every request before the local app gets it (repeatable)")
    parser.add_argument("--response-header-add", action="append", default=[], metavar="'NAME: VALUE'",
                        help="add this header to every response of the local app (repeatable; after removals)")
    parser.add_argument("--response-header-remove", action="append", default=[], metavar="NAME",
                        help="remove this header from every response of the local app (repeatable)")
    parser.add_argument("--quiet", "-q", action="store_true", help="do not print a line per request")
    parser.add_argument("--log", action="store_true", help="print a plain line per request instead of the live "
                        "status screen (the default when output is not a terminal)")
    parser.add_argument("--inspect", metavar="ADDR", help="serve the inspector (a live page of the "
                        "requests at /, and ngrok's local API: /api/tunnels, /api/requests/http) on HOST:PORT, "
                        "or 'off' (default "
                        f"{inspector.DEFAULT_HOST}:{inspector.DEFAULT_PORTS[0]}, the next free port up to "
                        f"{inspector.DEFAULT_PORTS[-1]})")
    parser.add_argument("--inspect-max-requests", metavar="N", type=_positive, default=DEFAULT_MAX_REQUESTS,
                        help=f"requests the inspector keeps, the oldest dropped first (default "
                        f"{DEFAULT_MAX_REQUESTS})")
    parser.add_argument("--inspect-max-body", metavar="SIZE", type=_size, default=DEFAULT_MAX_BODY,
                        help="bytes of each request and response body the inspector keeps; longer ones are "
                        "kept cut and marked (default 1MiB; K, M suffixes or KiB, MiB)")
    parser.add_argument("--version", action="version", version=f"comzy {__version__}")
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return int(text)


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*(|[kKmMgG])(?:i?B)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size: give bytes, or e.g. 64K, 1MiB")
    return int(match[1]) * 1024 ** " KMG".index(match[2].upper() or " ")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``comzy [PORT] [options]``."""
    parser = build_parser()
    if argv and not argv[0].startswith("-") and not argv[0].isdigit() and argv[0] != "start":
        # A mistyped command would otherwise be read as the port and called "not a port number".
        guess = difflib.get_close_matches(argv[0], (*COMMANDS, "start"), n=1)
        if guess:
            parser.error(f"unknown command '{printable(argv[0])}'; did you mean {guess[0]}?")
    # Intermixed: `comzy 3000 --log 8080` and `comzy start --all` read as meant.
    args = parser.parse_intermixed_args(argv)
    # `comzy 3000 8080` or `comzy start web api`: args.ports or args.start, and args.port (the first).
    problem = read_words(args, parser.get_default, _port)
    if problem:
        parser.error(problem)
    try:
        args.policy = BasicAuth.parse(args.basic_auth, args.basic_auth_forward)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        args.ip_filter = IpFilter.parse(args.cidr_allow, args.cidr_deny)
        args.header_rules = HeaderRules.parse(args.request_header_add, args.request_header_remove,
                                              args.response_header_add, args.response_header_remove)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        args.rate_limit = RateLimit.parse(args.rate_limit) if args.rate_limit is not None else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.basic_auth_forward and not args.basic_auth:
        parser.error("--basic-auth-forward goes with --basic-auth USER:PASSWORD")
    if args.subdomain is not None:
        problem = subdomain_problem(args.subdomain)
        if problem:
            parser.error(problem)
    return args


def subdomain_problem(text: str) -> str | None:
    """Why the server would refuse ``--subdomain text`` whatever its settings, or None.

    The server lowercases the name (DNS ignores case), then needs a DNS label: checked here, so
    the error quotes what the user typed and suggests a name that works. Reserved and punycode
    names depend on the server, which says so itself.
    """
    name = text.lower()
    if ALIAS_RE.fullmatch(name):
        return None
    bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c == "-"))})
    what = (f"{' '.join(repr(c) for c in bad)} {'is' if len(bad) == 1 else 'are'} not allowed" if bad else
            "it is empty" if not name else "it has more than 63 characters" if len(name) > 63 else
            "it starts or ends with '-'")
    rule = "use a-z, 0-9 and '-' (1-63 of them, not starting or ending with '-'; capitals are lowercased)"
    message = f"--subdomain '{printable(text)}' cannot be a subdomain: {printable(what)}; {rule}"
    suggestion = re.sub(r"[^a-z0-9-]+", "-", name.encode("ascii", "ignore").decode())[:63].strip("-")
    if ALIAS_RE.fullmatch(suggestion):
        message += f". Try --subdomain {suggestion}"
    return message


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a port number nor a command (try: comzy 3000, "
                                         f"or one of {', '.join(COMMANDS)})") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port


def server_list(option: str | None, saved: str | None = None) -> list[str]:
    """Servers from --server, else COMZY_WS_SERVER, else the saved login's server, else the default."""
    raw = option or os.environ.get("COMZY_WS_SERVER") or saved or DEFAULT_SERVER
    servers = [s.strip() for s in raw.split(",") if s.strip()]
    for url in servers:
        if not url.startswith(("ws://", "wss://")):
            raise SystemExit(f"comzy: server URL {url!r} must start with ws:// or wss://")
    return servers


class _Reporter:
    """The agent's events go to the output, and the public URL to the inspector's API."""

    def __init__(self, printer: Output, tunnel: inspector.TunnelInfo) -> None:
        self.printer = printer
        self.tunnel = tunnel

    def connected(self, welcome: Welcome, first: bool) -> None:
        """The tunnel is up: ``GET /api/tunnels`` lists it from now on."""
        self.tunnel.public_url = welcome.url
        self.printer.connected(welcome, first)

    def reconnecting(self, reason: str, delay: float) -> None:
        """As the output's."""
        self.printer.reconnecting(reason, delay)

    def notice(self, level: str, message: str) -> None:
        """As the output's."""
        self.printer.notice(level, message)


def open_inspector(args: argparse.Namespace, printer: Output) -> socket.socket | None:
    """The inspector's listening socket for ``--inspect`` (None when off); exits 2 when an
    address given explicitly cannot be used."""
    if args.inspect is not None and args.inspect.strip().lower() == "off":
        return None
    if args.inspect is None:
        try:
            return inspector.bind(inspector.DEFAULT_HOST, inspector.DEFAULT_PORTS)
        except OSError:
            # Not worth failing the tunnel for: it still works, only without the inspector.
            ports = inspector.DEFAULT_PORTS
            printer.notice("warning", f"Ports {ports[0]}-{ports[-1]} on {inspector.DEFAULT_HOST} are all in use, so "
                                      "the inspector is off; pick a free port with --inspect 127.0.0.1:PORT.")
            return None
    try:
        host, port = inspector.parse_address(args.inspect.strip())
    except ValueError as exc:
        build_parser().error(str(exc))
    try:
        sock = inspector.bind(host, [port])
    except OSError as exc:
        printer.error(f"the inspector cannot listen on {printable(args.inspect)} ({exc.strerror or exc}); "
                      "give another address with --inspect HOST:PORT, or --inspect off")
        sys.exit(2)
    if not inspector.is_loopback(host):
        printer.notice("warning", f"The inspector listens on {printable(host)}, which is not a loopback address: "
                                  "anyone who can reach it sees every request through this tunnel (headers and "
                                  "bodies) and can replay them. It has no password.")
    return sock


async def _run(agent: Agent, forwarder: LocalForwarder, printer: Output,
               api: tuple[inspector.InspectorAPI, socket.socket] | None = None) -> int:
    code = 0
    async with printer.showing(lambda: agent.latency), anyio.create_task_group() as tg:
        if api is not None:
            tg.start_soon(api[0].serve, api[1])
        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    printer.line("Stopping.")
                    await agent.close()
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(stop_on_signal)
        try:
            reason = await agent.run()
            if reason is not None:  # None: stopped by the signal above, which says so
                printer.error(f"the server ended this tunnel: {reason}")
                code = 1
        except Rejected as exc:
            printer.error(f"the server refused the tunnel: {exc}")
            code = 1
        except TLSMisconfigured as exc:
            printer.error(str(exc))
            code = 1
        except Unreachable as exc:
            printer.error(f"{exc}. Is comzy-server running there? Set --server or COMZY_WS_SERVER.")
            code = 1
        except AgentError as exc:
            printer.error(str(exc))
            code = 1
        finally:
            await forwarder.aclose()
        tg.cancel_scope.cancel()
    return code


def _main_several(args: argparse.Namespace) -> NoReturn:
    """``comzy 3000 8080`` or ``comzy start NAME...``: several tunnels on one connection."""
    from comzy.agent import several

    server = None
    try:
        if args.start is not None:
            config = load_config(find_config(args.config))
            plans, server = plans_from_config(config, args.start, args.all), config.server
        else:
            plans = plans_from_ports(args)
    except ValueError as exc:  # ConfigError, or a policy flag's value
        Printer("").error(str(exc))
        sys.exit(2)
    several.main(args, plans, server)
    sys.exit(0)  # several.main exits; this keeps the type checker sure of it


def local_service_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (a start-up hint only)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``comzy``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "completion":
        from comzy.agent.completion import run

        sys.exit(run(argv[1:]))
    if argv and argv[0] in COMMANDS:
        from comzy.agent.commands import run_command

        sys.exit(run_command(argv))
    args = parse_args(argv)
    if args.start is not None or len(args.ports) > 1:
        _main_several(args)
    saved = account.load_credentials()
    servers = server_list(args.server, saved.server if saved else None)
    token, held_back = account.token_for(servers, saved)
    target = f"{args.local_host}:{args.port}"
    # The policies in force, shown under the public URL once the server confirmed each.
    policies = {BASIC_AUTH: args.policy.describe()} if args.policy.credentials else {}
    if args.rate_limit is not None:
        policies[RATE_LIMIT] = args.rate_limit.describe()
    for name, rules in ((IP_FILTER, args.ip_filter), (HEADERS, args.header_rules)):
        if rules:
            policies[name] = rules.describe()
    printer = make_output(target, log=args.log, quiet=args.quiet, policies=policies)
    try:
        loop_options = backend_options(os.environ.get("COMZY_EVENT_LOOP") or "auto")
    except ValueError as exc:
        printer.error(f"COMZY_EVENT_LOOP {exc}")
        sys.exit(2)
    if os.environ.get("COMZY_ANONYMOUS_TIMEOUT"):
        # The seed's agents read it; here the server decides, and its expiry is shown on connect.
        printer.notice("warning", "COMZY_ANONYMOUS_TIMEOUT has no effect on the agent: the server's setting decides "
                                  "when anonymous tunnels expire (shown once connected).")
    if held_back:
        printer.notice("warning", f"{held_back[0].upper()}{held_back[1:]}; connecting anonymously. "
                                  f"Run `comzy login --server {servers[0]}` to log in there.")
    subdomain = args.subdomain.lower() if args.subdomain else None
    if subdomain and subdomain != args.subdomain:
        # Said, so that what the server answers ('myapp' is in use...) names what the user typed.
        printer.notice("info", f"Asking for {subdomain} (--subdomain {printable(args.subdomain)}, lowercased: "
                               "DNS names ignore case).")
    sock = open_inspector(args, printer)
    capture = Capture(args.inspect_max_requests, args.inspect_max_body) if sock is not None else None
    forwarder = LocalForwarder(args.local_host, args.port, rewrite_host=args.host_header == "rewrite",
                               on_served=printer.served, capture=capture)
    tunnel = inspector.TunnelInfo(target)
    api = None
    if sock is not None and capture is not None:
        api = (inspector.InspectorAPI(capture, tunnel, lambda _name: forwarder.local,
                                      check_host=inspector.is_loopback(sock.getsockname()[0])), sock)
        printer.inspector = inspector.url_of(sock)
    # Hashed once here (scrypt is slow on purpose): every reconnect sends the same data.
    plugin_data = {BASIC_AUTH: args.policy.plugin_data()} if args.policy.credentials else {}
    if args.rate_limit is not None:
        plugin_data[RATE_LIMIT] = args.rate_limit.plugin_data()
    for name, rules in ((IP_FILTER, args.ip_filter), (HEADERS, args.header_rules)):
        if rules:
            plugin_data[name] = rules.plugin_data()
    config = AgentConfig(servers=servers, port=args.port, local_host=args.local_host,
                         subdomain=subdomain, token=token,
                         cacert=args.cacert, plugin_data=plugin_data, require=list(plugin_data))
    try:
        agent = Agent(config, forwarder, _Reporter(printer, tunnel))
    except ValueError as exc:  # --cacert cannot be read
        printer.error(str(exc))
        sys.exit(2)
    if not local_service_answers(args.local_host, args.port):
        printer.notice("warning", f"Nothing is listening on {target} yet; visitors get a 502 until it starts.")
    try:
        tune_malloc()  # bulk transfers reuse pages instead of faulting in fresh ones
        tune_gc()  # the collector cost 6-9% of the agent's CPU under load with the defaults
        code = anyio.run(_run, agent, forwarder, printer, api, backend_options=loop_options)
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
