"""The containerd store: content, image records and unpacked snapshots, through containerd's own gRPC API.

Nothing is written into containerd's directories: its metadata database decides what exists and its garbage
collector deletes what it does not know. Everything happens under a lease (:mod:`.leases`), so a half-done pull
is never collected; the lease is dropped once the image record references the content (and the content the
snapshots) through the same ``containerd.io/gc.ref.*`` labels containerd's own pull sets.

- Blobs (:mod:`.writer`, :mod:`.content`): one Write stream each, fed in order as the bytes arrive, committed
  with the expected digest and the distribution source label.
- Manifests and indexes: written the same way, labelled with gc references (index -> manifests, manifest ->
  config and layers) and ``containerd.io/distribution.source.<host>=<repo>``.
- Unpack (default on, :mod:`.unpack`): each layer is applied into the snapshotter while it downloads (puller's
  own applier, where containerd and its snapshotter allow it) or as soon as it is committed (the Diff service).
- Image records as the CRI plugin expects them (:mod:`.images`), pinned on request.
- :mod:`.api`: the gRPC channel and containerd's errors in the project's terms.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from ...errors import DiskFull, StoreError
from ...reference import Reference
from ...registry import manifest as mf
from ...registry.manifest import Descriptor
from ...unpack import Limits
from .. import StoreBase, free_bytes
from ..defaults import CONTAINERD_ADDRESS as DEFAULT_ADDRESS
from ..defaults import CONTAINERD_LEASE_EXPIRY as DEFAULT_LEASE_EXPIRY
from ..defaults import CONTAINERD_NAMESPACE as CRI_NAMESPACE
from ..defaults import CONTAINERD_NAMESPACE as DEFAULT_NAMESPACE
from ..defaults import CONTAINERD_ROOT as DEFAULT_ROOT
from ..defaults import CONTAINERD_SNAPSHOTTER as DEFAULT_SNAPSHOTTER
from ..defaults import CONTAINERD_STAGING as DEFAULT_STAGING
from ..safedir import SafeDir
from .api import Api
from .content import Content
from .images import ImageRecords, gc_labels, image_names, source_label
from .leases import ImageKey, Leases
from .unpack import FeedSlot, Unpacker
from .writer import BlobState, ContainerdWriter, Shared

log = logging.getLogger(__name__)

UNPACK_RATIO = 3  # unpacked size / compressed size of a typical gzip layer: the space check's estimate


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
        unpack_path: str = "auto",
        limits: Limits | None = None,
    ):
        self.api = Api(address, namespace)
        self.address = address
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.unpack = unpack
        self.root = Path(root)
        self.staging_dir = Path(staging_dir).absolute()
        self.content = Content(self.api, self.root)
        self.leases = Leases(self.api, lease_expiry)
        self.records = ImageRecords(self.api)
        self.unpacker = Unpacker(self.api, self.content, snapshotter, unpack_path, limits, self.root)
        self._staging: SafeDir | None = None
        self._shared: Shared | None = None
        self._blobs: dict[str, BlobState] = {}  # blobs of the images being pulled
        self._images: dict[ImageKey, int] = {}  # images between begin_image and their end -> pulls of it
        self._unpacking: dict[ImageKey, asyncio.Future] = {}  # per image being pulled (the daemon pulls
        # several at once through one store)

    # ---- lifecycle ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> ContainerdStore:
        try:
            self._staging = await asyncio.to_thread(SafeDir.open, self.staging_dir)
        except OSError as e:
            raise StoreError(f"cannot create staging directory {self.staging_dir}: {e.strerror}") from None
        try:
            await self.api.__aenter__()
        except BaseException:
            self._staging.close()
            self._staging = None
            raise
        self._shared = Shared(self.content, self.leases, self._staging)
        return self

    @property
    def staging(self) -> SafeDir:
        assert self._staging is not None, "store used outside 'async with'"
        return self._staging

    async def __aexit__(self, *exc: object) -> None:
        if self._shared is None:
            return
        for unpacking in self._unpacking.values():  # pulls that failed before their layers came
            unpacking.cancel()
        await asyncio.gather(*self._unpacking.values(), return_exceptions=True)
        await self.unpacker.close()
        await self.leases.close()
        await self.api.__aexit__()
        self.staging.close()
        self._staging = self._shared = None

    # ---- blobs --------------------------------------------------------------------------------------------

    async def has_blob(self, desc: Descriptor) -> bool:
        return await self.content.has(desc)

    def writer(self, desc: Descriptor) -> ContainerdWriter:
        """Stream the blob into containerd as it arrives, so the copy overlaps the download."""
        assert self._shared is not None, "store used outside 'async with'"
        state = self._blobs.get(str(desc.digest)) or BlobState()  # a blob of no image in progress: its own
        return ContainerdWriter(self._shared, desc, state)

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

    async def _wait_present(self, desc: Descriptor) -> None:
        state = self._blobs.get(str(desc.digest))
        if state is None:
            raise StoreError(f"{desc.digest} is not a blob of an image being pulled")
        if not state.ready.is_set() and not await self.content.has(desc):  # a commit meanwhile still wakes us
            await state.ready.wait()

    # ---- images -------------------------------------------------------------------------------------------

    async def begin_image(self, ref: Reference, manifest: mf.Manifest) -> None:
        """Take a lease for the pull; stream blobs into containerd in manifest order (committed with their
        distribution source label), and unpack each layer as soon as it and the ones below it are committed,
        while later layers download."""
        key = _image_key(manifest)
        lease = await self.leases.hold(key)
        source = source_label(ref)
        for i, digest in enumerate(dict.fromkeys(key)):
            state = self._blobs.setdefault(digest, BlobState())
            state.order, state.source = i, source
            state.images += 1
        self._images[key] = self._images.get(key, 0) + 1
        if self.unpack and key not in self._unpacking:
            feeds = None
            if (await self.unpacker.path()).name == "stream":
                assert self._shared is not None, "store used outside 'async with'"
                self._shared.applying_while_downloading()  # the appliers' memory comes on top of kept bytes
                feeds = await self._claim_feeds(manifest)
            unpacking = self.unpacker.unpack(manifest, lease.id, self._wait_present, feeds)
            self._unpacking[key] = asyncio.ensure_future(unpacking)

    async def _claim_feeds(self, manifest: mf.Manifest) -> FeedSlot:
        """Feed slots for the image's layers that no other pull in progress applies while downloading: each
        layer's writer waits for the unpacker to fill its slot (with a feed, or None) before it streams."""
        loop = asyncio.get_running_loop()
        mine: dict[str, asyncio.Future] = {}
        for layer in manifest.layers:
            state = self._blobs[str(layer.digest)]
            if state.feed is None:
                state.feed = mine[str(layer.digest)] = loop.create_future()
        return lambda desc: mine.get(str(desc.digest))

    async def abandon_image(self, manifest: mf.Manifest) -> None:
        """The pull failed: stop waiting to unpack its layers."""
        unpacking = self._unpacking.pop(_image_key(manifest), None)
        if unpacking is not None:
            unpacking.cancel()
            await asyncio.gather(unpacking, return_exceptions=True)
        self._end_image(manifest)

    def _end_image(self, manifest: mf.Manifest) -> None:
        """Forget the image's blobs, unless another pull in progress shares them (a daemon runs for weeks), and
        let go of the pull's lease."""
        key = _image_key(manifest)
        lease = self.leases.of(key)
        if lease is not None:
            self.leases.release(lease)
        left = self._images.pop(key, 0) - 1
        if left > 0:
            self._images[key] = left
        for digest in dict.fromkeys(key):
            state = self._blobs.get(digest)
            if state is not None:
                if state.feed is not None and state.feed.done():
                    state.feed = None  # its unpack is over: a later pull of the blob claims it anew
                state.images -= 1
                if state.images <= 0:
                    del self._blobs[digest]

    async def commit_image(
        self, ref: Reference, target: Descriptor, documents: list[tuple[Descriptor, bytes]], pin: bool = False
    ) -> None:
        source = source_label(ref)
        top = documents[0][0]
        parsed = [(desc, data, mf.parse(data, desc.media_type)) for desc, data in documents]
        manifest = next(doc for _, _, doc in parsed if isinstance(doc, mf.Manifest))
        key = _image_key(manifest)
        held = self.leases.of(key)
        lease = held.id if held else None
        # Children first, so that a parent's gc references never point at missing content.
        for desc, data, doc in reversed(parsed):
            await self.content.put_bytes(desc, data, {**gc_labels(doc), **source}, lease)
        states = [(d, self._blobs.get(str(d.digest))) for d in manifest.blobs]
        unlabelled = [d for d, state in states if state is None or state.labelled != source]  # e.g. present
        await asyncio.gather(*(self.content.update_labels(str(d.digest), source) for d in unlabelled))
        unpacking = self._unpacking.pop(key, None)
        if unpacking is not None:
            await unpacking
        elif self.unpack and key in self._images:
            await self.unpacker.unpack(manifest, lease, self._wait_present)
        for name in image_names(ref, str(top.digest)):
            await self.records.put(name, top, pin, lease)
        if self.namespace == CRI_NAMESPACE:
            # and under its image ID (the config's digest), as the CRI plugin's own pull records it: containerd's
            # CRI looks an image volume's image up by that name. Never pinned: the named records carry the pin.
            await self.records.put(str(manifest.config.digest), top, False, lease)
        if key in self._images:
            self._end_image(manifest)

    async def unpin_image(self, ref: Reference, digest: str | None) -> None:
        await self.records.unpin(ref, digest)

    def unpacked_by(self) -> dict[str, str] | None:
        path = self.unpacker.chosen if self.unpack else None
        return {"path": path.name, "reason": path.reason} if path is not None else None


def _image_key(manifest: mf.Manifest) -> ImageKey:
    return tuple(str(d.digest) for d in manifest.blobs)


def _unpacked_estimate(desc: Descriptor) -> int:
    """About how many bytes a layer takes once unpacked (0 for what is not a layer)."""
    if "gzip" in desc.media_type or "zstd" in desc.media_type:
        return desc.size * UNPACK_RATIO
    return desc.size if "tar" in desc.media_type else 0
