"""Settings of the dashboard plugin (prefix COMZY_DASHBOARD_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DashboardSettings(BaseSettings):
    """How much the live feed buffers per client, and how much history the page gets at once."""

    model_config = SettingsConfigDict(env_prefix="COMZY_DASHBOARD_", env_file=".env", extra="ignore")

    feed_queue: int = Field(1000, ge=10, le=1_000_000, description="Events buffered per feed client; a client "
                            "further behind misses events and gets a `lagged` event saying how many.")
    recent_requests: int = Field(500, ge=0, le=100_000, description="Requests kept in memory for the page's "
                                 "first view and for `/api/requests` when request logging is off.")
    history_seconds: int = Field(600, ge=60, le=86_400, description="Seconds of requests/s and bytes/s kept "
                                 "for the charts.")
