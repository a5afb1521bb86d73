"""Layers applied while they download, into containerd 2.3 and 2.4 (``unpack_path: stream``), when things go wrong:
a layer the applier refuses or whose diff ID is wrong, a pull killed mid-apply, a disk that fills mid-apply,
containerd restarted mid-apply. Whatever happens, no snapshot is committed that was not verified, no image is
recorded for a failed pull, and what a failed pull leaves (its active snapshots) goes with its lease."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from puller.stores.containerd.unpack import chain_ids

from .conftest import PULLER, run_puller
from .rig import Containerd, LayoutWriter, Registry, skopeo_push, tmpfs, wait_for
from .test_unpack import UPPERDIR, apply_with_puller, real_tree_layer, snapshot_dir
from .trees import TarBuilder, diff, dir_entries, walk

NS = "stream"


@pytest.fixture(scope="module", params=["2.3", "2.4"])
def ctrd(request, tmp_path_factory):
    extra = "[plugins.'io.containerd.snapshotter.v1.overlayfs']\n  upperdir_label = true\n"
    with Containerd(tmp_path_factory.mktemp(f"stream-{request.param}"), version=request.param, extra_config=extra) as c:
        yield c


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "puller.yaml"
    cfg.write_text(f"staging_dir: {tmp_path / 'staging'}\nunpack_path: stream\n")
    return cfg


def _pull_args(c: Containerd, ref: str, tmp_path: Path, ns: str = NS) -> list[str]:
    return [
        *("pull", ref, "--store", "containerd", "--containerd-address", str(c.socket)),
        *("--namespace", ns, "--config", str(_config(tmp_path))),
    ]


def _ctr(c: Containerd, ns: str, *args: str) -> str:
    return subprocess.run(c.ctr("-n", ns, *args), capture_output=True, text=True, check=True).stdout


def _snapshots(c: Containerd, ns: str) -> list[tuple[str, str]]:
    """(key, kind) of every snapshot of the namespace (an unpack's key is "extract-<unique> <chainID>")."""
    out = []
    for line in _ctr(c, ns, "snapshots", "--snapshotter", "overlayfs", "ls").splitlines()[1:]:
        words = line.split()
        if words:
            key = " ".join(words[:2]) if words[0].startswith("extract-") else words[0]
            out.append((key, words[-1]))
    return out


def _images(c: Containerd, ns: str) -> list[str]:
    return [line.split()[0] for line in _ctr(c, ns, "images", "ls").splitlines()[1:] if line.strip()]


def _push(tmp_path: Path, reg: Registry, layers: list[tuple[bytes, str]], diff_ids: list[str] | None = None) -> str:
    lw = LayoutWriter(tmp_path / "layout")
    lw.add_tar_layers_image("img", layers)
    if diff_ids is not None:  # a config that lies about the layers' diff IDs
        _rewrite_diff_ids(tmp_path / "layout", diff_ids)
    ref = f"{reg.host}/test/img:v1"
    skopeo_push(tmp_path / "layout", "img", ref, preserve_digests=True)
    return ref


def _rewrite_diff_ids(layout: Path, diff_ids: list[str]) -> None:
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    mdesc = index["manifests"][0]
    manifest = json.loads((blobs / mdesc["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    config["rootfs"]["diff_ids"] = diff_ids
    data = json.dumps(config).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    manifest["config"].update(digest=f"sha256:{digest}", size=len(data))
    mdata = json.dumps(manifest).encode()
    mdigest = hashlib.sha256(mdata).hexdigest()
    (blobs / mdigest).write_bytes(mdata)
    mdesc.update(digest=f"sha256:{mdigest}", size=len(mdata))
    (layout / "index.json").write_text(json.dumps(index))


def _leases_gone(c: Containerd, ns: str) -> None:
    """Every lease of the namespace deleted (as their expiry would), then containerd's garbage collection run at
    once (deleting a lease with --sync runs it)."""
    for line in _ctr(c, ns, "leases", "ls").splitlines()[1:]:
        if line.strip():
            _ctr(c, ns, "leases", "rm", line.split()[0])
    _ctr(c, ns, "leases", "create", "--id", "collect")
    _ctr(c, ns, "leases", "rm", "--sync", "collect")


def test_a_layer_the_applier_refuses_leaves_no_snapshot_and_no_image(ctrd: Containerd, tmp_path: Path):
    good = TarBuilder().file("ok", b"fine").bytes()
    bad = TarBuilder().file("a", b"x").hardlink("h", "/etc/passwd").bytes()  # no such file in this layer
    ns = f"refused-{os.getpid()}"
    with Registry(tmp_path / "registry") as reg:
        ref = _push(tmp_path, reg, [(good, "gzip"), (bad, "gzip")])
        r = run_puller(*_pull_args(ctrd, ref, tmp_path, ns))
    assert r.returncode == 8, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("puller: error: "), r.stderr
    assert "no such file in this layer" in r.stderr
    _leases_gone(ctrd, ns)
    assert _images(ctrd, ns) == []
    assert _snapshots(ctrd, ns) == []


def test_a_wrong_diff_id_is_a_digest_mismatch_and_commits_nothing(ctrd: Containerd, tmp_path: Path):
    tar = TarBuilder().file("f", b"content").bytes()
    ns = f"diffid-{os.getpid()}"
    with Registry(tmp_path / "registry") as reg:
        ref = _push(tmp_path, reg, [(tar, "gzip")], diff_ids=["sha256:" + "1" * 64])
        r = run_puller(*_pull_args(ctrd, ref, tmp_path, ns))
    assert r.returncode == 8, r.stderr
    assert "diff ID" in r.stderr and "1" * 64 in r.stderr, r.stderr
    _leases_gone(ctrd, ns)
    assert _images(ctrd, ns) == [] and _snapshots(ctrd, ns) == []


def test_a_pull_killed_mid_apply_is_completed_by_the_next_and_leaves_nothing_after_its_lease(
    ctrd: Containerd, tmp_path: Path
):
    """SIGKILL while a layer is being applied (its active snapshot has files); the next pull completes (the layer
    containerd holds part of goes to the Diff service) and its tree is the right one; once the killed pull's
    lease is gone, no active snapshot is left."""
    base = TarBuilder().file("base", b"b").bytes()
    tar = real_tree_layer("usr/lib/python3")
    ns = f"killed-{os.getpid()}"
    with Registry(tmp_path / "registry") as reg:
        ref = _push(tmp_path, reg, [(base, "gzip"), (tar, "gzip")])
        args = [*_pull_args(ctrd, ref, tmp_path, ns), "--bandwidth-limit", "2MiB"]
        proc = subprocess.Popen([*PULLER, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:

            def applying() -> bool:
                for key, kind in _snapshots(ctrd, ns):
                    if kind == "Active" and key.startswith("extract-"):
                        cmd = ctrd.ctr("-n", ns, "snapshots", "--snapshotter", "overlayfs", "info", key)
                        info = subprocess.run(cmd, capture_output=True, text=True)
                        if info.returncode != 0:
                            continue  # committed or removed meanwhile
                        upper = Path(json.loads(info.stdout)["Labels"].get(UPPERDIR, "/nonexistent"))
                        if upper.is_dir() and sum(1 for _ in upper.rglob("*")) > 20:
                            return True
                return False

            wait_for(applying, 60, "the layer's snapshot filling")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        r = run_puller(*_pull_args(ctrd, ref, tmp_path, ns))
    assert r.returncode == 0, r.stderr
    chain = chain_ids([f"sha256:{hashlib.sha256(t).hexdigest()}" for t in (base, tar)])[1]
    apply_with_puller(tar, "gzip", tmp_path / "alone", overlay=True)
    timed = dir_entries(tar)
    assert diff(walk(snapshot_dir(ctrd, ns, chain), timed), walk(tmp_path / "alone", timed)) == []
    _leases_gone(ctrd, ns)
    assert not [key for key, kind in _snapshots(ctrd, ns) if kind == "Active"]


@pytest.fixture()
def small_containerd(tmp_path: Path):
    """containerd 2.4 whose root is a 48 MiB tmpfs."""
    with tmpfs(tmp_path / "small", "48m") as root, Containerd(root / "ctrd", version="2.4") as c:
        yield c


def test_a_disk_that_fills_mid_apply_is_exit_10_with_no_snapshot_and_no_image(small_containerd, tmp_path: Path):
    """A layer of 96 MiB of zeros (a few hundred KB of gzip) cannot be unpacked on 48 MiB."""
    tar = TarBuilder().file("zeros", bytes(96 << 20)).bytes()
    ns = "full"
    with Registry(tmp_path / "registry") as reg:
        ref = _push(tmp_path, reg, [(tar, "gzip")])
        cfg = _config(tmp_path)
        r = run_puller(
            *("pull", ref, "--store", "containerd", "--containerd-address", str(small_containerd.socket)),
            *("--namespace", ns, "--config", str(cfg)),
            env={"PULLER_CONTAINERD_ROOT": str(small_containerd.workdir / "root")},
        )
    assert r.returncode == 10, r.stderr
    assert "no space left on device" in r.stderr, r.stderr
    _leases_gone(small_containerd, ns)
    assert _images(small_containerd, ns) == [] and _snapshots(small_containerd, ns) == []


def test_containerd_restarted_mid_apply_fails_clearly_or_completes_with_nothing_half_committed(
    ctrd: Containerd, tmp_path: Path
):
    tar = real_tree_layer("usr/lib/python3")
    ns = f"restart-{os.getpid()}"
    with Registry(tmp_path / "registry") as reg:
        ref = _push(tmp_path, reg, [(tar, "gzip")])
        args = [*_pull_args(ctrd, ref, tmp_path, ns), "--bandwidth-limit", "2MiB"]
        proc = subprocess.Popen([*PULLER, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: any(kind == "Active" for _, kind in _snapshots(ctrd, ns)), 60, "an active snapshot")
        time.sleep(1)
        ctrd.__exit__(None, None, None)
        ctrd.__enter__()
        _, stderr = proc.communicate(timeout=300)
    chain = chain_ids([f"sha256:{hashlib.sha256(tar).hexdigest()}"])[0]
    if proc.returncode != 0:
        lines = stderr.strip().splitlines()
        assert lines and lines[-1].startswith("puller: error: ") and "Traceback" not in stderr, stderr
        assert _images(ctrd, ns) == []
    committed = [key for key, kind in _snapshots(ctrd, ns) if kind == "Committed"]
    assert proc.returncode != 0 or committed == [chain], (proc.returncode, committed)
    if committed:  # whether or not the pull got to record the image, what is committed is the verified tree
        apply_with_puller(tar, "gzip", tmp_path / "alone", overlay=False)
        timed = dir_entries(tar)
        assert diff(walk(snapshot_dir(ctrd, ns, chain), timed), walk(tmp_path / "alone", timed)) == []
