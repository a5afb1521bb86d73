"""Where verified bytes go. Every store commits atomically and can answer "have I got X?".

A store never talks to a registry. The engine stages a blob in :attr:`Store.staging` (a checked directory on the
store's filesystem, so that committing is a rename; see :mod:`.safedir`), verifies it, then calls
:meth:`Store.commit_blob` with the staged file's name in that directory.

A store that takes data as a stream and checks the digest itself before anything becomes visible (containerd)
may instead return a :class:`BlobSink` from :meth:`Store.blob_sink`. The engine then offers it every received
block straight from the network (:meth:`BlobSink.take`), stages only the blocks it refuses, and leaves the digest
check to the store's commit: a mismatch there is handled like one found by the engine (nothing committed, the
blob fetched once more).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from typing import Protocol

from ..errors import DiskFull, StoreError
from ..reference import Reference
from ..registry.manifest import Descriptor, Manifest
from .safedir import SafeDir


class BlobSink(Protocol):
    async def start(self) -> int:
        """Begin; return how many bytes of the blob the store already holds in order (from an earlier run)."""

    def take(self, offset: int, buffers: list[bytes], n: int) -> bool:
        """Keep ``n`` received bytes at ``offset`` to send in their turn, if memory allows; when False the engine
        writes them to the staged file instead."""

    def advance(self, received_end: int) -> None:
        """Bytes ``[0, received_end)`` are received: kept by :meth:`take` or written to the staged file."""

    def admit(self, start: int, end: int) -> bool:
        """False when bytes ``[start, end)`` should not be fetched yet: the store is too far behind, and fetching
        further would only take the CPU (or disk) the store needs."""

    async def wait_admit(self, start: int, end: int) -> None:
        """Return when ``admit(start, end)`` is True."""

    async def abort(self) -> None:
        """The bytes were wrong (digest mismatch): forget what was sent."""

    async def close(self) -> None:
        """Stop sending (the pull failed or was cancelled); what was sent is kept for a resume."""


class Store(Protocol):
    @property
    def staging(self) -> SafeDir:
        """The checked staging directory, opened when the store is entered."""

    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def blob_sink(self, desc: Descriptor, staged: str) -> BlobSink | None:
        """A sink fed while the blob downloads (the blocks it refuses wait in ``staged``), or None to take the
        verified file whole at commit."""

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

    async def commit_blob(self, desc: Descriptor, staged: str) -> None:
        """Take ownership of ``staged`` (a name in :attr:`staging`), a verified file of ``desc`` (or, with a sink,
        finish the sink: the store checks the digest and raises DigestMismatch); visible atomically."""

    async def commit_image(
        self, ref: Reference, target: Descriptor, documents: list[tuple[Descriptor, bytes]], pin: bool = False
    ) -> None:
        """Record the image: write the manifest/index ``documents`` and name ``target`` by ``ref``; ``pin`` asks
        a store with garbage collection (containerd) to keep it; without ``pin`` a pin the store set earlier is
        taken off (never one set by others)."""

    async def unpin_image(self, ref: Reference, digest: str | None) -> None:
        """``ref`` (resolved to ``digest`` when known) is no longer wanted pinned: take off a pin puller set."""


class StoreBase:
    """Defaults for the optional parts of :class:`Store`."""

    def select_blobs(self, manifest: Manifest) -> tuple[Descriptor, ...]:
        return manifest.blobs

    async def reserve(self, blobs: list[Descriptor]) -> None:
        return None

    def blob_sink(self, desc: Descriptor, staged: str) -> BlobSink | None:
        return None

    async def begin_image(self, ref: Reference, manifest: Manifest) -> None:
        return None

    async def unpin_image(self, ref: Reference, digest: str | None) -> None:
        return None

    async def abandon_image(self, manifest: Manifest) -> None:
        return None


def free_bytes(where: int | str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``where`` (a path or an open fd)."""
    vfs = os.statvfs(where)
    return vfs.f_bavail * vfs.f_frsize


def check_space(staging: SafeDir, blobs: list[Descriptor]) -> None:
    """DiskFull when ``blobs`` (less what is staged of them: ``<alg>-<hex>.partial``) exceed the free space of
    the staging directory's filesystem."""
    needed = 0
    for d in blobs:
        st = staging.stat(f"{d.digest.algorithm}-{d.digest.hex}.partial")
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
