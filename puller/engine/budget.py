"""What all pulls of a process share: one budget of concurrent connections (plus a per-host cap), and an
optional node-wide bandwidth cap.

A download worker holds its slot from its first request until it runs out of chunks (not just until headers
arrive), unless a more urgent blob waits. Slots go to waiters by priority (an image's blobs in manifest order:
config, then layers bottom up), first come first served within one priority: every connection stays busy, and
the lower layers land first, so a store that unpacks (containerd) can apply layer N while layer N+1 downloads
instead of waiting for the whole image."""

from __future__ import annotations

import asyncio
import time

from ..priority import PrioritySemaphore

DEFAULT_MAX_CONNECTIONS = 32
DEFAULT_MAX_PER_HOST = 32


class ConnectionBudget:
    def __init__(self, total: int = DEFAULT_MAX_CONNECTIONS, per_host: int = DEFAULT_MAX_PER_HOST):
        if total < 1 or per_host < 1:
            raise ValueError("connection budget must be at least 1")
        self.total = total
        self.per_host = per_host
        self._global = PrioritySemaphore(total)
        self._hosts: dict[str, PrioritySemaphore] = {}
        self.in_use = 0  # connections held now (for metrics)

    def connection(self, priority: int = 0) -> Connection:
        """A worker's claim on one connection, served before waiters with a higher ``priority`` number."""
        return Connection(self, priority)

    def _host(self, host: str) -> PrioritySemaphore:
        return self._hosts.setdefault(host, PrioritySemaphore(self.per_host))


class Connection:
    """One worker's slot of the budget, kept from one request to the next: a blob keeps the connections it has
    while blobs after it wait, instead of handing one to them each time a chunk ends. Given back when the worker
    ends, while it waits out a retry, or when a more urgent blob is waiting (``yield_if_outranked``)."""

    def __init__(self, budget: ConnectionBudget, priority: int):
        self.budget = budget
        self.priority = priority
        self.host: str | None = None  # the host whose slot is held, None when nothing is held

    async def acquire(self, host: str) -> None:
        if self.host == host:
            return
        self.release()
        host_sem = self.budget._host(host)
        await host_sem.acquire(self.priority)
        try:
            await self.budget._global.acquire(self.priority)
        except BaseException:
            host_sem.release()
            raise
        self.host = host
        self.budget.in_use += 1

    def release(self) -> None:
        if self.host is None:
            return
        self.budget._global.release()
        self.budget._host(self.host).release()
        self.budget.in_use -= 1
        self.host = None

    def yield_if_outranked(self) -> None:
        if self.host is not None and (
            self.budget._global.outranks(self.priority) or self.budget._host(self.host).outranks(self.priority)
        ):
            self.release()


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
