"""Where plain-function handlers run: a thread pool for blocking ones, a process pool for
CPU-bound ones, each with the type's timeout, and neither lost to a call that hangs.

A process handler past its timeout is killed (SIGTERM, then SIGKILL after 3 s) and its process
replaced, so the next call runs at once. Its timeout counts from when a process takes the call,
not while the call waits for a free process. Whatever the handler did before the kill stays
done; nothing after it runs (no `finally`, no cleanup).

A thread cannot be killed. A thread handler past its timeout is abandoned: it runs on to its
end, and whatever it does (writes, requests) still happens, possibly after the attempt has been
recorded as failed and while the retry runs; its result is dropped. It no longer counts against
the pool: later calls go to a fresh pool while the old one lets its threads go as they finish.
At most `spare` abandoned calls at once are replaced this way; past that, later calls share
what is left of the pool and may wait for a thread (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pebble
import structlog

from conveyor.registry import ProgressSink, set_process_sink

log = structlog.get_logger("conveyor.executor")

_PEBBLE_TIMEOUT = "Task timeout"  # the message of the TimeoutError pebble sets on a timeout


class TimedOut(Exception):
    """The handler ran past its type's timeout."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"timed out after {timeout_s} s")
        self.timeout_s = timeout_s


def _start_child(progress: Any) -> None:
    # Ctrl+C reaches the whole foreground process group; pool children leave it to the parent,
    # which drains them. Progress reports go back to the parent through `progress` (a queue).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if progress is not None:
        set_process_sink(lambda task_id, attempt, report: progress.put((task_id, attempt, report)))


class ThreadPool:
    """`size` threads for blocking handlers; see the module docstring for timeouts."""

    def __init__(self, size: int, spare: int) -> None:
        self.size = size
        self.spare = spare
        self._pool = self._new()
        self._lock = threading.Lock()  # _abandoned is released from the abandoned threads
        self._abandoned = 0
        self._calls: set[Future[Any]] = set()  # submitted and not yet done

    def _new(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="conveyor-task")

    @property
    def abandoned(self) -> int:
        """Calls past their timeout whose threads are still running."""
        return self._abandoned

    def running(self) -> list[Future[Any]]:
        """Calls not yet done, their coroutine cancelled or not (a thread runs on)."""
        return [f for f in list(self._calls) if not f.done()]

    async def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None) -> Any:
        future = self._pool.submit(fn, *args)
        self._calls.add(future)
        future.add_done_callback(self._calls.discard)  # from the thread: a set op is atomic
        try:
            if timeout_s is None:  # no Timeout object (and its task lookups) per call
                return await asyncio.wrap_future(future)
            async with asyncio.timeout(timeout_s) as scope:
                return await asyncio.wrap_future(future)
        except TimeoutError:
            if timeout_s is None or not scope.expired():
                raise  # the handler's own TimeoutError
            if not future.cancel() and not future.done():  # running: it cannot be stopped
                self._abandon(future, timeout_s)
            raise TimedOut(timeout_s) from None
        except asyncio.CancelledError:  # a cancel past its grace, or the drain deadline
            if not future.cancel() and not future.done():
                self._abandon(future, None)
            raise

    def _abandon(self, future: Future[Any], timeout_s: float | None) -> None:
        with self._lock:
            self._abandoned += 1
            abandoned = self._abandoned
        future.add_done_callback(self._released)
        if abandoned <= self.spare:
            old, self._pool = self._pool, self._new()
            old.shutdown(wait=False)  # its other threads end with their calls
            log.warning("executor.thread.abandoned", timeout_s=timeout_s, abandoned=abandoned)
        else:
            log.error("executor.thread.abandoned", timeout_s=timeout_s, abandoned=abandoned,
                      detail=f"more than {self.spare} hung threads: later calls may wait")

    def _released(self, _: Future[Any]) -> None:
        with self._lock:
            self._abandoned -= 1

    def close(self) -> None:
        """Stop taking calls, without waiting for the running ones (they cannot be killed)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class ProcessPool:
    """`size` spawned processes for CPU-bound handlers (importable at module level, with
    picklable payloads and results); see the module docstring for timeouts. Started on the
    first call or by `start()`; a pool that broke is replaced on the next call."""

    def __init__(self, size: int, progress: ProgressSink | None = None) -> None:
        self.size = size
        self.progress = progress
        self._pool: pebble.ProcessPool | None = None
        self._closed = False
        self._context = multiprocessing.get_context("spawn")
        self._reports: Any = None  # the children's progress queue, read by a thread here

    def start(self) -> None:
        """Start the processes now rather than on the first call."""
        if self._pool is None:
            self._pool = self._new()

    def _new(self) -> pebble.ProcessPool:
        if self._closed:
            raise RuntimeError("the process pool is closed")
        if self.progress is not None and self._reports is None:
            self._reports = self._context.Queue()
            threading.Thread(target=self._relay_reports, args=(self._reports, self.progress),
                             name="conveyor-process-progress", daemon=True).start()
        pool = pebble.ProcessPool(
            max_workers=self.size,
            initializer=_start_child,
            initargs=(self._reports,),
            context=self._context,
        )
        pool.active  # noqa: B018 - starts its processes
        return pool

    def _schedule(self, fn: Callable[..., Any], args: tuple[Any, ...],
                  timeout_s: float | None) -> pebble.ProcessFuture[Any]:
        if self._pool is None:
            self._pool = self._new()
        try:
            return self._pool.schedule(fn, args, timeout=timeout_s)
        except RuntimeError:  # it broke (its calls got BrokenProcessPool): replace it
            _dispose(self._pool)
            self._pool = self._new()
            return self._pool.schedule(fn, args, timeout=timeout_s)

    async def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None) -> Any:
        future = self._schedule(fn, args, timeout_s)
        try:
            return await asyncio.wrap_future(future)
        except TimeoutError as exc:
            if timeout_s is not None and exc.args[:1] == (_PEBBLE_TIMEOUT,):
                log.warning("executor.process.killed", timeout_s=timeout_s)
                raise TimedOut(timeout_s) from None
            raise  # the handler's own TimeoutError

    @staticmethod
    def _relay_reports(reports: Any, sink: ProgressSink) -> None:
        """Hand the children's progress to `sink` until the queue is closed (None)."""
        while True:
            try:
                item = reports.get()
            except (EOFError, OSError, ValueError):
                return
            if item is None:
                return
            try:
                sink(*item)
            except Exception:
                log.exception("executor.process.progress")

    def close(self) -> None:
        """Stop the processes without waiting here: a running call is killed (the drain has
        already waited for handlers)."""
        self._closed = True
        if self._pool is not None:
            _dispose(self._pool)
            self._pool = None
        if self._reports is not None:
            with contextlib.suppress(Exception):
                self._reports.put(None)


def _dispose(pool: pebble.ProcessPool) -> None:
    """Stop `pool` and reap its processes in a thread of its own (terminating a busy process
    can take seconds); not a daemon, so the interpreter waits for it before exiting."""
    pool.stop()  # type: ignore[no-untyped-call]
    threading.Thread(target=pool.join, name="conveyor-process-pool-stop").start()
