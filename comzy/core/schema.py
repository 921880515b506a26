"""``Schema``: the tables a plugin brings, and the Alembic migrations that make them.

A plugin that keeps data returns one from its ``database_schema`` hook (so ``comzy-server db
upgrade`` finds it without a running server) and hands the same object to
``comzy.db.prepare_database`` in ``on_startup``. Each schema is its own Alembic tree with its
own version table, so plugins' migrations never meet, and a plugin that is not enabled has no
tables. This module imports no SQLAlchemy: ``comzy`` re-exports it and the agent imports ``comzy``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import MetaData

#: The core's own tree keeps Alembic's default version table (the one the single tree of Comzy
#: 0.1 used, so databases made then are at the core's baseline already).
CORE_VERSION_TABLE = "alembic_version"
VERSION_TABLE_PREFIX = "alembic_version_"
# A lowercase identifier that fits, prefixed, in MySQL's and PostgreSQL's 63/64-character names.
_NAME = re.compile(r"[a-z][a-z0-9_]{0,46}")


@dataclass(frozen=True)
class Schema:
    """A plugin's tables: its name, its SQLAlchemy ``MetaData`` and its migrations directory.

    ``name`` is the plugin's name as written in COMZY_PLUGINS; the tree's Alembic version table
    is ``alembic_version_<name>`` unless ``version_table`` says otherwise. ``metadata`` holds
    the plugin's tables and nothing else (``python -m comzy.migrations revision --autogenerate``
    writes whatever it holds into this plugin's tree). ``migrations`` is the directory of the plugin's Alembic
    revision files (shipped inside its package); the core provides ``env.py`` and the script
    template, so a plugin ships only the revision files.
    """

    name: str
    metadata: MetaData
    migrations: Path
    version_table: str = field(default="")

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"Schema name {self.name!r} must be a lowercase identifier (a-z, 0-9, _; "
                             "at most 47 characters): use the plugin's name")
        if not self.version_table:
            object.__setattr__(self, "version_table", VERSION_TABLE_PREFIX + self.name)
        object.__setattr__(self, "migrations", Path(self.migrations))


__all__ = ["CORE_VERSION_TABLE", "VERSION_TABLE_PREFIX", "Schema"]
