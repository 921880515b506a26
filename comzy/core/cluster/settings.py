"""Cluster settings (``COMZY_NATS_*``, ``COMZY_CLUSTER_*``, ``COMZY_NODE_NAME``), read only when
``COMZY_ROLE`` is ``edge`` or ``control``: a single-process server never needs them."""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from comzy.core.settings import explain_validation_error

CLUSTER_NAME_RE = re.compile(r"[a-z0-9_-]{1,32}")
#: A node name becomes a token of NATS subjects (``comzy.<cluster>.n.<node id>.l.*``): no dots,
#: wildcards or spaces.
NODE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


def default_node_name() -> str:
    """The host name, made fit for a subject token (dots and other characters become ``-``)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:64]
    return name or "node"


def mask_url(url: str) -> str:
    """``url`` with any password or token replaced by ``***`` (for logs and the start-up lines)."""
    parts = urlsplit(url)
    if not parts.username and not parts.password:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    # nats://TOKEN@host carries the token where a user name goes: only a user with a password keeps its name.
    userinfo = f"{parts.username}:***" if parts.password is not None else "***"
    return SplitResult(parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment).geturl()


def _mask_list(urls: str) -> str:
    """A comma list of URLs masked item by item; an item that does not parse is hidden whole."""
    masked = []
    for url in urls.split(","):
        try:
            masked.append(mask_url(url.strip()))
        except ValueError:
            masked.append("***" if "@" in url else url.strip())
    return ",".join(masked)


class ClusterSettings(BaseSettings):
    """How a node reaches NATS and which cluster it joins (docs/configuration.md, "Cluster")."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    nats_url: str = Field("nats://127.0.0.1:4222", validation_alias=_env("COMZY_NATS_URL"),
                          description="Comma list of NATS servers (nats://, tls://, ws://, wss://).")
    nats_user: str | None = Field(None, validation_alias=_env("COMZY_NATS_USER"),
                                  description="NATS user (with COMZY_NATS_PASSWORD).")
    nats_password: SecretStr | None = Field(None, validation_alias=_env("COMZY_NATS_PASSWORD"),
                                            description="NATS password.")
    nats_token: SecretStr | None = Field(None, validation_alias=_env("COMZY_NATS_TOKEN"),
                                         description="NATS token.")
    nats_creds: Path | None = Field(None, validation_alias=_env("COMZY_NATS_CREDS"),
                                    description="NATS .creds file (JWT and nkey seed).")
    nats_nkey_seed: Path | None = Field(None, validation_alias=_env("COMZY_NATS_NKEY_SEED"),
                                        description="NATS nkey seed file.")
    nats_tls_ca: Path | None = Field(None, validation_alias=_env("COMZY_NATS_TLS_CA"),
                                     description="CA file that verifies the NATS server's certificate.")
    nats_tls_cert: Path | None = Field(None, validation_alias=_env("COMZY_NATS_TLS_CERT"),
                                       description="Client certificate for mutual TLS (with COMZY_NATS_TLS_KEY).")
    nats_tls_key: Path | None = Field(None, validation_alias=_env("COMZY_NATS_TLS_KEY"),
                                      description="Client private key for mutual TLS.")
    cluster_name: str = Field("main", validation_alias=_env("COMZY_CLUSTER_NAME"),
                              description="Cluster name: subjects comzy.<name>.*, buckets comzy_<name>_*; "
                              "two clusters can share one NATS.")
    node_name: str = Field(default_factory=default_node_name, validation_alias=_env("COMZY_NODE_NAME"),
                           description="Display part of this node's id (<name>-<8 hex>, new on every start).")
    cluster_node_ttl: float = Field(10.0, ge=1.0, le=3600.0, validation_alias=_env("COMZY_CLUSTER_NODE_TTL"),
                                    description="Seconds a node's lease lives without a refresh (refreshed "
                                    "every third of it).")
    cluster_link_timeout: float = Field(4.0, gt=0, le=300.0, validation_alias=_env("COMZY_CLUSTER_LINK_TIMEOUT"),
                                        description="Seconds of silence after which a link between two nodes "
                                        "is dead (PING every quarter of it).")
    cluster_lookup_timeout: float = Field(2.0, gt=0, le=60.0, validation_alias=_env("COMZY_CLUSTER_LOOKUP_TIMEOUT"),
                                          description="Seconds an edge waits for the node holding an alias to "
                                          "answer its lookup; beyond: 504.")
    cluster_alias_ttl: float = Field(3600.0, ge=60.0, validation_alias=_env("COMZY_CLUSTER_ALIAS_TTL"),
                                     description="Seconds an alias record lives in the cluster's registry "
                                     "(live ones are rewritten every third of it).")
    cluster_kv_storage: Literal["file", "memory"] = Field(
        "file", validation_alias=_env("COMZY_CLUSTER_KV_STORAGE"),
        description="JetStream storage of the cluster's buckets: file or memory.")
    cluster_kv_replicas: int = Field(1, ge=1, le=5, validation_alias=_env("COMZY_CLUSTER_KV_REPLICAS"),
                                     description="JetStream replicas of the cluster's buckets (3 on a NATS "
                                     "cluster).")

    @field_validator("nats_url")
    @classmethod
    def _servers(cls, value: str) -> str:
        servers = [item.strip() for item in value.split(",") if item.strip()]
        if not servers:
            raise ValueError("must name at least one server, e.g. nats://127.0.0.1:4222")
        for server in servers:
            try:
                parts = urlsplit(server)
                parts.port  # noqa: B018 (raises ValueError on a bad port)
            except ValueError as exc:
                raise ValueError(f"{_mask_list(server)!r} is not a URL: {exc}") from None
            if parts.scheme not in NATS_SCHEMES or not parts.hostname:
                raise ValueError(f"{_mask_list(server)!r} is not a NATS URL such as nats://host:4222 "
                                 f"(schemes: {', '.join(NATS_SCHEMES)})")
        return ",".join(servers)

    @field_validator("cluster_name")
    @classmethod
    def _cluster_name(cls, value: str) -> str:
        if not CLUSTER_NAME_RE.fullmatch(value):
            raise ValueError("must be 1 to 32 of a-z, 0-9, _ and -")
        return value

    @field_validator("node_name")
    @classmethod
    def _node_name(cls, value: str) -> str:
        if not NODE_NAME_RE.fullmatch(value):
            raise ValueError("must be 1 to 64 of A-Z, a-z, 0-9, _ and - (it becomes part of NATS subjects)")
        return value

    @field_validator("nats_creds", "nats_nkey_seed", "nats_tls_ca", "nats_tls_cert", "nats_tls_key")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    def pairing_problem(self) -> str | None:
        """What is missing from a setting that needs another one, if anything (one line)."""
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            return "COMZY_NATS_TLS_CERT and COMZY_NATS_TLS_KEY go together (mutual TLS): set both"
        if self.nats_password is not None and self.nats_user is None:
            return "COMZY_NATS_PASSWORD is set but COMZY_NATS_USER is not: set both"
        return None

    @property
    def servers(self) -> list[str]:
        """COMZY_NATS_URL as a list."""
        return self.nats_url.split(",")

    @property
    def masked_url(self) -> str:
        """COMZY_NATS_URL with passwords and tokens masked: fit for logs."""
        return ",".join(mask_url(server) for server in self.servers)


class ClusterConfigError(Exception):
    """Cluster settings that cannot work; the message is one line naming the variable."""


def load_cluster_settings(role: str, **overrides: object) -> ClusterSettings:
    """The cluster settings for ``role`` (edge or control) from the environment and ``.env``.

    Raises ClusterConfigError when the nats extra is missing or a value is bad.
    """
    if importlib.util.find_spec("nats") is None:
        raise ClusterConfigError(f"COMZY_ROLE={role} needs the nats extra: pip install 'comzy[nats]'")
    try:
        settings = ClusterSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        message = explain_validation_error(ClusterSettings, exc)
        for item in exc.errors():
            # The message quotes what was set: a URL's password must not reach the terminal or a log.
            if item["loc"] and item["loc"][0] in ("nats_url", "COMZY_NATS_URL") and isinstance(item.get("input"), str):
                message = message.replace(repr(item["input"]), repr(_mask_list(item["input"])))
        raise ClusterConfigError(message) from None
    problem = settings.pairing_problem()
    if problem:
        raise ClusterConfigError(f"invalid setting: {problem}")
    return settings
