"""api_requests: times with microseconds on MySQL/MariaDB, long paths and methods kept, cuts marked.

- ``created_at`` becomes ``DATETIME(6)`` on MySQL/MariaDB (plain ``DATETIME`` kept whole seconds,
  while SQLite and PostgreSQL kept microseconds); nothing changes on the other databases.
- ``path`` becomes TEXT (was VARCHAR(1024)) and ``method`` VARCHAR(64) (was 16): the plugin keeps
  them whole up to its limits, and a cut one ends with `` [cut]``;
- ``cut`` (boolean, false for every existing row) says a row's method or path was cut.

Existing rows are kept (SQLite copies the table, which cannot change a column's type in place).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from comzy.migrations import set_time_precision

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_METHOD, OLD_PATH = 16, 1024


def upgrade() -> None:
    """Widen ``method`` and ``path``, add ``cut``, and keep microseconds in ``created_at``."""
    with op.batch_alter_table("api_requests") as batch:
        batch.alter_column("method", type_=sa.String(length=64), existing_type=sa.String(length=OLD_METHOD),
                           existing_nullable=False)
        batch.alter_column("path", type_=sa.Text(), existing_type=sa.String(length=OLD_PATH), existing_nullable=False)
        batch.add_column(sa.Column("cut", sa.Boolean(), server_default=sa.false(), nullable=False))
    set_time_precision("api_requests", "created_at", microseconds=True, default_now=True)


def downgrade() -> None:
    """Back to 0001's columns: longer methods and paths are cut to fit (without a marker), times
    rounded to whole seconds on MySQL/MariaDB, and ``cut`` dropped."""
    requests = sa.table("api_requests", sa.column("method", sa.String()), sa.column("path", sa.Text()))
    for column, length in ((requests.c.method, OLD_METHOD), (requests.c.path, OLD_PATH)):
        op.execute(requests.update().where(sa.func.length(column) > length)
                   .values({column.name: sa.func.substr(column, 1, length)}))
    set_time_precision("api_requests", "created_at", microseconds=False, default_now=True)
    with op.batch_alter_table("api_requests") as batch:
        batch.drop_column("cut")
        batch.alter_column("path", type_=sa.String(length=OLD_PATH), existing_type=sa.Text(), existing_nullable=False)
        batch.alter_column("method", type_=sa.String(length=OLD_METHOD), existing_type=sa.String(length=64),
                           existing_nullable=False)
