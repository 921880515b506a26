"""Built-in plugin ``auth_token``: users with tokens, owned aliases, and the account API (see README.md)."""

from .plugin import AuthToken
from .settings import AuthTokenSettings

__all__ = ["AuthToken", "AuthTokenSettings"]
