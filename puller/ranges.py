"""Sets of byte ranges: which bytes of a blob are done."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


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

    def copy(self) -> RangeSet:
        out = RangeSet()
        out._ranges = [list(r) for r in self._ranges]
        return out

    def as_list(self) -> list[list[int]]:
        return [list(r) for r in self._ranges]

    def __len__(self) -> int:
        return len(self._ranges)
