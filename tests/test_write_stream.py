"""The containerd Write stream's own HTTP/2 framing (puller/stores/containerd/stream.py) against a scripted peer:
the call's status reaches the caller, and a peer that breaks the protocol or its bounds ends the call with one
error instead of growing memory or hanging. (Against containerd itself: test_containerd.py and the store
conformance suite.)"""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import hpack
import pytest
import uvloop

from puller.stores.containerd import stream as stream_module
from puller.stores.containerd.stream import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    MIN_FRAME,
    PING,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    Connection,
    Gathered,
    RpcError,
    StatusCode,
    frame_header,
    framed,
    framed_slots,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    head = await reader.readexactly(9)
    length = int.from_bytes(head[:3], "big")
    return head[3], head[4], int.from_bytes(head[5:9], "big"), await reader.readexactly(length)


async def _call(tmp_path: Path, script: Script, body: Callable[[Connection], Awaitable[object]]) -> object:
    """Run ``body`` on a stream to a peer that reads the preface and then follows ``script``."""
    seen: list[tuple[int, int, int, bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(len(PREFACE)) == PREFACE
        writer.write(frame_header(0, SETTINGS, 0, 0))
        while True:  # up to the request's headers
            frame = await _read_frame(reader)
            seen.append(frame)
            if frame[0] == HEADERS:
                break
        await script(reader, writer)

    sock = str(tmp_path / "peer.sock")
    server = await asyncio.start_unix_server(serve, sock)
    try:
        stream = await Connection.open(sock)
        stream.start("/svc/Method", [("containerd-namespace", "ns")])
        try:
            return await asyncio.wait_for(body(stream), 10)
        finally:
            stream.close()
    finally:
        server.close()


def _headers(fields: list[tuple[str, str]], flags: int) -> bytes:
    block = hpack.Encoder().encode(fields)
    return frame_header(len(block), HEADERS, flags | END_HEADERS, 1) + block


async def test_an_error_status_reaches_the_caller_with_its_message_decoded(tmp_path: Path):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        trailers = [(":status", "200"), ("grpc-status", "9"), ("grpc-message", "ref locked: 100%25 busy")]
        writer.write(_headers(trailers, END_STREAM))  # a trailers-only answer
        await asyncio.sleep(5)

    with pytest.raises(RpcError) as caught:
        await _call(tmp_path, script, lambda stream: stream.receive())
    assert caught.value.code() == StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == "ref locked: 100% busy"


async def test_messages_go_out_framed_and_answers_come_back_in_order(tmp_path: Path):
    received = bytearray()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_headers([(":status", "200"), ("content-type", "application/grpc")], 0))
        while True:
            kind, flags, _, payload = await _read_frame(reader)
            if kind == DATA:
                received.extend(payload)
                if flags & END_STREAM:
                    break
        for answer in (b"one", b"two"):
            message = b"\x00" + len(answer).to_bytes(4, "big") + answer
            writer.write(frame_header(len(message), DATA, 0, 1) + message)
        writer.write(_headers([("grpc-status", "0")], END_STREAM))

    async def body(stream: Connection) -> list[bytes]:
        await stream.send([b"abc", memoryview(b"defg")])
        await stream.send([bytes(40_000)])  # more than one frame
        stream_done = asyncio.ensure_future(stream.finish())
        answers = [await stream.receive(), await stream.receive()]
        await stream_done
        return answers

    assert await _call(tmp_path, script, body) == [b"one", b"two"]
    expected = b"\x00\x00\x00\x00\x07abcdefg" + b"\x00" + (40_000).to_bytes(4, "big") + bytes(40_000)
    assert bytes(received) == expected


@pytest.mark.parametrize(
    "hostile",
    [
        frame_header(1 << 20, DATA, 0, 1),  # a frame larger than we accept
        frame_header(6, DATA, 0, 1) + b"\x01\x00\x00\x00\x01x",  # a compressed answer
        frame_header(5, DATA, 0, 1) + b"\x00\x7f\xff\xff\xff",  # an answer of 2 GiB announced
    ],
    ids=["huge-frame", "compressed", "huge-answer"],
)
async def test_a_peer_that_breaks_the_bounds_ends_the_call(tmp_path: Path, hostile: bytes):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_headers([(":status", "200")], 0) + hostile)
        await asyncio.sleep(5)

    with pytest.raises(RpcError) as caught:
        await _call(tmp_path, script, lambda stream: stream.receive())
    assert caught.value.code() == StatusCode.INTERNAL
    assert "malformed" in caught.value.details()


async def test_a_peer_that_goes_away_mid_call_is_unavailable(tmp_path: Path):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def body(stream: Connection) -> None:
        for _ in range(100):  # the first sends may fit in the socket before the close is seen
            await stream.send([bytes(1 << 16)])
            await asyncio.sleep(0.01)

    with pytest.raises(RpcError) as caught:
        await _call(tmp_path, script, body)
    assert caught.value.code() == StatusCode.UNAVAILABLE


def test_a_framed_message_is_its_parts_cut_into_frames_the_peer_accepts():
    parts = [b"head", memoryview(bytes(range(256)) * 300)[7:], b"", b"tail"]
    message = framed(parts)
    body = b"".join(parts)
    assert message.payload() == b"\x00" + len(body).to_bytes(4, "big") + body
    at, payloads = 0, []
    while at < len(message.wire):  # the wire is nothing but DATA frames of stream 1, none over MIN_FRAME
        length = int.from_bytes(message.wire[at : at + 3], "big")
        assert message.wire[at + 3 : at + 9] == bytes((DATA, 0)) + (1).to_bytes(4, "big")
        assert 0 < length <= MIN_FRAME
        payloads.append(message.wire[at + 9 : at + 9 + length])
        at += 9 + length
    assert at == len(message.wire)
    assert b"".join(payloads) == message.payload()


@pytest.mark.parametrize("size", [0, 1, MIN_FRAME - 30, MIN_FRAME, 5 * MIN_FRAME + 7])
def test_a_message_read_into_its_frames_is_the_message_framed_from_its_parts(size: int):
    head, data = b"h" * 25, bytes(range(256)) * (size // 256) + bytes(size % 256)
    message, slots = framed_slots(head, size)
    at = 0
    for slot in slots:  # as preadv fills them
        slot[:] = data[at : at + len(slot)]
        at += len(slot)
    assert at == size
    assert message == framed([head, data])


@pytest.mark.parametrize("size", [1, MIN_FRAME - 30, MIN_FRAME - 29, MIN_FRAME, 5 * MIN_FRAME + 7, 64 * MIN_FRAME])
def test_a_gathered_message_is_on_the_wire_what_the_framed_copy_is(size: int):
    """Around a buffer it keeps: its frames (through the transport) and its (address, length) pairs (for
    vmsplice) both make the bytes that framing a copy makes."""
    head = b"h" * 29
    data = memoryview(bytearray(bytes(range(256)) * (size // 256 + 1)))[3 : 3 + size]
    released: list[bool] = []
    message = Gathered(head, data, lambda: released.append(True))
    wire = framed([head, data]).wire
    frames = -(-message.length // MIN_FRAME)
    assert b"".join(message.views(0, frames)) == wire
    pairs = message.iov(0, frames)
    assert b"".join(ctypes.string_at(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)) == wire
    split = frames // 2  # as flow control cuts a message: whole frames
    assert b"".join(message.views(0, split)) + b"".join(message.views(split, frames)) == wire
    assert message.data.obj is data.obj  # kept, not copied
    message.release()
    assert released == [True]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("spliced", [True, False], ids=["spliced", "through-the-transport"])
@pytest.mark.parametrize("kind", ["framed", "gathered"])
def test_a_framed_message_larger_than_the_socket_arrives_whole_with_control_frames_between_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spliced: bool, loop: str, kind: str
):
    """The peer reads slowly, so the message fills the socket and waits for room; a PING the peer sends meanwhile
    is answered at a frame boundary, never inside the message's frames. On both loops: the wait for room watches
    a duplicate of the socket, which uvloop (puller's loop) and asyncio must both accept. A gathered message
    (around a buffer it keeps) is given back once answered."""
    if not spliced:
        monkeypatch.setattr(stream_module, "_vmsplice", None)
    body = bytes(range(251)) * (48 << 12)  # ~47 MiB: many times the socket's buffers
    received = bytearray()
    acks: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        window = (1 << 31) - 1
        writer.write(
            frame_header(6, SETTINGS, 0, 0)
            + (4).to_bytes(2, "big")
            + window.to_bytes(4, "big")
            + frame_header(4, WINDOW_UPDATE, 0, 0)
            + (window - 65_535).to_bytes(4, "big")
            + _headers([(":status", "200"), ("content-type", "application/grpc")], 0)
        )
        await asyncio.sleep(0.3)  # the socket fills meanwhile
        writer.write(frame_header(8, PING, 0, 0) + b"pingpong")
        ended = False
        while not (ended and acks):  # the ack may follow the stream's end (it waited in the transport)
            kind, flags, _, payload = await _read_frame(reader)
            if kind == PING and flags & ACK:
                acks.append(payload)
            elif kind == DATA:
                received.extend(payload)
                ended = bool(flags & END_STREAM)
                if len(received) < 1 << 20:
                    await asyncio.sleep(0.001)  # slowly at first
        answer = b"\x00\x00\x00\x00\x02ok"
        writer.write(frame_header(len(answer), DATA, 0, 1) + answer + _headers([("grpc-status", "0")], END_STREAM))

    released: list[bool] = []

    async def body_of_call(stream: Connection) -> bytes:
        if kind == "framed":
            await stream.send_framed(framed([body[:1000], memoryview(body)[1000:]]))
        else:
            kept = memoryview(bytearray(body))[1000:]
            await stream.send_framed(Gathered(body[:1000], kept, lambda: released.append(True)))
        done = asyncio.ensure_future(stream.finish())
        answer = await stream.receive()
        await done
        return answer

    run = uvloop.run if loop == "uvloop" else asyncio.run
    assert run(_call(tmp_path, script, body_of_call)) == b"ok"
    assert bytes(received) == b"\x00" + len(body).to_bytes(4, "big") + body
    assert acks == [b"pingpong"]
    assert released == ([True] if kind == "gathered" else [])


async def test_a_stream_gives_back_its_pipe_and_descriptors_when_closed(tmp_path: Path):
    """Each stream opens a pipe and a duplicate of its socket for splicing: closed with the stream, as many
    streams as a pull has blobs leave no descriptor behind."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_headers([(":status", "200"), ("content-type", "application/grpc")], 0))
        await reader.read()  # until the client goes

    async def body(stream: Connection) -> None:
        await stream.send_framed(framed([bytes(50_000)]))

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        await _call(tmp_path, script, body)
    await asyncio.sleep(0.1)  # the server's side of each connection closes
    assert len(os.listdir("/proc/self/fd")) <= before
