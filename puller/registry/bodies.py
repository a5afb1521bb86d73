"""Reading response bodies from servers that may trickle, stop early, or encode what they send.

- Every body is read to its end (or to a cap), never in one ``read`` that returns whatever the first TCP segment
  held: a token answer sent in two writes is one JSON document.
- puller asks for ``Accept-Encoding: identity`` (its session default). A small body (manifest, token, error) that
  comes gzip- or deflate-encoded anyway is decoded, bounded by the same cap; any other encoding is refused.
- A low-speed limit, as curl's ``--speed-limit``/``--speed-time``: when a request has spent ``window_s`` seconds
  waiting on the server and received less than ``bytes_per_s`` per second of that wait, it is dropped
  (:class:`SlowTransfer`, a transport error: retried, or handed to the next host). Only time spent waiting on the
  server counts, so puller's own pauses (bandwidth cap, a store catching up) never look like a slow server.
"""

from __future__ import annotations

import time
import zlib
from typing import TYPE_CHECKING, NamedTuple

from ..errors import RegistryError, TransportError

if TYPE_CHECKING:
    from .http import Response

USER_AGENT = "puller/0.1"  # on every request
DEFAULT_LOW_SPEED_LIMIT = 1024  # bytes/s; see config/puller.yaml for why
DEFAULT_LOW_SPEED_TIME = 30.0  # seconds of waiting on the server per window
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class SlowTransfer(TransportError):
    """A server sent less than the low-speed limit for a whole window."""


class SpeedLimit(NamedTuple):
    bytes_per_s: int = DEFAULT_LOW_SPEED_LIMIT  # 0: no limit
    window_s: float = DEFAULT_LOW_SPEED_TIME

    def guard(self, what: str) -> SpeedGuard:
        return SpeedGuard(self, what)


class SpeedGuard:
    """Counts the bytes one response delivers against the time spent waiting for them."""

    __slots__ = ("got", "limit", "waited", "what")

    def __init__(self, limit: SpeedLimit, what: str):
        self.limit = limit
        self.what = what
        self.waited = 0.0
        self.got = 0

    async def readany(self, resp: Response) -> bytes:
        """The next bytes of the body (b"" at its end); raises :class:`SlowTransfer` when the window closes
        below the limit. One read is bounded by the session's read timeout, so a window closes within
        ``window_s`` plus that timeout."""
        t0 = time.monotonic()
        data = await resp.readany()
        self.account(time.monotonic() - t0, len(data))
        return data

    def account(self, waited: float, got: int) -> None:
        """``got`` bytes came after ``waited`` seconds of waiting on the server; raises :class:`SlowTransfer`
        when a window of ``window_s`` waiting closes below the limit."""
        self.waited += waited
        self.got += got
        if self.waited >= self.limit.window_s and self.limit.bytes_per_s:
            if self.got < self.limit.bytes_per_s * self.waited:
                rate = self.got / self.waited
                raise SlowTransfer(
                    f"{self.what}: {rate:,.0f} B/s over {self.waited:.0f} s, below the low-speed limit of "
                    f"{self.limit.bytes_per_s:,} B/s (low_speed_limit, low_speed_time)"
                )
            self.waited, self.got = 0.0, 0


async def read_body(resp: Response, cap: int, speed: SpeedLimit, what: str) -> bytes:
    """The whole (decoded) body of ``resp``; reading stops after ``cap + 1`` bytes, so a longer result means the
    body is over the cap (the caller decides what that means). Network errors propagate (ConnectionFailed)."""
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "", *_DECODERS):
        raise RegistryError(f"{what}: server sent Content-Encoding {encoding!r}, which puller did not ask for")
    decoder = zlib.decompressobj(_DECODERS[encoding]) if encoding in _DECODERS else None
    guard = speed.guard(what)
    out = bytearray()
    while len(out) <= cap:
        data = await guard.readany(resp)
        if not data:
            if decoder is not None and not decoder.eof:
                raise RegistryError(f"{what}: {encoding} body ended early")
            break
        if decoder is None:
            out += data
            continue
        try:
            out += decoder.decompress(data, cap + 1 - len(out))  # bounded: a small body cannot inflate without end
        except zlib.error as e:
            raise RegistryError(f"{what}: body is not valid {encoding}: {e}") from None
        if decoder.eof:
            break
    return bytes(out[: cap + 1])
