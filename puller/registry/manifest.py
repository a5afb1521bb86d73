"""OCI and Docker schema2 manifests and indexes: media types, parsing, validation, platform selection.

The records here, like puller's other immutable records without defaults to make or fields to hide (Digest,
Reference, Timeouts, ...), are ``typing.NamedTuple``: Python builds one at import in about a seventh of a frozen
dataclass's time (0.08 against 0.6 ms here), and every ``puller`` command builds them all at its start."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from ..digest import Digest
from ..errors import ConfigError, InvalidDigest, ManifestError, PlatformNotFound

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # containerd's limit for manifests and indexes
MAX_DESCRIPTORS = 10_000  # layers in a manifest, or manifests in an index
MAX_BLOB_SIZE = 1 << 44  # 16 TiB: anything larger is a lie we refuse to preallocate for


class Platform(NamedTuple):
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"invalid platform {text!r}: expected os/arch[/variant]")  # user input: exit 2
        return cls(*_normalize_arch(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else None))

    @classmethod
    def host(cls) -> Platform:
        machine = os.uname().machine.lower()  # what platform.machine() says, without its import
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)
        return cls(*_normalize_arch("linux", arch, None))

    def matches(self, other: Platform) -> bool:
        return (
            self.os == other.os
            and self.architecture == other.architecture
            and (self.variant is None or other.variant is None or self.variant == other.variant)
        )

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _normalize_arch(os_: str, arch: str, variant: str | None) -> tuple[str, str, str | None]:
    """containerd's platforms.Normalize for the common cases."""
    arch = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}.get(arch, arch)
    if arch == "arm64" and variant == "v8":
        variant = None
    if arch == "amd64" and variant == "v1":
        variant = None
    return os_, arch, variant


class Descriptor(NamedTuple):
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: descriptor is not an object")
        raw = obj.get("digest")
        if not isinstance(raw, str):
            raise ManifestError(f"{where}: descriptor has no digest string")
        try:
            digest = Digest.parse(raw)
        except InvalidDigest as e:
            raise ManifestError(f"{where}: {e}") from None
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > MAX_BLOB_SIZE:
            raise ManifestError(f"{where}: invalid size {size!r} for {digest}")
        media_type = obj.get("mediaType")
        if not isinstance(media_type, str):
            raise ManifestError(f"{where}: descriptor {digest} has no mediaType")
        plat = None
        p = obj.get("platform")
        if isinstance(p, dict) and isinstance(p.get("os"), str) and isinstance(p.get("architecture"), str):
            variant = p.get("variant") or None
            if variant is not None and not isinstance(variant, str):
                raise ManifestError(f"{where}: platform variant of {digest} is not a string")
            plat = Platform(*_normalize_arch(p["os"], p["architecture"], variant))
        return cls(media_type, digest, size, plat)


class Index(NamedTuple):
    media_type: str
    manifests: tuple[Descriptor, ...]


class Manifest(NamedTuple):
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        return (self.config, *self.layers)


def parse(body: bytes, content_type: str | None) -> Index | Manifest:
    """Parse a manifest or index body. The media type comes from the body when present (it is covered by the
    digest), else from the Content-Type header."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(body)} bytes, over the {MAX_MANIFEST_BYTES} byte limit")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from None
    except RecursionError:
        raise ManifestError("manifest JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    media_type = doc.get("mediaType") or (content_type or "").split(";")[0].strip()
    if not media_type:
        # An OCI document may leave mediaType out: tell manifest from index by shape.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r} ({media_type})")
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError("index has no manifests list")
        if len(entries) > MAX_DESCRIPTORS:
            raise ManifestError(f"index lists {len(entries)} manifests, over the limit of {MAX_DESCRIPTORS}")
        return Index(media_type, tuple(Descriptor.from_json(m, "index") for m in entries))
    if media_type in MANIFEST_TYPES:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestError("manifest has no layers list")
        if len(layers) > MAX_DESCRIPTORS:
            raise ManifestError(f"manifest has {len(layers)} layers, over the limit of {MAX_DESCRIPTORS}")
        config = Descriptor.from_json(doc.get("config"), "manifest config")
        manifest = Manifest(media_type, config, tuple(Descriptor.from_json(x, "manifest layer") for x in layers))
        sizes: dict[Digest, int] = {}
        for d in manifest.blobs:
            if sizes.setdefault(d.digest, d.size) != d.size:
                raise ManifestError(f"manifest lists {d.digest} twice, with sizes {sizes[d.digest]} and {d.size}")
        return manifest
    raise ManifestError(f"unsupported manifest media type {media_type[:200]!r}")


def select_platform(index: Index, wanted: Platform) -> Descriptor:
    """The first manifest for ``wanted`` (variant-exact match preferred), else PlatformNotFound listing all."""
    matching = [d for d in index.manifests if d.platform and wanted.matches(d.platform)]
    candidates = [d for d in matching if d.media_type in MANIFEST_TYPES]
    exact = [d for d in candidates if d.platform and d.platform.variant == wanted.variant]
    if exact or candidates:
        return (exact or candidates)[0]
    if any(d.media_type in INDEX_TYPES for d in matching):
        raise ManifestError(
            f"the index points to another index for platform {wanted}: nested indexes are not supported"
        )
    offered = sorted({str(d.platform) for d in index.manifests if d.platform}) or ["no platforms"]
    raise PlatformNotFound(f"no manifest for platform {wanted} in the index; it offers: {', '.join(offered)}")
