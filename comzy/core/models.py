"""Shared pieces for plugins' SQLAlchemy models: naming convention, ids, timestamps.

The core has no tables of its own; each plugin declares its tables in its own ``MetaData``
(``plugin_metadata()``) and ships their migrations (see :class:`comzy.core.schema.Schema`).
Times are written in UTC; MySQL and SQLite give them back without a time zone (naive, meaning
UTC), PostgreSQL with one. Every database keeps their microseconds: :data:`Timestamp` asks
MySQL/MariaDB for ``DATETIME(6)``, whose plain ``DATETIME`` would round to whole seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, MetaData
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.functions import FunctionElement

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

#: A point in time with microseconds on every database: PostgreSQL's ``timestamptz`` and SQLite's
#: text keep them anyway; MySQL and MariaDB need ``DATETIME(6)`` (plain ``DATETIME`` rounds to
#: whole seconds, so a request log's order within a second was lost there).
Timestamp = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


class current_timestamp(FunctionElement[Any]):  # lower case, as the SQL function it renders
    """The database's ``CURRENT_TIMESTAMP``, as a column default for :data:`Timestamp`: with
    microseconds on MySQL/MariaDB (``CURRENT_TIMESTAMP(6)``: MySQL refuses a ``DATETIME(6)``
    default of another precision)."""

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(current_timestamp)
def _current_timestamp(element: current_timestamp, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(current_timestamp, "mysql")
@compiles(current_timestamp, "mariadb")
def _current_timestamp_microseconds(element: current_timestamp, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP(6)"


def plugin_metadata() -> MetaData:
    """A fresh ``MetaData`` with Comzy's naming convention: one per plugin, holding only its tables."""
    return MetaData(naming_convention=NAMING_CONVENTION)


def utc_now() -> datetime:
    """The current time in UTC (the default of every ``created_at``)."""
    return datetime.now(UTC)


def created_at_column(*, index: bool = False) -> Mapped[datetime]:
    """A ``created_at`` column (a :data:`Timestamp`): set by Python (:func:`utc_now`) and by the
    database's default."""
    return mapped_column(Timestamp, nullable=False, default=utc_now, server_default=current_timestamp(),
                         index=index)


__all__ = ["NAMING_CONVENTION", "BigId", "Timestamp", "created_at_column", "current_timestamp", "plugin_metadata",
           "utc_now"]
