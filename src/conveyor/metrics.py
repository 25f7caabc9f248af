"""Every Prometheus metric Conveyor exports, declared once.  [metrics]

Names follow Prometheus conventions; label values are bounded (task types, outcomes, routes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

HTTP_REQUEST_DURATION = Histogram(
    "conveyor_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template and status code.",
    ["method", "route", "status"],
    buckets=_LATENCY_BUCKETS,
)
TASKS_ENQUEUED = Counter(
    "conveyor_tasks_enqueued_total", "Tasks committed to Postgres, by type.", ["type"]
)
TASKS_STARTED = Counter(
    "conveyor_tasks_started_total", "Handler runs started by this worker, by type.", ["type"]
)
TASKS_FINISHED = Counter(
    "conveyor_tasks_finished_total",
    "Handler runs recorded by this worker, by type and outcome "
    "(succeeded, retried, dead, superseded, lease_lost).",
    ["type", "outcome"],
)
TASK_DURATION = Histogram(
    "conveyor_task_duration_seconds", "Handler run time, by type.", ["type"],
    buckets=_LATENCY_BUCKETS,
)
TASK_WAIT = Histogram(
    "conveyor_task_wait_seconds",
    "Time from when a task was due to when its handler started, by type.",
    ["type"],
    buckets=_LATENCY_BUCKETS,
)
WORKER_IN_FLIGHT = Gauge(
    "conveyor_worker_in_flight", "Messages read by this process and not yet acked.",
    multiprocess_mode="livesum",  # `worker --processes N`: the sum over the live children
)
MESSAGES_DROPPED = Counter(
    "conveyor_messages_dropped_total",
    "Messages acked without running, because their task was not runnable, by type and reason.",
    ["type", "reason"],
)
DEAD_LETTERED = Counter(
    "conveyor_dead_lettered_total", "Messages copied to a dead-letter stream.", ["type", "reason"]
)
LEASES_LOST = Counter(
    "conveyor_leases_lost_total",
    "Running tasks this worker learned were taken from it (it stalled past the heartbeat TTL).",
    ["type"],
)
HANDED_BACK = Counter(
    "conveyor_tasks_handed_back_total",
    "Messages a stopping worker handed back at its drain deadline, by type.", ["type"],
)
REBALANCED = Counter(
    "conveyor_rebalanced_total", "Messages taken from dead consumers and re-queued.", ["type"]
)
RELAYED = Counter(
    "conveyor_relayed_total", "Tasks re-published from Postgres to Redis by the relay.", ["type"]
)
CRON_FIRED = Counter("conveyor_cron_fired_total", "Cron slots enqueued, by job.", ["job"])
TICK_FAILURES = Counter(
    "conveyor_tick_failures_total", "Background loop ticks that failed.", ["component"]
)
OUTAGES = Counter(
    "conveyor_outages_total", "Times a component lost Postgres or Redis.", ["component"]
)
JANITOR_PRUNED = Counter(
    "conveyor_janitor_pruned_total",
    "Finished tasks the janitor deleted past their retention, by type and status.",
    ["type", "status"],
)
JANITOR_TRIMMED = Counter(
    "conveyor_janitor_trimmed_total",
    "Stream entries the janitor dropped, by type and stream (tasks: acked; dead: capped).",
    ["type", "stream"],
)
JANITOR_OLDEST = Gauge(
    "conveyor_janitor_oldest_kept_seconds",
    "Age (since finished_at) of the oldest finished task kept, by type and status, as of the "
    "janitor's last pass (0: none kept).",
    ["type", "status"],
)
JANITOR_STATEMENT = Histogram(
    "conveyor_janitor_statement_seconds",
    "Duration of each janitor DELETE batch: the longest any of its row locks is held.",
    buckets=_LATENCY_BUCKETS,
)

QUEUE_DEPTH = Gauge(
    "conveyor_queue_depth",
    "Messages of a task type in Redis, read when /metrics is scraped (reused for "
    "METRICS_CACHE seconds): undelivered (in the stream, not yet read by a worker), delayed "
    "(waiting for their time), pending (read by a worker, not yet acked).",
    ["type", "state"],
    multiprocess_mode="mostrecent",
)
QUEUE_LAG = Gauge(
    "conveyor_queue_lag",
    "Messages of a task type due and not yet acked: undelivered plus pending (the stream's "
    "length when Redis cannot tell), read like conveyor_queue_depth. Scale workers on this.",
    ["type"],
    multiprocess_mode="mostrecent",
)
QUEUE_OLDEST_AGE = Gauge(
    "conveyor_queue_oldest_age_seconds",
    "Age of the oldest undelivered message of a task type (0 when none waits), read like "
    "conveyor_queue_depth.",
    ["type"],
    multiprocess_mode="mostrecent",
)
# Flow control (README, Flow control)
TASKS_WAITING_ON_LIMIT = Gauge(
    "conveyor_tasks_waiting_on_limit",
    "Tasks of a type ready to run but held back by its flow limits (its undelivered messages, "
    "read by a worker waiting at a limit, at most once a second; 0 when none waits, or once "
    "the type has no limit).",
    ["type"],
    multiprocess_mode="livemax",  # of the live processes: a stopped one's figure goes
)
FLOW_LIMITED = Gauge(
    "conveyor_flow_limited",
    "Consumers of this process waiting at a flow limit, by type and limit (concurrency, rate, "
    "paused).",
    ["type", "limit"],
    multiprocess_mode="livesum",
)
FLOW_DEFERRED = Counter(
    "conveyor_flow_deferred_total",
    "Started tasks put back (due a little later, the attempt not counted) because their "
    "concurrency key was at its limit, by type and limit (key_concurrency, key_rate).",
    ["type", "limit"],
)

BACKLOG = (QUEUE_DEPTH, QUEUE_LAG, QUEUE_OLDEST_AGE)  # read from Redis, not counted here


@dataclass(frozen=True, slots=True)
class TypeMeters:
    """The per-task metrics of one task type, looked up once (label lookups cost a lock)."""

    started: Counter
    duration: Histogram
    wait: Histogram


@functools.cache
def type_meters(task_type: str) -> TypeMeters:
    return TypeMeters(
        started=TASKS_STARTED.labels(task_type),
        duration=TASK_DURATION.labels(task_type),
        wait=TASK_WAIT.labels(task_type),
    )
