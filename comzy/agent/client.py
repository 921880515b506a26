"""The agent's connection to the server: handshake, serving streams, reconnecting."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc

from comzy import __version__
from comzy.agent.forward import LocalForwarder, Serving
from comzy.core import protocol as p
from comzy.core.control import (
    MAX_SESSION_TUNNELS,
    GoAway,
    Hello,
    Notice,
    Refusal,
    TunnelRequest,
    Welcome,
    check_plugin_data,
    control_message,
)
from comzy.core.session import Session
from comzy.core.stream import Stream
from comzy.core.tls import client_tls_context
from comzy.core.websocket import Closed, TLSMismatch, WebSocket, WebSocketError, connect

log = logging.getLogger("comzy.agent")

MAX_LINK_MESSAGE = 2 * 1024 * 1024
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
#: The longest a throttled agent waits before it tries again, whatever the server says.
THROTTLED_MAX = 300.0


class AgentError(Exception):
    """A condition the agent cannot recover from; the message says what to do."""


class Rejected(AgentError):
    """The server refused the registration (``retry_after``: seconds after which it may accept)."""

    def __init__(self, code: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.retry_after = retry_after


class PolicyNotEnforced(AgentError):
    """The server opened the tunnel without confirming a policy the agent required (WELCOME
    ``enforced``): an older server, or one that ignores it. The agent closes the tunnel unused."""


class SeveralTunnelsUnsupported(AgentError):
    """The agent asked for several tunnels on one connection and the server answered for one (an
    older server, which ignores HELLO ``tunnels``). The agent closes the connection unused."""


class Unreachable(AgentError):
    """No server in the list could be reached."""


class TLSMisconfigured(Unreachable):
    """Every server answered, but not as its URL says: TLS on a ws:// port, none on a wss:// port, or
    a certificate the agent does not trust. The message says what to change, one line per server."""


class Reporter(Protocol):
    """Where the agent reports what happens (the CLI prints it)."""

    def connected(self, welcome: Welcome, first: bool) -> None: ...
    def reconnecting(self, reason: str, delay: float) -> None: ...
    def notice(self, level: str, message: str) -> None: ...


@dataclass
class TunnelSpec:
    """One of several tunnels an agent serves on one connection (HELLO ``tunnels``): ``name`` is how
    the agent and the server's REQUESTs refer to it; the rest is what AgentConfig says of a lone one."""

    name: str
    port: int
    subdomain: str | None = None
    plugin_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    require: list[str] = field(default_factory=list)


@dataclass
class AgentConfig:
    """What the agent needs to run.

    ``plugin_data`` goes to the server's plugins in HELLO ``plugins``, keyed by plugin name (a
    plugin reads its own as ``registration.agent_data.get(name)`` in ``on_register``): JSON-like
    values, at most 16 KiB encoded (``comzy.core.control.check_plugin_data``; a ValueError here
    says what is wrong). ``require`` names the plugins that must enforce this tunnel's policy
    (HELLO ``require``): the server refuses the tunnel when one is not enabled, and the agent
    refuses to serve when the WELCOME does not confirm each (fail closed: an older server ignores
    what it does not know). ``extra_hello`` holds raw keys laid over the HELLO map as sent, for
    trying what another agent version might send.
    """

    servers: list[str]
    port: int
    local_host: str = "localhost"
    subdomain: str | None = None
    token: str | None = None
    rewrite_host: bool = False
    window: int = p.DEFAULT_WINDOW
    plugin_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    require: list[str] = field(default_factory=list)
    extra_hello: dict[str, Any] = field(default_factory=dict)
    #: CA certificates (PEM) trusted for wss:// servers instead of the system's (``--cacert``);
    #: None: the system's, or SSL_CERT_FILE's.
    cacert: str | None = None
    #: Several tunnels on this one connection (then ``port``, ``subdomain``, ``plugin_data`` and
    #: ``require`` above are ignored); empty: the one tunnel those describe.
    tunnels: list[TunnelSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Refused here, where the caller can fix it, not by the server after a round trip.
        try:
            check_plugin_data(self.plugin_data)
            for spec in self.tunnels:
                check_plugin_data(spec.plugin_data)
        except ValueError as exc:
            raise ValueError(f"plugin_data: {exc}") from None
        if len(self.tunnels) > MAX_SESSION_TUNNELS:
            raise ValueError(f"at most {MAX_SESSION_TUNNELS} tunnels on one agent (asked for {len(self.tunnels)})")
        names = [spec.name for spec in self.tunnels]
        if len(set(names)) != len(names):
            raise ValueError("each tunnel needs its own name")


class Agent:
    """Keeps its tunnel (or ``config.tunnels``, on one connection) up until told to stop.

    ``forwarders`` maps each of ``config.tunnels`` by name to its local service; a REQUEST's
    ``tn`` picks one. A lone tunnel is served by ``forwarder``.
    """

    def __init__(self, config: AgentConfig, forwarder: LocalForwarder, reporter: Reporter,
                 forwarders: dict[str, LocalForwarder] | None = None) -> None:
        self.config = config
        self.forwarder = forwarder
        self.forwarders = forwarders or {}
        missing = [spec.name for spec in config.tunnels if spec.name not in self.forwarders]
        if missing:
            raise ValueError(f"no local service for tunnel {', '.join(missing)}")
        self.reporter = reporter
        self.alias: str | None = None
        self.resume_secret: str | None = None
        #: Per tunnel of ``config.tunnels``: (alias, resume secret) from the latest WELCOME.
        self.resumes: dict[str, tuple[str, str | None]] = {}
        #: Tunnels whose alias was taken over (GOAWAY naming them): not asked for again, with why.
        self.ended: dict[str, str] = {}
        self.session: Session | None = None
        self._server_index = 0
        #: Set by close(): a session that ends now was ended by us, and is not a lost connection.
        self._stopping = False
        # Built once (a ValueError here when --cacert cannot be read), used for every reconnect.
        self._tls = client_tls_context(config.cacert) if any(url.startswith("wss:") for url in config.servers) \
            else None

    @property
    def latency(self) -> float | None:
        """Seconds of the latest PING's round trip to the server (at connect, then each heartbeat);
        None while not connected or before the first answer."""
        session = self.session
        return session.round_trip if session is not None else None

    def _hello(self) -> Hello:
        if self.config.tunnels:
            return self._hello_several()
        resuming = bool(self.alias and self.resume_secret)
        return Hello(
            agent=f"comzy/{__version__}",
            port=self.config.port,
            subdomain=self.config.subdomain,
            token=self.config.token,
            window=self.config.window,
            resume_alias=self.alias if resuming else None,
            resume_secret=self.resume_secret if resuming else None,
            plugins=self.config.plugin_data,
            require=self.config.require,
        )

    def _hello_several(self) -> Hello:
        """A HELLO for ``config.tunnels`` (but those ended). Its top-level keys repeat the first
        tunnel's, policies included: a server that ignores ``tunnels`` opens that one only, with its
        policy, and its WELCOME without ``tunnels`` makes the agent close it unused."""
        wanted = []
        for spec in self.config.tunnels:
            if spec.name in self.ended:
                continue
            alias, secret = self.resumes.get(spec.name, (None, None))
            wanted.append(TunnelRequest(spec.name, spec.port, spec.subdomain, alias if secret else None, secret,
                                        spec.plugin_data, spec.require))
        first = wanted[0]
        return Hello(agent=f"comzy/{__version__}", port=first.port, subdomain=first.subdomain,
                     token=self.config.token, window=self.config.window, plugins=first.plugins,
                     require=first.require, tunnels=wanted)

    async def _connect_any(self) -> tuple[WebSocket, str]:
        """Try each server in turn, starting with the last one that worked (the one after it when a
        session with it was lost)."""
        errors = []
        mismatches = 0
        servers = self.config.servers
        for i in range(len(servers)):
            url = servers[(self._server_index + i) % len(servers)]
            try:
                ws = await connect(url, MAX_LINK_MESSAGE, ssl_context=self._tls)
            except TLSMismatch as exc:
                errors.append(str(exc))  # one line that already names the URL and what to use
                mismatches += 1
                continue
            except (OSError, TimeoutError, WebSocketError) as exc:
                errors.append(f"{url} ({_reason(exc)})")
                continue
            self._server_index = (self._server_index + i) % len(servers)
            return ws, url
        if mismatches == len(errors):
            raise TLSMisconfigured("; ".join(errors))
        raise Unreachable("cannot reach the Comzy server at " + ", ".join(errors))

    async def _handshake(self, ws: WebSocket) -> Welcome:
        await ws.send(p.encode(p.FrameType.HELLO, 0, {**self._hello().to_payload(), **self.config.extra_hello}))
        with anyio.fail_after(30):
            message = await ws.receive()
        if isinstance(message, Closed):
            raise WebSocketError(f"server closed the connection during the handshake ({message.code})")
        if isinstance(message, str):
            raise AgentError("the server answered with text; is this URL a Comzy agent listener?")
        frames = list(p.decode_message(message))
        frame = frames[0]
        if frame.type not in (p.FrameType.WELCOME, p.FrameType.REJECT):
            raise AgentError(f"unexpected {frame.type.name} from the server during the handshake")
        answer = control_message(frame)
        if isinstance(answer, Refusal):
            raise Rejected(answer.code, answer.reason, answer.retry_after)
        assert isinstance(answer, Welcome)
        if self.config.tunnels:
            return self._check_several(answer)
        unconfirmed = [name for name in self.config.require if name not in answer.enforced]
        if unconfirmed:
            # The tunnel is open on the server but no request has been served: closing it here
            # (run() closes the connection) means it never serves without its policy.
            names = ", ".join(unconfirmed)
            raise PolicyNotEnforced(
                f"the server did not confirm that it enforces {names} (it runs {answer.server}; an older Comzy "
                f"server ignores policies), so the tunnel was closed before serving anything: ask its operator "
                f"to upgrade comzy-server and enable the {names} plugin, or start the agent without that policy")
        return answer

    def _check_several(self, answer: Welcome) -> Welcome:
        """Fail closed on a WELCOME for several tunnels: every one asked for is open, with its policy."""
        asked = [spec for spec in self.config.tunnels if spec.name not in self.ended]
        opened = {tunnel.name: tunnel for tunnel in answer.tunnels}
        if not answer.tunnels:
            raise SeveralTunnelsUnsupported(
                f"the server opened one tunnel where this agent asked for {len(asked)} on one connection (it runs "
                f"{answer.server}; an older Comzy server ignores that), so it was closed before serving anything: ask "
                "its operator to upgrade comzy-server, or run one agent per port")
        missing = [spec.name for spec in asked if spec.name not in opened]
        if missing:
            raise AgentError(f"the server did not open tunnel {', '.join(missing)}, so none was served: "
                             f"it runs {answer.server}; try again, or report it to its operator")
        for spec in asked:
            unconfirmed = [name for name in spec.require if name not in opened[spec.name].enforced]
            if unconfirmed:
                names = ", ".join(unconfirmed)
                raise PolicyNotEnforced(
                    f"tunnel '{spec.name}': the server did not confirm that it enforces {names} (it runs "
                    f"{answer.server}), so the tunnels were closed before serving anything: ask its operator "
                    f"to enable the {names} plugin, or start the agent without that policy")
        for tunnel in answer.tunnels:
            self.resumes[tunnel.name] = (tunnel.alias, tunnel.resume_secret)
        return answer

    async def run(self) -> str | None:
        """Serve until the server ends the tunnel for good; returns the server's reason, or None
        when :meth:`close` stopped the agent.

        Raises Unreachable if the very first connection fails, Rejected if refused.
        """
        first = True
        delay = BACKOFF_START
        while not self._stopping:
            try:
                ws, _url = await self._connect_any()
                try:
                    welcome = await self._handshake(ws)
                except BaseException:
                    await ws.aclose()  # refused or failed: do not leak the connection
                    raise
            except Unreachable as exc:
                if first:
                    raise
                reason = str(exc)
            except Rejected as exc:
                if exc.code != "throttled":
                    raise
                # The server throttles our address (a proxy or NAT may share it with someone who
                # guesses tokens): not a verdict on us, so wait as long as it says and try again.
                wait = min(max(exc.retry_after or BACKOFF_MAX, BACKOFF_START), THROTTLED_MAX) + random.uniform(0, 1)
                if self._stopping:
                    break
                self.reporter.reconnecting(str(exc), wait)
                await anyio.sleep(wait)
                continue
            except (WebSocketError, p.ProtocolError, TimeoutError, OSError) as exc:
                if first:
                    raise Unreachable(f"the server did not complete the handshake: {exc}") from exc
                reason = str(exc)
            else:
                if self._stopping:  # close() came during the handshake: this session is not wanted
                    await ws.aclose()
                    break
                self.alias = welcome.alias
                self.resume_secret = welcome.resume_secret
                self.reporter.connected(welcome, first)
                first = False
                delay = BACKOFF_START
                final, reason = await self._serve(ws, welcome)
                if final is not None:
                    return final
                if self._stopping:
                    break  # the session ended because we closed it: nothing was lost
                # The server we were on just failed us (it died, hung, or is draining): try the
                # others first. A hung one accepts TCP but never answers the upgrade, and would
                # cost the whole connect timeout on every attempt if it stayed first.
                self._server_index = (self._server_index + 1) % len(self.config.servers)
            if self._stopping:
                break  # stopped while connecting: quitting is not a reason to announce a retry
            # Full jitter: agents of a restarted server do not all return in the same instant.
            wait = random.uniform(delay / 2, delay)
            self.reporter.reconnecting(reason, wait)
            await anyio.sleep(wait)
            delay = min(delay * 2, BACKOFF_MAX)
        return None

    async def _serve(self, ws: WebSocket, welcome: Welcome) -> tuple[str | None, str]:
        """Run one session. Returns (final reason or None to reconnect, reason)."""
        heartbeat = welcome.heartbeat
        session = Session(ws, window=self.config.window, peer_window=welcome.window,
                          heartbeat_interval=heartbeat, heartbeat_timeout=heartbeat * 3, name="agent")
        self.session = session
        session.ping()  # the latency to the server is known at once, not a heartbeat interval later
        final: list[str] = []

        async def on_control(frame: p.Frame) -> None:
            if frame.type not in (p.FrameType.NOTICE, p.FrameType.GOAWAY):
                raise p.ProtocolError(f"unexpected {frame.type.name} frame")
            message = control_message(frame)
            if isinstance(message, Notice):
                self.reporter.notice(message.level, message.message)
            elif isinstance(message, GoAway):
                if message.tunnel is not None and message.tunnel in self.forwarders:
                    # One tunnel's alias went elsewhere; the others go on on this connection.
                    self.ended[message.tunnel] = message.reason
                    self.reporter.notice("warning", f"tunnel {message.tunnel} ended: {message.reason}")
                    if len(self.ended) == len(self.config.tunnels):
                        final.append(message.reason)
                elif message.reconnect:
                    self.reporter.notice("warning", f"server says: {message.reason}; will reconnect")
                else:
                    final.append(message.reason)

        # A request without a body on a pooled local connection is served from callbacks, the
        # rest by a plain asyncio task each (see LocalForwarder.start); whatever is still being
        # served when the session ends is ended with it.
        serving = Serving()

        def on_request(stream: Stream, head: p.RequestHead) -> None:
            forwarder = self.forwarder
            if self.config.tunnels:
                # The server names the tunnel; a name this agent does not serve (or no longer does)
                # gets no guess at another local port.
                found = self.forwarders.get(head.tunnel or "") if head.tunnel not in self.ended else None
                if found is None:
                    stream.reset(p.ResetCode.INTERNAL, "no such tunnel on this agent")
                    return
                forwarder = found
            forwarder.start(stream, head, serving)

        session.on_request = on_request
        session.on_control = on_control
        try:
            reason = await session.run()
        finally:
            await serving.stop()
        self.session = None
        return (final[0] if final else None), reason

    async def close(self) -> None:
        """Stop: close the current session cleanly (Ctrl-C); :meth:`run` then returns None
        instead of reconnecting."""
        self._stopping = True
        if self.session is not None:
            await self.session.close(1000, "agent stopped")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc)
    if "Connection refused" in text or "connection attempts failed" in text:
        return "connection refused"
    return text or type(exc).__name__
