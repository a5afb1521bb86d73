"""A layer's bytes handed from the event loop to its applier thread, in order, with bounded memory.

The store calls :meth:`LayerFeed.put` with each piece of the blob as it streams it (the bytes containerd is sent,
in order); the piece is copied into a queue of at most MAX_QUEUED bytes, and a pump task hands what is queued to
:meth:`LayerStream.feed` in an applier thread. Where applying is slower than the network, ``put`` waits for room,
so the blob's stream waits and, behind it, its downloads (the store's own backpressure). An applier that failed
takes no more bytes (``put`` returns at once): :meth:`finish` raises its error. A feed whose bytes failed the
blob's digest is :meth:`discarded <LayerFeed.discard>`: its layer is applied from the verified blob instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from concurrent.futures import Executor

from ..stores.threads import settled
from .layer import Applied, LayerStream

MAX_QUEUED = 4 << 20  # bytes of one layer waiting for its applier thread


class LayerFeed:
    """Use: ``put`` pieces in order from offset 0, then ``finish`` (or ``abort``)."""

    def __init__(self, stream: LayerStream, executor: Executor):
        self.stream = stream
        self._executor = executor
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._more = asyncio.Event()  # bytes queued, or the end
        self._room = asyncio.Event()  # the queue went below MAX_QUEUED
        self._ended = False
        self._error: BaseException | None = None
        self._pump = asyncio.ensure_future(self._run())
        self.offset = 0  # bytes put so far
        self.discarded = False  # what was put is not the blob (it failed its digest): the applier's work is void

    async def put(self, view: memoryview) -> None:
        """Queue a copy of ``view`` (the next bytes of the blob), waiting while MAX_QUEUED are queued."""
        while self._queued >= MAX_QUEUED and self._error is None and not self._pump.done():
            self._room.clear()
            await self._room.wait()
        if self._error is not None or self._pump.done():
            return
        data = bytes(view)
        self._queue.append(data)
        self._queued += len(data)
        self.offset += len(data)
        self._more.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self._queue and not self._ended:
                    self._more.clear()
                    await self._more.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                try:
                    await loop.run_in_executor(self._executor, _feed_all, self.stream, batch)
                finally:
                    self._queued -= sum(map(len, batch))
                    self._room.set()
        except BaseException as e:
            self._error = e
            self._queue.clear()
            self._queued = 0
            self._room.set()
            raise

    async def finish(self) -> Applied:
        """Wait for the applier to take every byte put, then verify the layer (LayerStream.finish)."""
        self._ended = True
        self._more.set()
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._pump)
        if self._error is not None:
            raise self._error
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.stream.finish)

    async def abort(self) -> None:
        """Stop applying (the pull gave up); the applier thread finishes the piece it is in first."""
        self._ended = True
        self._error = self._error or asyncio.CancelledError()
        self._queue.clear()
        self._more.set()
        self._room.set()
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._pump)

    async def discard(self) -> None:
        """The bytes put failed the blob's digest (a lying host): void, and no more are applied."""
        self.discarded = True
        await self.abort()

    async def close(self) -> None:
        """Release the applier (its tar thread may be finishing a piece: waited for in a thread)."""
        await settled(asyncio.get_running_loop().run_in_executor(self._executor, self.stream.close))


def _feed_all(stream: LayerStream, batch: list[bytes]) -> None:
    for data in batch:
        stream.feed(data)
