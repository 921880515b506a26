"""``comzy-server``: run the tunnel server."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from comzy import __version__
from comzy.completion import SHELLS, Node, script
from comzy.core import logs
from comzy.core.cluster import ClusterError
from comzy.core.commands import Catalog, HelpFormatter
from comzy.core.datadir import prepare_data_dir
from comzy.core.eventloop import backend_options
from comzy.core.hooks import PluginError, load_plugins, select_plugins
from comzy.core.memory import tune_gc, tune_malloc
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
        # Before the start-up lines: a SIGTERM sent on seeing "ready" must drain, not kill.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            for line in describe(server):
                log.info(line)
            async for signum in signals:
                log.info("received %s: draining (up to %gs), then exiting",
                         signal.Signals(signum).name, settings.shutdown_grace)
                break
    log.info("stopped")


#: The settings ``comzy-server --help`` shows, each with a short line (``comzy-server settings``: all).
MAIN_SETTINGS = (
    ("base_domain", "domain the tunnels are served under: http://ALIAS.DOMAIN"),
    ("host", "address of the public and agent listeners"),
    ("http_port", "public listener (visitors)"),
    ("ws_port", "agent listener (comzy PORT --server ws://HOST:PORT)"),
    ("admin_host", "address of the admin listener (dashboard, API, metrics)"),
    ("admin_port", "admin listener"),
    ("public_url", "public URLs behind a TLS proxy: https://{alias}.example.com"),
    ("public_agent_url", "agents' URL behind a TLS proxy: wss://tunnel.example.com"),
    ("ssl_cert_path", "TLS certificate (PEM) of the public and agent listeners"),
    ("ssl_key_path", "its private key (PEM)"),
    ("data_dir", "data directory: the SQLite database, the admin token"),
    ("plugins", "comma list of plugins; unset: the built-ins; none: no plugins"),
    ("database_url", "the plugins' database; unset: SQLite in the data directory"),
    ("admin_token", "admin token; unset: made and kept in the data directory"),
    ("log_level", "DEBUG, INFO or WARNING"),
)

#: Options people try for a setting, by their name in upper case with '_' for '-' (``--port`` ->
#: ``PORT``), and the ServerSettings field each means (with the value a flag without one stands for).
OPTION_SYNONYMS: dict[str, tuple[str, str | None]] = {
    "P": ("http_port", None), "PORT": ("http_port", None), "PUBLIC_PORT": ("http_port", None),
    "VISITOR_PORT": ("http_port", None), "AGENT_PORT": ("ws_port", None), "WEBSOCKET_PORT": ("ws_port", None),
    "DOMAIN": ("base_domain", None), "BIND": ("host", None), "LISTEN": ("host", None), "ADDRESS": ("host", None),
    "DATA": ("data_dir", None), "DIR": ("data_dir", None), "CERT": ("ssl_cert_path", None),
    "SSL_CERT": ("ssl_cert_path", None), "TLS_CERT": ("ssl_cert_path", None), "KEY": ("ssl_key_path", None),
    "SSL_KEY": ("ssl_key_path", None), "TLS_KEY": ("ssl_key_path", None), "DB": ("database_url", None),
    "DATABASE": ("database_url", None), "TOKEN": ("admin_token", None), "PLUGIN": ("plugins", None),
    "LOG": ("log_level", None), "VERBOSE": ("log_level", "DEBUG"), "DEBUG": ("log_level", "DEBUG"),
    "QUIET": ("log_level", "WARNING"),
}
#: Where settings come from, for the messages that say an option is none.
SETTINGS_ARE = "environment variables (or a .env file in the working directory)"


def _epilog() -> str:
    """``comzy-server --help``'s epilog: the main settings with their defaults, and examples."""
    from comzy.core.inventory import model_variables

    fields = ServerSettings.model_fields
    home = str(Path.home())
    defaults = {}
    for name, _text in MAIN_SETTINGS:
        default = fields[name].get_default(call_default_factory=True)
        shown = "-" if default is None else str(default)
        defaults[name] = "~" + shown[len(home):] if shown.startswith(home + os.sep) else shown
    width = max(len(shown) for shown in defaults.values())
    lines = [f"settings are {SETTINGS_ARE}, not options;", "`comzy-server settings` lists every one with its value.",
             f"  {'variable':<24} {'default':<{width}}  meaning"]
    for name, text in MAIN_SETTINGS:
        variable = model_variables(ServerSettings, name, fields[name])[0]
        lines.append(f"  {variable:<24} {defaults[name]:<{width}}  {text}")
    http, ws = fields["http_port"].default, fields["ws_port"].default
    admin = f"{fields['admin_host'].default}:{fields['admin_port'].default}"
    lines += [
        "",
        "examples:",
        f"  comzy-server                            serve: :{http} visitors, :{ws} agents, {admin} admin",
        "  COMZY_BASE_DOMAIN=tunnel.example.com COMZY_HTTP_PORT=8080 comzy-server",
        "  comzy-server check                      settings, plugins, TLS, ports, database: without starting",
        "  comzy-server settings | grep PORT       every setting, its value and default",
        "  comzy-server db upgrade                 create or upgrade the tables (MySQL/MariaDB, PostgreSQL)",
        "  comzy-server users create ana           a user and her token (plugin auth_token)",
        "  source <(comzy-server completion bash)  tab completion in this shell (zsh: completion zsh)",
        "",
        "`comzy-server COMMAND --help` describes each command.",
    ]
    return "\n".join(lines)


def _examples(*lines: str) -> str:
    return "\n".join(["examples:", *(f"  {line}" for line in lines)])


def build_parser(catalog: Catalog) -> tuple[argparse.ArgumentParser,
                                            argparse._SubParsersAction[argparse.ArgumentParser]]:
    """comzy-server's parser and its subcommands: the core's and those of ``catalog``'s plugins."""
    raw = HelpFormatter  # examples as written, prose wrapped
    parser = argparse.ArgumentParser(prog="comzy-server", formatter_class=raw, epilog=_epilog(),
                                     description="Run the Comzy tunnel server (without a COMMAND), or manage it.")
    parser.add_argument("--version", action="version", version=f"comzy-server {__version__}")
    commands = parser.add_subparsers(dest=COMMAND, metavar="COMMAND", help="without one: run the server")
    db = commands.add_parser(
        "db", help="the database schema (Alembic migrations)", formatter_class=raw,
        description="Manage the database schema of COMZY_DATABASE_URL (or DB_*, or comzy.db in COMZY_DATA_DIR): "
        "the core's tree and those of the enabled plugins (COMZY_PLUGINS).",
        epilog=_examples(
            "comzy-server db current    one line per tree: its revision, and whether it is current",
            "comzy-server db upgrade    bring every tree to head (before starting a new version)",
            "COMZY_DATABASE_URL=postgresql://comzy:PASSWORD@db.example.com/comzy comzy-server db upgrade",
        ) + "\n\nThe SQLite default is upgraded by the server itself at start-up; other databases never are.")
    db_actions = db.add_subparsers(dest="action", metavar="ACTION", required=True)
    db_actions.add_parser("upgrade", help="apply every pending migration")
    db_actions.add_parser("current", help="print the schema revision and whether it is current")
    listing = commands.add_parser(
        "plugins", help="the installed plugins: enabled or not, distribution, version, hooks and commands",
        formatter_class=raw,
        description="List the installed plugins: whether COMZY_PLUGINS enables each, its distribution and version, "
        "the hooks it implements and the commands it adds. Exits 1 when an enabled plugin is missing or cannot run.",
        epilog=_examples("comzy-server plugins                 a table, one plugin a line",
                         "comzy-server plugins --json          the same as JSON, for scripts",
                         "COMZY_PLUGINS=auth_token,dashboard comzy-server plugins"))
    listing.add_argument("--json", action="store_true", help="print a JSON list, for scripts")
    settings = commands.add_parser(
        "settings", help="every setting: environment variable, value (secrets as ***), default, meaning",
        formatter_class=raw,
        description="Print every setting of the core, the cluster and the enabled plugins as a .env file: a comment "
        "with the meaning, the default and where the value came from, then VARIABLE=value (commented out when "
        "unset; secrets as ***). Exits 1 when a value is invalid or an enabled plugin cannot be built "
        "(said on stderr).",
        epilog=_examples("comzy-server settings                 all of them",
                         "comzy-server settings | grep -i port",
                         "comzy-server settings --json          a JSON list: variable, aliases, value, default, "
                         "source, secret, description",
                         "COMZY_PLUGINS=auth_token comzy-server settings   with that plugin's settings"))
    settings.add_argument("--json", action="store_true", help="print a JSON list, for scripts")
    commands.add_parser(
        "check", help="check settings, plugins, TLS, data directory, ports and database without starting",
        formatter_class=raw,
        description="Check what start-up needs, without starting: the settings (the same messages as at start-up), "
        "the enabled plugins, the TLS files, the data directory and admin token, each listener's port (bound for a "
        "moment, never listened on) and the database (reachable, every tree at head). One line per check, ok or "
        "FAILED with what to do; exits 0 when every check passes, 1 otherwise.",
        epilog=_examples("comzy-server check && comzy-server     start only when every check passes",
                         "COMZY_HTTP_PORT=80 comzy-server check"))
    completion = commands.add_parser(
        "completion", help="print a shell completion script (bash or zsh)", formatter_class=raw,
        description="Print the completion script of comzy-server for SHELL: its commands (those of the plugins "
        "installed now included), options and their choices.",
        epilog=_examples("source <(comzy-server completion bash)    in this shell; add the line to ~/.bashrc",
                         "comzy-server completion bash > ~/.local/share/bash-completion/completions/comzy-server",
                         "comzy-server completion zsh > ~/.zfunc/_comzy-server    with fpath+=(~/.zfunc) before "
                         "compinit in ~/.zshrc"))
    completion.add_argument("shell", metavar="SHELL", choices=SHELLS, help="bash or zsh")
    catalog.add_parsers(commands)
    return parser, commands


def _setting_for_option(option: str, catalog: Catalog) -> tuple[str, str | None, bool, bool] | None:
    """The setting an option such as ``--port`` stands for: (its variable, the value a bare flag
    means, whether it is a yes/no setting, whether it is a secret); None when no setting matches."""
    from comzy.core.cluster.settings import ClusterSettings
    from comzy.core.inventory import is_secret, model_variables

    word = option.lstrip("-").upper().replace("-", "_")
    synonym = OPTION_SYNONYMS.get(word)
    if synonym is not None:
        info = ServerSettings.model_fields[synonym[0]]
        return (model_variables(ServerSettings, synonym[0], info)[0], synonym[1], info.annotation is bool,
                is_secret(info))
    models: list[type[BaseSettings]] = [ServerSettings, ClusterSettings]
    models += [type(info.plugin.settings) for info in catalog.plugins.values()
               if isinstance(getattr(info.plugin, "settings", None), BaseSettings)]
    for model in models:
        for name, info in model.model_fields.items():
            variables = model_variables(model, name, info)
            if word in variables or f"COMZY_{word}" in variables or word == name.upper():
                return variables[0], None, info.annotation is bool, is_secret(info)
    return None


def _misplaced_setting(argv: list[str], commands: dict[str, object], catalog: Catalog) -> str | None:
    """What to say when comzy-server is given a setting as an option (``--port 9000``) or a port
    as a command (``comzy-server 9000``); None when ``argv`` is not such a mistake."""
    from comzy.core.inventory import mask_urls

    for index, arg in enumerate(argv):
        if arg in commands:
            return None  # the rest is the command's
        if arg.isdigit():
            return (f"comzy-server takes no port argument: its settings are {SETTINGS_ARE}; "
                    f"run COMZY_HTTP_PORT={arg} comzy-server (`comzy-server settings` lists every setting)")
        if not arg.startswith("-") or arg in ("-h", "--help", "--version"):
            return None
        option, has_value, value = arg.partition("=")
        if not has_value and index + 1 < len(argv) and not argv[index + 1].startswith("-") \
                and argv[index + 1] not in commands:
            value, has_value = argv[index + 1], "="
        if catalog.plugins == {} and _setting_for_option(option, catalog) is None:
            catalog = Catalog.discover()  # perhaps a plugin's setting (--require-token)
        found = _setting_for_option(option, catalog)
        if found is None:
            return (f"{option} is not an option: comzy-server's settings are COMZY_* {SETTINGS_ARE}; "
                    "`comzy-server settings` lists them all, `comzy-server --help` shows the main ones")
        variable, flag_value, yes_no, secret = found
        shown = "..." if secret or not (has_value or flag_value or yes_no) else (
            value if has_value else flag_value or "true")
        if variable.endswith("_URL"):
            shown = mask_urls(shown)  # what was typed may hold a password: stderr reaches logs
        return (f"{option} is not an option: comzy-server's settings are {SETTINGS_ARE}; run {variable}={shown} "
                f"comzy-server, or put {variable}={shown} in .env (`comzy-server settings` lists every setting)")
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``comzy-server``."""
    argv = sys.argv[1:] if argv is None else argv
    catalog = Catalog.discover() if _needs_plugins(argv) else Catalog()
    parser, commands = build_parser(catalog)
    mistake = _misplaced_setting(argv, commands.choices, catalog)
    if mistake is not None:
        print(f"comzy-server: {mistake}", file=sys.stderr)
        raise SystemExit(2)
    word = _command_word(argv)
    if word is not None and word not in commands.choices:
        # Perhaps the command of an enabled plugin that cannot be built: say why, not "invalid choice".
        try:
            catalog.enabled(select_plugins(load_settings().plugins))
        except PluginError as exc:
            print(f"comzy-server: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        close = difflib.get_close_matches(word, list(commands.choices), n=1)
        if close:
            print(f"comzy-server: there is no command {word!r}; did you mean {close[0]!r}? "
                  "(`comzy-server --help` lists the commands)", file=sys.stderr)
            raise SystemExit(2)
    args = parser.parse_args(argv)
    command = vars(args).pop(COMMAND)
    if command == "completion":
        print(script(args.shell, "comzy-server", Node.from_parser(parser)), end="")
        raise SystemExit(0)
    if command == "settings":
        raise SystemExit(_print_settings(catalog, args.json))
    if command == "check":
        from comzy.core.check import report, run_checks  # the server's modules load only when needed

        text, status = report(run_checks(catalog))
        print(text)
        raise SystemExit(status)
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
    tune_gc()  # every tunnel keeps long-lived objects (memory.GC_THRESHOLDS says what the defaults cost)
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


def _print_settings(catalog: Catalog, as_json: bool) -> int:
    """``comzy-server settings``: the listing on stdout, problems on stderr; the exit status."""
    from comzy.core.inventory import build, collect, render

    core, _problem = build(ServerSettings)
    # With invalid core settings, COMZY_PLUGINS as the environment has it (the error is reported).
    names = select_plugins(core.plugins if isinstance(core, ServerSettings) else os.environ.get("COMZY_PLUGINS"))
    plugins: list[tuple[str, object]] = []
    errors: list[tuple[str, str]] = []
    for name in names:
        info = catalog.plugins.get(name)
        if info is None:
            errors.append((name, "it is not installed (`comzy-server plugins` lists those that are)"))
        elif info.plugin is None or info.error is not None:
            errors.append((name, info.error or "it cannot be built"))
        else:
            plugins.append((name, info.plugin))
    rows, problems = collect(plugins, errors)
    print(render(rows, as_json, [name for name, _ in plugins]))
    for problem in problems:
        print(f"comzy-server: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [leaf for exc in group.exceptions
            for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])]


if __name__ == "__main__":
    main()
