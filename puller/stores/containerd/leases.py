"""Leases: one per image being pulled, as containerd's own client makes one per pull.

What is written under a lease is never collected while the lease lives; it is dropped once the image record
references the content (and the content the snapshots) through gc labels. A lease expires on its own
(``lease_expiry``) if puller dies before dropping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import secrets
from dataclasses import dataclass

from google.protobuf import empty_pb2

from ...errors import StoreError
from ..containerd_api import leases_pb2
from .api import LEASES, Api
from .stream import RpcError

ImageKey = tuple[str, ...]  # the digests of an image's blobs: names the pulls of one image


@dataclass(slots=True)
class Lease:
    """A containerd lease for the pulls of one image, and for the blob writes made under it."""

    id: str
    users: int = 0  # pulls of the image in progress + blob writes under it; the last drops the lease
    created: asyncio.Future | None = None  # the Create call


class Leases:
    def __init__(self, api: Api, expiry: float):
        self.api = api
        self.expiry = expiry
        self._held: dict[ImageKey, Lease] = {}
        self._drops: set[asyncio.Future] = set()

    def __bool__(self) -> bool:
        return bool(self._held)

    def of(self, key: ImageKey) -> Lease | None:
        return self._held.get(key)

    async def hold(self, key: ImageKey) -> Lease:
        """The lease of image ``key``'s pulls, made by the first of them; held (``users``) until released."""
        lease = self._held.get(key)
        if lease is None:
            lease = self._held[key] = Lease(f"puller-{secrets.token_hex(8)}")
            lease.created = asyncio.ensure_future(self._create(lease.id))
        lease.users += 1
        assert lease.created is not None
        try:
            await asyncio.shield(lease.created)
        except BaseException:
            self.release(lease)
            raise
        return lease

    async def _create(self, lease_id: str) -> None:
        expire = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.expiry)
        labels = {"containerd.io/gc.expire": expire.strftime("%Y-%m-%dT%H:%M:%SZ")}
        try:
            request = leases_pb2.CreateRequest(id=lease_id, labels=labels)
            await self.api.call(LEASES + "Create", request, leases_pb2.CreateResponse)
        except RpcError as e:
            raise self.api.error(e, "creating a lease") from None

    def for_blob(self, digest: str) -> Lease | None:
        """The lease a blob's write is made under: that of an image being pulled that has the blob. The write
        holds it, so that a pull that ends (or fails) first does not drop the lease under another's write."""
        for key, lease in self._held.items():
            if digest in key and lease.users > 0:
                lease.users += 1
                return lease
        return None

    def release(self, lease: Lease) -> None:
        """One user fewer; the last drops the lease: what image records reference stays (gc labels), the rest
        goes to containerd's garbage collector."""
        lease.users -= 1
        if lease.users > 0:
            return
        for key, held in list(self._held.items()):
            if held is lease:
                del self._held[key]
        drop = asyncio.ensure_future(self._drop(lease))
        self._drops.add(drop)
        drop.add_done_callback(self._drops.discard)

    async def _drop(self, lease: Lease) -> None:
        with contextlib.suppress(RpcError, StoreError):  # else it expires on its own
            if lease.created is not None:
                await lease.created
            await self.api.call(LEASES + "Delete", leases_pb2.DeleteRequest(id=lease.id), empty_pb2.Empty)

    async def close(self) -> None:
        """Drop every lease (pulls that ended without their image's end) and wait for the drops."""
        for lease in list(self._held.values()):
            lease.users = 1
            self.release(lease)
        await asyncio.gather(*self._drops, return_exceptions=True)
