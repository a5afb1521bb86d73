"""One layer applied as its blob's bytes arrive: compressed bytes in order -> digest, decompression -> diff ID,
tar reader -> applier -> the layer's directory.

Two threads share the work, so that one fat layer is not bound to one core: the caller's (:meth:`LayerStream.feed`:
the compressed digest and decompression) and the layer's own tar thread (the diff ID's hash, the tar reader and
the applier's writes), joined by a queue of at most QUEUED_PIECES decompressed pieces. Both release the GIL for
their heavy calls (ISA-L, OpenSSL, file writes). An error of the tar thread is raised by the next ``feed`` or by
``finish``.

Nothing is trusted before :meth:`LayerStream.finish`: it checks that the blob had its descriptor's size and
digest (unless the caller has the digest checked elsewhere: containerd checks it when it commits the blob), that
the decompressed stream (read to its very end, past the tar's end marker, as containerd reads it) hashes to the
image config's diff ID, and that the tar ended where a tar may end. Whoever owns the directory discards it when
anything fails.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass

from ..errors import DigestMismatch, InvalidLayer, SizeMismatch
from ..registry.manifest import Descriptor
from .apply import Applier, Limits
from .decompress import Decompressor
from .rootfs import Root
from .tar import TarReader

QUEUED_PIECES = 4  # decompressed pieces (of at most decompress.PIECE bytes) waiting for a layer's tar thread
_END = memoryview(b"")  # queued after the last piece


@dataclass(frozen=True, slots=True)
class Applied:
    """What a finished layer was: its diff ID, decompressed size and tar entries."""

    diff_id: str
    size: int
    entries: int


class LayerStream:
    """Feed the blob ``desc``'s bytes in order (:meth:`feed`), then :meth:`finish`, then :meth:`close` (also when
    giving up); the tree goes into the open directory ``root_fd`` (not closed here). ``overlay``: whiteouts in
    overlayfs form (every layer but the bottom one, as containerd's parallel unpack applies them). ``budget``: a
    semaphore that layers applied at once share, one unit per decompressed piece queued for a tar thread (their
    memory together). ``feed`` and ``finish`` are called by one thread at a time."""

    def __init__(
        self,
        desc: Descriptor,
        diff_id: str,
        root_fd: int,
        overlay: bool,
        limits: Limits,
        check_digest: bool = True,
        budget: threading.Semaphore | None = None,
    ):
        self.desc = desc
        self.diff_id = diff_id
        self.limits = limits
        self.root = Root(os.dup(root_fd))
        self.applier = Applier(self.root, overlay, limits)
        self.tar = TarReader(self.applier, limits.max_entries, limits.max_name)
        self.decompressor = Decompressor(desc.media_type, self._tar_bytes)
        self.compressed = hashlib.new(desc.digest.algorithm) if check_digest else None
        self.received = 0
        self.uncompressed = hashlib.sha256()
        self.unpacked = 0
        self._pieces: queue.Queue[memoryview] = queue.Queue(QUEUED_PIECES)
        self._budget = budget  # queued pieces of every layer together, where several apply at once
        self._thread: threading.Thread | None = None  # the tar thread, started with the first piece
        self._error: BaseException | None = None  # the tar thread's
        self._stopping = False  # the tar thread drops what is queued (giving up)

    def feed(self, data: bytes | memoryview) -> None:
        self._raise_tar_error()
        self.received += len(data)
        if self.received > self.desc.size:
            raise SizeMismatch(self.desc.size, self.received, f"layer {self.desc.digest}")
        if self.compressed is not None:
            self.compressed.update(data)
        self.decompressor.feed(data)

    def _tar_bytes(self, piece: memoryview) -> None:
        """A decompressed piece, to the tar thread (a copy, unless its buffer is immutable)."""
        self.unpacked += len(piece)
        if self.unpacked > self.limits.max_unpacked:
            raise InvalidLayer(
                f"layer {self.desc.digest} unpacks to more than {self.limits.max_unpacked:,} bytes "
                "(unpack limit max_unpacked)"
            )
        self._raise_tar_error()
        if self._thread is None:
            self._thread = threading.Thread(target=self._tar_thread, name="puller-tar", daemon=True)
            self._thread.start()
        if self._budget is not None:
            self._budget.acquire()  # released by the tar thread once it is done with the piece
        self._pieces.put(piece if isinstance(piece.obj, bytes) else memoryview(bytes(piece)))

    def _tar_thread(self) -> None:
        while (piece := self._pieces.get()) is not _END:
            try:
                if self._error is not None or self._stopping:
                    continue  # drained, so that feed never waits for room that will not come
                self.uncompressed.update(piece)
                if not self.tar.ended:
                    self.tar.feed(piece)
            except BaseException as e:
                self._error = e
            finally:
                if self._budget is not None:
                    self._budget.release()

    def _raise_tar_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _join(self) -> None:
        """Wait for the tar thread to take every piece queued and end."""
        if self._thread is not None:
            self._pieces.put(_END)
            self._thread.join()
            self._thread = None

    def finish(self) -> Applied:
        """Check everything (see the module docstring) and set the directories' times; raises DigestMismatch,
        SizeMismatch or InvalidLayer (or the applier's store errors)."""
        self._raise_tar_error()
        if self.received != self.desc.size:
            raise SizeMismatch(self.desc.size, self.received, f"layer {self.desc.digest}")
        if self.compressed is not None and self.compressed.hexdigest() != self.desc.digest.hex:
            actual = f"{self.desc.digest.algorithm}:{self.compressed.hexdigest()}"
            raise DigestMismatch(str(self.desc.digest), actual)
        self.decompressor.close()
        self._join()
        self._raise_tar_error()
        diff_id = f"sha256:{self.uncompressed.hexdigest()}"
        if diff_id != self.diff_id:
            raise DigestMismatch(self.diff_id, diff_id, f"layer {self.desc.digest}'s uncompressed (diff ID)")
        self.tar.close()
        self.applier.finish()
        return Applied(diff_id, self.unpacked, self.tar.entries)

    def close(self) -> None:
        """Stop the tar thread and release descriptors (after :meth:`finish`, or when giving up)."""
        self._stopping = True
        self._join()
        self.applier.close()
        self.root.close()
