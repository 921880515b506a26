"""``comzy-server users create|list|revoke|rotate``: the users kept in the database.

The plugin adds the command through the ``register_commands`` hook (:func:`add_commands`).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import anyio
from sqlalchemy.exc import SQLAlchemyError

from comzy import ServerSettings
from comzy.db import DatabaseError, describe_error, masked_url, prepare_database

from .models import SCHEMA
from .store import UserError, check_name, create_user, list_users, revoke_user, rotate_token

if TYPE_CHECKING:
    from comzy import CommandContext, Commands


def add_commands(commands: Commands) -> None:
    """``comzy-server users`` and its actions."""
    users = commands.add("users", run_users, help="users and their tokens",
                         description="Manage the users kept in the database (COMZY_DATABASE_URL, or DB_*, "
                         "or comzy.db in COMZY_DATA_DIR). Tokens are stored hashed: create and rotate "
                         "print a token once, as the last line of their output.",
                         epilog="examples:\n"
                         "  comzy-server users create ana    add ana; her token is the last line (shown once)\n"
                         "  comzy-server users list          every user, active or revoked, with her aliases\n"
                         "  comzy-server users rotate ana    a new token for ana; the old one stops working\n"
                         "  comzy-server users revoke ana    her token stops working, her live tunnels close\n\n"
                         "Run it with the server's environment (the same COMZY_PLUGINS and database); ana then\n"
                         "runs `comzy login` with her token.")
    actions = users.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("create", help="add a user and print their token").add_argument("name", metavar="NAME")
    actions.add_parser("list", help="print every user, active or revoked")
    actions.add_parser("revoke", help="stop NAME's token working (their live tunnels close)").add_argument(
        "name", metavar="NAME")
    actions.add_parser("rotate", help="give NAME a new token (the old one stops working)").add_argument(
        "name", metavar="NAME")


def run_users(args: argparse.Namespace, context: CommandContext) -> int:
    """Run ``comzy-server users ACTION``; the exit status."""
    return run_users_command(context.settings, args.action, getattr(args, "name", None))


def _fail(message: str, status: int = 2) -> int:
    print(f"comzy-server: {message}", file=sys.stderr)
    return status


def _print_token(name: str, token: str, what: str) -> None:
    # The token is the last line, bare, so scripts can take it with `| tail -n1`.
    print(f"{what} {name}. Their token is shown only now; give it to them for `comzy login`:")
    print(token)


async def _users(settings: ServerSettings, action: str, name: str | None) -> int:
    if name is not None:
        try:
            name = check_name(name)
        except UserError as exc:
            return _fail(str(exc))
    engine = await prepare_database(settings, SCHEMA)  # the embedded SQLite default upgrades itself
    try:
        if action == "create":
            assert name is not None
            _print_token(name, await create_user(engine, name), "created user")
        elif action == "rotate":
            assert name is not None
            _print_token(name, await rotate_token(engine, name), "new token for")
            print("(the old token stops working; a running server closes its tunnels within "
                  "COMZY_AUTH_REFRESH_SECONDS)", file=sys.stderr)
        elif action == "revoke":
            assert name is not None
            if not await revoke_user(engine, name):
                print(f"{name}'s token was revoked already (`comzy-server users rotate {name}` issues a new one)")
            else:
                print(f"revoked {name}'s token; a running server closes their tunnels within "
                      "COMZY_AUTH_REFRESH_SECONDS (5 s by default). Their aliases stay reserved for them.")
        elif action == "list":
            users = await list_users(engine)
            if not users:
                print("no users (create one with `comzy-server users create NAME`)")
            width = max((len(u.name) for u in users), default=0)
            for u in users:
                state = f"revoked {u.revoked_at:%Y-%m-%d %H:%M}" if u.revoked_at else "active"
                owned = f"{u.aliases} {'alias' if u.aliases == 1 else 'aliases'}"
                print(f"{u.name:<{width}}  {state:<24}  {owned:<11}  created {u.created_at:%Y-%m-%d %H:%M}")
        else:
            raise ValueError(f"unknown users action {action!r}")
        return 0
    except UserError as exc:
        return _fail(str(exc), 1)
    except (SQLAlchemyError, OSError) as exc:
        url = engine.url
        return _fail(f"cannot use the database {masked_url(url)}: {describe_error(exc, url)}", 1)
    finally:
        await engine.dispose()


def run_users_command(settings: ServerSettings, action: str, name: str | None = None) -> int:
    """``comzy-server users create NAME | list | revoke NAME | rotate NAME``; the exit status."""
    try:
        return anyio.run(_users, settings, action, name)
    except DatabaseError as exc:
        return _fail(str(exc))
