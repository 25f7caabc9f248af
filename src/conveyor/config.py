"""Settings: every default of the design, read from `CONVEYOR_*` variables and CLI flags.

Names are flat (`CONVEYOR_HEARTBEAT_INTERVAL`, not a nested `CONVEYOR_WORKER__...`) because the
variable names are part of the public interface; the groups live in the README's table instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from conveyor.errors import ConfigError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DEV_WEBHOOK_SECRET = "conveyor-dev-secret"
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h)\s*$")
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Rate:
    """A rate limit: at most `count` requests per `period_s` seconds, `count` of them at once."""

    count: int
    period_s: int

    def __str__(self) -> str:
        unit = {1: "s", 60: "m", 3600: "h"}.get(self.period_s)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.period_s}s"


def parse_rate(text: str) -> Rate:
    """`100/s`, `6000/m` or `20000/h` as a Rate; ValueError naming the form otherwise."""
    match = _RATE.match(text)
    if not match or int(match[1]) < 1:
        raise ValueError(f"{text!r} is not a rate: write N/s, N/m or N/h with N >= 1")
    return Rate(int(match[1]), _UNIT_S[match[2]])


def parse_duration(text: str) -> int:
    """`90s`, `15m`, `12h` or `30d` in seconds; ValueError naming the form otherwise."""
    match = _DURATION.match(text)
    if not match or int(match[1]) < 1:
        raise ValueError(f"{text!r} is not a duration: write Ns, Nm, Nh or Nd with N >= 1")
    return int(match[1]) * _UNIT_S[match[2]]


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

    # Retention and the janitor: seconds a finished task is kept, by status (by finished_at;
    # 0 keeps forever; a task type may set its own), how long an idempotency key holds, and
    # the janitor's pace (every interval, batches of at most janitor_batch rows).
    retention_succeeded: float = Field(default=86_400.0, ge=0)
    retention_cancelled: float = Field(default=86_400.0, ge=0)
    retention_dead: float = Field(default=604_800.0, ge=0)
    idempotency_ttl: float = Field(default=86_400.0, ge=0)
    janitor_interval: float = Field(default=60.0, gt=0)
    janitor_batch: int = Field(default=500, ge=1, le=100_000)
    janitor_lock_timeout: float = Field(default=0.1, gt=0)
    migrate_lock_timeout: float = Field(default=5.0, gt=0)

    # Flow control (README, Flow control): how long a concurrency lease outlives its worker's
    # last renewal, how often workers reload limits without a nudge, how often a consumer at a
    # concurrency limit looks again, and how long a task whose key is at its limit waits
    # (jittered up to twice that) before it is read again.
    flow_lease_ttl: float = Field(default=10.0, gt=0)
    flow_reload_interval: float = Field(default=5.0, gt=0)
    flow_poll_interval: float = Field(default=0.05, gt=0)
    flow_defer: float = Field(default=0.5, gt=0)

    # Built-in tasks
    webhook_secret: SecretStr = SecretStr(DEV_WEBHOOK_SECRET)

    # Redis Cluster and Sentinel. With REDIS_CLUSTER, REDIS_URL names any node of the cluster.
    # With REDIS_SENTINELS, the sentinels name the master of REDIS_SENTINEL_MASTER; REDIS_URL
    # is optional then, and only its credentials, database and scheme are used.
    redis_cluster: bool = False
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str | None = None
    redis_sentinel_password: SecretStr | None = None  # the sentinels' own, if they need one

    # Webhook egress guard: ranges of the denied table that outbound requests may reach anyway
    # (cloud metadata addresses stay refused)
    webhook_allow_cidrs: Annotated[list[IPvAnyNetwork], NoDecode] = Field(default_factory=list)

    # API keys and rate limits (keys in the api_keys table: `conveyor keys`)
    allow_anonymous: bool = False  # serve without keys on a non-loopback address
    api_rate_limit: Rate | None = None  # default per-key limit; a key's own rate replaces it
    api_key_cache: float = Field(default=5.0, ge=0)  # reuse of a looked-up key; revoke delay

    # Tracing (OpenTelemetry; needs the `otel` extra; exporter set by the OTEL_* variables)
    tracing: bool = False

    # Metrics port of every process (`worker`, `cron`; a multi-process worker's supervisor)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # unset: no metrics port

    # Results: waiting, events, progress, cancelling a running task
    events_maxlen: int = Field(default=100_000, ge=100)
    progress_interval: float = Field(default=0.5, gt=0)
    cancel_grace: float = Field(default=5.0, ge=0)
    max_wait: float = Field(default=60.0, gt=0, le=3600)  # the largest `?wait=` taken

    # Write batching (cost per task): how long the worker's recorder waits for more outcomes
    # before writing a batch, and its event publisher for more events before an XADD, while
    # handlers are still running (0: write at once)
    record_linger: float = Field(default=0.005, ge=0, le=1)
    # ... and how long a consumer whose last read came back full waits for its other slots to
    # come free before it reads again, so a read and its start statement carry a batch
    read_linger: float = Field(default=0.002, ge=0, le=1)
    # How a start (queued → running) commits: `async` visible at once and on disk within
    # PostgreSQL's WAL writer delays (a crash in between makes the task queued again, to run
    # again; tasks and outcomes always wait for the disk); `sync` waits for the disk too
    start_commit: Literal["async", "sync"] = "async"

    # Dashboard (/ui): a session's lifetime, rows per page, rows a payload-field search
    # examines per page, and tasks one bulk action (on a filter) changes per request
    ui_session_ttl: float = Field(default=43_200.0, gt=0)
    ui_page_size: int = Field(default=50, ge=1, le=500)
    ui_search_scan: int = Field(default=20_000, ge=100, le=10_000_000)
    ui_bulk_max: int = Field(default=10_000, ge=1, le=1_000_000)

    # Dashboard session cookie: Secure always ("on"), never ("off"), or when the request came
    # over https ("auto"; behind a TLS-terminating proxy, say "on")
    ui_secure_cookie: Literal["auto", "on", "off"] = "auto"

    # Logs
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("api_keys", "worker_types", "webhook_allow_cidrs", "redis_sentinels",
                     mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port")
        return value

    @field_validator("metrics_key", "metrics_port", "redis_sentinel_password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("api_rate_limit", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        return parse_rate(value) if isinstance(value, str) else value

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
        if self.redis_sentinels and self.redis_cluster:
            raise ValueError("CONVEYOR_REDIS_SENTINELS and CONVEYOR_REDIS_CLUSTER exclude each "
                             "other: a cluster fails over by itself")
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ValueError("CONVEYOR_REDIS_SENTINELS needs CONVEYOR_REDIS_SENTINEL_MASTER "
                             "(the name the sentinels monitor)")
        if self.redis_cluster and not self.redis_url:
            raise ValueError("CONVEYOR_REDIS_CLUSTER needs CONVEYOR_REDIS_URL naming a node")
        return self

    @property
    def redis_given(self) -> bool:
        """True when a Redis to use is configured: a URL, or sentinels to ask."""
        return self.redis_url is not None or bool(self.redis_sentinels)

    @property
    def embedded(self) -> bool:
        """True when neither server URL is set: `run` then starts its own servers."""
        return self.database_url is None and not self.redis_given


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
