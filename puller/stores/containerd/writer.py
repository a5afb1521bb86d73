"""The containerd store's :class:`~puller.stores.BlobWriter`: a blob's bytes into one Content.Write stream.

containerd takes a blob's bytes in order only, and the engine delivers them in any order. Received bytes are kept
in memory for their turn as the Write message that will carry them (whose pages :mod:`.stream` hands to the kernel
uncopied): around their receive buffer itself where the caller hands it over (:class:`~puller.stores.Handover`),
else copied once into a message already cut into HTTP/2 frames; MAX_KEPT for all blobs together (counted by the
buffers held), less for blobs still waiting for a stream. The few that do not fit are staged in the store's
staging directory (:class:`~puller.stores.staged.StagedFile`) and read back in their turn straight into their
message's frames.
containerd hashes what it is sent and commits only if the expected digest matches.

Backpressure: where containerd's ingest is the limit (a fast link), downloading further only takes the CPU (or
disk to stage on) that containerd needs, so :meth:`ContainerdWriter.write_at` waits while its bytes are more than
MAX_AHEAD past what containerd has taken; and while a blob waits for its stream and containerd is the limit (a
stream has bytes it has yet to take), its bytes wait for memory to keep them instead of being staged (staging
writes them to disk and reads them back: on layers20 a third of puller's CPU, taken from containerd on a 2-core
node). Its bytes that extend its prefix take the last quarter of that memory. Where the network is the limit
(every stream waits for bytes), nothing waits: a download held back would leave the link idle. Every wait is
bounded (MAX_WAIT_S, one deadline per write) and decided again whenever memory, the streams or the blob's prefix
change; after it the bytes are kept or staged as any others. Where layers are applied while they download, a
stream with bytes at hand waits for its applier rather than for containerd, and ranges are not held back for it
before they are requested (:meth:`ContainerdWriter.room_for`).

At most MAX_WRITE_STREAMS blobs are streamed at once (MAX_WRITE_STREAMS_APPLYING where layers are applied while they
download), lowest layers first: the layer unpacked next must not share containerd's ingest (or the interpreter, for
its applier) with the layers after it, nor wait for a layer whose bytes are still on their way.

Where layers are applied while they download (the unpacker's stream path), a layer's stream first waits (up to
FEED_WAIT_S) for the unpacker to hand it the layer's :class:`~puller.unpack.process.LayerFeed`, then gives the feed
every piece it sends, in order from byte 0 (a stream that resumes containerd's ingest past byte 0 gives it
nothing: the unpacker then has the Diff service apply that layer). A feed with no room makes the stream wait.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import heapq
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...errors import DigestMismatch, SizeMismatch
from ...priority import PrioritySemaphore
from ...ranges import RangeSet
from ...registry.manifest import Descriptor
from .. import Buffer, Handover, WriteStatus, store_error
from ..staged import StagedFile
from .content import (
    WRITE_MESSAGE,
    Content,
    Message,
    Piece,
    gathered_message,
    ingest_ref,
    piece_length,
    staged_message,
    write_message,
)
from .leases import Lease, Leases
from .stream import Framed, Gathered

if TYPE_CHECKING:
    from ...unpack.process import LayerFeed
    from ..safedir import SafeDir

MAX_WRITE_STREAMS = 2  # blobs streamed into containerd at once, lowest layers first
# where layers are applied while they download: one, so that the layer being applied has the interpreter and both
# cores to itself (appliers of many small files contend for the GIL; real2g 14.3-14.8 s against 16.5-20.1 s with
# two, ml3g the same, side by side: benchmarks/README.md)
MAX_WRITE_STREAMS_APPLYING = 1
FEED_WAIT_S = 60.0  # longest wait of a layer's stream for its feed (the unpacker needs the image config first)
MAX_AHEAD = 64 << 20  # how far a blob's writes may run ahead of what containerd has taken before they wait
MAX_WAIT_S = 10.0  # longest wait in write_at (every wait is bounded: see the module docstring)
MAX_KEPT = 64 << 20  # received bytes kept in memory for their turn, all blobs together; the rest is staged
MAX_KEPT_WAITING = MAX_KEPT // 4  # of which for blobs still waiting for a write stream
# MAX_KEPT where layers are applied while they download: the applier process's memory comes on top (18 MB for its
# interpreter and about 12 MiB of pieces; side by side, puller and its applier together peaked at 162-172 MB with 8
# MiB kept and 169-200 MB with 16, 1-3% faster; benchmarks/README.md)
MAX_KEPT_APPLYING = 8 << 20
PREFIX_ROOM = 4  # of the memory for waiting blobs, 1/4 only bytes that extend a blob's prefix may take
PREFIX_AT_HAND = 1 / 2  # of the memory for kept bytes: a blob's prefix ranges wait for room once this much of it is
# at hand for containerd
BUSY_AT_HAND = 8 << 20  # containerd is the limit when a stream has more than this at hand that it has yet to take
TAKE_FILLED = 0.75  # a handed-over buffer is kept only when the bytes fill this much of it (else they are copied)


@dataclass(slots=True)
class BlobState:
    """What the store knows of one blob of the images being pulled."""

    order: int = 0  # its place in the manifest (config, layers bottom up): lower streams first
    source: dict[str, str] = field(default_factory=dict)  # the distribution source label to commit it with
    labelled: dict[str, str] | None = None  # the labels it was committed with
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set when it is committed
    images: int = 0  # images being pulled that have it
    feed: asyncio.Future[LayerFeed | None] | None = None  # a layer applied while it downloads: its feed, once known


class Shared:
    """What the writers of one store share: memory for kept bytes and the write streams."""

    def __init__(self, content: Content, leases: Leases, staging: SafeDir):
        self.content = content
        self.leases = leases
        self.staging = staging
        self.kept = 0  # bytes kept in memory, all writers together
        self.max_kept = MAX_KEPT  # up to which
        self.max_kept_waiting = MAX_KEPT_WAITING  # up to which for blobs still waiting for a write stream
        self.hold_requests = True  # whether ranges wait for memory while containerd is the limit (room_for)
        self.promised = 0  # bytes of ranges requested with room promised for them, not yet arrived
        self.streaming: set[ContainerdWriter] = set()  # blobs being streamed
        self.slots = PrioritySemaphore(MAX_WRITE_STREAMS)
        # writes and requests waiting for memory, first come first served: (whether it must still wait, given
        # memory promised to those woken before it; its bytes; waiter); at most one per download worker, each
        # bounded by its deadline
        self.memory_waiters: list[tuple[Callable[[int], bool], int, asyncio.Future[None]]] = []

    def applying_while_downloading(self) -> None:
        """Layers are applied as they download: their appliers' memory comes on top of the kept bytes, one blob
        streams (and is applied) at a time, and ranges are not held back for a busy stream (see
        :meth:`ContainerdWriter.room_for`)."""
        self.max_kept = min(self.max_kept, MAX_KEPT_APPLYING)
        self.max_kept_waiting = min(self.max_kept_waiting, self.max_kept // 4)
        self.slots.resize(min(self.slots.value, MAX_WRITE_STREAMS_APPLYING))
        # A stream with bytes at hand then waits for its applier (in bursts), not for containerd's ingest: ranges
        # held back meanwhile left the link idle (side by side without: ml3g 24.9 -> 20.9 s, real2g 26.8 -> 23.3 s).
        self.hold_requests = False

    def containerd_busy(self) -> bool:
        """Whether a stream has bytes at hand that containerd has yet to take: then containerd, not the network,
        is the limit, and it frees memory as it goes."""
        return any(writer.done.prefix_end() - writer.sent > BUSY_AT_HAND for writer in self.streaming)

    def memory_changed(self) -> None:
        """Wake the waiting writes that need not wait any more (counting the memory of those woken before them):
        called when memory is freed, a stream starts, ends or runs out of bytes, or a blob's prefix grows."""
        woken = 0
        for must_wait, n, waiter in self.memory_waiters:
            if not waiter.done() and not must_wait(woken):
                waiter.set_result(None)
                woken += n

    async def wait_for_memory(self, must_wait: Callable[[int], bool], n: int, deadline: float) -> bool:
        """Wait (until ``deadline``) while ``must_wait``; checked again each time it is woken (one woken before it
        may have taken the memory). False when the deadline came first."""
        while must_wait(0):
            entry = (must_wait, n, asyncio.get_running_loop().create_future())
            self.memory_waiters.append(entry)
            try:
                async with asyncio.timeout_at(deadline):
                    await entry[2]
            except TimeoutError:
                return False
            finally:
                self.memory_waiters.remove(entry)
        return True


class ContainerdWriter:
    def __init__(self, shared: Shared, desc: Descriptor, state: BlobState):
        self.desc = desc
        self._shared = shared
        self._state = state
        self._staged = StagedFile(shared.staging, desc)  # bytes memory could not keep
        self.done = RangeSet()  # bytes containerd has, or kept here, or staged
        self.sent = 0  # bytes containerd has been given
        self._ref = ingest_ref(desc).encode()
        self._kept: dict[int, Message] = {}  # offset -> kept bytes, as the Write message that will carry them
        self._kept_starts: list[int] = []  # their offsets, sorted
        self._streaming = False  # its Write stream is open
        self._stream_over = False  # its Write stream ended (or failed to start)
        self._has_slot = False  # may send now (one of MAX_WRITE_STREAMS)
        self._wake = asyncio.Event()  # more bytes are here
        self._ahead: list[tuple[int, int, asyncio.Future]] = []  # writes waiting for containerd: (sent they need,
        # order, waiter), a heap: each is woken once, when containerd has taken enough (or the stream ends)
        self._order = itertools.count()
        self._task: asyncio.Future | None = None
        self._lease: Lease | None = None
        self._present = False
        self._promised = 0  # this writer's part of Shared.promised
        self._feed: LayerFeed | None = None  # the layer's applier, given every byte sent (the stream path)

    async def __aenter__(self) -> ContainerdWriter:
        await self._staged.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._stop()
        finally:
            await self._staged.aclose()

    async def status(self) -> WriteStatus:
        """Present; or what containerd's ingest holds (from byte 0) plus what is staged; starts the stream."""
        content = self._shared.content
        if await content.has(self.desc):
            self._present = True
            return WriteStatus(RangeSet([(0, self.desc.size)]), present=True)
        self.sent = await content.ingest_offset(self.desc)
        self.done = self._staged.ranges.copy()
        self.done.add(0, self.sent)
        self._lease = self._shared.leases.for_blob(str(self.desc.digest))  # held until the write ends
        self._task = asyncio.ensure_future(self._stream())
        return WriteStatus(self.done.copy())

    async def write_at(self, offset: int, buffers: Sequence[Buffer], handover: Handover | None = None) -> None:
        assert self._task is not None, "status() first"
        n = sum(map(len, buffers))
        try:  # the room promised for these bytes is theirs until they are kept (or staged)
            deadline = asyncio.get_running_loop().time() + MAX_WAIT_S
            await self._room(offset + n, deadline)
            await self._memory(offset, n, deadline)
            ahead = offset > self.done.prefix_end()
            task = self._task
            if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                raise error  # the stream failed: say why now, not after the whole blob
            if not self._keep(offset, buffers, n, ahead, handover):
                try:
                    await self._staged.run(self._staged.write, offset, buffers)
                except OSError as e:
                    raise store_error(e, f"staging {self.desc.digest}") from None
                self._staged.written(offset, n)
            prefix_end = self.done.prefix_end()
            self.done.add(offset, offset + n)
            self._wake.set()
            if self._shared.memory_waiters and self.done.prefix_end() != prefix_end:
                self._shared.memory_changed()  # writes of this blob that waited as ahead may extend its prefix
        finally:
            self._arrived(n)

    async def _room(self, end: int, deadline: float) -> None:
        """Wait (until ``deadline``) while ``end`` is more than MAX_AHEAD past what containerd has taken."""
        assert self._task is not None
        need = end - MAX_AHEAD
        if need <= self.sent or self._task.done():
            return
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._ahead, (need, next(self._order), waiter))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await waiter

    def memory_limit(self, ahead: bool) -> int:
        """Kept bytes (all writers together) up to which this writer may keep more; for a blob waiting for its
        stream, bytes ``ahead`` of its prefix leave 1/PREFIX_ROOM of it to the bytes that let streams start."""
        kept, waiting = self._shared.max_kept, self._shared.max_kept_waiting
        if self._streaming:  # MAX_AHEAD bounds what it may keep; bytes containerd takes next may go a little over
            return kept if ahead else kept + kept // PREFIX_ROOM
        # Blobs still waiting for a stream get part of the memory: the rest goes to the ones being sent.
        return waiting - waiting // PREFIX_ROOM if ahead else waiting

    def must_wait(self, offset: int, n: int, reserved: int = 0) -> bool:
        """Whether ``n`` bytes at ``offset`` wait for memory now (``reserved``: memory promised to writes woken
        before them). Only a blob waiting for its stream waits, and only while containerd is the limit (a stream
        has bytes it has yet to take, so memory is freed as it goes): where the network is, a download held
        back would leave the link idle, and its bytes are staged as before."""
        if self._streaming or self._stream_over or self._task is None or not self._shared.containerd_busy():
            return False
        return self._shared.kept + reserved + n > self.memory_limit(offset > self.done.prefix_end())

    async def _memory(self, offset: int, n: int, deadline: float) -> None:
        """Wait (until ``deadline``) while the write must wait for memory."""
        await self._shared.wait_for_memory(functools.partial(self.must_wait, offset, n), n, deadline)

    async def room_for(self, offset: int, n: int, timeout: float) -> bool:
        """Whether ``n`` bytes at ``offset``, not yet requested, would find memory to wait in for their turn:
        waits up to ``timeout`` while containerd is the limit and memory is full (downloading further would only
        stage them on disk). Bytes that extend the blob's prefix have room while less than PREFIX_AT_HAND of
        it is at hand: they are what containerd (or the blob's stream, once it starts) takes next. Where layers are
        applied while they download, nothing waits here."""
        deadline = asyncio.get_running_loop().time() + timeout
        if not await self._shared.wait_for_memory(functools.partial(self._must_hold, offset, n), n, deadline):
            return False
        if self._task is not None and not self._task.done():  # promises end with the stream (_end_stream)
            self._promised += n  # until its bytes arrive (write_at), memory others may not count on
            self._shared.promised += n
        return True

    def _must_hold(self, offset: int, n: int, reserved: int) -> bool:
        if not self._shared.hold_requests or self._task is None or self._task.done():
            return False
        prefix = offset <= self.done.prefix_end()
        if prefix and self.done.prefix_end() - self.sent < self._shared.max_kept * PREFIX_AT_HAND:
            return False  # what containerd takes next, and it has little else of this blob at hand
        if not self._shared.containerd_busy():
            return False  # the network is the limit: a request held back would leave the link idle
        return self._shared.kept + self._shared.promised + reserved + n > self.memory_limit(not prefix)

    def _arrived(self, n: int) -> None:
        """``n`` bytes arrived: they no longer need the memory promised for them. A range cut short (split, taken
        over) leaves part of its promise, which its new range promised again: no more is ever promised than the
        blob still lacks."""
        keep = max(0, min(self._promised - n, self.desc.size - self.done.total()))
        self._shared.promised -= self._promised - keep
        self._promised = keep

    def _took(self, sent: int) -> None:
        """containerd has taken bytes ``[0, sent)``: wake the writes that waited for that."""
        self.sent = sent
        while self._ahead and self._ahead[0][0] <= sent:
            _, _, waiter = heapq.heappop(self._ahead)
            if not waiter.done():
                waiter.set_result(None)

    def _keep(self, offset: int, buffers: Sequence[Buffer], n: int, ahead: bool, handover: Handover | None) -> bool:
        """Keep the bytes in memory for their turn, if memory allows: their buffer itself where the caller hands
        it over and they fill most of it (memory is counted by the buffer's size), else copied once, straight into
        the message that will carry them."""
        view = memoryview(buffers[0]) if handover is not None and len(buffers) == 1 else None
        whole = memoryview(view.obj).nbytes if view is not None else n  # what keeping the buffer holds
        take = view is not None and n >= whole * TAKE_FILLED
        held = whole if take else n
        if self._shared.kept + held > self.memory_limit(ahead) or self._task is None or self._task.done():
            return False
        message: Framed | Gathered
        if take and view is not None and handover is not None:
            handover.take()
            message = gathered_message(self._ref, offset, view, handover.give_back)
        else:
            message = write_message(self._ref, offset, buffers)
        self._kept[offset] = Message(offset, n, message, held)
        bisect.insort(self._kept_starts, offset)
        self._shared.kept += held
        return True

    async def commit(self) -> None:
        """Wait for containerd's commit (DigestMismatch when its hash of what it was sent is not the digest)."""
        if self._present:
            return
        size = self.desc.size
        if self.done.prefix_end() != size or self._task is None:
            raise SizeMismatch(size, self.done.prefix_end(), what=f"blob {self.desc.digest}")
        try:
            await self._task
        except DigestMismatch:
            await self.abort()
            raise
        await self._staged.discard()
        self._present = True
        self._state.ready.set()

    async def abort(self) -> None:
        await self._stop()
        if self._feed is not None:  # what it was given is not the blob: the layer is applied from the blob
            await self._feed.discard()
            self._feed = None
        await self._shared.content.abort(self.desc)
        await self._staged.discard()
        self.done = RangeSet()

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._end_stream()

    # ---- the stream ---------------------------------------------------------------------------------------

    async def _stream(self) -> None:
        try:
            # A slot is held only while there is something to send: a blob waiting for one keeps downloading.
            while self.done.prefix_end() == self.sent < self.desc.size:
                self._wake.clear()
                await self._wake.wait()
            if self._state.feed is not None:  # before a slot: the config, which the unpacker waits for, needs one
                with contextlib.suppress(TimeoutError):
                    self._feed = await asyncio.wait_for(asyncio.shield(self._state.feed), FEED_WAIT_S)
            await self._take_slot()
            self._streaming = True
            self._shared.streaming.add(self)
            self._shared.memory_changed()  # its writes may keep more now
            labels = self._state.source
            lease = self._lease.id if self._lease else None
            await self._shared.content.write(self.desc, self._chunks, labels, resume_at=self.sent, lease=lease)
            self._state.labelled = labels
        finally:
            self._end_stream()

    def _end_stream(self) -> None:
        self._stream_over = True
        self._arrived(self._promised)
        if self._streaming:
            self._streaming = False
            self._shared.streaming.discard(self)
        if self._lease is not None:
            self._shared.leases.release(self._lease)
            self._lease = None
        self._release_slot()
        self._shared.kept -= sum(m.held for m in self._kept.values())
        for message in self._kept.values():
            message.framed.release()  # never sent
        self._kept.clear()
        self._kept_starts.clear()
        self._shared.memory_changed()  # its own waiting writes go on too (to stage or fail): its task is done
        for _, _, waiter in self._ahead:  # writes held back go on (and meet the error at commit)
            if not waiter.done():
                waiter.set_result(None)
        self._ahead.clear()

    async def _take_slot(self) -> None:
        if not self._has_slot:
            await self._shared.slots.acquire(self._state.order)
            self._has_slot = True

    def _release_slot(self) -> None:
        if self._has_slot:
            self._has_slot = False
            self._shared.slots.release()

    def _pop_first_kept(self) -> Message:
        message = self._kept.pop(self._kept_starts.pop(0))
        self._shared.kept -= message.held
        if self._shared.memory_waiters:
            self._shared.memory_changed()
        return message

    def _kept_piece(self, offset: int) -> Piece | None:
        """The kept bytes at ``offset`` (their message, when it starts there), or None when they are not kept."""
        starts = self._kept_starts
        while starts and starts[0] + self._kept[starts[0]].n <= offset:  # containerd had them already
            self._pop_first_kept().framed.release()
        if not starts or starts[0] > offset:
            return None
        message = self._pop_first_kept()
        if message.offset == offset:
            return message
        return [message.data()[offset - message.offset :]]  # containerd's ingest ended inside them (a resume)

    async def _chunks(self, offset: int) -> AsyncIterator[Piece]:
        if self._feed is not None and self._feed.offset != offset:
            self._feed = None  # containerd holds bytes the feed never saw: the unpacker sees it short
        while True:
            self._took(offset)
            if offset >= self.desc.size:
                return
            data = self._kept_piece(offset)
            if data is None:  # received bytes that are not kept are staged
                received = self.done.prefix_end()
                staged_end = min(self._kept_starts[0], received) if self._kept_starts else received
                if offset >= staged_end:
                    self._release_slot()  # nothing to send until more bytes arrive
                    if self._shared.memory_waiters:
                        self._shared.memory_changed()  # containerd may not be the limit any more
                    self._wake.clear()
                    await self._wake.wait()
                    await self._take_slot()
                    continue
                n = min(WRITE_MESSAGE, staged_end - offset)
                framed, slots = staged_message(self._ref, offset, n)
                await self._staged.run(self._staged.read_into, offset, slots)  # straight into the message's frames
                data = Message(offset, n, framed, n)
            if self._feed is not None:
                for view in (data.data(),) if isinstance(data, Message) else data:
                    await self._feed.put(memoryview(view))
            yield data
            offset += piece_length(data)
