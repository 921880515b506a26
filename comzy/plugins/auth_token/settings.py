"""Settings of the auth_token plugin (prefix COMZY_AUTH_; the seed's MAX_ALIASES_PER_USER too)."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AuthTokenSettings(BaseSettings):
    """Whether a token is required, how many aliases a user may own, how often users are re-read, and how
    token guessing is slowed down."""

    model_config = SettingsConfigDict(env_prefix="COMZY_AUTH_", env_file=".env", extra="ignore",
                                      populate_by_name=True)

    require_token: bool = Field(False, validation_alias=AliasChoices("COMZY_REQUIRE_TOKEN",
                                                                      "COMZY_AUTH_REQUIRE_TOKEN"),
                                description="Refuse agents without a valid token (`COMZY_REQUIRE_TOKEN`). "
                                "When false, anonymous agents get random aliases (and, with the "
                                "anonymous_timeout plugin, an expiry).")
    max_aliases_per_user: int = Field(5, ge=1, le=1000, validation_alias=AliasChoices(
        "COMZY_MAX_ALIASES_PER_USER", "MAX_ALIASES_PER_USER", "COMZY_AUTH_MAX_ALIASES_PER_USER"),
        description="How many aliases one user may own (`MAX_ALIASES_PER_USER`, the seed's name, works too).")
    database_timeout: float = Field(5.0, gt=0, description="Seconds a registration or account call waits for the "
                                    "database (an unknown token, a new alias) before it is refused with "
                                    "\"try again\"; known users and their aliases never wait for it.")
    refresh_seconds: float = Field(5.0, gt=0, description="Seconds between re-reads of the users and their "
                                   "aliases: `comzy-server users revoke` closes live tunnels within this time.")
    max_failures_per_minute: int = Field(5, ge=1, le=10_000, description="Failed token checks (account API "
                                         "and agent HELLO) one client address may make per minute; then it is "
                                         "refused (429 with Retry-After; a REJECT saying when to retry) until its "
                                         "minute ends, whatever token it sends. IPv6 addresses count per /64.")
    unknown_token_seconds: float = Field(10.0, gt=0, le=300, description="Seconds a token the database did not "
                                         "know is refused from memory, without a query; a token created or rotated "
                                         "meanwhile works at the latest after this time.")
