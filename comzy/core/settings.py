"""Server settings from the environment (and ``.env``), with the seed's names accepted."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import AliasChoices, Field, SecretBytes, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from comzy.core.aliases import ALIAS_RE
from comzy.core.eventloop import check_choice
from comzy.core.headers import Network, parse_networks
from comzy.core.http_servers import missing_requirement


def _env(name: str, *seed_names: str) -> Any:
    return AliasChoices(name, *seed_names)


def default_data_dir() -> Path:
    """Where the server keeps its data when COMZY_DATA_DIR is unset."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "comzy"


DEFAULT_RESERVED = (
    "www,admin,api,app,dashboard,status,mail,smtp,imap,pop,ftp,ns,ns1,ns2,dns,"
    "cdn,static,assets,docs,help,support,blog,comzy,localhost,root,server,agent,tunnel"
)


class ServerSettings(BaseSettings):
    """Every core setting; each field is read from ``COMZY_<NAME>`` (or the seed name)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    role: Literal["all", "edge", "control"] = Field(
        "all", validation_alias=_env("COMZY_ROLE"),
        description="What this process does: all (the single-process server, no NATS), edge (public listener "
        "only; carries visitors' streams over NATS to the node that holds the tunnel) or control (agent listener "
        "only; holds agent sessions). edge and control need NATS and the nats extra (pip install 'comzy[nats]').")
    host: str = Field("0.0.0.0", validation_alias=_env("COMZY_HOST"),
                      description="Address the public and agent listeners bind.")
    http_port: int = Field(8190, ge=0, le=65535, validation_alias=_env("COMZY_HTTP_PORT", "HTTP_PORT"),
                           description="Public HTTP listener port (visitors).")
    ws_port: int = Field(8191, ge=0, le=65535, validation_alias=_env("COMZY_WS_PORT", "WS_PORT"),
                         description="Agent WebSocket listener port.")
    admin_host: str = Field("127.0.0.1", validation_alias=_env("COMZY_ADMIN_HOST"),
                            description="Address the admin listener binds.")
    admin_port: int = Field(8192, ge=0, le=65535,
                            validation_alias=_env("COMZY_ADMIN_PORT", "ADMIN_WS_PORT"),
                            description="Admin listener port (dashboard, feed, metrics).")
    base_domain: str = Field("localhost", validation_alias=_env("COMZY_BASE_DOMAIN", "BASE_DOMAIN"),
                             description="Domain under which aliases are served.")
    data_dir: Path = Field(default_factory=default_data_dir, validation_alias=_env("COMZY_DATA_DIR"),
                           description="Where the server keeps its data.")
    plugins: str | None = Field(None, validation_alias=_env("COMZY_PLUGINS"),
                                description="Comma list of plugins to enable; unset: all built-ins; "
                                "'none': no plugins.")
    public_url: str | None = Field(None, validation_alias=_env("COMZY_PUBLIC_URL"),
                                   description="Public URL template with {alias}, e.g. "
                                   "https://{alias}.example.com behind a TLS proxy.")
    public_agent_url: str | None = Field(
        None, validation_alias=_env("COMZY_PUBLIC_AGENT_URL"),
        description="The agent listener's URL as agents reach it, e.g. wss://tunnel.example.com behind a TLS proxy; "
        "shown in the start-up hint and by `comzy status`. Unset: ws(s)://HOST:COMZY_WS_PORT.")
    ssl_cert_path: Path | None = Field(None, validation_alias=_env("COMZY_SSL_CERT_PATH", "SSL_CERT_PATH"),
                                       description="TLS certificate (PEM, chain first) for the public and agent "
                                       "listeners; checked at start-up. Empty: no TLS.")
    ssl_key_path: Path | None = Field(None, validation_alias=_env("COMZY_SSL_KEY_PATH", "SSL_KEY_PATH"),
                                      description="TLS private key (PEM, unencrypted) for the public and agent "
                                      "listeners. Empty: no TLS.")
    http_server: Literal["hypercorn", "uvicorn", "uvicorn-direct"] = Field(
        "uvicorn-direct", validation_alias=_env("COMZY_HTTP_SERVER"),
        description="HTTP server of the public listener: uvicorn-direct (uvicorn, HTTP/1.1, serving a request "
        "without a body to a tunnel of this node without ASGI or a task: the least CPU per request), uvicorn "
        "(every request through ASGI) or hypercorn (also HTTP/2 over TLS, about 2.6 times the CPU per request).")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", validation_alias=_env("COMZY_EVENT_LOOP"),
        description="Event loop: auto (uvloop where installed, a dependency on Linux and macOS: less CPU per "
        "request and less latency per hop), uvloop (fail if it is missing) or asyncio (the standard library's).")
    reserved_aliases: str = Field(DEFAULT_RESERVED, validation_alias=_env("COMZY_RESERVED_ALIASES"),
                                  description="Comma list of names no agent may take.")
    allow_punycode_aliases: bool = Field(
        False, validation_alias=_env("COMZY_ALLOW_PUNYCODE_ALIASES"),
        description="Allow aliases with '--' in the third and fourth places: xn--... punycode names, which "
        "browsers show as Unicode look-alikes of other names (xn--pple-43d shows as apple with a Cyrillic a), "
        "and the other prefixes RFC 5891 reserves. Off: agents, users and custom domains are refused them.")
    trusted_proxies: str = Field("", validation_alias=_env("COMZY_TRUSTED_PROXIES"),
                                 description="Comma list of CIDRs (e.g. 127.0.0.1/32 behind nginx on the same host) "
                                 "whose X-Forwarded-For, X-Real-IP and Forwarded headers are kept; a visitor's own "
                                 "are dropped. Unset: none trusted.")
    max_tunnels_per_address: int = Field(
        100, ge=0, validation_alias=_env("COMZY_MAX_TUNNELS_PER_ADDRESS"),
        description="Live tunnels agents at one address may hold on this server (per control node in a cluster); "
        "beyond, a registration is refused saying so. Loopback agents are not counted (a proxy on the same host "
        "without COMZY_TRUSTED_PROXIES would make every agent one address). 0: no limit.")
    max_streams_per_tunnel: int = Field(256, ge=1, validation_alias=_env("COMZY_MAX_STREAMS_PER_TUNNEL"),
                                        description="Concurrent requests per tunnel; beyond: 503.")
    max_request_head: int = Field(65536, ge=1024, validation_alias=_env("COMZY_MAX_REQUEST_HEAD"),
                                  description="Largest request head (bytes); beyond: 431.")
    stream_window: int = Field(256 * 1024, ge=65536, le=16 * 1024 * 1024,
                               validation_alias=_env("COMZY_STREAM_WINDOW"),
                               description="Per-stream flow-control window (bytes).")
    handshake_timeout: float = Field(10.0, gt=0, validation_alias=_env("COMZY_HANDSHAKE_TIMEOUT"),
                                     description="Seconds an agent has to complete HELLO.")
    response_timeout: float = Field(60.0, gt=0, validation_alias=_env("COMZY_RESPONSE_TIMEOUT"),
                                    description="Seconds to wait for a response head before 504.")
    heartbeat_interval: float = Field(10.0, gt=0, validation_alias=_env("COMZY_HEARTBEAT_INTERVAL"),
                                      description="Seconds between heartbeats.")
    heartbeat_timeout: float = Field(30.0, gt=0, validation_alias=_env("COMZY_HEARTBEAT_TIMEOUT"),
                                     description="Seconds of silence after which a peer is dead.")
    shutdown_grace: float = Field(30.0, ge=0, validation_alias=_env("COMZY_SHUTDOWN_GRACE"),
                                  description="Seconds in-flight requests get to finish at shutdown.")
    max_websocket_message: int = Field(16 * 1024 * 1024, ge=1024,
                                       validation_alias=_env("COMZY_MAX_WEBSOCKET_MESSAGE"),
                                       description="Largest proxied WebSocket message (bytes).")
    admin_token: SecretStr | None = Field(None, validation_alias=_env("COMZY_ADMIN_TOKEN"),
                                          description="Token every admin route needs (dashboard, API, metrics); unset: "
                                          "the server makes one and keeps it in COMZY_DATA_DIR/admin_token.")
    log_level: str = Field("INFO", validation_alias=_env("COMZY_LOG_LEVEL"),
                           description="Logging level (DEBUG, INFO, WARNING).")
    trace_hooks: bool = Field(False, validation_alias=_env("COMZY_TRACE_HOOKS"),
                              description="Log every plugin hook call: hook, plugin, duration and outcome "
                              "(logger comzy.trace). For finding a slow or misbehaving plugin; off in production.")
    database_url: SecretStr | None = Field(
        None, validation_alias=_env("COMZY_DATABASE_URL"),
        description="SQLAlchemy URL of the database, e.g. postgresql+asyncpg://user:pw@host/comzy; unset: "
        "MySQL from DB_* when DB_PASSWORD is set, else SQLite comzy.db in COMZY_DATA_DIR.")
    db_host: str = Field("127.0.0.1", validation_alias=_env("COMZY_DB_HOST", "DB_HOST"),
                         description="MySQL/MariaDB host (used when DB_PASSWORD is set).")
    db_port: int = Field(3306, ge=1, le=65535, validation_alias=_env("COMZY_DB_PORT", "DB_PORT"),
                         description="MySQL/MariaDB port (used when DB_PASSWORD is set).")
    db_user: str = Field("root", validation_alias=_env("COMZY_DB_USER", "DB_USER"),
                         description="MySQL/MariaDB user (used when DB_PASSWORD is set).")
    db_password: SecretStr | None = Field(None, validation_alias=_env("COMZY_DB_PASSWORD", "DB_PASSWORD"),
                                          description="MySQL/MariaDB password; setting it selects MySQL.")
    db_name: str = Field("comzy", validation_alias=_env("COMZY_DB_NAME", "DB_NAME"),
                         description="MySQL/MariaDB database name (used when DB_PASSWORD is set).")

    @field_validator("base_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        value = value.strip().lower().rstrip(".")
        if not value or " " in value:
            raise ValueError("must be a domain name such as example.com")
        return value

    @field_validator("ssl_cert_path", "ssl_key_path", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: Any) -> Any:
        # The seed's .env has `SSL_CERT_PATH=` for "no TLS"; as a Path, "" would be the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is not None and "{alias}" not in value:
            raise ValueError("must contain {alias}, e.g. https://{alias}.example.com")
        return value

    @field_validator("public_agent_url")
    @classmethod
    def _public_agent_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        scheme, _, rest = value.partition("://")
        if scheme not in ("ws", "wss") or not rest or rest.startswith("/"):
            raise ValueError("must be a ws:// or wss:// URL, e.g. wss://tunnel.example.com")
        return value

    @field_validator("http_server")
    @classmethod
    def _http_server_installed(cls, value: str) -> str:
        problem = missing_requirement(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("event_loop")
    @classmethod
    def _event_loop_usable(cls, value: str) -> str:
        return check_choice(value)

    @field_validator("reserved_aliases")
    @classmethod
    def _reserved(cls, value: str) -> str:
        for name in filter(None, (n.strip().lower() for n in value.split(","))):
            if not ALIAS_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid alias")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: str) -> str:
        parse_networks(value)
        return value

    @cached_property
    def trusted_networks(self) -> tuple[Network, ...]:
        """COMZY_TRUSTED_PROXIES as networks (parsed once: the edge asks on every request)."""
        return parse_networks(self.trusted_proxies)

    @property
    def reserved(self) -> frozenset[str]:
        """The reserved names as a set."""
        return frozenset(filter(None, (n.strip().lower() for n in self.reserved_aliases.split(","))))

    def agent_url(self, host: str = "HOST") -> str:
        """The URL agents connect to: COMZY_PUBLIC_AGENT_URL, else ws(s)://``host``:COMZY_WS_PORT."""
        if self.public_agent_url:
            return self.public_agent_url
        return f"{'wss' if self.ssl_cert_path else 'ws'}://{host}:{self.ws_port}"

    def url_for(self, alias: str) -> str:
        """The public URL of an alias."""
        if self.public_url:
            return self.public_url.replace("{alias}", alias)
        scheme = "https" if self.ssl_cert_path else "http"
        default_port = 443 if scheme == "https" else 80
        port = "" if self.http_port == default_port else f":{self.http_port}"
        return f"{scheme}://{alias}.{self.base_domain}{port}"


def settings_class(error: ValidationError) -> type[BaseSettings] | None:
    """The settings class a ValidationError is about (by its title), among those defined so far."""
    pending: list[type[BaseSettings]] = [BaseSettings]
    while pending:
        cls = pending.pop()
        if cls.__name__ == error.title and cls is not BaseSettings:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def explain_validation_error(model: type[BaseSettings], error: ValidationError) -> str:
    """A message naming the environment variable behind each bad value: the one that is set, where a
    setting has several names (``DB_PORT`` for ``COMZY_DB_PORT``), else all of them."""
    lines = []
    for item in error.errors():
        key = str(item["loc"][0]) if item["loc"] else "?"
        info, variables = _field(model, key)
        names = _variable_set(model, variables)
        # A secret's value never goes into a message (it reaches stderr, logs and `comzy-server plugins`).
        value = "***" if info is not None and _is_secret(info.annotation) else repr(item.get("input"))
        lines.append(f"{names}={value}: {item['msg']}")
    return "invalid setting: " + "; ".join(lines)


def variable_name(model: type[BaseSettings], field: str) -> str:
    """The environment variable behind ``field`` of ``model`` as the user wrote it: the one that is
    set (``SSL_CERT_PATH`` or ``COMZY_SSL_CERT_PATH``), else all its names joined with '/'."""
    return _variable_set(model, _field(model, field)[1])


def _field(model: type[BaseSettings], key: str) -> tuple[FieldInfo | None, list[str]]:
    """The field an error's ``loc`` names and its environment variables: pydantic gives the field's
    name, or for a field with AliasChoices its first choice, whichever variable held the value."""
    prefix = str(model.model_config.get("env_prefix") or "")
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            variables = [str(choice) for choice in alias.choices]
        elif isinstance(alias, str):
            variables = [alias]
        else:  # read from env_prefix + the field's name (a plugin's settings)
            variables = [(prefix + name).upper()]
        if key == name or key in variables:
            return info, variables
    return None, [key]


def _is_secret(annotation: Any) -> bool:
    """Whether a field's type is a pydantic secret (``SecretStr``, ``SecretStr | None``...)."""
    kinds = get_args(annotation) or (annotation,)
    return any(isinstance(kind, type) and issubclass(kind, (SecretStr, SecretBytes)) for kind in kinds)


def _variable_set(model: type[BaseSettings], variables: list[str]) -> str:
    """The first of ``variables`` set in the environment (the one pydantic read), else all of them
    (the value came from a ``.env`` file or elsewhere)."""
    if model.model_config.get("case_sensitive"):
        set_names = set(os.environ)
        found = [name for name in variables if name in set_names]
    else:
        set_names = {name.upper() for name in os.environ}
        found = [name for name in variables if name.upper() in set_names]
    return found[0] if found else "/".join(variables)
