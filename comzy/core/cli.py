"""``comzy-server``: run the tunnel server."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys

import anyio
from pydantic import ValidationError

from comzy import __version__
from comzy.core import logs
from comzy.core.datadir import prepare_data_dir
from comzy.core.hooks import PluginError, load_plugins, select_plugins
from comzy.core.memory import tune_malloc
from comzy.core.server import describe, run_server
from comzy.core.settings import ServerSettings, explain_validation_error

log = logging.getLogger("comzy.server")


def load_settings() -> ServerSettings:
    """Settings from the environment; exits with a message naming a bad variable."""
    try:
        return ServerSettings()
    except ValidationError as exc:
        print(f"comzy-server: {explain_validation_error(ServerSettings, exc)}", file=sys.stderr)
        raise SystemExit(2) from None


async def serve(settings: ServerSettings) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    plugins = load_plugins(select_plugins(settings.plugins))
    async with run_server(settings, plugins) as server:
        for line in describe(server):
            log.info(line)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s: draining (up to %gs), then exiting",
                         signal.Signals(signum).name, settings.shutdown_grace)
                break
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``comzy-server``."""
    parser = argparse.ArgumentParser(prog="comzy-server", description="Run the Comzy tunnel server. "
                                     "Configure it with COMZY_* environment variables (see docs/configuration.md).")
    parser.add_argument("--version", action="version", version=f"comzy-server {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     help="without one: run the server")
    db = commands.add_parser("db", help="the database schema (Alembic migrations)",
                             description="Manage the database schema of COMZY_DATABASE_URL (or DB_*, "
                             "or comzy.db in COMZY_DATA_DIR).")
    db_actions = db.add_subparsers(dest="action", metavar="ACTION", required=True)
    db_actions.add_parser("upgrade", help="apply every pending migration")
    db_actions.add_parser("current", help="print the schema revision and whether it is current")
    domains = commands.add_parser("domains", help="custom domains served by an alias (plugin custom_domains)",
                                  description="Manage the custom domain mappings kept in the database "
                                  "(COMZY_DATABASE_URL, or DB_*, or comzy.db in COMZY_DATA_DIR).")
    domain_actions = domains.add_subparsers(dest="action", metavar="ACTION", required=True)
    domain_add = domain_actions.add_parser("add", help="serve HOST with ALIAS's tunnel (updates an existing HOST)")
    domain_add.add_argument("host", metavar="HOST", help="a host outside the base domain, e.g. app.example.com")
    domain_add.add_argument("alias", metavar="ALIAS", help="the alias whose tunnel serves it")
    domain_actions.add_parser("list", help="print every mapping")
    domain_remove = domain_actions.add_parser("remove", help="stop serving HOST")
    domain_remove.add_argument("host", metavar="HOST")
    users = commands.add_parser("users", help="users and their tokens (plugin auth_token)",
                                description="Manage the users kept in the database (COMZY_DATABASE_URL, or DB_*, "
                                "or comzy.db in COMZY_DATA_DIR). Tokens are stored hashed: create and rotate "
                                "print a token once, as the last line of their output.")
    user_actions = users.add_subparsers(dest="action", metavar="ACTION", required=True)
    user_actions.add_parser("create", help="add a user and print their token").add_argument("name", metavar="NAME")
    user_actions.add_parser("list", help="print every user, active or revoked")
    user_actions.add_parser("revoke", help="stop NAME's token working (their live tunnels close)").add_argument(
        "name", metavar="NAME")
    user_actions.add_parser("rotate", help="give NAME a new token (the old one stops working)").add_argument(
        "name", metavar="NAME")
    args = parser.parse_args(argv)
    settings = load_settings()
    logs.configure(settings.log_level)
    if args.command == "db":
        from comzy.core.db import run_db_command  # SQLAlchemy and Alembic load only when needed

        raise SystemExit(run_db_command(settings, args.action))
    if args.command == "domains":
        from comzy.plugins.custom_domains.cli import run_domains_command

        raise SystemExit(run_domains_command(settings, args.action, getattr(args, "host", None),
                                             getattr(args, "alias", None)))
    if args.command == "users":
        from comzy.plugins.auth_token.cli import run_users_command

        raise SystemExit(run_users_command(settings, args.action, getattr(args, "name", None)))
    # Every tunnel keeps long-lived objects; with the default thresholds full collections
    # took ~30% of the server's CPU while 10,000 agents registered (bench/idle_agents.py).
    gc.set_threshold(10_000, 10, 100)
    try:
        prepare_data_dir(settings.data_dir)  # 0700: it holds token hashes and client addresses
    except OSError as exc:
        print(f"comzy-server: cannot create COMZY_DATA_DIR {settings.data_dir}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        tune_malloc()  # bulk transfers reuse pages instead of faulting in fresh ones
        anyio.run(serve, settings)
    except PluginError as exc:
        print(f"comzy-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseExceptionGroup as group:
        # A PluginError from on_startup arrives wrapped by the server's task group.
        failures, others = group.split(PluginError)
        if failures is None or others is not None:
            raise
        for failure in _leaves(failures):
            print(f"comzy-server: {failure}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        print(f"comzy-server: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [leaf for exc in group.exceptions
            for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])]


if __name__ == "__main__":
    main()
