"""Work on files in threads, awaited so that no thread outlives what it works on.

A store writes, hashes and renames in worker threads (the GIL is released there) while the event loop receives.
Two rules make that safe: a thread's work is awaited to its end even when the awaiting task is cancelled (else
the task would close a file descriptor a thread is still writing through, and the number could be another file's
by then), and a blob's hashing runs in order on a :class:`SerialLane` of one shared pool (a thread per blob cost
0.5 ms of the event loop's time to start: 0.1 s for a 200-layer image).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

LANE_THREADS = 16  # threads of every blob's lanes (hashing, writes): started once, used by many blobs
_lane_pool: ThreadPoolExecutor | None = None


class _Settling(asyncio.Future[None]):
    """A waiter that a task's cancel() cannot cancel: the task gets its CancelledError once the waiter is done."""

    def cancel(self, msg: Any = None) -> bool:
        return False


async def settled(future: asyncio.Future[T], undo: Callable[[T], object] | None = None) -> T:
    """``future``'s result, awaited to its end even if the caller is cancelled meanwhile: the cancellation is
    raised after (and ``undo`` is called on the result first, to release what the work acquired)."""
    if not future.done():
        waiter = _Settling(loop=future.get_loop())
        future.add_done_callback(lambda _: waiter.set_result(None))
        try:
            await waiter
        except asyncio.CancelledError:  # only ever raised once the waiter, and so ``future``, is done
            if undo is not None and not future.cancelled() and future.exception() is None:
                undo(future.result())
            raise
    return future.result()


async def in_thread(fn: Callable[..., T], /, *args: Any, undo: Callable[[T], object] | None = None) -> T:
    """``fn(*args)`` on the default pool, :func:`settled`."""
    loop = asyncio.get_running_loop()
    return await settled(loop.run_in_executor(None, functools.partial(fn, *args)), undo)


def lane_pool() -> ThreadPoolExecutor:
    global _lane_pool
    if _lane_pool is None:
        _lane_pool = ThreadPoolExecutor(LANE_THREADS, thread_name_prefix="lane")
    return _lane_pool


class SerialLane:
    """Runs what is submitted one at a time and in order, on a shared pool: a blob's hash is taken in offset
    order without a thread of its own, while other blobs' lanes use the pool's other threads."""

    def __init__(self, pool: ThreadPoolExecutor):
        self._pool = pool
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[Future[Any], Callable[[], Any]]] = collections.deque()
        self._running = False  # a pool thread drains the queue
        self._starting = False  # a start is scheduled on the event loop
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` (from the event loop's thread). An idle lane is started at the end of the loop's
        current iteration, so that what is submitted meanwhile goes in one wake-up of a pool thread (a wake-up
        costs 60-80 us of CPU on these VMs)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()  # a lane serves one blob, in one event loop
        future: Future[T] = Future()
        with self._lock:
            self._queue.append((future, functools.partial(fn, *args)))
            if self._running or self._starting:
                return future
            self._starting = True
        self._loop.call_soon(self._start)
        return future

    def _start(self) -> None:
        with self._lock:
            self._starting = False
            if self._running or not self._queue:
                return
            self._running = True
        self._pool.submit(self._drain)

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` in its turn, :func:`settled`."""
        future = self.submit(fn, *args)
        assert self._loop is not None
        return await settled(asyncio.wrap_future(future, loop=self._loop))

    async def drained(self) -> None:
        """Wait until everything submitted so far has run."""
        await self.run(lambda: None)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return
                future, call = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as e:  # the submitter sees it
                future.set_exception(e)
