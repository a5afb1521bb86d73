"""The containerd store: content, image records and unpacked snapshots, through containerd's own gRPC API.

Nothing is written into containerd's directories: its metadata database decides what exists and its garbage
collector deletes what it does not know. Everything happens under a lease, so a half-done pull is never
collected; the lease is dropped once the image record references the content (and the content the snapshots)
through the same ``containerd.io/gc.ref.*`` labels containerd's own pull sets.

- Blobs: Content.Write with ref ``puller-<digest>``, a STAT first (resume at the offset containerd already has),
  data in order as it arrives (received blocks wait in memory for their turn; the few that do not fit are staged
  by the engine and read back), COMMIT with total, expected digest and the distribution source label: containerd
  hashes what it was sent and commits only if the digest matches (a mismatch is the engine's DigestMismatch:
  aborted, fetched again). "Already exists" is success.
- Manifests and indexes: written the same way, labelled with gc references (index -> manifests, manifest ->
  config and layers) and ``containerd.io/distribution.source.<host>=<repo>``.
- Unpack (default on): each layer is applied into the snapshotter through the Snapshots and Diff services as
  containerd's unpacker does (key ``extract-<unique> <chainID>``, committed as the chain ID); the config gets
  ``containerd.io/gc.ref.snapshot.<snapshotter>`` and each layer ``containerd.io/uncompressed``.
- Image records as the CRI plugin expects: named by reference and by repo digest, target = the resolved
  index/manifest, ``io.cri-containerd.image=managed``, and ``io.cri-containerd.pinned=pinned`` with ``pin``.

Stubs: puller/stores/containerd_api (our own minimal .proto files, generated code committed); they follow
containerd's API v1, whose field numbers are the same from containerd 1.6 to 2.x.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime
import hashlib
import heapq
import itertools
import json
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import empty_pb2, field_mask_pb2

from ..errors import DigestMismatch, DiskFull, StoreError
from ..priority import PrioritySemaphore
from ..reference import Reference
from ..registry import manifest as mf
from ..registry.manifest import Descriptor
from . import StoreBase, free_bytes
from .containerd_api import (
    content_pb2,
    content_pb2_grpc,
    diff_pb2,
    diff_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    introspection_pb2,
    introspection_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
    types_pb2,
    version_pb2_grpc,
)
from .defaults import CONTAINERD_ADDRESS as DEFAULT_ADDRESS
from .defaults import CONTAINERD_LEASE_EXPIRY as DEFAULT_LEASE_EXPIRY
from .defaults import CONTAINERD_NAMESPACE as DEFAULT_NAMESPACE
from .defaults import CONTAINERD_ROOT as DEFAULT_ROOT
from .defaults import CONTAINERD_SNAPSHOTTER as DEFAULT_SNAPSHOTTER
from .defaults import CONTAINERD_STAGING as DEFAULT_STAGING
from .safedir import SafeDir

log = logging.getLogger(__name__)

WRITE_MESSAGE = 1 << 20  # bytes per Write message (under gRPC's default 4 MiB message limit)
WRITE_DEPTH = 4  # Write messages in flight per stream: containerd handles one while the next ones travel
MAX_WRITE_STREAMS = 2  # blobs streamed into containerd at once, lowest layers first
MAX_AHEAD = 64 << 20  # how far a blob's download may run ahead of what containerd has taken
MAX_KEPT = 64 << 20  # received bytes kept in memory for their turn, all blobs together; the rest is staged
MAX_KEPT_WAITING = MAX_KEPT // 4  # of which for blobs still waiting for a write stream

GC_CONTENT = "containerd.io/gc.ref.content"
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot"
DISTRIBUTION_SOURCE = "containerd.io/distribution.source"
UNCOMPRESSED = "containerd.io/uncompressed"
CRI_MANAGED = ("io.cri-containerd.image", "managed")
CRI_PINNED = ("io.cri-containerd.pinned", "pinned")
PARALLEL_UNPACKS = 3  # layers applied at once where the snapshotter can rebase (decompression is containerd's CPU)
SNAPSHOTTER_PLUGIN = "io.containerd.snapshotter.v1"
UNPACK_RATIO = 3  # unpacked size / compressed size of a typical gzip layer: the space check's estimate
PULLER_PINNED = ("puller.io/pinned", "true")  # marks a CRI pin that puller set, so that it only takes off its own
SNAPSHOT_REF = "containerd.io/snapshot.ref"
SNAPSHOT_DIFF_ID = "containerd.io/snapshot/diff-id"
SNAPSHOT_PARENT = "containerd.io/snapshot/parent-chain-id"
_COMMIT_DIGEST = re.compile(r"unexpected commit digest (\S+), expected (\S+)")


class _ContainerdSink:
    """One blob's Write stream. containerd takes data in order only: received blocks are kept in memory
    (:meth:`take`, within MAX_KEPT for all blobs) until their turn, the others are staged by the engine and read
    back then. containerd hashes what it receives and commits only if the expected digest matches."""

    def __init__(self, store: ContainerdStore, desc: Descriptor, staged: str):
        self.desc = desc
        self.staged = staged
        self.received = 0  # bytes [0, received) are kept here or staged
        self.sent = 0  # bytes containerd has been given
        self._kept: dict[int, tuple[list[bytes], int]] = {}  # offset -> (buffers, length) of blocks in memory
        self._kept_starts: list[int] = []  # their offsets, sorted
        self._coming = 0  # bytes admitted while waiting for a stream (memory promised to them), not yet here
        self._streaming = False  # its Write stream is open
        self._has_slot = False  # may send now (one of MAX_WRITE_STREAMS)
        self._priority = store._order.get(str(desc.digest), 0)
        self._wake = asyncio.Event()
        self._sent_moved = asyncio.Event()
        self._ref = f"puller-{desc.digest}"
        self._store = store
        self._task: asyncio.Future | None = None
        self._lease: _Lease | None = store._lease_for_blob(str(desc.digest))  # held until the write ends

    async def start(self) -> int:
        self.received = self.sent = await self._store._ingest_offset(self._ref, self.desc)
        self._task = asyncio.ensure_future(self._stream())
        return self.sent

    def take(self, offset: int, buffers: list[bytes], n: int) -> bool:
        promised = min(n, self._coming)
        self._promise(-promised)  # what was promised is here now
        # Blobs still waiting for a stream get part of the memory: the rest goes to the ones being sent.
        limit = MAX_KEPT if self._streaming else MAX_KEPT_WAITING
        if self._store._kept + n > limit or self._task is None or self._task.done():
            if promised:
                self._store.memory_freed()  # staged instead: the memory promised to it is free
            return False
        self._kept[offset] = (buffers, n)
        bisect.insort(self._kept_starts, offset)
        self._store._kept += n
        return True

    def advance(self, received_end: int) -> None:
        self.received = max(self.received, received_end)
        self._wake.set()

    def admit(self, start: int, end: int) -> bool:
        """Where containerd's ingest is the limit (a fast link), downloading further only takes CPU from containerd,
        or disk to stage on: no blob fetches more than MAX_AHEAD past what containerd has taken, and a blob waiting
        for a stream fetches only what the memory for waiting blobs can hold (its first bytes always, so that it
        can take a stream when one is free)."""
        if self._task is None or self._task.done():
            return True
        if end > self.sent + MAX_AHEAD:
            return False
        if self._streaming or start == self.received == self.sent:
            return True
        store = self._store
        if store._kept + store._coming + (end - start) > MAX_KEPT_WAITING:
            return False
        self._promise(end - start)
        return True

    async def wait_admit(self, start: int, end: int) -> None:
        """Wait for this stream to move on, or in line (lowest layer first) for memory; a waiter that was served
        hands the turn to the next, so a freed block wakes one download, not all of them."""
        store = self._store
        try:
            while not self.admit(start, end):
                if end > self.sent + MAX_AHEAD:
                    self._sent_moved.clear()
                    await self._sent_moved.wait()
                else:
                    await store.memory_turn(self._priority)
        finally:
            store.memory_freed()

    def _promise(self, n: int) -> None:
        self._coming += n
        self._store._coming += n

    async def _stream(self) -> None:
        try:
            await self._stream_in_turn()
        finally:
            self._release_lease()
            self._release_slot()
            self._drop_kept()
            self._sent_moved.set()  # downloads held back by admit() go on (and meet the error at commit)
            self._store.memory_freed(everyone=True)

    async def _stream_in_turn(self) -> None:
        # A slot is held only while there is something to send, lowest layer first: containerd's ingest, not the
        # network, is the limit on a fast link, and the layer unpacked next must not share it with the layers
        # after it, nor wait for a layer whose bytes are still on their way. A blob waiting for a slot keeps
        # downloading meanwhile.
        while self.received == self.sent < self.desc.size:
            self._wake.clear()
            await self._wake.wait()
        await self._take_slot()
        self._streaming = True
        self._store.memory_freed(everyone=True)  # its downloads are no longer bound by the memory for waiting
        digest = str(self.desc.digest)
        labels = self._store._sources.get(digest, {})
        lease = self._lease.id if self._lease else None
        await self._store._write(self.desc, self._chunks, labels, resume_at=self.sent, lease=lease)
        self._store._labelled[digest] = labels

    async def _take_slot(self) -> None:
        if not self._has_slot:
            await self._store._write_slots.acquire(self._priority)
            self._has_slot = True

    def _release_slot(self) -> None:
        if self._has_slot:
            self._has_slot = False
            self._store._write_slots.release()

    def _drop_kept(self) -> None:
        self._store._kept -= sum(n for _, n in self._kept.values())
        self._kept.clear()
        self._kept_starts.clear()
        self._promise(-self._coming)
        self._store.memory_freed()

    def _pop_first_kept(self) -> tuple[int, list[bytes], int]:
        start = self._kept_starts.pop(0)
        buffers, n = self._kept.pop(start)
        self._store._kept -= n
        self._store.memory_freed()
        return start, buffers, n

    def _kept_bytes(self, offset: int) -> list[bytes] | None:
        """About WRITE_MESSAGE kept bytes from ``offset`` on (as received, not joined), or None when the bytes at
        ``offset`` are not kept."""
        starts = self._kept_starts
        while starts and starts[0] + self._kept[starts[0]][1] <= offset:  # containerd had them already
            self._pop_first_kept()
        if not starts or starts[0] > offset:
            return None
        start, buffers, n = self._pop_first_kept()
        parts, end = _skip(buffers, offset - start), start + n
        while starts and starts[0] == end and end - offset < WRITE_MESSAGE:
            _, more, m = self._pop_first_kept()
            parts.extend(more)
            end += m
        return parts

    async def _chunks(self, offset: int) -> AsyncIterator[list[bytes]]:
        fd = -1
        try:
            while True:
                self.sent = offset
                self._sent_moved.set()
                if offset >= self.desc.size:
                    break
                data = self._kept_bytes(offset)
                if data is None:  # received bytes that are not kept are staged
                    staged_end = min(self._kept_starts[0], self.received) if self._kept_starts else self.received
                    if offset >= staged_end:
                        self._release_slot()  # nothing to send until more bytes arrive
                        self._wake.clear()
                        await self._wake.wait()
                        await self._take_slot()
                        continue
                    if fd < 0:
                        fd = self._store.staging.open_file(self.staged, os.O_RDONLY)
                    block = await asyncio.to_thread(os.pread, fd, min(WRITE_MESSAGE, staged_end - offset), offset)
                    if not block:
                        raise StoreError(f"staged file of {self.desc.digest} ended at {offset}")
                    data = [block]
                yield data
                offset += sum(map(len, data))
        finally:
            if fd >= 0:
                os.close(fd)

    async def finish(self) -> None:
        """Wait for the last bytes and containerd's commit (raises DigestMismatch when containerd's hash of what
        it was sent is not the expected digest)."""
        assert self._task is not None
        await self._task

    def _release_lease(self) -> None:
        if self._lease is not None:
            self._store._release(self._lease)
            self._lease = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._release_lease()
        self._drop_kept()
        self._store._sinks.pop(str(self.desc.digest), None)

    async def abort(self) -> None:
        await self.close()
        await self._store._abort(self._ref)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain IDs of a layer stack: chain[0] = diff[0]; chain[i] = sha256(chain[i-1] + " " + diff[i])."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def _skip(buffers: list[bytes], n: int) -> list[bytes]:
    """``buffers`` without their first ``n`` bytes."""
    out = list(buffers)
    while n and out:
        if len(out[0]) <= n:
            n -= len(out.pop(0))
        else:
            out[0], n = out[0][n:], 0
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _write_message(ref: bytes, offset: int, data: list[bytes]) -> bytes:
    """A WriteContentRequest{action=WRITE, ref, offset, data} in protobuf's wire format, built around the received
    buffers in one copy (building the message and serializing it would copy every byte twice more: ~10% of the
    client's CPU on a loopback pull). Field numbers as in containerd_api/content.proto."""
    size = sum(map(len, data))
    head = b"\x08\x01\x12" + _varint(len(ref)) + ref + b"\x28" + _varint(offset) + b"\x32" + _varint(size)
    return b"".join([head, *data])


def _serialize_write(request: content_pb2.WriteContentRequest | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def _source_label(ref: Reference) -> dict[str, str]:
    """``containerd.io/distribution.source.<host>=<repo>``, as containerd's pull labels every blob."""
    return {f"{DISTRIBUTION_SOURCE}.{ref.domain}": ref.repository}


def _image_key(manifest: mf.Manifest) -> tuple[str, ...]:
    return tuple(str(d.digest) for d in manifest.blobs)


def gc_labels(doc: mf.Index | mf.Manifest) -> dict[str, str]:
    """The gc reference labels containerd's pull puts on a manifest or index."""
    if isinstance(doc, mf.Index):
        return {f"{GC_CONTENT}.m.{i}": str(d.digest) for i, d in enumerate(doc.manifests)}
    labels = {f"{GC_CONTENT}.config": str(doc.config.digest)}
    labels.update({f"{GC_CONTENT}.l.{i}": str(d.digest) for i, d in enumerate(doc.layers)})
    return labels


def _translate(e: grpc.aio.AioRpcError, what: str, address: str) -> StoreError:
    code = e.code()
    detail = e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return StoreError(f"containerd at {address} is unavailable while {what}: {detail}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return StoreError(f"this containerd does not implement a call needed for {what} (too old?): {detail}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return StoreError(f"containerd refused {what}: permission denied")
    if "no space left on device" in detail or "disk quota exceeded" in detail:
        return DiskFull(f"containerd ran out of disk space while {what}: {detail}")
    return StoreError(f"containerd: {what}: {detail or code.name}")


class ContainerdStore(StoreBase):
    """Use as ``async with ContainerdStore(...) as store``."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        namespace: str = DEFAULT_NAMESPACE,
        snapshotter: str = DEFAULT_SNAPSHOTTER,
        unpack: bool = True,
        staging_dir: str | os.PathLike[str] = DEFAULT_STAGING,
        lease_expiry: float = DEFAULT_LEASE_EXPIRY,
        root: str | os.PathLike[str] = DEFAULT_ROOT,
    ):
        self.address = address
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.unpack = unpack
        self.lease_expiry = lease_expiry
        self.root = Path(root)
        self.staging_dir = Path(staging_dir).absolute()
        self._staging: SafeDir | None = None
        self._rebase: bool | None = None  # the snapshotter can rebase (parallel unpack); asked once
        self._leases: dict[tuple[str, ...], _Lease] = {}  # per image being pulled
        self._lease_drops: set[asyncio.Future] = set()
        self._channel: grpc.aio.Channel | None = None
        self._kept = 0  # bytes the sinks keep in memory, all together
        self._coming = 0  # bytes on their way that memory is promised to (see _ContainerdSink.admit)
        self._memory_waiters: list[tuple[int, int, asyncio.Future]] = []  # downloads waiting for memory, a heap
        self._memory_order = itertools.count()
        self._sinks: dict[str, _ContainerdSink] = {}
        self._write_slots = PrioritySemaphore(MAX_WRITE_STREAMS)
        self._order: dict[str, int] = {}  # blob digest -> its place in the manifest (config, layers bottom up)
        self._sources: dict[str, dict[str, str]] = {}  # blob digest -> distribution source label to commit with
        self._labelled: dict[str, dict[str, str]] = {}  # blob digest -> the labels it was committed with
        self._ready: dict[str, asyncio.Event] = {}  # set when a blob is committed
        self._images: dict[tuple[str, ...], int] = {}  # images between begin_image and their end -> pulls of it
        self._unpackers: dict[tuple[str, ...], asyncio.Future] = {}  # per image being pulled (the daemon pulls
        # several at once through one store)

    # ---- lifecycle ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> ContainerdStore:
        sock = Path(self.address)
        if not sock.exists():
            raise StoreError(
                f"containerd socket {self.address} not found: is containerd running? (set it with --containerd-address)"
            )
        if not os.access(sock, os.R_OK | os.W_OK):
            raise StoreError(
                f"permission denied on containerd socket {self.address}: run as root "
                "or as a member of the group that owns it"
            )
        try:
            self._staging = await asyncio.to_thread(SafeDir.open, self.staging_dir)
        except OSError as e:
            raise StoreError(f"cannot create staging directory {self.staging_dir}: {e.strerror}") from None
        self._channel = grpc.aio.insecure_channel(
            f"unix://{sock.absolute()}",
            options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)],
        )
        self.content = content_pb2_grpc.ContentStub(self._channel)
        self._content_write = self._channel.stream_stream(  # Content.Write taking pre-encoded WRITE messages
            "/containerd.services.content.v1.Content/Write",
            request_serializer=_serialize_write,
            response_deserializer=content_pb2.WriteContentResponse.FromString,
        )
        self.images = images_pb2_grpc.ImagesStub(self._channel)
        self.leases = leases_pb2_grpc.LeasesStub(self._channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        self.diff = diff_pb2_grpc.DiffStub(self._channel)
        self.introspection = introspection_pb2_grpc.IntrospectionStub(self._channel)
        try:
            await version_pb2_grpc.VersionStub(self._channel).Version(empty_pb2.Empty(), timeout=10)
        except grpc.aio.AioRpcError as e:
            await self._channel.close()
            raise _translate(e, "connecting", self.address) from None
        return self

    @property
    def staging(self) -> SafeDir:
        assert self._staging is not None, "store used outside 'async with'"
        return self._staging

    async def __aexit__(self, *exc: object) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._channel is None:
            return
        for unpacker in self._unpackers.values():  # pulls that failed before their layers came
            unpacker.cancel()
        await asyncio.gather(*self._unpackers.values(), return_exceptions=True)
        for lease in list(self._leases.values()):  # pulls that ended without commit_image or abandon_image
            lease.users = 1
            self._release(lease)
        await asyncio.gather(*self._lease_drops, return_exceptions=True)
        await self._channel.close()
        self._channel = None

    def _md(self, lease: str | None = None) -> tuple[tuple[str, str], ...]:
        """gRPC metadata: the namespace, and the lease that what the call creates belongs to."""
        md = (("containerd-namespace", self.namespace),)
        return (*md, ("containerd-lease", lease)) if lease else md

    # ---- leases: one per image being pulled, as containerd's own client makes one per pull -----------------

    async def _hold_lease(self, key: tuple[str, ...]) -> _Lease:
        """The lease of image ``key``'s pulls, made by the first of them; held (``users``) until released."""
        lease = self._leases.get(key)
        if lease is None:
            lease = self._leases[key] = _Lease(f"puller-{secrets.token_hex(8)}")
            lease.created = asyncio.ensure_future(self._create_lease(lease.id))
        lease.users += 1
        assert lease.created is not None
        try:
            await asyncio.shield(lease.created)
        except BaseException:
            self._release(lease)
            raise
        return lease

    async def _create_lease(self, lease_id: str) -> None:
        """A lease that expires on its own (``lease_expiry``) if puller dies before dropping it."""
        expire = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.lease_expiry)
        labels = {"containerd.io/gc.expire": expire.strftime("%Y-%m-%dT%H:%M:%SZ")}
        try:
            await self.leases.Create(leases_pb2.CreateRequest(id=lease_id, labels=labels), metadata=self._md())
        except grpc.aio.AioRpcError as e:
            raise _translate(e, "creating a lease", self.address) from None

    def _lease_for_blob(self, digest: str) -> _Lease | None:
        """The lease a blob's write is made under: that of an image being pulled that has the blob. The write
        holds it, so that a pull that ends (or fails) first does not drop the lease under another's write."""
        for key, lease in self._leases.items():
            if digest in key and lease.users > 0:
                lease.users += 1
                return lease
        return None

    def _release(self, lease: _Lease) -> None:
        """One user fewer; the last drops the lease: what image records reference stays (gc labels), the rest
        goes to containerd's garbage collector."""
        lease.users -= 1
        if lease.users > 0:
            return
        for key, held in list(self._leases.items()):
            if held is lease:
                del self._leases[key]
        drop = asyncio.ensure_future(self._drop_lease(lease))
        self._lease_drops.add(drop)
        drop.add_done_callback(self._lease_drops.discard)

    async def _drop_lease(self, lease: _Lease) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, StoreError):  # else it expires on its own
            if lease.created is not None:
                await lease.created
            await self.leases.Delete(leases_pb2.DeleteRequest(id=lease.id), metadata=self._md())

    # ---- content ------------------------------------------------------------------------------------------

    async def _info(self, digest: str) -> content_pb2.Info | None:
        try:
            resp = await self.content.Info(content_pb2.InfoRequest(digest=digest), metadata=self._md())
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _translate(e, f"looking up {digest}", self.address) from None
        return resp.info

    async def reserve(self, blobs: list[Descriptor]) -> None:
        """Refuse, before any byte, a pull that cannot fit on containerd's filesystem: the blobs, plus (with
        unpack) an estimate of their unpacked size (UNPACK_RATIO times a compressed layer)."""
        if not blobs:
            return
        try:
            free = await asyncio.to_thread(free_bytes, self.root)
        except OSError as e:
            log.warning("cannot check free space of containerd's root %s (%s): set containerd_root", self.root, e)
            return
        download = sum(d.size for d in blobs)
        unpacked = sum(_unpacked_estimate(d) for d in blobs) if self.unpack else 0
        if download + unpacked > free:
            raise DiskFull(
                f"image needs about {(download + unpacked) / 1e6:,.0f} MB on {self.root} ({download / 1e6:,.0f} MB "
                f"to download + about {unpacked / 1e6:,.0f} MB unpacked), which has {free / 1e6:,.0f} MB free"
            )

    async def _raise_if_full(self, what: str, wanted: int) -> None:
        """DiskFull when containerd's root filesystem has less than ``wanted`` bytes free."""
        try:
            free = await asyncio.to_thread(free_bytes, self.root)
        except OSError:
            return
        if free < wanted:
            raise DiskFull(
                f"containerd ran out of disk space while {what}: {self.root} has {free / 1e6:,.1f} MB free, "
                f"{wanted / 1e6:,.1f} MB more were to be written"
            )

    async def has_blob(self, desc: Descriptor) -> bool:
        info = await self._info(str(desc.digest))
        return info is not None and info.size == desc.size

    async def memory_turn(self, priority: int) -> None:
        """Wait, in line by ``priority``, until memory was freed (see :meth:`_ContainerdSink.wait_admit`)."""
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._memory_waiters, (priority, next(self._memory_order), waiter))
        await waiter

    def memory_freed(self, everyone: bool = False) -> None:
        """Wake the first download waiting for memory (it hands on to the next), or ``everyone``."""
        while self._memory_waiters:
            _, _, waiter = heapq.heappop(self._memory_waiters)
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    def blob_sink(self, desc: Descriptor, staged: str) -> _ContainerdSink:
        """Stream the blob into containerd as it arrives, so the copy overlaps the download."""
        sink = _ContainerdSink(self, desc, staged)
        self._sinks[str(desc.digest)] = sink
        return sink

    async def commit_blob(self, desc: Descriptor, staged: str) -> None:
        """Finish the blob's stream into containerd (the engine gives every blob a sink), then drop the file."""
        await self._sinks.pop(str(desc.digest)).finish()
        self.staging.unlink(staged)
        self._ready_event(str(desc.digest)).set()

    def _ready_event(self, digest: str) -> asyncio.Event:
        return self._ready.setdefault(digest, asyncio.Event())

    async def _wait_present(self, desc: Descriptor) -> None:
        event = self._ready_event(str(desc.digest))  # made before the check: a commit in between still wakes us
        if not event.is_set() and not await self.has_blob(desc):
            await event.wait()

    async def _ingest_offset(self, ref: str, desc: Descriptor) -> int:
        """How many bytes of ``desc`` containerd holds in the ingest ``ref`` (0 if none or not for this blob)."""
        try:
            resp = await self.content.Status(content_pb2.StatusRequest(ref=ref), metadata=self._md())
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise _translate(e, f"asking for the ingest of {desc.digest}", self.address) from None
        status = resp.status
        if status.total not in (0, desc.size) or not 0 <= status.offset <= desc.size:
            await self._abort(ref)
            return 0
        return status.offset

    async def _abort(self, ref: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # nothing to abort is fine
            await self.content.Abort(content_pb2.AbortRequest(ref=ref), metadata=self._md())

    async def _put_bytes(self, desc: Descriptor, data: bytes, labels: dict[str, str], lease: str | None) -> None:
        async def chunks(offset: int) -> AsyncIterator[list[bytes]]:
            for i in range(offset, len(data), WRITE_MESSAGE):
                yield [data[i : i + WRITE_MESSAGE]]

        info = await self._info(str(desc.digest))
        if info is None:
            await self._write(desc, chunks, labels, lease=lease)
        elif any(info.labels.get(k) != v for k, v in labels.items()):
            await self._update_labels(str(desc.digest), labels)

    async def _write(
        self,
        desc: Descriptor,
        chunks,
        labels: dict[str, str],
        resume_at: int | None = None,
        lease: str | None = None,
    ) -> None:
        """One Write stream: STAT, ``chunks(offset)`` (lists of buffers) from containerd's offset, COMMIT.
        ``resume_at``: the offset the caller's chunks must start from (containerd reporting less means it lost
        bytes: an error)."""
        ref = f"puller-{desc.digest}"
        ref_bytes = ref.encode()
        digest = str(desc.digest)
        call = self._content_write(metadata=self._md(lease))
        offset = 0
        try:
            await call.write(
                content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=desc.size, expected=digest)
            )
            status = await call.read()
            offset = status.offset if 0 <= status.offset <= desc.size else 0
            if resume_at is not None and offset < resume_at:
                raise StoreError(
                    f"containerd's ingest of {digest} went back from {resume_at} to {offset} bytes during the pull"
                )
            # containerd answers every message; up to WRITE_DEPTH wait for their answer, which bounds a stream's
            # memory while containerd always has the next message at hand (ingest measured 15-30% faster than
            # one at a time, containerd's own client's way).
            unanswered = 0
            async for data in chunks(offset):
                await call.write(_write_message(ref_bytes, offset, data))
                offset += sum(map(len, data))
                unanswered += 1
                if unanswered == WRITE_DEPTH:
                    await call.read()
                    unanswered -= 1
            for _ in range(unanswered):
                await call.read()
            await call.write(
                content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT, ref=ref, offset=offset, total=desc.size, expected=digest, labels=labels
                )
            )
            await call.read()
            await call.done_writing()
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                if labels:
                    await self._update_labels(digest, labels)
                return
            if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                # The stream broke on our side first (containerd's own status is lost then): a full disk is the
                # usual cause, and one that must say so (exit 10).
                await self._raise_if_full(f"writing {digest}", desc.size - offset)
            mismatch = _COMMIT_DIGEST.search(e.details() or "")
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and mismatch:
                raise DigestMismatch(digest, mismatch.group(1), what="blob (checked by containerd)") from None
            raise _translate(e, f"writing {digest}", self.address) from None
        except asyncio.InvalidStateError:
            # The stream ended under us (containerd restarted, say) while we were writing: report why.
            code, details = await call.code(), await call.details()
            if code == grpc.StatusCode.ALREADY_EXISTS:
                return
            raise StoreError(
                f"containerd at {self.address} ended the write of {digest}: {code.name} {details}".rstrip()
            ) from None
        finally:
            call.cancel()

    async def _update_labels(self, digest: str, labels: dict[str, str]) -> None:
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        try:
            await self.content.Update(
                content_pb2.UpdateRequest(info=content_pb2.Info(digest=digest, labels=labels), update_mask=mask),
                metadata=self._md(),
            )
        except grpc.aio.AioRpcError as e:
            raise _translate(e, f"labelling {digest}", self.address) from None

    async def _read_all(self, digest: str) -> bytes:
        parts = []
        try:
            async for resp in self.content.Read(content_pb2.ReadContentRequest(digest=digest), metadata=self._md()):
                parts.append(resp.data)
        except grpc.aio.AioRpcError as e:
            raise _translate(e, f"reading {digest}", self.address) from None
        return b"".join(parts)

    # ---- image --------------------------------------------------------------------------------------------

    async def commit_image(
        self, ref: Reference, target: Descriptor, documents: list[tuple[Descriptor, bytes]], pin: bool = False
    ) -> None:
        source = _source_label(ref)
        top = documents[0][0]
        parsed = [(desc, data, mf.parse(data, desc.media_type)) for desc, data in documents]
        manifest = next(doc for _, _, doc in parsed if isinstance(doc, mf.Manifest))
        held = self._leases.get(_image_key(manifest))
        lease = held.id if held else None
        # Children first, so that a parent's gc references never point at missing content.
        for desc, data, doc in reversed(parsed):
            await self._put_bytes(desc, data, {**gc_labels(doc), **source}, lease)
        unlabelled = [d for d in manifest.blobs if self._labelled.get(str(d.digest)) != source]  # e.g. present
        await asyncio.gather(*(self._update_labels(str(d.digest), source) for d in unlabelled))
        unpacker = self._unpackers.pop(_image_key(manifest), None)
        if unpacker is not None:
            await unpacker
        elif self.unpack:
            await self._unpack(manifest, lease)
        for name in _image_names(ref, str(top.digest)):
            await self._put_image(name, top, pin, lease)
        self._end_image(manifest)

    async def _put_image(self, name: str, target: Descriptor, pin: bool, lease: str | None) -> None:
        """Create or update image record ``name``. ``pin`` pins it for the CRI (kubelet's image GC skips it),
        marked as puller's pin unless someone else had pinned it already; without ``pin``, only a pin puller
        set is taken off."""
        labels = dict([CRI_MANAGED, CRI_PINNED, PULLER_PINNED] if pin else [CRI_MANAGED])
        image = images_pb2.Image(
            name=name,
            labels=labels,
            target=types_pb2.Descriptor(media_type=target.media_type, digest=str(target.digest), size=target.size),
        )
        try:
            await self.images.Create(images_pb2.CreateImageRequest(image=image), metadata=self._md(lease))
            return
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise _translate(e, f"creating image {name}", self.address) from None
        # The name exists (the tag moved, or a re-pull): point it at this target, keep its other labels.
        existing = await self._labels(name)
        ours = existing.get(PULLER_PINNED[0]) == PULLER_PINNED[1]
        theirs = existing.get(CRI_PINNED[0]) == CRI_PINNED[1] and not ours
        if pin and theirs:
            del labels[PULLER_PINNED[0]]  # pinned by someone else: it stays their pin
        paths = ["target", *(f"labels.{k}" for k in labels)]
        if not pin and ours:
            paths += [f"labels.{CRI_PINNED[0]}", f"labels.{PULLER_PINNED[0]}"]  # absent from labels: removed
        mask = field_mask_pb2.FieldMask(paths=paths)
        try:
            await self.images.Update(images_pb2.UpdateImageRequest(image=image, update_mask=mask), metadata=self._md())
        except grpc.aio.AioRpcError as e:
            raise _translate(e, f"updating image {name}", self.address) from None

    async def _get_image(self, name: str) -> images_pb2.Image | None:
        try:
            found = await self.images.Get(images_pb2.GetImageRequest(name=name), metadata=self._md())
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _translate(e, f"looking up image {name}", self.address) from None
        return found.image

    async def _labels(self, name: str) -> dict[str, str]:
        """The labels of image record ``name`` ({} when there is none)."""
        image = await self._get_image(name)
        return dict(image.labels) if image is not None else {}

    async def unpin_image(self, ref: Reference, digest: str | None) -> None:
        """Take off the CRI pin of ``ref``'s records (by tag, and by ``digest`` when known), where puller set it;
        a pin someone else set stays."""
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{CRI_PINNED[0]}", f"labels.{PULLER_PINNED[0]}"])
        for name in _image_names(ref, digest):
            image = await self._get_image(name)
            if image is None or image.labels.get(PULLER_PINNED[0]) != PULLER_PINNED[1]:
                continue
            image.labels.pop(CRI_PINNED[0], None)
            image.labels.pop(PULLER_PINNED[0], None)
            # The whole record goes back, target included: containerd 2.2.9 dies on an Update without one.
            try:
                await self.images.Update(
                    images_pb2.UpdateImageRequest(image=image, update_mask=mask), metadata=self._md()
                )
            except grpc.aio.AioRpcError as e:
                raise _translate(e, f"unpinning image {name}", self.address) from None

    # ---- unpack -------------------------------------------------------------------------------------------

    async def begin_image(self, ref: Reference, manifest: mf.Manifest) -> None:
        """Take a lease for the pull; stream blobs into containerd in manifest order (committed with their
        distribution source label), and unpack each layer as soon as it and the ones below it are committed,
        while later layers download."""
        key = _image_key(manifest)
        lease = await self._hold_lease(key)
        self._order.update((str(d.digest), i) for i, d in enumerate(manifest.blobs))
        source = _source_label(ref)
        self._sources.update((str(d.digest), source) for d in manifest.blobs)
        self._images[key] = self._images.get(key, 0) + 1
        if self.unpack and key not in self._unpackers:
            self._unpackers[key] = asyncio.ensure_future(self._unpack(manifest, lease.id))

    async def abandon_image(self, manifest: mf.Manifest) -> None:
        """The pull failed: stop waiting to unpack its layers."""
        unpacker = self._unpackers.pop(_image_key(manifest), None)
        if unpacker is not None:
            unpacker.cancel()
            await asyncio.gather(unpacker, return_exceptions=True)
        self._end_image(manifest)

    def _end_image(self, manifest: mf.Manifest) -> None:
        """Forget what was kept per blob for this image, unless another pull in progress shares the blob (a daemon
        runs for weeks), and let go of the pull's lease."""
        key = _image_key(manifest)
        lease = self._leases.get(key)
        if lease is not None:
            self._release(lease)
        left = self._images.get(key, 0) - 1
        if left > 0:
            self._images[key] = left
            return
        self._images.pop(key, None)
        in_use = {digest for other in self._images for digest in other}
        for digest in set(key) - in_use:
            for per_blob in (self._order, self._sources, self._labelled, self._ready):
                per_blob.pop(digest, None)

    async def _unpack(self, manifest: mf.Manifest, lease: str | None) -> None:
        """Apply every layer whose snapshot is missing, each as soon as its blob is committed: one after another
        on its parent, or, where the snapshotter can rebase (overlayfs in containerd 2.2+), several at once,
        each prepared without a parent and committed onto it in layer order (containerd's parallel unpack)."""
        await self._wait_present(manifest.config)
        config = json.loads(await self._read_all(str(manifest.config.digest)))
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        if len(diff_ids) != len(manifest.layers):
            raise StoreError(f"image config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers")
        chains = chain_ids(diff_ids)
        first = 0  # layers below the first missing snapshot are there (a chain cannot exist without its parent)
        while first < len(chains) and await self._snapshot_exists(chains[first]):
            first += 1
        layers = [
            _Layer(layer, diff_ids[i], chains[i], chains[i - 1] if i else "") for i, layer in enumerate(manifest.layers)
        ][first:]
        parallel = len(layers) > 1 and await self._can_rebase()
        if parallel:
            log.info("unpacking %d layers in parallel (%s can rebase)", len(layers), self.snapshotter)
        applying: list[asyncio.Future] = []
        labelling: list[asyncio.Future] = []  # label updates go on while the next layers are applied
        committed: set[str] = set()
        try:
            if parallel:
                slots = asyncio.Semaphore(PARALLEL_UNPACKS)
                applying = [asyncio.ensure_future(self._prepare_apply(x, lease, slots, rebase=True)) for x in layers]
            for i, x in enumerate(layers):
                key = await (applying[i] if parallel else self._prepare_apply(x, lease, None, rebase=False))
                committed.add(key)  # by _commit_layer, or removed by it on failure
                await self._commit_layer(x, key, lease, onto_parent=parallel)
                label = self._update_labels(str(x.desc.digest), {UNCOMPRESSED: x.diff_id})
                labelling.append(asyncio.ensure_future(label))
            await asyncio.gather(*labelling)
        finally:
            for task in [*applying, *labelling]:
                task.cancel()
            for key in await asyncio.gather(*applying, return_exceptions=True):
                if isinstance(key, str) and key not in committed:
                    await self._remove_snapshot(key)  # applied, but a layer below it failed
        if chains:
            await self._update_labels(str(manifest.config.digest), {f"{GC_SNAPSHOT}.{self.snapshotter}": chains[-1]})

    async def _can_rebase(self) -> bool:
        """Whether the snapshotter advertises the "rebase" capability (Introspection; containerd 2.2+)."""
        if self._rebase is None:
            request = introspection_pb2.PluginsRequest(filters=[f"type=={SNAPSHOTTER_PLUGIN},id=={self.snapshotter}"])
            try:
                found = await self.introspection.Plugins(request, metadata=self._md())
                self._rebase = any("rebase" in p.capabilities for p in found.plugins)
            except grpc.aio.AioRpcError as e:
                log.debug("introspection: %s; unpacking one layer at a time", e.details())
                self._rebase = False
        return self._rebase

    async def _snapshot_exists(self, chain_id: str) -> bool:
        try:
            await self.snapshots.Stat(
                snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=chain_id), metadata=self._md()
            )
            return True
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND and "snapshotter not loaded" not in (e.details() or ""):
                return False
            raise self._snapshot_error(e, "checking snapshots") from None

    def _snapshot_error(self, e: grpc.aio.AioRpcError, what: str) -> StoreError:
        if "snapshotter not loaded" in (e.details() or ""):
            return StoreError(f"containerd has no snapshotter {self.snapshotter!r} (set it with --snapshotter)")
        return _translate(e, what, self.address)

    async def _prepare_apply(self, x: _Layer, lease: str | None, slots: asyncio.Semaphore | None, rebase: bool) -> str:
        """Prepare an active snapshot for layer ``x`` (without a parent when ``rebase``) and apply the layer into
        it once its blob is committed; returns the snapshot key (removed again on failure)."""
        await self._wait_present(x.desc)
        key = f"extract-{secrets.token_hex(6)} {x.chain_id}"
        md = self._md(lease)
        parent = "" if rebase else x.parent
        try:
            prepared = await self.snapshots.Prepare(
                snapshots_pb2.PrepareSnapshotRequest(
                    snapshotter=self.snapshotter, key=key, parent=parent, labels=x.labels
                ),
                metadata=md,
            )
        except grpc.aio.AioRpcError as e:
            raise self._snapshot_error(e, f"preparing a snapshot for {x.desc.digest}") from None
        mounts = list(prepared.mounts)
        if rebase and x.parent:
            mounts = [_bind_to_overlay(m) for m in mounts]  # so that the differ writes whiteouts as overlayfs does
        try:
            async with slots or contextlib.nullcontext():
                applied = await self.diff.Apply(
                    diff_pb2.ApplyRequest(
                        diff=types_pb2.Descriptor(
                            media_type=x.desc.media_type, digest=str(x.desc.digest), size=x.desc.size
                        ),
                        mounts=mounts,
                    ),
                    metadata=md,
                )
            if applied.applied.digest != x.diff_id:
                raise StoreError(
                    f"layer {x.desc.digest} unpacked to {applied.applied.digest}, but the image config says {x.diff_id}"
                )
        except grpc.aio.AioRpcError as e:
            await self._remove_snapshot(key)
            raise self._snapshot_error(e, f"unpacking {x.desc.digest}") from None
        except BaseException:
            await self._remove_snapshot(key)
            raise
        return key

    async def _commit_layer(self, x: _Layer, key: str, lease: str | None, onto_parent: bool) -> None:
        """Commit the applied snapshot ``key`` as the layer's chain ID (onto its parent, for a rebased one)."""
        request = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=x.chain_id, key=key, labels=x.labels
        )
        if onto_parent:
            request.parent = x.parent
        try:
            await self.snapshots.Commit(request, metadata=self._md(lease))
        except grpc.aio.AioRpcError as e:
            await self._remove_snapshot(key)
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                return  # unpacked by someone else meanwhile
            raise self._snapshot_error(e, f"committing the snapshot of {x.desc.digest}") from None
        except BaseException:
            await self._remove_snapshot(key)
            raise

    async def _remove_snapshot(self, key: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # else the lease's expiry lets containerd collect it
            await self.snapshots.Remove(
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key), metadata=self._md()
            )


@dataclass(slots=True)
class _Lease:
    """A containerd lease for the pulls of one image, and for the blob writes made under it."""

    id: str
    users: int = 0  # pulls of the image in progress + blob writes under it; the last drops the lease
    created: asyncio.Future | None = None  # the Create call


def _unpacked_estimate(desc: Descriptor) -> int:
    """About how many bytes a layer takes once unpacked (0 for what is not a layer)."""
    if "gzip" in desc.media_type or "zstd" in desc.media_type:
        return desc.size * UNPACK_RATIO
    return desc.size if "tar" in desc.media_type else 0


def _image_names(ref: Reference, digest: str | None) -> list[str]:
    """The records of an image, as the CRI expects them: ``NAME:TAG`` and ``NAME@DIGEST``."""
    names = [f"{ref.name}:{ref.tag}"] if ref.tag else []
    if digest:
        names.append(f"{ref.name}@{digest}")
    return names


@dataclass(frozen=True, slots=True)
class _Layer:
    """One layer to unpack: its blob, its diff ID (uncompressed digest), its chain ID and its parent's."""

    desc: Descriptor
    diff_id: str
    chain_id: str
    parent: str

    @property
    def labels(self) -> dict[str, str]:
        labels = {SNAPSHOT_REF: self.chain_id, SNAPSHOT_DIFF_ID: self.diff_id}
        if self.parent:
            labels[SNAPSHOT_PARENT] = self.parent
        return labels


def _bind_to_overlay(mount: types_pb2.Mount) -> types_pb2.Mount:
    """A snapshot prepared without a parent is a bind mount of its directory; given to the differ as an overlay
    mount with that directory as upperdir, it is applied as an upper layer (whiteouts as overlayfs writes them),
    as containerd's parallel unpacker does."""
    if mount.type != "bind":
        return mount
    options = [o for o in mount.options if o != "rbind"] + [f"upperdir={mount.source}"]
    return types_pb2.Mount(type="overlay", source="overlay", options=options)
