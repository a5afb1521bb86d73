"""The registry client's HTTP/1.1 pool (puller/registry/http.py) against a scripted server on loopback: bodies
as servers frame them, which connections are kept and which are not, and that every failure is one
ConnectionFailed with the host in it, within its bound. Every pull in the other suites goes through it too."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from puller.registry.bodies import SpeedLimit, read_body
from puller.registry.http import ConnectionFailed, HttpPool, Timeouts, TLSFailed, TLSNotTrusted

from .rig import ScriptedServer

Answer = Callable[[str], list[bytes]]  # request path -> the pieces to send ([] sends nothing; b"" closes)

FAST = Timeouts(connect_s=2.0, headers_s=1.0, read_s=1.0)


def ok(body: bytes, extra: str = "") -> list[bytes]:
    return [f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode(), body]


def chunked(*parts: bytes) -> list[bytes]:
    out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    out += [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts]
    return [*out, b"0\r\n\r\n"]


class Server(ScriptedServer):
    """Answers each request with ``answer(path)``; ``drop_after``: closes a connection when the request after
    that many answers arrives (a kept-alive connection the server let go)."""

    def __init__(self, answer: Answer, drop_after: int = 0, tls: Path | None = None, greet: bytes = b""):
        super().__init__(tls)
        self.answer, self.drop_after = answer, drop_after
        self.greet = greet  # sent as soon as a connection is made
        self.paths: list[str] = []
        self.bodies: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            if self.greet:
                await reader.read(1)
                writer.write(self.greet)
                return
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.drop_after and answered == self.drop_after:
                    return
                path = head.split(b" ")[1].decode()
                self.paths.append(path)
                length = next((int(h[15:]) for h in head.lower().split(b"\r\n") if h.startswith(b"content-length:")), 0)
                self.bodies.append(await reader.readexactly(length))
                pieces = self.answer(path)
                for piece in pieces:
                    if piece == b"":
                        return
                    writer.write(piece)
                    await writer.drain()
                if not pieces:
                    await asyncio.sleep(30)
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def pool(timeouts: Timeouts = FAST, verify: ssl.SSLContext | bool = True) -> HttpPool:
    return HttpPool(lambda url: verify, timeouts, {"User-Agent": "test"})


async def get_body(http: HttpPool, url: str) -> tuple[int, bytes]:
    async with await http.request("GET", url) as resp:
        return resp.status, await read_body(resp, 1 << 20, SpeedLimit(), "test")


async def test_framed_bodies_are_read_whole_and_connections_kept_when_they_can_be():
    answers = {
        "/length": ok(b"x" * 1000),
        "/chunked": chunked(b"abc", b"d" * 70000),
        "/close": [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"until", b" the end", b""],
    }
    async with Server(lambda path: answers[path]) as server, pool() as http:
        assert await get_body(http, server.base + "/length") == (200, b"x" * 1000)
        assert await get_body(http, server.base + "/chunked") == (200, b"abc" + b"d" * 70000)
        assert server.connections == 1  # kept alive across both
        assert await get_body(http, server.base + "/close") == (200, b"until the end")
        assert await get_body(http, server.base + "/length") == (200, b"x" * 1000)
        assert server.connections == 2  # a body framed by the close cannot keep its connection


async def test_a_kept_connection_the_server_let_go_is_replaced_without_an_error():
    async with Server(lambda path: ok(b"fine"), drop_after=1) as server, pool() as http:
        assert await get_body(http, server.base + "/a") == (200, b"fine")
        assert await get_body(http, server.base + "/b") == (200, b"fine")
        assert server.connections == 2
        assert server.paths == ["/a", "/b"]


async def test_a_body_read_to_its_last_byte_keeps_its_connection():
    """A range reader stops once it has its bytes, before the end of the answer is read: the connection is
    still kept (a blob's probe to a CDN once opened a new connection, and a new TLS session, per blob)."""
    async with Server(lambda path: ok(b"r" * 65536)) as server, pool() as http:
        for _ in range(3):
            async with await http.request("GET", server.base + "/range") as resp:
                got = 0
                while got < 65536:
                    got += len(await resp.readany())
        assert server.connections == 1


async def test_an_answer_left_unread_closes_its_connection():
    async with Server(lambda path: ok(b"y" * 100000)) as server, pool() as http:
        resp = await http.request("GET", server.base + "/big")
        assert resp.status == 200 and resp.content_length == 100000
        resp.release()
        assert await get_body(http, server.base + "/big") == (200, b"y" * 100000)
        assert server.connections == 2


@pytest.mark.parametrize(
    "pieces, says",
    [
        ([b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (512 * 1024)], "bad HTTP answer"),  # a head without end
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"z" * 50, b""], "bad HTTP answer"),
        ([b"NOT HTTP AT ALL\r\n\r\n"], "bad HTTP answer"),
        ([], "timed out"),  # a head that never comes
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"abc"], "timed out"),  # a body that stops
    ],
)
async def test_broken_answers_fail_as_one_transport_error_in_bounded_time(pieces, says):
    async with Server(lambda path: pieces) as server, pool() as http:
        t0 = time.monotonic()
        with pytest.raises(ConnectionFailed, match=says) as info:
            await get_body(http, server.base + "/x")
        assert "127.0.0.1" in str(info.value)
        assert time.monotonic() - t0 < FAST.headers_s + FAST.read_s + 1


async def test_tls_failures_say_which_kind(tmp_path: Path):
    async with Server(lambda path: ok(b"secret"), tls=tmp_path) as server, pool() as http:
        with pytest.raises(TLSNotTrusted) as info:
            await get_body(http, server.base + "/x")
        assert "certificate" in info.value.reason
        assert server.ca is not None
        trusted = ssl.create_default_context(cafile=str(server.ca))
        async with pool(verify=trusted) as verified:
            assert await get_body(verified, server.base + "/x") == (200, b"secret")
    # a plain HTTP server answers a TLS handshake with a 400, as Go's and nginx's do
    async with Server(ok, greet=b"HTTP/1.1 400 Bad Request\r\n\r\n") as plain, pool() as http:
        with pytest.raises(TLSFailed):
            await get_body(http, plain.base.replace("http://", "https://") + "/x")


async def test_a_post_carries_its_body_and_length():
    async with Server(lambda path: ok(b"{}")) as server, pool() as http:
        async with await http.request("POST", server.base + "/token", {"X-A": "1"}, b"a=b&c=d") as resp:
            assert resp.status == 200 and await resp.readany() == b"{}"
        assert server.paths == ["/token"] and server.bodies == [b"a=b&c=d"]


async def test_a_small_body_is_discarded_to_keep_its_connection_a_large_one_closes_it():
    answers = {
        "/redirect": [b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /x\r\nContent-Length: 20\r\n\r\n", b"r" * 20],
        "/large": ok(b"l" * 200_000),
        "/next": ok(b"n"),
    }
    async with Server(lambda path: answers[path]) as server, pool() as http:
        resp = await http.request("GET", server.base + "/redirect")
        assert resp.status == 307
        await resp.discard()
        assert await get_body(http, server.base + "/next") == (200, b"n")
        assert server.connections == 1  # kept: the redirect's body was read to its end
        resp = await http.request("GET", server.base + "/large")
        await resp.discard()
        assert await get_body(http, server.base + "/next") == (200, b"n")
        assert server.connections == 2  # a body over MAX_DISCARD is not read: its connection is closed
