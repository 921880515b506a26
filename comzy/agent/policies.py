"""Traffic policies the stock agent asks the server to enforce: ``--basic-auth``.

A policy is data for a server plugin (HELLO ``plugins``) plus that plugin's name in HELLO
``require``, so a server that cannot enforce it refuses the tunnel instead of opening it
unprotected (docs/protocol.md, "Policies"). The server's side is the ``basic_auth`` plugin; the
agent never imports it (the agent knows plugins only by the data it sends), so the format below is
the contract, documented in comzy/plugins/basic_auth/README.md.

Passwords never leave this process in clear: each one is sent as a salted scrypt hash, made once
at start-up (the same data serves every reconnect).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

#: The server plugin that enforces ``--basic-auth``.
BASIC_AUTH = "basic_auth"
#: scrypt's cost: N=2^14, r=8, p=1 (16 MiB and about 50 ms per hash on a 2020s core), the
#: parameters scrypt's paper gives for interactive logins. The server accepts N up to 2^15.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
#: At most this many ``--basic-auth`` credentials (the server accepts no more).
MAX_CREDENTIALS = 32
#: A password shorter than this is refused: the hash is only as strong as the password.
MIN_PASSWORD = 8
MAX_FIELD = 255


def parse_credential(text: str) -> tuple[str, str]:
    """``user:password`` split at the first ``:``; ValueError says what is wrong (without the password)."""
    user, colon, password = text.partition(":")
    if not colon:
        raise ValueError("--basic-auth takes USER:PASSWORD (a ':' between them)")
    if not user:
        raise ValueError("--basic-auth needs a user name before the ':'")
    if len(user) > MAX_FIELD or not user.isprintable():
        raise ValueError(f"--basic-auth user names are printable text of at most {MAX_FIELD} characters")
    if not MIN_PASSWORD <= len(password) <= MAX_FIELD:
        raise ValueError(f"--basic-auth passwords need {MIN_PASSWORD} to {MAX_FIELD} characters "
                         f"(user '{user}': {len(password)})")
    return user, password


def hash_password(password: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    """scrypt of the password's UTF-8 bytes: what the server's plugin computes from a visitor's."""
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES, maxmem=64 * 1024 * 1024)


@dataclass
class BasicAuth:
    """``--basic-auth USER:PASSWORD`` (repeatable) and ``--basic-auth-forward``."""

    credentials: list[tuple[str, str]] = field(default_factory=list)
    forward: bool = False

    @classmethod
    def parse(cls, texts: list[str], forward: bool) -> BasicAuth:
        """From the command line; ValueError for a malformed credential or too many."""
        if len(texts) > MAX_CREDENTIALS:
            raise ValueError(f"at most {MAX_CREDENTIALS} --basic-auth credentials")
        return cls([parse_credential(text) for text in texts], forward)

    @property
    def users(self) -> list[str]:
        """The user names, each once, in order."""
        return list(dict.fromkeys(user for user, _ in self.credentials))

    def plugin_data(self) -> dict[str, Any]:
        """The ``basic_auth`` plugin's HELLO data: per credential, the user, a random salt and the
        scrypt hash (both base64), with the cost; never a password."""
        entries = []
        for user, password in self.credentials:
            salt = os.urandom(SALT_BYTES)
            entries.append({"user": user, "salt": _b64(salt), "hash": _b64(hash_password(password, salt))})
        return {"scheme": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "credentials": entries,
                "forward": self.forward}

    def describe(self) -> str:
        """The policy in force, for the line under the public URL."""
        forward = "forwarded" if self.forward else "not forwarded"
        return f"basic auth for {', '.join(self.users)} (the Authorization header is {forward} to the local app)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
