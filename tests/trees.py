"""Layer trees for the applier's tests: a walker that records what containerd's applier and puller's must agree on,
and a tar writer for crafted layers (any header, PAX record or entry order a hostile or unusual layer may hold)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Node:
    kind: str  # "file", "dir", "link", "char", "block", "fifo"
    mode: int  # permission bits with setuid, setgid and sticky
    uid: int
    gid: int
    size: int
    content: str  # sha256 of a file, target of a link, "major:minor" of a device
    xattrs: tuple[tuple[str, bytes], ...]
    mtime_ns: int | None  # None where the time is the moment of applying (not compared)


@dataclass
class Tree:
    nodes: dict[str, Node] = field(default_factory=dict)
    hardlinks: set[tuple[str, ...]] = field(default_factory=set)  # groups of paths sharing one inode


KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "link",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
}


def walk(root: Path, timed_dirs: set[str] | frozenset[str] = frozenset()) -> Tree:
    """Everything under ``root`` (not the root itself), never following a link. Times are kept for every entry but
    whiteouts (0/0 char devices, made at the moment of applying) and directories other than ``timed_dirs`` (the
    ones the layer names: the others are made on the way, at the moment of applying)."""
    tree = Tree()
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            kind = KINDS[stat.S_IFMT(st.st_mode)]
            if kind == "file":
                content = hashlib.sha256(path.read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            elif kind == "link":
                content = os.readlink(path)
            elif kind in ("char", "block"):
                content = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                content = ""
            xattrs = tuple(sorted((k, os.getxattr(path, k, follow_symlinks=False)) for k in _listxattr(path)))
            whiteout = kind == "char" and content == "0:0"
            compared = rel in timed_dirs if kind == "dir" else not whiteout
            tree.nodes[rel] = Node(
                kind,
                stat.S_IMODE(st.st_mode) if kind != "link" else 0,
                st.st_uid,
                st.st_gid,
                st.st_size if kind == "file" else 0,
                content,
                xattrs,
                st.st_mtime_ns if compared else None,
            )
    tree.hardlinks = {tuple(sorted(paths)) for paths in inodes.values() if len(paths) > 1}
    return tree


def _listxattr(path: Path) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []


def diff(a: Tree, b: Tree) -> list[str]:
    """What differs between two trees, one line each (empty when they are the same)."""
    out = []
    for rel in sorted(set(a.nodes) | set(b.nodes)):
        x, y = a.nodes.get(rel), b.nodes.get(rel)
        if x != y:
            out.append(f"{rel}: {x} != {y}")
    if a.hardlinks != b.hardlinks:
        out.append(f"hard link groups: {sorted(a.hardlinks)} != {sorted(b.hardlinks)}")
    return out


def dir_entries(tar: bytes) -> set[str]:
    """The directories a tar names itself (their times are set from the layer), as paths in the root."""
    from puller.unpack.apply import in_root

    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as t:
        return {in_root(m.name) for m in t.getmembers() if m.isdir()} - {""}


class TarBuilder:
    """A tar stream built entry by entry with Python's tarfile (PAX format unless asked), plus raw blocks."""

    def __init__(self, format: int = tarfile.PAX_FORMAT):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=format)  # noqa: SIM115 (closed by bytes())

    def add(
        self,
        name: str,
        kind: bytes = tarfile.REGTYPE,
        data: bytes = b"",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: float = 1_600_000_000,
        linkname: str = "",
        pax: dict[str, str] | None = None,
        devmajor: int = 0,
        devminor: int = 0,
    ) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = mtime
        info.linkname = linkname
        info.devmajor, info.devminor = devmajor, devminor
        info.pax_headers = dict(pax or {})
        info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        self.tar.addfile(info, io.BytesIO(data) if info.size else None)
        return self

    def file(self, name: str, data: bytes = b"x", mode: int = 0o644, **kw) -> TarBuilder:
        return self.add(name, tarfile.REGTYPE, data, mode, **kw)

    def dir(self, name: str, mode: int = 0o755, **kw) -> TarBuilder:
        return self.add(name, tarfile.DIRTYPE, mode=mode, **kw)

    def symlink(self, name: str, target: str, **kw) -> TarBuilder:
        return self.add(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **kw)

    def hardlink(self, name: str, target: str, **kw) -> TarBuilder:
        return self.add(name, tarfile.LNKTYPE, linkname=target, **kw)

    def raw(self, block: bytes) -> TarBuilder:
        """Bytes as they are (a crafted header): written after what tarfile wrote so far."""
        self.tar.fileobj.write(block)  # type: ignore[union-attr]
        self.tar.offset += len(block)
        return self

    def bytes(self, end: bool = True) -> bytes:
        if end:
            self.tar.close()
        return self.buf.getvalue()
