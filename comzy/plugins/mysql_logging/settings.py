"""Settings of the mysql_logging plugin (prefix COMZY_MYSQL_LOGGING_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MysqlLoggingSettings(BaseSettings):
    """How request rows are queued, batched, retried and kept.

    The database itself is the server's (``COMZY_DATABASE_URL`` or the seed's ``DB_*``).
    """

    model_config = SettingsConfigDict(env_prefix="COMZY_MYSQL_LOGGING_", env_file=".env", extra="ignore")

    queue_size: int = Field(10000, gt=0, description="Rows held in memory while waiting to be written; when the "
                            "database is slow or down and the queue is full, new rows are dropped (and counted).")
    batch_size: int = Field(500, gt=0, description="Rows per INSERT (one transaction per batch).")
    flush_seconds: float = Field(1.0, gt=0, description="Longest time a row waits before its batch is written "
                                 "(a full batch is written at once).")
    retry_seconds: float = Field(1.0, gt=0, description="First wait before retrying when the database fails; "
                                 "doubles on each failure up to `COMZY_MYSQL_LOGGING_RETRY_MAX_SECONDS`.")
    retry_max_seconds: float = Field(30.0, gt=0, description="Longest wait between retries while the database "
                                     "is down.")
    drop_log_seconds: float = Field(60.0, gt=0, description="At most one warning about dropped rows per this "
                                    "many seconds (each gives the count).")
    retention_days: float = Field(30.0, ge=0, description="Rows older than this many days are deleted; `0` keeps "
                                  "them forever.")
    retention_interval_seconds: float = Field(3600.0, gt=0, description="Seconds between deletions of old rows "
                                              "(the first runs at start-up).")
    max_path_length: int = Field(8192, ge=64, le=65535, description="Longest path kept whole, in characters "
                                 "as logged (%-escaped, without the query); a longer one is cut to this length, "
                                 "ends with ` [cut]` and its row has `cut` set. Up to 65535 (the column is TEXT).")
    shutdown_seconds: float = Field(5.0, ge=0, description="At shutdown, seconds to keep trying to write the "
                                    "queued rows; what is left then is dropped with a warning.")
