"""A tar reader fed with bytes as they arrive, reading headers as Go's ``archive/tar`` does.

containerd applies layers with Go's reader, so ours follows it where Python's ``tarfile`` does not: PAX global
headers are entries of their own (never merged into later ones), a GNU long name overrides a PAX path, PAX times
keep their nanoseconds, a zero block followed by anything but a second zero block or the end is an error, and an
entry's data is read only for types that have some. It is push-driven (:meth:`TarReader.feed` takes whatever
bytes came next, of any length), so an entry's data goes to the file it fills straight from the decompressor's
output, and each header or extended record is bounded before it is held in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import InvalidLayer

BLOCK = 512
XATTR_PREFIX = "SCHILY.xattr."
MAX_SPECIAL = 1 << 20  # a PAX record block or GNU long name, as Go's archive/tar bounds them
HEADER_ONLY = frozenset("123456")  # hard link, symlink, char, block, directory, fifo: no data, whatever size says
_LOW_BYTES = bytes(range(128))  # deleted to count the bytes a signed checksum counts negative
MAX_TIME_NS = (1 << 63) - 1  # Go's time.Unix(0, 1<<63-1): times past it, or before 1970, become 0 (boundTime)


@dataclass(slots=True)
class Entry:
    """One tar entry as Go's reader returns it (after PAX records and GNU long names are merged)."""

    name: str
    typeflag: str  # one character: "0" file, "1" hard link, "2" symlink, "3" char, "4" block, "5" dir, ...
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)

    def xattrs(self) -> dict[str, str]:
        """Its ``SCHILY.xattr.*`` PAX records, by attribute name (the only ones containerd applies)."""
        return {k[len(XATTR_PREFIX) :]: v for k, v in self.pax.items() if k.startswith(XATTR_PREFIX)}


class EntrySink:
    """Where a :class:`TarReader` sends what it reads: each entry, then its data in pieces, then its end."""

    def begin(self, entry: Entry) -> None: ...

    def data(self, piece: memoryview) -> None: ...

    def end(self) -> None: ...


def _string(b: bytes | memoryview) -> str:
    b = bytes(b)
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _numeric(b: bytes | memoryview) -> int:
    """A numeric header field: base-256 when its top bit is set, else octal (spaces and NULs trimmed)."""
    b = bytes(b)
    if b and b[0] & 0x80:
        value = int.from_bytes(bytes([b[0] & 0x7F]) + b[1:], "big")
        if b[0] & 0x40:  # two's complement: negative
            value -= 1 << (8 * len(b) - 1)
        return value
    text = b.strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise InvalidLayer("invalid tar header (a numeric field is not a number)") from None


def _pax_time(text: str) -> int:
    """A PAX time (``sec[.frac]``) in nanoseconds, the fraction truncated to 9 digits."""
    sec, _, frac = text.partition(".")
    sign = -1 if sec.startswith("-") else 1
    digits = sec.lstrip("-")
    if not digits.isdigit() or (frac and not frac.isdigit()):
        raise InvalidLayer(f"invalid tar header (PAX time {text[:40]!r})")
    return sign * (int(digits) * 1_000_000_000 + int((frac + "000000000")[:9]))


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse ``"%d %s=%s\\n"`` records, strictly as Go does."""
    records: dict[str, str] = {}
    while data:
        length_text, sep, _ = data.partition(b" ")
        if not sep or not length_text.isdigit():
            raise InvalidLayer("invalid tar header (a PAX record has no length)")
        length = int(length_text)
        if length <= len(length_text) + 1 or length > len(data) or data[length - 1 : length] != b"\n":
            raise InvalidLayer("invalid tar header (a PAX record's length is wrong)")
        record = data[len(length_text) + 1 : length - 1]
        data = data[length:]
        key, eq, value = record.partition(b"=")
        if not eq or not key:
            raise InvalidLayer("invalid tar header (a PAX record has no key)")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return records


def bound_time(ns: int) -> int:
    return 0 if ns < 0 or ns > MAX_TIME_NS else ns


class TarReader:
    """Feed it a tar stream in order (:meth:`feed`, any piece sizes), then :meth:`close`; it calls the sink."""

    def __init__(self, sink: EntrySink, max_entries: int, max_name: int):
        self.sink = sink
        self.max_entries = max_entries
        self.max_name = max_name
        self.entries = 0
        self.ended = False  # the end-of-archive marker was read: later bytes are only hashed upstream
        self._buf = bytearray()  # an incomplete header or special block
        self._need = BLOCK  # bytes wanted in _buf before _step runs
        self._step: Callable[[bytes], None] = self._header
        self._data_left = 0  # bytes of the current entry's data still to pass on
        self._skip = 0  # padding still to drop
        self._padding = 0  # padding after the current entry's data
        self._zero_seen = False
        self._pax: dict[str, str] = {}
        self._long_name: str | None = None
        self._long_link: str | None = None
        self._special: tuple[str, int] | None = None  # (typeflag, size) of the extended header being read
        self._pending: Entry | None = None  # a global header's entry, while its records are read

    def feed(self, data: memoryview) -> None:
        pos, n = 0, len(data)
        while pos < n and not self.ended:
            if self._skip:
                k = min(self._skip, n - pos)
                self._skip -= k
                pos += k
            elif self._data_left:
                k = min(self._data_left, n - pos)
                self.sink.data(data[pos : pos + k])
                self._data_left -= k
                pos += k
                if not self._data_left:
                    self._skip = self._padding
                    self.sink.end()
            else:
                k = min(self._need - len(self._buf), n - pos)
                self._buf += data[pos : pos + k]
                pos += k
                if len(self._buf) == self._need:
                    block = bytes(self._buf)
                    self._buf.clear()
                    self._step(block)

    def close(self) -> None:
        """The stream ended: it must end at a header boundary (Go accepts no marker, or one or two zero blocks)."""
        if self.ended:
            return
        if self._buf or self._skip or self._data_left or self._step != self._header or self._special:
            raise InvalidLayer("the layer's tar ends in the middle of an entry (unexpected EOF)")

    def _header(self, block: bytes) -> None:
        if block == bytes(BLOCK):
            if self._zero_seen:
                self.ended = True
            self._zero_seen = True
            return
        if self._zero_seen:
            raise InvalidLayer("invalid tar header (a zero block followed by a non-zero block)")
        self._check_sum(block)
        typeflag = chr(block[156]) if block[156] else "\0"
        size = _numeric(block[124:136])
        if size < 0:
            raise InvalidLayer("invalid tar header (a negative size)")
        if typeflag in "xLKg" and size > MAX_SPECIAL:
            raise InvalidLayer("archive/tar: header field too long (an extended header over 1 MiB)")
        if typeflag in "xLK":
            self._read_special(typeflag, size, self._extended)
            return
        entry = self._entry(block, typeflag, size)
        if typeflag == "g":
            self._pending = entry
            self._read_special(typeflag, size, self._global)
            return
        self._emit(entry, 0 if entry.typeflag in HEADER_ONLY else entry.size)

    def _read_special(self, typeflag: str, size: int, then: Callable[[bytes], None]) -> None:
        """Gather the ``size`` bytes of an extended header (PAX records, a GNU long name), then call ``then``."""
        self._special = (typeflag, size)
        self._need = size
        self._step = then
        if size == 0:
            then(b"")

    def _extended(self, data: bytes) -> None:
        assert self._special is not None
        typeflag, size = self._special
        self._special = None
        self._need, self._step = BLOCK, self._header
        self._skip = -size % BLOCK
        if typeflag == "x":
            self._pax = _pax_records(data)  # a later one replaces an earlier one, as in Go
        elif typeflag == "L":
            self._long_name = _string(data)
        else:
            self._long_link = _string(data)

    def _global(self, data: bytes) -> None:
        """A PAX global header: an entry of its own, with its records, not merged into later entries."""
        assert self._special is not None
        _, size = self._special
        self._special = None
        self._need, self._step = BLOCK, self._header
        entry = self._pending
        assert entry is not None
        entry.pax = _pax_records(data)
        self._skip = -size % BLOCK
        self._count(entry)
        self.sink.begin(entry)
        self.sink.end()

    def _emit(self, entry: Entry, data_size: int) -> None:
        self._count(entry)
        self.sink.begin(entry)
        self._data_left = data_size
        self._padding = -data_size % BLOCK  # skipped after the data
        if not data_size:
            self.sink.end()

    def _count(self, entry: Entry) -> None:
        self.entries += 1
        if self.entries > self.max_entries:
            raise InvalidLayer(f"the layer has more than {self.max_entries:,} entries (unpack limit max_entries)")
        if len(entry.name.encode("utf-8", "surrogateescape")) > self.max_name:
            raise InvalidLayer(f"an entry's name is longer than {self.max_name} bytes")

    @staticmethod
    def _check_sum(block: bytes) -> None:
        stored = _numeric(block[148:156])
        blanked = block[:148] + b" " * 8 + block[156:]
        unsigned = sum(blanked)
        if stored != unsigned and stored != unsigned - 256 * len(blanked.translate(None, _LOW_BYTES)):
            raise InvalidLayer("invalid tar header (checksum)")

    def _entry(self, block: bytes, typeflag: str, size: int) -> Entry:
        magic, version, trailer = block[257:263], block[263:265], block[508:512]
        entry = Entry(
            name=_string(block[0:100]),
            typeflag=typeflag,
            mode=_numeric(block[100:108]),
            uid=_numeric(block[108:116]),
            gid=_numeric(block[116:124]),
            size=size,
            mtime_ns=_numeric(block[136:148]) * 1_000_000_000,
            linkname=_string(block[157:257]),
        )
        if magic in (b"ustar\0", b"ustar "):
            entry.devmajor = _numeric(block[329:337])
            entry.devminor = _numeric(block[337:345])
            prefix = ""
            if magic == b"ustar\0" and trailer == b"tar\0":  # STAR
                prefix = _string(block[345:476])
                entry.atime_ns = _numeric(block[476:488]) * 1_000_000_000
            elif magic == b"ustar\0":
                prefix = _string(block[345:500])
            elif version == b" \0" and block[345]:  # GNU, with an access time
                entry.atime_ns = _numeric(block[345:357]) * 1_000_000_000
            if prefix:
                entry.name = f"{prefix}/{entry.name}"
        pax, self._pax = self._pax, {}
        if typeflag == "g":
            return entry
        self._merge(entry, pax)
        if self._long_name is not None:
            entry.name, self._long_name = self._long_name, None
        if self._long_link is not None:
            entry.linkname, self._long_link = self._long_link, None
        if typeflag == "\0":
            entry.typeflag = "5" if entry.name.endswith("/") else "0"
        return entry

    @staticmethod
    def _merge(entry: Entry, pax: dict[str, str]) -> None:
        """Go's mergePAX: known keys replace header fields (an empty value keeps the field)."""
        entry.pax = pax
        for key, value in pax.items():
            if not value:
                continue
            if key == "path":
                entry.name = value
            elif key == "linkpath":
                entry.linkname = value
            elif key in ("uid", "gid", "size"):
                try:
                    number = int(value, 10)
                except ValueError:
                    raise InvalidLayer(f"invalid tar header (PAX {key} {value[:40]!r})") from None
                if key == "size" and number < 0:
                    raise InvalidLayer("invalid tar header (a negative size)")
                setattr(entry, key, number)
            elif key == "mtime":
                entry.mtime_ns = _pax_time(value)
            elif key == "atime":
                entry.atime_ns = _pax_time(value)
            elif key.startswith("GNU.sparse."):
                raise InvalidLayer(f"{entry.name!r} is a sparse file (PAX GNU.sparse): not supported")
