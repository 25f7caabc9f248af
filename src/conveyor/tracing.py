"""Tracing: OpenTelemetry spans for HTTP requests, enqueues and attempts, and the W3C trace
context each task carries from the span that enqueued it to every attempt that runs it.

    POST /v1/tasks             SERVER    (FastAPI's own, given `provider()`: see api/app.py)
    └─ enqueue resize          PRODUCER  its context is stored with the task (`trace_context`)
       ├─ run resize #1        CONSUMER  on a worker, parented by the stored context
       └─ run resize #2        CONSUMER  the retry: the same parent, the same trace

The context travels in the task's row (`tasks.trace_context`, returned by the worker's start,
so it costs no extra read), not in its stream message: retries, delayed tasks, rebalance and
the relay's republish all keep it. A task enqueued inside a handler continues the attempt's
trace, for handlers on the loop and in threads (a process handler starts a trace of its own).

Off by default, and off it costs one check of a module global per enqueue and per attempt:
nothing of OpenTelemetry is imported. `CONVEYOR_TRACING=true` (or `enable()`) turns it on; it
needs the `otel` extra. Spans go to the global tracer provider if the application (or
`opentelemetry-instrument`) has set one, else to one built here from the standard `OTEL_*`
variables: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
`OTEL_TRACES_EXPORTER` (`otlp`, the default, over HTTP/protobuf; `console`; `none`) and
`OTEL_EXPORTER_OTLP_ENDPOINT` with the exporter's other `OTEL_EXPORTER_OTLP_*` variables.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import Span, Tracer, TracerProvider

INSTRUMENTATION = "conveyor"
SYSTEM = "conveyor"  # messaging.system
DEFAULT_SERVICE_NAME = "conveyor"
EXTRA_MISSING = ("tracing needs OpenTelemetry's SDK: pip install 'conveyor[otel]' "
                 "(or unset CONVEYOR_TRACING)")

# The switch: the tracer (and its provider) while tracing is on, None while it is off.
_tracer: Tracer | None = None
_provider: TracerProvider | None = None


class _Named(Protocol):
    @property
    def type(self) -> str: ...


class _Attempt(Protocol):
    """What the worker knows of a started task (`store.tasks.Started`)."""

    @property
    def id(self) -> Any: ...
    @property
    def type(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def trace_context(self) -> Mapping[str, str] | None: ...


def enabled() -> bool:
    """True while spans are made."""
    return _tracer is not None


def enable(provider: TracerProvider | None = None) -> Callable[[], object]:
    """Make spans from now on, through `provider`, else the global tracer provider if one is
    set, else a new SDK provider set up from the `OTEL_*` variables (and made the global one).
    Returns what flushes a provider built here (nothing for one given or found); it stays the
    global one, for later states of the process, and is shut down at interpreter exit."""
    global _tracer, _provider  # the on/off switch the hot paths read
    try:
        from opentelemetry import trace
    except ImportError as exc:  # pragma: no cover - the api ships with FastAPI
        raise ConfigError(EXTRA_MISSING) from exc
    flush: Callable[[], object] = _nothing
    if provider is None:
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):  # nobody set one up
            built = _build_provider()
            trace.set_tracer_provider(built)
            provider, flush = built, built.force_flush
    _tracer, _provider = provider.get_tracer(INSTRUMENTATION), provider
    return flush


def current_provider() -> TracerProvider | None:
    """The tracer provider spans go to while tracing is on; None while it is off."""
    return _provider


def disable() -> None:
    """Make no more spans."""
    global _tracer, _provider  # noqa: PLW0603
    _tracer = _provider = None


@contextlib.contextmanager
def enabled_by(on: bool) -> Iterator[None]:
    """Inside, tracing is on if `on` (CONVEYOR_TRACING) or it already was; turned on here, it
    is turned off at exit, the spans of a provider built for it flushed."""
    if not on or enabled():
        yield
        return
    flush = enable()
    try:
        yield
    finally:
        disable()
        flush()


def _nothing() -> None:
    return None


def _build_provider() -> SdkTracerProvider:
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise ConfigError(EXTRA_MISSING) from exc
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if kind not in ("otlp", "console", "none"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER={kind!r}: Conveyor builds 'otlp', 'console' "
                          "or 'none'; for another, set a global tracer provider first")
    # Resource.create lets given attributes win over OTEL_SERVICE_NAME: name it only if unset.
    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {SERVICE_NAME: DEFAULT_SERVICE_NAME})
    provider = SdkTracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
    if kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ConfigError(EXTRA_MISSING) from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider


# -- the trace context a task carries --------------------------------------------------------

def current_context() -> dict[str, str] | None:
    """The current span's context as W3C headers (`traceparent`, maybe `tracestate`), to
    store with a task; None while tracing is off or no span is current."""
    if _tracer is None:
        return None
    from opentelemetry import propagate
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


# -- spans -----------------------------------------------------------------------------------

def enqueue_span(tasks: Sequence[_Named]) -> contextlib.AbstractContextManager[Span]:
    """A PRODUCER span around one enqueue call (of one task or a batch), current inside: the
    tasks prepared there carry its context. Only while tracing is on (see `enabled`)."""
    assert _tracer is not None, "enqueue_span with tracing off"
    return _enqueue_span(_tracer, tasks)


@contextlib.contextmanager
def _enqueue_span(tracer: Tracer, tasks: Sequence[_Named]) -> Iterator[Span]:
    from opentelemetry.trace import SpanKind
    types = sorted({t.type for t in tasks})
    name = f"enqueue {types[0]}" if len(types) == 1 else "enqueue"
    attributes: dict[str, str | int] = {
        "messaging.system": SYSTEM, "messaging.operation.type": "send",
        "conveyor.task.type": ",".join(types),
    }
    if len(types) == 1:
        attributes["messaging.destination.name"] = types[0]
    if len(tasks) != 1:
        attributes["messaging.batch.message_count"] = len(tasks)
    with tracer.start_as_current_span(name, kind=SpanKind.PRODUCER,
                                      attributes=attributes) as span:
        yield span


def enqueued(span: Span, task_ids: Sequence[Any]) -> None:
    """Name the enqueued task on its enqueue span (for one task; a batch is counted)."""
    if len(task_ids) == 1:
        span.set_attribute("conveyor.task.id", str(task_ids[0]))
        span.set_attribute("messaging.message.id", str(task_ids[0]))


def attempt_span(task: _Attempt, worker_id: str) -> contextlib.AbstractContextManager[Span]:
    """A CONSUMER span around one attempt, a child of the span that enqueued the task (a root
    if it carries no context), current inside. Only while tracing is on (see `enabled`)."""
    assert _tracer is not None, "attempt_span with tracing off"
    return _attempt_span(_tracer, task, worker_id)


@contextlib.contextmanager
def _attempt_span(tracer: Tracer, task: _Attempt, worker_id: str) -> Iterator[Span]:
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, Status, StatusCode
    parent = propagate.extract(task.trace_context) if task.trace_context else None
    attributes: dict[str, str | int] = {
        "messaging.system": SYSTEM, "messaging.operation.type": "process",
        "messaging.destination.name": task.type, "messaging.message.id": str(task.id),
        "conveyor.task.id": str(task.id), "conveyor.task.type": task.type,
        "conveyor.task.attempt": task.attempt, "conveyor.task.max_attempts": task.max_attempts,
        "conveyor.worker.id": worker_id,
    }
    with tracer.start_as_current_span(f"run {task.type}", context=parent,
                                      kind=SpanKind.CONSUMER, attributes=attributes) as span:
        try:
            yield span
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: the drain deadline, a forced stop
                span.set_attribute("conveyor.task.outcome", "cancelled")
                span.set_status(Status(StatusCode.ERROR, "cancelled"))
            raise


def outcome(span: Span, status: str, error: str | None) -> None:
    """Say on an attempt's span how it ended: `succeeded`, `retry` (queued again) or `dead`;
    anything but success is an error, described by the error's last line."""
    from opentelemetry.trace import Status, StatusCode
    span.set_attribute("conveyor.task.outcome", "retry" if status == "queued" else status)
    if status != "succeeded":
        last = (error or status).strip().splitlines()[-1:] or [status]
        span.set_status(Status(StatusCode.ERROR, last[0][:500]))


def failed(exc: BaseException) -> None:
    """Record a handler's exception on the current span (the attempt's), if tracing is on."""
    if _tracer is None:
        return
    from opentelemetry import trace
    trace.get_current_span().record_exception(exc)
