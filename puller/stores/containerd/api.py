"""containerd's gRPC services over one channel, in one namespace, and its errors in the project's terms.

Stubs: puller/stores/containerd_api (our own minimal .proto files, generated code committed); they follow
containerd's API v1, whose field numbers are the same from containerd 1.6 to 2.x. Content.Write alone goes
through :mod:`.stream` (:meth:`Api.open_write`), on a connection of its own.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import empty_pb2

from ...errors import DiskFull, StoreError
from ..containerd_api import (
    content_pb2_grpc,
    diff_pb2_grpc,
    images_pb2_grpc,
    introspection_pb2_grpc,
    leases_pb2_grpc,
    snapshots_pb2_grpc,
    version_pb2_grpc,
)
from .stream import RpcError, WriteStream

MAX_MESSAGE = 16 << 20
T = TypeVar("T")


class Api:
    """Use as ``async with Api(address, namespace) as api``."""

    def __init__(self, address: str, namespace: str):
        self.address = address
        self.namespace = namespace
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Api:
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
        self._socket = str(sock.absolute())
        channel = self._channel = grpc.aio.insecure_channel(
            f"unix://{self._socket}",
            options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)],
        )
        self.content = content_pb2_grpc.ContentStub(channel)
        self.images = images_pb2_grpc.ImagesStub(channel)
        self.leases = leases_pb2_grpc.LeasesStub(channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.diff = diff_pb2_grpc.DiffStub(channel)
        self.introspection = introspection_pb2_grpc.IntrospectionStub(channel)
        try:
            await version_pb2_grpc.VersionStub(channel).Version(empty_pb2.Empty(), timeout=10)
        except grpc.aio.AioRpcError as e:
            await self.__aexit__()
            raise self.error(e, "connecting") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def open_write(self, lease: str | None = None) -> WriteStream:
        """A Content.Write call on a connection of its own (:mod:`.stream`: grpcio costs 3x the CPU there)."""
        return await WriteStream.open(self._socket, "/containerd.services.content.v1.Content/Write", self.md(lease))

    def md(self, lease: str | None = None) -> tuple[tuple[str, str], ...]:
        """gRPC metadata: the namespace, and the lease that what the call creates belongs to."""
        md = (("containerd-namespace", self.namespace),)
        return (*md, ("containerd-lease", lease)) if lease else md

    async def unless_missing(self, call: Awaitable[T], what: str) -> T | None:
        """The answer to ``call``, or None when containerd says NOT_FOUND; other errors are StoreErrors."""
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self.error(e, what) from None

    def error(self, e: grpc.aio.AioRpcError | RpcError, what: str) -> StoreError:
        code = e.code()
        detail = e.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return StoreError(f"containerd at {self.address} is unavailable while {what}: {detail}")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return StoreError(f"this containerd does not implement a call needed for {what} (too old?): {detail}")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return StoreError(f"containerd refused {what}: permission denied")
        if "no space left on device" in detail or "disk quota exceeded" in detail:
            return DiskFull(f"containerd ran out of disk space while {what}: {detail}")
        return StoreError(f"containerd: {what}: {detail or code.name}")
