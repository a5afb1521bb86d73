"""The applier process's side of :mod:`puller.unpack.process` (the protocol is described there): a thread per layer
handed over the control socket, each applying the bytes of its layer's socket and answering with what it applied
or its error. Kept apart from the parent's side so that the worker does not import asyncio (11 MB of its memory)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import sys
import threading
from dataclasses import asdict
from typing import Any

from .. import errors
from ..digest import Digest
from ..registry.manifest import Descriptor
from .apply import Limits
from .layer import Applied, LayerStream

PIECE = 1 << 20  # most bytes read from a layer's socket at once
MAX_HEADER = 64 << 10  # largest header message
MAX_LAYERS = 1024  # layers applied at once (a thread each)
PR_SET_PDEATHSIG = 1
# The parent feeds many layers a little at a time (a layer's stream gives way when it runs out of bytes): unbounded,
# each held a few MiB here (the bytes read, the decompressor's output, its tar thread's queue), and layers20's 20
# layers took puller and this process past 200 MB. So at most DECOMPRESSING layers read and decompress at once
# (waiting for a turn holds nothing: the bytes stay in the layer's socket), and the pieces queued for the tar threads
# of every layer together are at most QUEUED_PIECES (of 1 MiB).
DECOMPRESSING = 2
QUEUED_PIECES = 6
_decompressing = threading.Semaphore(DECOMPRESSING)
_queued = threading.Semaphore(QUEUED_PIECES)
_buffers: list[bytearray] = []  # receive buffers, reused (fresh ones fault their pages in): one per DECOMPRESSING


def serve() -> None:
    """The worker's main: start a thread per layer handed over the control socket until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control_fd, parent = int(sys.argv[2]), int(sys.argv[3])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        return
    layers: list[threading.Thread] = []
    with socket.socket(fileno=control_fd) as control:
        while True:
            try:
                header, fds, flags, _ = socket.recv_fds(control, MAX_HEADER, 2)
            except OSError:
                break
            if not header:
                break  # the parent closed its end
            layers = [t for t in layers if t.is_alive()]
            if len(fds) != 2 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(layers) >= MAX_LAYERS:
                for fd in fds:
                    os.close(fd)  # the parent sees the layer's socket close without an answer
                continue
            thread = threading.Thread(target=_apply_layer, args=(header, fds[0], fds[1]), name="puller-layer")
            thread.start()
            layers.append(thread)


def _apply_layer(header: bytes, sock_fd: int, root_fd: int) -> None:
    """Apply one layer from its socket into ``root_fd`` and answer on the socket (closed when done)."""
    with socket.socket(fileno=sock_fd) as sock:
        try:
            try:
                stream = _layer_stream(json.loads(header), root_fd)
            finally:
                os.close(root_fd)  # the stream holds its own duplicate
            answer: dict[str, Any] = {"applied": asdict(_applied(stream, sock))}
        except BaseException as e:
            answer = _answer_for(e)
        with contextlib.suppress(OSError):
            sock.sendall(json.dumps(answer).encode())
            while sock.recv(PIECE):  # bytes left unread would reset the parent's end before it reads the answer
                pass


def _layer_stream(header: dict[str, Any], root_fd: int) -> LayerStream:
    desc = Descriptor(header["media_type"], Digest.parse(header["digest"]), int(header["size"]))
    limits = Limits(**header["limits"])
    overlay = bool(header["overlay"])
    return LayerStream(desc, header["diff_id"], root_fd, overlay, limits, check_digest=False, budget=_queued)


def _applied(stream: LayerStream, sock: socket.socket) -> Applied:
    """Feed the stream every byte the parent sends, then finish it; on an error, stop reading first (so that the
    parent's next send fails). The stream's tar thread has ended when this returns."""
    readable = select.poll()  # not select(): a worker of many layers holds descriptors past 1,024
    readable.register(sock, select.POLLIN)
    try:
        while True:
            readable.poll()  # bytes (or the end) are there: waiting for them holds no memory
            with _decompressing:
                buffer = _buffers.pop() if _buffers else bytearray(PIECE)
                try:
                    n = sock.recv_into(buffer)
                    if not n:
                        break
                    stream.feed(memoryview(buffer)[:n])  # nothing keeps the view: the decompressor copies
                finally:
                    _buffers.append(buffer)
        return stream.finish()
    except BaseException:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)
        raise
    finally:
        stream.close()


def _answer_for(error: BaseException) -> dict[str, Any]:
    name = type(error).__name__
    if isinstance(error, errors.PullerError) and getattr(errors, name, None) is type(error):
        attributes = {k: v for k, v in vars(error).items() if isinstance(v, (str, int))}
        return {"error": name, "message": str(error), "attributes": attributes}
    if isinstance(error, OSError) and error.errno is not None:
        return {"error": "OSError", "errno": error.errno, "message": error.strerror or str(error)}
    return {"error": name, "message": str(error)}
