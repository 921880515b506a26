"""The database toolkit for plugins that keep tables: the public face of Comzy's database layer.

A plugin that keeps data declares its tables in its own ``MetaData`` (:func:`plugin_metadata`),
returns a :class:`comzy.Schema` from the ``database_schema`` hook, and opens its engine with
:func:`prepare_database` in ``on_startup`` (docs/plugin_hooks.md, "Tables and migrations").
Importing this module loads SQLAlchemy and Alembic; ``import comzy`` alone does not.
"""

from __future__ import annotations

from comzy.core.db import DatabaseError, describe_error, masked_url, prepare_database, upgrade_to_head
from comzy.core.models import BigId, Timestamp, created_at_column, current_timestamp, plugin_metadata, utc_now
from comzy.core.schema import Schema

__all__ = [
    "BigId",
    "DatabaseError",
    "Schema",
    "Timestamp",
    "created_at_column",
    "current_timestamp",
    "describe_error",
    "masked_url",
    "plugin_metadata",
    "prepare_database",
    "upgrade_to_head",
    "utc_now",
]
