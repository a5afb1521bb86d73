"""Image records, as the CRI plugin expects them: named by reference and by repo digest, target = the resolved
index/manifest, ``io.cri-containerd.image=managed``, and ``io.cri-containerd.pinned=pinned`` with ``pin``
(kubelet's image GC skips pinned images). Pins puller sets carry ``puller.io/pinned``, so that puller only ever
takes off its own.
"""

from __future__ import annotations

from google.protobuf import field_mask_pb2

from ...reference import Reference
from ...registry import manifest as mf
from ...registry.manifest import Descriptor
from ..containerd_api import images_pb2, types_pb2
from .api import IMAGES, Api
from .stream import RpcError, StatusCode

GC_CONTENT = "containerd.io/gc.ref.content"
DISTRIBUTION_SOURCE = "containerd.io/distribution.source"
CRI_MANAGED = ("io.cri-containerd.image", "managed")
CRI_PINNED = ("io.cri-containerd.pinned", "pinned")
PULLER_PINNED = ("puller.io/pinned", "true")  # marks a CRI pin that puller set, so that it only takes off its own


class ImageRecords:
    def __init__(self, api: Api):
        self.api = api

    async def put(self, name: str, target: Descriptor, pin: bool, lease: str | None) -> None:
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
            request = images_pb2.CreateImageRequest(image=image)
            await self.api.call(IMAGES + "Create", request, images_pb2.CreateImageResponse, lease)
            return
        except RpcError as e:
            if e.code() != StatusCode.ALREADY_EXISTS:
                raise self.api.error(e, f"creating image {name}") from None
        # The name exists (the tag moved, or a re-pull): point it at this target, keep its other labels.
        existing = await self.labels(name)
        ours = existing.get(PULLER_PINNED[0]) == PULLER_PINNED[1]
        theirs = existing.get(CRI_PINNED[0]) == CRI_PINNED[1] and not ours
        if pin and theirs:
            del labels[PULLER_PINNED[0]]  # pinned by someone else: it stays their pin
        paths = ["target", *(f"labels.{k}" for k in labels)]
        if not pin and ours:
            paths += [f"labels.{CRI_PINNED[0]}", f"labels.{PULLER_PINNED[0]}"]  # absent from labels: removed
        mask = field_mask_pb2.FieldMask(paths=paths)
        try:
            await self._update(images_pb2.UpdateImageRequest(image=image, update_mask=mask))
        except RpcError as e:
            raise self.api.error(e, f"updating image {name}") from None

    async def get(self, name: str) -> images_pb2.Image | None:
        call = self.api.call(IMAGES + "Get", images_pb2.GetImageRequest(name=name), images_pb2.GetImageResponse)
        found = await self.api.unless_missing(call, f"looking up image {name}")
        return found.image if found is not None else None

    async def labels(self, name: str) -> dict[str, str]:
        """The labels of image record ``name`` ({} when there is none)."""
        image = await self.get(name)
        return dict(image.labels) if image is not None else {}

    async def unpin(self, ref: Reference, digest: str | None) -> None:
        """Take off the CRI pin of ``ref``'s records (by tag, and by ``digest`` when known), where puller set it;
        a pin someone else set stays."""
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{CRI_PINNED[0]}", f"labels.{PULLER_PINNED[0]}"])
        for name in image_names(ref, digest):
            image = await self.get(name)
            if image is None or image.labels.get(PULLER_PINNED[0]) != PULLER_PINNED[1]:
                continue
            image.labels.pop(CRI_PINNED[0], None)
            image.labels.pop(PULLER_PINNED[0], None)
            # The whole record goes back, target included: containerd 2.2.9 dies on an Update without one.
            try:
                await self._update(images_pb2.UpdateImageRequest(image=image, update_mask=mask))
            except RpcError as e:
                raise self.api.error(e, f"unpinning image {name}") from None

    async def _update(self, request: images_pb2.UpdateImageRequest) -> None:
        await self.api.call(IMAGES + "Update", request, images_pb2.UpdateImageResponse)


def image_names(ref: Reference, digest: str | None) -> list[str]:
    """The records of an image, as the CRI expects them: ``NAME:TAG`` and ``NAME@DIGEST``."""
    names = [f"{ref.name}:{ref.tag}"] if ref.tag else []
    if digest:
        names.append(f"{ref.name}@{digest}")
    return names


def source_label(ref: Reference) -> dict[str, str]:
    """``containerd.io/distribution.source.<host>=<repo>``, as containerd's pull labels every blob."""
    return {f"{DISTRIBUTION_SOURCE}.{ref.domain}": ref.repository}


def gc_labels(doc: mf.Index | mf.Manifest) -> dict[str, str]:
    """The gc reference labels containerd's pull puts on a manifest or index."""
    if isinstance(doc, mf.Index):
        return {f"{GC_CONTENT}.m.{i}": str(d.digest) for i, d in enumerate(doc.manifests)}
    labels = {f"{GC_CONTENT}.config": str(doc.config.digest)}
    labels.update({f"{GC_CONTENT}.l.{i}": str(d.digest) for i, d in enumerate(doc.layers)})
    return labels
