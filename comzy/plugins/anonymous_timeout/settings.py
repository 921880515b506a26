"""Settings of the anonymous_timeout plugin (prefix COMZY_ANONYMOUS_TIMEOUT_)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AnonymousTimeoutSettings(BaseSettings):
    """How long anonymous tunnels last and when their agents are warned."""

    model_config = SettingsConfigDict(env_prefix="COMZY_ANONYMOUS_TIMEOUT_", env_file=".env", extra="ignore")

    seconds: float = Field(3600.0, gt=0, description="Lifetime of an anonymous tunnel, in seconds.")
    warn_seconds: float = Field(300.0, ge=0, description="Warn the agent this many seconds before expiry "
                                "(at most half the lifetime).")
    seed_milliseconds: float | None = Field(
        None, gt=0, validation_alias="COMZY_ANONYMOUS_TIMEOUT",
        description="The original Comzy's lifetime setting, in milliseconds; used when "
        "COMZY_ANONYMOUS_TIMEOUT_SECONDS is unset.")

    @model_validator(mode="after")
    def _seed_lifetime(self) -> Self:
        # The seed's .env says COMZY_ANONYMOUS_TIMEOUT=3600000: honoured, in its unit, unless the
        # operator also set this plugin's own name, which then wins.
        if self.seed_milliseconds is not None and "seconds" not in self.model_fields_set:
            self.seconds = self.seed_milliseconds / 1000
        return self
