"""The parallel blob fetcher.

One :class:`BlobFetcher` per process serves every pull: the same digest wanted twice at once is fetched once,
and every chunk request of every blob takes a slot of one :class:`ConnectionBudget`.

A blob is fetched like this:
1. ``staging/<alg>-<hex>.partial`` is opened (created sparse, the blob's size) under an exclusive
   lock file, so two processes never write the same blob; ``<alg>-<hex>.ranges`` records which byte ranges are
   already on disk, so a killed pull resumes where it stopped.
2. Ranges are read through a :class:`~puller.registry.blobs.BlobReader` (the HTTP half: the redirect resolved
   once and reused, expiry, Content-Range checks, mirror failover). If the server answers the Range with 200,
   the blob is streamed whole over that one connection.
3. Other chunks go out in parallel; when none are left, the slowest streaming range is split (tail split).
4. Each received block is written with ``os.pwritev`` at its offset; the contiguous prefix is hashed as it
   grows (:class:`PrefixHasher`). At the end size and digest are checked; a mismatch deletes the staged data
   and the blob is fetched once more before the pull fails.
5. The verified file is handed to the store's ``commit_blob``; nothing unverified is ever in the store.

A store with a :class:`BlobSink` (containerd) changes steps 4-5: every received block is offered to the sink,
which keeps it in memory for its turn (no write, no hash, no read-back); only the blocks it refuses are staged,
and it reads them from there in turn. The store checks size and digest at its commit; ``.ranges`` records only
staged bytes, and a restarted pull resumes from what the store already holds (:meth:`BlobSink.start`) plus those.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from ..errors import DigestMismatch, RegistryError, SizeMismatch, StoreError, TransportError
from ..priority import PrioritySemaphore
from ..reference import Reference
from ..registry.blobs import BlobReader, RangeBody
from ..registry.client import DEFAULT_ATTEMPTS, MIRROR_ATTEMPTS, NET_ERRORS, RegistryClient, retrying
from ..registry.manifest import Descriptor
from ..stores import BlobSink, Store, store_error
from .budget import BandwidthCap, Connection, ConnectionBudget
from .plan import MIB, SPLIT_ALIGN, Chunk, RangeSet, plan_chunks, split_for_tail
from .verify import PrefixHasher

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 8 * MIB
DEFAULT_MIN_SPLIT = 1 * MIB
MIN_CHUNK = 1 * MIB  # smallest chunk the planner makes on its own (a request costs a round trip)
CHUNKS_PER_CONNECTION = 4
WRITE_BLOCK = 512 * 1024  # bytes gathered per positional write; bounds memory per connection
LOCK_POLL_S = 0.2  # while another process fetches the same blob
MAX_RANGES_RECORD = 16 << 20  # a .ranges file larger than this was not written by puller
MAX_OPEN_BLOBS = 64  # blobs with open files at once (at least twice the connections)
VERIFY_ATTEMPTS = 2  # a blob whose digest does not match is fetched once more, then the pull fails


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
        self, ref: Reference, desc: Descriptor, store: Store, progress: BlobProgress, priority: int = 0
    ) -> None:
        """Make ``desc`` present in ``store``; its chunks get connections before those of blobs with a higher
        ``priority``. Concurrent calls for the same digest and store share one fetch, which is cancelled when the
        last of them is."""
        key = (id(store), str(desc.digest))
        shared = self._inflight.get(key)
        if shared is None:
            shared = _Shared(asyncio.ensure_future(self._fetch_verified(ref, desc, store, progress, priority)))
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
        self, ref: Reference, desc: Descriptor, store: Store, progress: BlobProgress, priority: int
    ) -> None:
        for attempt in range(1, VERIFY_ATTEMPTS + 1):
            try:
                async with self._open_blobs.hold(priority):
                    await _BlobDownload(self, ref, desc, store, progress, priority).run()
                return
            except DigestMismatch as e:
                log.warning("%s: %s (attempt %d of %d)", ref, e, attempt, VERIFY_ATTEMPTS)
                if attempt == VERIFY_ATTEMPTS:
                    progress.state = "failed"
                    raise
            except BaseException:
                progress.state = "failed"
                raise


def chunk_size_for(missing: int, fetcher: BlobFetcher) -> int:
    """About CHUNKS_PER_CONNECTION chunks per connection of the budget, within [MIN_CHUNK, chunk_size].

    Enough chunks that one blob can use the whole budget; small enough that the chunks in flight (connections x
    chunk size) are a fraction of the blob, so the contiguous prefix, and with it the hash, follows the download
    closely instead of completing only when the last chunk lands."""
    per_chunk = -(-missing // (fetcher.budget.total * CHUNKS_PER_CONNECTION))
    per_chunk += -per_chunk % SPLIT_ALIGN
    return max(min(MIN_CHUNK, fetcher.settings.chunk_size), min(fetcher.settings.chunk_size, per_chunk))


class _BlobDownload:
    """One blob's download into its staged file. Not reused."""

    def __init__(
        self,
        fetcher: BlobFetcher,
        ref: Reference,
        desc: Descriptor,
        store: Store,
        progress: BlobProgress,
        priority: int,
    ):
        self.f = fetcher
        self.ref = ref
        self.desc = desc
        self.priority = priority
        self.store = store
        self.progress = progress
        stem = f"{desc.digest.algorithm}-{desc.digest.hex}"
        self.staging = store.staging  # a checked directory: no entry in it is opened through a link
        self.data_name = f"{stem}.partial"
        self.ranges_name = f"{stem}.ranges"
        self.lock_name = f"{stem}.lock"
        self.reader = BlobReader(fetcher.client, ref, desc)  # the HTTP half: hosts, redirects, range checks
        self.done = RangeSet()  # bytes received: staged, or (with a sink) taken by it
        self.staged = RangeSet()  # bytes written to the staged file; what .ranges records
        self.staged_saved = True  # .ranges records every staged byte
        self.pending: list[Chunk] = []
        self.inflight: set[Chunk] = set()
        self.range_ok: bool | None = None
        self.range_known = asyncio.Event()
        self.fd = -1
        self.create_lock = threading.Lock()
        self.hasher: PrefixHasher | None = None
        self.sink: BlobSink | None = None

    async def run(self) -> None:
        lock_fd, waited = await self._lock()
        try:
            if waited and await self.store.has_blob(self.desc):  # the other process committed it meanwhile
                self.progress.state = "present"
                return
            self.sink = self.store.blob_sink(self.desc, self.data_name)
            try:
                held = await self.sink.start() if self.sink else 0
                await asyncio.to_thread(self._open, held)
                if self.sink is None:
                    self.hasher = PrefixHasher(self.fd, self.desc.digest)
                try:
                    await self._download()
                    await self._verify()
                finally:
                    if self.hasher:
                        await self.hasher.close()
                    if self.fd >= 0:
                        os.close(self.fd)
                await self.store.commit_blob(self.desc, self.data_name)
            except DigestMismatch:
                # Never keep bad bytes: the next attempt starts from nothing.
                self.staging.unlink(self.data_name)
                self.staging.unlink(self.ranges_name)
                if self.sink:
                    await self.sink.abort()
                raise
            except BaseException:
                if self.sink:
                    await self.sink.close()
                raise
            self.progress.state = "done"
            self.progress.finished = time.monotonic()
            self.staging.unlink(self.ranges_name)
        finally:
            self.staging.unlink(self.lock_name)
            os.close(lock_fd)

    async def _lock(self) -> tuple[int, bool]:
        """An exclusive flock on the blob's lock file (the inode check guards against a file already unlinked),
        and whether another process held it first."""
        waited = False
        while True:
            try:
                fd = self.staging.open_file(self.lock_name, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                raise store_error(e, f"locking {self.desc.digest} in {self.staging.path}") from None
            try:
                while True:  # polled, not a blocking flock in a thread: cancelling the wait leaves nothing behind
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        waited = True
                        self.progress.state = "waiting"
                        await asyncio.sleep(LOCK_POLL_S)
                now = self.staging.stat(self.lock_name)
                same = now is not None and os.fstat(fd).st_ino == now.st_ino
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd, waited
            os.close(fd)

    def _open(self, held: int) -> None:
        """Open (or create and preallocate) the staged file; ``held``: bytes the sink's store already has.
        With a sink the file is made only when the sink first refuses a block (:meth:`_stage`)."""
        size = self.desc.size
        try:
            self.staged = self._load_ranges()
            if self.sink and not self.staged:
                self.staging.unlink(self.data_name)
            else:
                self._create()
        except OSError as e:
            if self.fd >= 0:
                os.close(self.fd)
            self.staging.unlink(self.data_name)
            raise store_error(e, f"preparing {self.desc.size} bytes for {self.desc.digest}") from None
        self.done = RangeSet((s, e) for s, e in self.staged.as_list())
        self.done.add(0, held)
        if self.sink:
            self.sink.advance(self.done.prefix_end())
        self.progress.resumed = self.progress.done = self.done.total()
        missing = list(self.done.missing(size))
        self.pending = plan_chunks(missing, chunk_size_for(sum(e - s for s, e in missing), self.f))

    def _create(self) -> None:
        """Open the staged file; unless it holds the recorded ranges, start it over: sparse, the blob's size.
        Not preallocated: a failed pull then holds only the bytes it received (the store's ``reserve`` checks the
        space up front instead)."""
        size = self.desc.size
        self.fd = self.staging.open_file(self.data_name, os.O_RDWR | os.O_CREAT)
        if os.fstat(self.fd).st_size != size or not self.staged:
            os.ftruncate(self.fd, 0)
            self.staged = RangeSet()
            os.ftruncate(self.fd, size)

    def _load_ranges(self) -> RangeSet:
        try:
            record = json.loads(self.staging.read_bytes(self.ranges_name, MAX_RANGES_RECORD))
            if record.get("size") != self.desc.size:
                return RangeSet()
            return RangeSet(
                (int(s), int(e)) for s, e in record.get("done", []) if 0 <= int(s) < int(e) <= self.desc.size
            )
        except (OSError, ValueError, TypeError, AttributeError, StoreError):
            return RangeSet()

    def _save_ranges(self) -> None:
        """Record the staged ranges (temp + rename). Not fsynced: a crash of the machine may lose the record,
        never correctness, since the whole blob is verified before commit (by the engine, or by the sink's store)."""
        if self.staged_saved:
            return
        self.staged_saved = True
        record = json.dumps({"size": self.desc.size, "done": self.staged.as_list()}).encode()
        try:
            self.staging.write_atomic(self.ranges_name, record, mode=0o600, durable=False)
        except OSError as e:
            log.debug("could not record progress of %s: %s", self.desc.digest, e)

    # ---- downloading ---------------------------------------------------------------------------------------

    async def _download(self) -> None:
        if not self.pending:
            return
        self.progress.state = "fetching"
        probe = self.pending.pop(0)
        n_workers = min(self.f.budget.total, max(1, len(self.pending) + 1))
        workers = [self._worker(probe), *(self._worker(None) for _ in range(n_workers - 1))]
        try:
            await gather_or_cancel(workers)
        finally:
            self._save_ranges()

    async def _worker(self, first: Chunk | None) -> None:
        if first is None:
            await self.range_known.wait()
            if not self.range_ok:
                return
        conn = self.f.budget.connection(self.priority)
        try:
            chunk = first or self._next_chunk()
            while chunk is not None:
                if self.sink and not self.sink.admit(chunk.pos, chunk.end):
                    conn.release()  # not held while the store catches up
                    await self.sink.wait_admit(chunk.pos, chunk.end)
                self.inflight.add(chunk)
                try:
                    await self._fetch_chunk(chunk, conn)
                finally:
                    self.inflight.discard(chunk)
                    if not self.range_known.is_set():
                        self.range_known.set()  # a failed probe: let the others try (and fail) on their own
                self._save_ranges()
                conn.yield_if_outranked()
                chunk = self._next_chunk() if self.range_ok else None
        finally:
            conn.release()

    def _next_chunk(self) -> Chunk | None:
        if self.pending:
            return self.pending.pop(0)
        return split_for_tail(self.inflight, self.f.settings.min_split)

    async def _fetch_chunk(self, chunk: Chunk, conn: Connection) -> None:
        """Fetch ``chunk`` from the current host; when a mirror fails (after MIRROR_ATTEMPTS) or lacks the blob,
        the chunk, and every range after it, continue from the next host. The bytes already written stay:
        the blob is verified as one, whoever served its parts."""
        while True:
            index, last = self.reader.index, self.reader.on_last_host
            try:
                await self._fetch_chunk_from(chunk, conn, self.f.settings.attempts if last else MIRROR_ATTEMPTS)
                return
            except (RegistryError, TransportError) as e:
                if last:
                    raise
                self.reader.fail_over(index, e)

    async def _fetch_chunk_from(self, chunk: Chunk, conn: Connection, attempts: int) -> None:
        async for attempt in retrying(attempts):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.progress.retries += 1
                await conn.acquire(self.ref.api_host)
                try:
                    await self._stream(chunk)
                except BaseException:
                    conn.release()  # not held while a retry waits
                    raise

    async def _stream(self, chunk: Chunk) -> None:
        if chunk.pos >= chunk.end:
            return
        async with self.reader.open(chunk.pos, chunk.end) as body:
            skip = 0
            self._set_range_support(not body.whole)
            if body.whole:  # Range ignored: the body is the whole blob; stream what is missing over this one
                size = self.desc.size
                chunk.pos = skip = next(iter(self.done.missing(size)), (size, size))[0]
                chunk.end = size
            chunk.streaming = True
            try:
                await self._copy_body(chunk, body, skip)
            finally:
                chunk.streaming = False

    def _set_range_support(self, ok: bool) -> None:
        if self.range_ok is None or not ok:
            self.range_ok = ok
        if not ok:
            self.pending.clear()
            for other in self.inflight:
                other.end = other.pos  # stop the others; the whole-body stream covers their bytes
        self.range_known.set()

    async def _copy_body(self, chunk: Chunk, body: RangeBody, skip: int) -> None:
        loop = asyncio.get_running_loop()
        host = body.host
        buffers: list[bytes] = []
        buffered = 0
        received = 0
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
                received += len(data)
                self.progress.fetched += len(data)
                if self.f.bandwidth is not None:
                    await self.f.bandwidth.take(len(data))
                if buffered >= WRITE_BLOCK:
                    await self._write(loop, chunk, buffers, buffered)
                    buffers, buffered = [], 0
        except NET_ERRORS as e:
            raise TruncatedBody(f"{self.desc.digest}: connection failed mid-body at {chunk.pos}: {e}") from None
        finally:
            self.progress.by_host[host] = self.progress.by_host.get(host, 0) + received
            if buffers:
                await self._write(loop, chunk, buffers, buffered)
        if chunk.pos < chunk.end:
            raise TruncatedBody(f"{self.desc.digest}: body ended at byte {chunk.pos}, wanted up to {chunk.end}")

    async def _write(self, loop: asyncio.AbstractEventLoop, chunk: Chunk, buffers: list[bytes], n: int) -> None:
        start = chunk.pos
        if self.sink is None or not self.sink.take(start, buffers, n):
            try:
                written = await loop.run_in_executor(None, self._stage, buffers, start)
            except OSError as e:
                raise store_error(e, f"writing {self.desc.digest}") from None
            if written != n:
                raise StoreError(f"short write of {self.desc.digest} at {start}")
            self.staged.add(start, start + n)
            self.staged_saved = False
        chunk.pos = start + n
        self.done.add(start, start + n)
        self.progress.done += n
        if self.sink:
            self.sink.advance(self.done.prefix_end())
        else:
            assert self.hasher is not None
            self.hasher.advance(self.done.prefix_end())

    def _stage(self, buffers: list[bytes], offset: int) -> int:
        """Write a block to the staged file (in a worker thread), making the file first if need be."""
        with self.create_lock:
            if self.fd < 0:
                self._create()
        return os.pwritev(self.fd, buffers, offset)

    # ---- verifying -----------------------------------------------------------------------------------------

    async def _verify(self) -> None:
        """Size, and the digest unless a sink's store checks it at commit."""
        self.progress.state = "verifying"
        size = self.desc.size
        if self.done.prefix_end() != size:
            raise SizeMismatch(size, self.done.prefix_end(), what=f"blob {self.desc.digest}")
        if self.hasher is None:
            return
        try:
            actual = await self.hasher.finish(size)
        except OSError as e:
            raise store_error(e, f"reading back {self.desc.digest}") from None
        if actual != self.desc.digest.hex:
            raise DigestMismatch(
                str(self.desc.digest), f"{self.desc.digest.algorithm}:{actual}", what=f"blob of {self.ref}"
            )
