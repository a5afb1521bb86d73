"""Which bytes of a blob to fetch, in which pieces.

A blob is split into chunks of ``chunk_size`` bytes over the ranges not yet done; when nothing is left to hand
out, the largest range still streaming is split in two (:func:`split_for_tail`), so the last seconds of a blob
do not wait on one slow connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MIB = 1024 * 1024
SPLIT_ALIGN = 64 * 1024


class RangeSet:
    """Disjoint, sorted half-open byte ranges ``[start, end)``."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()):
        self._ranges: list[list[int]] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        merged: list[list[int]] = []
        placed = False
        for r in self._ranges:
            if r[1] < start:
                merged.append(r)
            elif r[0] > end:
                if not placed:
                    merged.append([start, end])
                    placed = True
                merged.append(r)
            else:
                start, end = min(start, r[0]), max(end, r[1])
        if not placed:
            merged.append([start, end])
        self._ranges = merged

    def prefix_end(self) -> int:
        """End of the contiguous range starting at 0 (0 if byte 0 is not done)."""
        return self._ranges[0][1] if self._ranges and self._ranges[0][0] == 0 else 0

    def total(self) -> int:
        return sum(e - s for s, e in self._ranges)

    def missing(self, size: int) -> Iterator[tuple[int, int]]:
        pos = 0
        for s, e in self._ranges:
            if s > pos:
                yield pos, min(s, size)
            pos = max(pos, e)
        if pos < size:
            yield pos, size

    def as_list(self) -> list[list[int]]:
        return [list(r) for r in self._ranges]

    def __len__(self) -> int:
        return len(self._ranges)


@dataclass(eq=False, slots=True)
class Chunk:
    """One ranged request in flight: bytes ``[pos, end)`` remain; ``end`` may be lowered by a tail split."""

    start: int
    end: int
    pos: int = -1
    streaming: bool = False

    def __post_init__(self) -> None:
        if self.pos < 0:
            self.pos = self.start

    @property
    def remaining(self) -> int:
        return max(0, self.end - self.pos)


def plan_chunks(missing: Iterable[tuple[int, int]], chunk_size: int) -> list[Chunk]:
    """Split the missing ranges into chunks of at most ``chunk_size`` bytes, in file order."""
    out = []
    for start, end in missing:
        for s in range(start, end, chunk_size):
            out.append(Chunk(s, min(s + chunk_size, end)))
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
    victim.end = mid
    return tail
