"""Reading and writing ``example_blocked``: what the writer task, the admin route and the commands share.

Every function takes an async engine (from ``comzy.db.prepare_database``) and runs its own
short transaction, so the server and a ``comzy-server example`` command can use the table at
the same time (SQLite in WAL mode included).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from comzy import ForwardRequest
from comzy.aliases import ALIAS_RE
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .models import ALIAS_LENGTH, CLIENT_LENGTH, METHOD_LENGTH, PATH_LENGTH, BlockedRow

#: The most rows one question returns (the admin route's and the command's ``limit``).
MAX_LIMIT = 1000
# Printable ASCII is kept as sent; anything else is %-escaped, so the column holds ASCII whatever
# the table's character set (MariaDB's default is not always UTF-8).
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


@dataclass(frozen=True, slots=True)
class BlockedRequest:
    """A request the plugin refused: where it went, what it asked for, who asked, when (unix time)."""

    alias: str
    method: str
    path: str
    client: str | None
    blocked_at: float

    @classmethod
    def of(cls, request: ForwardRequest, when: float) -> BlockedRequest:
        """The record of ``request``, refused at ``when``; cut to the columns' lengths."""
        # The target without its query string: queries can carry tokens, and the table is not a secret store.
        path = quote(request.target.split(b"?", 1)[0], safe=_PATH_SAFE)[:PATH_LENGTH]
        return cls(request.alias[:ALIAS_LENGTH], request.method[:METHOD_LENGTH], path,
                   request.client[:CLIENT_LENGTH] or None, when)

    def to_json(self) -> dict[str, Any]:
        """The record as the admin route answers it (``blocked_at`` in ISO 8601, UTC)."""
        when = datetime.fromtimestamp(self.blocked_at, UTC).isoformat(timespec="seconds")
        return {"alias": self.alias, "method": self.method, "path": self.path, "client": self.client,
                "blocked_at": when}


def check_alias(value: str) -> str:
    """``value`` as an alias (lowercase); ValueError saying what an alias looks like otherwise."""
    alias = value.strip().lower()
    if not ALIAS_RE.fullmatch(alias):  # the core's own rule: a DNS label
        raise ValueError(f"{value!r} is not an alias: use 1 to 63 letters, digits and '-' (not first or last)")
    return alias


def check_limit(value: int) -> int:
    """``value`` if it is a row count one question may ask for; ValueError otherwise."""
    if not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"the limit must be between 1 and {MAX_LIMIT}, not {value}")
    return value


def _row(record: BlockedRequest) -> dict[str, Any]:
    return {"alias": record.alias, "method": record.method, "path": record.path, "client": record.client,
            "blocked_at": datetime.fromtimestamp(record.blocked_at, UTC)}


def _record(row: Any) -> BlockedRequest:
    when: datetime = row.blocked_at
    if when.tzinfo is None:  # SQLite and MariaDB give UTC back without a zone
        when = when.replace(tzinfo=UTC)
    return BlockedRequest(row.alias, row.method, row.path, row.client, when.timestamp())


async def write_batch(engine: AsyncEngine, batch: list[BlockedRequest], keep_per_alias: int) -> None:
    """Insert ``batch`` and trim each alias in it to its newest ``keep_per_alias`` rows, in one transaction."""
    async with engine.begin() as connection:
        await connection.execute(insert(BlockedRow), [_row(record) for record in batch])
        for alias in sorted({record.alias for record in batch}):
            await _trim(connection, alias, keep_per_alias)


async def _trim(connection: AsyncConnection, alias: str, keep: int) -> None:
    # The id of the newest row beyond the bound, then one DELETE up to it: portable (MariaDB refuses
    # a DELETE whose subquery reads the same table, and DELETE ... LIMIT is not standard).
    edge = (await connection.execute(
        select(BlockedRow.id).where(BlockedRow.alias == alias)
        .order_by(BlockedRow.id.desc()).offset(keep).limit(1))).scalar()
    if edge is not None:
        await connection.execute(delete(BlockedRow).where(BlockedRow.alias == alias, BlockedRow.id <= edge))


async def delete_older_than(engine: AsyncEngine, days: float) -> int:
    """Delete the rows blocked more than ``days`` ago; how many."""
    cutoff = datetime.now(UTC) - timedelta(days=days)
    async with engine.begin() as connection:
        return (await connection.execute(delete(BlockedRow).where(BlockedRow.blocked_at < cutoff))).rowcount


async def newest(engine: AsyncEngine, alias: str | None, limit: int) -> list[BlockedRequest]:
    """The ``limit`` newest blocked requests (of ``alias`` only, unless None), newest first."""
    query = select(BlockedRow).order_by(BlockedRow.id.desc()).limit(limit)
    if alias is not None:
        query = query.where(BlockedRow.alias == alias)
    async with engine.connect() as connection:
        return [_record(row) for row in (await connection.execute(query)).all()]


async def purge(engine: AsyncEngine, alias: str | None = None) -> int:
    """Delete the blocked requests of ``alias`` (of every alias when None); how many."""
    statement = delete(BlockedRow)
    if alias is not None:
        statement = statement.where(BlockedRow.alias == alias)
    async with engine.begin() as connection:
        return (await connection.execute(statement)).rowcount
