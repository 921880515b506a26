"""The control messages of the agent <-> server protocol: HELLO, WELCOME, REJECT, GOAWAY, NOTICE.

One dataclass per message, used by both ends: ``to_payload()`` builds the msgpack map the frame
carries, ``from_payload()`` reads one and checks every field's type and bounds, so a malformed
field is one ProtocolError worded in one place. Keys a receiver does not know are ignored (a
newer peer may add optional ones); the keys are those of protocol v1, documented in
docs/protocol.md. Like comzy/core/protocol.py (the frame codec), nothing here touches a socket.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

import msgpack

from comzy.core.protocol import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    MIN_WINDOW,
    PROTOCOL_VERSION,
    Frame,
    FrameType,
    ProtocolError,
    encode,
)

#: HELLO's text fields (agent, subdomain, resume alias and secret) are at most this long; the
#: token at most MAX_TOKEN. Anyone can send a HELLO: nothing it carries reaches a log unbounded.
MAX_HELLO_TEXT = 255
MAX_TOKEN = 4096
#: A resume secret shorter than this is ignored: a short secret could be guessed.
MIN_RESUME_SECRET = 16
#: HELLO ``plugins``: at most this many bytes (msgpack-encoded), containers nested at most this
#: deep inside one plugin's map. Plugins' data is small (a credential, a setting or two).
MAX_PLUGIN_DATA = 16 * 1024
MAX_PLUGIN_DATA_DEPTH = 8
#: A plugin's name as HELLO ``plugins`` keys it (the names COMZY_PLUGINS lists).
PLUGIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: HELLO ``require`` and WELCOME ``enforced`` name at most this many plugins (policies).
MAX_POLICIES = 32
#: HELLO ``tunnels``: at most this many tunnels on one session (each also counts against every
#: per-user limit the server's plugins keep, as if it came on its own connection).
MAX_SESSION_TUNNELS = 16
#: A tunnel's name in HELLO ``tunnels`` and REQUEST ``tn`` (the agent's name: ``web``, ``api``).
TUNNEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A server's heartbeat interval past an hour is a broken server (and a timer past ~1e9 s overflows).
MAX_HEARTBEAT = 3600.0
#: The last second of year 9999: an expiry beyond it cannot be shown as a date (the agent prints it).
LAST_UNIX_TIME = 253402300799.0
_MISSING = object()


class VersionMismatch(ProtocolError):
    """A HELLO for another protocol version; the message says what to install."""

    def __init__(self, version: Any) -> None:
        shown = version if isinstance(version, int) and not isinstance(version, bool) else repr(version)[:20]
        super().__init__(f"this server speaks protocol v{PROTOCOL_VERSION} but the agent speaks v{shown}; "
                         "install a matching comzy agent (pip install --upgrade comzy)")
        self.version = version


class _Fields:
    """Reads one control message's map: every malformed field is a ProtocolError worded alike."""

    def __init__(self, kind: str, payload: dict[str, Any]) -> None:
        self.kind = kind
        self.payload = payload

    def fail(self, key: str, expected: str, value: Any) -> NoReturn:
        # The type, or a number itself: never an agent's text, which would reach logs unescaped.
        got = repr(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__
        raise ProtocolError(f"malformed {self.kind}: '{key}' must be {expected} (got {got})")

    def text(self, key: str, default: Any = _MISSING, limit: int | None = None, optional: bool = False) -> Any:
        """A str (or None when ``optional``), at most ``limit`` characters; ``default`` when absent."""
        value = self.payload.get(key, default)
        if value is _MISSING:
            self.fail(key, "a string", None)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(key, "a string or nil" if optional else "a string", value)
        if limit is not None and len(value) > limit:
            raise ProtocolError(f"malformed {self.kind}: '{key}' is longer than {limit} characters")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        """An int within ``low``..``high``; ``default`` when absent."""
        value = self.payload.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(key, f"an integer from {low} to {high}", value)
        return value

    def number(self, key: str, default: float | None, optional: bool = False, positive: bool = False,
               most: float = math.inf) -> Any:
        """A finite int or float up to ``most`` (or None when ``optional``); ``default`` when absent."""
        value = self.payload.get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0) or value < 0 or value > most:
            least = "a positive number" if positive else "a number >= 0"
            self.fail(key, least if most == math.inf else f"{least} up to {most:.0f}", value)
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        """A bool; ``default`` when absent."""
        value = self.payload.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def texts(self, key: str) -> list[str]:
        """A list of str; empty when absent."""
        value = self.payload.get(key) or []
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(key, "a list of strings", value)
        return value


class ControlMessage:
    """A message on stream 0 other than PING/PONG: one dataclass per frame type."""

    __slots__ = ()
    FRAME: ClassVar[FrameType]

    def to_payload(self) -> dict[str, Any]:
        """The msgpack map sent on the wire."""
        raise NotImplementedError

    def encode(self) -> bytes:
        """The whole frame, ready to send."""
        return encode(self.FRAME, 0, self.to_payload())


@dataclass(slots=True)
class Hello(ControlMessage):
    """HELLO (agent -> server, the first frame): the agent asks for a tunnel.

    Everything in it is untrusted input: ``from_payload`` checks each field's type and bounds.
    ``plugins`` holds data for server plugins, keyed by plugin name (see ``check_plugin_data``).
    ``require`` names the plugins that must enforce this tunnel's policy (fail closed): the server
    refuses the registration unless each of them is enabled and confirms it (WELCOME ``enforced``).
    """

    FRAME: ClassVar[FrameType] = FrameType.HELLO
    agent: str
    port: int
    subdomain: str | None = None
    token: str | None = None
    window: int = DEFAULT_WINDOW
    resume_alias: str | None = None
    resume_secret: str | None = None
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    require: list[str] = field(default_factory=list)
    #: Several tunnels on this one session (empty: one tunnel, from the keys above). A server that
    #: knows the key ignores the top-level port, subdomain, resume, plugins and require then.
    tunnels: list[TunnelRequest] = field(default_factory=list)

    def to_payload(self) -> dict[str, Any]:
        """The msgpack map sent on the wire (``plugins``, ``require``, ``tunnels`` only when there are some)."""
        payload: dict[str, Any] = {"v": PROTOCOL_VERSION, "agent": self.agent, "port": self.port,
                                   "subdomain": self.subdomain, "token": self.token, "window": self.window}
        resume = {k: v for k, v in (("alias", self.resume_alias), ("secret", self.resume_secret)) if v is not None}
        if resume:
            payload["resume"] = resume
        if self.plugins:
            payload["plugins"] = self.plugins
        if self.require:
            payload["require"] = list(self.require)
        if self.tunnels:
            payload["tunnels"] = [tunnel.to_payload() for tunnel in self.tunnels]
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Hello:
        """Parse a HELLO; VersionMismatch for another version, ProtocolError for a malformed field."""
        version = payload.get("v")
        if isinstance(version, bool) or version != PROTOCOL_VERSION:  # True == 1 in Python
            raise VersionMismatch(version)
        fields = _Fields("HELLO", payload)
        window = payload.get("window", DEFAULT_WINDOW)
        if isinstance(window, bool) or not isinstance(window, int):
            fields.fail("window", "an integer", window)
        resume = payload.get("resume")
        if resume is not None and not isinstance(resume, dict):
            fields.fail("resume", "a map {alias, secret}", resume)
        resumed = _Fields("HELLO resume", resume or {})
        secret = resumed.text("secret", None, MAX_HELLO_TEXT, optional=True)
        raw_plugins = payload.get("plugins")
        try:
            plugins = {} if raw_plugins is None else check_plugin_data(raw_plugins)
        except ValueError as exc:
            raise ProtocolError(f"malformed HELLO 'plugins': {exc}") from None
        return cls(
            agent=fields.text("agent", "?", MAX_HELLO_TEXT),
            port=fields.integer("port", 0, 0, 65535),
            subdomain=fields.text("subdomain", None, MAX_HELLO_TEXT, optional=True),
            token=fields.text("token", None, MAX_TOKEN, optional=True),
            # Out of range: the documented default, as every v1 server has done.
            window=window if MIN_WINDOW <= window <= MAX_WINDOW else DEFAULT_WINDOW,
            resume_alias=resumed.text("alias", None, MAX_HELLO_TEXT, optional=True),
            resume_secret=secret if secret is not None and len(secret) >= MIN_RESUME_SECRET else None,
            plugins=plugins,
            require=_plugin_names(fields, "require"),
            tunnels=_tunnel_requests(payload.get("tunnels")),
        )


@dataclass(slots=True)
class TunnelRequest:
    """One tunnel of a HELLO that asks for several (HELLO ``tunnels``): the keys a single-tunnel
    HELLO has at its top level, plus the agent's ``name`` for it (REQUEST ``tn`` names it back)."""

    name: str
    port: int = 0
    subdomain: str | None = None
    resume_alias: str | None = None
    resume_secret: str | None = None
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    require: list[str] = field(default_factory=list)

    def to_payload(self) -> dict[str, Any]:
        """The map this tunnel is in HELLO ``tunnels``."""
        payload: dict[str, Any] = {"name": self.name, "port": self.port, "subdomain": self.subdomain}
        if self.resume_alias is not None and self.resume_secret is not None:
            payload["resume"] = {"alias": self.resume_alias, "secret": self.resume_secret}
        if self.plugins:
            payload["plugins"] = self.plugins
        if self.require:
            payload["require"] = list(self.require)
        return payload

    @classmethod
    def from_payload(cls, payload: Any, index: int) -> TunnelRequest:
        """Parse HELLO ``tunnels[index]``; ProtocolError naming it and the key for a malformed one."""
        where = f"HELLO tunnels[{index}]"
        if not isinstance(payload, dict):
            raise ProtocolError(f"malformed {where}: it must be a map")
        fields = _Fields(where, payload)
        name = fields.text("name", limit=64)
        if not TUNNEL_NAME.fullmatch(name):
            raise ProtocolError(f"malformed {where}: 'name' must be 1 to 64 letters, digits, '_', '.' or '-'")
        resume = payload.get("resume")
        if resume is not None and not isinstance(resume, dict):
            fields.fail("resume", "a map {alias, secret}", resume)
        resumed = _Fields(f"{where} resume", resume or {})
        secret = resumed.text("secret", None, MAX_HELLO_TEXT, optional=True)
        try:
            plugins = {} if payload.get("plugins") is None else check_plugin_data(payload["plugins"])
        except ValueError as exc:
            raise ProtocolError(f"malformed {where} 'plugins': {exc}") from None
        return cls(
            name=name,
            port=fields.integer("port", 0, 0, 65535),
            subdomain=fields.text("subdomain", None, MAX_HELLO_TEXT, optional=True),
            resume_alias=resumed.text("alias", None, MAX_HELLO_TEXT, optional=True),
            resume_secret=secret if secret is not None and len(secret) >= MIN_RESUME_SECRET else None,
            plugins=plugins,
            require=_plugin_names(fields, "require"),
        )


def _tunnel_requests(value: Any) -> list[TunnelRequest]:
    """HELLO ``tunnels``: absent or nil for one tunnel, else 1 to MAX_SESSION_TUNNELS with distinct names."""
    if value is None:
        return []
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SESSION_TUNNELS:
        got = f"{len(value)} of them" if isinstance(value, list) else type(value).__name__
        raise ProtocolError(f"malformed HELLO: 'tunnels' must be a list of 1 to {MAX_SESSION_TUNNELS} tunnels "
                            f"(got {got}); this server takes at most {MAX_SESSION_TUNNELS} on one connection")
    tunnels = [TunnelRequest.from_payload(item, index) for index, item in enumerate(value)]
    names = [tunnel.name for tunnel in tunnels]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ProtocolError(f"malformed HELLO: 'tunnels' names {', '.join(repeated)} more than once")
    return tunnels


def _plugin_names(fields: _Fields, key: str) -> list[str]:
    """A list of at most MAX_POLICIES plugin names, without repeats (empty when absent)."""
    names = fields.texts(key)
    if len(names) > MAX_POLICIES or not all(PLUGIN_NAME.fullmatch(name) for name in names):
        fields.fail(key, f"a list of at most {MAX_POLICIES} plugin names", names)
    return list(dict.fromkeys(names))


def check_plugin_data(value: Any) -> dict[str, dict[str, Any]]:
    """``value`` if it is valid HELLO ``plugins`` data, else ValueError saying what is wrong.

    A map from plugin name to a map of JSON values (str keys; str, int, float, bool, nil, lists,
    maps), within MAX_PLUGIN_DATA bytes and MAX_PLUGIN_DATA_DEPTH levels.
    """
    if not isinstance(value, dict):
        raise ValueError("it must be a map from plugin name to a map")
    try:
        # First: the walk below then never visits more than a small document.
        size = len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"it holds a value that is not JSON data ({exc})") from None
    if size > MAX_PLUGIN_DATA:
        raise ValueError(f"it is {size} bytes encoded, over the limit of {MAX_PLUGIN_DATA}")
    for name, data in value.items():
        if not isinstance(name, str) or not PLUGIN_NAME.fullmatch(name):
            raise ValueError("its keys must be plugin names (letters, digits, '_', '.', '-'; at most 64)")
        if not isinstance(data, dict):
            raise ValueError(f"'{name}' must be a map (a JSON object)")
        _check_json(data, name, 1)
    return value


def _check_json(value: Any, where: str, depth: int) -> None:
    """Check one value ``depth`` containers deep (a plugin's own map is at depth 1)."""
    if isinstance(value, (dict, list, tuple)) and depth > MAX_PLUGIN_DATA_DEPTH:
        raise ValueError(f"'{where}' nests deeper than {MAX_PLUGIN_DATA_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"'{where}' has a key that is not a string")
            _check_json(item, f"{where}.{key}"[:200], depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_json(item, f"{where}[]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"'{where}' holds {value}, which JSON cannot carry")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"'{where}' holds a {type(value).__name__}, which is not JSON data")


@dataclass(slots=True)
class Welcome(ControlMessage):
    """WELCOME (server -> agent): the tunnel is up at ``url``.

    ``enforced`` names the plugins that confirmed they enforce this tunnel's policy (those the
    HELLO listed in ``require``). A server older than the key sends none: an agent that required a policy
    must then refuse to serve (fail closed).
    """

    FRAME: ClassVar[FrameType] = FrameType.WELCOME
    alias: str
    url: str
    resume_secret: str | None = None
    heartbeat: float = 10.0  #: the server's heartbeat interval, in seconds
    window: int = DEFAULT_WINDOW  #: the server's per-stream receive window
    expires_at: float | None = None  #: unix time the tunnel ends, if it does
    user: str | None = None
    notices: list[str] = field(default_factory=list)
    server: str = "?"  #: the server's software, e.g. comzy/0.1.0
    enforced: list[str] = field(default_factory=list)
    #: One per tunnel of a HELLO ``tunnels``, in its order (the top-level keys then repeat the
    #: first). Empty from a server that does not know HELLO ``tunnels``: the agent must not serve.
    tunnels: list[TunnelWelcome] = field(default_factory=list)

    def to_payload(self) -> dict[str, Any]:
        """The msgpack map sent on the wire (``enforced``, ``tunnels`` only when there are some)."""
        payload = {"v": PROTOCOL_VERSION, "server": self.server, "alias": self.alias, "url": self.url,
                   "resume_secret": self.resume_secret, "heartbeat": self.heartbeat, "window": self.window,
                   "expires_at": self.expires_at, "user": self.user, "notices": list(self.notices)}
        if self.enforced:
            payload["enforced"] = list(self.enforced)
        if self.tunnels:
            payload["tunnels"] = [tunnel.to_payload() for tunnel in self.tunnels]
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Welcome:
        """Parse a WELCOME; ProtocolError for a malformed field."""
        fields = _Fields("WELCOME", payload)
        return cls(
            alias=fields.text("alias"),
            url=fields.text("url"),
            resume_secret=fields.text("resume_secret", None, optional=True),
            heartbeat=fields.number("heartbeat", 10.0, positive=True, most=MAX_HEARTBEAT),
            window=fields.integer("window", DEFAULT_WINDOW, MIN_WINDOW, MAX_WINDOW),
            expires_at=fields.number("expires_at", None, optional=True, most=LAST_UNIX_TIME),
            user=fields.text("user", None, optional=True),
            notices=fields.texts("notices"),
            server=fields.text("server", "?"),
            enforced=_plugin_names(fields, "enforced"),
            tunnels=_tunnel_welcomes(payload.get("tunnels")),
        )


@dataclass(slots=True)
class TunnelWelcome:
    """One tunnel of WELCOME ``tunnels``: what a single-tunnel WELCOME says of its tunnel."""

    name: str
    alias: str
    url: str
    resume_secret: str | None = None
    expires_at: float | None = None
    enforced: list[str] = field(default_factory=list)

    def to_payload(self) -> dict[str, Any]:
        """The map this tunnel is in WELCOME ``tunnels``."""
        return {"name": self.name, "alias": self.alias, "url": self.url, "resume_secret": self.resume_secret,
                "expires_at": self.expires_at, "enforced": list(self.enforced)}

    @classmethod
    def from_payload(cls, payload: Any, index: int) -> TunnelWelcome:
        """Parse WELCOME ``tunnels[index]``; ProtocolError for a malformed field."""
        if not isinstance(payload, dict):
            raise ProtocolError(f"malformed WELCOME tunnels[{index}]: it must be a map")
        fields = _Fields(f"WELCOME tunnels[{index}]", payload)
        return cls(
            name=fields.text("name", limit=64),
            alias=fields.text("alias"),
            url=fields.text("url"),
            resume_secret=fields.text("resume_secret", None, optional=True),
            expires_at=fields.number("expires_at", None, optional=True, most=LAST_UNIX_TIME),
            enforced=_plugin_names(fields, "enforced"),
        )


def _tunnel_welcomes(value: Any) -> list[TunnelWelcome]:
    """WELCOME ``tunnels``: none when absent, else at most MAX_SESSION_TUNNELS."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_SESSION_TUNNELS:
        raise ProtocolError(f"malformed WELCOME: 'tunnels' must be a list of at most {MAX_SESSION_TUNNELS}")
    return [TunnelWelcome.from_payload(item, index) for index, item in enumerate(value)]


@dataclass(slots=True)
class Refusal(ControlMessage):
    """REJECT (server -> agent): the registration is refused; the server then closes with 1008.

    ``code``: ``protocol`` (not a valid HELLO), ``version``, ``rejected`` (a plugin or the alias
    rules said no), ``throttled`` (try again after ``retry_after`` seconds) or ``internal``.
    """

    FRAME: ClassVar[FrameType] = FrameType.REJECT
    code: str
    reason: str
    retry_after: float | None = None

    def to_payload(self) -> dict[str, Any]:
        """The msgpack map sent on the wire (``retry_after`` only when set)."""
        payload: dict[str, Any] = {"code": self.code, "reason": self.reason}
        if self.retry_after is not None:
            payload["retry_after"] = self.retry_after
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Refusal:
        """Parse a REJECT; ProtocolError for a malformed field."""
        fields = _Fields("REJECT", payload)
        return cls(fields.text("code", "rejected"), fields.text("reason", "refused"),
                   fields.number("retry_after", None, optional=True))


@dataclass(slots=True)
class GoAway(ControlMessage):
    """GOAWAY (server -> agent): the session is ending; ``reconnect`` says whether to come back."""

    FRAME: ClassVar[FrameType] = FrameType.GOAWAY
    reason: str = "server going away"
    reconnect: bool = True
    #: Only this tunnel of a multi-tunnel session ends (its alias was taken over); the session and
    #: its other tunnels go on. None: the whole session. Sent only on sessions with HELLO ``tunnels``.
    tunnel: str | None = None

    def to_payload(self) -> dict[str, Any]:
        """The msgpack map sent on the wire (``tunnel`` only when set)."""
        payload: dict[str, Any] = {"reason": self.reason, "reconnect": self.reconnect}
        if self.tunnel is not None:
            payload["tunnel"] = self.tunnel
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> GoAway:
        """Parse a GOAWAY; ProtocolError for a malformed field."""
        fields = _Fields("GOAWAY", payload)
        return cls(fields.text("reason", "server going away"), fields.flag("reconnect", True),
                   fields.text("tunnel", None, 64, optional=True))


@dataclass(slots=True)
class Notice(ControlMessage):
    """NOTICE (server -> agent): a line for the user, e.g. an expiry warning."""

    FRAME: ClassVar[FrameType] = FrameType.NOTICE
    message: str
    level: str = "info"  #: ``info`` or ``warning``

    def to_payload(self) -> dict[str, Any]:
        """The msgpack map sent on the wire."""
        return {"level": self.level, "message": self.message}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Notice:
        """Parse a NOTICE; ProtocolError for a malformed field."""
        fields = _Fields("NOTICE", payload)
        return cls(fields.text("message"), fields.text("level", "info"))


_CONTROL_MESSAGES: dict[FrameType, Any] = {
    FrameType.HELLO: Hello, FrameType.WELCOME: Welcome, FrameType.REJECT: Refusal,
    FrameType.GOAWAY: GoAway, FrameType.NOTICE: Notice,
}


def control_message(frame: Frame) -> Hello | Welcome | Refusal | GoAway | Notice:
    """The typed message a control frame carries; ProtocolError for another frame or a bad field."""
    kind = _CONTROL_MESSAGES.get(frame.type)
    if kind is None:
        raise ProtocolError(f"unexpected {frame.type.name} frame")
    message: Hello | Welcome | Refusal | GoAway | Notice = kind.from_payload(frame.payload)
    return message
