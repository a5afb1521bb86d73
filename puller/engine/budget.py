"""One budget of concurrent connections shared by every chunk of every blob of every pull, plus a per-host cap.

A slot is held from the request until its body is finished (not just until headers arrive)."""

from __future__ import annotations

import asyncio
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
