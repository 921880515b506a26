"""The first end-to-end path: a request through server, agent and upstream."""

from __future__ import annotations

import pytest

from tests.conftest import RunningAgent

pytestmark = pytest.mark.anyio


async def test_get_reaches_local_app(tunnel: RunningAgent) -> None:
    async with tunnel.visitor() as client:
        response = await client.get("/any/path?q=1")
    assert response.status_code == 200
    info = response.json()
    assert info["raw_path"] == "/any/path"
    assert info["query_string"] == "q=1"
    assert tunnel.url.startswith(f"http://{tunnel.alias}.localhost:")
