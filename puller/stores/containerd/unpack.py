"""Unpacking layers into the snapshotter, as containerd's unpacker does.

Each layer is applied into an active snapshot (key ``extract-<unique> <chainID>``) and committed as its chain ID;
the config gets ``containerd.io/gc.ref.snapshot.<snapshotter>`` and each layer ``containerd.io/uncompressed``.
Where the snapshotter can rebase (overlayfs in containerd 2.2+), every layer is prepared without a parent and
committed onto its parent in layer order (containerd's parallel unpack); elsewhere one after another.

Two ways to apply a layer (:class:`ApplyPath`):

- ``stream``: puller's own applier (:mod:`puller.unpack`, in a worker process of its own) writes the layer into its
  snapshot's directory while the blob downloads, from the bytes streamed into containerd (the writer hands them to a
  :class:`~puller.unpack.process.LayerFeed`); the snapshot is committed once containerd has committed the blob (its
  digest checked) and the applier found the diff ID of the config. Chosen by ``auto`` where containerd is 2.2.3
  or later, the snapshotter is overlayfs and can rebase, puller has the capabilities to create a layer's files
  (STREAM_CAPABILITIES: a pod whose capabilities are dropped has none) and containerd's root is writable here
  (not a read-only mount), and puller can open the snapshot's directory (it runs as root beside containerd). A
  layer whose bytes did not all pass through its feed (a pull that resumes a blob containerd holds part of) is
  applied by the Diff service instead.
- ``diff``: containerd's Diff service applies each layer once its blob is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import empty_pb2

from ...errors import ConfigError, StoreError
from ...registry import manifest as mf
from ...registry.manifest import Descriptor
from ...unpack import Limits
from ...unpack.process import ApplierProcess, LayerFeed
from ..containerd_api import diff_pb2, introspection_pb2, snapshots_pb2, types_pb2
from ..safedir import SafeDir
from .api import DIFF, INTROSPECTION, SNAPSHOTS, Api
from .content import Content
from .stream import RpcError, StatusCode

log = logging.getLogger(__name__)


GC_SNAPSHOT = "containerd.io/gc.ref.snapshot"
UNCOMPRESSED = "containerd.io/uncompressed"
APPLY_TIMEOUT_S = 1800.0  # unpacking one layer (gigabytes, on a slow disk) may take minutes; not forever
PARALLEL_UNPACKS = 3  # layers applied at once where the snapshotter can rebase (decompression is containerd's CPU)
SNAPSHOTTER_PLUGIN = "io.containerd.snapshotter.v1"
SNAPSHOT_REF = "containerd.io/snapshot.ref"
SNAPSHOT_DIFF_ID = "containerd.io/snapshot/diff-id"
SNAPSHOT_PARENT = "containerd.io/snapshot/parent-chain-id"

APPLY_PATHS = ("auto", "stream", "diff")
STREAM_SINCE = (2, 2, 3)  # parallel unpack keeps whiteouts since 2.2.3
# What applying a layer as containerd does takes (bit numbers of linux/capability.h): ownership, modes and times of
# files that are not puller's, setuid bits, device nodes and whiteouts, trusted.* and security.capability xattrs.
STREAM_CAPABILITIES = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_SYS_ADMIN": 21,
    "CAP_MKNOD": 27,
    "CAP_SETFCAP": 31,
}

WaitPresent = Callable[[Descriptor], Awaitable[None]]  # returns once the blob is committed
FeedSlot = Callable[[Descriptor], "asyncio.Future[LayerFeed | None] | None"]  # where a layer's writer finds its feed


@dataclass(frozen=True, slots=True)
class ApplyPath:
    """How this store applies layers: ``stream`` (puller's applier, while downloading) or ``diff`` (containerd's
    Diff service, after), and why."""

    name: str
    reason: str


def missing_capabilities() -> list[str]:
    """The STREAM_CAPABILITIES this process does not have in effect."""
    try:
        status = Path("/proc/self/status").read_text()
        effective = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        return []  # not Linux's procfs: let the first layer tell
    return [name for name, bit in STREAM_CAPABILITIES.items() if not effective >> bit & 1]


def version_tuple(version: str) -> tuple[int, ...]:
    """containerd's version string ("v2.4.2", "1.6.20~ds1") as numbers, () when it has none."""
    found = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(n) for n in found.groups()) if found else ()


class _CannotStream(Exception):
    """puller's applier cannot write into this snapshot (its mount is not a directory puller can open)."""


class Unpacker:
    def __init__(
        self,
        api: Api,
        content: Content,
        snapshotter: str,
        apply: str = "auto",
        limits: Limits | None = None,
        root: Path | None = None,
    ):
        if apply not in APPLY_PATHS:
            raise ConfigError(f"unpack_path must be one of {', '.join(APPLY_PATHS)}, not {apply!r}")
        self.api = api
        self.content = content
        self.snapshotter = snapshotter
        self.apply = apply
        self.limits = limits or Limits()
        self.root = root  # containerd's root, where the snapshots' directories are
        self._rebase: bool | None = None  # the snapshotter can rebase (parallel unpack); asked once
        self._path: ApplyPath | None = None
        self._applier: ApplierProcess | None = None  # started with the first layer applied by the stream path

    @property
    def chosen(self) -> ApplyPath | None:
        """The way layers are applied, once :meth:`path` decided it."""
        return self._path

    async def path(self) -> ApplyPath:
        """The way layers are applied (see the module docstring), decided once."""
        if self._path is None:
            self._path = await self._choose_path()
            log.info("layers applied by %s: %s", self._path.name, self._path.reason)
        return self._path

    async def _choose_path(self) -> ApplyPath:
        if self.apply == "diff":
            return ApplyPath("diff", "unpack_path is diff")
        version = version_tuple(self.api.version)
        why_not = ""
        if self.snapshotter != "overlayfs":
            why_not = f"the snapshotter is {self.snapshotter}, not overlayfs"
        elif not version or version < STREAM_SINCE:
            why_not = f"containerd {self.api.version or '(unknown version)'} is older than 2.2.3"
        elif not await self._can_rebase():
            why_not = "the snapshotter cannot rebase (containerd in a user namespace?)"
        elif missing := missing_capabilities():
            why_not = f"puller lacks {', '.join(missing)} to create a layer's files (a pod that drops them?)"
        elif self.root is not None and self.root.is_dir() and not os.access(self.root, os.W_OK):
            why_not = f"containerd's root {self.root} is not writable here (a read-only mount?)"
        if why_not:
            if self.apply == "stream":
                raise ConfigError(f"unpack_path is stream, but {why_not}")
            return ApplyPath("diff", why_not)
        return ApplyPath("stream", f"containerd {self.api.version} with overlayfs snapshots that rebase")

    async def close(self) -> None:
        if self._applier is not None:
            await self._applier.close()
            self._applier = None

    async def unpack(
        self, manifest: mf.Manifest, lease: str | None, wait_present: WaitPresent, feeds: FeedSlot | None = None
    ) -> None:
        """Apply every layer whose snapshot is missing: one after another on its parent, or, where the snapshotter
        can rebase (overlayfs in containerd 2.2+), several at once, each prepared without a parent and committed
        onto it in layer order (containerd's parallel unpack). A layer with a feed slot (``feeds``, on the stream
        path) is applied while it downloads; the others as soon as their blob is committed."""
        try:
            await self._unpack(manifest, lease, wait_present, feeds)
        finally:  # a layer it did not get to (present, failed before): its writer goes on without a feed
            for layer in manifest.layers:
                slot = feeds(layer) if feeds is not None else None
                if slot is not None and not slot.done():
                    slot.set_result(None)

    async def _unpack(
        self, manifest: mf.Manifest, lease: str | None, wait_present: WaitPresent, feeds: FeedSlot | None
    ) -> None:
        await wait_present(manifest.config)
        config = json.loads(await self.content.read_all(str(manifest.config.digest)))
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        if len(diff_ids) != len(manifest.layers):
            raise StoreError(f"image config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers")
        chains = chain_ids(diff_ids)
        first = 0  # layers below the first missing snapshot are there (a chain cannot exist without its parent)
        while first < len(chains) and await self._snapshot_exists(chains[first]):
            first += 1
        layers = [
            Layer(layer, diff_ids[i], chains[i], chains[i - 1] if i else "") for i, layer in enumerate(manifest.layers)
        ][first:]
        # on the stream path even one layer is prepared without a parent (its applier cannot write on a parent)
        parallel = (len(layers) > 1 or feeds is not None) and await self._can_rebase()
        if parallel and len(layers) > 1:
            log.info("unpacking %d layers in parallel (%s can rebase)", len(layers), self.snapshotter)
        applying: list[asyncio.Future] = []
        labelling: list[asyncio.Future] = []  # label updates go on while the next layers are applied
        committed: set[str] = set()
        try:
            if parallel:
                slots = asyncio.Semaphore(PARALLEL_UNPACKS)
                applying = [
                    asyncio.ensure_future(self._apply_one(x, lease, slots, wait_present, feeds)) for x in layers
                ]
            for i, x in enumerate(layers):
                key = await (applying[i] if parallel else self._prepare_apply(x, lease, None, False, wait_present))
                committed.add(key)  # by _commit_layer, or removed by it on failure
                await self._commit_layer(x, key, lease, onto_parent=parallel)
                label = self.content.update_labels(str(x.desc.digest), {UNCOMPRESSED: x.diff_id})
                labelling.append(asyncio.ensure_future(label))
            await asyncio.gather(*labelling)
        finally:
            for task in [*applying, *labelling]:
                task.cancel()
            for key in await asyncio.gather(*applying, return_exceptions=True):
                if isinstance(key, str) and key not in committed:
                    await self._remove_snapshot(key)  # applied, but a layer below it failed
        if chains:
            await self.content.update_labels(
                str(manifest.config.digest), {f"{GC_SNAPSHOT}.{self.snapshotter}": chains[-1]}
            )

    async def _can_rebase(self) -> bool:
        """Whether the snapshotter advertises the "rebase" capability (Introspection; containerd 2.2+)."""
        if self._rebase is None:
            request = introspection_pb2.PluginsRequest(filters=[f"type=={SNAPSHOTTER_PLUGIN},id=={self.snapshotter}"])
            try:
                found = await self.api.call(INTROSPECTION + "Plugins", request, introspection_pb2.PluginsResponse)
                self._rebase = any("rebase" in p.capabilities for p in found.plugins)
            except RpcError as e:
                log.debug("introspection: %s; unpacking one layer at a time", e.details())
                self._rebase = False
        return self._rebase

    async def _snapshot_exists(self, chain_id: str) -> bool:
        try:
            request = snapshots_pb2.StatSnapshotRequest(snapshotter=self.snapshotter, key=chain_id)
            await self.api.call(SNAPSHOTS + "Stat", request, snapshots_pb2.StatSnapshotResponse)
            return True
        except RpcError as e:
            if e.code() == StatusCode.NOT_FOUND and "snapshotter not loaded" not in (e.details() or ""):
                return False
            raise self._snapshot_error(e, "checking snapshots") from None

    def _snapshot_error(self, e: RpcError, what: str) -> StoreError:
        if "snapshotter not loaded" in (e.details() or ""):
            return StoreError(f"containerd has no snapshotter {self.snapshotter!r} (set it with --snapshotter)")
        return self.api.error(e, what)

    async def _apply_one(
        self,
        x: Layer,
        lease: str | None,
        slots: asyncio.Semaphore,
        wait_present: WaitPresent,
        feeds: FeedSlot | None,
    ) -> str:
        """One layer of a parallel unpack, by the stream path where it has a feed slot, else by the Diff service."""
        slot = feeds(x.desc) if feeds is not None else None
        if slot is None:
            return await self._prepare_apply(x, lease, slots, True, wait_present)
        try:
            return await self._stream_apply(x, lease, slots, wait_present, slot)
        finally:
            if not slot.done():
                slot.set_result(None)  # the blob's writer goes on without a feed

    async def _stream_apply(
        self,
        x: Layer,
        lease: str | None,
        slots: asyncio.Semaphore,
        wait_present: WaitPresent,
        slot: asyncio.Future[LayerFeed | None],
    ) -> str:
        """Prepare the layer's snapshot, open its directory and hand the blob's writer a feed into puller's
        applier; once containerd has committed the blob, verify and return the snapshot key. A layer that is
        present already, or whose bytes did not all pass through the feed, or whose feed was given bytes that failed
        the digest, goes to the Diff service."""
        if await self.content.has(x.desc):
            slot.set_result(None)
            return await self._prepare_apply(x, lease, slots, True, wait_present)
        key, mounts = await self._prepare(x, lease, rebase=True)
        feed: LayerFeed | None = None
        try:
            try:
                root = self._open_snapshot(mounts)
            except _CannotStream as e:
                log.warning("layer %s: %s; applied by containerd's Diff service", x.desc.digest, e)
                slot.set_result(None)
                await self._apply_diff(x, key, mounts, lease, slots, wait_present)
                return key
            with root:
                feed = self._applier_process().open(x.desc, x.diff_id, root.fd, bool(x.parent), self.limits)
            slot.set_result(feed)
            await wait_present(x.desc)
            if feed.offset != x.desc.size or feed.discarded:  # a resumed blob, or one fetched again
                why = "its bytes failed the digest" if feed.discarded else "resumed"
                log.info("layer %s %s: applied by containerd's Diff service", x.desc.digest, why)
                await feed.abort()  # the applier stops writing into the snapshot before it is removed
                await self._remove_snapshot(key)
                return await self._prepare_apply(x, lease, slots, True, wait_present)
            async with asyncio.timeout(APPLY_TIMEOUT_S):
                await feed.finish()
        except BaseException:
            if feed is not None:
                await feed.abort()  # the applier stops writing into the snapshot before it is removed
            await self._remove_snapshot(key)
            raise
        finally:
            if feed is not None:
                await feed.close()  # finished or aborted by now: every path above waited for its answer
        return key

    def _open_snapshot(self, mounts: list[types_pb2.Mount]) -> SafeDir:
        """The directory of a snapshot prepared without a parent (a bind mount of it), checked and open."""
        if len(mounts) != 1 or mounts[0].type != "bind":
            raise _CannotStream(f"its snapshot is mounted as {[m.type for m in mounts]}, not one bind mount")
        try:
            return SafeDir.open(mounts[0].source, create=False)
        except (OSError, StoreError) as e:
            raise _CannotStream(f"cannot open its snapshot directory {mounts[0].source}: {e}") from None

    def _applier_process(self) -> ApplierProcess:
        if self._applier is None:
            self._applier = ApplierProcess()
        return self._applier

    async def _prepare(self, x: Layer, lease: str | None, rebase: bool) -> tuple[str, list[types_pb2.Mount]]:
        """An active snapshot for layer ``x`` (without a parent when ``rebase``): its key and mounts."""
        key = f"extract-{secrets.token_hex(6)} {x.chain_id}"
        parent = "" if rebase else x.parent
        try:
            prepared = await self.api.call(
                SNAPSHOTS + "Prepare",
                snapshots_pb2.PrepareSnapshotRequest(
                    snapshotter=self.snapshotter, key=key, parent=parent, labels=x.labels
                ),
                snapshots_pb2.PrepareSnapshotResponse,
                lease,
            )
        except RpcError as e:
            raise self._snapshot_error(e, f"preparing a snapshot for {x.desc.digest}") from None
        return key, list(prepared.mounts)

    async def _prepare_apply(
        self, x: Layer, lease: str | None, slots: asyncio.Semaphore | None, rebase: bool, wait_present: WaitPresent
    ) -> str:
        """Prepare an active snapshot for layer ``x`` (without a parent when ``rebase``) and apply the layer into
        it with the Diff service once its blob is committed; returns the snapshot key (removed again on
        failure)."""
        await wait_present(x.desc)
        key, mounts = await self._prepare(x, lease, rebase)
        await self._apply_diff(x, key, mounts, lease, slots, wait_present)
        return key

    async def _apply_diff(
        self,
        x: Layer,
        key: str,
        mounts: list[types_pb2.Mount],
        lease: str | None,
        slots: asyncio.Semaphore | None,
        wait_present: WaitPresent,
    ) -> None:
        """containerd's Diff service applies the layer into snapshot ``key`` once its blob is committed (the
        snapshot is removed on failure)."""
        if x.parent:  # prepared without its parent: the differ must write whiteouts as overlayfs does
            mounts = [bind_to_overlay(m) for m in mounts]
        try:
            await wait_present(x.desc)
            async with slots or contextlib.nullcontext():
                applied = await self.api.call(
                    DIFF + "Apply",
                    diff_pb2.ApplyRequest(
                        diff=types_pb2.Descriptor(
                            media_type=x.desc.media_type, digest=str(x.desc.digest), size=x.desc.size
                        ),
                        mounts=mounts,
                    ),
                    diff_pb2.ApplyResponse,
                    lease,
                    timeout=APPLY_TIMEOUT_S,
                )
            if applied.applied.digest != x.diff_id:
                raise StoreError(
                    f"layer {x.desc.digest} unpacked to {applied.applied.digest}, but the image config says {x.diff_id}"
                )
        except RpcError as e:
            await self._remove_snapshot(key)
            raise self._snapshot_error(e, f"unpacking {x.desc.digest}") from None
        except BaseException:
            await self._remove_snapshot(key)
            raise

    async def _commit_layer(self, x: Layer, key: str, lease: str | None, onto_parent: bool) -> None:
        """Commit the applied snapshot ``key`` as the layer's chain ID (onto its parent, for a rebased one)."""
        request = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=x.chain_id, key=key, labels=x.labels
        )
        if onto_parent:
            request.parent = x.parent
        try:
            await self.api.call(SNAPSHOTS + "Commit", request, empty_pb2.Empty, lease)
        except RpcError as e:
            await self._remove_snapshot(key)
            if e.code() == StatusCode.ALREADY_EXISTS:
                return  # unpacked by someone else meanwhile
            raise self._snapshot_error(e, f"committing the snapshot of {x.desc.digest}") from None
        except BaseException:
            await self._remove_snapshot(key)
            raise

    async def _remove_snapshot(self, key: str) -> None:
        with contextlib.suppress(RpcError):  # else the lease's expiry lets containerd collect it
            request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key)
            await self.api.call(SNAPSHOTS + "Remove", request, empty_pb2.Empty)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI chain IDs of a layer stack: chain[0] = diff[0]; chain[i] = sha256(chain[i-1] + " " + diff[i])."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


@dataclass(frozen=True, slots=True)
class Layer:
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


def bind_to_overlay(mount: types_pb2.Mount) -> types_pb2.Mount:
    """A snapshot prepared without a parent is a bind mount of its directory; given to the differ as an overlay
    mount with that directory as upperdir, it is applied as an upper layer (whiteouts as overlayfs writes them),
    as containerd's parallel unpacker does."""
    if mount.type != "bind":
        return mount
    options = [o for o in mount.options if o != "rbind"] + [f"upperdir={mount.source}"]
    return types_pb2.Mount(type="overlay", source="overlay", options=options)
