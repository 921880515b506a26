"""mysql_logging's baseline: ``api_requests``, created, or adopted from Comzy 0.1.

Comzy 0.1 made this table in its single tree (version table ``alembic_version``); a database
made then has it with its rows but no ``alembic_version_mysql_logging``. Adopting it here
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
    """Create (or adopt) ``api_requests``."""
    if create_or_adopt_table(
        "api_requests",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("alias", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("bytes_in", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("duration_ms", sa.Double(), server_default="0", nullable=False),
        sa.Column("client_address", sa.String(length=45), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.current_timestamp(),
                  nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_requests")),
    ):
        op.create_index(op.f("ix_api_requests_alias"), "api_requests", ["alias"])
        op.create_index(op.f("ix_api_requests_created_at"), "api_requests", ["created_at"])


def downgrade() -> None:
    """Drop ``api_requests`` (the whole request log with it)."""
    op.drop_table("api_requests")
