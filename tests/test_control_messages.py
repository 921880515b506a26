"""Control messages (comzy/core/control.py): their codec, their bounds, protocol v1 compatibility,
and plugin data carried from the agent's HELLO to ``Registration.agent_data`` on a real server."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from comzy import Registration, hookimpl
from comzy.agent.client import Agent, AgentConfig, Unreachable
from comzy.agent.forward import LocalForwarder
from comzy.core import control as c
from comzy.core import protocol as p
from comzy.core.server import ServerContext
from comzy.core.websocket import Closed, WebSocket, connect, server_handshake
from tests.conftest import RecordingReporter, start_agent, start_server
from tests.helpers import receive_until_closed, serve_tcp
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

FT = p.FrameType
LINK_MESSAGE = 2 * 1024 * 1024

# -- what an agent and a server of the previous commit put on the wire (protocol v1) -----------
#: The previous agent's HELLO for `comzy 3000` after a reconnect, key for key.
V1_HELLO = {"v": 1, "agent": "comzy/0.1.0", "port": 3000, "subdomain": None, "token": None, "window": 262144,
            "resume": {"alias": "quiet-fox", "secret": "s" * 32}}
#: The previous server's WELCOME, key for key.
V1_WELCOME = {"v": 1, "server": "comzy/0.1.0", "alias": "quiet-fox", "url": "http://quiet-fox.localhost:8190",
              "resume_secret": "s" * 32, "heartbeat": 10.0, "window": 262144, "expires_at": None, "user": None,
              "notices": []}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
plugin_names = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)
plugin_data = st.dictionaries(plugin_names, st.dictionaries(st.text(max_size=8), json_values, max_size=4), max_size=3)
texts = st.text(max_size=40)
maybe_texts = st.none() | texts
hellos = st.builds(
    c.Hello, agent=texts, port=st.integers(0, 65535), subdomain=maybe_texts, token=maybe_texts,
    window=st.integers(p.MIN_WINDOW, p.MAX_WINDOW), resume_alias=maybe_texts,
    resume_secret=st.none() | st.text(min_size=c.MIN_RESUME_SECRET, max_size=64), plugins=plugin_data,
)
numbers = st.floats(0, c.LAST_UNIX_TIME, allow_nan=False)
welcomes = st.builds(
    c.Welcome, alias=texts, url=texts, resume_secret=maybe_texts, heartbeat=st.floats(0.001, 3600),
    window=st.integers(p.MIN_WINDOW, p.MAX_WINDOW), expires_at=st.none() | numbers, user=maybe_texts,
    notices=st.lists(texts, max_size=3), server=texts,
)
messages = (hellos | welcomes | st.builds(c.Refusal, code=texts, reason=texts, retry_after=st.none() | numbers)
            | st.builds(c.GoAway, reason=texts, reconnect=st.booleans())
            | st.builds(c.Notice, message=texts, level=texts))


def decoded(message: c.ControlMessage) -> c.ControlMessage:
    """``message`` sent and read back as a peer does: encode, decode the frame, parse the map."""
    [frame] = p.decode_message(message.encode())
    assert frame.stream == 0 and frame.type == message.FRAME
    return c.control_message(frame)


# -- the codec ------------------------------------------------------------------------------------
@given(messages)
def test_every_control_message_round_trips(message: c.ControlMessage) -> None:
    assert decoded(message) == message


@given(st.sampled_from([c.Hello, c.Welcome, c.Refusal, c.GoAway, c.Notice]),
       st.dictionaries(st.sampled_from(["v", "agent", "port", "subdomain", "token", "window", "resume", "plugins",
                                        "alias", "url", "resume_secret", "heartbeat", "expires_at", "user",
                                        "notices", "server", "code", "reason", "retry_after", "reconnect",
                                        "level", "message"]) | st.text(max_size=6),
                       json_values | st.binary(max_size=8), max_size=8))
def test_any_map_parses_or_is_one_protocol_error(kind: Any, payload: dict[str, Any]) -> None:
    try:
        kind.from_payload(payload)
    except p.ProtocolError as exc:
        assert str(exc).startswith(("malformed ", "this server speaks protocol"))


def test_the_wire_keys_are_protocol_v1s() -> None:
    hello = c.Hello(agent="comzy/0.1.0", port=3000, resume_alias="quiet-fox", resume_secret="s" * 32)
    assert hello.to_payload() == V1_HELLO
    welcome = c.Welcome(alias="quiet-fox", url="http://quiet-fox.localhost:8190", resume_secret="s" * 32,
                        server="comzy/0.1.0")
    assert welcome.to_payload() == V1_WELCOME
    assert c.Refusal("throttled", "slow down", 30).to_payload() == {"code": "throttled", "reason": "slow down",
                                                                   "retry_after": 30}
    assert c.Refusal("rejected", "no").to_payload() == {"code": "rejected", "reason": "no"}
    assert c.GoAway("bye", reconnect=False).to_payload() == {"reason": "bye", "reconnect": False}
    assert c.Notice("expires in 5 min", "warning").to_payload() == {"level": "warning", "message": "expires in 5 min"}
    # Plugin data is a key of its own, sent only when there is some.
    assert "plugins" not in hello.to_payload()
    assert c.Hello(agent="a", port=1, plugins={"x": {}}).to_payload()["plugins"] == {"x": {}}


def test_maps_of_the_previous_version_parse_and_unknown_keys_are_ignored() -> None:
    hello = c.Hello.from_payload({**V1_HELLO, "from_the_future": [1, 2]})
    assert hello == c.Hello(agent="comzy/0.1.0", port=3000, resume_alias="quiet-fox", resume_secret="s" * 32)
    assert c.Welcome.from_payload({**V1_WELCOME, "later": True}).alias == "quiet-fox"
    # The smallest HELLO a v1 peer may send: everything but the version is optional.
    assert c.Hello.from_payload({"v": 1}) == c.Hello(agent="?", port=0)


@pytest.mark.parametrize(("kind", "payload", "error"), [
    (c.Hello, {"port": "3000"}, "'port' must be an integer from 0 to 65535 (got str)"),
    (c.Hello, {"port": True}, "'port' must be an integer from 0 to 65535 (got bool)"),
    (c.Hello, {"port": 65536}, "'port' must be an integer from 0 to 65535 (got 65536)"),
    (c.Hello, {"subdomain": 5}, "'subdomain' must be a string or nil (got 5)"),
    (c.Hello, {"subdomain": "a" * 256}, "'subdomain' is longer than 255 characters"),
    (c.Hello, {"token": "t" * 4097}, "'token' is longer than 4096 characters"),
    (c.Hello, {"agent": None}, "'agent' must be a string (got NoneType)"),
    (c.Hello, {"window": 1.5}, "'window' must be an integer (got 1.5)"),
    (c.Hello, {"resume": ["x"]}, "'resume' must be a map {alias, secret} (got list)"),
    (c.Hello, {"resume": {"secret": ["x"] * 20}}, "malformed HELLO resume: 'secret' must be a string or nil"),
    (c.Hello, {"plugins": []}, "'plugins': it must be a map from plugin name to a map"),
    (c.Hello, {"plugins": {"bad name": {}}}, "'plugins': its keys must be plugin names"),
    (c.Hello, {"plugins": {"x": 1}}, "'plugins': 'x' must be a map (a JSON object)"),
    (c.Hello, {"plugins": {"x": {"k": b"\xff"}}}, "'plugins': 'x.k' holds a bytes, which is not JSON data"),
    (c.Hello, {"plugins": {"x": {"k": math.nan}}}, "'plugins': 'x.k' holds nan, which JSON cannot carry"),
    (c.Welcome, {"url": "u"}, "'alias' must be a string (got NoneType)"),
    (c.Welcome, {"alias": "a", "url": "u", "window": 1024}, "'window' must be an integer from 65536 to 16777216"),
    (c.Welcome, {"alias": "a", "url": "u", "heartbeat": 0}, "'heartbeat' must be a positive number up to 3600 (got 0)"),
    (c.Welcome, {"alias": "a", "url": "u", "expires_at": math.inf},
     "'expires_at' must be a number >= 0 up to 253402300799 (got inf)"),
    # Finite but past year 9999: the agent could not print it as a date.
    (c.Welcome, {"alias": "a", "url": "u", "expires_at": 1e300},
     "'expires_at' must be a number >= 0 up to 253402300799 (got 1e+300)"),
    (c.Welcome, {"alias": "a", "url": "u", "heartbeat": 1e12}, "'heartbeat' must be a positive number up to 3600"),
    (c.Welcome, {"alias": "a", "url": "u", "notices": ["ok", 5]}, "'notices' must be a list of strings"),
    (c.Refusal, {"reason": 5}, "'reason' must be a string (got 5)"),
    (c.Refusal, {"retry_after": "soon"}, "'retry_after' must be a number >= 0 (got str)"),
    (c.GoAway, {"reconnect": "yes"}, "'reconnect' must be true or false (got str)"),
    (c.Notice, {}, "'message' must be a string (got NoneType)"),
])
def test_a_malformed_field_is_one_protocol_error_naming_it(kind: Any, payload: dict[str, Any], error: str) -> None:
    if kind is c.Hello:
        payload = {"v": 1, **payload}
    with pytest.raises(p.ProtocolError) as info:
        kind.from_payload(payload)
    assert error in str(info.value)
    assert str(info.value).startswith(f"malformed {kind.FRAME.name}")
    assert "\n" not in str(info.value)


def test_hello_keeps_the_documented_leniencies_of_v1() -> None:
    # A window outside 64 KiB - 16 MiB is replaced by the default, a short resume secret ignored.
    assert c.Hello.from_payload({"v": 1, "window": 1024}).window == p.DEFAULT_WINDOW
    assert c.Hello.from_payload({"v": 1, "window": p.MAX_WINDOW + 1}).window == p.DEFAULT_WINDOW
    short = c.Hello.from_payload({"v": 1, "resume": {"alias": "a", "secret": "s" * (c.MIN_RESUME_SECRET - 1)}})
    assert short.resume_secret is None and short.resume_alias == "a"


@pytest.mark.parametrize("version", [0, 2, "1", None, True, 1.0000001])
def test_another_version_is_a_version_mismatch(version: Any) -> None:
    with pytest.raises(c.VersionMismatch, match="this server speaks protocol v1") as info:
        c.Hello.from_payload({"v": version, "port": "not even checked"})
    assert info.value.version == version


def test_plugin_data_is_bounded_in_size_and_depth() -> None:
    # Exactly at the size limit is accepted; one byte more is not.
    def sized(total: int) -> dict[str, dict[str, Any]]:
        overhead = len(msgpack.packb({"p": {"k": ""}}, use_bin_type=True)) + 2  # str header grows to 3 bytes
        return {"p": {"k": "x" * (total - overhead)}}

    assert len(msgpack.packb(sized(c.MAX_PLUGIN_DATA), use_bin_type=True)) == c.MAX_PLUGIN_DATA
    c.check_plugin_data(sized(c.MAX_PLUGIN_DATA))
    with pytest.raises(ValueError, match=f"over the limit of {c.MAX_PLUGIN_DATA}"):
        c.check_plugin_data(sized(c.MAX_PLUGIN_DATA + 1))
    nested: dict[str, Any] = {"leaf": 1}
    for _ in range(c.MAX_PLUGIN_DATA_DEPTH - 1):
        nested = {"n": nested}
    c.check_plugin_data({"p": nested})  # MAX_PLUGIN_DATA_DEPTH levels of maps
    with pytest.raises(ValueError, match=f"nests deeper than {c.MAX_PLUGIN_DATA_DEPTH} levels"):
        c.check_plugin_data({"p": {"n": nested}})
    with pytest.raises(ValueError, match="deeper"):
        c.check_plugin_data({"p": {"list": [[[[[[[[1]]]]]]]]}})


def test_a_frame_that_is_no_control_message_is_a_protocol_error() -> None:
    with pytest.raises(p.ProtocolError, match="unexpected REQUEST frame"):
        c.control_message(p.Frame(FT.REQUEST, 1, 0, {}))


def test_the_agent_refuses_bad_plugin_data_before_connecting() -> None:
    with pytest.raises(ValueError, match=r"^plugin_data: 'basic_auth\.password' holds a bytes, which is not JSON"):
        AgentConfig(servers=["ws://127.0.0.1:1"], port=3000, plugin_data={"basic_auth": {"password": b"x"}})
    with pytest.raises(ValueError, match=r"^plugin_data: it holds a value that is not JSON data"):
        AgentConfig(servers=["ws://127.0.0.1:1"], port=3000, plugin_data={"p": {"s": {1, 2}}})


# -- plugin data, end to end --------------------------------------------------------------------
class Greeter:
    """A plugin that reads its own data from the agent's HELLO in on_register."""

    def __init__(self) -> None:
        self.seen: list[dict[str, dict[str, Any]]] = []

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        self.seen.append(registration.agent_data)
        mine = registration.agent_data.get("greeter")
        if mine is not None and isinstance(mine.get("name"), str):
            registration.notices.append(f"hello, {mine['name']}")


async def test_plugin_data_reaches_on_register_from_a_real_agent(tmp_path: Path, upstream: Upstream) -> None:
    greeter = Greeter()
    async with start_server(tmp_path, plugins=[("greeter", greeter)]) as server:
        data = {"greeter": {"name": "ana", "tags": ["a", 1, None, 2.5, True]}, "other": {"x": {"y": []}}}
        async with start_agent(server, upstream.port, plugin_data=data) as agent:
            assert agent.reporter.welcomes[0]["notices"] == ["hello, ana"]
            async with agent.visitor() as visitor:
                assert (await visitor.get("/greeted")).status_code == 200
        async with start_agent(server, upstream.port) as plain:
            assert plain.reporter.welcomes[0]["notices"] == []
    assert greeter.seen == [data, {}]


async def hello_answer(server: ServerContext, payload: dict[str, Any]) -> tuple[p.Frame, Closed]:
    """Send one raw HELLO map; the server's answer and how it closed the link."""
    ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", LINK_MESSAGE)
    try:
        await ws.send(p.encode(FT.HELLO, 0, payload))
        closed, frames = await receive_until_closed(ws)
    finally:
        await ws.aclose()
    assert len(frames) == 1
    return frames[0], closed


@pytest.mark.parametrize(("extra", "reason"), [
    ({"port": "3000"}, "malformed HELLO: 'port' must be an integer from 0 to 65535 (got str)"),
    ({"plugins": {"greeter": {"blob": "x" * c.MAX_PLUGIN_DATA}}},
     f"malformed HELLO 'plugins': it is {c.MAX_PLUGIN_DATA + 18} bytes encoded, over the limit of "
     f"{c.MAX_PLUGIN_DATA}"),
    ({"plugins": {"greeter": "ana"}}, "malformed HELLO 'plugins': 'greeter' must be a map (a JSON object)"),
])
async def test_a_malformed_hello_is_refused_with_the_field_to_fix(tmp_path: Path, upstream: Upstream,
                                                                  extra: dict[str, Any], reason: str) -> None:
    greeter = Greeter()
    async with start_server(tmp_path, plugins=[("greeter", greeter)]) as server, \
            start_agent(server, upstream.port) as bystander:
        frame, closed = await hello_answer(server, {**V1_HELLO, "resume": None, **extra})
        assert frame.type == FT.REJECT
        assert c.control_message(frame) == c.Refusal("protocol", reason)
        assert closed.code == 1008
        # No plugin saw it, and the server serves on.
        assert greeter.seen == [{}]
        assert [t.alias for t in server.tunnels()] == [bystander.alias]
        async with bystander.visitor() as visitor:
            assert (await visitor.get("/still")).status_code == 200


async def test_a_previous_agent_and_this_server_still_talk(tmp_path: Path) -> None:
    """The raw v1 maps an agent of the previous commit sends and reads, against this server."""
    async with start_server(tmp_path) as server:
        ws = await connect(f"ws://127.0.0.1:{server.ports.ws}/", LINK_MESSAGE)
        try:
            await ws.send(p.encode(FT.HELLO, 0, {**V1_HELLO, "resume": None}))
            welcome = await next_frame(ws)
            assert welcome.type == FT.WELCOME
            assert set(welcome.payload) == set(V1_WELCOME)
            alias = welcome.payload["alias"]
            assert welcome.payload["url"] == server.settings.url_for(alias)
            assert server.notify(alias, "expires in 5 min", "warning")
            notice = await next_frame(ws)
            assert (notice.type, notice.payload) == (FT.NOTICE, {"level": "warning", "message": "expires in 5 min"})
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.close_tunnel, alias, "revoked by the operator")
                goaway = await next_frame(ws)
            assert (goaway.type, goaway.payload) == (FT.GOAWAY, {"reason": "revoked by the operator",
                                                                 "reconnect": False})
        finally:
            await ws.aclose()


async def next_frame(ws: WebSocket) -> p.Frame:
    """The next control frame the server sends (PINGs skipped)."""
    with anyio.fail_after(10):
        while True:
            message = await ws.receive()
            assert isinstance(message, bytes), message
            for frame in p.decode_message(message):
                if frame.type not in (FT.PING, FT.PONG):
                    return frame


async def test_the_agent_reports_a_malformed_welcome_as_the_servers_fault(tmp_path: Path) -> None:
    async def broken_server(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            ws, _ = await server_handshake(stream, LINK_MESSAGE)
            await ws.receive()
            await ws.send(p.encode(FT.WELCOME, 0, {**V1_WELCOME, "window": 10}))
            await ws.receive()

    async with serve_tcp(broken_server) as port:
        forwarder = LocalForwarder("127.0.0.1", 9)
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{port}"], port=9), forwarder, RecordingReporter())
        with pytest.raises(Unreachable) as info, anyio.fail_after(10):
            await agent.run()
        await forwarder.aclose()
    assert str(info.value) == ("the server did not complete the handshake: malformed WELCOME: 'window' must be "
                               "an integer from 65536 to 16777216 (got 10)")
