"""The agent listener: WebSocket handshake, HELLO -> WELCOME/REJECT, then the session."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import h11

from comzy import __version__
from comzy.core import protocol as p
from comzy.core.agent_api import AgentApi
from comzy.core.aliases import check_alias, is_idna_reserved, random_alias, taken_over_reason
from comzy.core.control import Hello, Refusal, TunnelRequest, TunnelWelcome, VersionMismatch, Welcome
from comzy.core.headers import is_trusted, real_client
from comzy.core.logs import RateLimitedLog
from comzy.core.registry import Entry, end_tunnel, hash_secret
from comzy.core.session import Heartbeats, Session
from comzy.core.types import Registration, Reject, Tunnel
from comzy.core.websocket import Closed, WebSocket, WebSocketError, accept, asks_for_upgrade, read_head

if TYPE_CHECKING:
    from comzy.core.cluster.records import Holders, Record
    from comzy.core.server import ServerContext

log = logging.getLogger("comzy.agents")

#: Largest message on the agent link: a few DATA frames coalesced, or a big head.
MAX_LINK_MESSAGE = 2 * 1024 * 1024


class AgentListener:
    """Accepts agent connections and serves each as a tunnel session."""

    def __init__(self, server: ServerContext) -> None:
        self.server = server
        self.settings = server.settings
        self.active = 0
        self._none_active = anyio.Event()
        # One task heartbeats every tunnel: an idle tunnel then costs no task or timer of its own.
        self.heartbeats = Heartbeats(self.settings.heartbeat_interval / 10)
        self._sweeping = False
        #: Answers plain HTTP requests (the account API); set by the server once plugins started.
        self.api = AgentApi(server, [])
        # Scanners and broken clients cost a connection each, and must not cost a log line each.
        self._bad_handshake = RateLimitedLog(log, interval=10.0, level=logging.INFO)

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        """Serve one agent connection from handshake to disconnect."""
        self.active += 1
        try:
            # The handshake's frame (HELLO, the upgrade request) is gone before the long wait.
            entries = await self._handle(stream)
            if entries:
                await self._serve(entries)
        finally:
            # Every path (EOF before HELLO, a failed WELCOME, cancellation at shutdown)
            # releases the socket; closing twice is harmless.
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            self.active -= 1
            if not self.active:
                self._none_active.set()
                self._none_active = anyio.Event()

    async def wait_finished(self) -> None:
        """Wait until no connection is being served, its ``on_disconnect`` hooks included."""
        while self.active:
            await self._none_active.wait()

    async def _handle(self, stream: anyio.abc.SocketStream) -> list[Entry] | None:
        """Handshake, HELLO and registration: the entries to serve (one per tunnel), or None."""
        try:
            peer = stream.extra(anyio.abc.SocketAttribute.remote_address)
        except Exception:
            peer = ("?", 0)
        client = peer[0] if isinstance(peer, tuple) else str(peer)
        plain = False
        try:
            with anyio.fail_after(self.settings.handshake_timeout):
                head, rest = await read_head(stream)
                if is_trusted(client, self.settings.trusted_networks):
                    # Behind a trusted proxy: throttles and logs must see the agent, not the proxy.
                    client = real_client(_head_headers(head), client, self.settings.trusted_networks)
                plain = not asks_for_upgrade(head)
                if not plain:
                    ws, _ = await accept(stream, head, rest, MAX_LINK_MESSAGE)
                    hello = await self._read_hello(ws, client)
        except TimeoutError:
            self._bad_handshake("agent %s: handshake timed out after %ss", client, self.settings.handshake_timeout)
            await stream.aclose()
            return None
        except (WebSocketError, p.ProtocolError, anyio.BrokenResourceError, OSError) as exc:
            self._bad_handshake("agent %s: bad handshake: %s", client, exc)
            await stream.aclose()
            return None
        if plain:
            # Plain HTTP: the account API (`comzy login`, `comzy status`), not a tunnel. It keeps
            # its own deadlines: a plugin's answer is not cut short by the handshake's.
            await self.api.serve(stream, head, rest, (client, peer[1] if isinstance(peer, tuple) else 0))
            return None
        if hello is None:
            return None
        return await self._register(ws, hello, client)

    async def _read_hello(self, ws: WebSocket, client: str) -> Hello | None:
        message = await ws.receive()
        if isinstance(message, Closed):
            return None
        if isinstance(message, str):
            await self._reject(ws, client, "protocol", "expected a binary HELLO frame; is this a Comzy agent?")
            return None
        frames = list(p.decode_message(message))
        if len(frames) != 1 or frames[0].type != p.FrameType.HELLO:
            await self._reject(ws, client, "protocol", "the first frame must be HELLO")
            return None
        try:
            return Hello.from_payload(frames[0].payload)
        except VersionMismatch as exc:
            await self._reject(ws, client, "version", str(exc))
        except p.ProtocolError as exc:
            # The frame itself was whole: the agent can be told which field to fix.
            await self._reject(ws, client, "protocol", str(exc))
        return None

    async def _reject(self, ws: WebSocket, client: str, code: str, reason: str,
                      retry_after: int | None = None) -> None:
        try:
            await ws.send(Refusal(code, reason, retry_after).encode())
            await ws.close(1008, "registration refused")
        except WebSocketError:
            await ws.aclose()
        # After the agent has its answer: plugins count and log refusals (metrics, by code) here.
        await self.server.hooks.on_registration_refused(code, reason, client, self.server)

    async def _register(self, ws: WebSocket, hello: Hello, client: str) -> list[Entry] | None:
        """Register every tunnel the HELLO asks for, or none: one refused refuses the connection,
        naming that tunnel (the agent exits saying which and why). Each tunnel is registered as a
        one-tunnel HELLO's is (plugins, fail closed, ownership, resume), in order, so each counts
        against the limits of those after it."""
        server = self.server
        directory = server.directory
        multi = bool(hello.tunnels)
        asked = hello.tunnels or [TunnelRequest("", hello.port, hello.subdomain, hello.resume_alias,
                                                hello.resume_secret, hello.plugins, hello.require)]
        done: list[tuple[Entry, Entry | None, Record | None, Registration, str]] = []
        session: Session | None = None
        for wanted in asked:
            registration = Registration(
                port=wanted.port,
                requested_alias=wanted.subdomain.lower() if wanted.subdomain else None,
                token=hello.token or None,
                client_address=client,
                agent_version=hello.agent,
                resume_secret=wanted.resume_secret,
                agent_data=wanted.plugins,
                required=list(wanted.require),
            )
            secret = wanted.resume_secret or secrets.token_urlsafe(24)
            taken = frozenset(entry.tunnel.alias for entry, *_ in done)
            remote: Record | None = None
            try:
                self._refuse_crowded(client, wanted)
                self._refuse_unenforceable(registration)
                self._refuse_ownerless(registration)
                await server.hooks.on_register(registration, server)
                self._refuse_unconfirmed(registration)
                if directory is None:
                    entry = self._new_entry(ws, hello, registration, client, secret,
                                            self._choose_alias(registration, wanted.resume_alias, taken=taken),
                                            session, wanted.name or None)
                else:
                    entry, remote = await self._claim(ws, hello, registration, client, secret, wanted, session,
                                                      taken)
            except Reject as exc:
                await self._unregister(done)
                reason = f"tunnel '{wanted.name}': {exc.reason}" if multi else exc.reason
                # 429: a plugin throttles this client and logs that once per window; a line per
                # attempt would let the client flood the log.
                if exc.status != 429:
                    log.info("agent %s refused: %s", client, reason)
                    await self._reject(ws, client, "rejected", reason)
                else:
                    # "throttled": the agent waits and tries again instead of giving up for good
                    # (behind a proxy or NAT, its address may be throttled for someone else's guesses).
                    await self._reject(ws, client, "throttled", reason, _retry_after(exc.headers))
                return None
            except Exception:
                await self._unregister(done)
                log.exception("agent %s: registration failed in a plugin", client)
                await self._reject(ws, client, "internal", "the server failed to register the tunnel; try again later")
                return None
            session = entry.session
            previous = server.registry.add(entry)
            if directory is not None:
                # Lookups find it from here on; the "up" event fences a holder that missed its eviction.
                await directory.serve(entry)
            done.append((entry, previous, remote, registration, secret))
        entries = [entry for entry, *_ in done]
        if multi:
            for entry in entries:
                entry.siblings = entries  # shared: a takeover of one asks whether the others still live
            assert session is not None
            session.name = "tunnels " + ", ".join(entry.tunnel.alias for entry in entries)
        first, _, _, first_registration, first_secret = done[0]
        notices = list(dict.fromkeys(notice for *_, registration, _ in done for notice in registration.notices))
        welcome = Welcome(
            alias=first.tunnel.alias,
            url=first.tunnel.public_url,
            resume_secret=first_secret,
            heartbeat=self.settings.heartbeat_interval,
            window=self.settings.stream_window,
            expires_at=first_registration.expires_at,
            user=first_registration.user,
            notices=notices,
            server=f"comzy/{__version__}",
            enforced=list(first_registration.enforced),
            tunnels=[TunnelWelcome(entry.tunnel.name or "", entry.tunnel.alias, entry.tunnel.public_url, secret,
                                   registration.expires_at, list(registration.enforced))
                     for entry, _, _, registration, secret in done] if multi else [],
        )
        try:
            await ws.send(welcome.encode())
        except WebSocketError:
            await self._unregister(done)
            return None
        for entry, previous, remote, registration, _ in done:
            alias = entry.tunnel.alias
            if remote is not None:
                log.info("tunnel %s taken over from node %s by a new session from %s", alias, remote.node, client)
            if previous is not None:
                log.info("tunnel %s taken over by a new session from %s", alias, client)
                # If the old session still reaches a live agent, that agent must not reconnect with
                # the same secret: the two would take the alias from each other forever.
                end_tunnel(previous, server, _taken_over(alias, registration, previous))
            log.info(
                "tunnel %s registered: port=%s client=%s user=%s agent=%s%s",
                alias, registration.port, client, registration.user or "-", registration.agent_version,
                f" name={entry.tunnel.name}" if entry.tunnel.name else "",
            )
        return entries

    async def _unregister(self, done: list[tuple[Entry, Entry | None, Record | None, Registration, str]]) -> None:
        """Undo the registrations of a connection that will not be served (a later tunnel was refused,
        or the WELCOME could not be sent)."""
        server = self.server
        directory = server.directory
        for entry, previous, *_ in reversed(done):
            server.registry.remove(entry.tunnel.alias, entry.session)
            if directory is not None:
                # The record is this session's now: give it up. A replaced local session cannot
                # get its record back, so it ends as replaced; its agent comes back with the secret.
                await directory.release(entry)
                if previous is not None:
                    end_tunnel(previous, server, "replaced by a new session")
            elif previous is not None:
                server.registry.add(previous)

    def _new_entry(self, ws: WebSocket, hello: Hello, registration: Registration, client: str, secret: str,
                   alias: str, session: Session | None = None, name: str | None = None) -> Entry:
        """The tunnel for ``alias`` (not registered yet), on ``session`` or on a new one."""
        tunnel = Tunnel(
            alias=alias,
            public_url=self.settings.url_for(alias),
            port=registration.port,
            client_address=client,
            user=registration.user,
            expires_at=registration.expires_at,
            metadata=registration.metadata,
            node=self.server.node,
            policies=list(registration.enforced),
            name=name,
        )
        if session is not None:
            return Entry(tunnel, session, hash_secret(secret))
        session = Session(
            ws,
            window=self.settings.stream_window,
            peer_window=hello.window,
            heartbeat_interval=self.settings.heartbeat_interval,
            heartbeat_timeout=self.settings.heartbeat_timeout,
            name=f"tunnel {alias}",
            heartbeats=self.heartbeats,
        )
        return Entry(tunnel, session, hash_secret(secret))

    async def _claim(self, ws: WebSocket, hello: Hello, registration: Registration, client: str,
                     secret: str, wanted: TunnelRequest, session: Session | None,
                     taken: frozenset[str]) -> tuple[Entry, Record | None]:
        """On a control node: choose the alias by the cluster's records and claim it there
        (docs/design/cluster.md 2.2). Returns the entry and the live holder taken over on another
        node (evicted), if any. Raises Reject: a lost race twice ("in use"), or the alias registry
        unreachable (429, so the agent is told "throttled" and retries)."""
        directory = self.server.directory
        names = [registration.alias, registration.requested_alias, wanted.resume_alias]
        attempt = 0
        while True:
            attempt += 1
            holders = await directory.holders(names)
            entry = self._new_entry(ws, hello, registration, client, secret,
                                    self._choose_alias(registration, wanted.resume_alias, holders, taken),
                                    session, wanted.name or None)
            try:
                return entry, await directory.claim(entry, holders)
            except Reject as exc:
                # Another node's claim came first: read again and choose again, once.
                if exc.status != 409 or attempt > 1:
                    raise

    def _choose_alias(self, registration: Registration, resume_alias: str | None,
                      holders: Holders | None = None, taken: frozenset[str] = frozenset()) -> str:
        """The alias to grant (registering it may replace the caller's live session). Raises Reject.

        ``holders`` (on a control node) are the cluster's records of the names asked for; without
        them this node's registry decides. ``taken``: the aliases the same connection's earlier
        tunnels got, which no later one may have (it would replace its own sibling).
        """
        registry = self.server.registry
        reserved = self.settings.reserved
        allow_punycode = self.settings.allow_punycode_aliases
        user = registration.user

        def held_by_caller(name: str) -> bool:
            if name in taken:
                raise Reject(f"'{name}' is already one of this agent's tunnels; give each tunnel its own subdomain")
            if holders is not None:
                return holders.held_by_caller(name, registration.resume_secret, user)
            entry = registry.get(name)
            if entry is None:
                return True
            if registry.holder_matches(name, registration.resume_secret):
                return True
            return user is not None and entry.tunnel.user == user

        if registration.alias:  # granted by a plugin (e.g. an owned alias)
            name = registration.alias
            # Any name a plugin grants, but no look-alike the operator has not allowed (an xn-- alias
            # a user owned before that rule, say).
            if not allow_punycode and is_idna_reserved(name):
                raise Reject(str(check_alias(name, frozenset())))
            # The plugin's word stands, except on an alias kept for its owner: no plugin hands that out.
            if self.server.hooks.alias_reserved(name, self.server) is not None:
                problem = self._not_for(name, user)
                if problem:
                    raise Reject(problem)
            if not held_by_caller(name):
                raise Reject(f"'{name}' is in use by another agent right now; try again later")
            return name
        if registration.requested_alias:
            name = registration.requested_alias
            problem = check_alias(name, reserved, allow_punycode=allow_punycode) or self._not_for(name, user)
            if problem:
                raise Reject(problem)
            if not held_by_caller(name):
                raise Reject(f"'{name}' is in use by another agent; choose another --subdomain")
            return name
        if resume_alias:
            # The secret proves the caller held the alias; it never proves it may have it now.
            name = resume_alias
            if (name not in taken and check_alias(name, reserved, allow_punycode=allow_punycode) is None
                    and held_by_caller(name) and self._not_for(name, user) is None):
                return name
        while True:
            name = random_alias()
            if registry.get(name) is None and name not in taken and self._not_for(name, user) is None:
                return name

    def _not_for(self, name: str, user: str | None) -> str | None:
        """Why ``user`` (None: anonymous) may not take ``name`` because of who owns it, or None.

        An owned alias is its owner's alone. An alias a plugin keeps for its owner
        (``alias_reserved``, e.g. one a custom domain maps to) that nobody owns is nobody's:
        whoever took it would serve what it is kept for.
        """
        owner = self.server.hooks.alias_owner(name, self.server)
        if owner is not None:
            return None if owner == user else f"'{name}' belongs to another user; choose another --subdomain"
        why = self.server.hooks.alias_reserved(name, self.server)
        return None if why is None else _kept_for_nobody(name, why)

    def _refuse_crowded(self, client: str, wanted: TunnelRequest) -> None:
        """Refuse one more tunnel from an address that holds COMZY_MAX_TUNNELS_PER_ADDRESS already:
        every tunnel costs the server memory and a descriptor, and an anonymous agent could open
        them until the process runs out. Tunnels of this connection registered before this one
        count (they are in the registry); the tunnel a reconnecting agent takes back (its resume
        secret) does not, since it replaces itself. Loopback agents are not counted: the server's
        own host, or a proxy on it not named in COMZY_TRUSTED_PROXIES (then every agent would share
        one address and the limit would refuse them all)."""
        limit = self.settings.max_tunnels_per_address
        if not limit or _is_loopback(client):
            return
        registry = self.server.registry
        held = registry.count_from(client)
        alias = wanted.resume_alias
        if alias and (mine := registry.get(alias)) is not None and mine.tunnel.client_address == client \
                and registry.holder_matches(alias, wanted.resume_secret):
            held -= 1
        if held >= limit:
            raise Reject(f"{client} already holds {held} tunnels on this server, the most one address may "
                         f"(COMZY_MAX_TUNNELS_PER_ADDRESS={limit}); stop one of them, or ask the server's operator "
                         "to raise the limit")

    def _refuse_unenforceable(self, registration: Registration) -> None:
        """Reject a registration that requires a policy plugin this server does not run (fail closed).

        Checked before ``on_register``: no plugin does work (a token lookup) for a tunnel that
        cannot open, and the agent learns at once what its operator must change.
        """
        enabled = self.server.plugin_names
        missing = [name for name in registration.required if name not in enabled]
        if missing:
            names = ", ".join(missing)
            plugins = "plugin" if len(missing) == 1 else "plugins"
            raise Reject(f"this server does not enforce {names}: ask its operator to enable the {names} {plugins} "
                         "(COMZY_PLUGINS), or start the agent without that policy")

    @staticmethod
    def _refuse_unconfirmed(registration: Registration) -> None:
        """Reject a registration whose required policy an enabled plugin did not take on (fail closed):
        the plugin is too old to know it, or another plugin refused it without saying why."""
        missing = [name for name in registration.required if name not in registration.enforced]
        if missing:
            names = ", ".join(missing)
            raise Reject(f"the {names} plugin on this server did not confirm it enforces this tunnel's policy "
                         "(an older version?): ask the server's operator to upgrade it")

    def _refuse_ownerless(self, registration: Registration) -> None:
        """Reject a requested alias that is kept for its owner while nobody owns it.

        Runs before ``on_register``: a login plugin would otherwise claim the name for its user,
        and the core would then take that user for its rightful owner.
        """
        name = registration.requested_alias
        # The hooks are promised valid aliases; an invalid one is refused later, with its reason.
        allow_punycode = self.settings.allow_punycode_aliases
        # An owned name is refused to non-owners later, once the plugins said who is asking.
        if (name and check_alias(name, frozenset(), allow_punycode=allow_punycode) is None
                and self.server.hooks.alias_owner(name, self.server) is None):
            why = self.server.hooks.alias_reserved(name, self.server)
            if why is not None:
                raise Reject(_kept_for_nobody(name, why))

    async def _serve(self, entries: list[Entry]) -> None:
        """Run the session that serves ``entries`` (one per tunnel) until it ends, then remove each."""
        server = self.server
        session = entries[0].session
        started = time.monotonic()
        if not self._sweeping:
            self._sweeping = True
            server.task_group.start_soon(self.heartbeats.run)
        for entry in entries:
            await server.hooks.on_connect(entry.tunnel, server)
        ended = await session.run()
        for entry in entries:
            tunnel, reason = entry.tunnel, ended
            if entry.ended is not None:
                continue  # ended on its own while the session served its siblings: reported then
            if not server.registry.remove(tunnel.alias, session):
                reason = "replaced by a new session"
            elif server.directory is not None:
                await server.directory.release(entry)
            await server.hooks.on_disconnect(tunnel, reason, server)
            log.info("tunnel %s closed after %.0fs: %s", tunnel.alias, time.monotonic() - started, reason)


def _is_loopback(address: str) -> bool:
    """Whether ``address`` (an agent's, as the listener sees it) is a loopback one, IPv4-mapped included."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def _taken_over(alias: str, registration: Registration, previous: Entry) -> str:
    """What the replaced agent is told: its user started another agent, or an agent presented the
    tunnel's resume secret (the same agent on a new connection, or a copy of it)."""
    return taken_over_reason(alias, registration.user, registration.client_address, previous.tunnel.user)


def _kept_for_nobody(name: str, why: str) -> str:
    """The refusal of an alias a plugin keeps for its owner (``why``) while nobody owns it."""
    return (f"'{name}' is kept for the user who owns it ({why}), and no user owns it: no agent may take it; "
            "choose another --subdomain")


def _retry_after(headers: list[tuple[bytes, bytes]]) -> int:
    """Seconds from a Retry-After header among ``headers`` (60 when absent or not a number)."""
    for name, value in headers:
        if name.lower() == b"retry-after" and value.strip().isdigit():
            return int(value)
    return 60


def _head_headers(head: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of a request head (without its blank line), parsed by h11; none if malformed."""
    conn = h11.Connection(h11.SERVER)
    try:
        conn.receive_data(head + b"\r\n\r\n")
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return []
    return list(event.headers) if isinstance(event, h11.Request) else []
