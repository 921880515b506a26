"""auth_token's tables: ``users`` and the aliases they own (``user_aliases``), the seed's schema.

A change here needs a new migration in ``migrations/`` (``python -m comzy.migrations revision --plugin
auth_token --autogenerate -m "..."``); tests/test_migrations.py fails while the two disagree.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from comzy import Schema
from comzy.db import Timestamp, created_at_column, plugin_metadata


class Base(DeclarativeBase):
    """Declarative base of auth_token's tables (its own MetaData: no other plugin's tables)."""

    metadata = plugin_metadata()


class User(Base):
    """A person (or machine) with a token; ``revoked_at`` set means the token no longer works."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    # A hex digest (e.g. SHA-256) of the token; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = created_at_column()
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class UserAlias(Base):
    """An alias owned by a user, remembered with the local port it was first used for."""

    __tablename__ = "user_aliases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    alias: Mapped[str] = mapped_column(String(255), unique=True)
    port: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = created_at_column()


SCHEMA = Schema("auth_token", Base.metadata, Path(__file__).resolve().parent / "migrations")
