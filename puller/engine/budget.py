"""What all pulls of a process share: one budget of concurrent connections (plus a per-host cap), and an
optional node-wide bandwidth cap.

A connection slot is held from the request until its body is finished (not just until headers arrive)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_MAX_PER_HOST = 32


class ConnectionBudget:
    def __init__(self, total: int = DEFAULT_MAX_CONNECTIONS, per_host: int = DEFAULT_MAX_PER_HOST):
        if total < 1 or per_host < 1:
            raise ValueError("connection budget must be at least 1")
        self.total = total
        self.per_host = per_host
        self._global = asyncio.Semaphore(total)
        self._hosts: dict[str, asyncio.Semaphore] = {}
        self.in_use = 0  # connections held now (for metrics)

    @asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        host_sem = self._hosts.setdefault(host, asyncio.Semaphore(self.per_host))
        async with host_sem, self._global:
            self.in_use += 1
            try:
                yield
            finally:
                self.in_use -= 1


class BandwidthCap:
    """A node-wide cap on received bytes per second, shared by every connection (a token bucket that may go
    into debt). A reader that takes bytes beyond the rate sleeps off its share of the debt; while it sleeps its
    socket is not read, its TCP window fills, and the sender slows down: the cap holds at the wire, not only in
    the process. ``burst`` bounds how far ahead of the rate a quiet period lets the next reads run."""

    def __init__(self, bytes_per_s: float, burst: float | None = None):
        if bytes_per_s <= 0:
            raise ValueError("bandwidth cap must be positive")
        self.rate = float(bytes_per_s)
        self.burst = burst if burst is not None else max(self.rate / 10, 256 * 1024)
        self._tokens = self.burst
        self._stamp = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate) - n
        self._stamp = now
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)
