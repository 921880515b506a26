"""auth_token's baseline: ``users`` and ``user_aliases``, created, or adopted from Comzy 0.1.

Comzy 0.1 made these tables in its single tree (version table ``alembic_version``); a database
made then has them with their rows but no ``alembic_version_auth_token``. Adopting them here
(rather than asking the operator to stamp) keeps `comzy-server db upgrade` the one step, and
works also when the plugin is enabled long after the tables were made.

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


def _created_at() -> sa.Column[sa.DateTime]:
    return sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.current_timestamp(),
                     nullable=False)


def upgrade() -> None:
    """Create (or adopt) ``users`` and ``user_aliases``."""
    create_or_adopt_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("token_hash", sa.String(length=128), nullable=False),
        _created_at(),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_users_token_hash")),
    )
    if create_or_adopt_table(
        "user_aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        _created_at(),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_user_aliases_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_aliases")),
        sa.UniqueConstraint("alias", name=op.f("uq_user_aliases_alias")),
    ):
        op.create_index(op.f("ix_user_aliases_user_id"), "user_aliases", ["user_id"])


def downgrade() -> None:
    """Drop ``user_aliases`` and ``users`` (and every user and token with them)."""
    op.drop_table("user_aliases")
    op.drop_table("users")
