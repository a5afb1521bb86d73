"""The containerd store as nodes live with it: a lease per pull (nothing held while idle, nothing lost when a
lease expires), pins that follow the image list (never touching pins others set), and a disk that fills up."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from .conftest import pushed, run_puller, start_puller
from .daemon_rig import Daemon
from .rig import CONTAINERD_BINS, Containerd, tmpfs


def ctr_ns(c: Containerd, ns: str, *args: str) -> str:
    r = subprocess.run(c.ctr("-n", ns, *args), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def run_gc(c: Containerd, ns: str) -> None:
    """Deleting a lease with --sync runs containerd's garbage collector before it returns."""
    lease = ctr_ns(c, ns, "leases", "create").split()[-1]
    ctr_ns(c, ns, "leases", "delete", "--sync", lease)


def puller_leases(c: Containerd, ns: str) -> list[str]:
    return [line for line in ctr_ns(c, ns, "leases", "ls").splitlines()[1:] if line.startswith("puller-")]


def image_labels(c: Containerd, ns: str) -> dict[str, str]:
    out = {}
    for line in ctr_ns(c, ns, "images", "ls").splitlines()[1:]:
        cols = line.split()
        out[cols[0]] = cols[-1]
    return out


def _settings(c: Containerd, ns: str, tmp_path: Path, **more) -> dict:
    return {
        "store": "containerd",
        "containerd_address": str(c.socket),
        "namespace": ns,
        "staging_dir": str(tmp_path / "staging"),
        **more,
    }


def test_an_idle_daemon_holds_no_lease_and_rm_sync_frees_everything(containerd, cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    p = pushed(reg, "test/app", "v1")
    ns = f"idle-{containerd.version}"
    with Daemon(tmp_path / "d", _settings(containerd, ns, tmp_path)) as d:
        status, body = d.post("/v1/pull", {"images": [p.ref], "wait": True, "timeout": 120})
        assert status == 200, body
        assert puller_leases(containerd, ns) == []  # idle: the pull's lease is gone
        content = ctr_ns(containerd, ns, "content", "ls")
        assert all(digest in content for digest in p.blobs)
        ctr_ns(containerd, ns, "images", "rm", "--sync", p.ref, f"{p.ref.rsplit(':', 1)[0]}@{p.digest}")
        content = ctr_ns(containerd, ns, "content", "ls")
        assert not any(digest in content for digest in [*p.blobs, p.digest]), content  # all of it freed
        assert ctr_ns(containerd, ns, "snapshots", "ls").splitlines()[1:] == []
        assert d.stop() == 0


def test_a_pull_after_an_earlier_lease_expired_works(containerd, cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    first, second = pushed(reg, "test/small", "v1"), pushed(reg, "test/app", "v1")
    ns = f"expiry-{containerd.version}"
    with Daemon(tmp_path / "d", _settings(containerd, ns, tmp_path, lease_expiry=2.0)) as d:
        assert d.post("/v1/pull", {"images": [first.ref], "wait": True, "timeout": 120})[0] == 200
        time.sleep(3)  # any lease made so far has expired
        run_gc(containerd, ns)
        status, body = d.post("/v1/pull", {"images": [second.ref], "wait": True, "timeout": 120})
        assert status == 200, body
        check = ctr_ns(containerd, ns, "images", "check")
        for ref in (first.ref, second.ref):
            assert "complete" in next(line for line in check.splitlines() if line.startswith(ref + " "))
        assert puller_leases(containerd, ns) == []
        assert d.stop() == 0


def test_pins_follow_the_list_and_others_pins_are_left_alone(containerd, cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    listed, unpinned, theirs = (pushed(reg, r, "v1") for r in ("test/small", "test/app", "test/multi"))
    asked = pushed(reg, "test/docker", "v1")
    ns = f"pins-{containerd.version}"
    pinned = "io.cri-containerd.pinned=pinned"
    with Daemon(tmp_path / "d", _settings(containerd, ns, tmp_path, pin=True)) as d:
        d.images.set_images([theirs.ref])
        d.wait_state(theirs.ref, "present", timeout=120)
        # an operator pins it by hand: from now on that pin is theirs, not puller's
        ctr_ns(containerd, ns, "images", "label", theirs.ref, "puller.io/pinned=", pinned)
        d.images.set_images([listed.ref, {"reference": unpinned.ref, "pin": False}, theirs.ref])
        d.wait_state(listed.ref, "present", timeout=120)
        d.wait_state(unpinned.ref, "present", timeout=120)
        labels = image_labels(containerd, ns)
        assert pinned in labels[listed.ref] and "puller.io/pinned=true" in labels[listed.ref]
        assert pinned not in labels[unpinned.ref]  # the entry's pin: false wins over the global pin: true
        # The global pin is for listed images: one the API alone asks for is not pinned.
        assert d.post("/v1/pull", {"images": [asked.ref], "wait": True, "timeout": 120})[0] == 200
        assert pinned not in image_labels(containerd, ns)[asked.ref]
        d.images.set_images([unpinned.ref])  # listed and theirs leave the list
        d.wait_for(lambda: pinned not in image_labels(containerd, ns)[listed.ref], 30, "listed unpinned")
        time.sleep(1)
        assert pinned in image_labels(containerd, ns)[theirs.ref]  # a pin puller did not set stays
        assert d.stop() == 0


@pytest.fixture(params=sorted(CONTAINERD_BINS))
def small_containerd(request, tmp_path: Path):
    """A containerd of each version whose root is a 40 MiB tmpfs (no CRI)."""
    with tmpfs(tmp_path / "small", "40m") as root, Containerd(root, version=request.param) as c:
        yield c


def test_a_pull_that_cannot_fit_is_refused_before_its_first_byte(small_containerd, slow_rig, tmp_path: Path):
    reg, cdn = slow_rig
    p = pushed(reg, "test/big", "v1")  # 24 MiB of random (incompressible) layer: 96 MiB with the unpack estimate
    c = small_containerd
    cfg = tmp_path / "puller.yaml"
    cfg.write_text(f"staging_dir: {tmp_path / 'staging'}\ncontainerd_root: {c.workdir}\n")
    args = ["pull", p.ref, "--store", "containerd", "--containerd-address", str(c.socket), "--config", str(cfg)]
    r = run_puller(*args)
    assert r.returncode == 10, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "MB free" in line and "to download" in line, line
    assert not [x for x in cdn.requests() if "/blobs/" in x]  # refused before any byte


def test_enospc_inside_containerd_is_exit_10_and_no_image_record(small_containerd, slow_rig, tmp_path: Path):
    """A neighbour fills containerd's disk mid-pull: one line, exit 10, no image record."""
    reg, _ = slow_rig
    p = pushed(reg, "test/big", "v1")  # 24 MiB: fits the 40 MiB when the pull starts (no unpack)
    c = small_containerd
    cfg = tmp_path / "puller.yaml"
    cfg.write_text(f"staging_dir: {tmp_path / 'staging'}\ncontainerd_root: {c.workdir}\n")
    args = ["pull", p.ref, "--store", "containerd", "--containerd-address", str(c.socket), "--config", str(cfg)]
    # 2 connections of 1 MB/s: about 12 s for the layer; the neighbour fills the disk 1.5 s in
    proc = start_puller(
        *args, "--no-unpack", "--concurrency", "2", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.5)
    subprocess.run(["dd", "if=/dev/zero", f"of={c.workdir}/filler", "bs=1M", "count=40"], capture_output=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 10, err
    errors = [line for line in err.splitlines() if "error" in line]  # the others: plain progress lines
    assert len(errors) == 1 and "disk space" in errors[0] and "Traceback" not in err, err
    assert ctr_ns(c, "k8s.io", "images", "ls", "-q").split() == []
