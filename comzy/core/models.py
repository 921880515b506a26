"""The database schema (SQLAlchemy 2 declarative): the seed's tables plus custom domains.

Alembic owns the schema (comzy/migrations/); a change here needs a new migration, and
tests/test_migrations.py fails while the two disagree. Times are written in UTC; MySQL and
SQLite give them back without a time zone (naive, meaning UTC), PostgreSQL with one.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, Double, ForeignKey, Integer, MetaData, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Explicit constraint and index names: PostgreSQL index names are per schema (the seed's
# two ``idx_alias`` would collide there) and migrations must be able to name what they drop.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite gives automatic ids only to INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utc_now() -> datetime:
    """The current time in UTC (the default of every ``created_at``)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of every Comzy table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, default=utc_now,
                         server_default=func.current_timestamp())


class User(Base):
    """A person (or machine) with a token; ``revoked_at`` set means the token no longer works."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    # A hex digest (e.g. SHA-256) of the token; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class UserAlias(Base):
    """An alias owned by a user, remembered with the local port it was first used for."""

    __tablename__ = "user_aliases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    alias: Mapped[str] = mapped_column(String(255), unique=True)
    port: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at()


class ApiRequest(Base):
    """One proxied request (the request-logging plugin writes these in batches)."""

    __tablename__ = "api_requests"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    alias: Mapped[str] = mapped_column(String(255), index=True)
    port: Mapped[int] = mapped_column(Integer)
    # The seed has VARCHAR(10); extension methods such as VERSION-CONTROL are longer.
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(1024))
    status_code: Mapped[int] = mapped_column(Integer)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    duration_ms: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    # Long enough for any IPv6 address in text form.
    client_address: Mapped[str | None] = mapped_column(String(45), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utc_now,
                                                 server_default=func.current_timestamp(), index=True)


class CustomDomain(Base):
    """A host outside the base domain served by an alias (``domains add HOST ALIAS``)."""

    __tablename__ = "custom_domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(255), unique=True)
    alias: Mapped[str] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = _created_at()
