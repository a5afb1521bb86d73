"""One image: resolve -> plan -> fetch -> verify -> commit.

:func:`pull_image` resolves the reference to a manifest (choosing the platform from an index), skips blobs the
store already has, fetches the rest through the shared :class:`BlobFetcher`, and names the image in the store
only after every blob is committed. Progress is kept in a :class:`PullProgress` that displays poll.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..errors import ManifestError
from ..reference import Reference
from ..registry import manifest as mf
from ..registry.client import RegistryClient
from ..stores import Store
from .fetcher import BlobFetcher, BlobProgress, gather_or_cancel

DEFAULT_MAX_BLOB_SIZE = 64 << 30  # a descriptor larger than this is refused before any byte (max_blob_size)


@dataclass(slots=True)
class PullProgress:
    reference: str
    state: str = "resolving"  # resolving | fetching | committing | done | failed
    digest: str | None = None
    blobs: dict[str, BlobProgress] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    accounted: bool = False  # its bytes and retries are in the daemon's totals (metrics)

    @property
    def total(self) -> int:
        return sum(b.size for b in self.blobs.values())

    @property
    def done(self) -> int:
        return sum(b.done for b in self.blobs.values())

    @property
    def fetched(self) -> int:
        return sum(b.fetched for b in self.blobs.values())

    @property
    def by_host(self) -> dict[str, int]:
        """Blob bytes received per registry host (mirrors and upstream)."""
        out: dict[str, int] = {}
        for b in self.blobs.values():
            for host, n in b.by_host.items():
                out[host] = out.get(host, 0) + n
        return out


@dataclass(frozen=True, slots=True)
class PullResult:
    reference: Reference
    digest: str  # what the reference resolved to (index digest for a multi-arch image)
    manifest_digest: str  # the platform manifest actually pulled
    total_bytes: int  # size of all blobs of the image
    fetched_bytes: int  # bytes received over the network by this pull
    seconds: float
    by_host: dict[str, int] = field(default_factory=dict)  # of fetched_bytes, per host that served them
    unpacked_by: dict[str, str] | None = None  # how the store applied the layers ({"path", "reason"}), if it did

    @property
    def mb_per_s(self) -> float:
        return self.fetched_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Resolved:
    top: mf.Descriptor  # what the reference names (an index or a manifest)
    target: mf.Descriptor  # the platform's manifest
    manifest: mf.Manifest
    documents: list[tuple[mf.Descriptor, bytes]]  # raw documents to store
    mirror: str | None  # the mirror that served the manifest, whose peers then hold the image (BlobFetcher.fetch)


async def resolve(client: RegistryClient, ref: Reference, platform: mf.Platform) -> Resolved:
    top, body, host = await client.get_manifest(ref)
    documents = [(top, body)]
    doc = mf.parse(body, top.media_type)
    target = top
    if isinstance(doc, mf.Index):
        chosen = mf.select_platform(doc, platform)
        m_desc, m_body, host = await client.get_manifest(ref.with_digest(chosen.digest), expected=chosen)
        documents.append((m_desc, m_body))
        doc = mf.parse(m_body, chosen.media_type)
        if not isinstance(doc, mf.Manifest):
            raise mf.ManifestError(f"{ref}: index entry {chosen.digest} is not an image manifest (nested index)")
        target = chosen
    assert isinstance(doc, mf.Manifest)
    return Resolved(top, target, doc, documents, host.host if host.is_mirror else None)


async def pull_image(
    ref: Reference,
    client: RegistryClient,
    fetcher: BlobFetcher,
    store: Store,
    platform: mf.Platform | None = None,
    progress: PullProgress | None = None,
    pin: bool = False,
    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
) -> PullResult:
    """Pull ``ref`` into ``store``; ``pin`` asks the store to keep the image from garbage collection. A blob
    larger than ``max_blob_size`` is refused before any byte (a registry's descriptor may lie)."""
    progress = progress or PullProgress(str(ref))
    started = time.monotonic()
    begun: mf.Manifest | None = None
    try:
        resolved = await resolve(client, ref, platform or mf.Platform.host())
        top, target, manifest, documents = resolved.top, resolved.target, resolved.manifest, resolved.documents
        progress.digest = str(top.digest)
        progress.state = "fetching"
        missing = []
        wanted = list(dict.fromkeys(store.select_blobs(manifest)))  # a blob listed twice is fetched once
        for desc in wanted:
            if desc.size > max_blob_size:
                raise ManifestError(
                    f"{ref}: blob {desc.digest} is {desc.size:,} bytes, over max_blob_size ({max_blob_size:,})"
                )
        present = await asyncio.gather(*(store.has_blob(desc) for desc in wanted))
        for desc, there in zip(wanted, present, strict=True):
            bp = progress.blobs.setdefault(str(desc.digest), BlobProgress(str(desc.digest), desc.size))
            if there:
                bp.state, bp.done = "present", desc.size
            else:
                missing.append(desc)
        await store.reserve(missing)
        await store.begin_image(ref, manifest)
        begun = manifest
        # Blobs in manifest order (config, then layers bottom up) take connections in that order.
        await gather_or_cancel(
            [
                fetcher.fetch(ref, d, store, progress.blobs[str(d.digest)], i, resolved.mirror)
                for i, d in enumerate(missing)
            ]
        )
        progress.state = "committing"
        # The index (if any) is stored as a blob too; the name points at the platform manifest.
        await store.commit_image(ref, target, documents, pin=pin)
    except BaseException:
        progress.state = "failed"
        progress.finished = time.monotonic()
        if begun is not None:
            await store.abandon_image(begun)
        raise
    progress.state = "done"
    progress.finished = time.monotonic()
    return PullResult(
        reference=ref,
        digest=str(top.digest),
        manifest_digest=str(target.digest),
        total_bytes=progress.total,
        fetched_bytes=progress.fetched,
        seconds=progress.finished - started,
        by_host=progress.by_host,
        unpacked_by=store.unpacked_by(),
    )
