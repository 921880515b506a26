"""Visitors of a tunnel whose agent asked for ``--basic-auth`` must send one of its credentials.

The agent sends, per credential, the user, a random salt and the scrypt hash of the password
(README.md has the format); this plugin keeps them on the tunnel, answers visitors without valid
credentials 401 before anything reaches the agent, and removes the Authorization header unless
the agent asked to forward it. Passwords are never kept: a visitor's is hashed with the same salt
and cost and compared in constant time. A verified header is remembered briefly (as a keyed
digest, never in clear) so a browser's every request does not pay the slow hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any

import anyio
import anyio.to_thread

from comzy import ForwardRequest, Registration, Reject, Tunnel, hookimpl

#: This plugin's name: the key of the agent's data (HELLO ``plugins``), of what it keeps on the
#: tunnel (``plugin_state``) and of the policy it confirms (``registration.enforce``).
NAME = "basic_auth"
#: The most credentials one tunnel may have.
MAX_CREDENTIALS = 32
MAX_USER = 255
#: The scrypt costs accepted from an agent: enough to make a stolen hash slow to guess, and never so
#: much that one visitor's attempt ties up the server (N=2^15, r=8 is 32 MiB and ~100 ms).
MIN_N, MAX_N = 2**10, 2**15
MAX_R, MAX_P = 8, 2
SALT_BYTES = (8, 64)
HASH_BYTES = (16, 64)
#: A verified Authorization header is admitted without hashing again for this long...
CACHE_SECONDS = 60.0
#: ...and at most this many are remembered (the oldest go first): the memory stays bounded.
CACHE_SIZE = 4096
#: Hashes computed at once, in a worker thread (scrypt releases the GIL): visitors guessing
#: passwords queue here instead of taking every core or stalling the event loop.
HASHING_THREADS = 1


def parse_policy(data: Any) -> dict[str, Any]:
    """The state kept on the tunnel, from the agent's untrusted data; ValueError says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("it must be a map")
    if data.get("scheme") != "scrypt":
        raise ValueError("the only hash scheme is 'scrypt'")
    n, r, p = data.get("n"), data.get("r"), data.get("p")
    if not _whole(n) or not MIN_N <= n <= MAX_N or n & (n - 1):
        raise ValueError(f"scrypt's n must be a power of two from {MIN_N} to {MAX_N}")
    if not _whole(r) or not 1 <= r <= MAX_R or not _whole(p) or not 1 <= p <= MAX_P:
        raise ValueError(f"scrypt's r must be 1 to {MAX_R} and p 1 to {MAX_P}")
    forward = data.get("forward", False)
    if not isinstance(forward, bool):
        raise ValueError("'forward' must be true or false")
    entries = data.get("credentials")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_CREDENTIALS:
        raise ValueError(f"'credentials' must be a list of 1 to {MAX_CREDENTIALS}")
    credentials = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError("each credential must be a map {user, salt, hash}")
        user = entry.get("user")
        if not isinstance(user, str) or not 1 <= len(user) <= MAX_USER or ":" in user or not user.isprintable():
            raise ValueError(f"a user name must be 1 to {MAX_USER} printable characters without ':'")
        _decoded(entry.get("salt"), "salt", SALT_BYTES)
        _decoded(entry.get("hash"), "hash", HASH_BYTES)
        credentials.append({"user": user, "salt": entry["salt"], "hash": entry["hash"]})
    return {"n": n, "r": r, "p": p, "credentials": credentials, "forward": forward}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decoded(value: Any, what: str, size: tuple[int, int]) -> bytes:
    """Base64 ``value`` of ``size`` bytes (low, high), or ValueError."""
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except binascii.Error:
        raw = None
    if raw is None or not size[0] <= len(raw) <= size[1]:
        raise ValueError(f"a credential's {what} must be {size[0]} to {size[1]} bytes in base64")
    return raw


def basic_credentials(header: str) -> tuple[bytes, bytes] | None:
    """(user, password) from an ``Authorization: Basic ...`` value, or None when it is not one."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


class BasicAuth:
    """Enforces the ``--basic-auth`` policy of the tunnels whose agents ask for it."""

    def __init__(self) -> None:
        # The key of the cache's digests: random per process, so a digest is no use elsewhere.
        self._key = os.urandom(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._limiter: anyio.CapacityLimiter | None = None  # made in the event loop, on first use
        #: Headers being verified now: the same header arriving meanwhile (a browser's parallel
        #: requests, a benchmark's 50 connections) waits for that one hash instead of queueing its own.
        self._pending: dict[bytes, anyio.Event] = {}

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        """Keep the agent's credentials (hashes) on the tunnel and confirm the policy."""
        registration.take_policy(NAME, parse_policy, "basic auth")

    @hookimpl
    def describe_policy(self, tunnel: Tunnel) -> dict[str, Any] | None:
        """The user names and the forward flag, for operators' views: never a salt or a hash."""
        state = tunnel.metadata.get(NAME)
        if not state:
            return None
        return {"users": list(dict.fromkeys(entry["user"] for entry in state["credentials"])),
                "forward": state["forward"]}

    @hookimpl
    def before_forward(self, request: ForwardRequest, tunnel: Tunnel) -> Awaitable[None] | None:
        """Admit a visitor with valid credentials; answer 401 otherwise.

        A plain function on purpose: a tunnel without the policy, and a header verified within
        CACHE_SECONDS, cost no coroutine; only a header to hash returns one (the runner awaits it).
        """
        state = tunnel.metadata.get(NAME)
        if not state:
            return None
        values = [value for name, value in request.headers if name.lower() == b"authorization"]
        if len(values) != 1:
            # Two headers: one is checked and the app (with --basic-auth-forward) may read the other.
            raise self._challenge(tunnel, "this tunnel needs a user name and password" if not values else
                                  "send one Authorization header, not several")
        header = values[0].decode("latin-1")
        key = hmac.new(self._key, f"{tunnel.session}\0{header}".encode(),
                       hashlib.sha256).digest()
        expires = self._verified.get(key)
        if expires is not None and expires > time.monotonic():
            _admit(request, state)
            return None
        pending = self._pending.get(key)
        if pending is not None:
            return self._after(pending, request, tunnel, state, key)
        return self._verify(request, tunnel, state, header, key)

    async def _after(self, pending: anyio.Event, request: ForwardRequest, tunnel: Tunnel, state: dict[str, Any],
                     key: bytes) -> None:
        """The same header is being verified: its verdict is this request's."""
        await pending.wait()
        if self._verified.get(key, 0.0) <= time.monotonic():
            raise self._challenge(tunnel, "wrong user name or password")
        _admit(request, state)

    async def _verify(self, request: ForwardRequest, tunnel: Tunnel, state: dict[str, Any], header: str,
                      key: bytes) -> None:
        done = self._pending[key] = anyio.Event()
        try:
            await self._check(tunnel, state, header)
        finally:
            del self._pending[key]
            done.set()
        self._remember(key)  # before the waiters run: they look for the key
        _admit(request, state)

    async def _check(self, tunnel: Tunnel, state: dict[str, Any], header: str) -> None:
        """Raise the 401 unless ``header`` holds one of the tunnel's credentials."""
        credentials = basic_credentials(header)
        if credentials is None:
            raise self._challenge(tunnel, "this tunnel needs a user name and password (HTTP Basic)")
        user, password = credentials
        entries = state["credentials"]
        matching = [e for e in entries if hmac.compare_digest(e["user"].encode(), user)]
        # An unknown user costs the same hash as a known one: the time does not tell which users exist.
        candidates = matching or [{"salt": base64.b64encode(os.urandom(16)).decode(), "hash": entries[0]["hash"]}]
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(HASHING_THREADS)
        valid = False
        for entry in candidates:
            expected = base64.b64decode(entry["hash"])
            digest = await anyio.to_thread.run_sync(_scrypt, password, base64.b64decode(entry["salt"]), state,
                                                    len(expected), limiter=self._limiter)
            valid |= hmac.compare_digest(digest, expected)
        if not (valid and matching):
            raise self._challenge(tunnel, "wrong user name or password")

    def _remember(self, key: bytes) -> None:
        now = time.monotonic()
        self._verified[key] = now + CACHE_SECONDS
        self._verified.move_to_end(key)
        while len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        # Expired entries at the old end go too, so a quiet server forgets what it verified.
        while self._verified:
            oldest, expires = next(iter(self._verified.items()))
            if expires > now:
                break
            del self._verified[oldest]

    @staticmethod
    def _challenge(tunnel: Tunnel, reason: str) -> Reject:
        # The alias is a DNS label: safe inside the quoted realm.
        challenge = f'Basic realm="{tunnel.alias}", charset="UTF-8"'.encode()
        return Reject(reason, status=401, body=f"401 Unauthorized: {reason}.\n",
                      headers=[(b"www-authenticate", challenge)])


def _scrypt(password: bytes, salt: bytes, state: dict[str, Any], size: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=state["n"], r=state["r"], p=state["p"], dklen=size,
                          maxmem=64 * 1024 * 1024)


def _admit(request: ForwardRequest, state: dict[str, Any]) -> None:
    """Let the request through: without its Authorization header unless the agent forwards it."""
    if not state["forward"]:
        request.headers[:] = [(name, value) for name, value in request.headers if name.lower() != b"authorization"]
