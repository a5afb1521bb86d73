"""Faults on real parts: a server that ignores Range, a killed and resumed pull, a corrupted blob."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import MIB, Registry, assert_store_holds, pushed, run_puller, staged_files, start_puller
from .rig import FaultProxy, Nginx, flip_middle_byte, sha256_file, skopeo_push, tmpfs


def test_server_ignoring_range_falls_back_to_one_stream(workdir: Path, layout, tmp_path: Path):
    root = workdir / "norange"
    cdn = Nginx(root / "nginx", root / "registry" / "storage", ranges=False)
    with cdn, Registry(root / "registry", redirect_base=cdn.url + "/") as reg:
        skopeo_push(layout["path"], "app", f"{reg.host}/test/app:v1")
        p = pushed(reg, "test/app", "v1")
        r = run_puller("pull", p.ref, "--store", str(tmp_path), "--chunk-size", "1MiB")
        assert r.returncode == 0, r.stderr
        assert_store_holds(tmp_path, p)
        # Each blob was answered 200 (whole) once: no blob downloaded twice.
        lines = [line for line in cdn.requests() if "/blobs/" in line]
        assert lines and all(line.startswith("200 ") for line in lines)
        assert cdn.bytes_sent() == sum(p.blobs.values())


def test_killed_pull_resumes_only_missing_ranges(slow_rig, tmp_path: Path):
    reg, cdn = slow_rig
    p = pushed(reg, "test/big", "v1")
    store = tmp_path / "store"
    layer = p.manifest["layers"][0]
    ranges_file = store / ".puller" / "staging" / f"sha256-{layer['digest'].split(':')[1]}.ranges"
    # 4 connections of 1 MB/s, 1 MiB chunks: about 6 s for the whole layer; kill it half-way.
    args = [
        "pull",
        p.ref,
        "--store",
        str(store),
        "--concurrency",
        "4",
        "--chunk-size",
        "1MiB",
    ]
    proc = start_puller(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_before_kill = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            done_before_kill = sum(e - s for s, e in json.loads(ranges_file.read_text())["done"])
        if done_before_kill >= layer["size"] // 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < done_before_kill < layer["size"]
    assert not (store / "blobs" / "sha256" / layer["digest"].split(":")[1]).exists()  # nothing unverified visible
    recorded = sum(e - s for s, e in json.loads(ranges_file.read_text())["done"])
    # nginx logs the killed connections when it notices them: wait until its log is quiet before counting.
    quiet_since, lines = time.monotonic(), len(cdn.requests())
    while time.monotonic() - quiet_since < 2.0:
        time.sleep(0.2)
        if len(cdn.requests()) != lines:
            quiet_since, lines = time.monotonic(), len(cdn.requests())
    sent_before = cdn.bytes_sent()
    r = run_puller("pull", p.ref, "--store", str(store), "--json", "--chunk-size", "1MiB")
    assert r.returncode == 0, r.stderr
    assert_store_holds(store, p)
    second = cdn.bytes_sent() - sent_before
    # The second run fetched only what the first had not recorded (plus the small config blob at most).
    assert second <= layer["size"] - recorded + p.manifest["config"]["size"], (second, recorded)
    blob_events = [json.loads(line) for line in r.stdout.splitlines() if '"event":"blob"' in line]
    assert any(e["resumed"] == recorded for e in blob_events)
    assert staged_files(store) == []


def test_corrupted_blob_is_never_visible(workdir: Path, layout, tmp_path: Path):
    with Registry(tmp_path / "registry") as reg:
        skopeo_push(layout["path"], "small", f"{reg.host}/test/small:v1")
        p = pushed(reg, "test/small", "v1")
        layer = p.manifest["layers"][0]["digest"]
        flip_middle_byte(reg.blob_path(layer))
        store = tmp_path / "store"
        r = run_puller("pull", p.ref, "--store", str(store))
        assert r.returncode == 8, r.stderr
        assert "digest mismatch" in r.stderr and layer in r.stderr
        assert not (store / "blobs" / "sha256" / layer.split(":")[1]).exists()
        index = json.loads((store / "index.json").read_text())
        assert index["manifests"] == []  # the image is not named
        assert [f for f in staged_files(store) if f.suffix == ".partial"] == []
        flip_middle_byte(reg.blob_path(layer))  # repaired: the same store then completes
        r = run_puller("pull", p.ref, "--store", str(store))
        assert r.returncode == 0, r.stderr
        assert_store_holds(store, p)


def test_truncated_blob_in_registry(workdir: Path, layout, tmp_path: Path):
    """A registry whose stored blob is shorter than the manifest says: a size error, nothing visible."""
    with Registry(tmp_path / "registry") as reg:
        skopeo_push(layout["path"], "small", f"{reg.host}/test/small:v1")
        p = pushed(reg, "test/small", "v1")
        layer = p.manifest["layers"][0]["digest"]
        data = reg.blob_path(layer)
        data.write_bytes(data.read_bytes()[: MIB // 8])
        store = tmp_path / "store"
        r = run_puller("pull", p.ref, "--store", str(store))
        assert r.returncode != 0
        assert not (store / "blobs" / "sha256" / layer.split(":")[1]).exists()


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs: too small for the 11 MB test image."""
    with tmpfs(tmp_path / "small-disk", "4m") as mnt:
        yield mnt


def test_full_disk_is_a_clear_error_and_a_later_pull_succeeds(cdn_rig, small_disk: Path):
    reg, _ = cdn_rig
    p = pushed(reg, "test/app", "v1")
    store = small_disk / "store"
    r = run_puller("pull", p.ref, "--store", str(store))
    assert r.returncode == 10, r.stderr
    assert r.stderr.startswith("puller: error: no space left on device")
    assert len(r.stderr.strip().splitlines()) == 1
    # Whatever is visible is complete and verified; the image is not named.
    blobs = store / "blobs" / "sha256"
    for blob in blobs.iterdir() if blobs.exists() else []:
        assert sha256_file(blob) == blob.name
    assert json.loads((store / "index.json").read_text())["manifests"] == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    r = run_puller("pull", p.ref, "--store", str(store))
    assert r.returncode == 0, r.stderr
    assert_store_holds(store, p)
    assert staged_files(store) == []


def test_progress_on_a_tty(cdn_rig, tmp_path: Path):
    """On a terminal puller draws per-layer bars (rich); `script` gives it a pseudo-terminal."""
    reg, _ = cdn_rig
    p = pushed(reg, "test/app", "v1")
    cmd = f"{sys.executable} -m puller pull {p.ref} --store {tmp_path}"
    r = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "160", "TERM": "xterm"},
    )
    assert r.returncode == 0, r.stdout
    out = r.stdout
    for layer in p.manifest["layers"]:
        assert layer["digest"][7:19] in out  # one bar per layer, named by digest
    assert "MB" in out and f"pulled {p.ref} digest={p.digest}" in out


def test_two_processes_pull_the_same_image_into_one_store(slow_rig, tmp_path: Path):
    """Both succeed; each blob is fetched once (the second process waits on the blob's lock, then finds it)."""
    reg, cdn = slow_rig
    p = pushed(reg, "test/big", "v1")
    store = tmp_path / "store"
    sent_before = cdn.bytes_sent()
    args = ["pull", p.ref, "--store", str(store)]
    procs = [start_puller(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    assert_store_holds(store, p)
    assert cdn.bytes_sent() - sent_before == sum(p.blobs.values())
    assert staged_files(store) == []


def test_files_have_safe_permissions(cdn_rig, tmp_path: Path):
    """Committed blobs and index.json are world-readable, not writable; staging is private to its owner."""
    reg, _ = cdn_rig
    p = pushed(reg, "test/small", "v1")
    store = tmp_path / "store"
    assert run_puller("pull", p.ref, "--store", str(store)).returncode == 0
    for digest in p.blobs:
        assert (store / "blobs" / "sha256" / digest[7:]).stat().st_mode & 0o777 == 0o644
    assert (store / "index.json").stat().st_mode & 0o777 == 0o644
    assert (store / ".puller" / "staging").stat().st_mode & 0o077 == 0


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_pull_stops_cleanly_and_resumes(slow_rig, tmp_path: Path, sig, code):
    reg, _ = slow_rig
    p = pushed(reg, "test/big", "v1")
    store = tmp_path / "store"
    layer = p.manifest["layers"][0]
    ranges_file = store / ".puller" / "staging" / f"sha256-{layer['digest'][7:]}.ranges"
    args = ["pull", p.ref, "--store", str(store), "--concurrency", "4"]
    # As from a terminal: a test run started in the background inherits SIGINT ignored, and Python (rightly)
    # keeps ignoring it then.
    proc = start_puller(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not ranges_file.exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert "progress is kept" in err
    assert sorted(f.suffix for f in staged_files(store)) == [".partial", ".ranges"]  # no lock left behind
    recorded = sum(e - s for s, e in json.loads(ranges_file.read_text())["done"])
    r = run_puller("pull", p.ref, "--store", str(store), "--json")
    assert r.returncode == 0, r.stderr
    assert_store_holds(store, p)
    events = [json.loads(line) for line in r.stdout.splitlines() if '"event":"blob"' in line]
    assert any(e["digest"] == layer["digest"] and e["resumed"] == recorded > 0 for e in events)


def test_manifest_requests_are_retried_and_bounded(direct_registry, tmp_path: Path):
    """A registry that answers the manifest with 503 a few times is retried like a blob range; one that keeps
    failing fails the pull after `attempts` tries, with the status in the message."""
    app = pushed(direct_registry, "test/app", "v1")
    with FaultProxy(f"http://{direct_registry.host}") as proxy:
        proxy.target = "/manifests/"
        ref = app.ref.replace(direct_registry.host, proxy.url.split("://")[1])
        proxy.set("status:503", times=2)
        r = run_puller("pull", ref, "--store", str(tmp_path / "store"), "--json")
        assert r.returncode == 0, r.stderr
        assert [m for m in proxy.requests if m.startswith("status:503")] == ["status:503 None"] * 2
        assert json.loads(r.stdout.splitlines()[-1])["digest"] == app.digest

        proxy.set("status:503", times=-1)
        config = tmp_path / "puller.yaml"
        config.write_text("attempts: 3\n")
        r = run_puller("pull", ref, "--store", str(tmp_path / "store2"), "--config", str(config))
        assert r.returncode == 3 and "HTTP 503" in r.stderr, r.stderr
        assert sum(m.startswith("status:503") for m in proxy.requests) == 2 + 3
