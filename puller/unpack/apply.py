"""Tar entries into a directory, by containerd's rules (``pkg/archive`` of containerd 2.3 and 2.4), so that the tree
is the one containerd's own applier makes.

For each entry, in this order: the name is cleaned and its parent resolved inside the root (a name that resolves to
the root is skipped); missing parents are created (0755); a whiteout must name a child of its own directory; an
existing path is removed unless both it and the entry are directories; the entry is created (regular file,
directory, hard link to a path inside the root, symlink whose target is not checked, char or block device or fifo
by mknod, skipped inside a user namespace); then its owner, its ``SCHILY.xattr.*`` attributes (``trusted.*`` and
attributes the filesystem refuses as unsupported are skipped), its mode (setuid, setgid and sticky kept; not for
symlinks) and its times (atime is the later of atime and mtime; times before 1970 or past 2262 become 0).
Directories' times are set again after the last entry. A PAX global header is an entry that only removes what is
at its name. Other entry types (GNU sparse among them) are refused.

Whiteouts: in overlayfs form (``overlay=True``, containerd's converter for an upper directory) ``.wh.X`` becomes a
char device 0/0 named X and ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on its directory; otherwise (the
bottom layer, applied on a bind mount) ``.wh.X`` removes X and ``.wh..wh..opq`` removes what this layer did not
write in its directory.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass
from functools import cache

from ..errors import DiskFull, InvalidLayer, StoreError
from .rootfs import Root, is_dir, openat2_in_root
from .tar import Entry, EntrySink, bound_time

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
MAX_DEVICE = (1 << 32) - 1
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DEVICE_TYPES = {"3": stat.S_IFCHR, "4": stat.S_IFBLK, "6": stat.S_IFIFO}


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one layer may hold (hostile layers): entries, name length, one xattr value, and the bytes of
    its decompressed stream."""

    max_entries: int = 1_000_000
    max_name: int = 4096
    max_xattr: int = 65536
    max_unpacked: int = 256 << 30


@cache
def in_user_namespace() -> bool:
    """Whether puller runs in a user namespace (then device nodes are skipped, as containerd skips them)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def go_clean(name: str) -> str:
    """Go's filepath.Clean: lexical, "" -> ".", a leading "//" folded to "/"."""
    cleaned = posixpath.normpath(name) if name else "."
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def in_root(name: str) -> str:
    """A cleaned tar name as a path relative to the root (``fs.RootPath`` clamps leading ``/`` and ``..``); "" for
    the root itself."""
    rel = go_clean(name).lstrip("/")
    while rel == ".." or rel.startswith("../"):
        rel = rel[3:]
    return "" if rel == "." else rel


class Applier(EntrySink):
    """Applies the entries a :class:`~puller.unpack.tar.TarReader` reads into ``root``; :meth:`finish` after the
    last one sets the directories' times."""

    def __init__(self, root: Root, overlay: bool, limits: Limits):
        self.root = root
        self.overlay = overlay
        self.limits = limits
        self._dirs: list[tuple[str, int, int]] = []  # (path in the root, atime, mtime) of every directory entry
        self._written: set[str] | None = None if overlay else set()  # paths this layer wrote (naive opaque)
        self._entry: Entry | None = None
        self._fd = -1  # the regular file being written
        self._userns = in_user_namespace()

    def begin(self, entry: Entry) -> None:
        self._entry = entry
        try:
            self._begin(entry)
        except OSError as e:
            raise self._error(e) from None

    def data(self, piece: memoryview) -> None:
        if self._fd < 0:
            return
        try:
            while piece:
                piece = piece[os.write(self._fd, piece) :]
        except OSError as e:
            raise self._error(e) from None

    def end(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            entry = self._entry
            assert entry is not None
            os.fchown(fd, entry.uid, entry.gid)
            self._set_xattrs(entry, lambda k, v: os.setxattr(fd, k, v), regular=True)
            os.fchmod(fd, entry.mode & 0o7777)
            os.utime(fd, ns=_times(entry))
        except OSError as e:
            raise self._error(e) from None
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release what an interrupted apply holds (an open file)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def finish(self) -> None:
        """Set every directory entry's times again, now that nothing more is written into them (the last component
        resolved too, as containerd does: a directory removed since is an error)."""
        for rel, atime, mtime in self._dirs:
            try:
                fd = openat2_in_root(self.root.fd, rel, os.O_PATH | os.O_CLOEXEC)  # replaced since: what is there now
            except OSError as e:
                raise InvalidLayer(f"setting the times of directory {rel!r}: {e.strerror}") from None
            try:
                os.utime(f"/proc/self/fd/{fd}", ns=(atime, mtime))
            finally:
                os.close(fd)

    def _begin(self, entry: Entry) -> None:
        kind = entry.typeflag
        if kind in ("3", "4") and self._userns:
            return  # containerd skips device nodes in a user namespace
        rel = in_root(entry.name)
        if not rel:
            return  # resolves to the root: skipped, the root's own metadata is never applied
        directory, _, base = rel.rpartition("/")
        parent = self.root.parent(directory, make=True)
        if base.startswith(WHITEOUT):
            self._whiteout(entry, parent, directory, base)
            return
        existing = self.root.lstat(parent, base)
        if existing is not None and not (is_dir(existing) and kind == "5"):
            self.root.remove_all(parent, base)
            existing = None
        if self._written is not None:
            self._written.add(rel)
        if kind == "0":
            self._fd = os.open(base, FILE_FLAGS, 0o600, dir_fd=parent)  # data, then metadata: end()
            return
        if kind == "5":
            if existing is None:
                os.mkdir(base, 0o700, dir_fd=parent)
            times = _times(entry)
            self._dirs.append((rel, *times))
            fd = os.open(base, DIR_OPEN, dir_fd=parent)
            try:
                os.fchown(fd, entry.uid, entry.gid)
                self._set_xattrs(entry, lambda k, v: os.setxattr(fd, k, v), regular=True)
                os.fchmod(fd, entry.mode & 0o7777)
                os.utime(fd, ns=times)
            finally:
                os.close(fd)
            return
        if kind == "g":
            return  # a PAX global header: it removed what was at its name, nothing more
        if kind == "1":
            self._hardlink(entry, parent, base)
        elif kind == "2":
            os.symlink(entry.linkname, base, dir_fd=parent)
        elif kind in DEVICE_TYPES:
            if not (0 <= entry.devmajor <= MAX_DEVICE and 0 <= entry.devminor <= MAX_DEVICE):
                raise InvalidLayer(f"device number {entry.devmajor}:{entry.devminor} for {entry.name!r} out of range")
            device = os.makedev(entry.devmajor, entry.devminor) if kind != "6" else 0
            os.mknod(base, (entry.mode & 0o7777) | DEVICE_TYPES[kind], device, dir_fd=parent)
        else:
            raise InvalidLayer(f"unhandled tar header type {ord(kind)} ({entry.name!r})")
        self._set_path_metadata(entry, parent, base)

    def _set_path_metadata(self, entry: Entry, parent: int, base: str) -> None:
        """Owner, xattrs, mode and times of a link, device or fifo, through its parent (never following it)."""
        os.chown(base, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        st = os.stat(base, dir_fd=parent, follow_symlinks=False)
        path = f"/proc/self/fd/{parent}/{base}"
        regular = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
        self._set_xattrs(entry, lambda k, v: os.setxattr(path, k, v, follow_symlinks=False), regular=regular)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(base, entry.mode & 0o7777, dir_fd=parent)  # not a link: fchmodat follows nothing
        os.utime(base, ns=_times(entry), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, entry: Entry, parent: int, base: str) -> None:
        """A hard link to a path inside the root: the target's parent is resolved in the root, its last component
        is not (containerd's hardlinkRootPath); a target that resolves to the root or a directory is refused."""
        target_dir, _, target_base = entry.linkname.rpartition("/")
        if target_base in ("", ".", ".."):
            raise InvalidLayer(f"hard link {entry.name!r} to {entry.linkname!r}: not a file")
        try:
            target_parent = self.root.parent(target_dir, make=False)  # resolved by the kernel, in the root
        except FileNotFoundError:
            raise InvalidLayer(f"hard link {entry.name!r} to {entry.linkname!r}: no such file in this layer") from None
        try:
            os.link(target_base, base, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise InvalidLayer(f"hard link {entry.name!r} to {entry.linkname!r}: no such file in this layer") from None

    def _whiteout(self, entry: Entry, parent: int, directory: str, base: str) -> None:
        if base == OPAQUE:
            if self.overlay:
                os.setxattr(f"/proc/self/fd/{parent}", OPAQUE_XATTR, b"y")
            else:
                self._remove_unwritten(parent, directory)
            return
        hidden = base[len(WHITEOUT) :]
        if hidden in ("", ".", ".."):
            raise InvalidLayer(f"invalid whiteout name: {base!r}")
        if not self.overlay:
            self.root.remove_all(parent, hidden)
            return
        try:
            os.mknod(hidden, stat.S_IFCHR, 0, dir_fd=parent)
        except FileExistsError:
            raise InvalidLayer(f"whiteout {entry.name!r}: {hidden!r} is also in this layer") from None
        os.chown(hidden, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)

    def _remove_unwritten(self, parent: int, directory: str) -> None:
        """Naive opaque whiteout: remove what is in ``directory`` that this layer did not write."""
        assert self._written is not None
        fd = os.open(".", DIR_OPEN, dir_fd=parent)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        for name in names:
            if posixpath.join(directory, name) not in self._written:
                self.root.remove_all(parent, name)

    def _set_xattrs(self, entry: Entry, setxattr, regular: bool) -> None:
        for name, value in entry.xattrs().items():
            if name.startswith("trusted."):
                continue  # containerd refuses admin attributes from an archive (and skips them)
            raw = value.encode("utf-8", "surrogateescape")
            if len(raw) > self.limits.max_xattr:
                raise InvalidLayer(f"xattr {name!r} of {entry.name!r} is over {self.limits.max_xattr} bytes")
            try:
                setxattr(name, raw)
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    continue
                if e.errno == errno.EPERM and name.startswith("user.") and not regular:
                    continue
                raise

    def _error(self, e: OSError) -> Exception:
        name = self._entry.name if self._entry else "?"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFull(f"no space left on device while applying {name!r}")
        if e.errno in (errno.EROFS, errno.EACCES, errno.EMFILE, errno.ENFILE, errno.EIO):
            return StoreError(f"applying {name!r}: {e.strerror}")
        return InvalidLayer(f"cannot apply {name!r}: {e.strerror}")


def _times(entry: Entry) -> tuple[int, int]:
    mtime = bound_time(entry.mtime_ns)
    return bound_time(max(entry.atime_ns, entry.mtime_ns)), mtime
