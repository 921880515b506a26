"""Users, tokens and owned aliases: token format and hashing, and the database rows."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from comzy.db import utc_now

from .models import User, UserAlias

#: Tokens start with this, so a leaked one is easy to recognise (and to scan for in code).
TOKEN_PREFIX = "czy_"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


class DatabaseSlow(Exception):
    """A database call did not finish within the plugin's deadline."""


class UserError(ValueError):
    """A user name or operation that cannot be done; the message says why, for a person."""


def new_token() -> str:
    """A fresh token: the prefix and 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The SHA-256 hex digest stored for ``token``.

    Tokens are 256-bit random strings, not passwords: a fast hash is enough, since nobody can
    guess a preimage, and it lets the server find a user by token in one indexed lookup.
    """
    return hashlib.sha256(token.strip().encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two token hashes."""
    return hmac.compare_digest(a.encode(), b.encode())


def fingerprint(token_hash: str) -> str:
    """A short, public tag of a token (which token a tunnel used; shown in listings)."""
    return token_hash[:12]


def check_name(name: str) -> str:
    """``name`` if it can name a user; :class:`UserError` otherwise."""
    if not _NAME_RE.fullmatch(name):
        raise UserError(f"'{name}' is not a valid user name: use 1-64 letters, digits and . _ @ + -, "
                        "starting with a letter or digit")
    return name


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user as the plugin keeps it in memory."""

    id: int
    name: str
    token_hash: str
    revoked: bool


@dataclass(frozen=True, slots=True)
class AliasRecord:
    """An owned alias: who owns it and the local port it was first used for."""

    alias: str
    user_id: int
    port: int
    created_at: datetime


async def load_users(engine: AsyncEngine) -> list[UserRecord]:
    """Every user, revoked ones included."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(User.id, User.name, User.token_hash, User.revoked_at))).all()
    return [UserRecord(r.id, r.name, r.token_hash, r.revoked_at is not None) for r in rows]


async def find_user(engine: AsyncEngine, token_hash: str) -> UserRecord | None:
    """The user whose token hashes to ``token_hash``, or None."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(User.id, User.name, User.token_hash, User.revoked_at)
                                  .where(User.token_hash == token_hash))).first()
    if row is None or not same_hash(row.token_hash, token_hash):
        return None
    return UserRecord(row.id, row.name, row.token_hash, row.revoked_at is not None)


async def load_aliases(engine: AsyncEngine) -> list[AliasRecord]:
    """Every owned alias, oldest first."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(UserAlias.alias, UserAlias.user_id, UserAlias.port, UserAlias.created_at)
                                   .order_by(UserAlias.id))).all()
    return [AliasRecord(r.alias, r.user_id, r.port, r.created_at) for r in rows]


async def claim_alias(engine: AsyncEngine, user_id: int, alias: str, port: int) -> AliasRecord:
    """Record ``alias`` as owned by ``user_id``; IntegrityError if someone owns it already."""
    created = utc_now()
    async with engine.begin() as conn:
        await conn.execute(insert(UserAlias).values(user_id=user_id, alias=alias, port=port, created_at=created))
    return AliasRecord(alias, user_id, port, created)


async def release_alias(engine: AsyncEngine, user_id: int, alias: str) -> bool:
    """Forget that ``user_id`` owns ``alias``; False if they did not."""
    async with engine.begin() as conn:
        result = await conn.execute(delete(UserAlias).where(UserAlias.user_id == user_id, UserAlias.alias == alias))
    return bool(result.rowcount)


async def create_user(engine: AsyncEngine, name: str) -> str:
    """Create user ``name``; returns their token (the only time it exists in clear)."""
    token = new_token()
    async with engine.begin() as conn:
        taken = (await conn.execute(select(User.id).where(User.name == name))).first()
        if taken is not None:
            raise UserError(f"user '{name}' exists already; `comzy-server users rotate {name}` gives them "
                            "a new token")
        await conn.execute(insert(User).values(name=name, token_hash=hash_token(token), created_at=utc_now()))
    return token


async def rotate_token(engine: AsyncEngine, name: str) -> str:
    """Give ``name`` a new token (the old one stops working; a revoked user is active again)."""
    token = new_token()
    async with engine.begin() as conn:
        result = await conn.execute(update(User).where(User.name == name)
                                    .values(token_hash=hash_token(token), revoked_at=None))
    if not result.rowcount:
        raise UserError(f"no user '{name}' (`comzy-server users list` shows them)")
    return token


async def revoke_user(engine: AsyncEngine, name: str) -> bool:
    """Revoke ``name``'s token; False if it was revoked already. Their aliases stay theirs."""
    async with engine.begin() as conn:
        row = (await conn.execute(select(User.id, User.revoked_at).where(User.name == name))).first()
        if row is None:
            raise UserError(f"no user '{name}' (`comzy-server users list` shows them)")
        if row.revoked_at is not None:
            return False
        await conn.execute(update(User).where(User.id == row.id).values(revoked_at=utc_now()))
    return True


@dataclass(frozen=True, slots=True)
class UserListing:
    """One line of ``comzy-server users list``."""

    name: str
    created_at: datetime
    revoked_at: datetime | None
    aliases: int


async def list_users(engine: AsyncEngine) -> list[UserListing]:
    """Every user with their number of owned aliases, by name."""
    counts = (select(UserAlias.user_id, func.count().label("n")).group_by(UserAlias.user_id).subquery())
    query = (select(User.name, User.created_at, User.revoked_at, func.coalesce(counts.c.n, 0).label("aliases"))
             .outerjoin(counts, counts.c.user_id == User.id).order_by(User.name))
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [UserListing(r.name, r.created_at, r.revoked_at, int(r.aliases)) for r in rows]


__all__ = ["AliasRecord", "DatabaseSlow", "UserError", "UserRecord", "check_name", "claim_alias", "create_user",
           "find_user", "fingerprint", "hash_token", "list_users", "load_aliases", "load_users", "release_alias",
           "revoke_user", "rotate_token", "same_hash"]
