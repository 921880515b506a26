"""The agent's login: the saved token (``~/.comzy/.user``) and calls to the server's account API.

The account API is plain HTTP on the same port as the agent's WebSocket (``ws://host:8191``
becomes ``http://host:8191``), so the one server URL the agent knows is enough.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

#: The seed's location of the saved login.
CREDENTIALS = Path("~/.comzy/.user")


class AccountError(Exception):
    """An account call failed; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A saved login: the token, who it belongs to, and the server it was checked with."""

    token: str
    user: str
    server: str


def credentials_path() -> Path:
    """Where the login is saved (``~/.comzy/.user``)."""
    return CREDENTIALS.expanduser()


def load_credentials() -> Credentials | None:
    """The saved login, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(credentials_path().read_text())
        return Credentials(str(data["token"]), str(data.get("user", "?")), str(data.get("server", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_credentials(credentials: Credentials) -> Path:
    """Save the login readable by its owner only (directory 0700, file 0600)."""
    path = credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps({"token": credentials.token, "user": credentials.user, "server": credentials.server})
    # Created 0600 from the start: the token is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)  # an older file may have had other bits
        file.write(data + "\n")
    return path


def remove_credentials() -> bool:
    """Forget the saved login; False when there was none."""
    try:
        credentials_path().unlink()
    except FileNotFoundError:
        return False
    return True


def _same_place(url: str) -> str:
    return url.strip().rstrip("/").lower()


def token_for(servers: list[str], saved: Credentials | None) -> tuple[str | None, str | None]:
    """The token to present to ``servers`` and, when a saved login is held back, why (a clause).

    COMZY_TOKEN is always used. The saved token goes only to the server(s) it was checked with at
    `comzy login`: pointing the agent elsewhere (--server, COMZY_WS_SERVER) must never hand a
    token to a server that was not meant to see it.
    """
    if os.environ.get("COMZY_TOKEN"):
        return os.environ["COMZY_TOKEN"], None
    if saved is None:
        return None, None
    logged_in = {_same_place(s) for s in saved.server.split(",") if s.strip()}
    if logged_in and all(_same_place(s) in logged_in for s in servers):
        return saved.token, None
    return None, f"your saved login ({saved.user}) is for {saved.server}, not {', '.join(servers)}"


def api_base(server: str) -> str:
    """``ws://host:8191/prefix`` -> ``http://host:8191/prefix`` (``wss`` -> ``https``).

    A path prefix is kept: behind a reverse proxy the agent listener may live under one.
    """
    parts = urlsplit(server)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None:
        raise AccountError(f"server URL {server!r} must start with ws:// or wss://")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True, slots=True)
class Answer:
    """A JSON answer of the account API."""

    status: int
    document: dict[str, Any]

    @property
    def error(self) -> str:
        """The server's explanation of a failure."""
        return str(self.document.get("error", f"HTTP {self.status}"))


async def call(server: str, method: str, path: str, token: str | None = None, timeout: float = 10.0) -> Answer:
    """One account API call; AccountError when the server cannot be reached or is not Comzy."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    url = api_base(server) + path
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            response = await client.request(method, url, headers=headers)
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise AccountError(f"cannot reach the Comzy server at {server} ({reason}). Is comzy-server running "
                           "there? Set --server or COMZY_WS_SERVER.") from None
    document: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        parsed = response.json()
        if isinstance(parsed, dict):
            document = parsed
    if not document and response.status_code != 204:
        raise AccountError(f"{server} answered HTTP {response.status_code} without JSON; is it a Comzy agent "
                           "listener (comzy-server's COMZY_WS_PORT, 8191 by default)?")
    return Answer(response.status_code, document)


def no_accounts(server: str) -> str:
    """The message for a server without the account API."""
    return (f"{server} has no user accounts (its auth_token plugin is off); anonymous tunnels work there "
            "without logging in")
