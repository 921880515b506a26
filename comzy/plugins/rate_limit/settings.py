"""Settings of the rate_limit plugin (prefix COMZY_RATE_LIMIT_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The most requests per minute the operator's limit may name (and an owner's, per its unit).
MAX_REQUESTS = 1_000_000


class RateLimitSettings(BaseSettings):
    """The operator's limit per tunnel and client address, and the bound on what is remembered."""

    model_config = SettingsConfigDict(env_prefix="COMZY_RATE_LIMIT_", env_file=".env", extra="ignore")

    per_minute: int | None = Field(
        None, ge=1, le=MAX_REQUESTS,
        description="Requests per minute each client address may send to each tunnel (a burst of that many, "
        "then one every 60/N s); over it: 429 with Retry-After. Unset: no limit but the ones agents ask for "
        "(--rate-limit).")
    max_clients: int = Field(
        50_000, ge=100, le=10_000_000,
        description="Tunnel and client address pairs this node remembers (about 400 bytes each: 20 MB at the "
        "default); past it the least recently seen one is forgotten.")
