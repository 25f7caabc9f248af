"""Request and response bodies of the v1 API.

The task request is a union discriminated by `type`, built from the registry at app creation,
so the OpenAPI document shows each type's payload schema and validation names the failing
field of that type's payload.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Union, get_type_hints

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    create_model,
    field_validator,
)

from conveyor.registry import Registry, TaskType, parse_task_rate
from conveyor.store.tasks import Status, TaskRecord, UpstreamFailure
from conveyor.store.workflows import MAX_NODES, WorkflowStatus
from conveyor.validation import INTEGRAL_FLOATS, StorableStr, require_storable

MAX_BATCH = 1000
MAX_DELAY_S = 365 * 24 * 3600


class Progress(BaseModel):
    """The latest progress a handler reported (`ctx.progress`)."""

    fraction: float = Field(ge=0, le=1)
    message: str | None
    data: dict[str, Any]
    at: datetime


class Attempt(BaseModel):
    """One attempt of a task: `outcome` is null while it runs."""

    number: int
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None
    outcome: Literal["succeeded", "failed", "timed_out", "lease_lost", "cancelled",
                     "worker_lost"] | None
    error: str | None = Field(description="the error, with a traceback excerpt")


class AttemptsOut(BaseModel):
    attempts: list[Attempt]


class TaskSummary(BaseModel):
    """A task as listings show it by default: everything but its payload, result, attempt
    history and dependents (read the task for those)."""

    id: uuid.UUID
    type: str
    status: Status
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    last_error: str | None
    worker: str | None
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool
    progress: Progress | None
    priority: Literal["high", "low"] | None = Field(
        description="a type with priorities: the task's level, null being `default`")
    depends_on: list[uuid.UUID]
    on_upstream_failure: UpstreamFailure
    workflow_id: uuid.UUID | None
    workflow_key: str | None
    parent_id: uuid.UUID | None


SUMMARY_FIELDS = tuple(TaskSummary.model_fields)


class TaskPage(BaseModel):
    tasks: list[TaskSummary | TaskRecord] = Field(
        description="summaries, or whole tasks (with payload and result) with `fields=full`"
    )
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class FieldError(BaseModel):
    path: str = Field(description="the failing field, dotted (`payload.url`, `query.limit`)")
    loc: list[str | int]
    message: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem: the body of every error answer."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    request_id: str | None = Field(default=None, description="also in `X-Request-ID`")
    errors: list[FieldError] | None = Field(
        default=None, description="validation errors: each failing field"
    )


class BatchOut(BaseModel):
    tasks: list[TaskRecord]
    created: int = Field(description="how many tasks are new (the rest matched idempotency keys)")


class WorkerOut(BaseModel):
    id: str
    host: str
    pid: int
    types: list[str]
    concurrency: int
    in_flight: int = Field(description="tasks running on it now (live, from the task record)")
    processed: int = Field(description="handler runs finished, as of its last beat")
    tasks: list[str] = Field(description="ids of tasks in flight (up to 50)")
    started_at: datetime
    last_beat: datetime


class WorkersOut(BaseModel):
    workers: list[WorkerOut]


class QueueOut(BaseModel):
    type: str
    stream_length: int
    pending: int = Field(description="messages delivered to workers and not yet acked")
    undelivered: int | None = Field(description="messages not yet read by any worker")
    delayed: int = Field(description="delayed tasks and retries waiting for their time")
    dead_letters: int = Field(description="entries in the dead-letter stream")
    queued: int
    running: int
    dead: int
    oldest_queued_age_s: float | None = Field(description="age of the oldest due queued task")
    flow: FlowOut | None = Field(default=None, description="flow control in force")


class FlowOut(BaseModel):
    """A type's flow limits in force (declared in code, or changed through the API) and what
    they hold now. A limit of null is none."""

    max_concurrency: int | None
    concurrency_key: str | None
    max_concurrency_per_key: int | None
    rate_limit: str | None = Field(description="N/s, N/m or N/h, with its burst if not 1")
    rate_limit_per_key: str | None
    paused: bool
    priorities: list[str] | None = Field(description="levels a task may carry, highest first")
    leases_in_use: int | None = Field(description="concurrency slots held now, cluster-wide")
    overridden: list[str] = Field(description="settings changed at run time (over the code's)")
    updated_at: datetime | None = Field(description="when they were last changed at run time")


# What parse_task_rate takes (counts and bursts of 1 to 9 digits), or `off`.
RATE_PATTERN = (r"^\s*(0*[1-9][0-9]{0,8}\s*/\s*[smh]\s*([,;]?\s*burst\s*=?\s*0*[1-9][0-9]{0,8})?"
                r"|off)\s*$")


class LimitsIn(BaseModel):
    """Changes to a type's flow limits; a field left out stays as it is, null goes back to the
    value declared in code, 0 (a rate of `off`) lifts the limit."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_concurrency: Annotated[int, Field(ge=0, le=1_000_000), INTEGRAL_FLOATS] | None = None
    max_concurrency_per_key: Annotated[int, Field(ge=0, le=1_000_000),
                                       INTEGRAL_FLOATS] | None = None
    rate_limit: str | None = Field(
        default=None, max_length=64, pattern=RATE_PATTERN,
        description="N/s, N/m or N/h, optionally `burst=B`; `off` lifts it")
    rate_limit_per_key: str | None = Field(default=None, max_length=64, pattern=RATE_PATTERN)

    @field_validator("rate_limit", "rate_limit_per_key")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is None or value == "off":
            return value
        return str(parse_task_rate(value))  # ValueError (a 422 naming the field) otherwise


class QueuesOut(BaseModel):
    queues: list[QueueOut]


class DeadLettersOut(BaseModel):
    entries: list[dict[str, str]]


class TaskRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    idempotency_key: StorableStr | None = Field(
        default=None, min_length=1, max_length=200,
        description="the same key for the same type returns the first task instead of a new one",
    )
    delay_seconds: float = Field(default=0.0, ge=0, le=MAX_DELAY_S)
    max_attempts: Annotated[int, Field(ge=1, le=1000), INTEGRAL_FLOATS] | None = None
    depends_on: list[Annotated[uuid.UUID, Field(strict=False)]] = Field(
        default_factory=list, max_length=MAX_NODES,
        description="ids of existing tasks it waits for: it is `waiting` until each is final",
    )
    on_upstream_failure: UpstreamFailure = Field(
        default="cancel",
        description="an upstream ended dead or cancelled: `cancel` this task (its "
                    "`last_error` names the upstream), or `run` it anyway",
    )
    priority: Literal["high", "default", "low"] | None = Field(
        default=None, description="for a type declared with priorities: higher runs first")
    unique_for: float | None = Field(
        default=None, gt=0, le=MAX_DELAY_S,
        description="no second task with the same unique key while this one is queued or "
                    "running, or within this many seconds of its creation; the first is "
                    "returned instead")
    unique_key: StorableStr | None = Field(
        default=None, min_length=1, max_length=200,
        description="what makes tasks the same for unique_for (default: the payload); alone, "
                    "it holds while its task is queued or running")


class NodeRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: StorableStr = Field(min_length=1, max_length=200,
                             description="the node's name in the workflow")
    depends_on: list[StorableStr] = Field(
        default_factory=list, max_length=MAX_NODES,
        description="keys of the nodes it waits for (a cycle is refused)")
    on_upstream_failure: UpstreamFailure = "cancel"
    delay_seconds: float = Field(default=0.0, ge=0, le=MAX_DELAY_S)
    max_attempts: Annotated[int, Field(ge=1, le=1000), INTEGRAL_FLOATS] | None = None


class WorkflowSummaryOut(BaseModel):
    id: uuid.UUID
    name: str | None
    status: WorkflowStatus
    nodes: int
    created_at: datetime
    cancelled_at: datetime | None
    counts: dict[str, int] = Field(description="nodes by status")


class WorkflowPage(BaseModel):
    workflows: list[WorkflowSummaryOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


def _workflow_node_model() -> type[BaseModel]:
    hints = get_type_hints(TaskRecord)
    fields: dict[str, Any] = {"key": (str, Field(description="its key in the workflow"))}
    fields.update({f.name: (hints[f.name], ...) for f in dataclasses.fields(TaskRecord)})
    model: type[BaseModel] = create_model(
        "WorkflowNode", __doc__="A node: its key and its whole task record.", **fields)
    return model


WorkflowNode = _workflow_node_model()


class WorkflowOut(BaseModel):
    id: uuid.UUID
    name: str | None
    status: WorkflowStatus = Field(description="`running` while a node is unfinished; then "
                                   "`succeeded`, `failed` (a node dead or cancelled) or "
                                   "`cancelled` (the workflow was)")
    created_at: datetime
    cancelled_at: datetime | None
    tasks: list[WorkflowNode]  # type: ignore[valid-type]


def _storable_json(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    require_storable(value, "payload")
    return handler(value)


class UntypedTaskRequest(TaskRequestBase):
    """Used only when no task type is registered."""

    type: StorableStr
    payload: Annotated[dict[str, Any], WrapValidator(_storable_json)]


def _payload_of(task_type: TaskType) -> Any:
    """The payload field of `task_type`'s request: its model's schema, validated by the type
    (strictly, as JSON, unless it opted out)."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> BaseModel:
        if isinstance(value, task_type.payload_model):
            return value
        return task_type.validate_payload(value)

    return Annotated[task_type.payload_model, WrapValidator(validate)]


def _priority_of(task_type: TaskType) -> Any:
    """The priority field of `task_type`'s request: a level for a type declared with
    priorities, else only `default` (or none)."""
    if task_type.priorities:
        return (Literal["high", "default", "low"] | None, Field(
            default=None, description="higher runs first (weighted: lower ones still run)"))
    return (Literal["default"] | None, Field(
        default=None, description="this type has no priorities: `default` or none"))


def _model_name(type_name: str) -> str:
    words = re.split(r"[^a-zA-Z0-9]+", type_name)
    return "".join(w[:1].upper() + w[1:] for w in words if w) + "Task"


def request_models(registry: Registry) -> tuple[Any, type[BaseModel]]:
    """(annotation of one task request, model of a batch request) for `registry`."""
    models: list[type[BaseModel]] = []
    for task_type in registry:
        models.append(create_model(
            _model_name(task_type.name),
            __base__=TaskRequestBase,
            __doc__=task_type.description or f"A `{task_type.name}` task.",
            type=(Literal[task_type.name], ...),  # type: ignore[arg-type]
            payload=(_payload_of(task_type), ...),
            priority=_priority_of(task_type),
        ))
    single: Any
    if not models:
        single = UntypedTaskRequest
    elif len(models) == 1:
        single = models[0]
    else:
        single = Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007
    batch = create_model(
        "TaskBatch",
        tasks=(Annotated[list[single], Field(min_length=1, max_length=MAX_BATCH)], ...),
    )
    return single, batch


def workflow_model(registry: Registry) -> type[BaseModel]:
    """The body of POST /v1/workflows for the types in `registry`."""
    models: list[type[BaseModel]] = []
    for task_type in registry:
        models.append(create_model(
            _model_name(task_type.name)[:-4] + "Node",
            __base__=NodeRequestBase,
            __doc__=f"A `{task_type.name}` node.",
            type=(Literal[task_type.name], ...),  # type: ignore[arg-type]
            payload=(_payload_of(task_type), ...),
        ))
    if not models:
        models.append(create_model(
            "UntypedNode", __base__=NodeRequestBase, type=(StorableStr, ...),
            payload=(Annotated[dict[str, Any], WrapValidator(_storable_json)], ...)))
    node: Any = models[0]
    if len(models) > 1:
        node = Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007
    return create_model(
        "WorkflowIn",
        __config__=ConfigDict(extra="forbid", strict=True),
        name=(Annotated[StorableStr | None, Field(max_length=200)], None),
        tasks=(Annotated[list[node], Field(min_length=1, max_length=MAX_NODES)], ...),
    )
