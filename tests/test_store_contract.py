"""One conformance suite for every store, as containerd's content test suite runs against each of its stores: the
OCI layout, the overlaybd cache, and containerd 1.6, 2.3 and 2.4 (real daemons). Each test drives the store's
:class:`~puller.stores.BlobWriter` and image calls the way the engine does, and checks what is visible through
the store's own files or containerd's API."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from puller.digest import Digest
from puller.errors import DigestMismatch
from puller.reference import Reference
from puller.registry.manifest import Descriptor
from puller.stores import Store
from puller.stores.containerd import ContainerdStore
from puller.stores.oci_layout import OCILayoutStore, image_name

from .rig import CONTAINERD_BINS
from .store_child import blob, open_store

MIB = 1 << 20
KINDS = ["oci", "overlaybd", *(f"containerd-{v}" for v in sorted(CONTAINERD_BINS))]
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    kind: str
    spec: dict[str, Any]
    staging: Path

    def store(self) -> Store:
        return open_store(self.spec)

    async def read(self, store: Store, desc: Descriptor) -> bytes | None:
        """The committed blob's bytes as the store's consumers see them (None: not visible)."""
        if isinstance(store, ContainerdStore):
            if not await store.content.has(desc):
                return None
            return await store.content.read_all(str(desc.digest))
        if isinstance(store, OCILayoutStore):
            path = store.blob_path(desc)
        else:
            path = Path(self.spec["cache"]) / f"{desc.digest.algorithm}:{desc.digest.hex}"
        return path.read_bytes() if path.exists() else None

    def staged(self, desc: Descriptor) -> list[str]:
        return sorted(p.name for p in self.staging.iterdir() if desc.digest.hex in p.name)


@pytest.fixture(params=KINDS)
def case(request, tmp_path: Path) -> Case:
    kind = request.param
    staging = tmp_path / "staging"
    if kind == "oci":
        spec = {"kind": kind, "root": str(tmp_path / "oci")}
        staging = tmp_path / "oci" / ".puller" / "staging"
    elif kind == "overlaybd":
        spec = {
            "kind": kind,
            "config": str(tmp_path / "overlaybd.json"),  # absent: overlaybd's defaults
            "cache": str(tmp_path / "cache"),
            "staging": str(staging),
        }
    else:
        containerd = request.getfixturevalue("containerds")(kind.split("-")[1])
        spec = {
            "kind": "containerd",
            "socket": str(containerd.socket),
            "namespace": f"contract-{tmp_path.name}",
            "staging": str(staging),
            "root": str(tmp_path),
        }
    return Case(kind, spec, staging)


async def test_a_writer_resumes_from_what_status_reports(case: Case):
    desc, data = blob(1, 3 * MIB)
    async with case.store() as store:
        async with store.writer(desc) as first:
            assert not (await first.status()).done
            await first.write_at(0, [data[:MIB]])
            await first.write_at(2 * MIB, [data[2 * MIB : 2 * MIB + MIB // 2]])
            await asyncio.sleep(0.5)  # containerd takes the in-order bytes meanwhile
        assert await case.read(store, desc) is None  # nothing visible before commit
        async with store.writer(desc) as second:
            status = await second.status()
            held = status.done.as_list()
            assert not status.present
            assert held and held[0][0] == 0 and held[0][1] >= MIB  # the first MiB is kept
            written = [(0, MIB), (2 * MIB, 2 * MIB + MIB // 2)]
            assert all(any(ws <= s and e <= we for ws, we in written) for s, e in held)  # nothing it was not given
            for start, end in status.done.missing(desc.size):
                await second.write_at(start, [data[start:end]])
            await second.commit()
        assert await case.read(store, desc) == data
        assert case.staged(desc) == []


class Lender:
    """Hands each block's buffer to the writer as the lean client does: the writer may take it; one it did not
    take is scribbled over as soon as write_at returns (the connection receives into it again)."""

    def __init__(self, buffer: bytearray):
        self.buffer = buffer
        self.taken = self.given_back = False

    def take(self) -> None:
        self.taken = True

    def give_back(self) -> None:
        self.given_back = True


async def test_a_writer_keeps_a_buffer_only_by_taking_it_and_gives_it_back(case: Case):
    desc, data = blob(8, 6 * MIB + 123)
    lenders = []
    async with case.store() as store:
        async with store.writer(desc) as writer:
            await writer.status()
            # out of order, as ranges arrive: bytes ahead of the prefix are kept by some stores
            for start in [*range(MIB, desc.size, MIB), 0]:
                lender = Lender(bytearray(data[start : start + MIB]))
                await writer.write_at(start, [memoryview(lender.buffer)], lender)
                if not lender.taken:
                    lender.buffer[:] = bytes(len(lender.buffer))  # reused at once
                lenders.append(lender)
            await writer.commit()
        assert await case.read(store, desc) == data
    taken = [lender for lender in lenders if lender.taken]
    if case.kind.startswith("containerd"):
        assert taken  # it keeps received blocks uncopied
    assert all(lender.given_back for lender in taken)


async def test_a_wrong_digest_leaves_nothing_visible_and_nothing_staged(case: Case):
    desc, data = blob(2, 2 * MIB)
    bad = bytearray(data)
    bad[MIB] ^= 0xFF
    async with case.store() as store:
        async with store.writer(desc) as writer:
            await writer.status()
            await writer.write_at(MIB, [bytes(bad[MIB:])])
            await writer.write_at(0, [bytes(bad[:MIB])])
            with pytest.raises(DigestMismatch):
                await writer.commit()
        assert await case.read(store, desc) is None
        assert case.staged(desc) == []
        async with store.writer(desc) as again:
            assert not (await again.status()).done  # nothing to resume: the next attempt starts over


async def test_committing_present_content_succeeds_without_writing(case: Case):
    desc, data = blob(3, MIB + 7)
    async with case.store() as store:
        async with store.writer(desc) as writer:
            await writer.status()
            await writer.write_at(0, [data])
            await writer.commit()
        before = _file_identity(case, store, desc)
        async with store.writer(desc) as again:
            status = await again.status()
            assert status.present
            await again.commit()
        assert await case.read(store, desc) == data
        assert _file_identity(case, store, desc) == before  # not rewritten
        assert case.staged(desc) == []


def _file_identity(case: Case, store: Store, desc: Descriptor) -> tuple[int, int] | None:
    if isinstance(store, ContainerdStore):
        return None
    path = (
        store.blob_path(desc)
        if isinstance(store, OCILayoutStore)
        else Path(case.spec["cache"]) / f"sha256:{desc.digest.hex}"
    )
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


async def test_commit_image_twice_is_harmless(case: Case):
    layer, config, manifest, documents = _tiny_image()
    ref = Reference.parse(f"registry.example/contract/{case.kind}:v1")
    target = documents[0][0]
    async with case.store() as store:
        await store.begin_image(ref, manifest)
        for desc, data in ((config, _CONFIG), (layer, _LAYER)):
            if desc in store.select_blobs(manifest):
                async with store.writer(desc) as writer:
                    await writer.status()
                    await writer.write_at(0, [data])
                    await writer.commit()
        await store.commit_image(ref, target, documents)
        await store.commit_image(ref, target, documents)
        assert await case.read(store, layer) == _LAYER
        if isinstance(store, OCILayoutStore):
            named = [
                m
                for m in store.read_index()["manifests"]
                if m["annotations"]["org.opencontainers.image.ref.name"] == image_name(ref)
            ]
            assert [m["digest"] for m in named] == [str(target.digest)]
        if isinstance(store, ContainerdStore):
            record = await store.records.get(f"{ref.name}:{ref.tag}")
            assert record is not None and record.target.digest == str(target.digest)
            assert not (store._images or store._blobs or store.leases)  # nothing held after the pull


_LAYER_FILES = {"hello.txt": b"hello from the contract suite\n"}


def _layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in _LAYER_FILES.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), 0, 0o644
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


_LAYER = _layer_tar()
_CONFIG = json.dumps(
    {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(_LAYER).hexdigest()]},
    }
).encode()


def _tiny_image():
    from puller.registry import manifest as mf

    def desc(media: str, data: bytes) -> Descriptor:
        return Descriptor(media, Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()), len(data))

    layer = desc("application/vnd.oci.image.layer.v1.tar", _LAYER)
    config = desc("application/vnd.oci.image.config.v1+json", _CONFIG)
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": config.media_type, "digest": str(config.digest), "size": config.size},
            "layers": [{"mediaType": layer.media_type, "digest": str(layer.digest), "size": layer.size}],
        }
    ).encode()
    top = desc("application/vnd.oci.image.manifest.v1+json", body)
    manifest = mf.parse(body, top.media_type)
    assert isinstance(manifest, mf.Manifest)
    return layer, config, manifest, [(top, body)]


async def test_two_writers_of_one_digest_write_it_once(case: Case):
    desc, data = blob(4, 2 * MIB)
    async with case.store() as store:
        entered = asyncio.Event()

        async def second() -> bool:
            async with store.writer(desc) as writer:
                entered.set()
                status = await writer.status()
                await writer.commit()
                return status.present

        async with store.writer(desc) as first:
            await first.status()
            waiting = asyncio.ensure_future(second())
            await asyncio.sleep(0.6)
            assert not entered.is_set()  # the second waits for the first
            await first.write_at(0, [data])
            await first.commit()
        assert await asyncio.wait_for(waiting, 10)  # and finds the blob there
        assert await case.read(store, desc) == data
        assert case.staged(desc) == []


async def test_abort_forgets_every_byte(case: Case):
    desc, data = blob(5, 2 * MIB)
    async with case.store() as store:
        async with store.writer(desc) as writer:
            await writer.status()
            await writer.write_at(0, [data[:MIB]])
            await writer.write_at(MIB + MIB // 2, [data[MIB + MIB // 2 :]])
            await asyncio.sleep(0.3)
            await writer.abort()
        assert case.staged(desc) == []
        assert await case.read(store, desc) is None
        async with store.writer(desc) as again:
            assert not (await again.status()).done


async def test_sigkill_mid_write_leaves_nothing_visible_and_the_next_writer_resumes(case: Case):
    seed, size = 6, 16 * MIB
    desc, data = blob(seed, size)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.store_child", json.dumps(case.spec), str(seed), str(size)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
        assert line.strip() == "writing"
        await asyncio.sleep(0.7)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    async with case.store() as store:
        assert await case.read(store, desc) is None
        async with store.writer(desc) as writer:
            status = await writer.status()
            held = status.done.as_list()
            assert len(held) == 1 and held[0][0] == 0 and 0 < held[0][1] < size  # what the child wrote, kept
            for start, end in status.done.missing(size):
                await writer.write_at(start, [data[start:end]])
            await writer.commit()
        assert await case.read(store, desc) == data


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "pread"])
async def test_the_file_writer_hashes_bytes_that_arrived_early_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool
):
    """Bytes written ahead of the hashed prefix are read back: through a mapping of the file, or by pread where
    the kernel refuses MADV_POPULATE_READ (an unknown advice gets the same EINVAL an old kernel gives). The
    read-back starts at an unaligned offset and spans several mapping windows."""
    from puller.stores import staged

    if not mapped:
        monkeypatch.setattr(staged, "MADV_POPULATE_READ", 0x7FFF)
    desc, data = blob(3, 2 * staged.MAP_WINDOW + 12345)
    blocks = [(0, 1000), *((s, min(s + MIB, desc.size)) for s in range(1000, desc.size, MIB))]
    async with OCILayoutStore(tmp_path / "oci") as store:
        async with store.writer(desc) as writer:
            await writer.write_at(0, [data[:1000]])  # hashed in hand: the prefix now ends unaligned
            for start, end in reversed(blocks[1:]):  # every later block arrives before the prefix reaches it
                await writer.write_at(start, [data[start:end]])
            await writer.commit()
            assert writer._hasher._map is mapped  # type: ignore[attr-defined]
        assert store.blob_path(desc).read_bytes() == data
