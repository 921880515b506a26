"""Settings of the custom_domains plugin (prefix COMZY_CUSTOM_DOMAINS_; the seed's CUSTOM_DOMAINS too)."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The environment variables the mapping list is read from, first found wins.
MAPPINGS_VARIABLES = ("COMZY_CUSTOM_DOMAINS_MAPPINGS", "CUSTOM_DOMAINS")


class CustomDomainsSettings(BaseSettings):
    """Hosts mapped in the environment, and how often the database's mappings are re-read."""

    model_config = SettingsConfigDict(env_prefix="COMZY_CUSTOM_DOMAINS_", env_file=".env", extra="ignore",
                                      populate_by_name=True)

    mappings: str = Field("", validation_alias=AliasChoices(*MAPPINGS_VARIABLES),
                          description="Comma list of HOST:ALIAS, e.g. `shop.example.com:ana-shop,"
                          "docs.example.net:bob-docs` (the seed's `CUSTOM_DOMAINS` is read too); each alias must "
                          "be owned by a user, or its domain is unreachable. These win over the database's "
                          "mappings for the same host.")
    refresh_seconds: float = Field(5.0, gt=0, description="Seconds between re-reads of the database's "
                                   "mappings (`comzy-server domains add` takes effect within this time).")
