"""Shared pieces for plugins' SQLAlchemy models: naming convention, ids, timestamps.

The core has no tables of its own; each plugin declares its tables in its own ``MetaData``
(``plugin_metadata()``) and ships their migrations (see :class:`comzy.core.schema.Schema`).
Times are written in UTC; MySQL and SQLite give them back without a time zone (naive, meaning
UTC), PostgreSQL with one.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, Integer, MetaData, func
from sqlalchemy.orm import Mapped, mapped_column

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


def plugin_metadata() -> MetaData:
    """A fresh ``MetaData`` with Comzy's naming convention: one per plugin, holding only its tables."""
    return MetaData(naming_convention=NAMING_CONVENTION)


def utc_now() -> datetime:
    """The current time in UTC (the default of every ``created_at``)."""
    return datetime.now(UTC)


def created_at_column(*, index: bool = False) -> Mapped[datetime]:
    """A ``created_at`` column: set by Python (:func:`utc_now`) and by the database's default."""
    return mapped_column(DateTime(timezone=True), nullable=False, default=utc_now,
                         server_default=func.current_timestamp(), index=index)


__all__ = ["NAMING_CONVENTION", "BigId", "created_at_column", "plugin_metadata", "utc_now"]
