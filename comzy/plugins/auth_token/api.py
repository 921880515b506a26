"""auth_token's implementation of the account API on the agent listener (docs/agent_api.md: what
``comzy login``, ``status`` and ``aliases`` call).

- ``GET /api/v1/me``: who the bearer token belongs to and the aliases they own.
- ``GET /api/v1/aliases``: the same aliases, alone.
- ``DELETE /api/v1/aliases/NAME``: give up an owned alias.

Every call needs ``Authorization: Bearer <token>``; answers are JSON, errors the documented
``{"error": {"code", "message"}}``. An address that sent too many wrong tokens gets 429
``throttled`` with ``Retry-After`` (see FailureThrottle).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from comzy import Reject
from comzy.account_api import ALIASES_PATH, ME_PATH, ErrorCode, error_document

from .store import DatabaseSlow

if TYPE_CHECKING:
    from comzy import ServerContext

    from .plugin import AuthToken
    from .store import UserRecord


class AccountApi:
    """ASGI app for the account routes."""

    def __init__(self, plugin: AuthToken, server: ServerContext) -> None:
        self.plugin = plugin
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        extra: list[tuple[bytes, bytes]] = []
        status, document = await self._answer(scope, extra)
        body = json.dumps(document).encode() + b"\n"
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"), *extra]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="comzy"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> tuple[int, Any]:
        """``(status, document)``; appends to ``headers`` what the answer needs (Retry-After)."""
        token = _bearer(scope["headers"])
        if token is None:
            return _error(ErrorCode.UNAUTHORIZED, "send your token as 'Authorization: Bearer <token>' "
                                                  "(comzy login does)")
        client = scope.get("client")
        try:
            # Failures count per address: guessing tokens here is as slow as on the agent link.
            user = await self.plugin.authenticate(token, client[0] if client else "?")
        except Reject as exc:
            headers.extend(exc.headers)
            return _error(_REFUSALS.get(exc.status, ErrorCode.UNAUTHORIZED), exc.reason)
        method, path = scope["method"], scope["path"].rstrip("/")
        if path == ME_PATH:
            if method != "GET":
                return _error(ErrorCode.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}; use GET")
            return 200, {"user": user.name, "aliases": self._aliases(user),
                         "max_aliases": self.plugin.settings.max_aliases_per_user}
        if path == ALIASES_PATH:
            if method != "GET":
                return _error(ErrorCode.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}; use GET")
            return 200, {"aliases": self._aliases(user)}
        alias = path.removeprefix(ALIASES_PATH + "/")
        if "/" in alias or not alias:
            return _error(ErrorCode.NO_API, f"nothing on this server serves {scope['path']}")
        if method != "DELETE":
            return _error(ErrorCode.METHOD_NOT_ALLOWED,
                          f"{method} is not allowed on {path}; use DELETE to release the alias")
        try:
            released = await self.plugin.release(user, alias.lower())
        except (SQLAlchemyError, OSError, DatabaseSlow):
            return _error(ErrorCode.UNAVAILABLE, "the server cannot change aliases right now (its database is "
                                                 "unavailable); try again in a minute")
        if not released:
            return _error(ErrorCode.NOT_FOUND, f"you own no alias '{alias}' (`comzy aliases` lists yours)")
        return 200, {"released": alias.lower(), "online": self.server.tunnel(alias.lower()) is not None}

    def _aliases(self, user: UserRecord) -> list[dict[str, Any]]:
        listing = []
        for record in self.plugin.owned_by(user.id):
            tunnel = self.server.tunnel(record.alias)
            url = self.server.settings.url_for(record.alias)
            listing.append({"alias": record.alias, "port": record.port, "url": url,
                            "online": tunnel is not None and tunnel.user == user.name,
                            "created_at": record.created_at.isoformat()})
        return listing


#: The account API's code for each status ``authenticate`` refuses with.
_REFUSALS = {401: ErrorCode.UNAUTHORIZED, 429: ErrorCode.THROTTLED, 503: ErrorCode.UNAVAILABLE}


def _error(code: ErrorCode, message: str) -> tuple[int, Any]:
    return code.status, error_document(code, message)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
