"""The layer applier (puller/unpack) against containerd's own: the same layers, applied by containerd's Diff service
(pulled by puller into containerd 2.3 and 2.4, whose overlayfs snapshotter unpacks them in parallel: the bottom
layer on a bind mount, the others as overlayfs upper directories) and by puller's applier, give identical trees.
Then hostile layers: nothing outside the root, one clear error."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from puller.digest import Digest
from puller.errors import DigestMismatch, InvalidLayer, SizeMismatch
from puller.registry.manifest import Descriptor
from puller.stores.containerd.unpack import chain_ids
from puller.unpack import LayerStream, Limits
from puller.unpack.decompress import Decompressor

from .conftest import run_puller
from .rig import OCI_LAYER, Containerd, LayoutWriter, Registry, _zstd, skopeo_push
from .trees import TarBuilder, diff, dir_entries, walk

UPPERDIR = "containerd.io/snapshot/overlay.upperdir"
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service, as setcap writes it


def rules_layer() -> bytes:
    """One entry or more for each of containerd's apply rules."""
    t = TarBuilder()
    t.dir("etc", 0o755, mtime=1_500_000_000).file("etc/passwd", b"root:x:0:0\n")
    t.file("bin/su", b"su", 0o4755)  # setuid; "bin" is a missing parent, made 0755
    t.dir("tmp", 0o1777).file("data/g", b"g", 0o2755, uid=1000, gid=1000)
    t.file("m/f", b"f").dir("m", 0o700)  # the directory's mode arrives after a file in it
    t.file("h/a", b"shared", 0o640, uid=7).hardlink("h/b", "h/a", mode=0o640, uid=7)
    t.hardlink("h/c", "h/b", mode=0o640, uid=7)
    t.symlink("s/abs", "/etc/passwd").symlink("s/rel", "../etc").symlink("s/dangling", "nowhere")
    t.symlink("s/out", "../../../../outside")
    t.add("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
    t.add("dev/loop0", tarfile.BLKTYPE, mode=0o660, devmajor=7, devminor=0, gid=6)
    t.add("dev/fifo", tarfile.FIFOTYPE, mode=0o600)
    t.file("long/" + "n" * 150, b"long name (PAX path)").symlink("long/link", "t" * 200)
    xattrs = {
        "SCHILY.xattr.security.capability": CAPABILITY.decode("latin-1"),
        "SCHILY.xattr.user.note": "hi",
        "SCHILY.xattr.trusted.evil": "1",  # refused by containerd: skipped
    }
    t.file("x/cap", b"\x7fELF", 0o755, pax=xattrs)
    t.file("t/ns", b"ns", pax={"mtime": "1600000000.123456789", "atime": "1700000000.5"})
    t.file("t/old", b"before 1970", mtime=-5).file("./dot/file").file("/abs/file").file("../up/file")
    t.dir("r").file("r/child").file("r", b"a file replaces the directory")
    t.file("q", b"a directory replaces the file").dir("q").file("q/inner")
    t.dir("d", 0o700, uid=5).dir("d", 0o755, uid=6)  # directories merge: the second header wins
    t.dir("real").symlink("lnk", "real").file("lnk/through", b"written into real/")
    t.symlink("ld", "real").file("ld", b"a file replaces the link, not what it points to")
    return t.bytes()


def whiteout_layer() -> bytes:
    """An upper layer: whiteouts of lower files, an opaque directory, a whiteout in a directory it creates."""
    t = TarBuilder()
    t.file("etc/.wh.passwd", b"").file("etc/shadow", b"s", 0o600)
    t.file("data/.wh..wh..opq", b"").file("data/new", b"n")
    t.file("newdir/.wh.ghost", b"", uid=3, gid=4)
    t.file(".wh.tmp", b"").file("h/a", b"changed", 0o600)
    return t.bytes()


def gnu_layer() -> bytes:
    """GNU format: long names and link targets as 'L' and 'K' entries; plain directories without a trailing slash."""
    t = TarBuilder(tarfile.GNU_FORMAT)
    t.file("gnu/" + "g" * 120, b"gnu long name").symlink("gnu/l", "k" * 150).hardlink("gnu/hl", "gnu/" + "g" * 120)
    return t.bytes()


def global_header_layer() -> bytes:
    """A PAX global header first (its records apply to no entry, as in Go), then entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tar:
        info = tarfile.TarInfo("after-global")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"z"))
    return buf.getvalue()


def real_tree_layer(*paths: str) -> bytes:
    """A layer tarred by GNU tar from real trees of this machine (its own format: long names, hard links)."""
    return subprocess.run(
        ["tar", "--format=posix", "--xattrs", "-C", "/", "-cf", "-", *paths],
        check=True,
        capture_output=True,
        timeout=120,
    ).stdout


CORPUS = [
    (rules_layer(), "gzip"),
    (whiteout_layer(), "gzip"),
    (gnu_layer(), "zstd"),
    (global_header_layer(), ""),
    (real_tree_layer("etc", "usr/share/zoneinfo", "usr/lib/python3"), "gzip"),
]


def apply_with_puller(tar: bytes, compression: str, into: Path, overlay: bool, limits: Limits | None = None) -> None:
    blob = {"gzip": lambda b: gzip.compress(b, mtime=0), "zstd": _zstd, "": bytes}[compression](tar)
    media_type = OCI_LAYER + (f"+{compression}" if compression else "")
    desc = Descriptor(media_type, Digest.of(blob), len(blob))
    into.mkdir(parents=True, exist_ok=True)
    fd = os.open(into, os.O_RDONLY | os.O_DIRECTORY)
    stream = LayerStream(desc, f"sha256:{hashlib.sha256(tar).hexdigest()}", fd, overlay, limits or Limits())
    try:
        view = memoryview(blob)
        for i in range(0, len(blob), 65537):  # pieces that cut headers and data anywhere
            stream.feed(view[i : i + 65537])
        stream.finish()
    finally:
        stream.close()
        os.close(fd)


@pytest.fixture(scope="module", params=["2.3", "2.4"])
def oracle_containerd(request, tmp_path_factory):
    """containerd of each tested 2.x release whose overlayfs snapshotter names its upper directories (labels)."""
    extra = "[plugins.'io.containerd.snapshotter.v1.overlayfs']\n  upperdir_label = true\n"
    with Containerd(tmp_path_factory.mktemp(f"oracle-{request.param}"), version=request.param, extra_config=extra) as c:
        yield c


def snapshot_dir(c: Containerd, ns: str, chain: str) -> Path:
    info = subprocess.run(
        c.ctr("-n", ns, "snapshots", "--snapshotter", "overlayfs", "info", chain),
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(json.loads(info.stdout)["Labels"][UPPERDIR])


def test_without_the_capabilities_or_a_writable_root_auto_takes_the_diff_service_and_says_why(
    oracle_containerd: Containerd, layout, tmp_path: Path
):
    """As the DaemonSet's pod runs it (every capability dropped, containerd's root mounted read-only), ``auto``
    leaves applying to containerd's Diff service, says why once, and the image is unpacked; the same pull with
    them takes the stream path."""
    cfg = tmp_path / "puller.yaml"
    root = oracle_containerd.workdir / "root"
    cfg.write_text(f"staging_dir: {tmp_path / 'staging'}\ncontainerd_root: {root}\n")
    no_caps = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    read_only = ["unshare", "--mount", "--propagation=private", "sh", "-c",
                 f'mount --bind {root} {root} && mount -o remount,bind,ro {root} && exec "$@"', "sh"]  # fmt: skip
    with Registry(tmp_path / "registry") as reg:
        ref = f"{reg.host}/test/run:v1"
        skopeo_push(layout["path"], "run", ref)
        for ns, prefix, why in (
            ("caps", no_caps, "puller lacks CAP_CHOWN, CAP_DAC_OVERRIDE"),
            ("ro", read_only, f"containerd's root {root} is not writable here"),
            ("full", [], "overlayfs snapshots that rebase"),
        ):
            args = ("-v", "pull", ref, "--store", "containerd", "--containerd-address", str(oracle_containerd.socket))
            r = run_puller(*args, "--json", "--namespace", ns, "--config", str(cfg), prefix=prefix)
            assert r.returncode == 0, r.stderr
            path = "stream" if ns == "full" else "diff"
            assert f"layers applied by {path}: " in r.stderr and why in r.stderr, r.stderr
            assert "WARNING" not in r.stderr, r.stderr  # decided once, not layer by layer
            assert json.loads(r.stdout.strip().splitlines()[-1])["unpack"]["path"] == path
            snapshots = subprocess.run(
                oracle_containerd.ctr("-n", ns, "snapshots", "ls"), capture_output=True, text=True, check=True
            )
            assert "Committed" in snapshots.stdout, snapshots.stdout


def test_every_layer_applies_as_containerds_diff_service_applies_it(oracle_containerd: Containerd, tmp_path: Path):
    """The corpus pulled twice by puller: applied by containerd's Diff service (``--unpack-path diff``) and by
    puller's applier while it downloads (``stream``); and each layer applied by puller's applier alone. Every
    layer's snapshot directory is the same tree three times."""
    lw = LayoutWriter(tmp_path / "layout")
    lw.add_tar_layers_image("corpus", CORPUS)
    cfg = tmp_path / "puller.yaml"
    cfg.write_text(f"staging_dir: {tmp_path / 'staging'}\n")
    with Registry(tmp_path / "registry") as reg:
        ref = f"{reg.host}/test/corpus:v1"
        skopeo_push(tmp_path / "layout", "corpus", ref, preserve_digests=True)
        for path in ("diff", "stream"):
            r = run_puller(
                *("-v", "pull", ref, "--store", "containerd", "--containerd-address", str(oracle_containerd.socket)),
                *("--namespace", path, "--unpack-path", path, "--config", str(cfg)),
            )
            assert r.returncode == 0, r.stderr
            assert f"layers applied by {path}" in r.stderr, r.stderr
            assert "in parallel" in r.stderr, r.stderr  # upper layers applied as overlayfs upper directories
    chains = chain_ids([f"sha256:{hashlib.sha256(tar).hexdigest()}" for tar, _ in CORPUS])
    for i, ((tar, compression), chain) in enumerate(zip(CORPUS, chains, strict=True)):
        timed = dir_entries(tar)
        expected = walk(snapshot_dir(oracle_containerd, "diff", chain), timed)
        assert expected.nodes, f"layer {i}: containerd applied nothing"
        streamed = walk(snapshot_dir(oracle_containerd, "stream", chain), timed)
        alone = tmp_path / f"alone-{i}"
        apply_with_puller(tar, compression, alone, overlay=i > 0)
        for name, got in (("streamed into containerd", streamed), ("applied alone", walk(alone, timed))):
            differences = diff(expected, got)
            assert not differences, f"layer {i} ({compression or 'tar'}) {name}:\n" + "\n".join(differences)


def test_the_oracle_corpus_exercises_every_rule(tmp_path: Path):
    """What the oracle compares holds each case it is meant to: a whiteout device, the opaque attribute, a
    capability, setuid, devices, hard link groups, times with nanoseconds."""
    apply_with_puller(*CORPUS[0], tmp_path / "l0", overlay=False)
    apply_with_puller(*CORPUS[1], tmp_path / "l1", overlay=True)
    low, up = walk(tmp_path / "l0"), walk(tmp_path / "l1")
    assert low.nodes["bin/su"].mode == 0o4755 and low.nodes["tmp"].mode == 0o1777
    assert low.nodes["m"].mode == 0o700 and low.nodes["d"].uid == 6
    assert ("h/a", "h/b", "h/c") in low.hardlinks and low.nodes["h/a"].uid == 7
    assert dict(low.nodes["x/cap"].xattrs) == {"security.capability": CAPABILITY, "user.note": b"hi"}
    assert low.nodes["t/ns"].mtime_ns == 1_600_000_000_123_456_789 and low.nodes["t/old"].mtime_ns == 0
    assert low.nodes["dev/null"].kind == "char" and low.nodes["dev/null"].content == "1:3"
    assert low.nodes["dev/fifo"].kind == "fifo" and low.nodes["lnk"].kind == "link"
    assert low.nodes["real/through"].kind == "file" and low.nodes["r"].kind == "file" and low.nodes["q"].kind == "dir"
    assert {"dot/file", "abs/file", "up/file"} <= set(low.nodes) and low.nodes["ld"].kind == "file"
    assert up.nodes["etc/passwd"].kind == "char" and up.nodes["etc/passwd"].content == "0:0"
    assert up.nodes["newdir/ghost"].uid == 3 and up.nodes["tmp"].kind == "char"
    assert ("trusted.overlay.opaque", b"y") in up.nodes["data"].xattrs


def test_zstd_uncompressed_and_gzip_give_the_same_tree(tmp_path: Path):
    tar = rules_layer()
    for compression in ("gzip", "zstd", ""):
        apply_with_puller(tar, compression, tmp_path / (compression or "tar"), overlay=False)
    trees = [walk(tmp_path / name) for name in ("gzip", "zstd", "tar")]
    assert diff(trees[0], trees[1]) == [] and diff(trees[0], trees[2]) == []


def test_an_empty_blob_and_an_empty_tar_are_empty_layers(tmp_path: Path):
    for n, (tar, compression) in enumerate(((b"", "gzip"), (b"", ""), (bytes(1024), "zstd"), (bytes(512), ""))):
        apply_with_puller(tar, compression, tmp_path / str(n), overlay=True)
        assert os.listdir(tmp_path / str(n)) == []


def test_concatenated_gzip_members_are_one_stream():
    out = bytearray()
    d = Decompressor("application/vnd.oci.image.layer.v1.tar+gzip", lambda piece: out.extend(piece))
    d.feed(gzip.compress(b"a" * 100_000) + gzip.compress(b"b" * 10))
    d.close()
    assert bytes(out) == b"a" * 100_000 + b"b" * 10


# ---- hostile layers ------------------------------------------------------------------------------------------


def hostile(tmp_path: Path, tar: bytes, limits: Limits | None = None, compression: str = "gzip") -> Exception | None:
    """Apply ``tar`` into tmp_path/root beside a sentinel directory; nothing may appear outside the root."""
    (tmp_path / "outside").mkdir(exist_ok=True)
    (tmp_path / "outside" / "keep").write_text("keep")
    error = None
    try:
        apply_with_puller(tar, compression, tmp_path / "root", overlay=True, limits=limits)
    except Exception as e:
        error = e
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "root"]
    assert [p.name for p in (tmp_path / "outside").iterdir()] == ["keep"]
    assert (tmp_path / "outside" / "keep").read_text() == "keep"
    return error


def test_names_out_of_the_root_stay_in_it(tmp_path: Path):
    t = TarBuilder().file("../../outside/a", b"1").file("/" + str(tmp_path / "outside" / "b"), b"2")
    assert hostile(tmp_path, t.bytes()) is None
    assert (tmp_path / "root" / "outside" / "a").read_bytes() == b"1"
    assert (tmp_path / "root" / str(tmp_path / "outside" / "b").lstrip("/")).read_bytes() == b"2"


def test_a_link_out_of_the_root_is_followed_inside_it(tmp_path: Path):
    outside = str(tmp_path / "outside")
    t = TarBuilder().symlink("evil", outside).file("evil/planted", b"x").symlink("up", "../../..")
    t.file("up/outside/planted2", b"y").symlink("evil2", "../outside").file("evil2/keep", b"overwrite?")
    assert hostile(tmp_path, t.bytes()) is None
    assert (tmp_path / "root" / outside.lstrip("/") / "planted").read_bytes() == b"x"
    assert (tmp_path / "root" / "outside" / "keep").read_bytes() == b"overwrite?"


def test_a_hard_link_to_a_path_outside_is_refused(tmp_path: Path):
    target = tmp_path / "outside" / "keep"
    for name in (str(target), "../../outside/keep", "../" * 12 + "etc/passwd"):
        error = hostile(tmp_path, TarBuilder().hardlink("h", name).bytes())
        assert isinstance(error, InvalidLayer) and "no such file in this layer" in str(error), error
    assert os.stat(target).st_nlink == 1


def test_a_whiteout_that_names_its_parent_is_refused(tmp_path: Path):
    for name in ("a/.wh...", "a/.wh..", "a/.wh."):
        error = hostile(tmp_path, TarBuilder().file(name, b"").bytes())
        assert isinstance(error, InvalidLayer) and "invalid whiteout name" in str(error), error


def test_a_tar_bomb_stops_at_the_entry_limit(tmp_path: Path):
    t = TarBuilder()
    for i in range(3_000):
        t.file(f"e{i}", b"")
    error = hostile(tmp_path, t.bytes(), Limits(max_entries=1_000))
    assert isinstance(error, InvalidLayer) and "more than 1,000 entries" in str(error)
    assert len(os.listdir(tmp_path / "root")) == 1_000


def test_a_million_empty_entries_are_refused_without_a_million_files(tmp_path: Path):
    header = tarfile.TarInfo("bomb").tobuf(tarfile.USTAR_FORMAT)
    blob = gzip.compress(header * 1_000_001 + bytes(1024), 1)
    (tmp_path / "root").mkdir()
    desc = Descriptor(OCI_LAYER + "+gzip", Digest.of(blob), len(blob))
    fd = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    stream = LayerStream(desc, "sha256:" + "0" * 64, fd, True, Limits(max_entries=1_000_000))
    with pytest.raises(InvalidLayer, match="more than 1,000,000 entries"):
        for i in range(0, len(blob), 1 << 20):
            stream.feed(memoryview(blob)[i : i + (1 << 20)])
        stream.finish()
    stream.close()
    os.close(fd)
    assert os.listdir(tmp_path / "root") == ["bomb"]


def test_a_size_far_past_the_data_is_an_unexpected_end(tmp_path: Path):
    info = tarfile.TarInfo("huge")
    info.size = 1 << 40
    tar = info.tobuf(tarfile.PAX_FORMAT) + b"only this" + bytes(503)
    error = hostile(tmp_path, tar)
    assert isinstance(error, InvalidLayer) and "ends in the middle of an entry" in str(error), error


def test_the_unpacked_size_limit_stops_a_decompression_bomb(tmp_path: Path):
    t = TarBuilder().file("zeros", bytes(64 << 20))
    error = hostile(tmp_path, t.bytes(), Limits(max_unpacked=16 << 20))
    assert isinstance(error, InvalidLayer) and "max_unpacked" in str(error), error


def test_a_wrong_diff_id_or_digest_is_a_digest_mismatch(tmp_path: Path):
    tar = TarBuilder().file("f", b"content").bytes()
    blob = gzip.compress(tar)
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    right = Descriptor(OCI_LAYER + "+gzip", Digest.of(blob), len(blob))
    cases = [
        (right, "sha256:" + "0" * 64, DigestMismatch, "diff ID"),
        (
            right._replace(digest=Digest.of(b"other")),
            f"sha256:{hashlib.sha256(tar).hexdigest()}",
            DigestMismatch,
            "got",
        ),
        (right._replace(size=len(blob) + 1), f"sha256:{hashlib.sha256(tar).hexdigest()}", SizeMismatch, "expected"),
    ]
    for desc, diff_id, error, words in cases:
        stream = LayerStream(desc, diff_id, fd, True, Limits())
        stream.feed(blob)
        with pytest.raises(error, match=words):
            stream.finish()
        stream.close()
    os.close(fd)


def test_gnu_sparse_and_unknown_types_are_refused_as_containerd_refuses_them(tmp_path: Path):
    for kind, words in ((tarfile.GNUTYPE_SPARSE, "type 83"), (tarfile.CONTTYPE, "type 55"), (b"V", "type 86")):
        error = hostile(tmp_path, TarBuilder(tarfile.GNU_FORMAT).add("odd", kind).bytes())
        assert isinstance(error, InvalidLayer) and words in str(error), error


def test_a_zero_block_followed_by_a_header_is_refused(tmp_path: Path):
    tar = TarBuilder().file("a").bytes(end=False) + bytes(512) + TarBuilder().file("b").bytes()
    error = hostile(tmp_path, tar)
    assert isinstance(error, InvalidLayer) and "zero block" in str(error), error


def test_broken_compression_is_one_clear_error(tmp_path: Path):
    tar = TarBuilder().file("a", os.urandom(100_000)).bytes()
    blob = bytearray(gzip.compress(tar))
    blob[len(blob) // 2] ^= 0xFF
    desc = Descriptor(OCI_LAYER + "+gzip", Digest.of(bytes(blob)), len(blob))
    (tmp_path / "root").mkdir()
    fd = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    stream = LayerStream(desc, "sha256:" + hashlib.sha256(tar).hexdigest(), fd, True, Limits())
    with pytest.raises((InvalidLayer, DigestMismatch)):
        stream.feed(bytes(blob))
        stream.finish()
    stream.close()
    os.close(fd)


def test_the_stream_path_needs_containerd_2_2_3_and_a_valid_setting():
    from puller.config import Settings
    from puller.errors import ConfigError
    from puller.stores.containerd.unpack import STREAM_SINCE, version_tuple

    assert version_tuple("v2.4.2") == (2, 4, 2) > STREAM_SINCE > version_tuple("v2.2.2")
    assert version_tuple("1.6.20~ds1") == (1, 6, 20) and version_tuple("") == ()
    with pytest.raises(ConfigError, match="unpack_path"):
        Settings(unpack_path="fast").validate()
