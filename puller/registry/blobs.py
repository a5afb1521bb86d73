"""Reading byte ranges of one blob from a registry's hosts: the HTTP half of a blob download.

:class:`BlobReader` keeps, for one blob, which host serves it now (mirrors first, then the upstream) and the
blob's resolved URL on that host: the registry's 307 to a CDN is followed once (without credentials) and the
final URL is reused for every range; a 401/403/410 from it means the signed URL expired, and the next request
resolves the blob through the registry again. :meth:`BlobReader.open` checks what came back (the status, the
Content-Range against the range asked for and the blob's size, a Content-Encoding nobody asked for) and maps
every failure to :mod:`puller.errors`, so the engine only schedules ranges and writes bytes. Once the URL is
resolved, ranges go through the lean client (:meth:`BlobReader.read_lean`, :mod:`.lean`), which receives into
buffers it owns.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ..errors import RegistryError, SizeMismatch, TransportError
from ..reference import Reference
from .bodies import SpeedGuard
from .client import ExpiredURL, RegistryClient
from .hosts import PULL
from .http import Response
from .lean import Cut, Deliver
from .manifest import Descriptor

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(slots=True)
class RangeBody:
    """An open response for a range of the blob. ``whole``: the server ignored the Range header and ``read``
    returns the blob from byte 0 (stream it all over this one connection)."""

    whole: bool
    host: str
    resp: Response
    guard: SpeedGuard

    async def read(self) -> bytes:
        """The next bytes (b"" at the end), under the low-speed limit."""
        return await self.guard.readany(self.resp)


class BlobReader:
    """Byte ranges of ``desc`` (of image ``ref``) from the registry's hosts (without ``mirrors``, from the registry
    itself only). Not shared between blobs."""

    def __init__(self, client: RegistryClient, ref: Reference, desc: Descriptor, mirrors: bool = True):
        self.client = client
        self.ref = ref
        self.desc = desc
        endpoints = client.endpoints(ref, PULL)  # mirrors first, then the upstream
        self.endpoints = endpoints if mirrors else endpoints[-1:]
        self.index = 0  # the host ranges come from now; moves on when a host fails
        self.url: str | None = None  # the resolved (redirected) blob URL on that host, reused for every range

    @property
    def host(self) -> str:
        return self.endpoints[self.index].host

    @property
    def upstream_host(self) -> str:
        """The registry itself (the last host: mirrors come first)."""
        return self.endpoints[-1].host

    @property
    def on_last_host(self) -> bool:
        return self.index == len(self.endpoints) - 1

    def fail_over(self, index: int, error: Exception) -> None:
        """Host ``index`` failed: continue from the next one (once, however many ranges saw the failure)."""
        if self.index == index and not self.on_last_host:
            self.index, self.url = index + 1, None
            log.warning(
                "%s: %s: %s; continuing from %s", self.desc.digest, self.endpoints[index].host, error, self.host
            )

    @property
    def lean_ready(self) -> bool:
        """The blob's URL is resolved (a CDN URL, fetched without credentials): ranges may go through lean.py."""
        return self.url is not None and self.client.lean is not None

    async def read_lean(self, start: int, end: int, deliver: Deliver, cut: Cut | None = None) -> None:
        """Bytes ``[start, end)`` of the resolved URL, handed to ``deliver`` block by block as they arrive
        (:mod:`.lean`); :class:`~puller.registry.lean.NotPartial` when the answer is not a 206: ask through
        :meth:`open`, which maps every status. ``cut`` may end the request early."""
        assert self.url is not None and self.client.lean is not None
        guard = self.client.settings.speed.guard(f"{self.host}: blob {self.desc.digest}")
        await self.client.lean.get(self.url, start, end, deliver, guard, cut)

    @asynccontextmanager
    async def open(self, start: int, end: int) -> AsyncIterator[RangeBody]:
        """Bytes ``[start, end)`` from the current host (or, see :class:`RangeBody`, the whole blob)."""
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        endpoint = self.endpoints[self.index]
        if self.url:
            try:
                async with self.client.url_get(self.url, headers) as resp:
                    yield self._checked(resp, start, endpoint.host)
            except ExpiredURL:
                self.url = None  # resolve through the registry again on the next attempt
                raise
        else:
            path = f"blobs/{self.desc.digest}"
            async with self.client.registry_get(self.ref, path, headers, endpoint) as (resp, final_url):
                if final_url != self.client.endpoint_url(endpoint, self.ref, path):
                    self.url = final_url
                yield self._checked(resp, start, endpoint.host)

    def _checked(self, resp: Response, start: int, host: str) -> RangeBody:
        size, digest = self.desc.size, self.desc.digest
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            # Ranges and digests are about the blob's own bytes: an encoded body is neither (identity was asked).
            raise RegistryError(f"{host} sent blob {digest} with Content-Encoding {encoding!r}")
        if resp.status == 206:
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                raise TransportError(f"bad Content-Range {resp.headers.get('Content-Range')!r} for {start}-")
            if m.group(3) != "*" and int(m.group(3)) != size:
                raise SizeMismatch(size, int(m.group(3)), what=f"blob {digest}")
            whole = False
        elif resp.status == 200:
            length = resp.content_length
            if length is not None and length != size:
                raise SizeMismatch(size, length, what=f"blob {digest}")
            whole = True
        else:
            raise TransportError(f"unexpected HTTP {resp.status} for a blob range")
        guard = self.client.settings.speed.guard(f"{host}: blob {digest}")
        return RangeBody(whole, host, resp, guard)
