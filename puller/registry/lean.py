"""A lean HTTP/1.1 range client for blob bodies: the bytes land in buffers puller owns, no object per read.

A general client makes a new bytes object for every read, and on a node with few cores the event loop's CPU per
byte is what limits a pull (benchmarks/README.md). For the requests that carry nearly every byte, ranges of a blob at
its resolved URL (the CDN URL a registry redirected to, fetched without credentials), this module speaks HTTP/1.1
itself over an :class:`asyncio.BufferedProtocol`: the transport receives (for TLS: decrypts) straight into one of
two buffers of the connection; a full buffer is handed to the caller while the other one fills, and reading
pauses when both wait. The buffers go back to a spare list after a request that ended normally. A caller
may keep a delivered block's buffer instead of copying its bytes (:class:`Lent`): the connection goes on with
another, and the buffer comes back to a pool when the caller gives it back. A caller may also end a request early
(:class:`Cut`: a tail split, a takeover): it stops receiving at the cut, and the connection is not reused.

It does only that: GET with Range, and a 206 answer with a Content-Length and a Content-Range equal to the range
asked for, identity encoding, keep-alive. Any other status raises :class:`NotPartial` before a body byte is
taken, and the caller asks again through :mod:`.http`, which maps every status to puller's errors. Chunked or encoded
bodies and malformed heads are transport errors (retried). Waits are bounded as :mod:`.http`'s are: the head within
``headers_timeout_s``, each read within ``read_timeout_s``, and the low-speed limit over the time spent waiting
on the server (:class:`~puller.registry.bodies.SpeedGuard`).
"""

from __future__ import annotations

import asyncio
import collections
import mmap
import re
import time
from collections.abc import Awaitable, Callable
from typing import cast
from urllib.parse import urlsplit

from ..errors import TransportError
from .bodies import USER_AGENT, SpeedGuard
from .http import IdleConnections, SSLFor, Timeouts, connect_errors, tls_for

BLOCK = 1024 * 1024  # bytes per buffer; two per connection (each full one is a write, a thread hand-off)
MAX_HEAD = 64 * 1024
MAX_SPARE = 32  # buffer pairs kept for the next requests (64 MiB): fresh ones cost page faults
MAX_FREE = 64  # buffers given back by callers that kept them, kept for connections to go on with (64 MiB)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

Origin = tuple[str, str, int]  # scheme, host, port


class Lent:
    """A delivered block's buffer, which the caller may keep instead of copying its bytes: :meth:`take` (before
    the delivery returns) makes the buffer the caller's, and the connection goes on with another; the caller
    calls :meth:`give_back` once done with it (or drops it: then it is only not reused)."""

    __slots__ = ("_free", "buffer", "taken")

    def __init__(self, buffer: mmap.mmap, free: list[mmap.mmap]):
        self.buffer = buffer
        self.taken = False
        self._free = free

    def take(self) -> None:
        self.taken = True

    def give_back(self) -> None:
        if len(self._free) < MAX_FREE:
            self._free.append(self.buffer)


def new_buffer() -> mmap.mmap:
    """A receive buffer of BLOCK bytes. Anonymous memory, whose pages are faulted in as the kernel first receives
    into them: a bytearray is zeroed when made, about 1 ms per connection's pair here, which a pull's 32 connections
    would pay one after another on the event loop before their first requests go out."""
    return mmap.mmap(-1, BLOCK)


# bytes at an offset, and their buffer to keep if wanted; False: stop, the range was cut short
Deliver = Callable[[int, memoryview, Lent], Awaitable[bool]]


class Cut:
    """A caller's handle on its lean request, to end it early: :meth:`at` an offset (see :meth:`_Connection.cut`),
    also before the request has a connection."""

    __slots__ = ("_conn", "end")

    def __init__(self) -> None:
        self._conn: _Connection | None = None
        self.end: int | None = None

    def at(self, end: int) -> None:
        self.end = end if self.end is None else min(self.end, end)
        if self._conn is not None:
            self._conn.cut(self.end)

    def received_to(self) -> int | None:
        """The offset up to which the request has received bytes, delivered or not (None before it has a
        connection): cut there, a request that stalls hands over what it has instead of dropping it."""
        return self._conn.received_to() if self._conn is not None else None


class NotPartial(Exception):
    """The server answered with something other than 206 (before any body byte was taken)."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


class _Stale(Exception):
    """A kept-alive connection closed before any byte of the answer: safe to ask again on a new one."""


class _Connection(asyncio.BufferedProtocol):
    """One connection; one request at a time (no pipelining)."""

    def __init__(self) -> None:
        self._arrays: list[mmap.mmap] = []  # the two buffers, while a request is out (an idle one holds none)
        self._views: list[memoryview] = []
        self._busy = [False, False]  # a block of this buffer waits to be delivered
        self._scratch = memoryview(bytearray(256))  # for bytes nobody asked for: an error
        self._transport: asyncio.Transport | None = None
        self._head = True  # reading the head (else the body)
        self._active = False  # a request is out
        self._cur = 0  # the buffer being filled, from _start
        self._fill = 0
        self._start = 0
        self._range = (0, 0)
        self._pos = 0  # the offset of the block being filled
        self._remaining = 0  # body bytes still to receive
        self._cut_end: int | None = None  # the range's end as the caller lowered it (see cut)
        self._blocks: collections.deque[tuple[int, int, int, int]] = collections.deque()  # (buffer, a, b, offset)
        self._paused = False
        self._stray = False  # get_buffer gave the scratch buffer
        self._error: BaseException | None = None
        self._wake = asyncio.Event()
        self.received = 0  # body bytes received (for the speed guard)
        self.keep = True
        self.closed = False

    # ---- transport callbacks ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        # Never an empty buffer (the transport treats that as an error): bytes nobody asked for land in scratch.
        self._stray = True
        if not self._active or self.closed:
            return self._scratch
        view = self._views[self._cur]
        if self._head:
            view = view[self._fill :]
        else:
            view = view[self._fill : self._fill + min(BLOCK - self._fill, self._remaining)]
        self._stray = not view
        return self._scratch if self._stray else view

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        try:
            if self._stray:
                raise TransportError("the server sent bytes nobody asked for")
            self._updated(nbytes)
        except Exception as e:
            self._fail(e)

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._active and self._error is None:
            if self._head and self._fill == 0:
                self._error = _Stale()
            else:
                self._error = TransportError(f"connection lost mid-answer: {exc or 'closed by the server'}")
        self._wake.set()

    # ---- receiving --------------------------------------------------------------------------------------

    def _updated(self, n: int) -> None:
        self._fill += n
        if self._head:
            buf = self._arrays[self._cur]
            end = buf.find(b"\r\n\r\n", max(0, self._fill - n - 3), self._fill)
            if end < 0:
                if self._fill >= MAX_HEAD:
                    raise TransportError("response head too long")
                return
            length = self._parse_head(bytes(buf[:end]))
            self._start = end + 4
            got = self._fill - self._start
            if got > length:
                raise TransportError("more bytes than the body")  # nothing was pipelined
            self._remaining = length - got
            self._head = False
            if self._cut_end is not None:  # cut before the head came
                self._limit_to_cut()
            self._wake.set()
        else:
            self._remaining -= n
        self.received += n
        if self._fill == BLOCK or self._remaining == 0:
            self._queue_block()

    def _parse_head(self, head: bytes) -> int:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        status = rest[:3]
        if not version.startswith("HTTP/1.") or not status.isdigit():
            raise TransportError(f"bad status line {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise TransportError(f"bad header line {line[:100]!r}")
            name, value = name.lower(), value.strip()
            if name in headers and headers[name] != value:
                raise TransportError(f"{name} sent twice, differently")
            headers[name] = value
        connection = headers.get("connection", "").lower()
        self.keep = self.keep and "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
        if status != "206":
            raise NotPartial(int(status))
        if "transfer-encoding" in headers:
            raise TransportError(f"a blob range sent with Transfer-Encoding {headers['transfer-encoding']!r}")
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", ""):
            raise TransportError(f"a blob range sent with Content-Encoding {encoding!r}")
        length = headers.get("content-length", "")
        start, end = self._range
        m = _CONTENT_RANGE.fullmatch(headers.get("content-range", ""))
        if not length.isdigit() or not m or (int(m[1]), int(m[2]) + 1, int(length)) != (start, end, end - start):
            raise TransportError(
                f"bad Content-Range {headers.get('content-range')!r} / Content-Length {length!r} for {start}-{end - 1}"
            )
        return int(length)

    def _queue_block(self) -> None:
        i, a, b = self._cur, self._start, self._fill
        if b > a:
            self._busy[i] = True
            self._blocks.append((i, a, b, self._pos))
            self._pos += b - a
        self._fill = self._start = 0
        self._wake.set()
        if self._remaining == 0:
            if self._cut_end is not None and self._transport is not None:
                self._transport.pause_reading()  # cut: no byte past it is read (the connection is not reused)
            return
        if self._busy[1 - i]:  # both buffers wait to be delivered: stop reading until one is free
            self._paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        else:
            self._cur = 1 - i

    def _release(self, i: int) -> None:
        self._busy[i] = False
        if self._paused and not self.closed and self._remaining:
            self._paused = False
            self._cur = i
            assert self._transport is not None
            self._transport.resume_reading()

    def received_to(self) -> int:
        return self._range[0] if self._head else self._pos + self._fill - self._start

    def cut(self, end: int) -> None:
        """The caller needs the range only up to ``end`` now (a tail split gave the rest to another connection):
        receive no further than that, and end the request there. The connection is not reused (the rest of the
        answer is not read), but the bytes on their way past the cut are not received into a block for nothing."""
        if not self._active or self.closed or end >= self._range[1]:
            return
        self._cut_end = end if self._cut_end is None else min(end, self._cut_end)
        self.keep = False
        if self._head:
            return  # applied when the head has come
        before = self._remaining
        self._limit_to_cut()
        if self._remaining == 0 < before:
            self._queue_block()

    def _limit_to_cut(self) -> None:
        assert self._cut_end is not None
        self._remaining = min(self._remaining, max(0, self._cut_end - self.received_to()))

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        self._wake.set()
        self.close()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    # ---- one request ------------------------------------------------------------------------------------

    async def fetch(
        self,
        host: str,
        target: str,
        start: int,
        end: int,
        deliver: Deliver,
        guard: SpeedGuard,
        timeouts: Timeouts,
        buffers: list[mmap.mmap],
        free: list[mmap.mmap],
        cut: Cut | None = None,
    ) -> None:
        """GET bytes ``[start, end)`` into ``buffers`` (two of BLOCK bytes) and hand them to ``deliver`` in order,
        one block at a time; a buffer the caller keeps is replaced in ``buffers`` by one from ``free`` (or a new
        one). ``cut`` may end the request early."""
        assert self._transport is not None and not self._active
        self._arrays = buffers
        self._views = [memoryview(a) for a in buffers]
        self._active, self._head, self._range, self._pos = True, True, (start, end), start
        self._cur, self._fill, self._start, self._remaining, self.received = 0, 0, 0, end - start, 0
        self._cut_end, self.keep = None, True
        if cut is not None:
            cut._conn = self
            if cut.end is not None:
                self.cut(cut.end)
        self._transport.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nRange: bytes={start}-{end - 1}\r\n"
            f"Accept-Encoding: identity\r\nUser-Agent: {USER_AGENT}\r\n\r\n".encode("latin-1")
        )
        head_by = time.monotonic() + timeouts.headers_s
        try:
            while True:
                if self._blocks:
                    i, a, b, offset = self._blocks.popleft()
                    lent = Lent(buffers[i], free)
                    try:
                        more = await deliver(offset, self._views[i][a:b], lent)
                    finally:
                        if lent.taken:  # the caller's now: go on with another
                            buffers[i] = free.pop() if free else new_buffer()
                            self._views[i] = memoryview(buffers[i])
                        self._release(i)
                    if not more and (self._remaining or self._blocks):  # the range was cut short: the rest
                        self.close()  # of the answer is not read, so the connection cannot be reused
                        return
                    continue
                if self._error is not None:
                    raise self._error
                if not self._head and self._remaining == 0:
                    self._active = False
                    if not self.keep:
                        self.close()
                    return
                await self._wait(guard, head_by if self._head else None, timeouts.read_s)
        except BaseException:
            self.close()
            raise
        finally:
            self._arrays, self._views = [], []  # a pooled connection holds no buffers
            if cut is not None:
                cut._conn = None

    async def _wait(self, guard: SpeedGuard, head_by: float | None, read_s: float) -> None:
        """Wait for the head or a whole block, bounded: the head by ``head_by``, the body by ``read_s`` without a
        byte; the wait and its bytes count against the low-speed limit."""
        self._wake.clear()
        while True:
            before, t0 = self.received, time.monotonic()
            timeout = read_s if head_by is None else max(0.0, head_by - t0)
            try:
                async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can lose a cancellation
                    await self._wake.wait()
            except TimeoutError:
                if head_by is not None or self.received == before:
                    what = "the answer's head" if head_by is not None else "the next bytes"
                    raise TransportError(f"timed out waiting {timeout:.0f} s for {what}") from None
                guard.account(time.monotonic() - t0, self.received - before)  # bytes, but not a block yet
                continue
            guard.account(time.monotonic() - t0, self.received - before)
            return


class LeanRanges:
    """Ranges of resolved blob URLs over pooled lean connections. Use as ``async with``."""

    def __init__(self, ssl_for: SSLFor, timeouts: Timeouts):
        self._ssl_for = ssl_for
        self._timeouts = timeouts
        self._idle: IdleConnections[_Connection] = IdleConnections()  # (an idle connection holds no buffers)
        self._spare: list[list[mmap.mmap]] = []  # buffer pairs of requests that ended normally
        self._free: list[mmap.mmap] = []  # buffers callers kept and gave back (see Lent)

    async def __aenter__(self) -> LeanRanges:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._idle.close()

    async def get(
        self, url: str, start: int, end: int, deliver: Deliver, guard: SpeedGuard, cut: Cut | None = None
    ) -> None:
        """Bytes ``[start, end)`` of ``url`` to ``deliver``; :class:`NotPartial` when the answer is not a 206.
        ``cut`` may end the request early."""
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname or ""
        origin = (scheme, host, parts.port or (443 if scheme == "https" else 80))
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        # Reused only after a request that ended normally: after a failure or a cancellation, a worker thread of the
        # store may still be reading a block of them.
        buffers = self._spare.pop() if self._spare else [new_buffer(), new_buffer()]
        for attempt in (1, 2):
            conn = self._idle.take(origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, url)
            try:
                await conn.fetch(
                    host_header, target, start, end, deliver, guard, self._timeouts, buffers, self._free, cut
                )
            except _Stale:  # nothing was delivered
                if attempt == 2 or not reused:
                    raise TransportError(f"{host}: connection closed before the answer") from None
                continue
            if conn.keep:
                self._idle.keep(origin, conn)
            else:
                conn.close()
            if len(self._spare) < MAX_SPARE:
                self._spare.append(buffers)
            return

    async def _connect(self, origin: Origin, url: str) -> _Connection:
        _, host, port = origin
        context = tls_for(self._ssl_for, url)
        loop = asyncio.get_running_loop()
        with connect_errors(f"{host}:{port}", tls=context is not None):
            async with asyncio.timeout(self._timeouts.connect_for(host, port)):
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=context, server_hostname=host if context else None
                )
        return conn
