"""Which bytes of a blob to fetch, in which pieces.

A blob is split into chunks of ``chunk_size`` bytes over the ranges not yet done, shrinking toward its end
(:func:`plan_chunks`); when nothing is left to hand out, the largest range still streaming is split in two
(:func:`split_for_tail`), so the last seconds of a blob do not wait on one slow connection. The rest of a stalled
range is taken over (:func:`take_stalled`), the lowest first: the contiguous prefix, and with it the hash and a
store that takes bytes in order, waits for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

MIB = 1024 * 1024
SPLIT_ALIGN = 64 * 1024


@dataclass(eq=False, slots=True)
class Chunk:
    """One ranged request in flight: bytes ``[pos, end)`` remain; ``end`` may be lowered by a tail split."""

    start: int
    end: int
    pos: int = -1
    streaming: bool = False
    mark: int = 0  # the blob's received bytes when this chunk last received some (or started streaming)
    heard_at: float = 0.0  # when that was (time.monotonic)
    writing: bool = False  # its bytes are being handed to the store: not stalled, not to be taken over
    request_cut: Callable[[int], None] | None = None  # tells its request in flight to end early (see cut)
    request_received: Callable[[], int | None] | None = None  # how far its request has received (see received_to)

    def __post_init__(self) -> None:
        if self.pos < 0:
            self.pos = self.start

    def heard(self, received: int) -> None:
        """The chunk received bytes (or started streaming) when the blob had received ``received``."""
        self.mark, self.heard_at = received, time.monotonic()

    def cut(self, end: int) -> None:
        """Lower the chunk's end (a tail split or a takeover), and tell its request: it stops receiving there
        instead of receiving bytes past the cut that nobody will use."""
        self.end = end
        if self.request_cut is not None:
            self.request_cut(end)

    def received_to(self) -> int:
        """How far the chunk's request has received bytes, handed over yet or not (at least ``pos``)."""
        got = self.request_received() if self.request_received is not None else None
        return self.pos if got is None else max(self.pos, min(got, self.end))

    @property
    def remaining(self) -> int:
        return max(0, self.end - self.pos)


def aligned_share(total: int, parts: int) -> int:
    """``total / parts``, rounded up to a multiple of SPLIT_ALIGN."""
    share = -(-total // parts)
    return share + -share % SPLIT_ALIGN


def plan_chunks(missing: Iterable[tuple[int, int]], chunk_size: int, spread: int = 0, least: int = 0) -> list[Chunk]:
    """Split the missing ranges into chunks of at most ``chunk_size`` bytes, in file order. With ``spread``, the
    chunks shrink toward the end, to no less than ``least``: each is at most 1/``spread`` of the bytes from its
    start on. The ranges in flight at the end then span little of the blob, and so do the bytes written beyond the
    last of them to complete, which the hash has to read back after the last byte has come."""
    ranges = list(missing)
    left = sum(end - start for start, end in ranges)
    out = []
    for start, end in ranges:
        s = start
        while s < end:
            size = chunk_size
            if spread:
                size = min(chunk_size, max(least, aligned_share(left, spread)))
            e = min(s + size, end)
            out.append(Chunk(s, e))
            left -= e - s
            s = e
    return out


def split_for_tail(inflight: Iterable[Chunk], min_split: int) -> Chunk | None:
    """Take the second half of the streaming chunk with the most bytes left, if it is worth a new request."""
    candidates = [c for c in inflight if c.streaming]
    if not candidates:
        return None
    victim = max(candidates, key=lambda c: c.remaining)
    if victim.remaining < 2 * min_split:
        return None
    mid = victim.pos + victim.remaining // 2
    mid -= mid % SPLIT_ALIGN
    if mid <= victim.pos or victim.end - mid < min_split:
        return None
    tail = Chunk(mid, victim.end)
    victim.cut(mid)
    return tail


def streaming_chunks(inflight: Iterable[Chunk]) -> list[Chunk]:
    """The chunks receiving now that still want bytes: those a stall can be found among."""
    return [c for c in inflight if c.streaming and c.remaining > 0]


def take_stalled(
    inflight: Iterable[Chunk], received: int, patience: int | None, silence: float, now: float | None = None
) -> tuple[Chunk, Chunk] | None:
    """The lowest streaming chunk that has stalled, and the rest of it, taken over. A chunk has stalled when for
    ``silence`` seconds or more it has received nothing while the blob received ``patience`` bytes per other
    streaming chunk (at least ``patience``; ``received``: the blob's bytes so far): a stalled or starved
    connection, say a TCP flow backing off after losses, or one that lost out to the others at a shared link. The
    stalled chunk then ends where it is. Bytes alone would misjudge a request just sent while short chunks complete
    in a burst from full socket buffers (loopback, many small layers); time alone, a slow link. ``patience`` None:
    time alone (where the others are held back, so that no bytes can tell). The rest starts where the stalled
    request has received to: the bytes it holds (up to a block, received but not yet handed over) are kept.

    Not only the front: two starved ranges side by side would otherwise be taken over one after the other, the
    second only once the first's new request is done, and the contiguous prefix (with it the hash) waits on both."""
    streaming = streaming_chunks(inflight)
    at = time.monotonic() if now is None else now
    enough = None if patience is None else patience * max(1, len(streaming) - 1)
    for chunk in sorted(streaming, key=lambda c: c.pos):
        if chunk.writing or (enough is not None and received - chunk.mark <= enough) or at - chunk.heard_at < silence:
            continue
        handed_over = chunk.received_to()  # what it has received it hands over before it ends
        if handed_over >= chunk.end:
            continue  # taken over already: it is handing over its last bytes
        rest = Chunk(handed_over, chunk.end)
        chunk.cut(handed_over)
        return chunk, rest
    return None
