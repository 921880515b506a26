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
    versioned). "Exactly" means the same column names, each of the same kind of type (integer,
    text, time, number...): a table of that name with other columns, or a view, is not ours, and
    the upgrade stops, saying so, rather than take it over. Returns whether the table was created
    (so the caller creates its indexes only then).
    """
    if context.is_offline_mode():  # `--sql`: no database to look at
        op.create_table(name, *elements, **options)
        return True
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table(name):
        op.create_table(name, *elements, **options)
        return True
    expected = {element.name: element.type for element in elements if isinstance(element, sa.Column)}
    found = {column["name"]: column["type"] for column in inspector.get_columns(name)}
    mismatch = _not_ours(name, inspector, expected, found)
    if mismatch is not None:
        from comzy.core.db import DatabaseError

        version_table = op.get_context().version_table
        raise DatabaseError(f"the table {name!r} exists but is not the one {version_table} expects ({mismatch}): "
                            "rename or drop it, or give Comzy a database of its own")
    log.info("adopted the existing table %s (made before this migration: its rows are kept)", name)
    return False


def _not_ours(name: str, inspector: Any, expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """Why the existing ``name`` cannot be the table these columns describe, or None when it can be."""
    if name in inspector.get_view_names():
        return "it is a view"
    if set(found) != set(expected):
        return f"its columns: {', '.join(sorted(found))}; expected: {', '.join(sorted(expected))}"
    # By kind (SQLAlchemy's type affinity, as Alembic compares types), not by exact type: each
    # database reflects what Comzy 0.1 made in its own words (DOUBLE, DOUBLE PRECISION, FLOAT...).
    # A type the dialect cannot name (NullType: an untyped SQLite column) is not held against it.
    for column, wanted in sorted(expected.items()):
        have = found[column]._type_affinity
        if have is not sa.types.NullType and have is not wanted._type_affinity:
            return f"its column {column} is {found[column]}, expected {wanted.compile(op.get_bind().dialect)}"
    return None


def set_time_precision(table: str, column: str, microseconds: bool, *, nullable: bool = False,
                       default_now: bool = False) -> None:
    """Make a time column keep microseconds (``microseconds=True``) or whole seconds, on MySQL and
    MariaDB; elsewhere nothing is to be done (PostgreSQL's ``timestamptz`` and SQLite's text always
    kept them).

    For a revision that moves a column from ``DateTime`` to :data:`comzy.db.Timestamp`, and back in
    its downgrade. The column's rows are kept (going back rounds them to whole seconds).
    ``nullable`` and ``default_now`` (a ``CURRENT_TIMESTAMP`` default, as
    :func:`comzy.db.created_at_column` has) must describe the column as it is: MySQL's ``MODIFY``
    restates the whole column, and what it does not restate is lost.
    """
    if op.get_context().dialect.name not in ("mysql", "mariadb"):
        return
    from sqlalchemy.dialects import mysql

    new, old = (mysql.DATETIME(fsp=6), mysql.DATETIME()) if microseconds else (mysql.DATETIME(), mysql.DATETIME(fsp=6))
    # MySQL wants a CURRENT_TIMESTAMP default of the column's own precision.
    now = sa.text("CURRENT_TIMESTAMP(6)" if microseconds else "CURRENT_TIMESTAMP")
    op.alter_column(table, column, type_=new, existing_type=old, existing_nullable=nullable,
                    server_default=now if default_now else False, existing_server_default=None)


__all__ = ["create_or_adopt_table", "set_time_precision"]
