"""custom_domains' baseline: ``custom_domains``, created, or adopted from Comzy 0.1.

Comzy 0.1 made this table in its single tree (version table ``alembic_version``); a database
made then has it with its rows but no ``alembic_version_custom_domains``. Adopting it here
(rather than asking the operator to stamp) keeps `comzy-server db upgrade` the one step, and
works also when the plugin is enabled long after the table was made.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comzy.migrations import create_or_adopt_table

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create (or adopt) ``custom_domains``."""
    if create_or_adopt_table(
        "custom_domains",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("alias", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.current_timestamp(),
                  nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_custom_domains")),
        sa.UniqueConstraint("host", name=op.f("uq_custom_domains_host")),
    ):
        op.create_index(op.f("ix_custom_domains_alias"), "custom_domains", ["alias"])


def downgrade() -> None:
    """Drop ``custom_domains`` (every mapping with it)."""
    op.drop_table("custom_domains")
