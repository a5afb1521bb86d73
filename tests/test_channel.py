"""containerd's unary calls over puller's own HTTP/2 client (puller/stores/containerd/channel.py): calls reuse a few
connections, one call at a time on each, against a scripted peer and against containerd itself."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import hpack
import pytest

from puller.stores.containerd import channel as channel_module
from puller.stores.containerd.channel import MAX_CONNECTIONS, Channel
from puller.stores.containerd.stream import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Connection,
    RpcError,
    StatusCode,
    frame_header,
)


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    head = await reader.readexactly(9)
    length = int.from_bytes(head[:3], "big")
    return head[3], head[4], int.from_bytes(head[5:9], "big"), await reader.readexactly(length)


class Peer:
    """A unix socket server that answers each call with its request reversed, on one connection after another;
    ``silent`` calls (by path) get no answer at all. It records every call's stream id and headers."""

    def __init__(self, path: str, silent: tuple[str, ...] = ()):
        self.path = path
        self.silent = silent
        self.connections = 0
        self.calls: list[tuple[int, int, dict[str, str]]] = []  # (connection, stream, headers)
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Peer:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        encoder, decoder = hpack.Encoder(), hpack.Decoder()  # one of each per connection, as HTTP/2 has it
        assert await reader.readexactly(len(PREFACE)) == PREFACE
        writer.write(frame_header(0, SETTINGS, 0, 0))
        request = bytearray()
        try:
            while True:
                kind, flags, stream, payload = await _read_frame(reader)
                if kind == HEADERS:
                    headers = {str(k): str(v) for k, v in decoder.decode(payload)}
                    self.calls.append((number, stream, headers))
                    request.clear()
                elif kind == DATA:
                    request += payload
                    if flags & END_STREAM and self.calls[-1][2][":path"] not in self.silent:
                        answer = bytes(request[5:])[::-1]
                        message = b"\x00" + len(answer).to_bytes(4, "big") + answer
                        head = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
                        tail = encoder.encode([("grpc-status", "0"), ("grpc-message", "")])
                        writer.write(
                            frame_header(len(head), HEADERS, END_HEADERS, stream)
                            + head
                            + frame_header(len(message), DATA, 0, stream)
                            + message
                            + frame_header(len(tail), HEADERS, END_HEADERS | END_STREAM, stream)
                            + tail
                            # late frames of the call just ended: the client must let them pass
                            + frame_header(4, WINDOW_UPDATE, 0, stream)
                            + (1000).to_bytes(4, "big")
                            + frame_header(4, RST_STREAM, 0, stream)
                            + bytes(4)
                        )
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def test_calls_one_after_another_share_one_connection_on_new_streams(tmp_path: Path):
    async with Peer(str(tmp_path / "peer.sock")) as peer, Channel(peer.path) as channel:
        for i in range(5):
            answers = await channel.call(f"/svc/M{i}", b"abc%d" % i, [("containerd-namespace", "ns")], 5.0)
            assert answers == [b"%dcba" % i]
    assert peer.connections == 1
    assert [stream for _, stream, _ in peer.calls] == [1, 3, 5, 7, 9]
    # the peer's header blocks index what earlier ones added (HPACK): every answer still decoded
    assert [h[":path"] for _, _, h in peer.calls] == [f"/svc/M{i}" for i in range(5)]
    assert all(h["containerd-namespace"] == "ns" and h["grpc-timeout"] == "5000m" for _, _, h in peer.calls)


async def test_a_call_without_an_answer_ends_at_its_timeout_and_its_connection_is_dropped(tmp_path: Path):
    async with Peer(str(tmp_path / "peer.sock"), silent=("/svc/Hang",)) as peer, Channel(peer.path) as channel:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RpcError) as caught:
            await channel.call("/svc/Hang", b"x", [], 0.5)
        assert caught.value.code() == StatusCode.DEADLINE_EXCEEDED
        assert 0.5 <= loop.time() - started < 3
        assert await channel.call("/svc/Echo", b"xy", [], 5.0) == [b"yx"]
    assert peer.connections == 2  # the timed-out call's connection was not used again


async def test_calls_at_once_wait_for_one_of_a_bounded_number_of_connections(tmp_path: Path, monkeypatch):
    opened = 0
    open_connection = Connection.open

    async def counting_open(address: str) -> Connection:
        nonlocal opened
        opened += 1
        return await open_connection(address)

    monkeypatch.setattr(channel_module.Connection, "open", counting_open)
    async with Peer(str(tmp_path / "peer.sock")) as peer, Channel(peer.path) as channel:
        calls = [channel.call("/svc/Echo", b"%05d" % i, [], 10.0) for i in range(200)]
        answers = await asyncio.gather(*calls)
    assert answers == [[(b"%05d" % i)[::-1]] for i in range(200)]
    assert opened <= MAX_CONNECTIONS
    assert peer.connections == opened


async def test_a_connection_containerd_closed_while_idle_is_not_used_again(tmp_path: Path):
    async with Peer(str(tmp_path / "peer.sock")) as peer, Channel(peer.path) as channel:
        assert await channel.call("/svc/Echo", b"ab", [], 5.0) == [b"ba"]
        (idle,) = channel._idle
        assert idle._transport is not None
        idle._transport.close()  # as a restarted containerd would
        await asyncio.sleep(0.05)
        assert await channel.call("/svc/Echo", b"cd", [], 5.0) == [b"dc"]
    assert peer.connections == 2


async def test_many_reads_through_reused_connections_keep_their_flow_control_window(containerd, tmp_path: Path):
    """Each Content.Read answer counts against the connection's window: 60 reads of 300 KB (18 MB, far more than
    the window) on reused connections all complete, as do 300 calls at once."""
    from puller.digest import Digest
    from puller.registry.manifest import Descriptor
    from puller.stores.containerd import ContainerdStore

    data = os.urandom(300_000)
    desc = Descriptor("application/octet-stream", Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()), len(data))
    async with ContainerdStore(str(containerd.socket), "channel", staging_dir=tmp_path / "st") as store:
        # a gc root: unreferenced content goes to containerd's garbage collector, which may run meanwhile
        await store.content.put_bytes(desc, data, {"containerd.io/gc.root": "test"}, None)
        for _ in range(60):
            assert await asyncio.wait_for(store.content.read_all(str(desc.digest)), 10) == data
        infos = await asyncio.gather(*(store.content.info(str(desc.digest)) for _ in range(300)))
        assert {info.size if info else None for info in infos} == {len(data)}
        missing = await store.content.info("sha256:" + "0" * 64)
        assert missing is None  # NOT_FOUND: a status, and the connection stays in use
