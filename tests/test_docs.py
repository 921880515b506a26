"""The plugin API and its documentation stay in step (the datasette habit).

- every hookspec has a ``## name(args)`` heading in docs/plugin_hooks.md with its exact arguments,
  and a ``test_hook_<name>`` test in tests/test_hooks.py;
- the public API (``comzy.__all__``) is pinned and importable;
- the complete example in docs/plugin_hooks.md runs through a real server.
"""

from __future__ import annotations

import ast
import inspect
import logging
import re
import types
from pathlib import Path

import anyio
import pytest

import comzy
from comzy.core import hookspecs
from tests.conftest import ROOT, admin_client, start_agent, start_server
from tests.test_hooks import _register_and_expect_reject
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

DOC = ROOT / "docs" / "plugin_hooks.md"
HOOK_TESTS = ROOT / "tests" / "test_hooks.py"
HEADING = re.compile(r"^## (\w+)\(([^)]*)\)\s*$", re.M)

PUBLIC_API = [
    "AdminRoute",
    "CommandContext",
    "Commands",
    "Exchange",
    "ForwardRequest",
    "ForwardResponse",
    "LoggedRequest",
    "Periodic",
    "PluginError",
    "Registration",
    "Reject",
    "Schema",
    "ServerContext",
    "ServerSettings",
    "Tunnel",
    "TunnelCache",
    "__version__",
    "hookimpl",
]


def hook_specs() -> dict[str, list[str]]:
    """Every hook declared in comzy/core/hookspecs.py, with its argument names."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: list(inspect.signature(function).parameters)
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(function, marker)
    }


def test_the_hooks_are_the_designed_ones() -> None:
    assert set(hook_specs()) == {"on_startup", "on_shutdown", "on_register", "on_connect", "on_disconnect",
                                 "resolve_host",
                                 "alias_owner", "alias_reserved", "before_forward", "before_response", "after_response",
                                 "admin_routes",
                                 "agent_routes", "database_schema", "on_registration_refused", "recent_requests",
                                 "register_commands", "on_request_refused", "describe_policy"}


@pytest.mark.parametrize("hook", sorted(hook_specs()))
def test_every_hook_is_documented_with_its_arguments(hook: str) -> None:
    text = DOC.read_text()
    headings = {name: [a.strip() for a in args.split(",") if a.strip()] for name, args in HEADING.findall(text)}
    assert hook in headings, f"docs/plugin_hooks.md needs a '## {hook}(...)' heading"
    assert headings[hook] == hook_specs()[hook], f"the heading of {hook} must list its arguments in order"


def test_every_documented_hook_exists() -> None:
    documented = {name for name, _ in HEADING.findall(DOC.read_text())}
    assert documented == set(hook_specs())


def test_the_roles_table_names_every_hook_once() -> None:
    """docs/plugin_hooks.md says on which COMZY_ROLE each hook runs (a cluster runs each on some)."""
    table = DOC.read_text().split("### Roles: which hook runs where", 1)[1].split("\n\n", 2)[2].split("\n\n")[0]
    rows = [line.split("|")[1:5] for line in table.splitlines()[2:]]
    named = [name for cells in rows for name in re.findall(r"`(\w+)`", cells[0])]
    assert sorted(named) == sorted(hook_specs()), "each hook belongs in exactly one row of the roles table"
    for cells in rows:
        assert cells[1].strip() == "✓", f"role all runs every hook: {cells[0]}"
        assert "✓" in cells[2] or "✓" in cells[3], f"some cluster role must run {cells[0]}"


@pytest.mark.parametrize("hook", sorted(hook_specs()))
def test_every_hook_has_a_test(hook: str) -> None:
    tree = ast.parse(HOOK_TESTS.read_text())
    tests = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert f"test_hook_{hook}" in tests, f"tests/test_hooks.py needs a test_hook_{hook} test"


def test_public_api_is_pinned_and_importable() -> None:
    assert sorted(comzy.__all__) == PUBLIC_API
    namespace: dict[str, object] = {}
    exec("from comzy import *", namespace)  # what a plugin author's star import gets
    for name in PUBLIC_API:
        assert namespace[name] is getattr(comzy, name)
    assert comzy.hookimpl is hookspecs.hookimpl
    assert issubclass(comzy.Reject, Exception) and issubclass(comzy.PluginError, Exception)


def test_the_public_api_is_documented() -> None:
    text = DOC.read_text()
    for name in PUBLIC_API:
        if not name.startswith("_"):
            assert f"`{name}`" in text, name
    assert "[project.entry-points.comzy]" in text
    assert "COMZY_PLUGINS" in text


# -- the complete example -----------------------------------------------------------------------
def example_module() -> types.ModuleType:
    """The first python block under '## A complete example', imported as a module."""
    section = DOC.read_text().split("## A complete example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    module = types.ModuleType("comzy_teamgate")
    exec(compile(code.group(1), str(DOC), "exec"), module.__dict__)  # our own docs
    return module


async def test_the_documented_example_works(tmp_path: Path, upstream: Upstream,
                                            caplog: pytest.LogCaptureFixture) -> None:
    teamgate = example_module()
    plugin = teamgate.TeamGate()
    with caplog.at_level(logging.INFO, logger="comzy_teamgate"):
        async with start_server(tmp_path, plugins=[("teamgate", plugin)]) as server:
            async with start_agent(server, upstream.port, subdomain="team-ana") as agent, agent.visitor() as client:
                assert agent.alias == "team-ana"
                assert agent.reporter.welcomes[0]["user"] == "ana"
                assert agent.reporter.welcomes[0]["notices"] == ["Welcome to the team tunnels, ana."]
                for _ in range(3):
                    response = await client.get("/who")
                    assert ["x-team-member", "ana"] in response.json()["headers"]
                # Counted by the plugin's background task: each admin request lets it run.
                async with admin_client(server) as admin:
                    with anyio.fail_after(5):
                        while (counts := (await admin.get("/teamgate/counts")).json()) != {"team-ana": 3}:
                            assert counts in ({}, {"team-ana": 1}, {"team-ana": 2})
            # No team name: refused with the plugin's reason.
            rejected = await _register_and_expect_reject(server)
            assert "only serves team-* names" in str(rejected)
    assert any("team-ana closed after 3 requests" in r.getMessage() for r in caplog.records)


def test_the_documented_example_refuses_a_bad_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMZY_TEAMGATE_PREFIX", "team")
    plugin = example_module().TeamGate()
    with pytest.raises(comzy.PluginError, match="COMZY_TEAMGATE_PREFIX"):
        plugin.on_startup(server=None)
    plugin.queue_in.close()
    plugin.queue_out.close()


def test_server_context_is_public_but_loaded_only_when_asked() -> None:
    import subprocess
    import sys

    # The agent imports comzy: it must not pay for the server (hypercorn and all) until asked.
    code = ("import sys, comzy; assert 'comzy.core.server' not in sys.modules; "
            "from comzy import ServerContext; from comzy.core.server import ServerContext as real; "
            "assert ServerContext is real")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
