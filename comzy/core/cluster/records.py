"""Alias records in the cluster's KV bucket, and what a registration learns from them.

docs/design/cluster.md 2.1-2.2: the record codec, the ``Holders`` a control node reads before it
chooses an alias, and the two refusals a claim can end in. Used by ownership.py.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

import msgpack

from comzy.core.registry import Entry, hash_secret
from comzy.core.types import Reject

#: Seconds an agent refused because the alias registry is unreachable waits before it retries.
RETRY_AFTER = 2
#: Record format version.
RECORD_VERSION = 1
#: Bytes of plugin metadata a record keeps at most (the record must fit the bucket's values).
MAX_RECORD_METADATA = 16 * 1024


class DirectoryDown(Reject):
    """The cluster's alias registry (JetStream KV) cannot be reached right now.

    A Reject with status 429: the agent listener refuses the registration as ``throttled`` with
    ``retry_after`` 2, so the agent waits and tries again instead of giving up.
    """

    def __init__(self, detail: str = "") -> None:
        super().__init__("the cluster's alias registry is unreachable; retrying", status=429,
                         headers=[(b"retry-after", str(RETRY_AFTER).encode())])
        self.detail = detail


class AliasTaken(Reject):
    """Another node's claim on the alias came first (the compare-and-set failed): status 409."""

    def __init__(self, alias: str) -> None:
        super().__init__(f"'{alias}' is in use by another agent right now; try again later", status=409)


@dataclass(slots=True, frozen=True)
class Record:
    """One alias record as read from the bucket (``revision`` is the KV revision it was read at)."""

    alias: str
    node: str
    session: int
    live: bool
    resume_hash: bytes
    user: str | None
    tunnel: dict[str, Any]
    revision: int

    @staticmethod
    def encode_entry(entry: Entry, node: str, *, live: bool = True) -> bytes:
        """The record value for a local tunnel (the resume secret only as its hash)."""
        t = entry.tunnel
        metadata: dict[str, Any] = t.metadata
        if len(msgpack.packb(metadata, default=str)) > MAX_RECORD_METADATA:
            metadata = {}  # a lookup still works; only the snapshot's metadata is left out
        return msgpack.packb({
            "v": RECORD_VERSION, "st": "live" if live else "released", "n": node, "s": t.session,
            "h": entry.resume_hash, "u": t.user,
            "t": {"url": t.public_url, "port": t.port, "client": t.client_address, "since": t.created_at,
                  "expires_at": t.expires_at, "metadata": metadata},
        }, default=str)

    @classmethod
    def decode(cls, alias: str, value: bytes | None, revision: int) -> Record | None:
        """A record from the bucket; None for an unreadable one (treated as free, and overwritten)."""
        try:
            data = msgpack.unpackb(value or b"", raw=False)
            return cls(alias, str(data["n"]), int(data["s"]), data["st"] == "live", bytes(data["h"]),
                       data.get("u"), dict(data.get("t") or {}), revision)
        except Exception:
            return None


class Holders:
    """The records of the names a registration may get, read before the alias is chosen.

    ``holder(name)`` is the live holder (its node's lease exists), or None when the name is free,
    released or held by a dead node; ``record(name)`` is whatever record exists, for the
    compare-and-set of the claim.
    """

    def __init__(self, records: dict[str, Record | None], live: dict[str, Record]) -> None:
        self._records = records
        self._live = live

    def record(self, name: str) -> Record | None:
        """The record of ``name`` in any state (None: no record, or ``name`` was not read)."""
        return self._records.get(name)

    def holder(self, name: str) -> Record | None:
        """The live holder of ``name``, if any."""
        return self._live.get(name)

    def known(self, name: str) -> bool:
        """Whether ``name`` was read (a random alias is not: its claim checks it)."""
        return name in self._records

    def held_by_caller(self, name: str, resume_secret: str | None, user: str | None) -> bool:
        """Whether the caller may have ``name``: nobody holds it, or the caller proves it is the
        holder (its resume secret, or the same authenticated user). The rules of the single node."""
        holder = self._live.get(name)
        if holder is None:
            return True
        if resume_secret and hmac.compare_digest(holder.resume_hash, hash_secret(resume_secret)):
            return True
        return user is not None and holder.user == user
