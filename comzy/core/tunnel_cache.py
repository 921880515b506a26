"""What a plugin derives from a tunnel's state once per tunnel session: compiled rules and the like."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from comzy.core.types import Tunnel

State = TypeVar("State")
Made = TypeVar("Made")


class TunnelCache(Generic[State, Made]):
    """``make(state)`` for each tunnel session, made on first use and kept for the ``size`` sessions
    used most recently (the least recently used goes first, so memory stays bounded).

    A plugin keeps plain data on the tunnel (``plugin_state``: it crosses a cluster to the edges), and
    turning that into something fast to check (parsed networks, header names as bytes) on every
    request would cost more than the check. A tunnel's state is set at registration and never
    changes, and its ``session`` is unique across a cluster, so the session is the key: a new
    session on the same alias gets its own ``make``. ``make`` never returns None (None is made again).
    """

    __slots__ = ("_made", "_make", "size")

    def __init__(self, make: Callable[[State], Made], size: int = 4096) -> None:
        if size < 1:
            raise ValueError("a TunnelCache keeps at least one tunnel")
        self._make = make
        self.size = size
        self._made: OrderedDict[int, Made] = OrderedDict()

    def get(self, tunnel: Tunnel, state: State) -> Made:
        """What ``make`` returned for ``tunnel``'s session, calling it with ``state`` (the tunnel's own:
        ``tunnel.metadata[<plugin name>]``) the first time."""
        made = self._made.get(tunnel.session)
        if made is None:
            made = self._made[tunnel.session] = self._make(state)
            if len(self._made) > self.size:
                self._made.popitem(last=False)
        else:
            self._made.move_to_end(tunnel.session)
        return made

    def __len__(self) -> int:
        return len(self._made)
