"""A layer's root directory, written as root without ever leaving it.

Every name of a layer is resolved inside the root as if the root were ``/`` (containerd's ``fs.RootPath``): a
symbolic link on the way is followed, but ``..`` and absolute targets stop at the root. The kernel does this
itself: ``openat2`` with ``RESOLVE_IN_ROOT`` (Linux 5.6+) opens a parent directory, and the last component is
then made, removed or changed through that descriptor with calls that never follow it (``mkdirat``,
``unlinkat``, ``linkat`` without ``AT_SYMLINK_FOLLOW``, ``fchownat`` and ``utimensat`` with
``AT_SYMLINK_NOFOLLOW``, ``O_NOFOLLOW``). No byte is written outside the root, whatever the tar says.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections import OrderedDict

SYS_OPENAT2 = 437  # the same number on every architecture (the unified syscall table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_LINKS = 40  # links followed while resolving one path, as the kernel's own limit
CACHED_PARENTS = 64  # open parent directories kept (entries of a layer come directory by directory)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2_in_root(root_fd: int, path: str, flags: int = PATH_FLAGS) -> int:
    """``path`` opened relative to ``root_fd`` with the root as ``/`` (``RESOLVE_IN_ROOT``); OSError on failure."""
    how = _OpenHow(flags, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = _syscall(
        ctypes.c_long(SYS_OPENAT2), ctypes.c_int(root_fd), os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)
    )
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fd


class Root:
    """A directory a layer is applied into, open as a descriptor; parent directories are looked up through a
    small cache of open descriptors, which :meth:`forget` empties whenever a path is removed or replaced."""

    def __init__(self, fd: int):
        self.fd = fd
        self._parents: OrderedDict[str, int] = OrderedDict()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Root:
        return cls(os.open(path, DIR_FLAGS))

    def close(self) -> None:
        self.forget()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forget(self) -> None:
        for fd in self._parents.values():
            os.close(fd)
        self._parents.clear()

    def parent(self, directory: str, make: bool, mode: int = 0o755) -> int:
        """An ``O_PATH`` descriptor of ``directory`` (a cleaned relative path, "" for the root), resolved inside the
        root; with ``make``, missing directories on the way are created with ``mode`` (as ``os.MkdirAll`` does on
        the resolved path). Owned by the cache: do not close it."""
        if not directory:
            return self.fd
        fd = self._parents.get(directory)
        if fd is not None:
            self._parents.move_to_end(directory)
            return fd
        try:
            fd = openat2_in_root(self.fd, directory)
        except FileNotFoundError:
            if not make:
                raise
            fd = self._make_dirs(directory, mode)
        self._parents[directory] = fd
        if len(self._parents) > CACHED_PARENTS:
            os.close(self._parents.popitem(last=False)[1])
        return fd

    def _make_dirs(self, directory: str, mode: int) -> int:
        """Resolve ``directory`` one component at a time as ``fs.RootPath`` does (``..`` stops at the root, a link
        restarts from its target, at most MAX_LINKS of them), creating what is missing as ``os.MkdirAll`` does on
        the resolved path. The components resolved so far are real directories, so each step opens them again in
        the root."""
        resolved: list[str] = []
        pending = directory.split("/")
        links = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            at = openat2_in_root(self.fd, "/".join(resolved)) if resolved else os.dup(self.fd)
            try:
                st = self.lstat(at, part)
                if st is None:
                    os.mkdir(part, mode, dir_fd=at)
                elif stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), directory)
                    target = os.readlink(part, dir_fd=at)
                    if target.startswith("/"):
                        resolved.clear()
                    pending[:0] = target.split("/")
                    continue
                elif not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
            finally:
                os.close(at)
            resolved.append(part)
        return openat2_in_root(self.fd, "/".join(resolved)) if resolved else os.dup(self.fd)

    def lstat(self, parent_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def remove_all(self, parent_fd: int, name: str) -> None:
        """Remove ``name`` in ``parent_fd`` and, if it is a directory, everything under it (never following a
        link); missing is fine."""
        try:
            os.unlink(name, dir_fd=parent_fd)
            return
        except FileNotFoundError:
            return
        except IsADirectoryError:
            pass
        except OSError as e:
            if e.errno != errno.EISDIR and e.errno != errno.EPERM:
                raise
        self.forget()  # cached descriptors may lie under it
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        try:
            with os.scandir(fd) as entries:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            for child, is_dir in children:
                if is_dir:
                    self.remove_all(fd, child)
                else:
                    os.unlink(child, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent_fd)


def is_dir(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISDIR(st.st_mode)
