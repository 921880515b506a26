"""The Alembic environment every schema shares (``env.py``, ``script.py.mako``), the core's own
revisions (``versions/``), and helpers for revision scripts.

A plugin ships only its revision files; :mod:`comzy.core.db` runs them with this environment,
the plugin's version table and its metadata (see :class:`comzy.core.schema.Schema`).
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from alembic import context, op

log = logging.getLogger("comzy.db")


def create_or_adopt_table(name: str, *elements: Any, **options: Any) -> bool:
    """``op.create_table(name, *elements)``, unless the table is there already with exactly the
    columns given: then it is adopted as it is (its rows kept) and nothing is created.

    For a baseline revision taking over tables that another tree made (Comzy 0.1 made every
    plugin's tables in one tree, and a plugin enabled later finds its tables there, never
    versioned). A table of that name with other columns is not ours: the upgrade stops, saying so,
    rather than take it over. Returns whether the table was created (so the caller creates its
    indexes only then).
    """
    if context.is_offline_mode():  # `--sql`: no database to look at
        op.create_table(name, *elements, **options)
        return True
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table(name):
        op.create_table(name, *elements, **options)
        return True
    expected = {element.name for element in elements if isinstance(element, sa.Column)}
    found = {column["name"] for column in inspector.get_columns(name)}
    if found != expected:
        from comzy.core.db import DatabaseError

        version_table = op.get_context().version_table
        raise DatabaseError(
            f"the table {name!r} exists but is not the one {version_table} expects (its columns: "
            f"{', '.join(sorted(found))}; expected: {', '.join(sorted(expected))}): rename or drop it, or give "
            "Comzy a database of its own")
    log.info("adopted the existing table %s (made before this migration: its rows are kept)", name)
    return False


__all__ = ["create_or_adopt_table"]
