"""The example's one table, ``example_blocked``: the requests the plugin refused, newest kept.

Its migrations are in ``migrations/``, written with the documented command (README.md); after a
change here write a new revision the same way. Comzy's tests fail while the two disagree.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from comzy import Schema
from comzy.db import BigId, created_at_column, plugin_metadata
from sqlalchemy import Index, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Column lengths; longer values are cut when recorded (see :mod:`comzy_plugin_example.store`).
ALIAS_LENGTH = 63  # an alias is one DNS label
METHOD_LENGTH = 16
PATH_LENGTH = 1024
CLIENT_LENGTH = 45  # the longest IPv6 address in text form


class Base(DeclarativeBase):
    """Declarative base holding only this plugin's tables (``db upgrade`` sees them as the example's)."""

    metadata = plugin_metadata()


class BlockedRow(Base):
    """One refused request."""

    # Prefixed with the plugin's name: every plugin shares the database.
    __tablename__ = "example_blocked"
    # (alias, id) serves both "newest of this alias" and the per-alias trim after each batch.
    __table_args__ = (Index("ix_example_blocked_alias_id", "alias", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    alias: Mapped[str] = mapped_column(String(ALIAS_LENGTH))
    method: Mapped[str] = mapped_column(String(METHOD_LENGTH))
    path: Mapped[str] = mapped_column(String(PATH_LENGTH))
    client: Mapped[str | None] = mapped_column(String(CLIENT_LENGTH), nullable=True)
    # Set from the time of the request (rows are written in batches, later); indexed for pruning by age.
    blocked_at: Mapped[datetime] = created_at_column(index=True)


#: What the ``database_schema`` hook answers and ``prepare_database`` is given.
SCHEMA = Schema("example", Base.metadata, Path(__file__).resolve().parent / "migrations")
