"""Settings: every default of the design, read from `CONVEYOR_*` variables and CLI flags.

Names are flat (`CONVEYOR_HEARTBEAT_INTERVAL`, not a nested `CONVEYOR_WORKER__...`) because the
variable names are part of the public interface; the groups live in the README's table instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from conveyor.errors import ConfigError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DEV_WEBHOOK_SECRET = "conveyor-dev-secret"


class Settings(BaseSettings):
    """Configuration of one Conveyor process. Durations are seconds and may be fractional."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", extra="ignore", frozen=True, populate_by_name=True
    )

    # Connections. With neither URL set, `conveyor run` starts embedded servers.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("CONVEYOR_DATABASE_URL", "DATABASE_URL")
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("CONVEYOR_REDIS_URL", "REDIS_URL")
    )
    database_schema: str = "conveyor"
    key_prefix: str = "conveyor"
    pg_pool_min: int = Field(default=2, ge=1)
    pg_pool_max: int = Field(default=10, ge=1)
    data_dir: Path = Path(".conveyor")

    # API
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    api_max_pending: int = Field(default=1000, ge=1)
    pg_acquire_timeout: float = Field(default=5.0, gt=0)
    metrics_key: SecretStr | None = None  # a bearer key for /metrics only
    metrics_open: bool = False  # /metrics needs no key at all
    metrics_cache: float = Field(default=2.0, ge=0)  # longest reuse of the queue-depth reading

    # Worker
    concurrency: int = Field(default=5, ge=1, le=10_000)
    heartbeat_interval: float = Field(default=30.0, gt=0)
    heartbeat_ttl: float = Field(default=90.0, gt=0)
    drain_timeout: float = Field(default=30.0, ge=0)
    read_block: float = Field(default=1.0, gt=0, le=60)
    forward_interval: float = Field(default=0.5, gt=0)
    worker_types: Annotated[list[str], NoDecode] = Field(default_factory=list)
    process_pool_size: int = Field(default=2, ge=1)

    # Cron service
    rebalance_interval: float = Field(default=10.0, gt=0)
    relay_interval: float = Field(default=5.0, gt=0)
    relay_grace: float = Field(default=30.0, ge=0)
    max_deliveries: int = Field(default=10, ge=1)
    dead_letter_maxlen: int = Field(default=100_000, ge=1)

    # Retries (defaults for task types that do not set their own)
    retry_base_delay: float = Field(default=1.0, ge=0)
    retry_max_delay: float = Field(default=300.0, ge=0)
    max_attempts: int = Field(default=3, ge=1, le=1000)

    # Built-in tasks
    webhook_secret: SecretStr = SecretStr(DEV_WEBHOOK_SECRET)

    # Results: waiting, events, progress, cancelling a running task
    events_maxlen: int = Field(default=100_000, ge=100)
    progress_interval: float = Field(default=0.5, gt=0)
    cancel_grace: float = Field(default=5.0, ge=0)

    # Logs
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("api_keys", "worker_types", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("metrics_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("database_schema", "key_prefix")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError("must be lower-case letters, digits and underscores")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ValueError(
                f"CONVEYOR_HEARTBEAT_TTL ({self.heartbeat_ttl}) must exceed "
                f"CONVEYOR_HEARTBEAT_INTERVAL ({self.heartbeat_interval})"
            )
        if self.pg_pool_min > self.pg_pool_max:
            raise ValueError("CONVEYOR_PG_POOL_MIN must not exceed CONVEYOR_PG_POOL_MAX")
        return self

    @property
    def embedded(self) -> bool:
        """True when neither server URL is set: `run` then starts its own servers."""
        return self.database_url is None and self.redis_url is None


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build Settings from the environment, then `overrides` (CLI flags; None values skipped).

    Errors name the variable and the rejected value.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        if loc:
            lines.append(f"CONVEYOR_{loc.upper()}={error.get('input')!r}: {error['msg']}")
        else:
            lines.append(error["msg"].removeprefix("Value error, "))
    return "invalid settings: " + "; ".join(lines)
