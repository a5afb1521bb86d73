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
        self.value = value  # slots handed out at most
        self._free = value  # below 0 after a resize down: slots held beyond the new value, taken back on release
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
        if self._free < 0:  # held beyond a smaller value: taken back
            self._free += 1
            return
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def resize(self, value: int) -> None:
        """Hand out at most ``value`` slots from now on (slots held beyond it are taken back as they are released)."""
        grown, self.value = value - self.value, value
        self._free += grown
        for _ in range(max(0, min(grown, self._free))):
            self._free -= 1
            self.release()  # a waiter served, or the slot free again

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
