"""A blob being written into a store's staging directory, and the writer of the stores that keep blobs as files.

A staged blob is three names in the store's checked staging directory (see :mod:`.safedir`):

- ``<alg>-<hex>.lock``: an exclusive flock, so two processes (or two pulls in one) never write one blob;
- ``<alg>-<hex>.partial``: the bytes at their offsets, sparse (no preallocation: a failed pull holds only what
  it received; the store's ``reserve`` checks the space up front);
- ``<alg>-<hex>.ranges``: which byte ranges the file holds, so a killed pull resumes there. Not fsynced: a
  crash of the machine may lose the record, never correctness, since the whole blob is verified before commit.

:class:`StagedFile` is that part, shared by every writer. :class:`FileWriter` is the :class:`~puller.stores.BlobWriter`
of the OCI layout and overlaybd stores: it hashes the blob's contiguous prefix as it grows, on the blob's lane of
a shared thread pool (:class:`PrefixHasher`: the bytes in hand when they extend the prefix, else read back from
the file), checks
size and digest at commit and hands the fsynced file to the store's ``publish`` (a rename into place). A writer
owns the caller's buffers only until ``write_at`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from ..digest import Digest
from ..errors import DigestMismatch, SizeMismatch, StoreError
from ..ranges import RangeSet
from ..registry.manifest import Descriptor
from . import Buffer, Handover, WriteStatus, staged_stem, store_error
from .safedir import SafeDir
from .threads import SerialLane, in_thread, lane_pool, settled

T = TypeVar("T")

log = logging.getLogger(__name__)

LOCK_POLL_S = 0.2  # while another process writes the same blob
MAX_RANGES_RECORD = 16 << 20  # a .ranges file larger than this was not written by puller
SAVE_EVERY_S = 0.5  # a .ranges record at most this old (and one at every stop): what a killed pull loses
READ_BLOCK = 1 << 20  # read-back of bytes that arrived before the prefix reached them (pread)
MAP_WINDOW = 2 << 20  # read-back through a mapping of the file: this much mapped at a time (bounds RSS)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python 3.11 lacks the name
WRITEBACK_STEP = 8 << 20  # hashed bytes are handed to writeback in steps of this
MIN_READ_BACK = 4 << 20  # the thread is not woken to read back less than this, except at the end


class StagedFile:
    """``<stem>.partial`` with its ``.ranges`` record, under ``<stem>.lock``. Use as ``async with``."""

    def __init__(self, staging: SafeDir, desc: Descriptor):
        self.staging = staging
        self.desc = desc
        base = staged_stem(desc)
        self.data_name, self.ranges_name, self.lock_name = f"{base}.partial", f"{base}.ranges", f"{base}.lock"
        self.ranges = RangeSet()  # bytes in the file; what .ranges records
        self.fd = -1
        self._lock_fd = -1
        self._unsaved = 0  # bytes written since the last record
        self._saved_at = time.monotonic()
        self._create_lock = threading.Lock()
        self._busy: set[asyncio.Future[Any]] = set()  # thread work on the file, not yet ended
        self._recording: asyncio.Future[None] | None = None  # the .ranges record being written

    async def __aenter__(self) -> StagedFile:
        await self._lock()
        try:
            await self.run(self._load)
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` on a worker thread, awaited to its end even under cancellation."""
        return await settled(self._start(fn, *args))

    def _start(self, fn: Callable[..., T], /, *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on a worker thread, waited for by :meth:`settle` (the file is closed only after every
        thread is done with it)."""
        future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
        self._busy.add(future)
        future.add_done_callback(self._busy.discard)
        return future

    async def settle(self) -> None:
        """Wait until no thread works on the file (whatever their outcome)."""
        while self._busy:
            await settled(asyncio.gather(*self._busy, return_exceptions=True))

    async def aclose(self) -> None:
        """:meth:`close` once no thread works on the file, on a thread (it renames and unlinks)."""
        await self.settle()
        await in_thread(self.close)

    async def _lock(self) -> None:
        """An exclusive flock on the lock file, polled: a wait that is cancelled leaves nothing behind."""
        while True:
            fd = await in_thread(self._try_lock, undo=_close_lock)
            if fd is not None:
                self._lock_fd = fd
                return
            await asyncio.sleep(LOCK_POLL_S)

    def _try_lock(self) -> int | None:
        """The lock file's descriptor, locked; None while another writer holds it (the inode check guards
        against a lock file unlinked by its holder meanwhile)."""
        while True:
            try:
                fd = self.staging.open_file(self.lock_name, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                raise store_error(e, f"locking {self.desc.digest} in {self.staging.path}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            now = self.staging.stat(self.lock_name)
            if now is not None and os.fstat(fd).st_ino == now.st_ino:
                return fd
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            self.staging.unlink(self.lock_name)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _load(self) -> None:
        """Take up the recorded ranges when the file is there and of the blob's size; else start over."""
        ranges = self._read_record()
        st = self.staging.stat(self.data_name)
        if ranges and st is not None and st.st_size == self.desc.size:
            try:
                self.fd = self.staging.open_file(self.data_name, os.O_RDWR)
            except (OSError, StoreError):
                ranges = RangeSet()
        if not ranges:
            self.remove()
        self.ranges = ranges

    def _read_record(self) -> RangeSet:
        try:
            record = json.loads(self.staging.read_bytes(self.ranges_name, MAX_RANGES_RECORD))
            if record.get("size") != self.desc.size:
                return RangeSet()
            size = self.desc.size
            return RangeSet((int(s), int(e)) for s, e in record.get("done", []) if 0 <= int(s) < int(e) <= size)
        except (OSError, ValueError, TypeError, AttributeError, StoreError):
            return RangeSet()

    def create(self) -> None:
        """Make the file (sparse, the blob's size) unless it is there."""
        with self._create_lock:
            if self.fd < 0:
                self.fd = self.staging.open_file(self.data_name, os.O_RDWR | os.O_CREAT)
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, self.desc.size)
                self._saved_at = time.monotonic()  # a blob written within SAVE_EVERY_S is never recorded

    def write(self, offset: int, buffers: Sequence[Buffer]) -> None:
        """Write ``buffers`` at ``offset`` (in a worker thread; made the file first if need be). The range is
        recorded by :meth:`written` on the event loop."""
        if self.fd < 0:
            self.create()
        if os.pwritev(self.fd, buffers, offset) != sum(map(len, buffers)):
            raise StoreError(f"short write of {self.desc.digest} at {offset}")

    def written(self, offset: int, n: int) -> None:
        """Bytes ``[offset, offset + n)`` are in the file (on the event loop): recorded every SAVE_EVERY_S, on a
        worker thread (one record in flight at a time), which :meth:`settle` waits for."""
        self.ranges.add(offset, offset + n)
        self._unsaved += n
        recording = self._recording
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S and (recording is None or recording.done()):
            self._recording = self._start(self._write_record, self._take_record())

    def save(self) -> None:
        """Record the ranges now (temp + rename), if anything was written since the last record."""
        if self._unsaved:
            self._write_record(self._take_record())

    def _take_record(self) -> bytes:
        self._unsaved = 0
        self._saved_at = time.monotonic()
        return json.dumps({"size": self.desc.size, "done": self.ranges.as_list()}).encode()

    def _write_record(self, record: bytes) -> None:
        try:
            self.staging.write_atomic(self.ranges_name, record, mode=0o600, durable=False)
        except OSError as e:
            log.debug("could not record progress of %s: %s", self.desc.digest, e)

    def read(self, offset: int, n: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise StoreError(f"staged file of {self.desc.digest} ended at {offset + len(data)}")
        return data

    def read_into(self, offset: int, buffers: list[memoryview]) -> None:
        """Fill ``buffers``, in order, with the bytes from ``offset`` on (one ``preadv`` where it can)."""
        while buffers:
            got = os.preadv(self.fd, buffers, offset)
            if not got:
                raise StoreError(f"staged file of {self.desc.digest} ended at {offset}")
            offset += got
            while buffers and got >= len(buffers[0]):
                got -= len(buffers.pop(0))
            if got:
                buffers[0] = buffers[0][got:]

    @contextlib.contextmanager
    def mapped(self, offset: int, n: int) -> Iterator[memoryview]:
        """Bytes ``[offset, offset + n)`` as a read-only mapping of the file, faulted in first with
        MADV_POPULATE_READ, which reports a failed read as OSError where touching the mapping would raise
        SIGBUS. Raises OSError(EINVAL) on a kernel without it."""
        lead = offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(self.fd, n + lead, prot=mmap.PROT_READ, offset=offset - lead)
        try:
            m.madvise(MADV_POPULATE_READ)
            with memoryview(m) as view, view[lead:] as data:
                yield data
        finally:
            m.close()

    def published(self) -> None:
        """The file was moved into the store: drop its record (on a worker thread)."""
        self.staging.unlink(self.ranges_name)
        self._unsaved = 0

    async def discard(self) -> None:
        """:meth:`remove`, once no thread works on the file."""
        await self.settle()
        self.remove()

    def remove(self) -> None:
        """Forget the staged bytes (the file and its record); no thread may be working on the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.staging.unlink(self.data_name)
        self.staging.unlink(self.ranges_name)
        self.ranges = RangeSet()
        self._unsaved = 0

    def close(self) -> None:
        """Record what is there, close, and let the next writer in."""
        try:
            self.save()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            self._unlock()


def _close_lock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int]:
    """libc's sync_file_range, which Python's os module lacks (ctypes is imported on first use: a pull's start
    does not need it)."""
    import ctypes

    call = ctypes.CDLL(None, use_errno=True).sync_file_range
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


def start_writeback(fd: int, offset: int, n: int) -> bool:
    """Start writing ``[offset, offset + n)`` of ``fd`` back to disk without waiting for it; whether the kernel
    took it. Advisory: a failure only leaves the work to the fsync at commit."""
    return _sync_file_range()(fd, offset, n, SYNC_FILE_RANGE_WRITE) == 0


class PrefixHasher:
    """The digest of a blob's bytes, taken in offset order on the blob's hash lane of the shared pool
    (:class:`~puller.stores.threads.SerialLane`): a block that starts where the hash has got to is written and
    hashed there from the bytes in hand; other blocks are written on the blob's write lane beside it, and when the
    prefix of written bytes jumps past the hash, the bytes jumped over are read back on the hash lane. The lane
    keeps the hash in order without a lock; hashlib and the writes release the GIL, so this runs beside the event
    loop. Hashed bytes are final: their writeback is started, so the fsync at commit finds little left."""

    def __init__(self, staged: StagedFile, digest: Digest):
        self._staged = staged
        self._hash = digest.hasher()
        self._lane = SerialLane(lane_pool())  # in-order writes with their hash, and read-backs
        self._writes = SerialLane(lane_pool())  # the other writes, beside the hash
        self.queued = 0  # bytes [0, queued) are hashed or queued for hashing (loop side)
        self._advised = 0
        self._read_backs: list[Future] = []
        self._map = True  # read back through a mapping until the kernel says it cannot

    async def write(self, offset: int, buffers: Sequence[Buffer], n: int) -> None:
        """Write a block (and hash it, if it extends the hashed prefix)."""
        if offset == self.queued:
            self.queued += n
            await self._lane.run(self._write_hash, offset, buffers, n)
        else:
            await self._writes.run(self._write_ahead, offset, buffers, n)

    def _write_hash(self, offset: int, buffers: Sequence[Buffer], n: int) -> None:
        self._staged.write(offset, buffers)
        for b in buffers:
            self._hash.update(b)
        self._writeback(offset + n)

    def _write_ahead(self, offset: int, buffers: Sequence[Buffer], n: int) -> None:
        """A block beyond the hash: written, and its writeback started (its pages stay cached for the read-back),
        so the fsync at commit does not find the bytes hashed last, often a hundred MB behind a late range, all
        still dirty."""
        self._staged.write(offset, buffers)
        start_writeback(self._staged.fd, offset, n)

    def written_up_to(self, prefix_end: int) -> None:
        """Bytes ``[0, prefix_end)`` are in the file: queue the read-back of those the hash has not had."""
        if prefix_end > self.queued + (MIN_READ_BACK if prefix_end < self._staged.desc.size else 0):
            start, self.queued = self.queued, prefix_end
            self._read_backs = [f for f in self._read_backs if not f.done() or f.exception() is not None]
            self._read_backs.append(self._lane.submit(self._read_back, start, prefix_end))  # errors: finish()

    def _read_back(self, start: int, end: int) -> None:
        """Hash ``[start, end)`` from the file: through a mapping (no copy into Python; about 0.1 CPU-s/GB less
        than pread here), or by pread where the kernel cannot fault a mapping in ahead."""
        pos = start
        while pos < end and self._map:
            n = min(MAP_WINDOW, end - pos)
            try:
                with self._staged.mapped(pos, n) as data:
                    self._hash.update(data)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._map = False
                break
            pos += n
        for at in range(pos, end, READ_BLOCK):
            self._hash.update(self._staged.read(at, min(READ_BLOCK, end - at)))
        self._writeback(end)

    def _writeback(self, hashed: int) -> None:
        if hashed - self._advised >= WRITEBACK_STEP or hashed == self._staged.desc.size:
            # Starts writeback of the dirty pages, and lets the kernel drop them once written: a multi-GB pull
            # does not fill the page cache.
            os.posix_fadvise(self._staged.fd, self._advised, hashed - self._advised, os.POSIX_FADV_DONTNEED)
            self._advised = hashed

    async def finish(self, size: int) -> str:
        """Hash up to ``size`` (every byte is written) and return the hex digest."""
        self.written_up_to(size)
        digest = await self._lane.run(self._hash.hexdigest)
        for f in self._read_backs:
            f.result()  # a failed read-back raises here
        return digest

    async def close(self) -> None:
        """Wait out queued work (before the file is closed)."""
        await self._writes.drained()
        await self._lane.drained()


class FileWriter:
    """The :class:`~puller.stores.BlobWriter` of a store that keeps each blob as a file. ``present`` tells
    whether the store has the blob; ``publish(staging, name)`` makes the verified, staged file visible (in a
    worker thread)."""

    def __init__(
        self,
        staging: SafeDir,
        desc: Descriptor,
        present: Callable[[], Awaitable[bool]],
        publish: Callable[[SafeDir, str], None],
    ):
        self.desc = desc
        self._staged = StagedFile(staging, desc)
        self._present = present
        self._publish = publish
        self._hasher = PrefixHasher(self._staged, desc.digest)
        self._there = False

    async def __aenter__(self) -> FileWriter:
        await self._staged.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._hasher.close()
        finally:
            await self._staged.aclose()

    async def status(self) -> WriteStatus:
        if await self._present():
            self._there = True
            return WriteStatus(RangeSet([(0, self.desc.size)]), present=True)
        return WriteStatus(self._staged.ranges.copy())

    async def room_for(self, offset: int, n: int, timeout: float) -> bool:
        """Always: bytes go straight to the file."""
        return True

    async def write_at(self, offset: int, buffers: Sequence[Buffer], handover: Handover | None = None) -> None:
        """Written (and hashed where they extend the prefix) before it returns: the buffer is never taken."""
        n = sum(map(len, buffers))
        if self._staged.fd < 0:
            await self._staged.run(self._staged.create)
        try:
            await self._hasher.write(offset, buffers, n)
        except OSError as e:
            raise store_error(e, f"writing {self.desc.digest}") from None
        self._staged.written(offset, n)
        self._hasher.written_up_to(self._staged.ranges.prefix_end())

    async def commit(self) -> None:
        if self._there:
            return
        size, digest = self.desc.size, self.desc.digest
        got = self._staged.ranges.prefix_end()
        if got != size or self._staged.fd < 0:
            raise SizeMismatch(size, got, what=f"blob {digest}")
        try:
            actual = await self._hasher.finish(size)
        except OSError as e:
            raise store_error(e, f"reading back {digest}") from None
        if actual != digest.hex:
            await self._staged.discard()  # never keep bad bytes: the next attempt starts from nothing
            raise DigestMismatch(str(digest), f"{digest.algorithm}:{actual}", what="blob")
        try:
            await self._staged.settle()  # a record of the ranges written meanwhile would outlive the blob's
            await self._staged.run(self._publish_staged)
        except OSError as e:
            raise store_error(e, f"committing {digest}") from None
        self._staged.ranges = RangeSet()
        self._there = True

    def _publish_staged(self) -> None:
        staged = self._staged
        self._publish(staged.staging, staged.data_name)
        staged.published()

    async def abort(self) -> None:
        await self._hasher.close()
        await self._staged.discard()
