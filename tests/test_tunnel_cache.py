"""``comzy.TunnelCache``: what a plugin derives from a tunnel's state (ip_filter's networks, headers' edits),
made once per tunnel session and kept for the sessions used most recently, within a bound."""

from __future__ import annotations

import pytest

from comzy import Tunnel, TunnelCache


def tunnel(alias: str = "app") -> Tunnel:
    """A tunnel with a session number of its own, as each registration gets."""
    return Tunnel(alias=alias, public_url=f"http://{alias}.example.test", port=3000, client_address="127.0.0.1")


def test_made_once_per_session_and_again_for_a_new_session() -> None:
    made: list[str] = []

    def make(state: dict[str, str]) -> tuple[str, ...]:
        made.append(state["rule"])
        return (state["rule"].upper(),)

    cache: TunnelCache[dict[str, str], tuple[str, ...]] = TunnelCache(make)
    first = tunnel()
    assert cache.get(first, {"rule": "a"}) == ("A",)
    assert cache.get(first, {"rule": "a"}) is cache.get(first, {"rule": "a"})
    assert made == ["a"]
    # The same alias on a new session (a reconnect, a takeover) may have other rules: made anew.
    again = tunnel()
    assert again.session != first.session
    assert cache.get(again, {"rule": "b"}) == ("B",)
    assert made == ["a", "b"] and len(cache) == 2


def test_the_least_recently_used_session_goes_first() -> None:
    made: list[int] = []

    def make(state: int) -> list[int]:
        made.append(state)
        return [state]

    cache: TunnelCache[int, list[int]] = TunnelCache(make, size=2)
    one, two, three = tunnel("one"), tunnel("two"), tunnel("three")
    cache.get(one, 1)
    cache.get(two, 2)
    cache.get(one, 1)  # one is now the most recently used...
    cache.get(three, 3)  # ...so two goes
    assert len(cache) == 2
    cache.get(one, 1)
    cache.get(three, 3)
    assert made == [1, 2, 3]
    cache.get(two, 2)  # made again; one (least recent) goes
    cache.get(one, 1)
    assert made == [1, 2, 3, 2, 1] and len(cache) == 2


def test_it_keeps_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TunnelCache(lambda state: state, size=0)
