"""``comzy login | logout | status | aliases``: the saved login and the aliases a user owns."""

from __future__ import annotations

import argparse
import difflib
import getpass
import os
import re
import sys

import anyio

from comzy import __version__
from comzy.agent import account
from comzy.agent.account import AccountClient, AccountError, ApiError, Credentials, OwnedAlias
from comzy.agent.output import ERROR_PREFIX
from comzy.core.account_api import ErrorCode
from comzy.core.logs import printable

#: The agent's one trust option, the same on every command (comzy.agent.cli has it too).
CACERT_HELP = ("trust the CA certificates in FILE (PEM) for a wss:// server instead of the system's; "
               "SSL_CERT_FILE=FILE does the same for every command")


def _parser() -> argparse.ArgumentParser:
    from comzy.agent.cli import Parser, environment_help

    parser = Parser(prog="comzy", description="Manage your Comzy login and aliases.")
    parser.add_argument("--version", action="version", version=f"comzy {__version__}")
    # Subparsers are Parsers too (argparse makes them of the parent's class): one error format.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    server_help = "agent listener URL, e.g. wss://tunnel.example.com:8191 (default: COMZY_WS_SERVER, " \
                  "else the server you logged in to, else ws://localhost:8191)"
    login_epilog = ("examples:\n"
                    "  comzy login                                         type the token at the prompt\n"
                    "  comzy login --server wss://tunnel.example.com:8191  log in to that server\n"
                    "  echo \"$TOKEN\" | comzy login                         read it from stdin (scripts)\n\n"
                    + environment_help(("COMZY_WS_SERVER", "COMZY_TOKEN", "COMZY_LOGIN_URL", "SSL_CERT_FILE")))
    login = commands.add_parser("login", help="check a token with the server and save it in ~/.comzy/.user",
                                description="Check a token with the server, then save it (mode 0600) so "
                                "`comzy PORT` uses it.\nWithout --token, asks for it (or reads it from stdin).",
                                epilog=login_epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    login.add_argument("--token", help="the token (from `comzy-server users create NAME`)")
    login.add_argument("--server", help=server_help)
    login.add_argument("--cacert", metavar="FILE", help=CACERT_HELP)
    logout = commands.add_parser("logout", help="forget the saved token")
    status = commands.add_parser("status", help="is the server reachable, who am I, which aliases are mine")
    status.add_argument("--server", help=server_help)
    status.add_argument("--cacert", metavar="FILE", help=CACERT_HELP)
    aliases = commands.add_parser("aliases", help="list your aliases, or release one",
                                  description="Without an action: list the aliases you own. "
                                  "`comzy aliases release NAME` gives one up (it becomes free for anyone).")
    aliases.add_argument("--server", help=server_help)
    aliases.add_argument("--cacert", metavar="FILE", help=CACERT_HELP)
    actions = aliases.add_subparsers(dest="action", metavar="ACTION")
    release = actions.add_parser("release", help="give up an alias you own")
    release.add_argument("name", metavar="NAME")
    # Also after the action (`comzy aliases release NAME --cacert F`); SUPPRESS keeps one given
    # before it from being reset to None by this parser's default.
    release.add_argument("--cacert", metavar="FILE", default=argparse.SUPPRESS, help=CACERT_HELP)
    # Which (sub)command's usage an unknown option is reported with (the innermost one's
    # default wins); argparse would show the top-level usage instead.
    for command in (login, logout, status, aliases, release):
        command.set_defaults(usage_of=command)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; an unknown option is reported by the command it was given to, with a guess."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    command: argparse.ArgumentParser = vars(args).pop("usage_of", parser)
    if unknown:
        options = sorted(set(re.findall(r"--[a-z][a-z-]*", command.format_usage())))
        guess = difflib.get_close_matches(unknown[0].split("=", 1)[0], options, n=1)
        hint = f" (did you mean {guess[0]}?)" if unknown[0].startswith("-") and guess else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def _fail(message: str) -> int:
    print(f"{ERROR_PREFIX} {message}", file=sys.stderr)
    return 1


def _server(option: str | None, saved: Credentials | None) -> str:
    from comzy.agent.cli import server_list

    return server_list(option, saved.server if saved else None)[0]


def run_command(argv: list[str]) -> int:
    """Run one account command; the exit status."""
    args = _parse(argv)
    try:
        if args.command == "login":
            return anyio.run(_login, args.token, args.server, args.cacert)
        if args.command == "logout":
            return _logout()
        if args.command == "status":
            return anyio.run(_status, args.server, args.cacert)
        return anyio.run(_aliases, args.server, args.action, getattr(args, "name", None), args.cacert)
    except AccountError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


def _read_token() -> str:
    if sys.stdin.isatty():
        # The seed's COMZY_LOGIN_URL: where a server's users get their token.
        login_url = os.environ.get("COMZY_LOGIN_URL")
        if login_url:
            print(f"Get your token at {login_url}")
        return getpass.getpass("Token (from your server's operator): ")
    return sys.stdin.readline()  # piped: `echo $TOKEN | comzy login`


async def _login(token: str | None, server_option: str | None, cacert: str | None = None) -> int:
    from comzy.agent.cli import server_list

    servers = server_list(server_option, None)
    server = servers[0]  # checked with the first; the saved token is for all of them (one cluster)
    token = (token or os.environ.get("COMZY_TOKEN") or _read_token()).strip()
    if not token:
        return _fail("no token given; pass --token TOKEN or type it at the prompt")
    try:
        me = await AccountClient(server, token, cacert=cacert).me()
    except ApiError as exc:
        return _fail(account.no_accounts(server) if exc.no_accounts else f"login failed: {exc}")
    user = printable(me.user)
    path = account.save_credentials(Credentials(token, me.user, ",".join(servers)))
    print(f"Logged in to {server} as {user}. Token saved in {path} (readable by you only).")
    if me.aliases:
        print("Your aliases: " + ", ".join(f"{printable(a.alias)} (port {a.port})" for a in me.aliases))
    print("Run `comzy PORT`: each local port keeps its alias from now on.")
    return 0


def _logout() -> int:
    path = account.credentials_path()
    if account.remove_credentials():
        print(f"Logged out (removed {path}). New tunnels are anonymous.")
    else:
        print("Not logged in; nothing to do.")
    return 0


def _alias_lines(owned: list[OwnedAlias]) -> list[str]:
    # Padded as printed: an escaped character is wider than the one it stands for.
    names = [printable(a.alias) for a in owned]
    width = max(map(len, names), default=0)
    return [f"  {name:<{width}}  port {a.port:<5}  {'online ' if a.online else 'offline'}  {printable(a.url)}"
            for name, a in zip(names, owned, strict=True)]


async def _status(server_option: str | None, cacert: str | None = None) -> int:
    saved = account.load_credentials()
    server = _server(server_option, saved)
    try:
        info = await AccountClient(server, cacert=cacert).status()
    except ApiError as exc:
        return _fail(f"{server} has no status API ({exc}); is it a Comzy agent listener?")
    except AccountError as exc:
        print(f"Server:  {server}: unreachable")
        return _fail(str(exc))
    draining = " (shutting down)" if info.draining else ""
    print(f"Server:  {server}: reachable, {printable(info.server)}, tunnels at *.{printable(info.base_domain)}"
          f"{draining}")
    if info.agent_url and account.same_place(info.agent_url) != account.same_place(server):
        # Reached by an internal address: say where the server's agents are meant to connect.
        print(f"Agents:  this server's public agent URL is {printable(info.agent_url)} "
              f"(comzy PORT --server {printable(info.agent_url)})")
    token, held_back = account.token_for([server], saved)
    if token is None:
        print(f"Login:   {held_back}, so it is not sent there (tunnels are anonymous). Run `comzy login "
              f"--server {server}` to log in there." if held_back else
              "Login:   not logged in (tunnels are anonymous). Run `comzy login` for lasting aliases.")
        return 0
    try:
        me = await AccountClient(server, token, cacert=cacert).me()
    except ApiError as exc:
        if exc.no_accounts:
            held = "a token in COMZY_TOKEN" if os.environ.get("COMZY_TOKEN") or saved is None else \
                f"saved for {printable(saved.user)}"
            print(f"Login:   {held}, but {account.no_accounts(server)}")
            return 0
        if exc.code == ErrorCode.UNAUTHORIZED:
            print(f"Login:   {_refused(server, exc, saved)}")
        else:
            print(f"Login:   cannot check your token: {exc}")
        return 1
    source = "COMZY_TOKEN" if os.environ.get("COMZY_TOKEN") else str(account.credentials_path())
    print(f"Login:   {printable(me.user)} (token from {source})")
    print(f"Aliases: {len(me.aliases)} of {me.max_aliases}" if me.max_aliases is not None else
          f"Aliases: {len(me.aliases)} (no limit)")
    for line in _alias_lines(me.aliases):
        print(line)
    return 0


def _refused(server: str, exc: ApiError, saved: Credentials | None) -> str:
    """One sentence for a token the server refuses: whose token, the server's reason, what to do.

    The server's reason already says it was refused ("the token was not accepted..."), and may
    say what to do: neither is said twice.
    """
    whose = "the token in COMZY_TOKEN" if os.environ.get("COMZY_TOKEN") or saved is None else \
        f"the token saved for {printable(saved.user)}"
    reason = printable(exc.message) if exc.message else f"HTTP {exc.status}"
    advice = "" if "comzy login" in exc.message else \
        f"; run `comzy login --server {server}` with a token from the server's operator"
    return f"{server} refused {whose}: {reason}{advice}"


async def _aliases(server_option: str | None, action: str | None, name: str | None,
                   cacert: str | None = None) -> int:
    saved = account.load_credentials()
    server = _server(server_option, saved)
    token, held_back = account.token_for([server], saved)
    if token is None:
        if held_back:
            return _fail(f"{held_back}; aliases belong to users: run `comzy login --server {server}` first")
        return _fail("not logged in; aliases belong to users: run `comzy login` first")
    client = AccountClient(server, token, cacert=cacert)
    try:
        if action == "release":
            assert name is not None
            online = await client.release(name.lower())
            note = " Its tunnel keeps running until it stops." if online else ""
            print(f"Released {printable(name.lower())}: anyone may take it now.{note}")
            return 0
        me = await client.me()
    except ApiError as exc:
        if exc.no_accounts:
            return _fail(account.no_accounts(server))
        if exc.code == ErrorCode.UNAUTHORIZED:
            return _fail(_refused(server, exc, saved))
        return _fail(str(exc))
    user = printable(me.user)
    if not me.aliases:
        limit = f" (up to {me.max_aliases})" if me.max_aliases is not None else ""
        print(f"{user} owns no aliases yet{limit}; `comzy PORT` claims one.")
        return 0
    count = len(me.aliases)
    print(f"{user} owns {count} of {me.max_aliases} aliases:" if me.max_aliases is not None else
          f"{user} owns {count} {'alias' if count == 1 else 'aliases'}:")
    for line in _alias_lines(me.aliases):
        print(line)
    print("Release one with `comzy aliases release NAME`.")
    return 0
