"""A layer's compressed bytes, fed in order, out as its tar stream in bounded pieces.

The format is told by the first bytes, as containerd's ``DecompressStream`` does for every compressed layer media
type: gzip (``1f 8b 08``) through ISA-L (``isal``: the fastest inflate Python has, the library behind the
``igzip`` containerd runs where it is installed), zstd (``28 b5 2f fd`` or a skippable frame) through
``zstandard``, anything else as it is. An OCI ``...tar`` layer is passed through without looking. gzip members
may follow one another; bytes after the last that are not a gzip member are an error, as in Go. No call
produces more than PIECE bytes at once, whatever the compression ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any, cast

import zstandard
from isal import isal_zlib

from ..errors import InvalidLayer

PIECE = 1 << 20  # most decompressed bytes handed on at once
SNIFF = 10  # bytes looked at to tell the format (as containerd peeks 10)
GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_MAX_WINDOW = 1 << 29  # 512 MiB, the largest window klauspost's decoder (containerd's) accepts
UNCOMPRESSED_TYPES = frozenset(
    {"application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.nondistributable.v1.tar"}
)

Sink = Callable[[memoryview], None]
GZIP_ERRORS: tuple[type[Exception], ...] = (cast(type[Exception], isal_zlib.error), ValueError)


def _is_zstd(head: bytes) -> bool:
    if head.startswith(ZSTD_MAGIC):
        return True
    return len(head) >= 8 and int.from_bytes(head[:4], "little") & 0xFFFFFFF0 == 0x184D2A50  # a skippable frame


class Decompressor:
    """``feed`` compressed bytes in order, then ``close``; the decompressed stream goes to ``sink``. Nothing fed is
    kept past ``feed`` (the caller may reuse its buffer); the sink may be handed views of it (uncompressed layers)."""

    def __init__(self, media_type: str, sink: Sink):
        self.sink = sink
        self.kind = "tar" if media_type in UNCOMPRESSED_TYPES else ""  # "" until sniffed
        self._head = b""
        self._gzip: Any = None  # isal's decompress object of the current gzip member
        self._zstd: zstandard.ZstdDecompressionWriter | None = None

    def feed(self, data: bytes | memoryview) -> None:
        if not self.kind:
            self._head += bytes(data)
            if len(self._head) < SNIFF:
                return
            self._start()
            data, self._head = self._head, b""
        self._feed(data)

    def close(self) -> None:
        if not self.kind:
            if self._head:
                self._start()
                self._feed(self._head)
            else:
                self.kind = "tar"  # an empty blob is an empty layer
        if self.kind == "gzip":
            d = self._gzip
            if d is not None and not d.eof:
                raise InvalidLayer("the layer's gzip stream ends early (unexpected EOF)")
        elif self.kind == "zstd":
            assert self._zstd is not None
            try:
                self._zstd.flush()
            except zstandard.ZstdError as e:
                raise InvalidLayer(f"the layer's zstd stream is broken: {e}") from None

    def _start(self) -> None:
        head = self._head
        if head.startswith(GZIP_MAGIC):
            self.kind = "gzip"
            self._gzip = isal_zlib.decompressobj(31)
        elif _is_zstd(head):
            self.kind = "zstd"
            writer = _SinkWriter(self.sink)
            dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
            self._zstd = dctx.stream_writer(cast(IO[bytes], writer), write_size=PIECE, write_return_read=True)
        else:
            self.kind = "tar"

    def _feed(self, data: bytes | memoryview) -> None:
        if self.kind == "tar":
            view = memoryview(data)
            for i in range(0, len(view), PIECE):
                self.sink(view[i : i + PIECE])
        elif self.kind == "gzip":
            self._inflate(data)
        else:
            assert self._zstd is not None
            try:
                self._zstd.write(data)
            except zstandard.ZstdError as e:
                raise InvalidLayer(f"the layer's zstd stream is broken: {e}") from None

    def _inflate(self, data: bytes | memoryview) -> None:
        d = self._gzip
        try:
            while data:
                if d.eof:
                    d = self._gzip = isal_zlib.decompressobj(31)  # the next gzip member
                out = d.decompress(data, PIECE)
                if out:
                    self.sink(memoryview(out))
                data = d.unconsumed_tail or (d.unused_data if d.eof else b"")
        except GZIP_ERRORS as e:
            raise InvalidLayer(f"the layer's gzip stream is broken: {e}") from None


class _SinkWriter:
    """zstandard's stream_writer writes its output here, at most PIECE bytes at a time."""

    def __init__(self, sink: Sink):
        self.sink = sink

    def write(self, data: bytes) -> int:
        self.sink(memoryview(data))
        return len(data)
