"""The server process: three listeners around one registry, with graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import platform
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgpack
from anyio.streams.tls import TLSStream
from hypercorn.config import Config as HypercornConfig

from comzy import __version__
from comzy.core import http_servers
from comzy.core.admin import AdminApp, AdminToken, load_admin_token
from comzy.core.agent_api import AgentApi
from comzy.core.agent_listener import AgentListener
from comzy.core.cluster.bus import Bus, LocalBus
from comzy.core.control import GoAway, Notice
from comzy.core.datadir import prepare_data_dir
from comzy.core.edge import EdgeApp
from comzy.core.eventloop import running_loop_name
from comzy.core.hooks import HookRunner, build_manager
from comzy.core.hypercorn_compat import install as install_hypercorn_fixes
from comzy.core.logs import RateLimitedLog
from comzy.core.registry import Registry, end_one
from comzy.core.settings import ServerSettings, variable_name
from comzy.core.tls import (
    TLS_HANDSHAKE_RECORD,
    PrefixedStream,
    looks_like_http,
    plain_http_on_tls_port,
    server_tls_context,
)
from comzy.core.types import Tunnel

if TYPE_CHECKING:
    from comzy.core.cluster.node import ClusterNode
    from comzy.core.cluster.settings import ClusterSettings

log = logging.getLogger("comzy.server")

#: The bus topic control nodes answer with their tunnels (``all_tunnels``).
TUNNELS_TOPIC = "core.tunnels"

#: Which listeners each COMZY_ROLE binds (the admin listener: every role).
PUBLIC_ROLES = ("all", "edge")
AGENT_ROLES = ("all", "control")


@dataclass(slots=True)
class Ports:
    """The ports the listeners actually bound (useful when configured as 0); 0 for a listener
    this role does not bind."""

    http: int
    ws: int
    admin: int


class ServerContext:
    """What hooks receive as ``server``: settings, live tunnels, and a task group."""

    def __init__(self, settings: ServerSettings, hooks: HookRunner, plugin_names: list[str]) -> None:
        self.settings = settings
        self.hooks = hooks
        self.plugin_names = plugin_names
        self.registry = Registry()
        # A dashboard polls all_tunnels(): a silent control node is reported once a minute, not per
        # call; per server, so one server's report never silences another's (tests run several).
        self._missing_nodes = RateLimitedLog(log, interval=60.0, level=logging.WARNING)
        self.task_group: anyio.abc.TaskGroup = None  # type: ignore[assignment]  # set by run_server
        self.ports = Ports(0, 0, 0)
        self.draining = False
        #: Set when shutdown begins: long-lived admin streams (a dashboard's feed) end on it, so
        #: the admin listener can close without waiting out the grace period.
        self.stopping = anyio.Event()
        #: The admin listener's token (COMZY_ADMIN_TOKEN or the data directory's file); set by run_server.
        self.admin_token: AdminToken | None = None
        #: COMZY_ROLE: "all" (the single process), "edge" or "control".
        self.role: str = settings.role
        #: This node's id in the cluster; "" in role all.
        self.node = ""
        #: The cluster node (NATS, links, the roles' components); None in role all.
        self.cluster: ClusterNode | None = None
        #: The edge's route cache (docs/design/cluster.md 1.2); None but on an edge once it is built.
        self.router: Any = None
        #: Who holds which alias across the cluster (docs/design/cluster.md 2); None until built.
        self.directory: Any = None
        #: Events and scatter/gather between nodes (docs/plugin_hooks.md): a LocalBus in role all,
        #: a ClusterBus over NATS on a cluster node. Plugins use it the same way in every role.
        self.bus: Bus = LocalBus()

    def tunnels(self) -> list[Tunnel]:
        """Every live tunnel on this node."""
        return [entry.tunnel for entry in self.registry.entries()]

    def tunnel(self, alias: str) -> Tunnel | None:
        """The live tunnel for ``alias``, if any. On an edge, which holds no tunnels, the route
        cache's snapshot of it (None when no visitor asked for it lately: a synchronous answer
        cannot ask the cluster)."""
        entry = self.registry.get(alias)
        if entry is not None:
            return entry.tunnel
        if self.router is not None:
            route = self.router.cached(alias)
            return route.tunnel if route is not None else None
        return None

    async def all_tunnels(self) -> list[Tunnel]:
        """Every live tunnel of the cluster: ``tunnels()`` in role all; on a cluster node, gathered
        from the control nodes (``node`` set on each; a copy whose counters are as of now). Control
        nodes that do not answer within the bus's gather timeout are left out (and logged)."""
        if self.cluster is None:
            return self.tunnels()
        answers = await self.bus.gather(TUNNELS_TOPIC)
        missing = sorted({node for node, info in self.cluster.nats.live_nodes().items() if info.role == "control"}
                         - answers.keys())
        if missing:
            self._missing_nodes("the tunnel list lacks control node(s) %s: no answer within the bus timeout",
                           ", ".join(missing))
        return [Tunnel.from_view(view, node) for node, views in sorted(answers.items()) for view in views]

    def describe_policies(self, tunnel: Tunnel) -> dict[str, Any]:
        """``{plugin name: public summary}`` of ``tunnel``'s policy, for operators' views: what the
        plugins answer ``describe_policy`` on this node's own tunnels, what the control node holding
        it answered on a copy from ``all_tunnels``. Never plugin metadata (it may hold secrets)."""
        if tunnel.policy_summary is not None:
            return tunnel.policy_summary
        return self.hooks.describe_policy(tunnel, self)

    async def close_tunnel(self, alias: str, reason: str = "closed by the server") -> bool:
        """Close a live tunnel (the agent is told why and does not reconnect to it). On a cluster
        node whichever node holds it closes it; False when no node does."""
        entry = self.registry.get(alias)
        if entry is None:
            return await self._close_remote(alias, reason) if self.cluster is not None else False
        if entry.others_live(self.registry):
            # One tunnel of a session that serves several (a row of /api/tunnels): the others go on.
            self.registry.remove(alias, entry.session)
            if self.directory is not None:
                await self.directory.release(entry)
            end_one(entry, self, reason, reason)
            return True
        entry.session.send_nowait(GoAway(reason, reconnect=False).encode())
        await entry.session.flush_and_close(1000, reason)
        return True

    async def _close_remote(self, alias: str, reason: str) -> bool:
        """Ask the control node holding ``alias`` to close it (``{"op": "close"}`` on its subject)."""
        import nats.errors  # a cluster node has it

        from comzy.core.cluster.connection import BusDown

        assert self.cluster is not None
        nats_node = self.cluster.nats
        try:
            reply = await nats_node.nc.request(nats_node.subjects.tunnel(alias),
                                               msgpack.packb({"op": "close", "reason": reason}), timeout=2.0)
        except nats.errors.NoRespondersError:
            return False
        except nats.errors.Error as exc:  # timeout, or NATS down: the operator must be told, not a 404
            raise BusDown(f"cannot reach the node holding '{alias}' ({type(exc).__name__}); try again") from exc
        try:
            return bool(msgpack.unpackb(reply.data).get("closed"))
        except (ValueError, TypeError, AttributeError, msgpack.UnpackException):
            return False

    def notify(self, alias: str, message: str, level: str = "info") -> bool:
        """Show ``message`` to the agent of ``alias`` (e.g. an expiry warning)."""
        entry = self.registry.get(alias)
        if entry is None:
            return False
        entry.session.send_nowait(Notice(message, level).encode())
        return True


def _tunnels_answer(server: ServerContext) -> Any:
    """This control node's tunnels for ``all_tunnels``: views for operators, so without plugin
    metadata (basic_auth's hashes...) and with the plugins' summaries of each policy, made here where
    the plugins know them. A summary value msgpack cannot carry (a datetime, say) travels as its
    str(), rather than costing the whole answer."""
    views = []
    for tunnel in server.tunnels():
        view = tunnel.to_view(metadata=False)
        view["policy_summary"] = server.describe_policies(tunnel)
        views.append(view)
    return msgpack.unpackb(msgpack.packb(views, default=str))


#: Each listener: its name in messages and the settings of its address and port.
LISTENERS = {"public": ("host", "http_port"), "agent": ("host", "ws_port"), "admin": ("admin_host", "admin_port")}


class ListenError(OSError):
    """A listener cannot bind; the message names the address, the port and the variable to change."""

    def __str__(self) -> str:
        return str(self.strerror)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not listening yet), as the server binds its listeners;
    the OSError of ``bind`` when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def listen_problem(error: OSError, settings: ServerSettings, listener: str) -> str:
    """Why ``listener`` (a key of LISTENERS) cannot bind, naming the variable to change (the one the
    user set: ``HTTP_PORT`` or ``COMZY_HTTP_PORT``)."""
    host_field, port_field = LISTENERS[listener]
    host, port = getattr(settings, host_field), getattr(settings, port_field)
    # The name that is set, else the canonical (first) one: the message says what to type.
    host_var = variable_name(ServerSettings, host_field).split("/")[0]
    port_var = variable_name(ServerSettings, port_field).split("/")[0]
    where = f"cannot listen on {host}:{port} ({listener} listener, {port_var}={port})"
    reason = error.strerror or str(error)
    if error.errno == errno.EADDRINUSE:
        return (f"{where}: the port is in use (another comzy-server?); set {port_var} to a free port, "
                "or stop what holds it")
    if error.errno == errno.EACCES and 0 < port < 1024:
        return (f"{where}: permission denied, ports below 1024 need root or CAP_NET_BIND_SERVICE; set {port_var} "
                "to 1024 or above (with a proxy in front), or grant the capability")
    return f"{where}: {reason}; set {host_var} to an address of this machine (0.0.0.0: all of them)"


def _bind(settings: ServerSettings, listener: str) -> socket.socket:
    host_field, port_field = LISTENERS[listener]
    try:
        sock = bind_socket(getattr(settings, host_field), getattr(settings, port_field))
    except OSError as exc:
        raise ListenError(exc.errno, listen_problem(exc, settings, listener)) from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _hypercorn_config(sock: socket.socket, settings: ServerSettings, tls: bool) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("comzy.http")
    config.include_server_header = False
    if hasattr(config, "include_date_header"):
        config.include_date_header = False
    # hypercorn answers 400 past this; our own check inside answers 431 below it.
    config.h11_max_incomplete_size = settings.max_request_head * 2
    config.h2_max_inbound_frame_size = max(config.h2_max_inbound_frame_size, 16384)
    config.websocket_max_message_size = settings.max_websocket_message
    config.graceful_timeout = settings.shutdown_grace
    config.keep_alive_timeout = 75
    if tls:
        config.certfile = str(settings.ssl_cert_path)
        config.keyfile = str(settings.ssl_key_path)
    return config


@asynccontextmanager
async def run_server(
    settings: ServerSettings,
    plugins: Iterable[tuple[str, object]] = (),
    cluster_settings: ClusterSettings | None = None,
) -> AsyncIterator[ServerContext]:
    """Run the server inside the block; on exit shut down gracefully.

    Listeners are bound before the block starts, so ``server.ports`` is valid at once. In role
    edge or control the block starts only once NATS answers; ``cluster_settings`` default to the
    environment's (ClusterConfigError, one line, when they are bad or the nats extra is missing).
    """
    plugins = list(plugins)
    role = settings.role
    if role != "all" and cluster_settings is None:
        from comzy.core.cluster.settings import load_cluster_settings  # only a cluster node reads them

        cluster_settings = load_cluster_settings(role)
    install_hypercorn_fixes()
    pm = build_manager(settings.base_domain, plugins)
    server = ServerContext(settings, HookRunner(pm, trace=settings.trace_hooks), [name for name, _ in plugins])
    # Checked and loaded before anything binds: a bad file is one line (TLSConfigError), not a
    # failure at the first handshake after "ready".
    tls = server_tls_context(settings)
    # Before any plugin writes there: the directory holds token hashes and client addresses.
    prepare_data_dir(settings.data_dir)
    with contextlib.ExitStack() as unbind:  # one that cannot bind closes those bound before it
        http_sock = _bind(settings, "public") if role in PUBLIC_ROLES else None
        if http_sock is not None:
            unbind.callback(http_sock.close)
        admin_sock = _bind(settings, "admin")
        unbind.callback(admin_sock.close)
        ws_sock = _bind(settings, "agent") if role in AGENT_ROLES else None
        unbind.pop_all()
    server.ports = Ports(http_sock.getsockname()[1] if http_sock else 0, ws_sock.getsockname()[1] if ws_sock else 0,
                         admin_sock.getsockname()[1])
    # Port 0 means "any free port": public URLs must name the port actually bound, not ":0". A
    # listener this role does not bind keeps its configured port (a control node's public URLs
    # name the edges' port).
    bound = {"admin_port": server.ports.admin}
    if http_sock:
        bound["http_port"] = server.ports.http
    if ws_sock:
        bound["ws_port"] = server.ports.ws
    settings = server.settings = settings.model_copy(update=bound)
    agent_listener = await anyio.abc.SocketListener.from_socket(ws_sock) if ws_sock else None
    http_config = _hypercorn_config(http_sock, settings, tls=bool(settings.ssl_cert_path)) if http_sock else None
    admin_config = _hypercorn_config(admin_sock, settings, tls=False)
    public_stop = anyio.Event()
    admin_stop = anyio.Event()
    agents = AgentListener(server)
    if cluster_settings is not None:
        from comzy.core.cluster.bus import ClusterBus
        from comzy.core.cluster.node import ClusterNode  # imports nats: only a cluster node pays for it

        server.cluster = ClusterNode(server, cluster_settings)
        server.node = server.cluster.node_id
        server.bus = ClusterBus(server.cluster)
        server.cluster.register(server.bus)
        if role == "control":  # where tunnels live: all_tunnels() gathers them from here
            server.bus.answer(TUNNELS_TOPIC, lambda _request: _tunnels_answer(server))
    async with anyio.create_task_group() as tg:
        server.task_group = tg
        try:
            if server.cluster is not None:
                # Before on_startup: plugins may subscribe to the cluster there.
                await server.cluster.start(tg)
            await server.hooks.on_startup(server)
            server.admin_token = load_admin_token(settings)
            admin_app = AdminApp(server, await server.hooks.admin_routes(server), server.admin_token)
            if agent_listener is not None:
                agents.api = AgentApi(server, await server.hooks.agent_routes(server))
        except BaseException:
            # Nothing serves yet: give the bound ports back before reporting the failure.
            await _release(agent_listener, http_config, admin_config)
            if server.cluster is not None:
                await server.cluster.stop()
            raise
        public_done, admin_done = anyio.Event(), anyio.Event()
        if http_config is not None:
            tg.start_soon(_serve_until, EdgeApp(server), http_config, public_stop, public_done, settings.http_server)
        else:
            public_done.set()
        tg.start_soon(_serve_until, admin_app, admin_config, admin_stop, admin_done)
        if agent_listener is not None:
            tg.start_soon(_accept_agents, agent_listener, agents, tg, tls)
        loop = asyncio.get_running_loop()
        previous_handler = _quiet_accept_errors(loop)
        try:
            yield server
        finally:
            with anyio.CancelScope(shield=True):
                await _shutdown(server, agent_listener, public_stop, admin_stop)
                # hypercorn must finish its own graceful close; cancelling it mid-way breaks it.
                await public_done.wait()
                await admin_done.wait()
                # Every tunnel's on_disconnect runs before on_shutdown releases what it may use.
                with anyio.move_on_after(settings.shutdown_grace):
                    await agents.wait_finished()
                # Last: plugins release resources only once no listener can use them.
                await server.hooks.on_shutdown(server)
                if server.cluster is not None:
                    # After every session's on_disconnect and the plugins: they may still use NATS.
                    await server.cluster.stop()
            tg.cancel_scope.cancel()
            loop.set_exception_handler(previous_handler)


async def _release(agent_listener: anyio.abc.Listener[Any] | None, *configs: HypercornConfig | None) -> None:
    if agent_listener is not None:
        with anyio.CancelScope(shield=True):
            await agent_listener.aclose()
    for config in configs:
        if config is not None:
            socket.socket(fileno=int(config.bind[0].removeprefix("fd://"))).close()


#: How long the agent listener waits before accepting again after accept() failed (EMFILE...).
ACCEPT_RETRY_DELAY = 0.1


async def _accept_agents(listener: anyio.abc.Listener[Any], agents: AgentListener,
                         tg: anyio.abc.TaskGroup, tls: ssl.SSLContext | None = None) -> None:
    # Sessions live in the server's task group, so closing the listener at shutdown stops
    # new agents without cutting the ones that are draining.
    report = RateLimitedLog(log, interval=10.0, level=logging.ERROR)
    while True:
        try:
            stream = await listener.accept()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return
        except OSError as exc:
            # Out of file descriptors (a flood of visitors can do it) or memory: the error passes
            # when connections close. It must not end the server, nor log once per attempt.
            report("agent listener: cannot accept a connection: %s; retrying (raise the open-file "
                   "limit, `ulimit -n`, if this persists)", exc.strerror or exc)
            await anyio.sleep(ACCEPT_RETRY_DELAY)
            continue
        tg.start_soon(_serve_agent, agents, stream, tls)


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> Any:
    """Route asyncio's reports of failed accept() calls (the public and admin listeners) through a
    rate limit: asyncio retries every second and would log each time, with a traceback. Returns
    the handler it replaced."""
    default = loop.get_exception_handler()
    report = RateLimitedLog(log, interval=10.0, level=logging.ERROR)

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            error = context.get("exception")
            report("listener: cannot accept a connection: %s; retrying (raise the open-file limit, "
                   "`ulimit -n`, if this persists)", getattr(error, "strerror", None) or error)
        elif default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    return default


#: Rate-limits the agent port's reports of failed TLS handshakes (scanners, wrong clients).
_tls_refusals = RateLimitedLog(log, interval=10.0, level=logging.INFO)


async def _serve_agent(agents: AgentListener, stream: anyio.abc.SocketStream,
                       tls: ssl.SSLContext | None = None) -> None:
    # A bug while serving one agent must end that connection only, never the server.
    try:
        if tls is not None:
            secured = await _tls_handshake(agents, stream, tls)
            if secured is None:
                return
            # TLSStream passes the socket's extra attributes (the peer's address) through.
            await agents.handle(secured)  # type: ignore[arg-type]
        else:
            plain = await _plain_agent_stream(agents, stream)
            if plain is None:
                return
            await agents.handle(plain)  # type: ignore[arg-type]  # a ByteStream with the socket's attributes
    except Exception:
        log.exception("unexpected error while serving an agent connection; closing it")
        await stream.aclose()


async def _tls_handshake(agents: AgentListener, stream: anyio.abc.SocketStream,
                         tls: ssl.SSLContext) -> TLSStream | None:
    """The agent connection over TLS, or None (closed) when the client does not speak TLS or the
    handshake fails. A plain HTTP request (``ws://`` to this port) gets a 400 saying to use wss://,
    as nginx answers HTTP on an HTTPS port, so the agent can tell its user what is wrong."""
    peer = _peer(stream)
    try:
        with anyio.fail_after(agents.settings.handshake_timeout):
            first = await stream.receive()
            if looks_like_http(first):
                host = stream.extra(anyio.abc.SocketAttribute.local_address)[0]
                await stream.send(plain_http_on_tls_port(str(host), agents.server.ports.ws))
                _tls_refusals("agent %s: plain HTTP on the TLS agent port; told it to use wss://", peer)
                await stream.aclose()
                return None
            return await TLSStream.wrap(PrefixedStream(stream, first), server_side=True, ssl_context=tls,
                                        standard_compatible=False)
    except (TimeoutError, OSError, ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        _tls_refusals("agent %s: TLS handshake failed: %s", peer, _tls_reason(exc))
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        return None


async def _plain_agent_stream(agents: AgentListener,
                              stream: anyio.abc.SocketStream) -> anyio.abc.ByteStream | None:
    """The connection to serve on this plain port, its first bytes put back; None (closed) when it
    began a TLS handshake (``wss://`` to a server without SSL_*): it then gets a plain 400, which
    the agent's TLS reads as "not TLS" at once, rather than waiting out the handshake timeout for a
    request head that never comes."""
    try:
        with anyio.fail_after(agents.settings.handshake_timeout):
            first = await stream.receive()
    except (TimeoutError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        # Closed here: waiting again in the listener's handshake would double the timeout.
        _tls_refusals("agent %s: handshake failed before its first byte: %s", _peer(stream), _tls_reason(exc))
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        return None
    if first[:1] != bytes([TLS_HANDSHAKE_RECORD]):
        return PrefixedStream(stream, first)
    _tls_refusals("agent %s: TLS on the plain agent port; told it this port does not speak TLS", _peer(stream))
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(OSError, anyio.BrokenResourceError):
            await stream.send(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await stream.aclose()
    return None


def _peer(stream: anyio.abc.SocketStream) -> str:
    try:
        return str(stream.extra(anyio.abc.SocketAttribute.remote_address)[0])
    except (anyio.TypedAttributeLookupError, OSError, IndexError):
        return "?"


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) and exc.__cause__ else exc
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return str(cause) or type(cause).__name__


async def _serve_until(app: Any, config: HypercornConfig, stop: anyio.Event, done: anyio.Event,
                       kind: str = "hypercorn") -> None:
    try:
        await http_servers.serve(kind, app, config, stop)
    finally:
        done.set()


async def _shutdown(server: ServerContext, agent_listener: anyio.abc.Listener[Any] | None,
                    public_stop: anyio.Event, admin_stop: anyio.Event) -> None:
    """Stop accepting, GOAWAY to agents, let in-flight requests finish, then close."""
    server.draining = True
    server.stopping.set()
    if agent_listener is not None:
        await agent_listener.aclose()
    entries = server.registry.entries()
    for entry in entries:
        entry.session.send_nowait(GoAway("server shutting down", reconnect=True).encode())
    public_stop.set()
    with anyio.move_on_after(server.settings.shutdown_grace):
        for entry in entries:
            await entry.session.wait_idle()
    for entry in server.registry.entries():
        await entry.session.flush_and_close(1001, "server shutting down")
    admin_stop.set()


def describe(server: ServerContext) -> list[str]:
    """The start-up lines: what listens where, which plugins, where data lives."""
    s = server.settings
    ports = server.ports
    scheme = "https" if s.ssl_cert_path else "http"
    plugins = ", ".join(server.plugin_names) or "none"
    token_source = server.admin_token.source if server.admin_token else "not loaded"
    cluster = server.cluster
    lines = [f"comzy-server {__version__} ready" + (f" as {server.role} node {server.node}" if cluster else "")]
    if cluster is not None:
        lines.append(f"  cluster  {cluster.settings.cluster_name} on NATS {cluster.settings.masked_url}")
    if s.role in PUBLIC_ROLES:
        lines.append(f"  public   {scheme}://{s.host}:{ports.http}  (tunnels at {s.url_for('<alias>')})")
    if s.role in AGENT_ROLES:
        agent_scheme = "wss" if s.ssl_cert_path else "ws"
        lines.append(f"  agents   {agent_scheme}://{s.host}:{ports.ws}  (agents connect with: comzy PORT --server "
                     f"{s.agent_url()})")
    lines += [
        f"  admin    http://{s.admin_host}:{ports.admin}  (token: {token_source})",
        f"  domain   {s.base_domain}",
        f"  plugins  {plugins}",
        # Which loop and HTTP server actually run: what a performance report needs first.
        f"  runtime  Python {platform.python_version()}, {running_loop_name()} event loop, {s.http_server} "
        "public listener",
        f"  database {_database(server)}",
        f"  data     {s.data_dir}",
    ]
    return lines


def _database(server: ServerContext) -> str:
    """The database the enabled plugins keep their data in, its password masked (the core keeps none)."""
    keepers = [name for name in server.plugin_names if name in server.hooks.implementers("database_schema")]
    if not keepers:
        return "none (no enabled plugin keeps data)"
    # Loaded only here: those plugins have loaded SQLAlchemy already; a bare core never does.
    from comzy.core.db import DatabaseError, database_url, masked_url

    try:
        url = masked_url(database_url(server.settings))
    except DatabaseError as exc:
        return f"unusable: {exc}"
    return f"{url}  (for {', '.join(keepers)})"
