"""The third-party example in examples/comzy-plugin-example, run through a real server.

It is imported from its source directory (installing it in the test would be slow); its
entry point is exercised by tests/test_plugin_loading.py.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT, start_agent, start_server
from tests.upstream import Upstream

pytestmark = pytest.mark.anyio

EXAMPLE = ROOT / "examples" / "comzy-plugin-example"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example package, imported by path, with no COMZY_EXAMPLE_* variables set."""
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    for name in ("HEADER_NAME", "HEADER_VALUE", "BLOCKED_PREFIX"):
        monkeypatch.delenv(f"COMZY_EXAMPLE_{name}", raising=False)
    yield importlib.import_module("comzy_plugin_example")


async def test_example_stamps_requests_and_blocks_a_prefix(tmp_path: Path, upstream: Upstream,
                                                          example: ModuleType) -> None:
    plugin = example.HeaderStamp()
    async with start_server(tmp_path, plugins=[("example", plugin)]) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        stamped = await client.get("/page", headers={"x-comzy-example": "forged"})
        assert stamped.status_code == 200
        headers = stamped.json()["headers"]
        assert ["x-comzy-example", "stamped"] in headers
        assert ["x-comzy-example", "forged"] not in headers  # a visitor cannot pre-set it
        for path in ("/private", "/private/", "/private/keys.txt"):
            blocked = await client.get(path)
            assert blocked.status_code == 403, path
            assert blocked.text == f"{path} is blocked on {agent.alias}\n"
        assert (await client.get("/privateer")).status_code == 200  # a prefix is whole path segments
    assert [r["path"] for r in upstream.requests] == ["/page", "/privateer"]


async def test_example_settings_from_its_own_environment_prefix(tmp_path: Path, upstream: Upstream,
                                                               example: ModuleType,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMZY_EXAMPLE_HEADER_NAME", "X-Team")
    monkeypatch.setenv("COMZY_EXAMPLE_HEADER_VALUE", "blue")
    monkeypatch.setenv("COMZY_EXAMPLE_BLOCKED_PREFIX", "")
    plugin = example.HeaderStamp()  # settings are read when the plugin is built, never at import
    async with start_server(tmp_path, plugins=[("example", plugin)]) as server, \
            start_agent(server, upstream.port) as agent, agent.visitor() as client:
        response = await client.get("/private/now-allowed")
    assert response.status_code == 200
    assert ["x-team", "blue"] in response.json()["headers"]


def test_example_settings_reject_bad_values(example: ModuleType) -> None:
    with pytest.raises(ValueError, match="blocked_prefix"):
        example.ExampleSettings(blocked_prefix="private")
    with pytest.raises(ValueError, match="header_name"):
        example.ExampleSettings(header_name="Bad Header")


def test_example_declares_its_entry_point(example: ModuleType) -> None:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["comzy"]["example"]
    module, _, attribute = target.partition(":")
    assert getattr(importlib.import_module(module), attribute) is example.HeaderStamp
    assert any(dep.startswith("comzy") for dep in project["dependencies"])


def test_example_readme_documents_every_setting(example: ModuleType) -> None:
    readme = (EXAMPLE / "README.md").read_text()
    prefix = example.ExampleSettings.model_config["env_prefix"]
    assert prefix == "COMZY_EXAMPLE_"
    for field in example.ExampleSettings.model_fields:
        assert f"`{prefix}{field.upper()}`" in readme, field
    assert "COMZY_PLUGINS=example" in readme
