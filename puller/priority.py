"""A semaphore that serves its waiters by priority: the engine's connection budget and the containerd store's
write streams both hand out slots in an image's blob order (config, then layers bottom up)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PrioritySemaphore:
    """An asyncio semaphore whose waiters are served lowest ``priority`` first (FIFO among equals)."""

    def __init__(self, value: int):
        self._free = value
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()

    async def acquire(self, priority: int = 0) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted as we were cancelled: pass it on
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def outranks(self, priority: int) -> bool:
        """True when someone with a lower (more urgent) priority than ``priority`` is waiting."""
        while self._waiters and self._waiters[0][2].done():  # drop waiters that were cancelled
            heapq.heappop(self._waiters)
        return bool(self._waiters) and self._waiters[0][0] < priority

    @asynccontextmanager
    async def hold(self, priority: int = 0) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()
