"""custom_domains' table: ``custom_domains``, the hosts outside the base domain and their aliases.

A change here needs a new migration in ``migrations/`` (``python -m comzy.migrations revision --plugin
custom_domains --autogenerate -m "..."``); tests/test_migrations.py fails while the two disagree.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from comzy import Schema
from comzy.db import created_at_column, plugin_metadata


class Base(DeclarativeBase):
    """Declarative base of custom_domains' table (its own MetaData: no other plugin's tables)."""

    metadata = plugin_metadata()


class CustomDomain(Base):
    """A host outside the base domain served by an alias (``domains add HOST ALIAS``)."""

    __tablename__ = "custom_domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(255), unique=True)
    alias: Mapped[str] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = created_at_column()


SCHEMA = Schema("custom_domains", Base.metadata, Path(__file__).resolve().parent / "migrations")
