"""Hash a blob's contiguous prefix while later chunks are still arriving.

sha256 cannot be split across chunks, so the hash follows the prefix of done bytes, reading them back from the
page cache in a worker thread (hashlib releases the GIL for large updates). When the last byte lands, at most
about one chunk remains to hash.
"""

from __future__ import annotations

import asyncio
import os

from ..digest import Digest

READ_BLOCK = 1024 * 1024
MIN_HASH_STEP = 4 * 1024 * 1024  # do not wake the thread for less than this, except at the end


class PrefixHasher:
    """Hashed pages are handed back to the kernel (their writeback starts early)."""

    def __init__(self, fd: int, digest: Digest):
        self._fd = fd
        self._hash = digest.hasher()
        self.hashed = 0
        self._target = 0
        self._task: asyncio.Task | None = None

    def advance(self, prefix_end: int, final: bool = False) -> None:
        """The bytes ``[0, prefix_end)`` are on disk; hash them in the background."""
        self._target = max(self._target, prefix_end)
        if self._task is None and (final or self._target - self.hashed >= MIN_HASH_STEP):
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self.hashed < self._target:
                end = self._target
                await asyncio.to_thread(self._hash_range, self.hashed, end)
                self.hashed = end
        finally:
            self._task = None

    def _hash_range(self, start: int, end: int) -> None:
        pos = start
        while pos < end:
            data = os.pread(self._fd, min(READ_BLOCK, end - pos), pos)
            if not data:
                raise OSError(f"short read at offset {pos} while hashing")
            self._hash.update(data)
            pos += len(data)
        # Hashed bytes are final: start their writeback now (and let the kernel drop them once written), so the
        # store's fsync at commit has little left to wait for and a multi-GB pull does not fill the cache.
        os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)

    async def finish(self, size: int) -> str:
        """Hash up to ``size`` and return the hex digest."""
        while self._task is not None:
            await self._task
        self.advance(size, final=True)
        while self._task is not None:
            await self._task
        return self._hash.hexdigest()

    async def close(self) -> None:
        """Wait out a background step (used on failure, before the fd is closed)."""
        task = self._task
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
