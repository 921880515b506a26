"""Comzy 0.1's single Alembic tree, exactly as it shipped: revision 0001 made every plugin's tables.

Kept as a test fixture (tests/test_migrations.py): a database made by it must upgrade in place
to the per-plugin trees, its rows kept. :func:`make_legacy_database` builds one as Comzy 0.1's
`comzy-server db upgrade` did: these tables, and ``alembic_version`` holding ``0001``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Connection

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _created_at() -> sa.Column[sa.DateTime]:
    return sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.current_timestamp(),
                     nullable=False)


def upgrade() -> None:
    """Create every table."""
    op.create_table(
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
    op.create_table(
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
    )
    op.create_index(op.f("ix_user_aliases_user_id"), "user_aliases", ["user_id"])
    op.create_table(
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
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_requests")),
    )
    op.create_index(op.f("ix_api_requests_alias"), "api_requests", ["alias"])
    op.create_index(op.f("ix_api_requests_created_at"), "api_requests", ["created_at"])
    op.create_table(
        "custom_domains",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("alias", sa.String(length=255), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_custom_domains")),
        sa.UniqueConstraint("host", name=op.f("uq_custom_domains_host")),
    )
    op.create_index(op.f("ix_custom_domains_alias"), "custom_domains", ["alias"])


def downgrade() -> None:
    """Drop every table."""
    op.drop_table("custom_domains")
    op.drop_table("api_requests")
    op.drop_table("user_aliases")
    op.drop_table("users")


def make_legacy_database(connection: Connection) -> None:
    """Create Comzy 0.1's tables and stamp ``alembic_version`` at 0001, on an open connection."""
    context = MigrationContext.configure(connection)
    with Operations.context(context):
        upgrade()
    version = sa.table("alembic_version", sa.column("version_num", sa.String(32)))
    op_table = sa.Table("alembic_version", sa.MetaData(),
                        sa.Column("version_num", sa.String(32), primary_key=True))
    op_table.create(connection)
    connection.execute(sa.insert(version).values(version_num="0001"))
