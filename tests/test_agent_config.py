"""The agent's config file (comzy.yml, ``comzy start web api``) and ``comzy 3000 8080``: the file's
checks, each naming the file, the tunnel and the key, and the real ``comzy`` program serving two
tunnels from a file on one connection to a real server."""

from __future__ import annotations

import io
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from comzy.agent import cli
from comzy.agent.forward import Served
from comzy.agent.output import make_output
from comzy.agent.policies import BASIC_AUTH, HEADERS, IP_FILTER, RATE_LIMIT
from comzy.agent.screen import Screen
from comzy.agent.tunnels import (
    ConfigError,
    Policies,
    TunnelPlan,
    find_config,
    load_config,
    plans_from_config,
    policy_keys,
)
from comzy.core.control import TunnelWelcome, Welcome
from comzy.plugins.basic_auth import BasicAuth as BasicAuthPlugin
from tests.conftest import start_server, visitor
from tests.test_cli import AGENT, agent_env, run_cli
from tests.upstream import Upstream, serve_upstream

pytestmark = pytest.mark.anyio

PASSWORD = "correct-horse-battery"


def write(tmp_path: Path, text: str, name: str = "comzy.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def plans(tmp_path: Path, text: str, *names: str, everything: bool = False) -> Any:
    path = write(tmp_path, text)
    return plans_from_config(load_config(path), list(names), everything)


def test_a_file_declares_tunnels_with_their_policies(tmp_path: Path) -> None:
    found = plans(tmp_path, f"""
version: 1
server: ws://tunnels.example:8191
tunnels:
  web:
    addr: 3000
    subdomain: MyApp
    host_header: rewrite
    basic_auth: ["ana:{PASSWORD}"]
  api:
    addr: 127.0.0.1:8080
    rate_limit: 60/min
    cidr_allow: 203.0.113.0/24
    response_header_add: ["X-Robots-Tag: noindex"]
  spare:
    addr: http://[::1]:9000
""", everything=True)
    web, api, spare = found
    assert (web.name, web.target, web.subdomain, web.rewrite_host) == ("web", "localhost:3000", "myapp", True)
    assert list(web.policies.plugin_data) == [BASIC_AUTH]
    assert PASSWORD not in repr(web.policies.plugin_data)  # hashed, as --basic-auth is
    assert (api.target, api.rewrite_host) == ("127.0.0.1:8080", False)
    assert api.policies.plugin_data[IP_FILTER] == {"allow": ["203.0.113.0/24"], "deny": []}
    assert api.policies.plugin_data[RATE_LIMIT] == {"requests": 60, "seconds": 60}
    assert api.policies.plugin_data[HEADERS]["response"]["add"] == [["x-robots-tag", "noindex"]]
    assert (spare.host, spare.port, spare.policies.plugin_data) == ("::1", 9000, {})
    assert load_config(tmp_path / "comzy.yml").server == "ws://tunnels.example:8191"
    # `start api web`: those, in that order.
    assert [p.name for p in plans(tmp_path, "tunnels: {web: {addr: 1}, api: {addr: 2}}", "api", "web")] == \
        ["api", "web"]


def test_every_policy_flag_is_a_config_key_read_by_the_same_parser() -> None:
    """Each policy key is its flag in snake_case: the flag exists, with that dest."""
    parser = cli.build_parser()
    dests = {action.dest: action.option_strings for action in parser._actions}
    for key in policy_keys():
        assert dests[key] == ["--" + key.replace("_", "-")]


@pytest.mark.parametrize(("text", "names", "error"), [
    ("tunnels: [web", ("web",),
     "comzy.yml: not valid YAML (line 1, column 14): expected ',' or ']', but got '<stream end>'"),
    ("- web\n", ("web",), "comzy.yml: expected a map with a 'tunnels:' section (see docs/agent.md)"),
    ("tunnel: {web: {addr: 1}}", ("web",), "comzy.yml: unknown key 'tunnel'; did you mean tunnels?"),
    ("version: 3\ntunnels: {web: {addr: 1}}", ("web",), "comzy.yml: version: this agent reads version 1 files, not 3"),
    ("server: 8191\ntunnels: {web: {addr: 1}}", ("web",),
     "comzy.yml: server: expected a ws:// or wss:// URL, or a list of them"),
    ("tunnels: {}", ("web",), "comzy.yml: tunnels: expected a map of tunnel names to their settings"),
    ("tunnels:\n" + "".join(f"  t{i}: {{addr: {i + 1}}}\n" for i in range(17)), ("t1",),
     "comzy.yml: tunnels: at most 16 tunnels on one agent (the file has 17)"),
    ("tunnels: {'we b': {addr: 1}}", ("we b",),
     "comzy.yml: tunnel 'we b': a tunnel's name is 1 to 64 letters, digits, '_', '.' or '-'"),
    ("tunnels: {web: 3000}", ("web",),
     "comzy.yml: tunnel 'web': expected its settings as a map (at least 'addr: PORT')"),
    ("tunnels: {web: {addr: 1, basic_atuh: [x]}}", ("web",),
     "comzy.yml: tunnel 'web': unknown key 'basic_atuh'; did you mean basic_auth?"),
    ("tunnels: {web: {subdomain: x}}", ("web",), "comzy.yml: tunnel 'web': addr: missing"),
    ("tunnels: {web: {addr: 70000}}", ("web",),
     "comzy.yml: tunnel 'web': addr: expected a port (1-65535), host:port or http://host:port, not 70000"),
    ("tunnels: {web: {addr: 'localhost'}}", ("web",), "tunnel 'web': addr: expected a port"),
    ("tunnels: {web: {addr: 1, subdomain: my_app}}", ("web",),
     "comzy.yml: tunnel 'web': subdomain: --subdomain 'my_app' cannot be a subdomain: '_' is not allowed"),
    ("tunnels: {web: {addr: 1, host_header: keep}}", ("web",),
     "comzy.yml: tunnel 'web': host_header: expected preserve or rewrite, not 'keep'"),
    ("tunnels: {web: {addr: 1, basic_auth: ['ana:short']}}", ("web",),
     "comzy.yml: tunnel 'web': basic_auth: --basic-auth passwords need 8 to 255 characters (user 'ana': 5)"),
    ("tunnels: {web: {addr: 1, basic_auth_forward: true}}", ("web",),
     "comzy.yml: tunnel 'web': basic_auth_forward: --basic-auth-forward goes with --basic-auth USER:PASSWORD"),
    ("tunnels: {web: {addr: 1, basic_auth_forward: 'yes'}}", ("web",),
     "comzy.yml: tunnel 'web': basic_auth_forward: expected true or false"),
    ("tunnels: {web: {addr: 1, cidr_allow: [10.0.0.1/8]}}", ("web",),
     "comzy.yml: tunnel 'web': cidr_allow: --cidr-allow '10.0.0.1/8' has bits set after the prefix length"),
    ("tunnels: {web: {addr: 1, rate_limit: lots}}", ("web",),
     "comzy.yml: tunnel 'web': rate_limit: --rate-limit takes N/s, N/min or N/h (e.g. 60/min), not 'lots'"),
    ("tunnels: {web: {addr: 1, cidr_deny: {a: b}}}", ("web",),
     "comzy.yml: tunnel 'web': cidr_deny: expected a list of strings"),
    ("tunnels: {web: {addr: 1}, api: {addr: 2}}", ("wbe",), "no tunnel 'wbe' in "),
    ("tunnels: {web: {addr: 1}, api: {addr: 2}}", (), "name the tunnels to start (comzy start web api) or start "
                                                     "them all with --all;"),
    ("tunnels: {web: !!python/object:os.system {addr: 1}}", ("web",), "comzy.yml: not valid YAML"),
])
def test_a_bad_file_says_where_and_why(tmp_path: Path, text: str, names: tuple[str, ...], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        plans(tmp_path, text, *names)
    assert error in str(caught.value), str(caught.value)
    if "comzy.yml" in error:
        assert str(caught.value).startswith(str(tmp_path / "comzy.yml"))


def test_a_file_too_large_or_unreadable_is_refused(tmp_path: Path) -> None:
    big = write(tmp_path, "#" * (256 * 1024 + 1))
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        load_config(big)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yml")
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"tunnels: \xff\xfe")
    with pytest.raises(ConfigError):
        load_config(binary)


def test_the_file_is_found_here_then_in_the_home_directory(tmp_path: Path) -> None:
    here, home = tmp_path / "here", tmp_path / "home"
    (home / ".comzy").mkdir(parents=True)
    here.mkdir()
    assert find_config("given.yml", here, home) == Path("given.yml")
    looked = r"no config file: looked for .*here/comzy\.yml and .*home/\.comzy/comzy\.yml"
    with pytest.raises(ConfigError, match=looked):
        find_config(None, here, home)
    (home / ".comzy" / "comzy.yml").write_text("tunnels: {}")
    assert find_config(None, here, home) == home / ".comzy" / "comzy.yml"
    (here / "comzy.yml").write_text("tunnels: {}")
    assert find_config(None, here, home) == here / "comzy.yml"


@pytest.mark.parametrize(("argv", "error"), [
    (["3000", "8080", "--subdomain", "x"], "--subdomain names one tunnel; with several ports"),
    (["3000", "3000"], "port 3000 is given twice"),
    (["start", "web", "--basic-auth", f"ana:{PASSWORD}"], "--basic-auth cannot go with `comzy start`"),
    (["start", "web", "--host-header", "rewrite", "--local-host", "x"],
     "--host-header, --local-host cannot go with `comzy start`: set them in the config file"),
    (["3000", "--all"], "--config and --all go with `comzy start NAME...`"),
    (["3000", "--config", "x.yml"], "--config and --all go with `comzy start NAME...`"),
    (["3000", "x"], "argument port: 'x' is neither a port number nor a command"),
    ([str(p) for p in range(3000, 3017)], "at most 16 ports (tunnels) on one agent"),
])
def test_command_lines_that_cannot_be_served_are_refused(argv: list[str], error: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.parse_args(argv)
    assert caught.value.code == 2
    assert error in capsys.readouterr().err


def test_command_lines_for_several_tunnels() -> None:
    args = cli.parse_args(["3000", "--log", "8080", f"--basic-auth=ana:{PASSWORD}", "--host-header", "rewrite",
                           "--rate-limit", "5/s", "--cidr-deny", "192.0.2.0/24", "--request-header-remove", "Cookie"])
    assert (args.ports, args.port, args.start) == ([3000, 8080], 3000, None)
    several = cli.plans_from_ports(args)
    assert [(p.name, p.port, p.rewrite_host) for p in several] == [("3000", 3000, True), ("8080", 8080, True)]
    # Every tunnel gets every policy flag: none is left unprotected.
    assert all(list(p.policies.plugin_data) == [BASIC_AUTH, RATE_LIMIT, IP_FILTER, HEADERS] for p in several)
    args = cli.parse_args(["--config", "c.yml", "start", "--all"])
    assert (args.start, args.config, args.all) == ([], "c.yml", True)
    assert cli.parse_args([]).ports == [3000]  # `comzy` alone: port 3000, as before


async def test_comzy_start_serves_two_tunnels_from_a_file_on_one_connection(tmp_path: Path,
                                                                            upstream: Upstream) -> None:
    async with serve_upstream() as second, \
            start_server(tmp_path / "data", plugins=[(BASIC_AUTH, BasicAuthPlugin())]) as server:
        config = write(tmp_path, f"""
server: ws://127.0.0.1:{server.ports.ws}
tunnels:
  web:
    addr: 127.0.0.1:{upstream.port}
  api:
    addr: 127.0.0.1:{second.port}
    basic_auth: ["ana:{PASSWORD}"]
  unused:
    addr: 9
""", name="agent.yml")
        async with run_cli(AGENT, "--config", str(config), "--log", "--inspect", "127.0.0.1:0", "start", "web",
                           "api", env=agent_env(), cwd=tmp_path) as agent:
            pattern = r"^Public URL: http://([a-z0-9-]+)\.localhost:\d+ -> http://127\.0\.0\.1:(\d+) \((\w+)\)$"
            web = await agent.wait_for(pattern)
            api = await agent.wait_for(pattern, start=agent.lines["stdout"].index(web.group(0)) + 1)
            assert (web.group(2, 3), api.group(2, 3)) == ((str(upstream.port), "web"), (str(second.port), "api"))
            assert "  Policy: basic auth for ana (the Authorization header is not forwarded to the local app)" in \
                agent.lines["stdout"]
            assert {t.alias: t.name for t in server.tunnels()} == {web.group(1): "web", api.group(1): "api"}
            assert len({id(e.session) for e in server.registry.entries()}) == 1  # one connection
            # ngrok's local API lists each tunnel under its name.
            local = (await agent.wait_for(r"^Inspector: (http://127\.0\.0\.1:\d+)$")).group(1)
            async with httpx.AsyncClient(base_url=local) as api_client:
                listed = (await api_client.get("/api/tunnels")).json()["tunnels"]
                assert [(t["name"], t["public_url"], t["config"]["addr"]) for t in listed] == [
                    ("web", f"http://{web.group(1)}.localhost:{server.ports.http}", f"http://127.0.0.1:{upstream.port}"),
                    ("api", f"http://{api.group(1)}.localhost:{server.ports.http}", f"http://127.0.0.1:{second.port}")]
                assert (await api_client.get("/api/tunnels/api")).json()["name"] == "api"
                assert (await api_client.get("/api/tunnels/nope")).status_code == 404
            async with visitor(server, web.group(1)) as client:
                assert (await client.get("/status/201")).status_code == 201
            async with visitor(server, api.group(1)) as client:
                assert (await client.get("/status/202")).status_code == 401
                assert (await client.get("/status/202", auth=("ana", PASSWORD))).status_code == 202
            # Request lines name their tunnel.
            await agent.wait_for(re.compile(r"^web GET\s+/status/201 201 "))
            await agent.wait_for(re.compile(r"^api GET\s+/status/202 202 "))
            agent.signal(signal.SIGINT)
            assert await agent.wait_exit(20) == 0
        assert [s["path"] for s in upstream.requests] == ["/status/201"]
        assert [s["path"] for s in second.requests] == ["/status/202"]


async def test_comzy_with_two_ports_exits_naming_the_tunnel_refused(tmp_path: Path, upstream: Upstream) -> None:
    async with start_server(tmp_path / "data") as server:
        async with run_cli(AGENT, str(upstream.port), "9", "--server", f"ws://127.0.0.1:{server.ports.ws}",
                           "--local-host", "127.0.0.1", "--log", "--inspect", "off", "--basic-auth",
                           f"ana:{PASSWORD}", env=agent_env(), cwd=tmp_path) as agent:
            assert await agent.wait_exit(30) == 1
        assert (f"comzy: the server refused the tunnel: tunnel '{upstream.port}': this server does not enforce "
                "basic_auth") in agent.stderr
        assert server.tunnels() == []


def test_the_lines_and_the_screen_show_each_tunnel_and_name_it_on_requests() -> None:
    described = {BASIC_AUTH: "basic auth for ana"}
    plans = [TunnelPlan("web", "localhost", 3000, policies=Policies({BASIC_AUTH: {}}, described)),
             TunnelPlan("api", "localhost", 8080, policies=Policies({BASIC_AUTH: {}}, described))]
    welcome = Welcome(alias="a", url="http://a.example", tunnels=[
        TunnelWelcome("web", "a", "http://a.example", enforced=[BASIC_AUTH]),
        TunnelWelcome("api", "b", "http://b\x1b[2J.example", enforced=[])])  # not confirmed: not shown
    out = io.StringIO()
    printer = make_output("localhost:3000", log=True, out=out, tunnels=plans)
    printer.connected(welcome, True)
    printer.served(Served("GET", "/x", 200, 0.01, tunnel="api"))
    printer.connected(welcome, False)
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["Public URL: http://a.example -> http://localhost:3000 (web)",
                         "  Policy: basic auth for ana",
                         "Public URL: http://b\\x1b[2J.example -> http://localhost:8080 (api)"]
    assert lines[-2].startswith("api GET     /x 200 ")
    assert lines[-1] == "Reconnected: http://a.example, http://b\\x1b[2J.example"

    screen = Screen("localhost:3000", out=io.StringIO())
    screen.tunnels = {plan.name: plan for plan in plans}
    screen.connected(welcome, True)
    screen.served(Served("GET", "/y", 201, 0.01, tunnel="web"))
    console = Console(file=io.StringIO(), width=100, height=30, color_system=None)
    console.print(screen.render(100, 30))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "Public URL  http://a.example -> http://localhost:3000 (web)" in text
    assert "  Policy    basic auth for ana" in text
    assert "Public URL  http://b\\x1b[2J.example -> http://localhost:8080 (api)" in text
    assert "Forwarding" not in text
    assert "web /y" in text
