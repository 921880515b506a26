"""The core's baseline: no tables (each plugin's tables live in the plugin's own tree).

Comzy 0.1 had one tree whose 0001 created every plugin's tables; databases made then are at
this revision already (same id, same version table ``alembic_version``), and each plugin's own
baseline adopts the tables it finds there (comzy.migrations.create_or_adopt_table). So this
revision creates nothing, on old databases and new ones alike.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing: the core has no tables yet."""


def downgrade() -> None:
    """Nothing: the plugins' tables are theirs to drop (their own trees' downgrades)."""
