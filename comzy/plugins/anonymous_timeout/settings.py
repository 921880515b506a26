"""Settings of the anonymous_timeout plugin (prefix COMZY_ANONYMOUS_TIMEOUT_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AnonymousTimeoutSettings(BaseSettings):
    """How long anonymous tunnels last and when their agents are warned."""

    model_config = SettingsConfigDict(env_prefix="COMZY_ANONYMOUS_TIMEOUT_", env_file=".env", extra="ignore")

    seconds: float = Field(3600.0, gt=0, description="Lifetime of an anonymous tunnel, in seconds.")
    warn_seconds: float = Field(300.0, ge=0, description="Warn the agent this many seconds before expiry "
                                "(at most half the lifetime).")
