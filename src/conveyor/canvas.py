"""Chains, groups and chords on top of workflows: Python sugar that builds one DAG and creates
it with `POST /v1/workflows`'s primitive (`Client.create_workflow`), in one transaction.

    flow = app.chain(fetch.s(Url(u)), parse.s(Empty()))          # fetch, then parse
    fan = app.group(*(resize.s(Size(w)) for w in widths))        # all at once
    chord = fan >> report.s(Empty())                             # report after all of them
    workflow = await chord.enqueue(name="thumbnails")            # a WorkflowRecord

A signature is one task to be (`definition.s(payload)`); a chain runs its parts one after the
other (each part's last tasks are the next part's upstreams); a group runs its parts side by
side; `a >> b` is the chain of the two. A callback reads its upstreams' results with
`await ctx.upstream()`. Keys are the signatures' own (`key=`) or made up from their place.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from conveyor.client import NodeRequest, TaskRequest
from conveyor.store.tasks import UpstreamFailure

if TYPE_CHECKING:
    from conveyor.application import Conveyor
    from conveyor.store.workflows import WorkflowRecord


class Canvas:
    """A part of a workflow: a signature, a chain or a group."""

    app: Conveyor | None = None

    def __rshift__(self, other: Canvas) -> Chain:
        return Chain((self, other), app=self.app or other.app)

    def _place(self, into: list[NodeRequest], after: Sequence[str], taken: set[str]
               ) -> list[str]:
        """Add this part's nodes to `into`, each first one depending on `after`; returns
        the keys of its last nodes. A key made up avoids those in `taken` (the given ones)."""
        raise NotImplementedError

    def _given_keys(self) -> Iterator[str]:
        raise NotImplementedError

    def nodes(self) -> list[NodeRequest]:
        """The workflow's nodes, upstreams first."""
        out: list[NodeRequest] = []
        self._place(out, (), set(self._given_keys()))
        return out

    async def enqueue(self, *, name: str | None = None) -> WorkflowRecord:
        """Create the workflow through the app's connections (a running service's or a
        `Producer`'s)."""
        if self.app is None:
            raise RuntimeError("this canvas has no app: build it with app.chain/app.group or "
                               "a definition's .s()")
        return await self.app.submit_workflow(self.nodes(), name=name)


@dataclass(eq=False)
class Signature(Canvas):
    """One task: its type, payload and options (what `definition.s(...)` returns)."""

    type: str
    payload: BaseModel | Mapping[str, Any]
    key: str | None = None
    max_attempts: int | None = None
    delay_s: float = 0.0
    on_upstream_failure: UpstreamFailure = "cancel"
    app: Conveyor | None = field(default=None, repr=False)

    def _place(self, into: list[NodeRequest], after: Sequence[str], taken: set[str]
               ) -> list[str]:
        key = self.key
        if key is None:
            key = f"{len(into)}:{self.type}"
            while key in taken:  # a given key that looks like a made-up one
                key += "'"
        into.append(NodeRequest(key, TaskRequest(
            self.type, self.payload, None, self.delay_s, self.max_attempts,
            on_upstream_failure=self.on_upstream_failure), tuple(after)))
        return [key]

    def _given_keys(self) -> Iterator[str]:
        if self.key is not None:
            yield self.key


@dataclass(eq=False)
class Chain(Canvas):
    """Parts one after the other."""

    parts: tuple[Canvas, ...]
    app: Conveyor | None = field(default=None, repr=False)

    def _place(self, into: list[NodeRequest], after: Sequence[str], taken: set[str]
               ) -> list[str]:
        last = list(after)
        for part in self.parts:
            last = part._place(into, last, taken)
        return last

    def _given_keys(self) -> Iterator[str]:
        for part in self.parts:
            yield from part._given_keys()


@dataclass(eq=False)
class Group(Canvas):
    """Parts side by side; `group >> callback` is a chord."""

    parts: tuple[Canvas, ...]
    app: Conveyor | None = field(default=None, repr=False)

    def _place(self, into: list[NodeRequest], after: Sequence[str], taken: set[str]
               ) -> list[str]:
        last: list[str] = []
        for part in self.parts:
            last.extend(part._place(into, after, taken))
        return last

    def _given_keys(self) -> Iterator[str]:
        for part in self.parts:
            yield from part._given_keys()
