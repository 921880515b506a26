"""COMZY_TRACE_HOOKS: every hook implementation called is logged with its plugin and duration."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from comzy import ForwardRequest, Reject, hookimpl
from comzy.core.hooks import HookRunner, build_manager
from tests.conftest import start_agent, start_server
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

LINE = re.compile(r"hook (\w+) plugin ([\w-]+) took \d+\.\d{3} ms, (.+)")


class Gatekeeper:
    @hookimpl
    def resolve_host(self, host: str) -> str | None:
        return None  # the core's subdomain parser answers

    @hookimpl
    async def before_forward(self, request: ForwardRequest) -> None:
        if request.target.startswith(b"/private"):
            raise Reject("private", status=403)


def traced(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    found = []
    for record in caplog.records:
        if record.name == "comzy.trace":
            match = LINE.fullmatch(record.getMessage())
            assert match, record.getMessage()
            found.append((match[1], match[2], match[3]))
    return found


async def test_every_hook_call_is_traced_with_its_plugin(tmp_path: Path, upstream: Upstream,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="comzy.trace")
    async with start_server(tmp_path / "data", [("gatekeeper", Gatekeeper())], trace_hooks=True) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        assert (await client.get("/open")).status_code == 200
        assert (await client.get("/private")).status_code == 403
    lines = traced(caplog)
    # resolve_host: ours first, then the core's parser, which answers (firstresult stops there).
    assert lines.count(("resolve_host", "gatekeeper", "returned None")) == 2
    assert lines.count(("resolve_host", "core-routing", "returned str")) == 2
    assert ("before_forward", "gatekeeper", "returned None") in lines
    assert ("before_forward", "gatekeeper", "raised Reject: private") in lines


async def test_without_the_setting_nothing_is_traced(tmp_path: Path, upstream: Upstream,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="comzy.trace")
    async with start_server(tmp_path / "data", [("gatekeeper", Gatekeeper())]) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        assert (await client.get("/open")).status_code == 200
    assert traced(caplog) == []
    # Untraced, the sync hooks are called without the tracer (no clock read, no log call): the runner's
    # direct loop (pluggy's own caller when a wrapper is among them; test_hooks checks the answers match).
    hooks = HookRunner(build_manager("localhost", [("gatekeeper", Gatekeeper())]))
    assert hooks._resolve_host.__qualname__ == "HookRunner._direct_firstresult.<locals>.call"
