"""Which agent session serves which alias, on this node."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from comzy.core.session import Session
from comzy.core.types import Tunnel


def hash_secret(secret: str) -> bytes:
    """Resume secrets are kept hashed: a memory dump does not hand out takeovers."""
    return hashlib.sha256(secret.encode()).digest()


@dataclass(slots=True)
class Entry:
    """A live tunnel and the session that serves it."""

    tunnel: Tunnel
    session: Session
    resume_hash: bytes


class Registry:
    """Alias -> live session; every check-and-set happens without awaiting in between."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def get(self, alias: str) -> Entry | None:
        """The live entry for ``alias``."""
        return self._entries.get(alias)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry]:
        """All live entries."""
        return list(self._entries.values())

    def holder_matches(self, alias: str, resume_secret: str | None) -> bool:
        """Whether ``resume_secret`` proves the caller owns the current holder's session."""
        entry = self._entries.get(alias)
        if entry is None or not resume_secret:
            return False
        return hmac.compare_digest(entry.resume_hash, hash_secret(resume_secret))

    def add(self, entry: Entry) -> Entry | None:
        """Install ``entry``; returns the entry it replaced (a takeover), if any."""
        previous = self._entries.get(entry.tunnel.alias)
        self._entries[entry.tunnel.alias] = entry
        return previous

    def remove(self, alias: str, session: Session) -> bool:
        """Remove ``alias`` if ``session`` still holds it (a replaced session must not
        remove its successor)."""
        entry = self._entries.get(alias)
        if entry is not None and entry.session is session:
            del self._entries[alias]
            return True
        return False
