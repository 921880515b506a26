"""COMZY_EVENT_LOOP: the server and the agent run on uvloop by default, on asyncio when asked,
and a bad value stops either with one line naming the variable."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from comzy.core.eventloop import backend_options, check_choice
from comzy.core.settings import ServerSettings, explain_validation_error
from tests.test_cli import SERVER, agent_env, run_agent, run_cli, server_env, wait_banner
from tests.upstream import serve_upstream

UVLOOP = importlib.util.find_spec("uvloop") is not None
needs_uvloop = pytest.mark.skipif(not UVLOOP, reason="uvloop is not installed (a dependency on Linux and macOS)")


def test_the_choices_and_what_they_ask_of_anyio() -> None:
    assert backend_options("asyncio") == {}
    assert backend_options("auto") == ({"use_uvloop": True} if UVLOOP else {})
    with pytest.raises(ValueError, match=r"must be one of auto, uvloop, asyncio \(got 'tokio'\)"):
        check_choice("tokio")


def test_uvloop_asked_for_but_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install uvloop.*COMZY_EVENT_LOOP=auto"):
        check_choice("uvloop")
    assert backend_options("auto") == {}  # auto falls back to asyncio's loop, silently


def test_a_bad_value_is_reported_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMZY_EVENT_LOOP", "fastest")
    with pytest.raises(ValidationError) as caught:
        ServerSettings(_env_file=None)
    assert "COMZY_EVENT_LOOP" in explain_validation_error(ServerSettings, caught.value)


@pytest.mark.anyio
@pytest.mark.parametrize("choice", [pytest.param("auto", marks=needs_uvloop), "asyncio"])
async def test_server_and_agent_processes_serve_on_the_chosen_loop(tmp_path: Path, choice: str) -> None:
    expected = "uvloop" if choice == "auto" else "asyncio"
    async with serve_upstream() as upstream, \
            run_cli(SERVER, env=server_env(tmp_path / "data", COMZY_EVENT_LOOP=choice), cwd=tmp_path) as server:
        banner = await wait_banner(server)
        line = await server.wait_for(r"runtime\s+Python \S+, (\w+) event loop", stream="stderr")
        assert line.group(1) == expected
        async with run_agent(upstream.port, banner.ws, tmp_path, env=agent_env(COMZY_EVENT_LOOP=choice)) as agent:
            alias = (await agent.wait_for(r"https?://([a-z0-9-]+)\.localhost"))[1]
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.get(f"http://127.0.0.1:{banner.http}/status/201",
                                            headers={"host": f"{alias}.localhost"})
    assert response.status_code == 201


@pytest.mark.anyio
async def test_the_agent_refuses_a_bad_value_naming_the_variable(tmp_path: Path) -> None:
    async with run_agent(9, None, tmp_path, env=agent_env(COMZY_EVENT_LOOP="fastest")) as agent:
        assert await agent.wait_exit(within=20) == 2
    said = agent.stderr.strip()
    assert re.fullmatch(r"comzy: COMZY_EVENT_LOOP must be one of auto, uvloop, asyncio \(got 'fastest'\)", said), said
