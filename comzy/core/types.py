"""Data types that hooks receive and return: the plugin author's vocabulary."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Session numbers: each tunnel gets the next one, so a new session on an alias is told apart from the old.
#: The count starts at a random 52-bit value so that numbers are unique across a cluster's nodes
#: too (an edge tells a tunnel's new session on another node from the old one by it), and stays
#: below 2**53, exact in JSON numbers and JavaScript.
_sessions = itertools.count(secrets.randbits(52) + 1)


class Reject(Exception):
    """Raised by a hook to refuse: a registration (``on_register``) or a request
    (``before_forward``, with an HTTP status and body for the visitor). ``plugin`` is set by the
    core to the name of the plugin whose ``before_forward`` raised it."""

    def __init__(self, reason: str, status: int = 403, body: bytes | str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.body = body if body is not None else reason + "\n"
        self.headers = headers or []
        self.plugin: str | None = None


@dataclass(slots=True)
class Registration:
    """An agent's request for a tunnel, as ``on_register`` hooks see it.

    ``agent_data`` is what the agent sent for plugins (HELLO ``plugins``), one dict per plugin
    name: a plugin reads its own as ``registration.agent_data.get("<its name>")``. It is
    untrusted input from whoever connects, checked only to be small JSON data (at most 16 KiB):
    validate it before use, and never trust it to say who the agent is.

    Hooks may set ``alias`` (to grant a name), ``user`` (who the agent is),
    ``expires_at`` (unix time the tunnel ends) and append to ``notices``. ``metadata`` holds one
    dict per plugin, keyed by the plugin's name (see :meth:`plugin_state`); it becomes
    ``Tunnel.metadata``.

    ``required`` names the plugins the agent needs to enforce its policy (HELLO ``require``): a
    policy plugin that takes this tunnel's policy on calls :meth:`enforce` with its own name, and
    the core refuses the registration when a required plugin did not (fail closed).
    """

    port: int
    requested_alias: str | None
    token: str | None
    client_address: str
    agent_version: str
    resume_secret: str | None = None
    alias: str | None = None
    user: str | None = None
    expires_at: float | None = None
    notices: list[str] = field(default_factory=list)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    agent_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    required: list[str] = field(default_factory=list)
    enforced: list[str] = field(default_factory=list)

    def plugin_state(self, plugin: str) -> dict[str, Any]:
        """The dict that plugin ``plugin`` (its ``COMZY_PLUGINS`` name) keeps on this tunnel, made
        on first use. A plugin writes only its own; it reads another's only as that plugin documents."""
        return self.metadata.setdefault(plugin, {})

    def enforce(self, plugin: str) -> None:
        """Confirm that plugin ``plugin`` (its ``COMZY_PLUGINS`` name) enforces this tunnel's policy:
        the agent is told so in WELCOME ``enforced``. Call it only once the policy is in place."""
        if plugin not in self.enforced:
            self.enforced.append(plugin)

    def take_policy(self, plugin: str, parse: Callable[[Any], dict[str, Any]],
                    label: str | None = None) -> dict[str, Any] | None:
        """A policy plugin's whole ``on_register`` for the usual case: read what the agent sent for
        ``plugin`` (its ``COMZY_PLUGINS`` name), check it with ``parse``, keep what ``parse`` returns
        in :meth:`plugin_state` and :meth:`enforce` the policy.

        ``parse`` takes the agent's untrusted data and returns the state to keep on the tunnel
        (JSON-like values: it crosses a cluster), or raises ValueError saying what is wrong; that
        refuses the registration with ``Reject("<label>: the agent's data is not valid (<what>); ...")``
        (``label`` defaults to ``plugin``), and nothing is kept or enforced. Returns the state kept,
        or None when the agent sent nothing for ``plugin`` (the tunnel has no such policy)."""
        data = self.agent_data.get(plugin)
        if data is None:
            return None
        try:
            state = parse(data)
        except ValueError as exc:
            raise Reject(f"{label or plugin}: the agent's data is not valid ({exc}); use a matching comzy agent") \
                from None
        self.plugin_state(plugin).update(state)
        self.enforce(plugin)
        return state


@dataclass(slots=True)
class Tunnel:
    """A live tunnel: one alias served by one agent session.

    ``session`` is unique within the server process, and across a cluster: when an agent reconnects
    or its owner takes the alias over, the new tunnel has the same alias and a new session.
    ``node`` is the id of the control node that serves it ("" in role ``all``).

    The core keeps the numbers up to date; plugins only read them: ``requests``, ``bytes_in`` and
    ``bytes_out`` count finished exchanges, ``streams_open`` the visitor requests and WebSockets in
    flight now, and ``websockets_open`` the WebSockets among them. ``metadata`` holds one dict per
    plugin, keyed by the plugin's name (see :meth:`plugin_state`).
    """

    alias: str
    public_url: str
    port: int
    client_address: str
    user: str | None = None
    expires_at: float | None = None
    created_at: float = field(default_factory=time.time)
    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    streams_open: int = 0
    websockets_open: int = 0
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    session: int = field(default_factory=lambda: next(_sessions))
    node: str = ""
    #: The policy plugins that enforce this tunnel's policy (WELCOME ``enforced``). A node that
    #: serves its visitors without one of them enabled refuses them: an edge configured apart
    #: from the control node must not let a protected tunnel through unprotected (fail closed).
    policies: list[str] = field(default_factory=list)
    #: The plugins' public summaries of this tunnel's policy (``describe_policy``) as the control
    #: node holding it gave them, on a copy from another node (``all_tunnels``), whose ``metadata``
    #: is left behind; None on a node's own tunnels (``ServerContext.describe_policies`` asks the hook).
    policy_summary: dict[str, Any] | None = None
    #: The agent's name for this tunnel when one session carries several (HELLO ``tunnels``, e.g.
    #: ``web``): the REQUEST names it so the agent picks the local port. None: a one-tunnel session.
    name: str | None = None

    def plugin_state(self, plugin: str) -> dict[str, Any]:
        """The dict that plugin ``plugin`` keeps on this tunnel (what it put on the registration's
        ``plugin_state(plugin)``), made on first use."""
        return self.metadata.setdefault(plugin, {})

    def stream_opened(self, websocket: bool) -> None:
        """The core's bookkeeping (the edge, or a control node's relay): a stream to this tunnel began."""
        self.streams_open += 1
        if websocket:
            self.websockets_open += 1

    def stream_finished(self, websocket: bool, bytes_in: int, bytes_out: int) -> None:
        """The core's bookkeeping: a stream :meth:`stream_opened` counted ended, with its bytes."""
        self.streams_open -= 1
        if websocket:
            self.websockets_open -= 1
        self.requests += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def to_view(self, metadata: bool = True) -> dict[str, Any]:
        """This tunnel as it crosses the cluster: a msgpack-ready map that :meth:`from_view` turns back
        into a ``Tunnel``. A lookup's answer carries ``metadata`` (the edge enforces the policies with
        it); a view for operators (``all_tunnels``) does not (``metadata=False``): it may hold secrets
        such as password hashes, and goes with the plugins' summaries instead (``policy_summary``)."""
        view = {"alias": self.alias, "url": self.public_url, "port": self.port, "client": self.client_address,
                "user": self.user, "since": self.created_at, "expires_at": self.expires_at,
                "metadata": self.metadata if metadata else {}, "session": self.session, "requests": self.requests,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "streams_open": self.streams_open,
                "websockets_open": self.websockets_open, "policies": self.policies}
        if self.policy_summary is not None:
            view["policy_summary"] = self.policy_summary
        if self.name is not None:  # one of several tunnels on its agent's session
            view["name"] = self.name
        return view

    @classmethod
    def from_view(cls, view: dict[str, Any], node: str) -> Tunnel:
        """The snapshot of a tunnel that control node ``node`` described with :meth:`to_view`.
        Another node's message is checked, not trusted: raises ValueError, TypeError or KeyError."""
        alias = view["alias"]
        if not isinstance(alias, str):
            raise TypeError("alias is not a string")
        metadata = view.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise TypeError("metadata is not a map")
        expires = view.get("expires_at")
        user = view.get("user")
        policies = view.get("policies") or []
        if not isinstance(policies, list) or not all(isinstance(name, str) for name in policies):
            raise TypeError("policies is not a list of plugin names")
        summary = view.get("policy_summary")
        if summary is not None and (not isinstance(summary, dict) or not all(isinstance(k, str) for k in summary)):
            raise TypeError("policy_summary is not a map of plugin names")
        name = view.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 64):
            raise TypeError("name is not a tunnel name")
        return cls(alias=alias, public_url=str(view.get("url") or ""), port=int(view.get("port") or 0),
                   client_address=str(view.get("client") or ""), user=str(user) if user is not None else None,
                   expires_at=float(expires) if expires is not None else None,
                   created_at=float(view.get("since") or time.time()), requests=int(view.get("requests") or 0),
                   bytes_in=int(view.get("bytes_in") or 0), bytes_out=int(view.get("bytes_out") or 0),
                   streams_open=int(view.get("streams_open") or 0),
                   websockets_open=int(view.get("websockets_open") or 0), metadata=metadata,
                   session=int(view["session"]), node=node, policies=list(policies), policy_summary=summary,
                   name=name)


@dataclass(slots=True)
class ForwardRequest:
    """A visitor's request on its way to an agent; ``before_forward`` may edit ``headers``."""

    alias: str
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    host: str
    client: str
    scheme: str
    websocket: bool = False

    @property
    def path(self) -> str:
        """The target's path as text (without the query)."""
        return self.target.split(b"?", 1)[0].decode("latin-1")

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        key = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None


@dataclass(slots=True)
class ForwardResponse:
    """The local service's response head on its way to the visitor, as ``before_response`` sees it:
    ``status`` (read it; changing it is not supported) and ``headers``, an ordered list of
    ``(name, value)`` byte pairs without hop-by-hop headers, which the hook may edit in place."""

    status: int
    headers: list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Exchange:
    """A finished request/response, given to ``after_response``."""

    request: ForwardRequest
    tunnel: Tunnel
    status: int
    bytes_in: int
    bytes_out: int
    started_at: float
    duration: float
    error: str | None = None


@dataclass(slots=True, frozen=True)
class LoggedRequest:
    """One request as a request log kept it: what ``recent_requests`` answers with.

    ``path`` is the target without its query string; ``client`` is the visitor's address (None
    when the log does not keep it); ``port`` is the agent's local port (None when not kept).
    """

    alias: str
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    started_at: float
    duration: float
    client: str | None = None
    port: int | None = None
