"""The inspector's web page (issue 15): its assets, the live stream of exchanges that drives it, and
the checks that keep other web pages out of the inspector.

The page is three plain files in comzy/agent/inspector_assets/ and the look it shares with the admin
dashboard, comzy/assets/ (base.css, the icon), all shipped as package data: no CDN, no build step.
It lists exchanges from ``GET /api/stream`` (Server-Sent Events: a snapshot of compact summaries,
then what changed) and reads one exchange's detail from ngrok's ``GET /api/requests/http/{id}``.
comzy/agent/inspector.py routes to what is here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from comzy import assets

if TYPE_CHECKING:
    from comzy.agent.capture import Capture, Exchange
    from comzy.agent.inspector import TunnelInfo

#: The page's own files: with :data:`SHARED_ASSETS`, the only paths served outside /api (a fixed
#: table, so no path reaches the disk).
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/assets/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/assets/style.css": ("style.css", "text/css; charset=utf-8"),
}
#: The files of comzy.assets, the look shared with the dashboard, by the path the page links them at.
SHARED_ASSETS: dict[str, str] = {f"/assets/{name}": name for name in assets.FILES}
#: Everything on the page comes from its own origin; no inline script or style, no frames (a page
#: elsewhere cannot frame it to trick a click on Replay), no forms posted elsewhere.
CONTENT_SECURITY_POLICY = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: Headers on every answer, the API's included: captured traffic is never cached, sniffed or framed.
COMMON_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
                  (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]

#: Live streams open at once (each an open page); one more is refused 503 with what to do.
MAX_STREAMS = 8
#: How often a stream looks for new or changed exchanges, in seconds.
STREAM_TICK = 0.25
#: A comment line after this many quiet seconds, so a proxy or the browser sees the stream alive.
STREAM_KEEPALIVE = 15.0
#: A page that has not read what it was sent for this long is dropped: a stream holds one tick's
#: changes at most, and a stuck one must not hold a slot forever.
STREAM_WRITE_TIMEOUT = 30.0
#: Characters of a target or an error kept in a summary (the detail has them whole).
SUMMARY_TEXT = 2048


@dataclass(slots=True)
class Reply:
    """An answer other than the API's JSON: a page asset, or the live stream."""

    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    stream: AsyncGenerator[bytes, None] | None = None
    #: How long a write of this reply may wait for the peer before the connection is dropped.
    write_timeout: float | None = None


def asset(path: str) -> Reply | None:
    """The page file served at ``path``, or None when ``path`` is not one of them."""
    shared = SHARED_ASSETS.get(path)
    if shared is not None:
        name, content_type, body = shared, assets.FILES[shared], assets.read(shared) or b""
    else:
        entry = ASSETS.get(path)
        if entry is None:
            return None
        name, content_type = entry
        body = _read(name)
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    if name == "index.html":
        headers.append((b"content-security-policy", CONTENT_SECURITY_POLICY))
    return Reply(headers, body)


_cache: dict[str, bytes] = {}


def _read(name: str) -> bytes:
    if name not in _cache:
        _cache[name] = resources.files("comzy.agent").joinpath("inspector_assets", name).read_bytes()
    return _cache[name]


def cross_site(method: str, headers: dict[bytes, bytes]) -> str | None:
    """Why a request comes from a web page other than the inspector's own (None when it does not).

    The Host check already refuses DNS rebinding; this refuses a page elsewhere (or another app on
    localhost) that makes the browser send a request here: browsers send ``Origin`` with every
    POST and DELETE and with cross-origin reads, and ``Sec-Fetch-Site`` with everything. A
    request with neither comes from a script (curl), which is welcome, as on ngrok.
    """
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    origin = headers.get(b"origin")
    if origin is not None and origin.decode("latin-1").strip().lower() != f"http://{host}":
        return "the inspector answers only its own page: requests from other web pages are refused"
    site = headers.get(b"sec-fetch-site", b"").lower()
    if site not in (b"", b"same-origin", b"none"):
        return "the inspector answers only its own page: requests from other web pages are refused"
    return None


def summary(exchange: Exchange) -> dict[str, Any]:
    """What the page's list shows of an exchange: small, with no bodies (the detail has them)."""
    target = exchange.target.decode("latin-1")
    return {
        "id": exchange.id,
        "method": exchange.method,
        "uri": target[:SUMMARY_TEXT],
        "status": exchange.status if exchange.response_headers is not None else None,
        "kind": exchange.kind,
        "replay_of": exchange.replay_of,
        "edited": exchange.edited,
        "done": exchange.done,
        "error": exchange.error[:SUMMARY_TEXT] if exchange.error else None,
        "start": exchange.started,
        "duration": exchange.duration_ns if exchange.done else None,
        "request_size": exchange.request_size,
        "response_size": exchange.response_size,
        "remote_addr": exchange.remote_addr,
        "messages": None if exchange.stream is None else exchange.stream.count,
    }


def _signature(exchange: Exchange) -> tuple[Any, ...]:
    return (exchange.status, exchange.response_headers is not None, exchange.done, exchange.error,
            exchange.request_size, exchange.response_size, None if exchange.stream is None else exchange.stream.count)


def _event(name: str, data: Any) -> bytes:
    # json.dumps escapes every control character, so the data is one line: it cannot end the event.
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class Streams:
    """The live streams of one inspector: how many are open, bounded by :data:`MAX_STREAMS`."""

    def __init__(self, capture: Capture, tunnel: TunnelInfo) -> None:
        self.capture = capture
        self.tunnel = tunnel
        self.open = 0
        #: Set when the inspector stops: every stream ends.
        self.closing = asyncio.Event()

    def reply(self) -> Reply | None:
        """A stream for one more page, or None when :data:`MAX_STREAMS` are open."""
        if self.open >= MAX_STREAMS:
            return None
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        return Reply(headers, stream=self._run(), write_timeout=STREAM_WRITE_TIMEOUT)

    def _tunnels(self) -> list[dict[str, Any]]:
        """The agent's tunnels: the first one, then any more it serves (``comzy 3000 8080``)."""
        return [{"name": tunnel.name, "public_url": tunnel.public_url, "addr": tunnel.addr}
                for tunnel in (self.tunnel, *self.tunnel.more)]

    async def _run(self) -> AsyncGenerator[bytes, None]:
        self.open += 1
        try:
            # A page reconnects by itself; 2 s after the agent comes back is soon enough.
            yield b"retry: 2000\n\n"
            seen: dict[str, tuple[Any, ...]] = {}
            tunnels: list[dict[str, Any]] | None = None
            quiet = 0.0
            first = True
            while not self.closing.is_set():
                out = []
                if (now := self._tunnels()) != tunnels:
                    tunnels = now
                    out.append(_event("tunnel", {"public_url": now[0]["public_url"], "addr": now[0]["addr"],
                                                 "tunnels": now}))
                exchanges = self.capture.newest_first()
                if first:
                    seen = {e.id: _signature(e) for e in exchanges}
                    out.append(_event("snapshot", [summary(e) for e in exchanges]))
                    first = False
                else:
                    # One signature per kept exchange and look: 500 kept took 1.0 ms a look here, so
                    # 4 looks a second cost about 0.4% of a core per open page.
                    now_seen = {e.id: _signature(e) for e in exchanges}
                    changed = [summary(e) for e in exchanges if seen.get(e.id) != now_seen[e.id]]
                    gone = [key for key in seen if key not in now_seen]
                    seen = now_seen
                    if gone:
                        out.append(_event("remove", gone))
                    if changed:
                        # Oldest first, so the page prepends each and ends with the newest on top.
                        out.append(_event("upsert", changed[::-1]))
                if out:
                    quiet = 0.0
                    yield b"".join(out)
                else:
                    quiet += STREAM_TICK
                    if quiet >= STREAM_KEEPALIVE:
                        quiet = 0.0
                        yield b": keep-alive\n\n"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closing.wait(), STREAM_TICK)
        finally:
            self.open -= 1
