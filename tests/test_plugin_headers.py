"""headers (issue 14): --request-header-add/-remove and --response-header-add/-remove, applied by a
real server between visitors and a real agent and local app."""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from comzy.agent import policies as agent_side
from comzy.agent.cli import parse_args
from comzy.agent.client import Agent, AgentConfig, Rejected
from comzy.agent.forward import LocalForwarder
from comzy.agent.policies import BASIC_AUTH, HEADERS, IP_FILTER, BasicAuth, HeaderRules, IpFilter
from comzy.plugins.basic_auth import BasicAuth as BasicAuthPlugin
from comzy.plugins.headers import Headers as HeadersPlugin
from comzy.plugins.headers import plugin as server_side
from comzy.plugins.ip_filter import IpFilter as IpFilterPlugin
from tests.conftest import RecordingReporter, cli_env, start_agent, start_server
from tests.stack import Stacks, stacks_fixture  # noqa: F401 (the stacks fixture: role all and a cluster)
from tests.test_large_transfers import popen, read_until
from tests.test_plugin_rate_limit import control_in_sight
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio


def policy(request_add: list[str] = [], request_remove: list[str] = [],  # noqa: B006 (read only)
           response_add: list[str] = [], response_remove: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """What the stock agent sends for the four header flags."""
    rules = HeaderRules.parse(request_add, request_remove, response_add, response_remove)
    return {"plugin_data": {HEADERS: rules.plugin_data()}, "require": [HEADERS]}


def plugins() -> list[tuple[str, object]]:
    return [(HEADERS, HeadersPlugin())]


def seen(answer: httpx.Response) -> list[tuple[str, str]]:
    """The request headers the local app received (the upstream's echo)."""
    return [(name, value) for name, value in answer.json()["headers"]]


async def test_request_headers_are_removed_then_added(tmp_path: Path, upstream: Upstream) -> None:
    """Removal takes every field of a name, in any case; additions are appended in order,
    duplicates kept; removing and adding one name replaces the visitor's value."""
    rules = policy(request_add=["X-Env: staging", "x-env: second", "X-Visitor: from the rule",
                                "Authorization: Bearer app-token"],
                   request_remove=["COOKIE", "x-visitor", "Authorization"])
    async with start_server(tmp_path / "data", plugins=plugins()) as server, \
            start_agent(server, upstream.port, **rules) as tunnel, tunnel.visitor() as client:
        assert tunnel.reporter.welcomes[0]["enforced"] == [HEADERS]
        visitor_headers = httpx.Headers([("cookie", "session=1"), ("Cookie", "b=2"), ("X-Visitor", "one"),
                                         ("x-visitor", "two"), ("authorization", "Basic eDp5"),
                                         ("x-kept", "yes")])
        answer = await client.get("/echo", headers=visitor_headers)
        assert answer.status_code == 200
        headers = seen(answer)
    names = [name for name, _ in headers]
    assert "cookie" not in names
    assert [value for name, value in headers if name == "x-visitor"] == ["from the rule"]
    assert [value for name, value in headers if name == "authorization"] == ["Bearer app-token"]
    assert [value for name, value in headers if name == "x-env"] == ["staging", "second"]
    assert ("x-kept", "yes") in headers
    assert names.index("x-env") > names.index("x-kept")  # appended after the visitor's


async def test_response_headers_are_removed_then_added(tmp_path: Path, upstream: Upstream) -> None:
    rules = policy(response_add=["X-Frame-Options: DENY", "Set-Cookie: c=3; Path=/", "X-Empty:"],
                   response_remove=["X-MULTI", "x-status", "Set-Cookie"])
    async with start_server(tmp_path / "data", plugins=plugins()) as server, \
            start_agent(server, upstream.port, **rules) as tunnel, tunnel.visitor() as client:
        cookies = await client.get("/cookies")
        status = await client.get("/status/201")
        gzipped = await client.get("/gzip")
    assert cookies.status_code == 200 and cookies.text == "cookies\n"
    assert "x-multi" not in cookies.headers
    assert cookies.headers.get_list("set-cookie") == ["c=3; Path=/"]  # the app's two removed, the rule's added
    assert cookies.headers["x-frame-options"] == "DENY" and cookies.headers["x-empty"] == ""
    assert status.status_code == 201 and "x-status" not in status.headers and status.text == "status 201\n"
    assert gzipped.headers["content-encoding"] == "gzip" and gzipped.text.startswith("compressed body")


async def test_duplicates_of_the_local_app_survive_what_the_rules_do_not_name(tmp_path: Path,
                                                                                 upstream: Upstream) -> None:
    async with start_server(tmp_path / "data", plugins=plugins()) as server, \
            start_agent(server, upstream.port, **policy(response_add=["Set-Cookie: c=3"])) as tunnel, \
            tunnel.visitor() as client:
        cookies = await client.get("/cookies")
    assert cookies.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/", "c=3"]
    assert cookies.headers.get_list("x-multi") == ["one", "two"]


async def test_websocket_upgrades_get_both_directions(tmp_path: Path, upstream: Upstream) -> None:
    rules = policy(request_add=["X-From-Rule: ws"], request_remove=["x-visitor"], response_add=["X-Answer: 101"])
    async with start_server(tmp_path / "data", plugins=plugins()) as server, \
            start_agent(server, upstream.port, **rules) as tunnel:
        head = (f"GET /ws HTTP/1.1\r\nHost: {tunnel.alias}.localhost\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\nX-Visitor: gone\r\n\r\n")
        async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as stream:
            await stream.send(head.encode())
            data = b""
            with anyio.fail_after(10):
                while b"\r\n\r\n" not in data:
                    data += await stream.receive()
        # The local app's refusal of an upgrade (403) gets the response rules too.
        async with await anyio.connect_tcp("127.0.0.1", server.ports.http) as stream:
            await stream.send(head.replace("GET /ws ", "GET /ws/deny ").encode())
            refusal = b""
            with anyio.fail_after(10):
                while b"denied by upstream" not in refusal:
                    refusal += await stream.receive()
    assert data.startswith(b"HTTP/1.1 101")
    assert b"x-answer: 101" in data.lower()
    assert refusal.startswith(b"HTTP/1.1 403") and b"x-answer: 101" in refusal.lower()
    scope = upstream.requests[0]
    assert scope["type"] == "websocket"
    assert (b"x-from-rule", b"ws") in scope["headers"]
    assert all(name != b"x-visitor" for name, _ in scope["headers"])


async def test_an_added_authorization_is_never_taken_for_the_visitors(tmp_path: Path, upstream: Upstream) -> None:
    """headers runs after the other policies: an Authorization header the owner adds for the local
    app does not log visitors in (basic_auth checks the visitor's own), and an IP filter still
    refuses first."""
    credentials = "Basic " + base64.b64encode(b"ana:a long password").decode()
    config = {"plugin_data": {BASIC_AUTH: BasicAuth.parse(["ana:a long password"], False).plugin_data(),
                              HEADERS: HeaderRules.parse([f"Authorization: {credentials}"], [], [], []).plugin_data(),
                              IP_FILTER: IpFilter.parse(["127.0.0.0/8"], []).plugin_data()},
              "require": [BASIC_AUTH, HEADERS, IP_FILTER]}
    # Registered in the order a stock server uses (sorted names): pluggy calls the last first.
    enabled = [(BASIC_AUTH, BasicAuthPlugin()), (HEADERS, HeadersPlugin()), (IP_FILTER, IpFilterPlugin())]
    async with start_server(tmp_path / "data", plugins=enabled) as server, \
            start_agent(server, upstream.port, **config) as tunnel, tunnel.visitor() as client:
        assert sorted(tunnel.reporter.welcomes[0]["enforced"]) == [BASIC_AUTH, HEADERS, IP_FILTER]
        assert (await client.get("/echo")).status_code == 401
        admitted = await client.get("/echo", headers={"authorization": credentials})
        assert admitted.status_code == 200
    assert [value for name, value in seen(admitted) if name == "authorization"] == [credentials]
    assert len(upstream.requests) == 1


async def test_an_edge_applies_what_the_control_node_registered(stacks: Stacks, upstream: Upstream) -> None:
    rules = policy(request_add=["X-Env: cluster"], response_add=["X-Robots-Tag: noindex"],
                   response_remove=["x-status"])
    async with stacks.start(plugins=plugins()) as stack, stack.agent(upstream.port, **rules) as tunnel, \
            stack.visitor(tunnel.alias) as client:
        echo = await client.get("/echo")
        status = await client.get("/status/202")
        await control_in_sight(stack)
        [view] = [t for t in await stack.public.all_tunnels() if t.alias == tunnel.alias]
        # Operators see the names, never the values (a value may be a token for the local app).
        assert stack.public.describe_policies(view) == {HEADERS: {
            "request_remove": [], "request_add": ["x-env"], "response_remove": ["x-status"],
            "response_add": ["x-robots-tag"]}}
    assert ("x-env", "cluster") in seen(echo) and echo.headers["x-robots-tag"] == "noindex"
    assert status.status_code == 202 and "x-status" not in status.headers


async def test_fail_closed_on_a_server_and_on_an_edge_without_the_plugin(tmp_path: Path, upstream: Upstream) -> None:
    rules = policy(response_add=["X-Frame-Options: DENY"])
    async with start_server(tmp_path / "data") as server:  # COMZY_PLUGINS=none
        agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port, **rules),
                      LocalForwarder("127.0.0.1", upstream.port), RecordingReporter())
        with pytest.raises(Rejected) as caught, anyio.fail_after(10):
            await agent.run()
    assert str(caught.value).startswith("this server does not enforce headers: ask its operator to enable the "
                                        "headers plugin")
    stacks = Stacks("cluster", tmp_path / "cluster")
    try:
        async with stacks.start(plugins=plugins(), edge_plugins=()) as stack, \
                stack.agent(upstream.port, **rules) as tunnel, stack.visitor(tunnel.alias) as client:
            refused = await client.get("/status/200")
            assert refused.status_code == 502 and "the headers plugin is not enabled" in refused.text
    finally:
        stacks.close()
    assert upstream.requests == []


async def test_a_hand_made_hello_with_bad_rules_is_refused(tmp_path: Path, upstream: Upstream) -> None:
    """The server checks the agent's data itself (names, values, framing headers, bounds)."""
    many = [[f"x-{i}", "v"] for i in range(server_side.MAX_RULES + 1)]
    big = [[f"x-{i}", "v" * server_side.MAX_VALUE] for i in range(5)]
    bad: list[tuple[Any, str]] = [
        ({"request": {"add": [["x-a", "one\r\nx-injected: two"]]}}, "printable ASCII"),
        ({"response": {"add": [["x-a", "nul\x00"]]}}, "printable ASCII"),
        ({"response": {"add": [["x-a", " padded "]]}}, "without surrounding spaces"),
        ({"request": {"add": [["bad name", "v"]]}}, "RFC 9110 token"),
        ({"request": {"add": [["x-a:", "v"]]}}, "RFC 9110 token"),
        ({"request": {"remove": ["Content-Length"]}}, "content-length cannot be added or removed"),
        ({"request": {"add": [["Host", "evil.example"]]}}, "host cannot be added or removed"),
        ({"response": {"add": [["Transfer-Encoding", "chunked"]]}}, "transfer-encoding cannot"),
        ({"response": {"remove": ["sec-websocket-accept"]}}, "cannot be added or removed"),
        ({"response": {"remove": ["connection"]}}, "cannot be added or removed"),
        ({"request": {"add": many}}, f"lists of at most {server_side.MAX_RULES}"),
        ({"response": {"add": big}}, f"over {server_side.MAX_BYTES}"),
        ({"request": {"add": [["x-a"]]}}, "a [name, value] pair"),
        ({"request": {"add": [], "remove": []}}, "no header to add or remove"),
        ({"request": "x-a: b"}, "must be a map"),
    ]
    async with start_server(tmp_path / "data", plugins=plugins()) as server:
        for data, words in bad:
            agent = Agent(AgentConfig(servers=[f"ws://127.0.0.1:{server.ports.ws}"], port=upstream.port,
                                      plugin_data={HEADERS: data}, require=[HEADERS]),
                          LocalForwarder("127.0.0.1", upstream.port), RecordingReporter())
            with pytest.raises(Rejected) as caught, anyio.fail_after(10):
                await agent.run()
            assert str(caught.value).startswith("headers: the agent's data is not valid (")
            assert words in str(caught.value), (data, str(caught.value))
        assert server.tunnels() == []


def test_the_agent_and_the_plugin_share_their_limits() -> None:
    """The agent refuses before connecting what the server would refuse (they share no module:
    the agent never imports a plugin)."""
    assert agent_side.FRAMING_HEADERS == server_side.FRAMING_HEADERS
    assert (agent_side.MAX_HEADER_RULES, agent_side.MAX_HEADER_NAME, agent_side.MAX_HEADER_VALUE,
            agent_side.MAX_HEADER_BYTES) == (server_side.MAX_RULES, server_side.MAX_NAME, server_side.MAX_VALUE,
                                             server_side.MAX_BYTES)
    rules = HeaderRules.parse(["X-A: 1"] * agent_side.MAX_HEADER_RULES, ["x-b"], ["x-c:  spaced  "], [])
    assert server_side.parse_policy(rules.plugin_data())["response"]["add"] == [["x-c", "spaced"]]


def test_command_line_flags(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["3000", "--request-header-add", "X-Env: staging", "--request-header-remove", "Cookie",
                       "--request-header-remove", "cookie", "--response-header-add", "X-Frame-Options: DENY",
                       "--response-header-remove", "Server"])
    assert args.header_rules.plugin_data() == {"request": {"add": [["x-env", "staging"]], "remove": ["cookie"]},
                                               "response": {"add": [["x-frame-options", "DENY"]],
                                                            "remove": ["server"]}}
    assert args.header_rules.describe() == "headers: request -cookie, +x-env; response -server, +x-frame-options"
    assert "staging" not in args.header_rules.describe()  # values may be secrets: never printed
    assert not parse_args(["3000"]).header_rules
    for argv, words in [
        (["--request-header-add", "X-Env"], "--request-header-add takes 'NAME: VALUE'"),
        (["--request-header-add", "Host: other"], "cannot change Host: the tunnel itself routes and frames"),
        (["--response-header-remove", "Content-Length"], "cannot change Content-Length"),
        (["--response-header-add", "Transfer-Encoding: chunked"], "cannot change Transfer-Encoding"),
        (["--request-header-remove", "Connection"], "cannot change Connection"),
        (["--request-header-add", "X Y: z"], "'X Y' is not a header name"),
        (["--request-header-add", "X-A: caf\u00e9"], "the value must be printable ASCII"),
        (["--response-header-add", "X-A: a\x00b"], "the value must be printable ASCII"),
        (["--request-header-add", "X-A: " + "v" * 2049], "at most 2048 characters"),
        (["--request-header-remove", "x" * 129], "at most 128"),
        ([a for i in range(33) for a in ("--response-header-remove", f"x-{i}")], "at most 32 --response-header"),
        ([a for i in range(5) for a in ("--request-header-add", f"x-{i}: {'v' * 2000}")],
         "at most 8192 in all"),
    ]:
        with pytest.raises(SystemExit) as exited:
            parse_args(["3000", *argv])
        assert exited.value.code == 2
        assert words in capsys.readouterr().err, argv[:2]


async def test_the_agent_prints_the_policy_and_a_stock_server_applies_it(tmp_path: Path,
                                                                         upstream: Upstream) -> None:
    """headers is on by default (COMZY_PLUGINS unset), and the agent prints the rules (names only)."""
    from comzy.core.hooks import builtin_names, select_plugins

    assert HEADERS in builtin_names() and HEADERS in select_plugins(None)
    command = [sys.executable, "-m", "comzy.agent.cli", str(upstream.port), "--local-host", "127.0.0.1", "--log",
               "--inspect", "off", "--request-header-add", "X-Secret: s3cret", "--response-header-add",
               "X-Robots-Tag: noindex"]
    async with start_server(tmp_path / "data", plugins=plugins()) as server:
        env = cli_env(COMZY_WS_SERVER=f"ws://127.0.0.1:{server.ports.ws}", HOME=str(tmp_path))
        with popen(command, env) as agent:
            url = (await read_until(agent, r"Public URL: (\S+)"))[1]
            line = (await read_until(agent, r"Policy: .*"))[0]
            assert line == "Policy: headers: request +x-secret; response +x-robots-tag"
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.get(f"http://127.0.0.1:{server.ports.http}/echo",
                                          headers={"host": url.split("//", 1)[1]})
            agent.terminate()
    assert answer.headers["x-robots-tag"] == "noindex" and ("x-secret", "s3cret") in seen(answer)
