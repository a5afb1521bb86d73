"""What failed or abandoned pulls leave in a store's staging directory, kept within bounds.

A staged blob is ``<alg>-<hex>.partial`` with its ``.ranges`` record and ``.lock``; it is kept after a failure so
that the next pull resumes it. Kept for ever, failures would fill the disk (three failed pulls of three 20 MiB
layers hold 60 MiB; a registry that keeps failing holds more every day). :func:`collect` removes, oldest first,
the staged blobs no pull is writing (their lock is free) that are older than ``max_age`` seconds, or that take
the staging directory over ``max_bytes`` (allocated blocks, what the disk loses), or that hold nothing (a pull
that failed before its first byte: nothing to resume).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field

from ..stores.safedir import SafeDir

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 16 << 30
DEFAULT_MAX_AGE_S = 24 * 3600.0
SUFFIXES = (".partial", ".ranges", ".lock")


@dataclass
class _Staged:
    names: list[str] = field(default_factory=list)
    allocated: int = 0
    newest: float = 0.0


def collect(staging: SafeDir, max_bytes: int, max_age: float, now: float | None = None) -> int:
    """Remove staged blobs as the module docstring says; returns the bytes freed."""
    now = time.time() if now is None else now
    groups: dict[str, _Staged] = {}
    for name in staging.names():
        stem, dot, suffix = name.rpartition(".")
        if not dot or f".{suffix}" not in SUFFIXES:
            continue
        st = staging.stat(name)
        if st is None:
            continue
        g = groups.setdefault(stem, _Staged())
        g.names.append(name)
        g.allocated += st.st_blocks * 512
        g.newest = max(g.newest, st.st_mtime)
    total = sum(g.allocated for g in groups.values())
    freed = 0
    for stem, g in sorted(groups.items(), key=lambda kv: kv[1].newest):
        if g.allocated and now - g.newest <= max_age and total <= max_bytes:
            continue
        if _remove_unless_in_use(staging, stem, g):
            total -= g.allocated
            freed += g.allocated
            log.info("staging: removed %s (%.1f MB, %.0f s old)", stem, g.allocated / 1e6, now - g.newest)
    return freed


def _remove_unless_in_use(staging: SafeDir, stem: str, g: _Staged) -> bool:
    """Remove the group's files while holding its lock (a pull that holds the lock is writing it: skip)."""
    try:
        fd = staging.open_file(f"{stem}.lock", os.O_RDWR | os.O_CREAT)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        for name in g.names:
            if not name.endswith(".lock"):
                staging.unlink(name)
        staging.unlink(f"{stem}.lock")  # a waiting pull sees the inode change and opens a new lock
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
