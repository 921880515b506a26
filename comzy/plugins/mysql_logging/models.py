"""mysql_logging's table: ``api_requests``, one row per proxied request (the seed's schema).

A change here needs a new migration in ``migrations/`` (``python -m comzy.migrations revision --plugin
mysql_logging --autogenerate -m "..."``); tests/test_migrations.py fails while the two disagree.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import BigInteger, Boolean, Double, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from comzy import Schema
from comzy.db import BigId, created_at_column, plugin_metadata


class Base(DeclarativeBase):
    """Declarative base of mysql_logging's table (its own MetaData: no other plugin's tables)."""

    metadata = plugin_metadata()


class ApiRequest(Base):
    """One proxied request (the plugin writes these in batches)."""

    __tablename__ = "api_requests"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    alias: Mapped[str] = mapped_column(String(255), index=True)
    port: Mapped[int] = mapped_column(Integer)
    # The seed has VARCHAR(10); registered methods reach 17 characters (UPDATEREDIRECTREF), and
    # hypercorn passes any token: a longer one is cut, marked (see ``cut``).
    method: Mapped[str] = mapped_column(String(64))
    # TEXT (65,535 bytes on MySQL): the path is kept whole up to COMZY_MYSQL_LOGGING_MAX_PATH_LENGTH.
    path: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int] = mapped_column(Integer)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    duration_ms: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    # Long enough for any IPv6 address in text form.
    client_address: Mapped[str | None] = mapped_column(String(45), nullable=True)
    created_at: Mapped[datetime] = created_at_column(index=True)
    # True when the method or the path was too long to keep whole; each cut one ends with " [cut]",
    # which no whole one can end with (a logged path has its spaces %-escaped, a method has none).
    cut: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


SCHEMA = Schema("mysql_logging", Base.metadata, Path(__file__).resolve().parent / "migrations")
