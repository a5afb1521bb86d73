"""containerd's unary gRPC calls over a few reused connections (:class:`~.stream.Connection`), one call at a time
on each: a pull makes a handful of calls per blob (Info, Status, labels, Prepare, Apply, Commit), often several at
once, and opening a connection for each would cost containerd a server transport per call.

Every call is bounded: it fails with DEADLINE_EXCEEDED after its timeout (containerd is told too, with
``grpc-timeout``), and at most MAX_CONNECTIONS calls are out at once (the others wait their turn, within their own
timeout). A connection goes back to the pool only after a call that ended cleanly on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from .stream import Connection, RpcError, StatusCode

MAX_CONNECTIONS = 8  # calls out at once, and so connections (an idle one is kept for the next call)


class Channel:
    """Use as ``async with Channel(address) as channel``; :meth:`call` from any task of its loop."""

    def __init__(self, address: str):
        self.address = address
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    async def call(self, path: str, request: bytes, metadata: Sequence[tuple[str, str]], timeout: float) -> list[bytes]:
        """Call ``path`` with the serialized ``request``: its answers (a unary call has one), or RpcError."""
        try:
            async with asyncio.timeout(timeout):
                async with self._slots:
                    return await self._call(path, request, metadata, timeout)
        except TimeoutError:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, f"{path}: no answer within {timeout:.0f} s") from None

    async def _call(
        self, path: str, request: bytes, metadata: Sequence[tuple[str, str]], timeout: float
    ) -> list[bytes]:
        connection = self._take() or await Connection.open(self.address)
        try:
            return await connection.call(path, metadata, request, timeout)
        finally:  # a call cut short (cancelled, timed out) leaves its connection unusable: it is closed
            if connection.reusable:
                self._idle.append(connection)
            else:
                connection.close()

    def _take(self) -> Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable:  # containerd may have closed it meanwhile
                return connection
            connection.close()
        return None
