"""The admin listener's token: every route needs it, as a bearer header, the login cookie, or
``?token=`` on a WebSocket; the token comes from COMZY_ADMIN_TOKEN or a 0600 file the server makes."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pydantic import SecretStr

from comzy import AdminRoute, hookimpl
from comzy.core.admin import COOKIE, TOKEN_FILE, AdminApp
from comzy.core.server import ServerContext, describe
from comzy.core.websocket import Closed, HandshakeRejected, connect
from tests.conftest import admin_client, start_server

pytestmark = pytest.mark.anyio


class Echo:
    """/echo answers HTTP with the method; /echo/ws accepts a WebSocket and sends one message.

    ``reached`` lists the methods of the HTTP requests that got through to it."""

    def __init__(self) -> None:
        self.reached: list[str] = []

    @hookimpl
    def admin_routes(self) -> list[AdminRoute]:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "websocket":
                await receive()
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.send", "text": "hello admin"})
                await send({"type": "websocket.close", "code": 1000})
                return
            self.reached.append(scope["method"])
            body = json.dumps({"method": scope["method"]}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})

        return [AdminRoute("/echo", app)]


def base(server: ServerContext) -> str:
    return f"http://127.0.0.1:{server.ports.admin}"


async def test_every_route_needs_the_token(tmp_path: Path) -> None:
    async with start_server(tmp_path, plugins=[("echo", Echo())]) as server:
        async with httpx.AsyncClient(base_url=base(server)) as anonymous:
            for path in ("/echo", "/healthz", "/anything"):
                refused = await anonymous.get(path)
                assert refused.status_code == 401, path
                assert "admin token" in refused.json()["error"]
            wrong = await anonymous.get("/echo", headers={"authorization": "Bearer not-it"})
            assert wrong.status_code == 401
            # A browser gets the login form instead of JSON.
            page = await anonymous.get("/", headers={"accept": "text/html"})
            assert page.status_code == 401 and '<form method="post" action="/login">' in page.text
        async with admin_client(server) as admin:
            assert (await admin.get("/echo")).json() == {"method": "GET"}
            assert (await admin.get("/healthz")).json()["status"] == "ok"


async def test_the_login_form_and_token_links_set_a_cookie(tmp_path: Path) -> None:
    async with start_server(tmp_path, plugins=[("echo", Echo())]) as server:
        assert server.admin_token is not None
        token = server.admin_token.value
        async with httpx.AsyncClient(base_url=base(server)) as browser:
            failed = await browser.post("/login", data={"token": "guess", "next": "/echo"})
            assert failed.status_code == 401 and "not right" in failed.text
            assert COOKIE not in browser.cookies
            # Never redirected off the listener, whatever `next` says.
            for offsite_target in ("//evil.example/x", "/\\evil.example/x", "/\t/evil.example/x", "https://evil.example"):
                offsite = await browser.post("/login", data={"token": token, "next": offsite_target})
                assert offsite.status_code == 303 and offsite.headers["location"] == "/", offsite_target
                browser.cookies.clear()
            login = await browser.post("/login", data={"token": token, "next": "/echo"})
            assert login.status_code == 303 and login.headers["location"] == "/echo"
            cookie = login.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
            assert (await browser.get("/echo")).json() == {"method": "GET"}
            # Changes need the page's own origin when only the cookie vouches for them.
            cross = await browser.delete("/echo", headers={"origin": "http://evil.example"})
            assert cross.status_code == 403
            same = await browser.delete("/echo", headers={"origin": base(server)})
            assert same.json() == {"method": "DELETE"}
            logout = await browser.get("/logout")
            assert logout.status_code == 303
            assert (await browser.get("/echo")).status_code == 401
        async with httpx.AsyncClient(base_url=base(server)) as browser:
            link = await browser.get(f"/echo?x=1&token={token}")
            # The token leaves the address bar; the cookie stays.
            assert link.status_code == 303 and link.headers["location"] == "/echo?x=1"
            assert (await browser.get("/echo")).status_code == 200


async def test_websockets_take_the_token_in_the_query(tmp_path: Path) -> None:
    async with start_server(tmp_path, plugins=[("echo", Echo())]) as server:
        assert server.admin_token is not None
        url = f"ws://127.0.0.1:{server.ports.admin}/echo/ws"
        with pytest.raises(HandshakeRejected) as refused:
            await connect(url, 1 << 16)
        assert refused.value.status == 403
        with pytest.raises(HandshakeRejected):
            await connect(url + "?token=wrong", 1 << 16)
        ws = await connect(f"{url}?token={server.admin_token.value}", 1 << 16)
        try:
            with anyio.fail_after(10):
                assert await ws.receive() == "hello admin"
                assert isinstance(await ws.receive(), Closed)
        finally:
            await ws.aclose()


async def test_a_token_in_the_query_string_changes_nothing(tmp_path: Path) -> None:
    echo = Echo()
    async with start_server(tmp_path, plugins=[("echo", echo)]) as server:
        assert server.admin_token is not None
        token = server.admin_token.value
        # A link (or a logged URL) that would change something: refused before any route sees it.
        async with httpx.AsyncClient(base_url=base(server)) as link:
            for method in ("POST", "DELETE", "PUT", "PATCH", "OPTIONS"):
                refused = await link.request(method, f"/echo?token={token}")
                assert refused.status_code == 401, method
                assert "Authorization: Bearer" in refused.json()["error"] and token not in refused.text
            assert echo.reached == []
            assert COOKIE not in link.cookies
            # GET still works (and moves the token into the cookie); so does the header, for changes.
            assert (await link.get(f"/echo?token={token}")).status_code == 303
        async with admin_client(server) as admin:
            assert (await admin.delete(f"/echo?token={token}")).json() == {"method": "DELETE"}
        assert echo.reached == ["DELETE"]


async def test_a_refused_websocket_closes_with_1008_where_the_server_cannot_answer_http(tmp_path: Path) -> None:
    async with start_server(tmp_path) as server:
        assert server.admin_token is not None
        async with httpx.AsyncClient(base_url=base(server)) as browser:
            await browser.post("/login", data={"token": server.admin_token.value, "next": "/"})
            cookie = f"{COOKIE}={browser.cookies[COOKIE]}".encode()
        app = AdminApp(server, [AdminRoute("/echo", Echo().admin_routes()[0].app)], server.admin_token)
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        # An ASGI server without the websocket.http.response extension.
        scope = {"type": "websocket", "path": "/echo/ws", "query_string": b"", "extensions": {},
                 "headers": [(b"cookie", cookie), (b"origin", b"http://evil.example"), (b"host", b"127.0.0.1")]}
        await app(scope, receive, send)
        assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_the_server_makes_a_private_token_and_keeps_it(tmp_path: Path) -> None:
    async with start_server(tmp_path / "data") as server:
        assert server.admin_token is not None
        first = server.admin_token.value
        path = tmp_path / "data" / TOKEN_FILE
        assert server.admin_token.path == path and path.read_text().strip() == first
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(first) >= 40
        # The start-up lines say where it is, never what it is.
        lines = "\n".join(describe(server))
        assert str(path) in lines and first not in lines
    async with start_server(tmp_path / "data") as again:
        assert again.admin_token is not None and again.admin_token.value == first


async def test_a_token_file_others_can_read_is_made_private_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "data" / TOKEN_FILE
    path.parent.mkdir()
    path.write_text("restored-from-a-backup\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="comzy"):
        async with start_server(tmp_path / "data") as server:
            assert server.admin_token is not None and server.admin_token.value == "restored-from-a-backup"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"admin token file {path} was open to other users (mode 644); made it 600" in caplog.text
    assert "restored-from-a-backup" not in caplog.text


async def test_comzy_admin_token_wins(tmp_path: Path) -> None:
    async with start_server(tmp_path / "data", admin_token=SecretStr("s3cret-admin")) as server:
        assert server.admin_token is not None
        assert server.admin_token.value == "s3cret-admin" and server.admin_token.source == "COMZY_ADMIN_TOKEN"
        assert not (tmp_path / "data" / TOKEN_FILE).exists()
        async with httpx.AsyncClient(base_url=base(server)) as client:
            ok = await client.get("/healthz", headers={"authorization": "Bearer s3cret-admin"})
            assert ok.status_code == 200
        assert "s3cret-admin" not in "\n".join(describe(server))
