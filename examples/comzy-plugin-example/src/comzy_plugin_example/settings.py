"""Settings of the example plugin, read from ``COMZY_EXAMPLE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ExampleSettings(BaseSettings):
    """What the example plugin stamps and blocks, and how much of what it blocked it keeps."""

    model_config = SettingsConfigDict(env_prefix="COMZY_EXAMPLE_", extra="ignore")

    header_name: str = Field("X-Comzy-Example", description="Request header added to every forwarded request.")
    header_value: str = Field("stamped", description="Value of that header.")
    blocked_prefix: str = Field("/private", description="Requests under this path prefix get 403; empty: none.")
    keep_per_alias: int = Field(100, gt=0, description="Blocked requests kept per alias; older ones are deleted "
                                "as new ones are written.")
    keep_days: float = Field(30.0, ge=0, description="Blocked requests older than this many days are deleted "
                             "(checked hourly); `0` keeps them until `keep_per_alias` pushes them out.")
    queue_size: int = Field(1000, gt=0, description="Blocked requests waiting in memory to be written; beyond "
                            "it (the database is slow or down) they are refused as usual but not recorded, "
                            "and counted.")

    @field_validator("header_name")
    @classmethod
    def _token(cls, value: str) -> str:
        if not value or any(c in value for c in " \t\r\n:"):
            raise ValueError("must be a header name without spaces or ':'")
        return value

    @field_validator("blocked_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError("must start with '/' (or be empty to block nothing)")
        return value.rstrip("/") if value != "/" else value
