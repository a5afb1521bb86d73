"""The parallel blob fetcher.

One :class:`BlobFetcher` per process serves every pull: the same digest wanted twice at once is fetched once,
and every chunk request of every blob takes a slot of one :class:`ConnectionBudget`.

A blob is fetched like this:
1. The store's writer for it is opened (:meth:`~puller.stores.Store.writer`; this may wait for another writer of
   the same blob) and asked what it holds already (a resumed pull fetches only the rest).
2. Ranges are read through a :class:`~puller.registry.blobs.BlobReader` (the HTTP half: the redirect resolved
   once and reused, expiry, Content-Range checks, mirror failover). The first request (the probe) asks for at
   most PROBE_BYTES: it goes through the general client, and the contiguous prefix, with it the hash, waits for
   it. If the server answers the Range with 200, the blob is streamed whole over that one connection.
3. Other chunks go out in parallel; when none are left, the slowest streaming range is split (tail split). A
   range that has stalled while the others stream is taken over by the next free connection (see
   :func:`~puller.engine.plan.take_stalled`).
4. Received bytes are handed to the writer at their offsets, about WRITE_BLOCK at a time.
5. The writer commits: it checks size and digest, and makes the blob visible only if both are right. A digest
   mismatch leaves nothing behind and the blob is fetched once more before the pull fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DigestMismatch, NotFound, RegistryError, SizeMismatch, TransportError, VerificationError
from ..priority import PrioritySemaphore
from ..ranges import RangeSet
from ..reference import Reference
from ..registry.blobs import BlobReader, RangeBody
from ..registry.client import DEFAULT_ATTEMPTS, MIRROR_ATTEMPTS, NET_ERRORS, RegistryClient, retried
from ..registry.lean import Cut, Lent, NotPartial
from ..registry.manifest import Descriptor
from ..stores import BlobWriter, Buffer, Store
from .budget import BandwidthCap, Connection, ConnectionBudget
from .plan import MIB, Chunk, aligned_share, plan_chunks, split_for_tail, streaming_chunks, take_stalled

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 8 * MIB
DEFAULT_MIN_SPLIT = 1 * MIB
MIN_CHUNK = 1 * MIB  # smallest chunk the planner makes on its own (a request costs a round trip)
CHUNKS_PER_CONNECTION = 4
STALL_PATIENCE = 4 * MIB  # a range is stalled when the others received this much each while it had none
STALL_SILENCE_S = 0.5  # ... and it has been silent this long (TCP's least retransmission timeout is 0.2 s)
# A stalled range's rest goes out in pieces this big, over as many connections: a flow opened (or reused) into a
# full link may starve again, and the hash waits on every byte of a stalled range at the front.
TAKEOVER_PIECE = 256 * 1024
ROOM_WAIT_S = 5.0  # longest a range waits for the store to have room for it before it is requested regardless
PROBE_BYTES = 64 * 1024  # the first range of a blob, which resolves its URL and learns whether ranges work
WRITE_BLOCK = 512 * 1024  # bytes gathered per positional write; bounds memory per connection
MAX_OPEN_BLOBS = 64  # blobs with open files at once (at least twice the connections)
VERIFY_ATTEMPTS = 2  # a blob whose digest does not match is fetched once more, then the pull fails
# A mirror (a P2P peer such as Spegel, in the cluster) from which a blob has received nothing for this long while
# a request to it is open, and no range waits on the store, is stuck: its ranges go to the next host at once.
MIRROR_STALL_S = 3.0
MIRROR_NOT_FOUND_RETRIES = 4  # a mirror that should hold a blob (see _fetch_chunk) and says not is asked again ...
MIRROR_NOT_FOUND_PAUSE_S = 0.2  # ... after this long, doubled each time (3 s in all)


class TruncatedBody(TransportError):
    """The connection ended before the requested range was complete."""


@dataclass(frozen=True, slots=True)
class FetchSettings:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    min_split: int = DEFAULT_MIN_SPLIT
    attempts: int = DEFAULT_ATTEMPTS  # tries per chunk request

    def __post_init__(self) -> None:
        if self.chunk_size < 64 * 1024:
            raise ValueError("chunk size must be at least 64 KiB")
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")


@dataclass(slots=True)
class BlobProgress:
    """Live counters of one blob, read by progress displays and metrics."""

    digest: str
    size: int
    done: int = 0  # bytes on disk (including those resumed from an earlier run)
    fetched: int = 0  # bytes received over the network by this run
    resumed: int = 0
    state: str = "waiting"  # waiting | present | fetching | verifying | done | failed
    retries: int = 0
    by_host: dict[str, int] = field(default_factory=dict)  # bytes received, per registry host (mirror or upstream)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None


@dataclass(slots=True)
class _Shared:
    future: asyncio.Future
    waiters: int = 0


async def gather_or_cancel(coros) -> None:
    """Run all; on the first failure cancel the rest, wait for them to wind down (so they record their progress),
    and re-raise."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _retrieve(f: asyncio.Future) -> None:
    """Mark a shared fetch's exception as seen: every waiter gets it re-raised through the shield."""
    if not f.cancelled():
        f.exception()


class BlobFetcher:
    def __init__(
        self,
        client: RegistryClient,
        budget: ConnectionBudget,
        settings: FetchSettings | None = None,
        bandwidth: BandwidthCap | None = None,
    ):
        self.client = client
        self.budget = budget
        self.bandwidth = bandwidth
        self.settings = settings or FetchSettings()
        self._inflight: dict[tuple[int, str], _Shared] = {}
        # Blobs whose files are open at once: 1,000 layers must not take 2,000 descriptors (lock + data each).
        self._open_blobs = PrioritySemaphore(max(MAX_OPEN_BLOBS, 2 * budget.total))

    async def fetch(
        self,
        ref: Reference,
        desc: Descriptor,
        store: Store,
        progress: BlobProgress,
        priority: int = 0,
        manifest_mirror: str | None = None,
    ) -> None:
        """Make ``desc`` present in ``store``; its chunks get connections before those of blobs with a higher
        ``priority``. ``manifest_mirror``: the mirror host that served the image's manifest; its peers hold the
        blobs, so a 404 from it is taken for a peer lookup that timed out (asked again) rather than for a blob it
        lacks. Concurrent calls for the same digest and store share one fetch, cancelled when the last of them is."""
        key = (id(store), str(desc.digest))
        shared = self._inflight.get(key)
        if shared is None:
            fetching = self._fetch_verified(ref, desc, store, progress, priority, manifest_mirror)
            shared = _Shared(asyncio.ensure_future(fetching))
            self._inflight[key] = shared
            shared.future.add_done_callback(functools.partial(self._fetch_done, key))
        else:
            progress.state = "fetching"
        shared.waiters += 1
        try:
            await asyncio.shield(shared.future)
        except asyncio.CancelledError:
            shared.waiters -= 1
            if shared.waiters == 0:
                shared.future.cancel()
                await asyncio.wait({shared.future})  # let it record its ranges before the caller moves on
            raise
        progress.state = "done"
        progress.done = desc.size

    def _fetch_done(self, key: tuple[int, str], future: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        _retrieve(future)

    async def _fetch_verified(
        self,
        ref: Reference,
        desc: Descriptor,
        store: Store,
        progress: BlobProgress,
        priority: int,
        manifest_mirror: str | None,
    ) -> None:
        mirrors = True
        for attempt in range(1, VERIFY_ATTEMPTS + 1):
            download = _BlobDownload(self, ref, desc, store, progress, priority, mirrors, manifest_mirror)
            try:
                async with self._open_blobs.hold(priority):
                    await download.run()
                return
            except DigestMismatch as e:  # the writer forgot the bytes: fetch them again
                if download.mirror_bytes:  # a mirror (a peer) may have lied: no mirror is trusted for this blob
                    mirrors = False
                log.warning("%s: %s (attempt %d of %d)", ref, e, attempt, VERIFY_ATTEMPTS)
                if attempt == VERIFY_ATTEMPTS:
                    progress.state = "failed"
                    raise
            except BaseException:
                progress.state = "failed"
                raise


class MirrorStalled(RegistryError):
    """A mirror stopped sending (see MIRROR_STALL_S): not retried there; the next host takes over."""


def chunk_size_for(missing: int, fetcher: BlobFetcher) -> int:
    """About CHUNKS_PER_CONNECTION chunks per connection of the budget, within [MIN_CHUNK, chunk_size].

    Enough chunks that one blob can use the whole budget; small enough that the chunks in flight (connections x
    chunk size) are a fraction of the blob, so the contiguous prefix, and with it the hash, follows the download
    closely instead of completing only when the last chunk lands."""
    per_chunk = aligned_share(missing, fetcher.budget.total * CHUNKS_PER_CONNECTION)
    return max(min(MIN_CHUNK, fetcher.settings.chunk_size), min(fetcher.settings.chunk_size, per_chunk))


class _BlobDownload:
    """One blob's download into its store's writer. Not reused."""

    def __init__(
        self,
        fetcher: BlobFetcher,
        ref: Reference,
        desc: Descriptor,
        store: Store,
        progress: BlobProgress,
        priority: int,
        mirrors: bool = True,
        manifest_mirror: str | None = None,
    ):
        self.f = fetcher
        self.manifest_mirror = manifest_mirror  # see BlobFetcher.fetch
        self.ref = ref
        self.desc = desc
        self.priority = priority
        self.store = store
        self.progress = progress
        self.reader = BlobReader(fetcher.client, ref, desc, mirrors)  # the HTTP half: hosts, redirects, ranges
        self.mirror_bytes = 0  # bytes received from mirrors, not the registry itself
        self.heard_at = 0.0  # when the blob last received bytes (time.monotonic)
        self.done = RangeSet()  # bytes the writer holds
        self.pending: list[Chunk] = []
        self.inflight: set[Chunk] = set()
        self.requests: dict[Chunk, asyncio.Future] = {}  # the request of each streaming chunk (see _request)
        self.watching = False  # a worker watches the streaming ranges for a stall (see _watch_stalls)
        self.chunk_ended = asyncio.Event()  # set when a chunk leaves inflight: wakes the watcher
        self.range_ok: bool | None = None
        self.range_known = asyncio.Event()

    async def run(self) -> None:
        self.progress.state = "waiting"
        async with self.store.writer(self.desc) as writer:
            status = await writer.status()
            if status.present:  # committed meanwhile (by another process)
                self.progress.state = "present"
                return
            try:
                self._plan(status.done)
                await self._download(writer)
                self.progress.state = "verifying"
                await writer.commit()
            except VerificationError:
                await writer.abort()  # bytes that do not add up are never resumed
                raise
        self.progress.state = "done"
        self.progress.finished = time.monotonic()

    def _plan(self, done: RangeSet) -> None:
        size = self.desc.size
        self.done = done.copy()
        self.progress.resumed = self.progress.done = self.done.total()
        missing = list(self.done.missing(size))
        chunk_size = chunk_size_for(sum(e - s for s, e in missing), self.f)
        # Toward the end, about one chunk per connection of what is left: the hash then finds little to read
        # back after the last byte (a 1 GiB blob's last chunks in flight spanned 130-160 MB, 100 ms of hashing).
        least = min(MIN_CHUNK, chunk_size)
        self.pending = plan_chunks(missing, chunk_size, spread=self.f.budget.total, least=least)

    # ---- downloading ---------------------------------------------------------------------------------------

    async def _download(self, writer: BlobWriter) -> None:
        if not self.pending:
            return
        self.progress.state = "fetching"
        probe = self.pending.pop(0)
        if probe.end - probe.start > PROBE_BYTES:  # the rest of its chunk goes out like any other
            self.pending.insert(0, Chunk(probe.start + PROBE_BYTES, probe.end))
            probe.end = probe.start + PROBE_BYTES
        n_workers = min(self.f.budget.total, max(1, len(self.pending) + 1))
        workers = [self._worker(writer, probe), *(self._worker(writer, None) for _ in range(n_workers - 1))]
        await gather_or_cancel(workers)
        if self.done.prefix_end() != self.desc.size:
            raise SizeMismatch(self.desc.size, self.done.prefix_end(), what=f"blob {self.desc.digest}")

    async def _worker(self, writer: BlobWriter, first: Chunk | None) -> None:
        if first is None:
            await self.range_known.wait()
            if not self.range_ok:
                return
        conn = self.f.budget.connection(self.priority)
        try:
            chunk = first or self._next_chunk()
            while chunk is not None:
                chunk = await self._admit(writer, chunk, conn)
                self.inflight.add(chunk)
                try:
                    await self._fetch_chunk(writer, chunk, conn)
                finally:
                    self.inflight.discard(chunk)
                    self.chunk_ended.set()
                    if not self.range_known.is_set():
                        self.range_known.set()  # a failed probe: let the others try (and fail) on their own
                conn.yield_if_outranked()
                chunk = self._next_chunk() if self.range_ok else None
                if chunk is None and self.range_ok:
                    chunk = await self._watch_stalls(conn)
        finally:
            conn.release()

    async def _admit(self, writer: BlobWriter, chunk: Chunk, conn: Connection) -> Chunk:
        """``chunk``, once the writer has room for its bytes (bounded by ROOM_WAIT_S): where the store is the
        limit, bytes requested further ahead would only be spilled to disk and read back. The room is asked for
        with a connection in hand (the range is requested at once: room promised to ranges queued for a
        connection would be held from the others), given up to a more urgent blob while it waits. While it waits
        it watches for stalls: a stalled range is taken over instead (``chunk`` goes back to the queue)."""
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:
            await conn.acquire(self.ref.api_host)
            if await writer.room_for(chunk.pos, chunk.remaining, min(STALL_SILENCE_S / 2, ROOM_WAIT_S)):
                return chunk
            if (rest := self._take_stalled(held=True)) is not None:
                self.pending.insert(0, chunk)
                self.pending.sort(key=lambda c: c.pos)
                return rest
            if time.monotonic() >= deadline:
                return chunk
            conn.yield_if_outranked()

    def _next_chunk(self) -> Chunk | None:
        if (rest := self._take_stalled()) is not None:
            return rest
        if self.pending:
            return self.pending.pop(0)
        return split_for_tail(self.inflight, self.f.settings.min_split)

    def _take_stalled(self, held: bool = False) -> Chunk | None:
        """The rest of a stalled range, taken over (see :func:`~.plan.take_stalled`); ``held``: asked
        by a worker the store holds back, when silence alone tells (the others may be held too)."""
        if held:
            taken = take_stalled(self.inflight, self.progress.fetched, None, 2 * STALL_SILENCE_S)
        else:
            taken = take_stalled(self.inflight, self.progress.fetched, STALL_PATIENCE, STALL_SILENCE_S)
        if taken is None:
            return None
        stalled, rest = taken
        log.debug("%s: taking over the stalled range at %d", self.desc.digest, rest.start)
        if stalled.remaining == 0 and (request := self.requests.get(stalled)) is not None:
            request.cancel()  # its connection is closed; its worker goes on with the next chunk
        # else its request, cut where it has received to, hands those bytes over and ends
        first, *others = plan_chunks([(rest.start, rest.end)], TAKEOVER_PIECE)
        if others:  # the next workers to come free take them, before anything further on
            self.pending = sorted([*others, *self.pending], key=lambda c: c.pos)
        return first

    async def _watch_stalls(self, conn: Connection) -> Chunk | None:
        """Nothing is left to hand out: one worker of the blob stays, without its slot, while others stream, and
        takes over a range that stalls (no other worker may come free to notice)."""
        if self.watching:
            return None
        self.watching = True
        conn.release()
        try:
            while self.range_ok and streaming_chunks(self.inflight):
                self.chunk_ended.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STALL_SILENCE_S / 2):
                        await self.chunk_ended.wait()
                if (rest := self._take_stalled()) is not None:
                    return rest
            return None
        finally:
            self.watching = False

    async def _fetch_chunk(self, writer: BlobWriter, chunk: Chunk, conn: Connection) -> None:
        """Fetch ``chunk`` from the current host; when a mirror fails (after MIRROR_ATTEMPTS) or lacks the blob,
        the chunk, and every range after it, continue from the next host. The bytes already written stay:
        the blob is verified as one, whoever served its parts. A mirror that says it lacks the blob after it
        served part of it, or the image's manifest (a P2P mirror whose peer lookup timed out), is asked again, up to
        MIRROR_NOT_FOUND_RETRIES times, before the rest of the blob leaves it."""
        not_found = 0
        while True:
            index, last = self.reader.index, self.reader.on_last_host
            try:
                attempts = self.f.settings.attempts if last else MIRROR_ATTEMPTS
                await self._fetch_chunk_from(writer, chunk, conn, attempts)
                return
            except (RegistryError, TransportError) as e:
                if last:
                    raise
                held = self.mirror_bytes or self.reader.endpoints[index].host == self.manifest_mirror
                if isinstance(e, NotFound) and held and not_found < MIRROR_NOT_FOUND_RETRIES:
                    not_found += 1
                    self.progress.retries += 1
                    await asyncio.sleep(MIRROR_NOT_FOUND_PAUSE_S * 2 ** (not_found - 1))
                    continue
                self.reader.fail_over(index, e)

    async def _fetch_chunk_from(self, writer: BlobWriter, chunk: Chunk, conn: Connection, attempts: int) -> None:
        tries = 0

        async def attempt() -> None:
            nonlocal tries
            tries += 1
            if tries > 1:
                self.progress.retries += 1
            await conn.acquire(self.ref.api_host)
            try:
                request = self._request(writer, chunk)  # to the current host: a retry may follow a fail-over
                await (request if self.reader.on_last_host else self._unless_mirror_stalls(request))
            except BaseException:
                conn.release()  # not held while a retry waits
                raise

        await retried(attempts, attempt)

    async def _unless_mirror_stalls(self, request: Coroutine[Any, Any, None]) -> None:
        """Run ``request`` (to a mirror); give it up with :class:`MirrorStalled` when the blob has received nothing
        for MIRROR_STALL_S since it started, and no range is waiting on the store: a stuck or frozen peer, which
        accepts connections and never answers, would otherwise hold the range for the read timeout."""
        task = asyncio.ensure_future(request)
        started = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=MIRROR_STALL_S / 4)
                if done:
                    return task.result()
                quiet = time.monotonic() - max(started, self.heard_at)
                if quiet >= MIRROR_STALL_S and not any(c.writing for c in self.inflight):
                    raise MirrorStalled(f"{self.reader.host}: nothing received for {quiet:.1f} s")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _request(self, writer: BlobWriter, chunk: Chunk) -> None:
        """:meth:`_stream` as a task of its own, which a takeover of the chunk cancels (:meth:`_next_chunk`)."""
        request = asyncio.ensure_future(self._stream(writer, chunk))
        self.requests[chunk] = request
        try:
            await request
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if chunk.remaining or (current is not None and current.cancelling()):
                raise  # not (only) a takeover
        finally:
            self.requests.pop(chunk, None)

    async def _stream(self, writer: BlobWriter, chunk: Chunk) -> None:
        if chunk.pos >= chunk.end:
            return
        if self.range_ok and self.reader.lean_ready:
            chunk.streaming = True
            chunk.heard(self.progress.fetched)
            cut = Cut()
            chunk.request_cut, chunk.request_received = cut.at, cut.received_to
            try:
                deliver = functools.partial(self._deliver, writer, chunk, self.reader.host)
                await self.reader.read_lean(chunk.pos, chunk.end, deliver, cut)
                return
            except NotPartial:
                pass  # asked again through the client's pool, which maps the status (an expired URL, an error)
            finally:
                chunk.streaming, chunk.request_cut, chunk.request_received = False, None, None
        async with self.reader.open(chunk.pos, chunk.end) as body:
            skip = 0
            self._set_range_support(not body.whole)
            if body.whole:  # Range ignored: the body is the whole blob; stream what is missing over this one
                size = self.desc.size
                chunk.pos = skip = next(iter(self.done.missing(size)), (size, size))[0]
                chunk.end = size
            chunk.streaming = True
            chunk.heard(self.progress.fetched)
            try:
                await self._copy_body(writer, chunk, body, skip)
            finally:
                chunk.streaming = False

    def _set_range_support(self, ok: bool) -> None:
        if self.range_ok is None or not ok:
            self.range_ok = ok
        if not ok:
            self.pending.clear()
            for other in self.inflight:
                other.cut(other.pos)  # stop the others; the whole-body stream covers their bytes
        self.range_known.set()

    async def _copy_body(self, writer: BlobWriter, chunk: Chunk, body: RangeBody, skip: int) -> None:
        buffers: list[bytes] = []
        buffered = 0
        try:
            while chunk.pos + buffered < chunk.end:
                data = await body.read()
                if not data:
                    break
                if skip:
                    cut = min(skip, len(data))
                    skip -= cut
                    data = data[cut:]
                    if not data:
                        continue
                room = chunk.end - chunk.pos - buffered
                if len(data) > room:
                    data = data[:room]
                buffers.append(data)
                buffered += len(data)
                await self._received(body.host, len(data))
                if buffered >= WRITE_BLOCK:
                    await self._write(writer, chunk, buffers, buffered)
                    buffers, buffered = [], 0
        except NET_ERRORS as e:
            raise TruncatedBody(f"{self.desc.digest}: connection failed mid-body at {chunk.pos}: {e}") from None
        finally:
            if buffers:
                await self._write(writer, chunk, buffers, buffered)
        if chunk.pos < chunk.end:
            raise TruncatedBody(f"{self.desc.digest}: body ended at byte {chunk.pos}, wanted up to {chunk.end}")

    async def _deliver(
        self, writer: BlobWriter, chunk: Chunk, host: str, offset: int, block: memoryview, lent: Lent
    ) -> bool:
        """A block of the lean client's body at ``chunk.pos`` (its buffer is ours until we return, or the writer's
        if it takes it); False once the chunk (which a tail split or a takeover may have cut short) needs no more."""
        n = min(len(block), chunk.end - offset)
        if n <= 0:
            return False
        await self._received(host, n)
        await self._write(writer, chunk, [block[:n]], n, lent)
        return chunk.pos < chunk.end

    async def _received(self, host: str, n: int) -> None:
        """Count ``n`` bytes received from ``host``, and wait for the bandwidth cap."""
        self.progress.fetched += n
        self.heard_at = time.monotonic()
        self.progress.by_host[host] = self.progress.by_host.get(host, 0) + n
        if host != self.reader.upstream_host:
            self.mirror_bytes += n
        if self.f.bandwidth is not None:
            await self.f.bandwidth.take(n)

    async def _write(
        self, writer: BlobWriter, chunk: Chunk, buffers: Sequence[Buffer], n: int, lent: Lent | None = None
    ) -> None:
        room = chunk.end - chunk.pos  # less than n when the chunk was taken over or split meanwhile
        if room <= 0:
            return
        if n > room:
            buffers, n = _clip(buffers, room), room
        start, chunk.writing = chunk.pos, True  # bytes arrived: not stalled
        chunk.heard(self.progress.fetched)
        try:
            await writer.write_at(start, buffers, lent)
        finally:
            chunk.writing = False
        chunk.pos = start + n
        self.done.add(start, start + n)
        self.progress.done += n


def _clip(buffers: Sequence[Buffer], n: int) -> list[Buffer]:
    """The first ``n`` bytes of ``buffers``."""
    out: list[Buffer] = []
    for b in buffers:
        if n <= 0:
            break
        view = memoryview(b)[:n]
        out.append(view)
        n -= len(view)
    return out
