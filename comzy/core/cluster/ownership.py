"""Who holds which alias across the cluster: JetStream KV records, claims, takeover, fencing.

docs/design/cluster.md section 2. An alias is held by node X iff its record in
``comzy_<cluster>_aliases`` is ``live`` with ``n = X`` and X's lease exists. Claims are
compare-and-set, so two control nodes never both win one alias. A claimant that takes a live
alias over from another node asks that node to evict its session (``rpc(node, "evict")``); a
holder that missed the request is fenced by the ``up`` event that every claim publishes, and by
the reconcile that follows each NATS reconnect or a lost lease.

Role ``all`` does not use this module: its registry alone decides, as it always did.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import msgpack
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from comzy.core.aliases import taken_over_reason
from comzy.core.cluster.records import AliasTaken, DirectoryDown, Holders, Record
from comzy.core.logs import RateLimitedLog
from comzy.core.registry import Entry, end_tunnel

if TYPE_CHECKING:
    from comzy.core.cluster.node import ClusterNode

log = logging.getLogger("comzy.cluster")

#: Longest eviction reason passed on to the replaced agent (another node's words, bounded).
MAX_EVICT_REASON = 500
#: How long a claimant waits for the previous holder's node to evict it (a dead node never answers).
EVICT_TIMEOUT = 1.0
#: How long a KV operation may take before the alias registry counts as unreachable.
KV_TIMEOUT = 2.0
#: KV reads a reconcile keeps in flight (docs/design/cluster.md 2.4: "pipelined").
RECONCILE_WORKERS = 32
Responder = Callable[[Msg], Awaitable[None]]


@dataclass(slots=True)
class _Held:
    """A local tunnel's claim: its entry and the record revision this node wrote last."""

    entry: Entry
    revision: int


class ClusterDirectory:
    """Alias ownership on a control node (a ``ClusterNode`` component; ``server.directory``)."""

    def __init__(self, cluster: ClusterNode) -> None:
        self.cluster = cluster
        self.nats = cluster.nats
        self.server = cluster.server
        #: Answers ``P.t.<alias>`` requests (set by the control relay before start).
        self.responder: Responder | None = None
        self._kv: KeyValue | None = None
        self._held: dict[str, _Held] = {}
        #: Releases NATS did not take (it was away): retried by the next reconcile.
        self._unreleased: dict[str, _Held] = {}
        #: (alias, session) of claims being written: held already for a racing read on this node.
        self._claiming: set[tuple[str, int]] = set()
        self._subscriptions: dict[str, Any] = {}
        self._global: list[Any] = []
        self._verifying: set[str] = set()
        self._reconciling = False
        self._errors = RateLimitedLog(log, interval=10.0, level=logging.WARNING)

    # -- lifetime ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the bucket, answer evictions, listen to tunnel events, keep records fresh."""
        nc, subjects = self.nats.nc, self.nats.subjects
        self._kv = await self.nats.kv_aliases()
        self._global = [
            await nc.subscribe(subjects.rpc(self.nats.node_id, "evict"), cb=self._on_evict),
            await nc.subscribe(subjects.tunnel_events, cb=self._on_event),
        ]
        self.nats.on_reconnect(self._start_reconcile)
        self.nats.on_lease_lost(self._start_reconcile)
        tg = self.cluster.task_group
        assert tg is not None
        tg.start_soon(self._refresh_loop)

    async def stop(self) -> None:
        """Stop answering; release what is still held (graceful stop: agents have been told)."""
        for held in list(self._held.values()):
            with anyio.move_on_after(KV_TIMEOUT):
                await self.release(held.entry)
        for subscription in self._global:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        self._global = []

    # -- reading -----------------------------------------------------------------------------
    def _bucket(self) -> KeyValue:
        if self._kv is None or not self.nats.connected:
            raise DirectoryDown()
        return self._kv

    async def _read(self, name: str) -> Record | None:
        try:
            with anyio.fail_after(KV_TIMEOUT):
                entry = await self._bucket().get(name)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise DirectoryDown(type(exc).__name__) from exc
        return Record.decode(name, entry.value, entry.revision or 0)

    async def _node_alive(self, node: str) -> bool:
        if node == self.nats.node_id or node in self.nats.live_nodes():
            return True
        # Not in the last scan: a node started since is alive all the same (its lease says so).
        try:
            with anyio.fail_after(KV_TIMEOUT):
                await (await self.nats.kv_nodes()).get(node)
        except nats.js.errors.KeyNotFoundError:
            return False
        except (TimeoutError, nats.errors.Error) as exc:
            raise DirectoryDown(type(exc).__name__) from exc
        return True

    async def _is_held(self, record: Record) -> bool:
        if not record.live:
            return False
        if record.node == self.nats.node_id:
            # Ours: held while its session is registered here, or still between its claim and its
            # registration (another registration's read may land in between).
            entry = self.server.registry.get(record.alias)
            held = self._held.get(record.alias)
            return ((entry is not None and entry.tunnel.session == record.session)
                    or (held is not None and held.entry.tunnel.session == record.session)
                    or (record.alias, record.session) in self._claiming)
        return await self._node_alive(record.node)

    async def holders(self, names: Iterable[str | None]) -> Holders:
        """Read the records of ``names`` (None and repeats skipped), concurrently. Raises DirectoryDown."""
        wanted = list(dict.fromkeys(name for name in names if name))
        records: dict[str, Record | None] = {}
        live: dict[str, Record] = {}
        failures: list[DirectoryDown] = []

        async def read(name: str) -> None:
            try:
                record = records[name] = await self._read(name)
                if record is not None and await self._is_held(record):
                    live[name] = record
            except DirectoryDown as exc:  # raised below as itself, not inside an exception group
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            for name in wanted:
                tg.start_soon(read, name)
        if failures:
            raise failures[0]
        return Holders(records, live)

    def verifying(self, alias: str) -> bool:
        """Whether this node is re-checking its claim on ``alias`` (after a reconnect): until it
        knows, it answers no lookup for it and relays no request."""
        return alias in self._verifying

    # -- claiming and releasing -------------------------------------------------------------------
    async def claim(self, entry: Entry, holders: Holders) -> Record | None:
        """Write ``entry``'s record with compare-and-set against what ``holders`` read.

        Returns the live holder on another node that was taken over (asked to evict its session),
        or None. Raises AliasTaken when another claim came first, DirectoryDown when KV is away.
        """
        alias = entry.tunnel.alias
        kv = self._bucket()
        value = Record.encode_entry(entry, self.nats.node_id)
        previous = holders.record(alias)
        claiming = (alias, entry.tunnel.session)
        self._claiming.add(claiming)
        try:
            with anyio.fail_after(KV_TIMEOUT):
                if previous is None:
                    revision = await kv.create(alias, value)
                else:
                    revision = await kv.update(alias, value, last=previous.revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise AliasTaken(alias) from exc
        except nats.js.errors.BadRequestError as exc:  # "wrong last sequence" as an API error
            if exc.err_code == 10071:
                raise AliasTaken(alias) from exc
            raise DirectoryDown(exc.description or "") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise DirectoryDown(type(exc).__name__) from exc
        finally:
            self._claiming.discard(claiming)
        self._held[alias] = _Held(entry, revision)
        self._unreleased.pop(alias, None)  # this claim wrote over that release
        holder = holders.holder(alias)
        if holder is not None and holder.node != self.nats.node_id:
            tunnel = entry.tunnel
            await self._evict_remote(holder, taken_over_reason(alias, tunnel.user, tunnel.client_address, holder.user))
            return holder
        return None

    async def _evict_remote(self, holder: Record, why: str) -> None:
        """Ask ``holder``'s node to close its session (before this one subscribes and welcomes),
        telling its agent ``why`` in plain words (who took the alias over)."""
        body = msgpack.packb({"alias": holder.alias, "session": holder.session, "why": why})
        try:
            await self.nats.nc.request(self.nats.subjects.rpc(holder.node, "evict"), body, timeout=EVICT_TIMEOUT)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            # Dead, or cut off: it finds out from our "up" event or its reconcile (section 2.4).
            log.info("cluster: node %s did not answer the eviction of %s; taking it over", holder.node,
                     holder.alias)
        except nats.errors.Error as exc:
            self._errors("cluster: evicting %s from node %s failed: %s", holder.alias, holder.node, exc)

    async def serve(self, entry: Entry) -> None:
        """Start answering for ``entry``'s alias (lookups, close, notify) and announce it ``up``."""
        alias = entry.tunnel.alias
        if alias not in self._subscriptions and self.responder is not None:
            # A plain subscription, not a queue group: while a holder is hung (SIGSTOP, a stalled
            # process whose NATS connection is still open) and its alias has moved, a queue group
            # kept handing it a share of the lookups, each a 504 after the lookup timeout, until
            # nats-server dropped the connection minutes later. Now every holder hears each
            # request and the first answer wins; a stale holder is fenced by the new owner's "up".
            self._subscriptions[alias] = await self.nats.nc.subscribe(
                self.nats.subjects.tunnel(alias), cb=self.responder)
            # Before the WELCOME and the "up" event: once the agent is told its URL, a lookup must
            # find the subscription at nats-server, not sit in this client's write buffer.
            try:
                await self.nats.nc.flush(timeout=KV_TIMEOUT)
            except (nats.errors.Error, TimeoutError) as exc:  # NATS away: it has the SUB on reconnect
                self._errors("cluster: could not confirm the subscription for %s: %s", alias, exc)
        await self._publish_event("up", alias, entry.tunnel.session)

    async def release(self, entry: Entry) -> None:
        """``entry`` ended: stop answering for its alias, mark its record released (unless another
        claim replaced it meanwhile), announce ``down``. Never raises."""
        alias = entry.tunnel.alias
        held = self._held.get(alias)
        if held is None or held.entry is not entry:
            return  # replaced (here or by another node): the record is its successor's
        del self._held[alias]
        await self._unsubscribe(alias)
        await self._mark_released(held)

    async def _mark_released(self, held: _Held) -> None:
        entry = held.entry
        alias = entry.tunnel.alias
        value = Record.encode_entry(entry, self.nats.node_id, live=False)
        try:
            with anyio.fail_after(KV_TIMEOUT):
                await self._bucket().update(alias, value, last=held.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # taken over meanwhile: the record is the new holder's
        except Exception as exc:
            # NATS away: other nodes would see the alias live (this node's lease lives on), so
            # the release is retried when NATS is back (reconcile).
            self._errors("cluster: could not release alias %s: %s; retrying once NATS is back", alias,
                         getattr(exc, "detail", None) or exc)
            self._unreleased[alias] = held
            return
        await self._publish_event("down", alias, entry.tunnel.session)

    async def _unsubscribe(self, alias: str) -> None:
        subscription = self._subscriptions.pop(alias, None)
        if subscription is not None:
            with contextlib.suppress(nats.errors.Error):  # the connection is gone, and its subscriptions with it
                await subscription.unsubscribe()

    async def _publish_event(self, op: str, alias: str, session: int) -> None:
        body = msgpack.packb({"op": op, "alias": alias, "node": self.nats.node_id, "session": session})
        try:
            await self.nats.nc.publish(self.nats.subjects.tunnel_events, body)
        except nats.errors.Error as exc:
            self._errors("cluster: could not announce tunnel %s %s: %s", alias, op, exc)

    # -- losing an alias to another node ------------------------------------------------------
    async def drop_local(self, alias: str, session: int | None, reason: str) -> bool:
        """Close the local session of ``alias`` (if ``session`` is None or matches): another node
        holds it now. The record is left alone (it is the new holder's)."""
        entry = self.server.registry.get(alias)
        if entry is None or (session is not None and entry.tunnel.session != session):
            return False
        self.server.registry.remove(alias, entry.session)
        held = self._held.get(alias)
        if held is not None and held.entry is entry:
            del self._held[alias]
        await self._unsubscribe(alias)
        log.info("tunnel %s: %s", alias, reason)
        # The agent must not come back with the secret: the two would take the alias from each other.
        # A session serving other tunnels too keeps them (end_tunnel names the one in its GOAWAY).
        end_tunnel(entry, self.server, reason)
        return True

    async def _on_evict(self, msg: Msg) -> None:
        try:
            request = msgpack.unpackb(msg.data)
            alias, session = str(request["alias"]), int(request["session"])
        except Exception:
            return
        why = request.get("why")  # absent from an older node's eviction
        reason = why[:MAX_EVICT_REASON] if isinstance(why, str) and why else "replaced by a new session on another node"
        dropped = await self.drop_local(alias, session, reason)
        if msg.reply:
            await msg.respond(msgpack.packb({"evicted": dropped}))

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = msgpack.unpackb(msg.data)
            op, alias, node, session = event["op"], str(event["alias"]), event["node"], event["session"]
        except Exception:
            return
        if op != "up" or node == self.nats.node_id:
            return
        entry = self.server.registry.get(alias)
        if entry is not None and entry.tunnel.session != session:
            # Fencing: a holder that missed its eviction hears the new owner's "up" here.
            await self.drop_local(alias, None, "replaced by a new session on another node")

    # -- keeping claims true ------------------------------------------------------------------------
    def _start_reconcile(self) -> None:
        tg = self.cluster.task_group
        if tg is not None and not self._reconciling:
            self._verifying.update(self._held)
            tg.start_soon(self.reconcile)

    async def reconcile(self) -> None:
        """Check every local claim against KV (after a reconnect or a lost lease): keep ours,
        drop the sessions whose alias another node holds now, recreate missing records."""
        self._reconciling = True
        try:
            for alias, held in list(self._unreleased.items()):
                del self._unreleased[alias]
                if alias not in self._held:  # not claimed here again since
                    await self._mark_released(held)
            self._verifying.update(self._held)
            # A few workers share one iterator: an alias answers no lookup until it is verified, and
            # one KV read at a time took 1.7 s per 3000 aliases (0.73 s with 32 in flight).
            pending = iter(list(self._verifying))

            async def worker() -> None:
                for alias in pending:
                    held = self._held.get(alias)
                    if held is None:
                        self._verifying.discard(alias)
                        continue
                    try:
                        await self._reconcile_one(alias, held)
                    except DirectoryDown as exc:
                        # Still cut off: the next reconnect starts another round.
                        self._errors("cluster: could not reconcile alias %s: %s", alias, exc.detail)
                        continue
                    self._verifying.discard(alias)

            async with anyio.create_task_group() as tg:
                for _ in range(min(RECONCILE_WORKERS, len(self._verifying))):
                    tg.start_soon(worker)
        finally:
            self._reconciling = False

    async def _reconcile_one(self, alias: str, held: _Held) -> None:
        record = await self._read(alias)
        tunnel = held.entry.tunnel
        if record is not None and record.node == self.nats.node_id and record.session == tunnel.session:
            held.revision = record.revision
            return
        if record is not None and record.live and await self._node_alive(record.node):
            await self.drop_local(alias, tunnel.session, "replaced by a new session on another node")
            return
        try:
            held.revision = await self.claim_again(held.entry, None if record is None else record.revision)
        except AliasTaken:
            await self.drop_local(alias, tunnel.session, "replaced by a new session on another node")

    async def claim_again(self, entry: Entry, last: int | None) -> int:
        """Rewrite ``entry``'s record over revision ``last`` (None: create it); the new revision."""
        kv = self._bucket()
        value = Record.encode_entry(entry, self.nats.node_id)
        try:
            with anyio.fail_after(KV_TIMEOUT):
                if last is None:
                    return await kv.create(entry.tunnel.alias, value)
                return await kv.update(entry.tunnel.alias, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise AliasTaken(entry.tunnel.alias) from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise DirectoryDown(type(exc).__name__) from exc

    async def _refresh_loop(self) -> None:
        """Rewrite every held record each third of the bucket's max age, so a live one never expires."""
        while True:
            await anyio.sleep(self.nats.settings.cluster_alias_ttl / 3)
            for alias, held in list(self._held.items()):
                try:
                    held.revision = await self.claim_again(held.entry, held.revision)
                except AliasTaken:
                    await self.drop_local(alias, held.entry.tunnel.session,
                                          "replaced by a new session on another node")
                except DirectoryDown as exc:
                    self._errors("cluster: could not refresh alias %s: %s", alias, exc.detail)
