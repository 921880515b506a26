"""custom_domains: ``created_at`` with microseconds on MySQL/MariaDB too.

It becomes ``DATETIME(6)`` on MySQL/MariaDB, whose plain ``DATETIME`` kept whole seconds while
SQLite and PostgreSQL kept microseconds; nothing changes on the other databases. Existing rows
are kept.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from comzy.migrations import set_time_precision

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Keep microseconds in ``created_at``."""
    set_time_precision("custom_domains", "created_at", microseconds=True, default_now=True)


def downgrade() -> None:
    """Back to whole seconds on MySQL/MariaDB (the fractions are rounded away)."""
    set_time_precision("custom_domains", "created_at", microseconds=False, default_now=True)
