"""The overlaybd registry_cache store: whole blobs where overlaybd's file cache looks, so nothing is lazy-loaded.

What overlaybd does (containerd/overlaybd, src/image_service.cpp and src/overlaybd/cache/full_file_cache):
- The cache directory is ``cacheConfig.cacheDir`` when ``cacheConfig.cacheType`` is set, else the older
  top-level ``registryCacheDir`` (default /opt/overlaybd/registry_cache); the size limit likewise
  ``cacheConfig.cacheSizeGB`` or ``registryCacheSizeGB`` (default 4). Only the ``file`` cache type keeps one file
  per blob; ``ocf`` keeps one media file and ``download`` a different layout, so those are refused.
- A blob's cache file is the basename of its registry path: ``sha256:<hex>``, flat in the cache directory,
  holding the raw blob as the registry serves it.
- Which ranges are cached is decided with FIEMAP: holes, and extents whose flags equal UNKNOWN or UNWRITTEN, are
  missing. So a complete file has every byte written and synced, and its size is the blob size. (The equality
  test lets an unwritten last extent, flags UNWRITTEN|LAST, pass as cached: puller checks the bits instead.)
- At start-up overlaybd walks the whole directory tree and indexes every file it finds; later files are opened
  by name when a layer is opened.

So puller stages each blob outside the cache directory (same filesystem, so that the commit is a rename), and
only a verified, fsynced file is renamed to ``sha256:<hex>``. A file that is already complete is never rewritten;
an incomplete one (overlaybd's own lazily filled file) is replaced by the complete one.

Known limits of side-loading, from overlaybd's cache code, and what puller does:
- Size accounting: overlaybd counts a file's size when it indexes the directory at start-up or when it writes to
  the file itself. A complete file added after start-up is opened with size 0 and never written, so it does not
  count toward ``cacheSizeGB`` until overlaybd restarts, and the cache can grow past its limit. puller checks the
  directory's real usage plus what it is about to add against the limit before it writes, and refuses (a clear
  error) when it would not fit.
- Eviction: when the counted usage passes the high-water mark overlaybd truncates and unlinks least recently used
  files that are not open. Prefetched blobs that are not used soon can be evicted like any other; pulling more
  than the cache holds is refused for that reason.
- P2P: with ``p2pConfig.enable`` overlaybd fetches through the accelerator, not this cache: puller warns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import struct
from pathlib import Path

from ..errors import ConfigError, DiskFull, StoreError
from ..reference import Reference
from ..registry.manifest import Descriptor, Manifest
from . import StoreBase, free_bytes, mark_verified, store_error, verified_present
from .defaults import OVERLAYBD_CACHE_DIR as DEFAULT_CACHE_DIR
from .defaults import OVERLAYBD_CACHE_SIZE_GB as DEFAULT_CACHE_SIZE_GB
from .defaults import OVERLAYBD_CONFIG as DEFAULT_CONFIG
from .safedir import SafeDir
from .staged import FileWriter

log = logging.getLogger(__name__)

GIB = 1 << 30

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEADER = struct.Struct("=QQLLLL")
_FIEMAP_EXTENT = struct.Struct("=QQQQQLLLL")
_EXTENTS_PER_CALL = 256


class OverlaybdSettings:
    """What puller needs from overlaybd.json."""

    def __init__(self, cache_dir: str, cache_size_gb: int, p2p: bool):
        self.cache_dir = cache_dir
        self.cache_size_gb = cache_size_gb
        self.p2p = p2p

    @classmethod
    def load(cls, path: str = DEFAULT_CONFIG) -> OverlaybdSettings:
        """Read overlaybd's config; a missing file means overlaybd's defaults."""
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return cls(DEFAULT_CACHE_DIR, DEFAULT_CACHE_SIZE_GB, False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read overlaybd config {path}: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"overlaybd config {path} is not a JSON object")
        cache: dict = doc["cacheConfig"] if isinstance(doc.get("cacheConfig"), dict) else {}
        if cache.get("cacheType"):
            cache_type = str(cache["cacheType"])
            cache_dir = str(cache.get("cacheDir") or DEFAULT_CACHE_DIR)
            size = cache.get("cacheSizeGB", DEFAULT_CACHE_SIZE_GB)
        else:
            cache_type = str(doc.get("cacheType") or "file")
            cache_dir = str(doc.get("registryCacheDir") or DEFAULT_CACHE_DIR)
            size = doc.get("registryCacheSizeGB", DEFAULT_CACHE_SIZE_GB)
        if cache_type != "file":
            raise ConfigError(
                f"overlaybd cache type {cache_type!r} in {path} is not supported: puller fills the 'file' cache "
                "(one file per blob); the 'ocf' and 'download' caches keep data in their own formats"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ConfigError(f"overlaybd config {path}: invalid cache size {size!r}")
        p2p: dict = doc["p2pConfig"] if isinstance(doc.get("p2pConfig"), dict) else {}
        return cls(cache_dir, size, bool(p2p.get("enable")))


def file_extents(fd: int) -> list[tuple[int, int, int]] | None:
    """(logical offset, length, flags) of every extent, via FIEMAP with FIEMAP_FLAG_SYNC; None when the
    filesystem has no FIEMAP."""
    out: list[tuple[int, int, int]] = []
    start = 0
    while True:
        buf = bytearray(_FIEMAP_HEADER.size + _EXTENTS_PER_CALL * _FIEMAP_EXTENT.size)
        _FIEMAP_HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, _EXTENTS_PER_CALL, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as e:
            if e.errno in (95, 25):  # EOPNOTSUPP, ENOTTY
                return None
            raise
        mapped = _FIEMAP_HEADER.unpack_from(buf, 0)[3]
        last = False
        for i in range(mapped):
            logical, _phys, length, _r1, _r2, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEADER.size + i * _FIEMAP_EXTENT.size
            )
            out.append((logical, length, flags))
            last = bool(flags & FIEMAP_EXTENT_LAST)
        if mapped == 0 or last:
            return out
        start = out[-1][0] + out[-1][1]


def is_complete(directory: SafeDir, name: str, size: int) -> bool:
    """True when every byte of plain file ``name`` is really there: right size, no holes, no extent flagged UNKNOWN or
    UNWRITTEN. overlaybd compares the flags for equality, so an unwritten *last* extent (UNWRITTEN|LAST) passes
    its test and reads as zeros; puller tests the bits, which is stricter."""
    try:
        fd = directory.open_file(name, os.O_RDONLY)
    except (FileNotFoundError, StoreError):
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:  # a link is never a complete file: the verified one is renamed over it
            return False
        raise
    try:
        if os.fstat(fd).st_size != size:
            return False
        if size == 0:
            return True
        extents = file_extents(fd)
        if extents is None:  # no FIEMAP here: fall back to holes only
            return os.lseek(fd, 0, os.SEEK_HOLE) >= size
        pos = 0
        for logical, length, flags in extents:
            if logical > pos or flags & (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_UNWRITTEN):
                return False
            pos = max(pos, logical + length)
        return pos >= size
    finally:
        os.close(fd)


def directory_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (what overlaybd counts at start-up: st_blocks * 512)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class OverlaybdStore(StoreBase):
    """Use as ``async with OverlaybdStore(...) as store``."""

    def __init__(self, config_path: str = DEFAULT_CONFIG, cache_dir: str | None = None, staging_dir: str | None = None):
        settings = OverlaybdSettings.load(config_path)
        self.cache_dir = Path(cache_dir or settings.cache_dir).absolute()
        self.cache_limit = settings.cache_size_gb * GIB
        self.p2p = settings.p2p
        # Outside the cache directory (overlaybd indexes every file under it), on the same filesystem.
        self.staging_dir = Path(staging_dir).absolute() if staging_dir else self.cache_dir.parent / ".puller-staging"
        self._cache: SafeDir | None = None
        self._staging: SafeDir | None = None

    @property
    def staging(self) -> SafeDir:
        assert self._staging is not None, "store used outside 'async with'"
        return self._staging

    @property
    def cache(self) -> SafeDir:
        assert self._cache is not None, "store used outside 'async with'"
        return self._cache

    async def __aenter__(self) -> OverlaybdStore:
        await asyncio.to_thread(self._init)
        if self.p2p:
            log.warning(
                "overlaybd's p2pConfig is enabled: overlaybd reads through the P2P accelerator and "
                "bypasses %s, so blobs put there may not be used",
                self.cache_dir,
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for d in (self._cache, self._staging):
            if d is not None:
                d.close()
        self._cache = self._staging = None

    def _init(self) -> None:
        if self.staging_dir == self.cache_dir or self.cache_dir in self.staging_dir.parents:
            raise ConfigError(f"staging directory {self.staging_dir} must be outside the cache directory")
        try:
            self._cache = SafeDir.open(self.cache_dir, mode=0o755)
            self._staging = SafeDir.open(self.staging_dir)
        except OSError as e:
            raise store_error(e, f"creating {self.cache_dir}") from None
        if os.fstat(self._staging.fd).st_dev != os.fstat(self._cache.fd).st_dev:
            raise ConfigError(
                f"staging directory {self.staging_dir} is not on the filesystem of {self.cache_dir}: "
                "a blob could not be renamed into place atomically"
            )

    def blob_path(self, desc: Descriptor) -> Path:
        return self.cache_dir / blob_name(desc)

    def select_blobs(self, manifest: Manifest) -> tuple[Descriptor, ...]:
        """overlaybd reads layer blobs only (for an overlaybd image, its commit/layer files); not the config."""
        return manifest.layers

    async def has_blob(self, desc: Descriptor) -> bool:
        return await asyncio.to_thread(self._present, desc)

    def _present(self, desc: Descriptor) -> bool:
        """Complete by FIEMAP, and verified: by puller's mark, or hashed once (a file overlaybd or anyone else
        wrote)."""
        name = blob_name(desc)
        return is_complete(self.cache, name, desc.size) and verified_present(self.cache, name, desc)

    async def reserve(self, blobs: list[Descriptor]) -> None:
        """Refuse before any byte is written when the blobs would not fit the cache limit or the disk."""
        await asyncio.to_thread(self._check_space, sum(d.size for d in blobs))

    def _check_space(self, needed: int) -> None:
        used = directory_usage(self.cache_dir)
        if used + needed > self.cache_limit:
            raise DiskFull(
                f"image needs {needed / 1e6:,.0f} MB but the overlaybd cache {self.cache_dir} holds "
                f"{used / 1e6:,.0f} MB of its {self.cache_limit / 1e6:,.0f} MB limit (cacheSizeGB): overlaybd "
                "would evict blobs to make room; raise cacheSizeGB or prefetch fewer images"
            )
        free = free_bytes(self.cache.fd)
        if needed > free:
            raise DiskFull(f"image needs {needed / 1e6:,.0f} MB, {self.cache_dir} has {free / 1e6:,.0f} MB free")

    def writer(self, desc: Descriptor) -> FileWriter:
        return FileWriter(
            self.staging, desc, functools.partial(self.has_blob, desc), functools.partial(self._publish, desc)
        )

    def _publish(self, desc: Descriptor, staging: SafeDir, staged: str) -> None:
        if self._present(desc):
            staging.unlink(staged)  # never rewrite a complete file (overlaybd may have it open)
            return
        staging.move_into(staged, self.cache, blob_name(desc), before=functools.partial(mark_verified, desc=desc))

    async def commit_image(
        self, ref: Reference, target: Descriptor, documents: list[tuple[Descriptor, bytes]], pin: bool = False
    ) -> None:
        """overlaybd keeps no image records: once the layer files are in place the image is present."""
        log.info("%s: layers of %s are in %s", ref, target.digest, self.cache_dir)


def blob_name(desc: Descriptor) -> str:
    """overlaybd's file name for a blob; the digest is validated (fixed algorithm set, fixed-length hex)."""
    return f"{desc.digest.algorithm}:{desc.digest.hex}"
