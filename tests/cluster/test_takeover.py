"""Taking an alias over across control nodes, and fencing a holder that missed it
(docs/design/cluster.md 2.2-2.4): the resume secret on another node, the ``up`` event, the
reconcile after a NATS reconnect.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest

from comzy import Registration, hookimpl
from comzy.core import protocol as p
from comzy.core.cluster.control_relay import RETRY_AFTER
from tests.cluster.conftest import (
    NatsServer,
    control_node,
    nats_node,
    raw_hello,
    read_record,
    tunnel_request,
    wait_record,
)
from tests.helpers import receive_until_closed, wait_until

pytestmark = pytest.mark.anyio

FT = p.FrameType


async def lookup(node: Any, alias: str) -> dict[str, Any]:
    return await tunnel_request(node, alias, {"op": "lookup"})


def goaway(frames: list[p.Frame]) -> dict[str, Any]:
    [payload] = [frame.payload for frame in frames if frame.type == FT.GOAWAY]
    return dict(payload)


async def test_the_resume_secret_takes_the_alias_over_from_another_node(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as one,
        control_node(nats_server, tmp_path / "b") as two,
        nats_node(nats_server, "edge") as probe,
    ):
        old_ws, welcome = await raw_hello(one, subdomain="moving")
        assert welcome.type == FT.WELCOME
        secret = welcome.payload["resume_secret"]
        old_session = one.tunnel("moving").session

        # Without the secret another agent is refused on the other node: the alias is live on one.
        ws, refused = await raw_hello(two, subdomain="moving")
        assert refused.type == FT.REJECT and "in use by another agent" in refused.payload["reason"]
        await ws.aclose()

        new_ws, again = await raw_hello(two, subdomain="moving", resume={"alias": "moving", "secret": secret})
        assert again.type == FT.WELCOME and again.payload["alias"] == "moving"
        assert again.payload["resume_secret"] == secret
        # The old session is told not to come back (the two would take the alias from each other).
        closed, frames = await receive_until_closed(old_ws)
        assert closed.code == 4000
        # In plain words, as on one node: who took it over, from where (the other node's eviction says).
        assert goaway(frames) == {"reason": "another agent (from 127.0.0.1, with this tunnel's resume secret) took "
                                            "over moving; only one agent serves an alias at a time",
                                  "reconnect": False}
        assert one.tunnel("moving") is None
        new = two.tunnel("moving")
        assert new is not None and new.session != old_session and new.node == two.node
        record = await read_record(probe, "moving")
        assert record.live and record.node == two.node and record.session == new.session
        answer = await lookup(probe, "moving")
        assert (answer["node"], answer["session"]) == (two.node, new.session)
        # The old node's end released nothing: the record is still the new holder's.
        assert (await read_record(probe, "moving")).revision == record.revision
        await new_ws.aclose()


async def test_a_resume_on_the_same_node_replaces_the_local_session(tmp_path: Path, nats_server: NatsServer) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as one,
        nats_node(nats_server, "edge") as probe,
    ):
        old_ws, welcome = await raw_hello(one, subdomain="here")
        secret = welcome.payload["resume_secret"]
        new_ws, again = await raw_hello(one, resume={"alias": "here", "secret": secret})
        assert again.type == FT.WELCOME and again.payload["alias"] == "here"
        closed, frames = await receive_until_closed(old_ws)
        assert closed.code == 4000 and goaway(frames)["reconnect"] is False
        new = one.tunnel("here")
        assert new is not None
        # The replaced session's end leaves the new record live.
        record = await wait_record(probe, "here", lambda r: r is not None and r.session == new.session)
        assert record.live and record.node == one.node
        await new_ws.aclose()
        await wait_record(probe, "here", lambda r: r is not None and not r.live)


async def test_an_up_event_from_another_node_fences_the_local_holder(tmp_path: Path, nats_server: NatsServer) -> None:
    async with (
        control_node(nats_server, tmp_path / "a") as one,
        nats_node(nats_server, "control") as other,
    ):
        ws, welcome = await raw_hello(one, subdomain="fenced")
        assert welcome.type == FT.WELCOME
        session = one.tunnel("fenced").session
        kept_ws, _ = await raw_hello(one, subdomain="kept")
        kept = one.tunnel("kept")
        # Its own "up" (same node and session) is no reason to close; events arrive in order, so
        # once the second one has closed "fenced", the first has been handled.
        await other.nc.publish(other.subjects.tunnel_events, msgpack.packb(
            {"op": "up", "alias": "kept", "node": one.node, "session": kept.session}))
        # Another node claimed "fenced" while this one did not hear the eviction (partitioned, say).
        await other.nc.publish(other.subjects.tunnel_events, msgpack.packb(
            {"op": "up", "alias": "fenced", "node": other.node_id, "session": session + 1}))
        closed, frames = await receive_until_closed(ws)
        assert closed.code == 4000 and goaway(frames)["reconnect"] is False
        assert one.tunnel("fenced") is None
        assert one.tunnel("kept") is kept
        assert (await lookup(other, "kept"))["session"] == kept.session
        await kept_ws.aclose()


async def test_a_reconnect_reconciles_claims_with_the_alias_registry(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async with control_node(nats_server, tmp_path / "a") as one:
        lost_ws, _ = await raw_hello(one, subdomain="lost")
        kept_ws, _ = await raw_hello(one, subdomain="kept")
        taken_ws, _ = await raw_hello(one, subdomain="taken")
        kept = one.tunnel("kept")
        async with nats_node(nats_server, "control") as other:
            kv = await other.kv_aliases()
            await kv.delete("lost")  # lost while this node was away: recreated
            taken = await read_record(other, "taken")
            # Another live node holds it now (its record says so): this node's session must end.
            value = msgpack.unpackb((await kv.get("taken")).value)
            value["n"] = other.node_id
            value["s"] = taken.session + 1
            await kv.update("taken", msgpack.packb(value), last=taken.revision)
            nats_server.kill9()
            await wait_until(lambda: not one.cluster.nats.connected)
            nats_server.start()
            await wait_until(lambda: one.cluster.nats.connected and other.connected)
            closed, frames = await receive_until_closed(taken_ws)
            assert closed.code == 4000 and goaway(frames)["reconnect"] is False
            assert one.tunnel("taken") is None
            lost = await wait_record(other, "lost", lambda r: r is not None)
            assert lost.live and lost.node == one.node and lost.session == one.tunnel("lost").session
            record = await read_record(other, "kept")
            assert record.live and record.node == one.node and record.session == kept.session
            await wait_until(lambda: not one.directory.verifying("kept"))
            assert (await lookup(other, "kept"))["session"] == kept.session
        for ws in (lost_ws, kept_ws):
            await ws.aclose()


class TokenIsUser:
    """A login plugin in miniature: the HELLO token names the user."""

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        registration.user = registration.token


async def test_the_same_user_takes_an_alias_over_from_another_node(tmp_path: Path, nats_server: NatsServer) -> None:
    plugins = [("token_is_user", TokenIsUser())]
    async with (
        control_node(nats_server, tmp_path / "a", plugins) as one,
        control_node(nats_server, tmp_path / "b", plugins) as two,
        nats_node(nats_server, "edge") as probe,
    ):
        old_ws, welcome = await raw_hello(one, subdomain="mine", token="alice")
        assert welcome.type == FT.WELCOME and welcome.payload["user"] == "alice"
        # Another user may not have it; the same user, without the secret, may (as on one node).
        ws, refused = await raw_hello(two, subdomain="mine", token="bob")
        assert refused.type == FT.REJECT and "in use by another agent" in refused.payload["reason"]
        await ws.aclose()
        new_ws, again = await raw_hello(two, subdomain="mine", token="alice")
        assert again.type == FT.WELCOME and again.payload["alias"] == "mine"
        closed, frames = await receive_until_closed(old_ws)
        assert closed.code == 4000 and goaway(frames)["reconnect"] is False
        assert goaway(frames)["reason"].startswith("another agent logged in as alice (from 127.0.0.1) took over mine")
        record = await read_record(probe, "mine")
        assert record.live and record.node == two.node and record.user == "alice"
        await new_ws.aclose()


async def test_an_alias_being_taken_over_is_not_free_for_another_agent_meanwhile(
        tmp_path: Path, nats_server: NatsServer) -> None:
    secret = "the-old-session-secret"
    async with (
        control_node(nats_server, tmp_path / "a") as one,
        nats_node(nats_server, "control") as hung,
    ):
        # A live holder on a node that hears its eviction and never answers (hung): the claimant
        # waits out the eviction's timeout with the record already its own.
        asked = anyio.Event()

        async def never_answer(msg: Any) -> None:
            asked.set()

        await hung.nc.subscribe(hung.subjects.rpc(hung.node_id, "evict"), cb=never_answer)
        await hung.nc.flush()
        kv = await hung.kv_aliases()
        await kv.create("slow", msgpack.packb({"v": 1, "st": "live", "n": hung.node_id, "s": 7,
                                               "h": hashlib.sha256(secret.encode()).digest(), "u": None, "t": {}}))
        results: dict[str, Any] = {}

        async def resume() -> None:
            results["resume"] = await raw_hello(one, subdomain="slow", resume={"alias": "slow", "secret": secret})

        async with anyio.create_task_group() as tg:
            tg.start_soon(resume)
            await asked.wait()
            # The claim is written, the WELCOME not sent yet: another agent must not get the alias.
            ws, refused = await raw_hello(one, subdomain="slow")
            assert refused.type == FT.REJECT and "in use by another agent" in refused.payload["reason"]
            await ws.aclose()
        resumed_ws, welcome = results["resume"]
        assert welcome.type == FT.WELCOME and welcome.payload["alias"] == "slow"
        record = await read_record(hung, "slow")
        assert record.live and record.node == one.node and record.session == one.tunnel("slow").session
        await resumed_ws.aclose()


async def test_an_alias_being_rechecked_is_answered_retry_not_silence(tmp_path: Path,
                                                                      nats_server: NatsServer) -> None:
    """While a reconcile has not yet read an alias's record, its holder says "retry" to lookups (an
    edge asks again at once) rather than nothing (an edge waited its whole lookup timeout)."""
    async with control_node(nats_server, tmp_path / "a") as one, nats_node(nats_server, "edge") as edge:
        ws, _ = await raw_hello(one, subdomain="kept")
        kept = one.tunnel("kept")
        one.directory._verifying.add("kept")  # as a reconcile does for every held alias first
        assert await lookup(edge, "kept") == {"retry": RETRY_AFTER}
        one.directory._verifying.discard("kept")
        assert (await lookup(edge, "kept"))["session"] == kept.session
        await ws.aclose()
