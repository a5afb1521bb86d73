"""puller's applier in its worker process (puller/unpack/process.py): the tree it makes is the in-process applier's,
its errors come back as the classes they were (with their exit codes), a failed layer takes no more bytes, a worker
that dies fails its layers with one line and is started again, and it dies with its parent."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from puller.digest import Digest
from puller.errors import DigestMismatch, InvalidLayer, StoreError
from puller.registry.manifest import Descriptor
from puller.unpack import Limits
from puller.unpack.process import ApplierProcess, LayerFeed

from .rig import OCI_LAYER
from .test_unpack import apply_with_puller, real_tree_layer
from .trees import TarBuilder, diff, walk


def _layer(tar: bytes) -> tuple[bytes, Descriptor, str]:
    blob = gzip.compress(tar, 1, mtime=0)
    diff_id = f"sha256:{hashlib.sha256(tar).hexdigest()}"
    return blob, Descriptor(OCI_LAYER + "+gzip", Digest.of(blob), len(blob)), diff_id


def _open(process: ApplierProcess, root: Path, desc: Descriptor, diff_id: str, limits: Limits | None = None):
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return process.open(desc, diff_id, fd, True, limits or Limits())
    finally:
        os.close(fd)


async def _feed(feed: LayerFeed, blob: bytes, piece: int = 65537) -> None:
    view = memoryview(blob)
    for i in range(0, len(blob), piece):
        await feed.put(view[i : i + piece])


def test_a_layer_applied_in_the_worker_is_the_tree_the_applier_makes_in_process(tmp_path: Path):
    tar = real_tree_layer("etc", "usr/share/zoneinfo")
    blob, desc, diff_id = _layer(tar)

    async def main() -> None:
        process = ApplierProcess()
        try:
            feed = _open(process, tmp_path / "worker", desc, diff_id)
            await _feed(feed, blob)
            applied = await feed.finish()
            await feed.close()
            assert applied.diff_id == diff_id and applied.size == len(tar) and applied.entries > 1000
            assert process.pid is not None and process.pid != os.getpid()
        finally:
            await process.close()

    asyncio.run(main())
    apply_with_puller(tar, "gzip", tmp_path / "here", overlay=True)
    assert diff(walk(tmp_path / "here"), walk(tmp_path / "worker")) == []


def test_errors_come_back_as_their_class_and_a_failed_layer_takes_no_more_bytes(tmp_path: Path):
    t = TarBuilder()
    for i in range(3_000):
        t.file(f"e{i}", b"")
    bomb, bomb_desc, bomb_diff_id = _layer(t.bytes() + os.urandom(8 << 20))  # incompressible: many sends
    ok_tar = TarBuilder().file("f", b"content").bytes()
    blob, desc, _ = _layer(ok_tar)

    async def main() -> None:
        process = ApplierProcess()
        try:
            feed = _open(process, tmp_path / "bomb", bomb_desc, bomb_diff_id, Limits(max_entries=1_000))
            async with asyncio.timeout(30):  # the worker stopped reading: put returns, it does not wait for room
                await _feed(feed, bomb)
            assert feed.offset < bomb_desc.size
            with pytest.raises(InvalidLayer, match="more than 1,000 entries") as refused:
                await feed.finish()
            assert refused.value.exit_code == InvalidLayer.exit_code
            await feed.close()

            feed = _open(process, tmp_path / "liar", desc, "sha256:" + "0" * 64)
            await _feed(feed, blob)
            with pytest.raises(DigestMismatch) as mismatch:
                await feed.finish()
            assert mismatch.value.expected == "sha256:" + "0" * 64
            assert mismatch.value.actual == f"sha256:{hashlib.sha256(ok_tar).hexdigest()}"
            await feed.close()
        finally:
            await process.close()

    asyncio.run(main())
    assert len(os.listdir(tmp_path / "bomb")) == 1_000


def test_a_worker_killed_mid_layer_fails_it_in_one_line_and_the_next_layer_gets_a_new_worker(tmp_path: Path):
    blob, desc, diff_id = _layer(TarBuilder().file("big", os.urandom(4 << 20)).bytes())

    async def main() -> None:
        process = ApplierProcess()
        try:
            feed = _open(process, tmp_path / "a", desc, diff_id)
            await feed.put(memoryview(blob)[: 1 << 20])
            first = process.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            await _feed(feed, blob[1 << 20 :])
            with pytest.raises(StoreError, match=r"applier process .* ended without finishing a layer"):
                await feed.finish()
            await feed.close()

            feed = _open(process, tmp_path / "b", desc, diff_id)
            await _feed(feed, blob)
            await feed.finish()
            await feed.close()
            assert process.pid not in (None, first)
        finally:
            await process.close()

    asyncio.run(main())
    assert (tmp_path / "b" / "big").stat().st_size == 4 << 20


def test_layers_whose_descriptors_number_past_1024_are_applied(tmp_path: Path):
    """Each layer in progress holds descriptors in the worker (its socket, its directory): an image of many layers
    takes them past select()'s 1,024, which must not matter."""
    tar = TarBuilder().file("f", b"x").bytes()
    blob, desc, diff_id = _layer(tar)

    async def main() -> None:
        process = ApplierProcess()
        try:
            feeds = [_open(process, tmp_path / str(i), desc, diff_id) for i in range(600)]
            for feed in feeds:
                await _feed(feed, blob)
            for feed in feeds:
                assert (await feed.finish()).diff_id == diff_id
                await feed.close()
        finally:
            await process.close()

    asyncio.run(main())
    assert (tmp_path / "599" / "f").read_bytes() == b"x"


def test_an_aborted_layer_is_left_alone_once_abort_returns(tmp_path: Path):
    t = TarBuilder()
    for i in range(20_000):
        t.file(f"d{i % 50}/f{i}", b"x")
    blob, desc, diff_id = _layer(t.bytes())

    async def main() -> None:
        process = ApplierProcess()
        try:
            feed = _open(process, tmp_path / "root", desc, diff_id)
            await _feed(feed, blob[: len(blob) * 3 // 4])
            await feed.abort()
            await feed.close()
        finally:
            await process.close()

    asyncio.run(main())
    before = sorted(str(p) for p in (tmp_path / "root").rglob("*"))
    time.sleep(0.5)
    assert sorted(str(p) for p in (tmp_path / "root").rglob("*")) == before


CHILD = """
import asyncio, hashlib, os, subprocess, sys
from puller.digest import Digest
from puller.registry.manifest import Descriptor
from puller.unpack import Limits
from puller.unpack.process import ApplierProcess

async def main():
    process = ApplierProcess()
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
    empty = Descriptor("application/vnd.oci.image.layer.v1.tar", Digest.of(b""), 0)
    await process.open(empty, "sha256:" + hashlib.sha256().hexdigest(), fd, True, Limits()).finish()  # it serves
    feed = process.open(empty._replace(size=1), "sha256:" + "0" * 64, fd, True, Limits())
    # Another process holds the sockets open: the worker sees no end of them when this one dies.
    holder = subprocess.Popen(["sleep", "60"], pass_fds=(process._control.fileno(), feed._sock.fileno()))
    print(process.pid, holder.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_the_worker_dies_with_its_parent(tmp_path: Path):
    parent = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker, holder = map(int, parent.stdout.readline().split())
        os.kill(worker, 0)  # alive
    finally:
        parent.kill()
        parent.wait()
    try:
        _wait_gone(worker)
    finally:
        os.kill(holder, signal.SIGKILL)


def _wait_gone(worker: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):  # killed, not yet reaped by whoever adopted it
            return
        time.sleep(0.05)
    raise AssertionError(f"the applier process {worker} outlived its parent")
