"""The hook specifications: Comzy's plugin API reference (see docs/plugin_hooks.md).

Plugins implement these with ``@comzy.hookimpl``. An implementation may accept any subset
of a hook's arguments. Async implementations are awaited one after another in pluggy's
order (never gathered); ``resolve_host``, ``alias_owner`` and ``alias_reserved`` are the
exceptions: they are firstresult and must be synchronous (``resolve_host`` runs on every request);
``describe_policy`` must be synchronous too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from comzy.core.commands import Commands
    from comzy.core.server import ServerContext
    from comzy.core.types import Exchange, ForwardRequest, ForwardResponse, LoggedRequest, Registration, Tunnel

PROJECT = "comzy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- lifecycle -------------------------------------------------------------------
@hookspec
def on_startup(server: ServerContext) -> Any:
    """Called once when the server starts, before any listener accepts. Open resources
    (database engines, background tasks via ``server.task_group``) here."""


@hookspec
def on_shutdown(server: ServerContext) -> Any:
    """Called once when the server stops, after the listeners closed. Release resources."""


@hookspec
def database_schema() -> Any:
    """Return the plugin's tables as a ``comzy.Schema`` (name, SQLAlchemy ``MetaData``,
    migrations directory), or None. No arguments: ``comzy-server db upgrade`` and ``db current``
    call it without a running server, for the enabled plugins only. The plugin's ``on_startup``
    passes the same Schema to ``comzy.db.prepare_database``."""


# -- agents ----------------------------------------------------------------------
@hookspec
def on_register(registration: Registration, server: ServerContext) -> Any:
    """An agent asks for a tunnel. Raise ``Reject(reason)`` to refuse (the agent prints
    the reason and exits non-zero); set ``registration.alias``/``user``/``expires_at`` or
    append to ``registration.notices`` to shape the tunnel. Every impl runs, in order."""


@hookspec(firstresult=True)
def alias_owner(alias: str, server: ServerContext) -> str | None:
    """The user who owns ``alias``, or None when nobody does; stops at the first non-None
    result. The core then refuses the alias to everyone else (anonymous agents included),
    even while its owner is offline. Synchronous only: look owners up in memory."""


@hookspec(firstresult=True)
def alias_reserved(alias: str, server: ServerContext) -> str | None:
    """Why ``alias`` may be taken only by the user who owns it (e.g. "it serves the custom
    domain shop.example.com"), or None; stops at the first non-None result. The core refuses a
    reserved alias to every registration whose ``user`` is not its owner (``alias_owner``), and
    to everyone while nobody owns it, whether it was asked for, resumed, drawn at random or
    granted by a plugin. Synchronous only: answer from memory."""


@hookspec
def agent_routes(server: ServerContext) -> Any:
    """Return a list of ``AdminRoute`` served as plain HTTP on the agent listener (the API
    behind ``comzy login``, ``comzy status`` and ``comzy aliases``). One request per
    connection; bodies up to 64 KiB."""


@hookspec
def on_connect(tunnel: Tunnel, server: ServerContext) -> Any:
    """A tunnel went live: its agent got WELCOME and visitors can reach it. Must not block
    (the session starts serving after the last impl returns); errors are logged."""


@hookspec
def on_disconnect(tunnel: Tunnel, reason: str, server: ServerContext) -> Any:
    """A registered tunnel ended (agent left, replaced, expired, server stopping).
    Called once per tunnel; errors are logged."""


@hookspec
def on_registration_refused(code: str, reason: str, client_address: str, server: ServerContext) -> Any:
    """An agent was refused a tunnel (it got REJECT). ``code`` says why, as the agent gets it:
    ``protocol`` (not a Comzy HELLO), ``version`` (another protocol version), ``rejected`` (by a
    plugin or the core's alias rules), ``throttled`` (a plugin's 429), ``internal`` (a plugin
    failed); ``reason`` is the sentence the agent shows. Must not block; errors are logged."""


# -- visitors --------------------------------------------------------------------
@hookspec(firstresult=True)
def resolve_host(host: str, server: ServerContext) -> str | None:
    """Map a request's Host (lowercase, without port) to an alias; stops at the first
    non-None result. Synchronous only: it runs on every request. The core's subdomain
    parser runs last."""


@hookspec
def before_forward(request: ForwardRequest, tunnel: Tunnel, server: ServerContext) -> Any:
    """A visitor's request is about to go to the agent. Edit ``request.headers`` or raise
    ``Reject(reason, status, body)`` to answer the visitor instead (401/403/429...)."""


@hookspec
def before_response(response: ForwardResponse, request: ForwardRequest, tunnel: Tunnel, server: ServerContext) -> Any:
    """The local service's response head is about to go to the visitor (a WebSocket's upgrade
    answer too). Edit ``response.headers``, or raise ``Reject(reason, status, body)`` to answer the
    visitor instead (the local service's response is then dropped). Every impl runs, in order."""


@hookspec
def on_request_refused(request: ForwardRequest, tunnel: Tunnel, status: int, reason: str, plugin: str,
                       server: ServerContext) -> Any:
    """A ``before_forward`` implementation refused a visitor (raised ``Reject``): the visitor has its
    answer (``status``; ``reason`` is the Reject's), and ``plugin`` names the plugin that refused.
    Must not block; errors are logged."""


@hookspec
def after_response(exchange: Exchange, server: ServerContext) -> Any:
    """A request/response finished (status, bytes, duration). Must not block: queue slow
    work. Errors are logged and never affect traffic."""


# -- admin listener ----------------------------------------------------------------
@hookspec
def describe_policy(tunnel: Tunnel, server: ServerContext) -> dict[str, Any] | None:
    """A public summary of the policy this plugin enforces on ``tunnel`` (e.g. the user names of a
    login, a limit), or None when it enforces none there. Shown to the server's operators
    (``GET /api/tunnels``, the dashboard) as ``policies: {plugin name: summary}``: JSON-ready values,
    never secrets (no hashes). Every impl is asked; synchronous only: answer from memory."""


@hookspec
def admin_routes(server: ServerContext) -> Any:
    """Return a list of ``AdminRoute`` (path prefix + ASGI app) to serve on the admin
    listener (dashboards, feeds, metrics)."""


# -- services plugins offer each other -----------------------------------------------
@hookspec
def recent_requests(alias: str | None, limit: int, server: ServerContext) -> list[LoggedRequest] | None:
    """The newest requests a request log kept, newest first: at most ``limit``, of ``alias`` only
    unless it is None. May be ``async``. The first non-None answer wins (implementations asked
    in order); return None when this plugin keeps no log now. An exception goes to the caller."""


# -- the command line ----------------------------------------------------------------
@hookspec
def register_commands(commands: Commands) -> None:
    """Add ``comzy-server`` subcommands: ``commands.add(name, run, help=...)`` returns the
    command's ``argparse.ArgumentParser``; ``run(args, context)`` runs it and returns the exit
    status. Asked of every installed plugin, enabled or not, so that ``--help`` lists all commands;
    a command runs only while its plugin is enabled. Synchronous only; must not do I/O."""
