"""Built-in plugin ``mysql_logging``: one ``api_requests`` row per proxied request (see README.md)."""

from .plugin import MysqlLogging
from .settings import MysqlLoggingSettings

__all__ = ["MysqlLogging", "MysqlLoggingSettings"]
