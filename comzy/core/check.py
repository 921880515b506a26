"""``comzy-server check``: what would stop the server, found without starting it.

Settings (the same messages as at start-up), plugins (installed and buildable, as
``comzy-server plugins`` sees them), TLS files, the data directory and the admin token, the
listeners' ports (bound for a moment, never listened on) and the database (reachable, every
enabled tree at head). One line per check, ``ok`` or ``FAILED`` with what to do. No data is
changed: the data directory and a missing SQLite file are left to start-up, an existing one is
opened read-only (SQLite may still add its -wal and -shm files beside it).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from comzy.core.hooks import PluginError, build_manager, select_plugins
from comzy.core.inventory import build
from comzy.core.server import AGENT_ROLES, LISTENERS, PUBLIC_ROLES, bind_socket, listen_problem
from comzy.core.settings import ServerSettings, variable_name
from comzy.core.tls import TLSConfigError, server_tls_context

if TYPE_CHECKING:
    import socket

    from comzy.core.commands import Catalog
    from comzy.core.schema import Schema


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check: its name and one line, what was found or what to do."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        """``ok      ports: ...`` or ``FAILED  ports: ...``."""
        return f"{'ok' if self.ok else 'FAILED':<6}  {self.name}: {self.detail}"


def run_checks(catalog: Catalog) -> list[Check]:
    """Every check, in the order the server meets them at start-up."""
    built, problem = build(ServerSettings)
    if problem is not None or not isinstance(built, ServerSettings):
        return [Check("settings", False, f"{problem}; fix it (`comzy-server settings` lists every variable), "
                                         "then check again: the other checks need valid settings")]
    settings = built
    checks = [Check("settings", True, f"valid (COMZY_ROLE={settings.role}, base domain {settings.base_domain})")]
    if settings.role != "all":
        checks.append(_cluster(settings.role))
    plugin_check, plugins = _plugins(settings, catalog)
    checks.append(plugin_check)
    checks.append(_tls(settings))
    checks.append(_data_dir(settings.data_dir))
    checks.append(_admin_token(settings))
    checks += _ports(settings)
    checks.append(anyio.run(_database, settings, plugins))
    return checks


def report(checks: list[Check]) -> tuple[str, int]:
    """The lines to print and the exit status (0: all passed, 1: any failed)."""
    failed = sum(not check.ok for check in checks)
    summary = (f"all {len(checks)} checks passed" if not failed
               else f"{failed} of {len(checks)} checks FAILED")
    return "\n".join([*(check.line() for check in checks), summary]), 1 if failed else 0


def _cluster(role: str) -> Check:
    from comzy.core.cluster.settings import ClusterConfigError, load_cluster_settings

    try:
        cluster = load_cluster_settings(role)
    except ClusterConfigError as exc:
        return Check("cluster", False, str(exc))
    return Check("cluster", True, f"cluster {cluster.cluster_name} on NATS {cluster.masked_url} "
                                  "(settings valid; NATS itself is not contacted)")


def _plugins(settings: ServerSettings, catalog: Catalog) -> tuple[Check, list[tuple[str, object]]]:
    """The enabled plugins, each installed and built, and their hooks as the server would check
    them; the plugins that could be built go on to the database check either way."""
    names = select_plugins(settings.plugins)
    usable = [(name, info.plugin) for name, info in catalog.plugins.items()
              if name in names and info.plugin is not None and info.error is None]
    usable.sort(key=lambda item: names.index(item[0]))
    _listing, problems, status = catalog.report(settings, as_json=False)
    if status:
        failing = problems[:len(problems) - len(catalog.clashes)]
        return Check("plugins", False, "; ".join(failing) + " (`comzy-server plugins` lists what is installed; "
                                       "fix COMZY_PLUGINS or the plugin's settings)"), usable
    try:
        build_manager(settings.base_domain, catalog.enabled(names))
    except PluginError as exc:
        return Check("plugins", False, str(exc)), usable
    if not names:
        return Check("plugins", True, "none enabled (COMZY_PLUGINS)"), usable
    return Check("plugins", True, f"{', '.join(names)}: installed and built"), usable


def _tls(settings: ServerSettings) -> Check:
    try:
        context = server_tls_context(settings)
    except TLSConfigError as exc:
        return Check("tls", False, str(exc))
    if context is None:
        return Check("tls", True, "off (SSL_CERT_PATH and SSL_KEY_PATH unset: plain HTTP and ws://, or TLS "
                                  "on a proxy in front)")
    return Check("tls", True, f"certificate {settings.ssl_cert_path} and key {settings.ssl_key_path} load "
                              "and belong together")


def _data_dir(path: Path) -> Check:
    variable = "COMZY_DATA_DIR"
    if path.exists():
        if not path.is_dir():
            return Check("data", False, f"{variable}={path} is not a directory; set it to a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            return Check("data", False, f"{variable}={path} is not writable by this user; make it so "
                                        f"(chown) or set {variable} to another directory")
        return Check("data", True, f"{path} (exists, writable)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return Check("data", False, f"{variable}={path} does not exist and {parent} is not writable, so it "
                                    f"cannot be made; create it for this user or set {variable}")
    return Check("data", True, f"{path} (made at start-up, mode 0700)")


def _admin_token(settings: ServerSettings) -> Check:
    if settings.admin_token is not None and settings.admin_token.get_secret_value().strip():
        return Check("admin token", True, "COMZY_ADMIN_TOKEN is set")
    path = settings.data_dir / "admin_token"
    if not path.exists():
        return Check("admin token", True, f"{path} (made at start-up; or set COMZY_ADMIN_TOKEN)")
    if not os.access(path, os.R_OK):
        return Check("admin token", False, f"{path} is not readable by this user: make it so (chown), or "
                                           "delete it for a new token at start-up")
    return Check("admin token", True, f"in {path}")


def _ports(settings: ServerSettings) -> list[Check]:
    """Each listener's port, bound for a moment as the server binds it (never listened on)."""
    skipped = {"public"} if settings.role not in PUBLIC_ROLES else set()
    if settings.role not in AGENT_ROLES:
        skipped.add("agent")
    wanted = [name for name in LISTENERS if name not in skipped]
    checks: list[Check] = []
    held: list[socket.socket] = []
    seen: dict[tuple[str, int], str] = {}
    try:
        for name in wanted:
            host_field, port_field = LISTENERS[name]
            host, port = getattr(settings, host_field), getattr(settings, port_field)
            port_var = variable_name(ServerSettings, port_field).split("/")[0]
            title = f"{name} port"
            if port == 0:
                checks.append(Check(title, True, f"{port_var}=0: any free port, named at start-up"))
                continue
            if (host, port) in seen:
                checks.append(Check(title, False, f"{port_var}={port} is also {seen[host, port]}: give each listener "
                                                  "its own port"))
                continue
            seen[host, port] = port_var
            try:
                held.append(bind_socket(host, port))
            except OSError as exc:
                checks.append(Check(title, False, listen_problem(exc, settings, name)))
                continue
            checks.append(Check(title, True, f"{host}:{port} is free ({port_var})"))
    finally:
        for sock in held:
            sock.close()
    return checks


async def _database(settings: ServerSettings, plugins: list[tuple[str, object]]) -> Check:
    """Reachable, and every tree the enabled plugins need at head (SQLite: at head or behind, which
    start-up upgrades; a missing file is made at start-up)."""
    if not plugins:
        return Check("database", True, "not used (no enabled plugin keeps data)")
    # SQLAlchemy and Alembic load only here, as for `comzy-server db`.
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from comzy.core import db

    try:
        schemas = await db.collect_schemas(plugins, settings.base_domain)
    except PluginError as exc:
        return Check("database", False, str(exc))
    if not schemas:
        return Check("database", True, "not used (no enabled plugin keeps data)")
    trees = [db.CORE_SCHEMA, *schemas]
    users = ", ".join(schema.name for schema in schemas)
    try:
        url = db.database_url(settings)
    except db.DatabaseError as exc:
        return Check("database", False, str(exc))
    shown = db.masked_url(url)
    if db.is_sqlite(url):
        return _sqlite(Path(url.database or ""), trees, shown, users)
    try:
        engine = db.create_engine(url)
    except db.DatabaseError as exc:
        return Check("database", False, str(exc))
    try:
        async with engine.connect() as connection:
            states = await connection.run_sync(db.schema_states, trees)
    except (SQLAlchemyError, OSError, CommandError) as exc:
        return Check("database", False, f"cannot use {shown}: {db.describe_error(exc, url)}; check "
                                        "COMZY_DATABASE_URL (or DB_*) and that the database server runs")
    finally:
        await engine.dispose()
    behind = [db.describe_state(state) for state in states if not state.at_head]
    if behind:
        # "run `comzy-server db upgrade`" once, after the trees it is for.
        trimmed = [line.removesuffix(f": {db.UPGRADE_HINT}") for line in behind]
        hint = f": {db.UPGRADE_HINT}" if trimmed != behind else ""
        return Check("database", False, f"{shown}: {'; '.join(trimmed)}{hint}")
    return Check("database", True, f"{shown}: reachable, core and {users} at head")


def _sqlite(path: Path, trees: list[Schema], shown: str, users: str) -> Check:
    """The SQLite file, read-only: start-up makes and upgrades it, so only a newer schema fails."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from comzy.core import db

    if not path.exists():
        return Check("database", True, f"{shown}: no file yet; made with the tables of {users} at start-up")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True))
    try:
        with engine.connect() as connection:
            states = db.schema_states(connection, trees)
    except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
        return Check("database", False, f"cannot read {shown}: {exc}; let this user read and write it")
    finally:
        engine.dispose()
    newer = [state for state in states if not state.known]
    if newer:
        return Check("database", False, f"{shown}: " + "; ".join(db.describe_state(state) for state in newer))
    behind = [state.schema.name for state in states if not state.at_head]
    if behind:
        return Check("database", True, f"{shown}: {', '.join(behind)} behind head; SQLite is upgraded at start-up")
    return Check("database", True, f"{shown}: core and {users} at head")


__all__ = ["Check", "report", "run_checks"]
