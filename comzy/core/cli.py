"""``comzy-server``: run the tunnel server."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from typing import TYPE_CHECKING

import anyio
from pydantic import ValidationError

from comzy import __version__
from comzy.core import logs
from comzy.core.cluster import ClusterError
from comzy.core.commands import Catalog
from comzy.core.datadir import prepare_data_dir
from comzy.core.eventloop import backend_options
from comzy.core.hooks import PluginError, load_plugins, select_plugins
from comzy.core.memory import tune_malloc
from comzy.core.server import describe, run_server
from comzy.core.settings import ServerSettings, explain_validation_error
from comzy.core.tls import TLSConfigError

if TYPE_CHECKING:
    from comzy.core.cluster.settings import ClusterSettings

log = logging.getLogger("comzy.server")

#: Where the parsed arguments keep the command's name (taken out before a plugin's command sees them).
COMMAND = "comzy_server_command"


def _command_word(argv: list[str]) -> str | None:
    """The command ``argv`` names, if any (comzy-server's own options take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _needs_plugins(argv: list[str]) -> bool:
    """Whether the installed plugins must be built to parse ``argv``: for help, and for any command
    but ``db``. Never to run the server, so a disabled plugin's code does not run with it."""
    word = _command_word(argv)
    if word is None:
        return "-h" in argv or "--help" in argv
    return word != "db"


def load_settings() -> ServerSettings:
    """Settings from the environment; exits with a message naming a bad variable."""
    try:
        return ServerSettings()
    except ValidationError as exc:
        print(f"comzy-server: {explain_validation_error(ServerSettings, exc)}", file=sys.stderr)
        raise SystemExit(2) from None


async def serve(settings: ServerSettings, cluster_settings: ClusterSettings | None = None) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    plugins = load_plugins(select_plugins(settings.plugins))
    async with run_server(settings, plugins, cluster_settings) as server:
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
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="comzy-server", description="Run the Comzy tunnel server. "
                                     "Configure it with COMZY_* environment variables (see docs/configuration.md).")
    parser.add_argument("--version", action="version", version=f"comzy-server {__version__}")
    commands = parser.add_subparsers(dest=COMMAND, metavar="COMMAND", help="without one: run the server")
    db = commands.add_parser("db", help="the database schema (Alembic migrations)",
                             description="Manage the database schema of COMZY_DATABASE_URL (or DB_*, "
                             "or comzy.db in COMZY_DATA_DIR).")
    db_actions = db.add_subparsers(dest="action", metavar="ACTION", required=True)
    db_actions.add_parser("upgrade", help="apply every pending migration")
    db_actions.add_parser("current", help="print the schema revision and whether it is current")
    listing = commands.add_parser("plugins", help="the installed plugins: enabled or not, distribution, version, "
                                  "hooks and commands", description="List the installed plugins: whether "
                                  "COMZY_PLUGINS enables each, its distribution and version, the hooks it implements "
                                  "and the commands it adds. Exits 1 when an enabled plugin is missing or cannot run.")
    listing.add_argument("--json", action="store_true", help="print a JSON list, for scripts")
    catalog = Catalog.discover() if _needs_plugins(argv) else Catalog()
    catalog.add_parsers(commands)
    word = _command_word(argv)
    if word is not None and word not in commands.choices:
        # Perhaps the command of an enabled plugin that cannot be built: say why, not "invalid choice".
        try:
            catalog.enabled(select_plugins(load_settings().plugins))
        except PluginError as exc:
            print(f"comzy-server: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    args = parser.parse_args(argv)
    command = vars(args).pop(COMMAND)
    settings = load_settings()
    logs.configure(settings.log_level)
    if command == "db":
        from comzy.core.db import run_db_command  # SQLAlchemy and Alembic load only when needed

        raise SystemExit(run_db_command(settings, args.action))
    if command == "plugins":
        text, problems, status = catalog.report(settings, as_json=args.json)
        print(text)
        for problem in problems:
            print(f"comzy-server: {problem}", file=sys.stderr)
        raise SystemExit(status)
    if command is not None:
        try:
            raise SystemExit(catalog.run(command, args, settings))
        except PluginError as exc:
            print(f"comzy-server: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    cluster_settings = None
    if settings.role != "all":
        from comzy.core.cluster.settings import ClusterConfigError, load_cluster_settings

        try:
            cluster_settings = load_cluster_settings(settings.role)
        except ClusterConfigError as exc:
            print(f"comzy-server: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
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
        anyio.run(serve, settings, cluster_settings, backend_options=backend_options(settings.event_loop))
    except (PluginError, TLSConfigError) as exc:
        print(f"comzy-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseExceptionGroup as group:
        # A PluginError from on_startup (or a ClusterError from joining the cluster) arrives wrapped
        # by the server's task group.
        failures, others = group.split((PluginError, ClusterError))
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
