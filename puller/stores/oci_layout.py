"""The embedded default store: an OCI image layout directory.

    DIR/oci-layout                     {"imageLayoutVersion": "1.0.0"}
    DIR/index.json                     one entry per image, named by org.opencontainers.image.ref.name
    DIR/blobs/<alg>/<hex>              verified blobs; written temp -> fsync -> rename -> fsync(dir)
    DIR/.puller/staging/               partial downloads and their done-range records (same filesystem)

Every file is made through checked directory descriptors (:mod:`.safedir`): no link planted in the layout is
ever followed.

Each index.json entry names the image by its full reference (``docker.io/library/busybox:latest``) in
``org.opencontainers.image.ref.name`` (the OCI grammar allows ``/`` and ``:``), so images of different
repositories with the same tag can share a store; ``io.containerd.image.name`` carries the same name, as
containerd's exporter writes it. When an image was pulled from a multi-arch index, the entry points at the
selected platform's manifest, which is what ``skopeo copy oci:DIR:NAME`` and ``ctr import`` read; the index
itself is kept as a blob.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..reference import Reference
from ..registry.manifest import Descriptor
from . import StoreBase, check_space, mark_verified, store_error, verified_present
from .defaults import OCI_DIR as DEFAULT_OCI_DIR
from .safedir import SafeDir
from .staged import FileWriter

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
LAYOUT = {"imageLayoutVersion": "1.0.0"}
MAX_INDEX_BYTES = 64 << 20  # index.json read back before an image is named


class OCILayoutStore(StoreBase):
    def __init__(self, root: str | os.PathLike[str] = DEFAULT_OCI_DIR):
        self.root = Path(root).absolute()
        self.staging_dir = self.root / ".puller" / "staging"
        self._dirs: dict[str, SafeDir] = {}  # "", ".puller", "staging", "blobs", "blobs/<alg>": checked, open

    async def __aenter__(self) -> OCILayoutStore:
        await asyncio.to_thread(self._init)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for d in self._dirs.values():
            d.close()
        self._dirs.clear()

    @property
    def staging(self) -> SafeDir:
        return self._dirs["staging"]

    def _init(self) -> None:
        try:
            top = self._dirs[""] = SafeDir.open(self.root, mode=0o755)
            self._dirs[".puller"] = top.subdir(".puller")  # partial data is nobody else's
            self._dirs["staging"] = self._dirs[".puller"].subdir("staging")
            self._dirs["blobs"] = top.subdir("blobs", mode=0o755)
            self._blobs("sha256")
            if top.stat("oci-layout") is None:
                top.write_atomic("oci-layout", json.dumps(LAYOUT).encode())
            if top.stat("index.json") is None:
                self._write_index(
                    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}
                )
        except OSError as e:
            raise store_error(e, f"initialising OCI layout {self.root}") from None

    def _blobs(self, algorithm: str) -> SafeDir:
        key = f"blobs/{algorithm}"
        if key not in self._dirs:
            self._dirs[key] = self._dirs["blobs"].subdir(algorithm, mode=0o755)
        return self._dirs[key]

    def blob_path(self, desc: Descriptor) -> Path:
        # desc.digest is a validated Digest: algorithm from a fixed set, hex of fixed length.
        return self.root / "blobs" / desc.digest.algorithm / desc.digest.hex

    async def reserve(self, blobs: list[Descriptor]) -> None:
        """Refuse, before any byte, blobs that cannot fit (what is staged of them already counts)."""
        await asyncio.to_thread(check_space, self.staging, blobs)

    async def has_blob(self, desc: Descriptor) -> bool:
        """Present with the right size and verified: by puller's mark, or hashed once (a file it did not write)."""
        st = self._blobs(desc.digest.algorithm).stat(desc.digest.hex)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != desc.size:
            return False
        return await asyncio.to_thread(verified_present, self._blobs(desc.digest.algorithm), desc.digest.hex, desc)

    def writer(self, desc: Descriptor) -> FileWriter:
        return FileWriter(
            self.staging, desc, functools.partial(self.has_blob, desc), functools.partial(self._publish, desc)
        )

    def _publish(self, desc: Descriptor, staging: SafeDir, staged: str) -> None:
        mark = functools.partial(mark_verified, desc=desc)
        staging.move_into(staged, self._blobs(desc.digest.algorithm), desc.digest.hex, before=mark)

    async def put_blob_bytes(self, desc: Descriptor, data: bytes) -> None:
        if not await self.has_blob(desc):
            await asyncio.to_thread(self._put_bytes, desc, data)

    def _put_bytes(self, desc: Descriptor, data: bytes) -> None:
        try:
            mark = functools.partial(mark_verified, desc=desc)
            self._blobs(desc.digest.algorithm).write_atomic(desc.digest.hex, data, before=mark)
        except OSError as e:
            raise store_error(e, f"writing {desc.digest}") from None

    async def commit_image(
        self, ref: Reference, target: Descriptor, documents: list[tuple[Descriptor, bytes]], pin: bool = False
    ) -> None:
        for desc, data in documents:
            await self.put_blob_bytes(desc, data)
        await asyncio.to_thread(self._name_image, ref, target)

    def _name_image(self, ref: Reference, target: Descriptor) -> None:
        name = image_name(ref)
        try:
            lock_fd = self._dirs[".puller"].open_file("index.lock", os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise store_error(e, "locking index.json") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)  # one index.json writer at a time, across processes
            index = self.read_index()
            entry: dict[str, Any] = {
                "mediaType": target.media_type,
                "digest": str(target.digest),
                "size": target.size,
                "annotations": {REF_NAME: name, CONTAINERD_NAME: name},
            }
            if target.platform:
                entry["platform"] = {"os": target.platform.os, "architecture": target.platform.architecture}
                if target.platform.variant:
                    entry["platform"]["variant"] = target.platform.variant
            manifests = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != name]
            manifests.append(entry)
            index["manifests"] = manifests
            self._write_index(index)
        except OSError as e:
            raise store_error(e, "updating index.json") from None
        finally:
            os.close(lock_fd)

    def read_index(self) -> dict:
        try:
            index = json.loads(self._dirs[""].read_bytes("index.json", MAX_INDEX_BYTES))
        except (OSError, ValueError, RecursionError, StoreError) as e:
            raise StoreError(f"cannot read {self.root / 'index.json'}: {e}") from None
        if not isinstance(index, dict):
            raise StoreError(f"{self.root / 'index.json'} is not a JSON object")
        manifests = index.get("manifests", [])
        if not isinstance(manifests, list) or not all(
            isinstance(m, dict) and isinstance(m.get("annotations", {}), dict) for m in manifests
        ):
            raise StoreError(f"{self.root / 'index.json'}: 'manifests' is not a list of descriptors")
        return index

    def _write_index(self, index: dict) -> None:
        self._dirs[""].write_atomic("index.json", json.dumps(index, indent=2).encode())


def image_name(ref: Reference) -> str:
    """The name an image gets in index.json: the full reference, tag kept, digest only when there is no tag."""
    if ref.tag:
        return f"{ref.name}:{ref.tag}"
    return f"{ref.name}@{ref.digest}"
