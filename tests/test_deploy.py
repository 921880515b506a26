"""Deploying behind a proxy and from the original Comzy's .env (issue 17): the public agent URL in
every hint, and settings errors that name what the user wrote."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from comzy.core.server import describe
from comzy.core.settings import ServerSettings, explain_validation_error
from tests.conftest import make_settings, start_server
from tests.test_account_api import comzy

pytestmark = pytest.mark.anyio

PUBLIC_AGENT_URL = "wss://tunnel.example.com"


async def test_the_public_agent_url_is_in_the_hints_and_comzy_status(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    async with start_server(tmp_path / "data", public_agent_url=PUBLIC_AGENT_URL + "/") as server:
        hint = next(line for line in describe(server) if line.strip().startswith("agents"))
        # The internal listener is still named; agents are told the public URL.
        assert f"ws://127.0.0.1:{server.ports.ws}" in hint
        assert hint.endswith(f"(agents connect with: comzy PORT --server {PUBLIC_AGENT_URL})"), hint
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.ports.ws}", timeout=10) as client:
            status = (await client.get("/api/v1/status")).json()
            assert status["agent_url"] == PUBLIC_AGENT_URL
            assert PUBLIC_AGENT_URL in (await client.get("/")).json()["message"]
        internal = f"ws://127.0.0.1:{server.ports.ws}"
        code, out, err = await comzy(tmp_path, "status", "--server", internal)
        assert code == 0, err
        assert f"Agents:  this server's public agent URL is {PUBLIC_AGENT_URL} " \
               f"(comzy PORT --server {PUBLIC_AGENT_URL})" in out, out
    async with start_server(tmp_path / "data") as server:
        hint = next(line for line in describe(server) if line.strip().startswith("agents"))
        assert hint.endswith(f"--server ws://HOST:{server.ports.ws})"), hint
        code, out, err = await comzy(tmp_path, "status", "--server", f"ws://127.0.0.1:{server.ports.ws}")
        assert code == 0 and "Agents:" not in out, out + err


@pytest.mark.parametrize("value", ["https://tunnel.example.com", "tunnel.example.com", "wss://"])
def test_a_bad_public_agent_url_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   value: str) -> None:
    monkeypatch.setenv("COMZY_PUBLIC_AGENT_URL", value)
    with pytest.raises(ValidationError) as caught:
        ServerSettings(_env_file=None)
    message = explain_validation_error(ServerSettings, caught.value)
    assert message.startswith(f"invalid setting: COMZY_PUBLIC_AGENT_URL={value!r}: ")
    assert "must be a ws:// or wss:// URL" in message


def test_an_empty_public_agent_url_is_unset(tmp_path: Path) -> None:
    assert make_settings(tmp_path, public_agent_url=" ").public_agent_url is None
