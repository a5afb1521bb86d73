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
from pathlib import Path

import grpc
from google.protobuf import empty_pb2, field_mask_pb2

from ..errors import DigestMismatch, StoreError
from ..priority import PrioritySemaphore
from ..reference import Reference
from ..registry import manifest as mf
from ..registry.manifest import Descriptor
from . import StoreBase
from .containerd_api import (
    content_pb2,
    content_pb2_grpc,
    diff_pb2,
    diff_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    snapshots_pb2,
    snapshots_pb2_grpc,
    types_pb2,
    version_pb2_grpc,
)
from .defaults import CONTAINERD_ADDRESS as DEFAULT_ADDRESS
from .defaults import CONTAINERD_NAMESPACE as DEFAULT_NAMESPACE
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
LEASE_EXPIRY = datetime.timedelta(hours=24)  # a crashed puller's lease expires; containerd then collects

GC_CONTENT = "containerd.io/gc.ref.content"
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot"
DISTRIBUTION_SOURCE = "containerd.io/distribution.source"
UNCOMPRESSED = "containerd.io/uncompressed"
CRI_MANAGED = ("io.cri-containerd.image", "managed")
CRI_PINNED = ("io.cri-containerd.pinned", "pinned")
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
        await self._store._write(self.desc, self._chunks, labels, resume_at=self.sent)
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

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
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
    return StoreError(f"containerd: {what}: {detail or code.name}")


class ContainerdStore(StoreBase):
    """Use as ``async with ContainerdStore(...) as store``."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        namespace: str = DEFAULT_NAMESPACE,
        snapshotter: str = DEFAULT_SNAPSHOTTER,
        unpack: bool = True,
        pin: bool = False,
        staging_dir: str | os.PathLike[str] = DEFAULT_STAGING,
    ):
        self.address = address
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.unpack = unpack
        self.pin = pin
        self.staging_dir = Path(staging_dir).absolute()
        self._staging: SafeDir | None = None
        self.lease_id = f"puller-{secrets.token_hex(8)}"
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
        try:
            await version_pb2_grpc.VersionStub(self._channel).Version(empty_pb2.Empty(), timeout=10)
            expire = (datetime.datetime.now(datetime.UTC) + LEASE_EXPIRY).strftime("%Y-%m-%dT%H:%M:%SZ")
            await self.leases.Create(
                leases_pb2.CreateRequest(id=self.lease_id, labels={"containerd.io/gc.expire": expire}),
                metadata=self._md(lease=False),
            )
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
        # Drop the lease: what the image record references stays (gc labels); the rest is collected. If this
        # fails the lease expires on its own.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.leases.Delete(leases_pb2.DeleteRequest(id=self.lease_id), metadata=self._md(lease=False))
        await self._channel.close()
        self._channel = None

    def _md(self, lease: bool = True) -> tuple[tuple[str, str], ...]:
        md = (("containerd-namespace", self.namespace),)
        return (*md, ("containerd-lease", self.lease_id)) if lease else md

    # ---- content ------------------------------------------------------------------------------------------

    async def _info(self, digest: str) -> content_pb2.Info | None:
        try:
            resp = await self.content.Info(content_pb2.InfoRequest(digest=digest), metadata=self._md())
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _translate(e, f"looking up {digest}", self.address) from None
        return resp.info

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

    async def _put_bytes(self, desc: Descriptor, data: bytes, labels: dict[str, str]) -> None:
        async def chunks(offset: int) -> AsyncIterator[list[bytes]]:
            for i in range(offset, len(data), WRITE_MESSAGE):
                yield [data[i : i + WRITE_MESSAGE]]

        info = await self._info(str(desc.digest))
        if info is None:
            await self._write(desc, chunks, labels)
        elif any(info.labels.get(k) != v for k, v in labels.items()):
            await self._update_labels(str(desc.digest), labels)

    async def _write(self, desc: Descriptor, chunks, labels: dict[str, str], resume_at: int | None = None) -> None:
        """One Write stream: STAT, ``chunks(offset)`` (lists of buffers) from containerd's offset, COMMIT.
        ``resume_at``: the offset the caller's chunks must start from (containerd reporting less means it lost
        bytes: an error)."""
        ref = f"puller-{desc.digest}"
        ref_bytes = ref.encode()
        digest = str(desc.digest)
        call = self._content_write(metadata=self._md())
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
        # Children first, so that a parent's gc references never point at missing content.
        for desc, data in reversed(documents):
            doc = mf.parse(data, desc.media_type)
            await self._put_bytes(desc, data, {**gc_labels(doc), **source})
            if isinstance(doc, mf.Manifest):
                manifest = doc
        unlabelled = [d for d in manifest.blobs if self._labelled.get(str(d.digest)) != source]  # e.g. present
        await asyncio.gather(*(self._update_labels(str(d.digest), source) for d in unlabelled))
        unpacker = self._unpackers.pop(_image_key(manifest), None)
        if unpacker is not None:
            await unpacker
        elif self.unpack:
            await self._unpack(manifest)
        labels = dict([CRI_MANAGED, CRI_PINNED] if self.pin or pin else [CRI_MANAGED])
        names = [f"{ref.name}@{top.digest}"]
        if ref.tag:
            names.insert(0, f"{ref.name}:{ref.tag}")
        for name in names:
            await self._put_image(name, top, labels)
        self._end_image(manifest)

    async def _put_image(self, name: str, target: Descriptor, labels: dict[str, str]) -> None:
        image = images_pb2.Image(
            name=name,
            labels=labels,
            target=types_pb2.Descriptor(media_type=target.media_type, digest=str(target.digest), size=target.size),
        )
        try:
            await self.images.Create(images_pb2.CreateImageRequest(image=image), metadata=self._md())
            return
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise _translate(e, f"creating image {name}", self.address) from None
        # The name exists (the tag moved, or a re-pull): point it at this target, keep its other labels.
        mask = field_mask_pb2.FieldMask(paths=["target", *(f"labels.{k}" for k in labels)])
        try:
            await self.images.Update(images_pb2.UpdateImageRequest(image=image, update_mask=mask), metadata=self._md())
        except grpc.aio.AioRpcError as e:
            raise _translate(e, f"updating image {name}", self.address) from None

    # ---- unpack -------------------------------------------------------------------------------------------

    def begin_image(self, ref: Reference, manifest: mf.Manifest) -> None:
        """Stream blobs into containerd in manifest order (committed with their distribution source label), and
        unpack each layer as soon as it and the ones below it are committed, while later layers download."""
        self._order.update((str(d.digest), i) for i, d in enumerate(manifest.blobs))
        source = _source_label(ref)
        self._sources.update((str(d.digest), source) for d in manifest.blobs)
        key = _image_key(manifest)
        self._images[key] = self._images.get(key, 0) + 1
        if self.unpack and key not in self._unpackers:
            self._unpackers[key] = asyncio.ensure_future(self._unpack(manifest))

    async def abandon_image(self, manifest: mf.Manifest) -> None:
        """The pull failed: stop waiting to unpack its layers."""
        unpacker = self._unpackers.pop(_image_key(manifest), None)
        if unpacker is not None:
            unpacker.cancel()
            await asyncio.gather(unpacker, return_exceptions=True)
        self._end_image(manifest)

    def _end_image(self, manifest: mf.Manifest) -> None:
        """Forget what was kept per blob for this image, unless another pull in progress shares the blob (a daemon
        runs for weeks)."""
        key = _image_key(manifest)
        left = self._images.get(key, 0) - 1
        if left > 0:
            self._images[key] = left
            return
        self._images.pop(key, None)
        in_use = {digest for other in self._images for digest in other}
        for digest in set(key) - in_use:
            for per_blob in (self._order, self._sources, self._labelled, self._ready):
                per_blob.pop(digest, None)

    async def _unpack(self, manifest: mf.Manifest) -> None:
        await self._wait_present(manifest.config)
        config = json.loads(await self._read_all(str(manifest.config.digest)))
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        if len(diff_ids) != len(manifest.layers):
            raise StoreError(f"image config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers")
        chains = chain_ids(diff_ids)
        labelling: list[asyncio.Future] = []  # label updates go on while the next layers are applied
        may_exist = True  # a chain whose parent is missing cannot exist: no need to ask
        try:
            for i, layer in enumerate(manifest.layers):
                await self._wait_present(layer)
                if may_exist and await self._snapshot_exists(chains[i]):
                    continue
                may_exist = False
                await self._apply_layer(layer, diff_ids[i], chains[i], chains[i - 1] if i else "")
                label = self._update_labels(str(layer.digest), {UNCOMPRESSED: diff_ids[i]})
                labelling.append(asyncio.ensure_future(label))
            await asyncio.gather(*labelling)
        finally:
            for task in labelling:
                task.cancel()
        if chains:
            await self._update_labels(str(manifest.config.digest), {f"{GC_SNAPSHOT}.{self.snapshotter}": chains[-1]})

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

    async def _apply_layer(self, layer: Descriptor, diff_id: str, chain_id: str, parent: str) -> None:
        key = f"extract-{secrets.token_hex(6)} {chain_id}"
        labels = {SNAPSHOT_REF: chain_id, SNAPSHOT_DIFF_ID: diff_id}
        if parent:
            labels[SNAPSHOT_PARENT] = parent
        md = self._md()
        try:
            prepared = await self.snapshots.Prepare(
                snapshots_pb2.PrepareSnapshotRequest(
                    snapshotter=self.snapshotter, key=key, parent=parent, labels=labels
                ),
                metadata=md,
            )
        except grpc.aio.AioRpcError as e:
            raise self._snapshot_error(e, f"preparing a snapshot for {layer.digest}") from None
        try:
            applied = await self.diff.Apply(
                diff_pb2.ApplyRequest(
                    diff=types_pb2.Descriptor(media_type=layer.media_type, digest=str(layer.digest), size=layer.size),
                    mounts=prepared.mounts,
                ),
                metadata=md,
            )
            if applied.applied.digest != diff_id:
                raise StoreError(
                    f"layer {layer.digest} unpacked to {applied.applied.digest}, but the image config says {diff_id}"
                )
            await self.snapshots.Commit(
                snapshots_pb2.CommitSnapshotRequest(
                    snapshotter=self.snapshotter, name=chain_id, key=key, labels=labels
                ),
                metadata=md,
            )
        except grpc.aio.AioRpcError as e:
            await self._remove_snapshot(key)
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                return  # unpacked by someone else meanwhile
            raise self._snapshot_error(e, f"unpacking {layer.digest}") from None
        except BaseException:
            await self._remove_snapshot(key)
            raise

    async def _remove_snapshot(self, key: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # else the lease's expiry lets containerd collect it
            await self.snapshots.Remove(
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key), metadata=self._md()
            )
