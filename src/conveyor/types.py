"""Shapes shared across packages, named once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

if TYPE_CHECKING:
    from conveyor.runtime.shutdown import Shutdown

JSON: TypeAlias = dict[str, Any] | list[Any] | str | int | float | bool | None


class Service(Protocol):
    """A long-lived piece of the process: runs until shutdown begins and its work is drained."""

    name: str

    async def run(self, shutdown: Shutdown) -> None: ...
