"""Directories that puller writes into as root, used only through a file descriptor that was checked once.

A staging or store directory may sit where other users can create entries first (a shared ``/var/lib``, a
``/tmp`` path, a cache directory another tool made). Following a link planted there would let a registry's
bytes overwrite any file on the node. So:

- :meth:`SafeDir.open` walks the path from ``/`` one component at a time with ``O_NOFOLLOW``. A symbolic link
  on the way is followed only when root or puller's own user owns it; a directory reached through a directory
  that others can write must belong to root or puller's user. The directory itself must belong to puller's
  user and must not be writable by group or others: otherwise it is refused with one line naming the fix.
  A directory puller creates gets the mode it asks for.
- Every entry is opened relative to the checked descriptor with ``O_NOFOLLOW``; a file that is not a plain
  file with one link, owned by puller's user, is removed and made anew (``O_EXCL``), never written through.
- Renames and removals also go through the descriptors (``renameat``/``unlinkat`` never follow a link), and
  modes are set with ``fchmod`` on an open file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import StoreError

MAX_LINKS = 40  # symbolic links followed while opening one path, as the kernel's own limit
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _shared(st: os.stat_result) -> bool:
    """Others than its owner may create or rename entries in it."""
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


class UnsafeDirectory(StoreError):
    """A directory puller would write into is a link, or another user owns it or may write into it."""


class SafeDir:
    """An open, checked directory. Use :meth:`open`; close with :meth:`close` (or ``with``)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @classmethod
    def open(cls, path: str | os.PathLike[str], create: bool = True, mode: int = 0o700) -> SafeDir:
        """Open ``path`` (creating missing directories with ``mode`` when ``create``), checked as described in
        the module docstring. Raises :class:`UnsafeDirectory` or StoreError with one line."""
        path = Path(os.path.abspath(path))
        return cls._checked(path, _walk(os.open("/", _DIR_FLAGS), list(path.parts[1:]), create, mode, str(path)))

    @classmethod
    def _checked(cls, path: Path, fd: int) -> SafeDir:
        """``fd`` (directory ``path``) if puller's user owns it and nobody else may write it; closed otherwise."""
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise UnsafeDirectory(
                    f"{path} belongs to uid {st.st_uid}, not to puller's user (uid {os.geteuid()}): "
                    "refusing to write there; remove it or give it to puller's user"
                )
            if _shared(st):
                raise UnsafeDirectory(
                    f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): refusing to write "
                    f"there; run chmod go-w {path}"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def subdir(self, name: str, create: bool = True, mode: int = 0o700) -> SafeDir:
        """A checked subdirectory (one component), reached from this directory's descriptor."""
        _check_name(name)
        path = self.path / name
        return SafeDir._checked(path, _walk(os.dup(self.fd), [name], create, mode, str(path)))

    # ---- files ---------------------------------------------------------------------------------------------

    def open_file(self, name: str, flags: int, mode: int = 0o600) -> int:
        """Open entry ``name`` without following links. With ``O_CREAT``, an existing entry that is not puller's
        own plain file (a link, a hard link, another user's file, a fifo) is removed and the file made anew."""
        _check_name(name)
        if not flags & os.O_CREAT:
            fd = os.open(name, flags | _FILE_FLAGS | os.O_NONBLOCK, dir_fd=self.fd)  # a fifo must not hang us
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise StoreError(f"{self.path / name} is not a regular file")
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
            return fd
        for _ in range(3):
            try:
                fd = os.open(name, flags | _FILE_FLAGS | os.O_NONBLOCK, mode, dir_fd=self.fd)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                self.unlink(name)  # a symbolic link where a file of ours should be
                continue
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
                os.set_blocking(fd, True)
                return fd
            os.close(fd)
            self.unlink(name)
            flags |= os.O_EXCL
        raise StoreError(f"{self.path / name}: could not be created as a plain file")

    def create_exclusive(self, name: str, mode: int = 0o600) -> int:
        return self.open_file(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

    def stat(self, name: str) -> os.stat_result | None:
        """``lstat`` of an entry, None when absent."""
        _check_name(name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def unlink(self, name: str) -> None:
        _check_name(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def read_bytes(self, name: str, limit: int) -> bytes:
        """The content of plain file ``name``, at most ``limit`` bytes (more is a StoreError)."""
        fd = self.open_file(name, os.O_RDONLY)
        try:
            data = bytearray()
            while len(data) <= limit:
                block = os.read(fd, min(1 << 20, limit + 1 - len(data)))
                if not block:
                    break
                data += block
        finally:
            os.close(fd)
        if len(data) > limit:
            raise StoreError(f"{self.path / name} is larger than {limit} bytes")
        return bytes(data)

    def write_atomic(
        self,
        name: str,
        data: bytes,
        mode: int = 0o644,
        durable: bool = True,
        before: Callable[[int], None] | None = None,
    ) -> None:
        """Replace ``name`` with ``data``: a temp file unique to this write (``O_EXCL``), written, fsynced when
        ``durable``, renamed over ``name``; the directory fsynced when ``durable``."""
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = self.create_exclusive(tmp, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if before is not None:
                before(fd)
            if durable:
                os.fsync(fd)
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(tmp)
            raise
        finally:
            os.close(fd)
        if durable:
            os.fsync(self.fd)

    def move_into(
        self,
        name: str,
        target: SafeDir,
        target_name: str,
        mode: int = 0o644,
        before: Callable[[int], None] | None = None,
    ) -> None:
        """Make staged file ``name`` visible as ``target/target_name``: fsync it (which also turns preallocated,
        unwritten extents into written ones), set ``mode``, call ``before(fd)`` (e.g. to mark it), rename (never
        follows a link), fsync the target."""
        fd = self.open_file(name, os.O_RDONLY)
        try:
            if before is not None:
                before(fd)
            os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        _check_name(target_name)
        os.rename(name, target_name, src_dir_fd=self.fd, dst_dir_fd=target.fd)
        os.fsync(target.fd)

    def names(self) -> list[str]:
        return os.listdir(self.fd)


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a single path component: {name!r}")


def _walk(fd: int, parts: list[str], create: bool, mode: int, where: str) -> int:
    """Descend from the open directory ``fd`` through ``parts``; returns the last directory's fd (``fd`` is
    consumed, and closed on error)."""
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name in ("", "."):
                continue
            parent_st = os.fstat(fd)
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise StoreError(f"{where}: no such directory") from None
                try:
                    os.mkdir(name, mode if not parts else 0o755, dir_fd=fd)  # parents readable, as mkdir -p
                except FileExistsError:
                    pass  # made meanwhile: opened and checked below like any other
                except OSError as e:
                    raise StoreError(f"cannot create {where}: {e.strerror}") from None
                parts.insert(0, name)
                continue
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise StoreError(f"cannot open {where}: {e.strerror}") from None
                target = _link_target(fd, name, where)
                links += 1
                if links > MAX_LINKS:
                    raise StoreError(f"{where}: too many symbolic links") from None
                parts[:0] = [p for p in target.split("/") if p]
                if target.startswith("/"):
                    root = os.open("/", _DIR_FLAGS)
                    os.close(fd)
                    fd = root
                continue
            st = os.fstat(child)
            os.close(fd)
            fd = child
            if _shared(parent_st) and not _trusted_owner(st.st_uid):
                raise UnsafeDirectory(
                    f"{where}: {name} belongs to uid {st.st_uid} in a directory others can write: refusing to use it"
                )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link_target(fd: int, name: str, where: str) -> str:
    """The target of link ``name``, if it may be followed (root or puller's user made it)."""
    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        raise StoreError(f"{where}: {name} is not a directory")
    if not _trusted_owner(st.st_uid):
        raise UnsafeDirectory(f"{where}: {name} is a symbolic link owned by uid {st.st_uid}: refusing to follow it")
    return os.readlink(name, dir_fd=fd)
