"""One layer applied as its blob's bytes arrive: compressed bytes in order -> digest, decompression -> diff ID,
tar reader -> applier -> the layer's directory.

Nothing is trusted before :meth:`LayerStream.finish`: it checks that the blob had its descriptor's size and
digest (unless the caller has the digest checked elsewhere: containerd checks it when it commits the blob), that
the decompressed stream (read to its very end, past the tar's end marker, as containerd reads it) hashes to the
image config's diff ID, and that the tar ended where a tar may end. Whoever owns the directory discards it when
anything fails.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ..errors import DigestMismatch, InvalidLayer, SizeMismatch
from ..registry.manifest import Descriptor
from .apply import Applier, Limits
from .decompress import Decompressor
from .rootfs import Root
from .tar import TarReader


@dataclass(frozen=True, slots=True)
class Applied:
    """What a finished layer was: its diff ID, decompressed size and tar entries."""

    diff_id: str
    size: int
    entries: int


class LayerStream:
    """Feed the blob ``desc``'s bytes in order (:meth:`feed`), then :meth:`finish`; the tree goes into the open
    directory ``root_fd`` (not closed here). ``overlay``: whiteouts in overlayfs form (every layer but the
    bottom one, as containerd's parallel unpack applies them). Not thread-safe: one thread at a time."""

    def __init__(
        self, desc: Descriptor, diff_id: str, root_fd: int, overlay: bool, limits: Limits, check_digest: bool = True
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

    def feed(self, data: bytes | memoryview) -> None:
        self.received += len(data)
        if self.received > self.desc.size:
            raise SizeMismatch(self.desc.size, self.received, f"layer {self.desc.digest}")
        if self.compressed is not None:
            self.compressed.update(data)
        self.decompressor.feed(data)

    def _tar_bytes(self, piece: memoryview) -> None:
        self.unpacked += len(piece)
        if self.unpacked > self.limits.max_unpacked:
            raise InvalidLayer(
                f"layer {self.desc.digest} unpacks to more than {self.limits.max_unpacked:,} bytes "
                "(unpack limit max_unpacked)"
            )
        self.uncompressed.update(piece)
        if not self.tar.ended:
            self.tar.feed(piece)

    def finish(self) -> Applied:
        """Check everything (see the module docstring) and set the directories' times; raises DigestMismatch,
        SizeMismatch or InvalidLayer."""
        if self.received != self.desc.size:
            raise SizeMismatch(self.desc.size, self.received, f"layer {self.desc.digest}")
        if self.compressed is not None and self.compressed.hexdigest() != self.desc.digest.hex:
            actual = f"{self.desc.digest.algorithm}:{self.compressed.hexdigest()}"
            raise DigestMismatch(str(self.desc.digest), actual)
        self.decompressor.close()
        diff_id = f"sha256:{self.uncompressed.hexdigest()}"
        if diff_id != self.diff_id:
            raise DigestMismatch(self.diff_id, diff_id, f"layer {self.desc.digest}'s uncompressed (diff ID)")
        self.tar.close()
        self.applier.finish()
        return Applied(diff_id, self.unpacked, self.tar.entries)

    def close(self) -> None:
        """Release descriptors (after :meth:`finish`, or when giving up)."""
        self.applier.close()
        self.root.close()
