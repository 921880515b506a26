"""Header rules a tunnel's agent asked for (``--request-header-add 'NAME: VALUE'``,
``--request-header-remove NAME`` and the two ``--response-header-*`` flags), applied by the server:
request rules before the request goes to the agent, response rules to the local service's
response head on its way back (``before_response``).

In each direction every field of each removed name goes first (names are case-insensitive), then
the added fields are appended in order, so removing and adding a name replaces it. Hop-by-hop and
framing headers, Host and the WebSocket handshake's are refused at registration: the tunnel
routes and frames messages with them.
"""

from __future__ import annotations

import re
from typing import Any

from comzy import ForwardRequest, ForwardResponse, Registration, Tunnel, TunnelCache, hookimpl

#: This plugin's name: the key of the agent's data, of the tunnel's state and of the policy it confirms.
NAME = "headers"
#: The most names (or name and value pairs) in each of the four lists.
MAX_RULES = 32
MAX_NAME = 128
MAX_VALUE = 2048
#: The names and values of all the added headers together.
MAX_BYTES = 8192
#: Headers a rule may not add or remove: hop-by-hop and framing headers (the edge and the HTTP
#: servers frame every message from them), Host (it routes the request) and the WebSocket
#: handshake's (the agent redoes it). The stock agent refuses the same names.
FRAMING_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te",
    "trailer", "upgrade", "proxy-authenticate", "proxy-authorization", "sec-websocket-key",
    "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept", "sec-websocket-protocol",
})
#: Rules compiled (to bytes) for the tunnels seen lately, by session number: the state on the tunnel
#: is plain data that crosses a cluster. At most this many, the least recently used go first.
COMPILED_TUNNELS = 4096
#: One direction's rules: the names to remove and the fields to add, as bytes.
Edits = tuple[frozenset[bytes], tuple[tuple[bytes, bytes], ...]]

#: An RFC 9110 field name (a token) and field value (visible ASCII, with spaces and tabs inside only).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")


def parse_policy(data: Any) -> dict[str, dict[str, list[Any]]]:
    """The state kept on the tunnel, from the agent's untrusted data; ValueError says what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("it must be a map {request, response}")
    state: dict[str, dict[str, list[Any]]] = {}
    size = 0
    for side in ("request", "response"):
        edits = data.get(side, {})
        if not isinstance(edits, dict):
            raise ValueError(f"'{side}' must be a map {{add, remove}}")
        add, remove = edits.get("add", []), edits.get("remove", [])
        if not isinstance(add, list) or not isinstance(remove, list) or len(add) > MAX_RULES or len(remove) > MAX_RULES:
            raise ValueError(f"'{side}.add' and '{side}.remove' must be lists of at most {MAX_RULES}")
        pairs = []
        for pair in add:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"each of '{side}.add' must be a [name, value] pair")
            name, value = _name(pair[0]), pair[1]
            if not isinstance(value, str) or len(value) > MAX_VALUE or not _FIELD_VALUE.fullmatch(value):
                raise ValueError(f"the value of {name} must be printable ASCII without surrounding spaces, at most "
                                 f"{MAX_VALUE} characters")
            size += len(name) + len(value)
            pairs.append([name, value])
        state[side] = {"add": pairs, "remove": list(dict.fromkeys(_name(name) for name in remove))}
    if size > MAX_BYTES:
        raise ValueError(f"the added headers come to {size} characters, over {MAX_BYTES}")
    if not any(edits["add"] or edits["remove"] for edits in state.values()):
        raise ValueError("it has no header to add or remove")
    return state


def _name(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME or not _TOKEN.fullmatch(value):
        raise ValueError(f"a header name must be an RFC 9110 token of 1 to {MAX_NAME} characters")
    name = value.lower()
    if name in FRAMING_HEADERS:
        raise ValueError(f"{name} cannot be added or removed: the tunnel routes and frames messages with it")
    return name


def compile_edits(edits: dict[str, list[Any]]) -> Edits:
    """One direction's rules from the tunnel's state (checked at registration), as bytes."""
    return (frozenset(name.encode() for name in edits["remove"]),
            tuple((name.encode(), value.encode()) for name, value in edits["add"]))


def apply(headers: list[tuple[bytes, bytes]], edits: Edits) -> None:
    """Remove every field of the removed names (any case), then append the added fields; in place."""
    removed, added = edits
    if removed:
        headers[:] = [(name, value) for name, value in headers if name.lower() not in removed]
    headers.extend(added)


class Headers:
    """Applies the header rules of the tunnels whose agents ask for them."""

    def __init__(self) -> None:
        #: (request, response) edits of each tunnel, compiled once per session.
        self._rules: TunnelCache[dict[str, Any], tuple[Edits, Edits]] = TunnelCache(
            lambda state: (compile_edits(state["request"]), compile_edits(state["response"])), COMPILED_TUNNELS)

    @hookimpl
    def on_register(self, registration: Registration) -> None:
        """Keep the agent's header rules on the tunnel and confirm the policy."""
        registration.take_policy(NAME, parse_policy, "headers")

    @hookimpl
    def describe_policy(self, tunnel: Tunnel) -> dict[str, Any] | None:
        """The header names each direction adds and removes, for operators' views (/api/tunnels, the
        dashboard): never the values, which may be secrets (a token for the local app)."""
        state = tunnel.metadata.get(NAME)
        if not state:
            return None
        summary: dict[str, Any] = {}
        for side in ("request", "response"):
            summary[f"{side}_remove"] = list(state[side]["remove"])
            summary[f"{side}_add"] = [name for name, _ in state[side]["add"]]
        return summary

    @hookimpl(trylast=True)
    def before_forward(self, request: ForwardRequest, tunnel: Tunnel) -> None:
        """Edit the request's headers. Last of the policies: a refused visitor costs no edit, and a
        header added here (say, the local app's own Authorization) is never mistaken for the
        visitor's by a check that runs before it (basic_auth)."""
        state = tunnel.metadata.get(NAME)
        if state:
            apply(request.headers, self._rules.get(tunnel, state)[0])

    @hookimpl
    def before_response(self, response: ForwardResponse, tunnel: Tunnel) -> None:
        """Edit the local service's response headers on their way to the visitor."""
        state = tunnel.metadata.get(NAME)
        if state:
            apply(response.headers, self._rules.get(tunnel, state)[1])
