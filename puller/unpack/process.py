"""puller's applier in a process of its own, so that creating a layer's files does not take turns with receiving
its bytes: each file costs a few system calls, and each gives up Python's lock and takes it back, which in one
interpreter the event loop (receiving, hashing, streaming into containerd) waits on.

One worker process (:class:`ApplierProcess`; its side is :mod:`puller.unpack.worker`) serves every layer of a
store, each over a socket pair of its own. For a layer, the parent sends on its control socket (SOCK_SEQPACKET) one
message: the layer's header (JSON: its descriptor, diff ID, whiteout form and limits) with two descriptors passed
along (SCM_RIGHTS): the worker's end of the layer's socket pair and the directory the layer goes into. The worker
applies the bytes it reads from the layer's socket (a :class:`~puller.unpack.layer.LayerStream`, in a thread of
the layer's own) until the parent shuts its end for writing, then verifies the layer and answers with one JSON
object: what it applied, or its error (a class of :mod:`puller.errors` or an OSError's errno, and the message). A
worker that fails a layer stops reading it, so the parent's next send fails and it sends no more. The worker
closes a layer's socket only once it has stopped writing into the layer's directory: the parent may remove the
directory after that. The compressed digest is not checked by the worker: the store checks it (containerd, when
it commits the blob).

The worker runs ``python -I -S`` on this process's module path (it imports what this process imports, and no
environment variable, user site or .pth file changes that: it runs as root), ignores Ctrl-C (its parent decides),
dies with its parent (PR_SET_PDEATHSIG) and ends once its control socket is closed and its layers are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from typing import Any

from .. import errors
from ..errors import StoreError
from ..registry.manifest import Descriptor
from .apply import Limits
from .layer import Applied

SOCKET_BUFFER = 4 << 20  # bytes of one layer in flight between the processes (asked for; the kernel may cap it)
MAX_ANSWER = 1 << 20  # largest answer read back
CONTROL_TIMEOUT_S = 10.0  # longest wait to hand the worker a layer
STOP_WAIT_S = 60.0  # longest wait for the worker to stop writing into a layer given up, or to end; then it is killed
_START = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from puller.unpack.worker import serve; serve()"


class ApplierProcess:
    """The parent's side: :meth:`open` a layer, feed it through the returned :class:`LayerFeed`, and :meth:`close`
    once done. The worker is started with the first layer, and again after it died. Used from the event loop's
    thread (the worker dies when the thread that started it ends)."""

    def __init__(self) -> None:
        self._worker: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Where this process imports from, and only there: puller's own tree first (an editable install finds it by
        # an import hook, not on the path).
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = json.dumps(list(dict.fromkeys([package_parent, *map(os.path.abspath, sys.path)])))
        with theirs:
            args = [sys.executable, "-I", "-S", "-c", _START, path, str(theirs.fileno()), str(os.getpid())]
            try:
                self._worker = subprocess.Popen(
                    args, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
                )
            except OSError as e:
                ours.close()
                raise StoreError(f"cannot start puller's applier process ({sys.executable}): {e}") from None
        ours.settimeout(CONTROL_TIMEOUT_S)
        self._control = ours

    def open(self, desc: Descriptor, diff_id: str, root_fd: int, overlay: bool, limits: Limits) -> LayerFeed:
        """Hand the worker a layer to apply into the open directory ``root_fd`` (not closed here); raises StoreError
        when the worker cannot be reached."""
        if self._worker is None or self._worker.poll() is not None:
            self.kill()
            self._start()
        assert self._control is not None
        header = json.dumps(
            {
                "media_type": desc.media_type,
                "digest": str(desc.digest),
                "size": desc.size,
                "diff_id": diff_id,
                "overlay": overlay,
                "limits": asdict(limits),
            }
        ).encode()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            try:
                socket.send_fds(self._control, [header], [theirs.fileno(), root_fd])
            except OSError as e:
                ours.close()
                self.kill()
                raise StoreError(f"puller's applier process cannot be reached: {e}") from None
        with contextlib.suppress(OSError):
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        ours.setblocking(False)
        return LayerFeed(ours, self)

    def kill(self) -> None:
        """Stop the worker now (every layer it applies fails) and forget it."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._worker is not None:
            with contextlib.suppress(OSError):
                self._worker.kill()
            self._worker.wait()
            self._worker = None

    async def close(self) -> None:
        """Let the worker end once its layers are done (killed after STOP_WAIT_S)."""
        if self._control is not None:
            self._control.close()
            self._control = None
        worker, self._worker = self._worker, None
        if worker is not None:
            try:
                await asyncio.to_thread(worker.wait, STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                worker.kill()
                await asyncio.to_thread(worker.wait)


class LayerFeed:
    """One layer's bytes to the worker. Use: :meth:`put` pieces in order from offset 0, then :meth:`finish` (or
    :meth:`abort`), then :meth:`close`. ``put`` waits while the worker is behind (the socket's buffer is full), so
    the blob's stream waits and, behind it, its downloads. A layer the worker failed takes no more bytes (``put``
    returns at once): ``finish`` raises its error. A feed whose bytes failed the blob's digest is
    :meth:`discarded <discard>`: its layer is applied from the verified blob instead."""

    def __init__(self, sock: socket.socket, process: ApplierProcess):
        self._sock = sock
        self._process = process
        self._sending = True  # bytes may still be put
        self._answer: dict[str, Any] | None = None
        self.offset = 0  # bytes put so far
        self.discarded = False  # what was put is not the blob (failed its digest, or a put was cut short)

    async def put(self, view: memoryview) -> None:
        """Send ``view`` (the next bytes of the blob) to the worker."""
        if not self._sending:
            return
        try:
            await asyncio.get_running_loop().sock_sendall(self._sock, view)
        except OSError:  # the worker failed the layer (or died): finish tells why
            self._end_sending()
            return
        except BaseException:  # cut short: the worker may have part of ``view``
            self.discarded = True
            self._end_sending()
            raise
        self.offset += len(view)

    def _end_sending(self) -> None:
        if self._sending:
            self._sending = False
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)

    async def _answered(self) -> dict[str, Any]:
        """The worker's answer, once it stopped writing into the layer (its end of the socket closed)."""
        if self._answer is None:
            self._end_sending()
            loop = asyncio.get_running_loop()
            data = b""
            try:
                while chunk := await loop.sock_recv(self._sock, MAX_ANSWER):
                    data += chunk
                    if len(data) > MAX_ANSWER:
                        raise StoreError("puller's applier process answered with more than a layer's result")
            except ConnectionResetError:  # the worker died (with bytes of the layer unread): no answer
                data = b""
            try:
                self._answer = json.loads(data) if data else {}
            except ValueError:
                self._answer = {}
            if not isinstance(self._answer, dict):
                self._answer = {}
        return self._answer

    async def finish(self) -> Applied:
        """Wait for the worker to apply every byte put and verify the layer (LayerStream.finish); its error is
        raised here."""
        answer = await self._answered()
        if "applied" in answer:
            return Applied(**answer["applied"])
        raise _error_from(answer, self._process.pid)

    async def abort(self) -> None:
        """Stop applying (the pull gave up) and wait until the worker stopped writing into the layer (it is killed
        after STOP_WAIT_S)."""
        self._end_sending()
        try:
            async with asyncio.timeout(STOP_WAIT_S):
                await self._answered()
        except (TimeoutError, StoreError, OSError):
            self._process.kill()

    async def discard(self) -> None:
        """The bytes put failed the blob's digest (a lying host): void, and no more are applied."""
        self.discarded = True
        await self.abort()

    async def close(self) -> None:
        self._sock.close()


def _error_from(answer: dict[str, Any], pid: int | None) -> BaseException:
    """The worker's error as the exception it was (a class of puller.errors, or an OSError by errno)."""
    name, message = answer.get("error"), str(answer.get("message", ""))
    if name is None:
        return StoreError(f"puller's applier process (pid {pid}) ended without finishing a layer")
    if name == "OSError" and isinstance(answer.get("errno"), int):
        return OSError(answer["errno"], message)
    cls = getattr(errors, str(name), None)
    if isinstance(cls, type) and issubclass(cls, errors.PullerError):
        error = cls.__new__(cls)
        Exception.__init__(error, message)
        attributes = answer.get("attributes")
        if isinstance(attributes, dict):
            error.__dict__.update(attributes)
        return error
    return StoreError(f"puller's applier failed: {name}: {message}")
