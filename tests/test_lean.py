"""The lean range client (puller/registry/lean.py) against a scripted HTTP/1.1 server on loopback: what it takes,
what it refuses, how it reuses connections, and that every wait is bounded. The engine's use of it is covered by
every pull through the CDN rig (the registry redirects blob GETs to nginx) and by test_hostile.py."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from puller.errors import TransportError
from puller.registry.bodies import SlowTransfer, SpeedLimit
from puller.registry.http import ConnectionFailed, Timeouts, TLSNotTrusted
from puller.registry.lean import BLOCK, Cut, LeanRanges, Lent, NotPartial

from .rig import ScriptedServer

BLOB = random.Random(7).randbytes(3 * BLOCK + 1234)
Answer = Callable[[int, int], list[bytes]]  # (start, end) -> the pieces to send, in order


def partial(start: int, end: int, extra: str = "", length: int | None = None, crange: str | None = None) -> bytes:
    n = end - start if length is None else length
    crange = crange or f"bytes {start}-{end - 1}/{len(BLOB)}"
    return f"HTTP/1.1 206 Partial Content\r\nContent-Length: {n}\r\nContent-Range: {crange}\r\n{extra}\r\n".encode()


def ranged(start: int, end: int) -> list[bytes]:
    return [partial(start, end), BLOB[start:end]]


class Server(ScriptedServer):
    """Answers each request with ``answer(start, end)``, ``delay`` seconds between pieces; ``close_after``
    closes a connection once it has sent that many answers; ``drop_after`` closes it when the request after that
    many answers arrives (a kept-alive connection the server let go)."""

    def __init__(
        self,
        answer: Answer = ranged,
        close_after: int = 0,
        drop_after: int = 0,
        delay: float = 0.0,
        tls: Path | None = None,
    ):
        super().__init__(tls)
        self.answer, self.close_after, self.drop_after, self.delay = answer, close_after, drop_after, delay
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"{self.base}/blob?sig=abc"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                text = head.decode()
                self.requests.append(text)
                if self.drop_after and answered == self.drop_after:
                    break  # the request arrived on a connection the server had let idle: closed unanswered
                spec = next(x for x in text.split("\r\n") if x.startswith("Range: bytes="))[len("Range: bytes=") :]
                first, last = spec.split("-")
                for piece in self.answer(int(first), int(last) + 1):
                    writer.write(piece)
                    await writer.drain()
                    if self.delay:
                        await asyncio.sleep(self.delay)
                answered += 1
                if answered == self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def client(ssl_for=lambda url: True, speed: SpeedLimit | None = None, read_s: float = 5.0) -> LeanRanges:
    return LeanRanges(ssl_for, Timeouts(connect_s=5, headers_s=2, read_s=read_s))


async def fetch(lean: LeanRanges, url: str, start: int, end: int, speed: SpeedLimit | None = None) -> bytes:
    got = bytearray(end - start)
    seen: list[int] = []

    async def deliver(offset: int, block: memoryview, lent: Lent) -> bool:
        seen.append(offset)
        got[offset - start : offset - start + len(block)] = block  # the buffer is ours only until we return
        return True

    await lean.get(url, start, end, deliver, (speed or SpeedLimit()).guard("test"))
    assert seen == sorted(seen)  # in order
    return bytes(got)


async def test_ranges_arrive_whole_in_order_over_one_kept_alive_connection():
    async with Server() as server, client() as lean:
        assert await fetch(lean, server.url, 0, len(BLOB)) == BLOB
        assert await fetch(lean, server.url, 100, 2 * BLOCK + 7) == BLOB[100 : 2 * BLOCK + 7]
        pooled = list(lean._idle)
        assert len(pooled) == 1 and not pooled[0]._arrays  # kept for the next range, without its buffers
    assert server.connections == 1
    assert "GET /blob?sig=abc HTTP/1.1" in server.requests[0] and "Accept-Encoding: identity" in server.requests[0]


async def test_a_buffer_the_caller_takes_is_never_written_again_and_comes_back_to_the_pool():
    """A caller that keeps delivered blocks (the containerd store sends them on uncopied) finds them intact after
    the connection went on; buffers it gives back are the ones later requests receive into."""
    kept: list[tuple[int, memoryview, Lent]] = []

    async def take(offset: int, block: memoryview, lent: Lent) -> bool:
        lent.take()
        kept.append((offset, block, lent))
        return True

    async with Server() as server, client() as lean:
        await lean.get(server.url, 0, len(BLOB), take, SpeedLimit().guard("test"))
        assert len(kept) >= 3
        assert b"".join(block for _, block, _ in kept) == BLOB
        assert all(block.obj is lent.buffer for _, block, lent in kept)
        given = {id(lent.buffer) for _, _, lent in kept}
        for _, _, lent in kept:
            lent.give_back()
        kept.clear()
        await lean.get(server.url, 0, len(BLOB), take, SpeedLimit().guard("test"))
        assert b"".join(block for _, block, _ in kept) == BLOB
        assert {id(lent.buffer) for _, _, lent in kept} & given  # received into buffers given back


def in_pieces(start: int, end: int) -> list[bytes]:
    body = BLOB[start:end]
    return [partial(start, end), *(body[i : i + 65536] for i in range(0, len(body), 65536))]


async def test_a_request_cut_short_receives_up_to_the_cut_and_no_further():
    """A tail split lowers a range's end while its answer streams: the client stops receiving at the cut (the
    last block ends there, nothing past it is delivered), the request ends without an error, and the connection,
    whose answer was not read to its end, is not reused. A cut before the head applies once it comes; a cut past
    the end changes nothing."""
    start, end = 10, 3 * BLOCK
    cut_end = start + BLOCK + 100_000
    async with Server(in_pieces, delay=0.002) as server, client() as lean:
        cut, blocks = Cut(), []

        async def deliver(offset: int, block: memoryview, lent: Lent) -> bool:
            blocks.append((offset, bytes(block)))
            if len(blocks) == 1:
                cut.at(cut_end)  # while the second block is on its way
            return True

        await lean.get(server.url, start, end, deliver, SpeedLimit().guard("test"), cut)
        assert blocks[-1][0] + len(blocks[-1][1]) == cut_end  # the last block ends at the cut
        assert b"".join(b for _, b in blocks) == BLOB[start:cut_end]
        assert not list(lean._idle)  # not reused: the rest of its answer was never read

        early, got = Cut(), []
        early.at(start + 1000)  # before the request has a connection

        async def collect(offset: int, block: memoryview, lent: Lent) -> bool:
            got.append(bytes(block))
            return True

        await lean.get(server.url, start, end, collect, SpeedLimit().guard("test"), early)
        assert b"".join(got) == BLOB[start : start + 1000]

        late, got = Cut(), []
        late.at(end + 5)
        await lean.get(server.url, start, end, collect, SpeedLimit().guard("test"), late)
        assert b"".join(got) == BLOB[start:end] and len(list(lean._idle)) == 1  # whole, and kept


async def test_a_head_split_into_single_bytes_is_read():
    def trickled_head(start: int, end: int) -> list[bytes]:
        head = partial(start, end)
        return [*(head[i : i + 1] for i in range(len(head))), BLOB[start:end]]

    async with Server(trickled_head) as server, client() as lean:
        assert await fetch(lean, server.url, 5, BLOCK + 5) == BLOB[5 : BLOCK + 5]


@pytest.mark.parametrize("status", [200, 403, 500])
async def test_any_answer_but_206_is_not_partial_before_a_byte_is_taken(status: int):
    def answer(start: int, end: int) -> list[bytes]:
        return [f"HTTP/1.1 {status} X\r\nContent-Length: {len(BLOB)}\r\n\r\n".encode(), BLOB]

    async with Server(answer) as server, client() as lean:
        with pytest.raises(NotPartial) as e:
            await fetch(lean, server.url, 0, 100)
        assert e.value.status == status


@pytest.mark.parametrize(
    "head",
    [
        partial(0, 100, crange=f"bytes 1-100/{len(BLOB)}"),  # another range
        partial(0, 100, length=99),  # a length that is not the range's
        partial(0, 100, extra="Transfer-Encoding: chunked\r\n"),
        partial(0, 100, extra="Content-Encoding: gzip\r\n"),
        partial(0, 100, extra="Content-Length: 7\r\n"),  # said twice, differently
        b"HTTP/1.1 206\r\nbad header line\r\n\r\n",
        b"ICY 206 OK\r\n\r\n",
    ],
)
async def test_a_malformed_or_encoded_answer_is_a_transport_error(head: bytes):
    async with Server(lambda s, e: [head, BLOB[s:e]]) as server, client() as lean:
        with pytest.raises(TransportError):
            await fetch(lean, server.url, 0, 100)


async def test_a_body_cut_short_is_a_transport_error():
    async with Server(lambda s, e: [partial(s, e), BLOB[s : e - 10]], close_after=1) as server, client() as lean:
        with pytest.raises(TransportError, match="mid-answer"):
            await fetch(lean, server.url, 0, BLOCK)


async def test_an_idle_connection_the_server_closed_is_replaced():
    async with Server(drop_after=1) as server, client() as lean:
        assert await fetch(lean, server.url, 0, 1000) == BLOB[:1000]
        await asyncio.sleep(0.1)
        assert await fetch(lean, server.url, 1000, 2000) == BLOB[1000:2000]
    assert server.connections == 2


async def test_a_range_cut_short_by_the_caller_does_not_reuse_its_connection():
    async with Server() as server, client() as lean:

        async def first_block_only(offset: int, block: memoryview, lent: Lent) -> bool:
            return False

        await lean.get(server.url, 0, len(BLOB), first_block_only, SpeedLimit().guard("test"))
        assert await fetch(lean, server.url, 0, 10) == BLOB[:10]
    assert server.connections == 2


async def test_a_server_that_never_answers_times_out():
    async with Server(lambda s, e: [b"HTTP/1.1 2"], delay=10) as server, client() as lean:
        with pytest.raises(TransportError, match="timed out"):
            await asyncio.wait_for(fetch(lean, server.url, 0, 100), 10)


async def test_a_trickling_server_is_dropped_by_the_low_speed_limit():
    def trickle(start: int, end: int) -> list[bytes]:
        return [partial(start, end), *(BLOB[i : i + 1] for i in range(start, end))]

    slow = SpeedLimit(bytes_per_s=1000, window_s=0.5)
    async with Server(trickle, delay=0.05) as server, client(read_s=0.3) as lean:
        with pytest.raises(SlowTransfer):
            await asyncio.wait_for(fetch(lean, server.url, 0, 1000, speed=slow), 10)


async def test_tls_ranges_are_received_into_the_same_buffers(tmp_path: Path):
    async with Server(tls=tmp_path) as server:
        trusted = ssl.create_default_context(cafile=str(server.ca))
        async with client(ssl_for=lambda url: trusted) as lean:
            assert await fetch(lean, server.url, 0, len(BLOB)) == BLOB
        async with client(ssl_for=lambda url: True) as untrusted:  # the system's CAs: refused, as http.py says it
            with pytest.raises(TLSNotTrusted, match=r"127\.0\.0\.1:\d+: TLS certificate not trusted"):
                await fetch(untrusted, server.url, 0, 10)


async def test_a_refused_connection_is_a_transport_error_naming_the_host():
    async with Server() as server:
        url = server.url
    async with client() as lean:  # the server is gone: its port refuses
        with pytest.raises(ConnectionFailed, match=r"127\.0\.0\.1:\d+: "):
            await fetch(lean, url, 0, 10)
