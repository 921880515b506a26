"""A link session an edge opens reads its streams' frames from their bytes (link.take_stream_frames).

In process, the same messages go to a link session with and without ``take_frames``, and every
stream's state, the events its consumer was told (once per link message, with everything the
message brought), what the session wrote and how it ended must be the same. The end-to-end paths
(a real edge, control node and agent) are tests/cluster/test_taskless_edge.py's and
test_edge_cluster.py's; tests/cluster/test_link.py runs real links with it.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from comzy.core import protocol as p
from comzy.core.cluster.link import take_stream_frames
from comzy.core.session import Session
from comzy.core.stream import Stream
from tests.cluster.test_relay_bytes import Recorder, data, frame

pytestmark = pytest.mark.anyio

WINDOW = 65536


class Link:
    """A link session holding streams 1 and 3, as an edge's holds its visitors' streams."""

    def __init__(self, take: bool) -> None:
        self.ws = Recorder()
        self.session = Session(self.ws, window=WINDOW, peer_window=WINDOW, name="link")  # type: ignore[arg-type]
        assert self.session._attach()
        self.session.take_frames = functools.partial(take_stream_frames, self.session) if take else None
        self.events: list[tuple[int, Any]] = []
        self.streams = [self.session.open_stream(), self.session.open_stream()]
        for stream in self.streams:
            stream.on_event = functools.partial(self._told, stream)

    def _told(self, stream: Stream) -> None:
        # What a consumer without a task sees when it is told: the head, what it reads, the end.
        head = stream.head
        self.events.append((stream.id, (
            None if head is None else (head.status, head.headers),  # type: ignore[attr-defined]
            stream.receive_nowait(1 << 20) if stream.buffered else None,
            stream.remote_ended, stream.credit,
            None if stream.reset_error is None else (stream.reset_error.code, stream.reset_error.message))))

    def feed(self, message: bytes) -> list[Any]:
        """One link message; what the streams, the session and its consumer then show."""
        self.session._link_message(message)
        self.session._flush()
        ended = self.session._ended
        result = [self.events[:], self.ws.written[:], sorted(self.session.streams),
                  repr(ended.exception()) if ended is not None and ended.done() else None]
        self.events.clear()
        self.ws.written.clear()
        return result


def response(stream: int, status: int = 200) -> bytes:
    return p.encode(p.FrameType.RESPONSE, stream, p.ResponseHead(status, [(b"a", b"b")]).to_payload())


END_1, END_3 = frame(p.FrameType.END, 1), frame(p.FrameType.END, 3)
WINDOW_1 = frame(p.FrameType.WINDOW, 1, b"\x00\x00\x10\x00")
#: Conversations: the link messages, in order.
CONVERSATIONS: dict[str, list[bytes]] = {
    "a small answer": [response(1) + data(1, b"x" * 1024) + END_1],
    "two answers in one message": [response(1) + response(3, 204) + data(1, b"x") + END_3 + END_1],
    "a head, then a body in pieces": [response(1), data(1, b"a"), data(1, b"b" * 40000) + data(1, b"c") + END_1],
    "credit and resets": [WINDOW_1 + p.encode_reset(3, p.ResetCode.CANCEL, "gone"), response(1) + WINDOW_1,
                          frame(p.FrameType.RESET, 1, b"\x00\x00\x00\x07refused \xff")],  # not UTF-8: replaced
    "a ping between": [response(1) + p.encode(p.FrameType.PING, 0, b"12345678") + END_1],
    "an unknown stream first": [data(9, b"x") + response(1) + END_1],
    "an unknown stream after": [response(1) + data(9, b"x") + END_1],
    "an empty message": [b""],
    "end with a payload": [response(1) + frame(p.FrameType.END, 1, b"x")],
    "window of 0": [frame(p.FrameType.WINDOW, 1, b"\x00\x00\x00\x00")],
    "window of 3 bytes": [frame(p.FrameType.WINDOW, 1, b"\x00\x00\x01")],
    "reset without a code": [frame(p.FrameType.RESET, 1, b"\x00\x00")],
    "data too large": [response(1) + data(1, b"x" * (p.MAX_DATA_FRAME + 1))],
    "data on stream 0": [data(0, b"x")],
    "truncated": [response(1) + data(1, b"xyz")[:-1]],
    "a truncated header": [response(1) + END_1[:5]],
    "unknown type": [response(1) + p.HEADER.pack(0, 99, 0, 1)],
    "response not msgpack": [frame(p.FrameType.RESPONSE, 1, b"\xc1") + END_3],
    "response out of range": [p.encode(p.FrameType.RESPONSE, 1, {"s": 1000, "h": []})],
    "overrun": [response(1) + data(1, b"x" * 60000) + data(1, b"y" * 6000)],
    "data after end": [response(1) + END_1 + data(1, b"x")],
    "empty messages": [response(1) + data(1, b"", p.FLAG_FIN) * 1030],
    "empty pieces": [response(1) + data(1, b"") * 3 + END_1],
    "a websocket close": [response(1) + p.encode(p.FrameType.WS_CLOSE, 1, {"code": 4000, "reason": "r"}) + END_3],
    "a request on the link": [p.encode(p.FrameType.REQUEST, 5, p.RequestHead("GET", b"/", []).to_payload())],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
async def test_take_stream_frames_does_what_the_sessions_own_path_does(name: str) -> None:
    links = [Link(take=True), Link(take=False)]
    results: list[list[Any]] = [[], []]
    for link, result in zip(links, results, strict=True):
        for message in CONVERSATIONS[name]:
            result.append(link.feed(message))
    assert results[0] == results[1]


async def test_a_small_answer_is_told_once_with_its_head_body_and_end() -> None:
    """The consumer is called once for the three frames of a small answer, with all of them there
    (the session's events_due covers the frames take_frames handles too)."""
    link = Link(take=True)
    result = link.feed(response(1) + data(1, b"hello") + END_1)
    assert result[0] == [(1, ((200, [(b"a", b"b")]), b"hello", True, WINDOW, None))]
