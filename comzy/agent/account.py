"""The agent's login: the saved token (``~/.comzy/.user``) and calls to the server's account API.

The account API is plain HTTP on the same port as the agent's WebSocket (``ws://host:8191``
becomes ``http://host:8191``), so the one server URL the agent knows is enough. What is called
here is the documented API (docs/agent_api.md, comzy/core/account_api.py), whichever plugin
serves it: answers are read by their documented shape, failures by status and error code.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from comzy.core.account_api import ALIASES_PATH, ME_PATH, STATUS_PATH, ErrorCode, read_error
from comzy.core.logs import printable
from comzy.core.tls import client_tls_context, mismatch

#: The seed's location of the saved login.
CREDENTIALS = Path("~/.comzy/.user")
#: The most the agent reads of one account API answer: a server (or whatever answers at its
#: address) cannot make `comzy status` or `comzy login` hold more than this in memory.
MAX_ANSWER = 4 * 1024 * 1024


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


def same_place(url: str) -> str:
    """``url`` as compared with another server URL (case and a trailing slash do not matter)."""
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
    logged_in = {same_place(s) for s in saved.server.split(",") if s.strip()}
    if logged_in and all(same_place(s) in logged_in for s in servers):
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


class ApiError(AccountError):
    """The server answered with an error: its HTTP ``status``, error ``code`` and ``message``.

    ``code`` is one of comzy.core.account_api.ErrorCode's values ("" from a server of an earlier
    Comzy, whose errors had no code). The text shows the server's message as it is, after the
    server's URL: ``<server> says: <message>``.
    """

    def __init__(self, server: str, status: int, code: str, message: str) -> None:
        # Escaped: the server's words must not drive the terminal they are printed on.
        super().__init__(f"{server} says: {printable(message) if message else f'HTTP {status}'}")
        self.server = server
        self.status = status
        self.code = code
        self.message = message

    @property
    def no_accounts(self) -> bool:
        """Whether the server has no account API at all (no plugin serves it)."""
        return self.code == ErrorCode.NO_API


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """``GET /api/v1/status``: what the server is."""

    server: str
    protocol: int
    base_domain: str
    draining: bool
    #: The server's COMZY_PUBLIC_AGENT_URL: where its agents connect (None: unset, or an older server).
    agent_url: str | None = None


@dataclass(frozen=True, slots=True)
class OwnedAlias:
    """One alias a user owns, as the account API lists it."""

    alias: str
    port: int
    url: str
    online: bool


@dataclass(frozen=True, slots=True)
class Account:
    """``GET /api/v1/me``: who the token belongs to and what they own (``max_aliases``: None = no limit)."""

    user: str
    aliases: list[OwnedAlias]
    max_aliases: int | None


class AccountClient:
    """Calls the account API of ``server`` (an agent listener URL), with ``token`` when given."""

    def __init__(self, server: str, token: str | None = None, timeout: float = 10.0,
                 cacert: str | None = None) -> None:
        self.server = server
        #: What a wss:// server's certificate is checked against: the agent's one trust setting
        #: (SSL_CERT_FILE, else the system's CAs; ``cacert`` instead when given), as for the tunnel.
        self.cacert = cacert
        self.token = token
        self.timeout = timeout

    async def status(self) -> ServerStatus:
        """What the server is (the core answers this; no token needed)."""
        document = await self._call("GET", STATUS_PATH)
        server = self.server
        return ServerStatus(_field(server, document, "server", str), _field(server, document, "protocol", int),
                            _field(server, document, "base_domain", str), bool(document.get("draining")),
                            _optional_str(document.get("agent_url")))

    async def me(self) -> Account:
        """The token's user and the aliases they own; ApiError when refused."""
        try:
            document = await self._call("GET", ME_PATH)
        except ApiError as exc:
            if exc.status == 404 and not exc.code:
                # An earlier Comzy's 404 had no code; on this path it could only mean "no such API".
                raise ApiError(exc.server, exc.status, ErrorCode.NO_API, exc.message) from None
            raise
        limit = document.get("max_aliases")
        return Account(_field(self.server, document, "user", str), self._aliases(document),
                       limit if isinstance(limit, int) else None)

    async def release(self, alias: str) -> bool:
        """Give up ``alias``; whether its tunnel is still online (it runs until it stops)."""
        document = await self._call("DELETE", f"{ALIASES_PATH}/{quote(alias, safe='')}")
        return bool(document.get("online"))

    def _aliases(self, document: dict[str, Any]) -> list[OwnedAlias]:
        listing = []
        for item in _field(self.server, document, "aliases", list):
            if not isinstance(item, dict):
                raise _unexpected(self.server, "aliases", "a list of objects")
            listing.append(OwnedAlias(_field(self.server, item, "alias", str), _field(self.server, item, "port", int),
                                      _field(self.server, item, "url", str), bool(item.get("online"))))
        return listing

    async def _call(self, method: str, path: str) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        url = api_base(self.server) + path
        try:
            # trust_env stays off (no proxy from the environment); trust comes from the context.
            verify = client_tls_context(self.cacert) if url.startswith("https:") else True
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        # Imported here: `comzy 3000` never calls the API, and httpx's __init__ also imports its
        # command-line client (click, rich, pygments) whenever they are installed, as rich now is.
        import httpx

        try:
            async with (httpx.AsyncClient(timeout=self.timeout, trust_env=False, verify=verify) as client,
                        client.stream(method, url, headers=headers) as response):
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise AccountError(
                            f"{self.server} answered with more than {MAX_ANSWER // (1024 * 1024)} MiB, which no "
                            "account API answer is; is COMZY_WS_SERVER the Comzy agent listener?")
        except httpx.HTTPError as exc:
            line = mismatch(self.server, exc)
            if line is not None:
                raise AccountError(line) from None
            reason = str(exc) or type(exc).__name__
            raise AccountError(f"cannot reach the Comzy server at {self.server} ({reason}). Is comzy-server "
                               "running there? Set --server or COMZY_WS_SERVER.") from None
        document: Any = None
        with contextlib.suppress(ValueError):
            document = json.loads(body)
        if not isinstance(document, dict):
            line = mismatch(self.server, body.decode("utf-8", "replace"))
            if line is not None:
                raise AccountError(line)
            raise AccountError(f"{self.server} answered HTTP {response.status_code} without a JSON object; is it "
                               "a Comzy agent listener (comzy-server's COMZY_WS_PORT, 8191 by default)?")
        error = read_error(document)
        if response.status_code >= 400 or error is not None:
            code, message = error if error is not None else ("", "")
            raise ApiError(self.server, response.status_code, code, message)
        return document


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _field(server: str, document: dict[str, Any], key: str, kind: type) -> Any:
    """``document[key]`` if it is a ``kind``; else the answer is not the documented API."""
    value = document.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _unexpected(server, key, f"a {kind.__name__}")
    return value


def _unexpected(server: str, key: str, expected: str) -> AccountError:
    # No docs/ path here: a pip user has none; the API's shape is for the server's operator to check.
    return AccountError(f"{server} answered with '{key}' not {expected}, which is not the account API this agent "
                        "speaks; is it a Comzy agent listener of a matching version (pip install --upgrade comzy)?")


def no_accounts(server: str) -> str:
    """The line for a server where no plugin serves the account API."""
    return (f"{server} has no user accounts (no plugin there serves the account API; its operator enables one, "
            "such as auth_token, in COMZY_PLUGINS); anonymous tunnels work there without logging in")
