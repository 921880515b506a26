"""``comzy``: the stock agent. ``comzy 3000`` exposes localhost:3000; ``comzy login``, ``logout``,
``status`` and ``aliases`` manage the saved login."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

import anyio

from comzy import __version__
from comzy.agent import account
from comzy.agent.client import Agent, AgentConfig, AgentError, Rejected, TLSMisconfigured, Unreachable
from comzy.agent.forward import LocalForwarder
from comzy.agent.output import Printer
from comzy.core.memory import tune_malloc

DEFAULT_SERVER = "ws://localhost:8191"
#: Words that are commands, not a port.
COMMANDS = ("login", "logout", "status", "aliases")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``comzy [PORT] [options]``."""
    parser = argparse.ArgumentParser(
        prog="comzy",
        description="Expose a local web service at a public URL through a Comzy server.",
        epilog="Commands: comzy login | logout | status | aliases (see comzy COMMAND --help). "
        "Environment: COMZY_WS_SERVER (server URL, or a comma list tried in turn); COMZY_TOKEN (a token to "
        "use instead of the saved login); SSL_CERT_FILE (CA certificates trusted for wss://, as --cacert).",
    )
    parser.add_argument("port", nargs="?", type=_port, default=3000, help="local port to expose (default 3000)")
    parser.add_argument("--subdomain", "-s", help="ask for this alias (e.g. myapp -> myapp.<domain>)")
    parser.add_argument("--host-header", choices=["preserve", "rewrite"], default="preserve",
                        help="'rewrite' sends Host: localhost:PORT to the local service (for dev servers "
                        "that check Host); default passes the visitor's Host through")
    parser.add_argument("--local-host", default="localhost", help="host of the local service (default localhost)")
    parser.add_argument("--server", help=f"agent listener URL(s), comma-separated (default {DEFAULT_SERVER})")
    parser.add_argument("--cacert", metavar="FILE", help="trust the CA certificates in FILE (PEM) for a wss:// "
                        "server instead of the system's; SSL_CERT_FILE=FILE does the same for every command")
    parser.add_argument("--quiet", "-q", action="store_true", help="do not print a line per request")
    parser.add_argument("--version", action="version", version=f"comzy {__version__}")
    return parser.parse_args(argv)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number (try: comzy 3000)") from None
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


async def _run(agent: Agent, forwarder: LocalForwarder, printer: Printer) -> int:
    code = 0
    async with anyio.create_task_group() as tg:
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
    if argv and argv[0] in COMMANDS:
        from comzy.agent.commands import run_command

        sys.exit(run_command(argv))
    args = parse_args(argv)
    saved = account.load_credentials()
    servers = server_list(args.server, saved.server if saved else None)
    token, held_back = account.token_for(servers, saved)
    target = f"{args.local_host}:{args.port}"
    printer = Printer(target, quiet=args.quiet)
    if os.environ.get("COMZY_ANONYMOUS_TIMEOUT"):
        # The seed's agents read it; here the server decides, and its expiry is shown on connect.
        printer.notice("warning", "COMZY_ANONYMOUS_TIMEOUT has no effect on the agent: the server's setting decides "
                                  "when anonymous tunnels expire (shown once connected).")
    if held_back:
        printer.notice("warning", f"{held_back[0].upper()}{held_back[1:]}; connecting anonymously. "
                                  f"Run `comzy login --server {servers[0]}` to log in there.")
    forwarder = LocalForwarder(args.local_host, args.port, rewrite_host=args.host_header == "rewrite",
                               on_served=printer.served)
    config = AgentConfig(servers=servers, port=args.port, local_host=args.local_host,
                         subdomain=args.subdomain.lower() if args.subdomain else None, token=token,
                         cacert=args.cacert)
    try:
        agent = Agent(config, forwarder, printer)
    except ValueError as exc:  # --cacert cannot be read
        printer.error(str(exc))
        sys.exit(2)
    if not local_service_answers(args.local_host, args.port):
        printer.notice("warning", f"Nothing is listening on {target} yet; visitors get a 502 until it starts.")
    try:
        tune_malloc()  # bulk transfers reuse pages instead of faulting in fresh ones
        code = anyio.run(_run, agent, forwarder, printer)
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
