"""Users with tokens, aliases they own, and the account API the stock agent calls."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from comzy import AdminRoute, Periodic, Registration, Reject, Schema, Tunnel, hookimpl
from comzy.aliases import check_alias, random_alias

from .api import AccountApi
from .settings import AuthTokenSettings
from .store import (
    AliasRecord,
    DatabaseSlow,
    UserRecord,
    claim_alias,
    find_user,
    fingerprint,
    hash_token,
    load_aliases,
    load_users,
    release_alias,
    same_hash,
)
from .throttle import FailureThrottle, Throttled, UnknownTokens

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from comzy import Commands, ServerContext

log = logging.getLogger("comzy.plugins.auth_token")

T = TypeVar("T")

#: This plugin's name: the key of what it keeps on a registration and its tunnel (``plugin_state``).
NAME = "auth_token"
LOGIN_HINT = "run `comzy login` with a token from the server's operator"
UNAVAILABLE = "the server cannot check tokens right now (its database is unavailable); try again in a minute"
NO_RECORD = "the server cannot record your alias right now (its database is unavailable); try again in a minute"
#: The bus topic of claims and releases: in a cluster, the other nodes learn them at once instead of
#: at their next refresh (the database's unique key still decides races).
ALIASES_TOPIC = "auth_token.aliases"


class AuthToken:
    """Authenticates agents by token, gives users the aliases they own, and enforces revocation.

    Users and owned aliases live in memory, re-read every ``refresh_seconds``, so agents that
    reconnect (after a server restart, say) are recognised even while the database is down. A
    token the memory does not know is looked up in the database at once, so a user created
    with ``comzy-server users create`` can connect straight away. The request path never
    touches any of this.
    """

    def __init__(self, settings: AuthTokenSettings | None = None) -> None:
        self.settings = settings or AuthTokenSettings()
        self.users_by_hash: dict[str, UserRecord] = {}
        self.users_by_id: dict[int, UserRecord] = {}
        self.aliases: dict[str, AliasRecord] = {}
        self._engine: AsyncEngine | None = None
        self._server: ServerContext | None = None
        # One claim at a time per user (the limit holds under races); users never wait for each other.
        self._claim_locks: dict[int, anyio.Lock] = {}
        # Tunnel sessions being closed for a dead token: a new session on the same alias is not one.
        self._closing: set[int] = set()
        # Claims and releases made while a refresh reads the table, re-applied over what it read.
        self._refreshing = False
        self._claimed_meanwhile: dict[str, AliasRecord] = {}
        self._released_meanwhile: set[str] = set()
        # Token guessing: refused per address past the limit, and unknown tokens cost no query twice.
        self.throttle = FailureThrottle(self.settings.max_failures_per_minute)
        self.unknown_tokens = UnknownTokens(self.settings.unknown_token_seconds)
        self._failing = False
        # Re-reads the database for the server's lifetime (made at start-up).
        self._refresher: Periodic | None = None
        self.refreshes = 0

    @property
    def engine(self) -> AsyncEngine:
        """The database engine (after start-up)."""
        if self._engine is None:
            raise RuntimeError("auth_token: the plugin has not started")
        return self._engine

    async def _within_deadline(self, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, or DatabaseSlow after ``database_timeout`` seconds.

        The call runs in a task of its own and is never cancelled half-way (a query cut off can
        wedge its connection); a late one finishes in the background, and its result is dropped.
        """
        assert self._server is not None
        outcome: list[T] = []
        failure: list[BaseException] = []
        done = anyio.Event()

        async def run() -> None:
            try:
                outcome.append(await call())
            except Exception as exc:
                failure.append(exc)
            finally:
                done.set()

        self._server.task_group.start_soon(run)
        with anyio.move_on_after(self.settings.database_timeout):
            await done.wait()
        if failure:
            raise failure[0]
        if not outcome:
            raise DatabaseSlow(f"no answer within {self.settings.database_timeout:g} s")
        return outcome[0]

    # -- lifecycle ---------------------------------------------------------------------
    @hookimpl
    def register_commands(self, commands: Commands) -> None:
        """``comzy-server users`` (cli.py)."""
        from .cli import add_commands  # its modules load only for comzy-server's commands

        add_commands(commands)

    @hookimpl
    def database_schema(self) -> Schema:
        """``users`` and ``user_aliases`` (models.py), with their migrations."""
        from .models import SCHEMA  # SQLAlchemy loads only when the database is wanted

        return SCHEMA

    @hookimpl
    async def on_startup(self, server: ServerContext) -> None:
        """Open the database, load users and aliases, start the refresher."""
        from comzy.db import prepare_database  # SQLAlchemy loads only with the plugin

        self._engine = await prepare_database(server.settings, self.database_schema())
        self._server = server
        server.bus.subscribe(ALIASES_TOPIC, self._on_alias_event)
        await self.refresh(server)
        users, owned, limit = len(self.users_by_id), len(self.aliases), self.settings.max_aliases_per_user
        log.info("auth: %d %s, %d owned %s; anonymous agents %s; at most %d %s per user",
                 users, "user" if users == 1 else "users", owned, "alias" if owned == 1 else "aliases",
                 "refused (COMZY_REQUIRE_TOKEN)" if self.settings.require_token else "allowed",
                 limit, "alias" if limit == 1 else "aliases")
        self._refresher = Periodic(lambda: self.refresh(server), self.settings.refresh_seconds)
        self._refresher.start(server.task_group)

    @hookimpl
    async def on_shutdown(self) -> None:
        """Stop the refresher (never mid-query), then dispose of the engine."""
        if self._refresher is not None:
            await self._refresher.stop()
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()

    async def refresh(self, server: ServerContext) -> None:
        """Re-read users and aliases, then close live tunnels whose token no longer works.

        On a database error the known users and aliases stay in force.
        """
        async def read() -> tuple[list[UserRecord], list[AliasRecord]]:
            engine = self.engine
            return await load_users(engine), await load_aliases(engine)

        self._refreshing = True
        try:
            # Within the deadline: a database that stops answering must not stall the refresher
            # (and with it the server's shutdown); a late read finishes unseen.
            users, aliases = await self._within_deadline(read)
        except (SQLAlchemyError, OSError, DatabaseSlow) as exc:
            if not self._failing:
                log.warning("auth: cannot read users from the database (%s); keeping the %d known users",
                            type(exc).__name__, len(self.users_by_id))
            self._failing = True
            return
        finally:
            self._refreshing = False
            claimed, released = self._claimed_meanwhile, self._released_meanwhile
            self._claimed_meanwhile, self._released_meanwhile = {}, set()
        if self._failing:
            log.info("auth: the database is readable again")
            self._failing = False
        self.users_by_hash = {u.token_hash: u for u in users}
        self.users_by_id = {u.id: u for u in users}
        # What was claimed or released while the table was being read may be missing from it.
        current = {a.alias: a for a in aliases if a.alias not in released}
        current.update(claimed)
        self.aliases = current
        self.refreshes += 1
        self._enforce(server)

    def _enforce(self, server: ServerContext) -> None:
        live = server.tunnels()
        self._closing &= {t.session for t in live}
        for tunnel in live:
            state = tunnel.metadata.get(NAME, {})
            user_id = state.get("user_id")
            if user_id is None or tunnel.session in self._closing:
                continue
            user = self.users_by_id.get(user_id)
            if user is None:
                reason = f"the user {tunnel.user} no longer exists on this server"
            elif user.revoked:
                reason = f"your token was revoked by the server's operator; {LOGIN_HINT}"
            elif fingerprint(user.token_hash) != state.get("token"):
                reason = "your token was replaced (`comzy-server users rotate`); run `comzy login` with the new one"
            else:
                continue
            log.info("auth: closing tunnel %s of %s: %s", tunnel.alias, tunnel.user, reason.split(";")[0])
            self._closing.add(tunnel.session)
            server.task_group.start_soon(self._close, server, tunnel, reason)

    @staticmethod
    async def _close(server: ServerContext, tunnel: Tunnel, reason: str) -> None:
        # Only this session: a new one on the alias (a fresh login) has its own token to answer for.
        if server.tunnel(tunnel.alias) is tunnel:
            await server.close_tunnel(tunnel.alias, reason)

    # -- who is this? ------------------------------------------------------------------
    async def authenticate(self, token: str, client: str | None = None) -> UserRecord:
        """The active user holding ``token``; ``Reject`` with what to do otherwise.

        With ``client`` (the address asking), a failure counts towards that address's limit,
        and an address past it is refused with 429 before its token is even looked at: else a
        right guess would still show, and guessing would go on at full speed.
        """
        if client is None:
            return await self._check(token)
        try:
            attempt = self.throttle.begin(client)
        except Throttled as exc:
            if exc.first:  # once per address and window: an attack never floods the log
                log.warning("auth: %d failed token checks from %s within a minute; refusing its token checks "
                            "for %d s (COMZY_AUTH_MAX_FAILURES_PER_MINUTE)", exc.failures, exc.key, exc.retry_after)
            raise Reject(f"too many failed token checks from your address; try again in {exc.retry_after} s",
                         status=429, headers=[(b"retry-after", str(exc.retry_after).encode())]) from None
        failed = False
        try:
            return await self._check(token)
        except Reject:
            # A database outage (503) counts too: while it lasts, guesses could still be matched
            # against the users held in memory, and only the throttle would slow them down.
            failed = True
            raise
        finally:
            if not failed:
                attempt.forgive()

    async def _check(self, token: str) -> UserRecord:
        digest = hash_token(token)
        user = self.users_by_hash.get(digest)
        if user is None or not same_hash(user.token_hash, digest):
            user = None
            if digest not in self.unknown_tokens:  # not refused moments ago: ask the database
                try:
                    user = await self._within_deadline(lambda: find_user(self.engine, digest))
                except (SQLAlchemyError, OSError, DatabaseSlow):
                    raise Reject(UNAVAILABLE, status=503) from None
                if user is None:
                    self.unknown_tokens.add(digest)
                else:
                    self.users_by_hash[digest] = user
                    self.users_by_id[user.id] = user
        if user is None:
            raise Reject(f"the token was not accepted (unknown, mistyped, or replaced by a newer one); {LOGIN_HINT}",
                         status=401)
        if user.revoked:
            raise Reject(f"the token of {user.name} has been revoked; {LOGIN_HINT}", status=401)
        return user

    def owned_by(self, user_id: int) -> list[AliasRecord]:
        """The aliases ``user_id`` owns, oldest first."""
        return [a for a in self.aliases.values() if a.user_id == user_id]

    # -- hooks ---------------------------------------------------------------------------
    @hookimpl
    def alias_owner(self, alias: str) -> str | None:
        """The name of the user who owns ``alias``."""
        record = self.aliases.get(alias)
        if record is None:
            return None
        user = self.users_by_id.get(record.user_id)
        return user.name if user is not None else f"user #{record.user_id}"

    # First, so later plugins (anonymous_timeout among them) see who the agent is.
    @hookimpl(tryfirst=True)
    async def on_register(self, registration: Registration, server: ServerContext) -> None:
        """Authenticate the token and grant the user's alias; refuse anonymous agents if required."""
        if not registration.token:
            if self.settings.require_token:
                raise Reject(f"this server accepts logged-in agents only: {LOGIN_HINT}")
            return
        user = await self.authenticate(registration.token, registration.client_address)
        registration.user = user.name
        state = registration.plugin_state(NAME)
        state["user_id"] = user.id
        state["token"] = fingerprint(user.token_hash)
        registration.alias = await self._alias_for(user, registration, server)

    async def _alias_for(self, user: UserRecord, registration: Registration, server: ServerContext) -> str:
        """The alias ``user`` gets: the one asked for, or the one kept for this port, or a new one."""
        wanted = registration.requested_alias
        if wanted:
            problem = check_alias(wanted, server.settings.reserved,
                                  allow_punycode=server.settings.allow_punycode_aliases)
            if problem:
                raise Reject(problem)
        # Aliases the user owns already come from memory: no lock, no database, no waiting.
        known = self._owned_alias(user, wanted, registration.port)
        if known:
            return known
        async with self._claim_locks.setdefault(user.id, anyio.Lock()):
            known = self._owned_alias(user, wanted, registration.port)  # claimed while waiting for the lock
            if known:
                return known
            mine = self.owned_by(user.id)
            if wanted:
                live = server.tunnel(wanted)
                if live is not None and live.user != user.name:
                    raise Reject(f"'{wanted}' is in use by another agent right now; choose another --subdomain")
            else:
                wanted = self._fresh_alias(server)
            limit = self.settings.max_aliases_per_user
            if len(mine) >= limit:
                names = ", ".join(a.alias for a in mine)
                owned = f"{len(mine)} {'alias' if len(mine) == 1 else 'aliases'}"
                raise Reject(f"you own {owned}, the most this server allows (MAX_ALIASES_PER_USER="
                             f"{limit}): {names}. Free one with `comzy aliases release NAME`, or reuse one "
                             "with --subdomain NAME")
            name = wanted
            try:
                record = await self._within_deadline(lambda: claim_alias(self.engine, user.id, name,
                                                                         registration.port))
            except IntegrityError:
                raise Reject(f"'{name}' was just taken by another user; choose another --subdomain") from None
            except (SQLAlchemyError, OSError, DatabaseSlow):
                raise Reject(NO_RECORD) from None
            self._remember(record)
            server.bus.publish(ALIASES_TOPIC, {"op": "claim", "alias": name, "user_id": user.id,
                                               "port": registration.port, "at": record.created_at.timestamp()})
            log.info("auth: %s now owns %s (port %d)", user.name, name, registration.port)
            return name

    def _owned_alias(self, user: UserRecord, wanted: str | None, port: int) -> str | None:
        """The alias ``user`` already owns for this registration (``wanted``, or the one kept for
        ``port``), None if there is none yet; Reject if ``wanted`` is someone else's."""
        if wanted:
            record = self.aliases.get(wanted)
            if record is None:
                return None
            if record.user_id != user.id:
                raise Reject(f"'{wanted}' belongs to another user; choose another --subdomain")
            return wanted
        return next((r.alias for r in self.owned_by(user.id) if r.port == port), None)

    def _remember(self, record: AliasRecord) -> None:
        self.aliases[record.alias] = record
        if self._refreshing:
            self._claimed_meanwhile[record.alias] = record
            self._released_meanwhile.discard(record.alias)

    def _forget(self, alias: str) -> None:
        self.aliases.pop(alias, None)
        if self._refreshing:
            self._released_meanwhile.add(alias)
            self._claimed_meanwhile.pop(alias, None)

    def _fresh_alias(self, server: ServerContext) -> str:
        while True:
            name = random_alias()
            # A name some plugin keeps for its owner (a custom domain's alias) is never handed out.
            if (name not in self.aliases and server.tunnel(name) is None
                    and server.hooks.alias_reserved(name, server) is None):
                return name

    async def release(self, user: UserRecord, alias: str) -> bool:
        """Give up ``user``'s ownership of ``alias`` (a live tunnel on it keeps running).

        Raises DatabaseSlow, SQLAlchemyError or OSError when the database cannot do it now.
        """
        async with self._claim_locks.setdefault(user.id, anyio.Lock()):
            record = self.aliases.get(alias)
            if record is None or record.user_id != user.id:
                return False
            await self._within_deadline(lambda: release_alias(self.engine, user.id, alias))
            self._forget(alias)
        if self._server is not None:
            self._server.bus.publish(ALIASES_TOPIC, {"op": "release", "alias": alias, "user_id": user.id})
        log.info("auth: %s released %s", user.name, alias)
        return True

    def _on_alias_event(self, node: str, event: dict[str, Any]) -> None:
        """Apply another node's claim or release to the aliases in memory (this node's own are applied)."""
        if self._server is None or node == self._server.node:
            return
        op, alias, user_id = event.get("op"), event.get("alias"), event.get("user_id")
        if not isinstance(alias, str) or not isinstance(user_id, int):
            return  # "lagged", or not ours: the next refresh reads the truth from the database
        if op == "claim":
            created = datetime.fromtimestamp(float(event.get("at") or time.time()), UTC)
            self._remember(AliasRecord(alias, user_id, int(event.get("port") or 0), created))
        elif op == "release":
            record = self.aliases.get(alias)
            if record is not None and record.user_id == user_id:
                self._forget(alias)

    @hookimpl
    def agent_routes(self, server: ServerContext) -> list[AdminRoute]:
        """The account API: ``/api/v1/me`` and ``/api/v1/aliases``."""
        api = AccountApi(self, server)
        return [AdminRoute("/api/v1/me", api), AdminRoute("/api/v1/aliases", api)]
