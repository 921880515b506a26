"""Which agent session serves which alias, on this node."""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from comzy.core.control import GoAway
from comzy.core.session import Session
from comzy.core.types import Tunnel

if TYPE_CHECKING:
    from comzy.core.server import ServerContext


def hash_secret(secret: str) -> bytes:
    """Resume secrets are kept hashed: a memory dump does not hand out takeovers."""
    return hashlib.sha256(secret.encode()).digest()


@dataclass(slots=True)
class Entry:
    """A live tunnel and the session that serves it."""

    tunnel: Tunnel
    session: Session
    resume_hash: bytes
    #: Every entry of this entry's session, itself included, when the session carries several
    #: tunnels (HELLO ``tunnels``; shared list); empty for a one-tunnel session.
    siblings: list[Entry] = field(default_factory=list)
    #: Why this tunnel ended while its session goes on serving its siblings (taken over, or closed
    #: by the server): its ``on_disconnect`` has run then, and the session's end skips it.
    ended: str | None = None

    def others_live(self, registry: Registry) -> list[Entry]:
        """The other tunnels of this session that still hold their alias in ``registry``."""
        return [e for e in self.siblings if e is not self and registry.get(e.tunnel.alias) is e]


class Registry:
    """Alias -> live session; every check-and-set happens without awaiting in between."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        # Live tunnels per agent address, kept with the entries: COMZY_MAX_TUNNELS_PER_ADDRESS is
        # checked on every registration, so counting must not walk every tunnel.
        self._by_address: Counter[str] = Counter()

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

    def count_from(self, address: str) -> int:
        """How many live tunnels agents at ``address`` hold on this node."""
        return self._by_address.get(address, 0)

    def add(self, entry: Entry) -> Entry | None:
        """Install ``entry``; returns the entry it replaced (a takeover), if any."""
        previous = self._entries.get(entry.tunnel.alias)
        if previous is not None:
            self._uncount(previous)
        self._entries[entry.tunnel.alias] = entry
        self._by_address[entry.tunnel.client_address] += 1
        return previous

    def remove(self, alias: str, session: Session) -> bool:
        """Remove ``alias`` if ``session`` still holds it (a replaced session must not
        remove its successor)."""
        entry = self._entries.get(alias)
        if entry is not None and entry.session is session:
            del self._entries[alias]
            self._uncount(entry)
            return True
        return False

    def _uncount(self, entry: Entry) -> None:
        address = entry.tunnel.client_address
        left = self._by_address[address] - 1
        if left > 0:
            self._by_address[address] = left
        else:
            del self._by_address[address]


def end_tunnel(entry: Entry, server: ServerContext, reason: str) -> None:
    """End ``entry``'s tunnel, whose alias another session holds now (a takeover; the registry no
    longer maps the alias to it), telling its agent ``reason`` and not to take it back.

    A session that still serves other tunnels (HELLO ``tunnels``) goes on: the GOAWAY names the one
    tunnel, and its ``on_disconnect`` runs now. Otherwise the session ends, as a one-tunnel session
    always did (its ``on_disconnect`` runs when it has).
    """
    if end_one(entry, server, reason, "replaced by a new session"):
        return
    entry.session.send_nowait(GoAway(reason, reconnect=False).encode())
    server.task_group.start_soon(entry.session.flush_and_close, 4000, "replaced by a new session")


def end_one(entry: Entry, server: ServerContext, reason: str, disconnect: str) -> bool:
    """If ``entry``'s session serves other live tunnels, end this one only and return True: its
    agent gets GOAWAY ``{reason, reconnect: false, tunnel}`` and ``on_disconnect`` runs (with
    ``disconnect``). False: the caller ends the session. The registry must not map the alias to
    ``entry`` any more."""
    if not entry.others_live(server.registry):
        return False
    entry.ended = disconnect
    entry.session.send_nowait(GoAway(reason, reconnect=False, tunnel=entry.tunnel.name).encode())
    server.task_group.start_soon(server.hooks.on_disconnect, entry.tunnel, disconnect, server)
    return True
