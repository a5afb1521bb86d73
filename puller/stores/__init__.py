"""Where verified bytes go. Every store commits atomically and can answer "have I got X?".

A store never talks to a registry. The engine meets it through one contract, shaped like containerd's content
Writer: :meth:`Store.writer` gives a :class:`BlobWriter` for one blob, which says what it already holds
(:meth:`BlobWriter.status`: the ranges to resume from), takes bytes at their offsets in any order
(:meth:`BlobWriter.write_at`, which may wait: the only backpressure a store applies) and makes the blob visible
only when size and digest are right (:meth:`BlobWriter.commit`). The engine schedules ranges and hands bytes over;
how a store keeps them (a staged file and its hash, containerd's ingest and memory for out-of-order bytes) is
the writer's. ``tests/test_store_contract.py`` holds every store to the same promises.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from ..errors import DiskFull, StoreError
from ..ranges import RangeSet
from ..reference import Reference
from ..registry.manifest import Descriptor, Manifest
from .safedir import SafeDir

Buffer = bytes | bytearray | memoryview


class Handover(Protocol):
    """The buffer behind the bytes handed to :meth:`BlobWriter.write_at`, which the writer may keep instead of
    copying them: :meth:`take` (before write_at returns) makes it the writer's, :meth:`give_back` returns it once
    the writer is done with it. A writer that keeps bytes without taking their buffer must copy them: the caller
    reuses it as soon as write_at returns."""

    def take(self) -> None: ...

    def give_back(self) -> None: ...


class WriteStatus(NamedTuple):
    """What a writer already holds: ``done``, the byte ranges kept from an earlier run (fetch only the rest);
    ``present``, the blob is committed already (by another pull meanwhile): nothing to write."""

    done: RangeSet
    present: bool = False


class BlobWriter(Protocol):
    """One blob on its way into a store; use as ``async with store.writer(desc) as w``. Entering may wait for
    another writer of the same blob (in this process or another); leaving keeps what is durable for a resume
    unless the blob was committed or aborted."""

    async def __aenter__(self) -> BlobWriter: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def status(self) -> WriteStatus:
        """What is already held (see :class:`WriteStatus`)."""

    async def write_at(self, offset: int, buffers: Sequence[Buffer], handover: Handover | None = None) -> None:
        """Take the bytes ``buffers`` at ``offset``; may wait while the store catches up (bounded). With
        ``handover``, ``buffers`` is one view of a buffer the writer may keep (see :class:`Handover`)."""

    async def room_for(self, offset: int, n: int, timeout: float) -> bool:
        """Whether the writer can take ``n`` bytes at ``offset`` without spilling them (a store that keeps
        out-of-order bytes in memory), waiting up to ``timeout`` for it: asked before those bytes are requested,
        so that downloading does not outrun the store. False: no room yet (ask again, or go on regardless)."""

    async def commit(self) -> None:
        """Make the blob visible, if its bytes ``[0, size)`` are all written and have the descriptor's digest;
        else raise SizeMismatch, or DigestMismatch after forgetting every byte (nothing visible, nothing staged).
        Committing a blob that is present succeeds without writing."""

    async def abort(self) -> None:
        """Forget every byte written (the pull gives up on this blob's bytes)."""


class Store(Protocol):
    @property
    def staging(self) -> SafeDir:
        """The checked directory where writers keep what is not yet committed, opened when the store is
        entered."""

    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def writer(self, desc: Descriptor) -> BlobWriter:
        """A writer for blob ``desc``."""

    async def begin_image(self, ref: Reference, manifest: Manifest) -> None:
        """Called once the manifest is known, before its blobs are fetched (e.g. to take a lease, to unpack
        layers as they land)."""

    async def abandon_image(self, manifest: Manifest) -> None:
        """The pull begun with :meth:`begin_image` failed: drop what was started for it."""

    def select_blobs(self, manifest: Manifest) -> tuple[Descriptor, ...]:
        """The blobs of ``manifest`` this store keeps (all of them, unless a store reads only some)."""

    async def reserve(self, blobs: list[Descriptor]) -> None:
        """Refuse, before any byte is fetched, blobs that cannot fit (raise DiskFull)."""

    async def has_blob(self, desc: Descriptor) -> bool:
        """True when the blob is present, complete and committed."""

    async def commit_image(
        self, ref: Reference, target: Descriptor, documents: list[tuple[Descriptor, bytes]], pin: bool = False
    ) -> None:
        """Record the image: write the manifest/index ``documents`` and name ``target`` by ``ref``; ``pin`` asks
        a store with garbage collection (containerd) to keep it; without ``pin`` a pin the store set earlier is
        taken off (never one set by others). Idempotent."""

    async def unpin_image(self, ref: Reference, digest: str | None) -> None:
        """``ref`` (resolved to ``digest`` when known) is no longer wanted pinned: take off a pin puller set."""

    def unpacked_by(self) -> dict[str, str] | None:
        """How the store applies layers (``{"path": ..., "reason": ...}``), or None for a store that keeps blobs
        only."""


class StoreBase:
    """Defaults for the optional parts of :class:`Store`."""

    def select_blobs(self, manifest: Manifest) -> tuple[Descriptor, ...]:
        return manifest.blobs

    async def reserve(self, blobs: list[Descriptor]) -> None:
        return None

    async def begin_image(self, ref: Reference, manifest: Manifest) -> None:
        return None

    async def unpin_image(self, ref: Reference, digest: str | None) -> None:
        return None

    async def abandon_image(self, manifest: Manifest) -> None:
        return None

    def unpacked_by(self) -> dict[str, str] | None:
        return None


def free_bytes(where: int | str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``where`` (a path or an open fd)."""
    vfs = os.statvfs(where)
    return vfs.f_bavail * vfs.f_frsize


def staged_stem(desc: Descriptor) -> str:
    """The name a blob's staged files share in a staging directory (``<stem>.partial``, ``.ranges``, ``.lock``)."""
    return f"{desc.digest.algorithm}-{desc.digest.hex}"


def check_space(staging: SafeDir, blobs: list[Descriptor]) -> None:
    """DiskFull when ``blobs`` (less what is staged of them: ``<alg>-<hex>.partial``) exceed the free space of
    the staging directory's filesystem."""
    needed = 0
    for d in blobs:
        st = staging.stat(f"{staged_stem(d)}.partial")
        needed += max(0, d.size - (st.st_blocks * 512 if st is not None else 0))
    free = free_bytes(staging.fd)
    if needed > free:
        raise DiskFull(
            f"no space left on device for this image: it needs {needed / 1e6:,.1f} MB more, "
            f"{staging.path} has {free / 1e6:,.1f} MB free"
        )


VERIFIED_XATTR = "user.puller.digest"  # set on files puller verified: present blobs are then trusted by size


def mark_verified(fd: int, desc: Descriptor) -> None:
    """Record on the open file that its bytes were verified as ``desc`` (where the filesystem has xattrs)."""
    with contextlib.suppress(OSError):
        os.setxattr(fd, VERIFIED_XATTR, str(desc.digest).encode())


def verified_present(directory: SafeDir, name: str, desc: Descriptor) -> bool:
    """True when plain file ``name`` holds ``desc``: by puller's mark, or else (a file puller did not write, or a
    filesystem without xattrs) by hashing it once, and marking it when it matches."""
    try:
        fd = directory.open_file(name, os.O_RDONLY)
    except (OSError, StoreError):
        return False
    try:
        if os.fstat(fd).st_size != desc.size:
            return False
        with contextlib.suppress(OSError):
            if os.getxattr(fd, VERIFIED_XATTR) == str(desc.digest).encode():
                return True
        h = hashlib.new(desc.digest.algorithm)
        while block := os.read(fd, 1 << 20):
            h.update(block)
        if h.hexdigest() != desc.digest.hex:
            return False
        mark_verified(fd, desc)
        return True
    finally:
        os.close(fd)


def store_error(e: OSError, what: str) -> StoreError:
    """Translate an OSError from store IO into the project's error types."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on device while {what}")
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return StoreError(f"too many open files while {what}: raise the limit (ulimit -n)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreError(f"{what}: {e.strerror} (is the store read-only or not puller's?)")
    return StoreError(f"{what}: {e.strerror or e}")
