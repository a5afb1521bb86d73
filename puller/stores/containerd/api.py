"""containerd's gRPC services, called in one namespace, and their errors in the project's terms.

Messages: puller/stores/containerd_api (our own minimal .proto files, generated code committed); they follow
containerd's API v1, whose field numbers are the same from containerd 1.6 to 2.x. The calls go over puller's own
HTTP/2 client (:mod:`.stream`): unary ones through a small pool of connections (:mod:`.channel`), Content.Write on
a connection of its own (:meth:`Api.open_write`).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ...errors import DiskFull, StoreError
from ..containerd_api import version_pb2
from .channel import Channel
from .stream import Connection, RpcError, StatusCode

CALL_TIMEOUT_S = 120.0  # a call's longest wait, unless it says otherwise (Diff.Apply: APPLY_TIMEOUT_S)
CONNECT_TIMEOUT_S = 10.0  # the first call, which tells whether containerd is there at all
T = TypeVar("T")
M = TypeVar("M", bound=Message)

CONTENT = "/containerd.services.content.v1.Content/"
IMAGES = "/containerd.services.images.v1.Images/"
LEASES = "/containerd.services.leases.v1.Leases/"
SNAPSHOTS = "/containerd.services.snapshots.v1.Snapshots/"
DIFF = "/containerd.services.diff.v1.Diff/"
INTROSPECTION = "/containerd.services.introspection.v1.Introspection/"
VERSION = "/containerd.services.version.v1.Version/"


class Api:
    """Use as ``async with Api(address, namespace) as api``."""

    def __init__(self, address: str, namespace: str):
        self.address = address
        self.namespace = namespace
        self.version = ""  # containerd's own, as its Version service says (e.g. "v2.4.2")
        self._channel: Channel | None = None

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
        self._channel = Channel(self._socket)
        try:
            answer = await self.call(VERSION + "Version", None, version_pb2.VersionResponse, timeout=CONNECT_TIMEOUT_S)
            self.version = answer.version
        except RpcError as e:
            await self.__aexit__()
            raise self.error(e, "connecting") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def call(
        self,
        path: str,
        request: Message | None,
        answer: type[M],
        lease: str | None = None,
        timeout: float = CALL_TIMEOUT_S,
    ) -> M:
        """The unary call ``path`` (``request`` None: an empty message), its answer parsed as ``answer``."""
        answers = await self.calls(path, request, answer, lease, timeout)
        if len(answers) != 1:
            raise RpcError(StatusCode.INTERNAL, f"{path}: {len(answers)} answers to a unary call")
        return answers[0]

    async def calls(
        self,
        path: str,
        request: Message | None,
        answer: type[M],
        lease: str | None = None,
        timeout: float = CALL_TIMEOUT_S,
    ) -> list[M]:
        """A call with one request and any number of answers (a unary call has exactly one)."""
        assert self._channel is not None, "use the Api as a context manager"
        body = request.SerializeToString() if request is not None else b""
        answers = await self._channel.call(path, body, self.md(lease), timeout)
        try:
            return [answer.FromString(a) for a in answers]
        except DecodeError as e:
            raise RpcError(StatusCode.INTERNAL, f"{path}: a malformed answer: {e}") from None

    async def open_write(self, lease: str | None = None) -> Connection:
        """A Content.Write call on a connection of its own: its framed messages are spliced into the socket."""
        connection = await Connection.open(self._socket)
        connection.start(CONTENT + "Write", self.md(lease))
        return connection

    def md(self, lease: str | None = None) -> tuple[tuple[str, str], ...]:
        """gRPC metadata: the namespace, and the lease that what the call creates belongs to."""
        md = (("containerd-namespace", self.namespace),)
        return (*md, ("containerd-lease", lease)) if lease else md

    async def unless_missing(self, call: Awaitable[T], what: str) -> T | None:
        """The answer to ``call``, or None when containerd says NOT_FOUND; other errors are StoreErrors."""
        try:
            return await call
        except RpcError as e:
            if e.code() == StatusCode.NOT_FOUND:
                return None
            raise self.error(e, what) from None

    def error(self, e: RpcError, what: str) -> StoreError:
        code = e.code()
        detail = e.details() or ""
        if code == StatusCode.UNAVAILABLE:
            return StoreError(f"containerd at {self.address} is unavailable while {what}: {detail}")
        if code == StatusCode.DEADLINE_EXCEEDED:
            return StoreError(f"containerd did not answer in time while {what}: {detail}")
        if code == StatusCode.UNIMPLEMENTED:
            return StoreError(f"this containerd does not implement a call needed for {what} (too old?): {detail}")
        if code == StatusCode.PERMISSION_DENIED:
            return StoreError(f"containerd refused {what}: permission denied")
        if "no space left on device" in detail or "disk quota exceeded" in detail:
            return DiskFull(f"containerd ran out of disk space while {what}: {detail}")
        return StoreError(f"containerd: {what}: {detail or code.name}")
