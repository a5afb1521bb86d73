"""The fault matrix: a proxy between puller and the real blob CDN (nginx behind the real registry's redirect)
misbehaves in each way a network or CDN does. Transient faults must be recovered from; persistent corruption must
fail clearly. Afterwards the store is checked: every visible blob hashes to its name, and the image is named only
when all of it is there."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from .conftest import pushed, run_puller, staged_files
from .rig import Containerd, FaultProxy, Nginx, Registry, sha256_file, skopeo_push


@pytest.fixture(scope="module")
def proxied(workdir: Path, layout):
    root = workdir / "proxied"
    cdn = Nginx(root / "nginx", root / "registry" / "storage")
    with cdn, FaultProxy(cdn.url) as proxy, Registry(root / "registry", redirect_base=proxy.url + "/") as reg:
        skopeo_push(layout["path"], "app", f"{reg.host}/test/app:v1")
        yield reg, proxy


def check_store(store: Path) -> None:
    """Every visible blob is complete and verified."""
    blobs = store / "blobs" / "sha256"
    for blob in blobs.iterdir() if blobs.exists() else []:
        assert sha256_file(blob) == blob.name, blob


def pull(reg: Registry, store: Path, tmp_path: Path):
    cfg = tmp_path / "puller.yaml"
    cfg.write_text("read_timeout: 2\nattempts: 4\nchunk_size: 1MiB\n")
    return run_puller("pull", f"{reg.host}/test/app:v1", "--store", str(store), "--json", "--config", str(cfg))


@pytest.mark.parametrize(
    "mode",
    [
        "reset",
        "status:500",
        "status:502",
        "status:503",
        "status:429",
        "truncate",
        "short-length",
        "flip",
        "stall",
        "ignore-range",
        "expire",
    ],
)
def test_transient_fault_recovers(proxied, tmp_path: Path, mode: str):
    reg, proxy = proxied
    p = pushed(reg, "test/app", "v1")
    proxy.set(mode, times=2)
    seen = len(proxy.requests)
    store = tmp_path / "store"
    r = pull(reg, store, tmp_path)
    proxy.set("pass", 0)
    assert r.returncode == 0, (mode, r.stderr)
    assert sum(line.startswith(mode + " ") for line in proxy.requests[seen:]) == 2  # the fault was served
    check_store(store)
    for digest, size in p.blobs.items():
        assert (store / "blobs" / "sha256" / digest[7:]).stat().st_size == size
    assert staged_files(store) == []
    retries = sum(json.loads(line).get("retries", 0) for line in r.stdout.splitlines() if '"event":"blob"' in line)
    assert retries >= 1 or mode in ("ignore-range", "flip"), mode  # the fault was met and retried


@pytest.mark.parametrize("mode", ["flip", "other-blob"])
def test_persistent_corruption_fails_clearly(proxied, tmp_path: Path, mode: str):
    reg, proxy = proxied
    p = pushed(reg, "test/app", "v1")
    proxy.set(mode, times=-1, other=b"\0" * (16 << 20))
    store = tmp_path / "store"
    r = pull(reg, store, tmp_path)
    proxy.set("pass", 0)
    assert r.returncode == 8, r.stderr
    assert "digest mismatch" in r.stderr and "expected sha256:" in r.stderr
    check_store(store)
    layers = [d["digest"] for d in p.manifest["layers"] if d["size"] > 0]
    assert not any((store / "blobs" / "sha256" / d[7:]).exists() for d in layers)
    assert json.loads((store / "index.json").read_text())["manifests"] == []


def _store_args(store: str, tmp_path: Path, containerd) -> list[str]:
    if store == "containerd":
        ns = f"faults-{tmp_path.name}"[:60]
        return [
            "--store",
            "containerd",
            "--containerd-address",
            str(containerd.socket),
            "--namespace",
            ns,
            "--staging-dir",
            str(tmp_path / "staging"),
            "--no-unpack",
        ]
    return [
        "--store",
        "overlaybd",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--overlaybd-config",
        str(tmp_path / "none.json"),
    ]


def _layers_in(store: str, tmp_path: Path, containerd, args: list[str]) -> dict[str, bytes]:
    """What the store shows of each layer: digest -> bytes."""
    out = {}
    if store == "containerd":
        ns = args[args.index("--namespace") + 1]
        listing = subprocess.run(containerd.ctr("-n", ns, "content", "ls"), capture_output=True, text=True).stdout
        for line in listing.splitlines()[1:]:
            digest = line.split()[0]
            out[digest] = subprocess.run(containerd.ctr("-n", ns, "content", "get", digest), capture_output=True).stdout
    else:
        cache = tmp_path / "cache"
        out = {f.name: f.read_bytes() for f in cache.iterdir()} if cache.exists() else {}
    return out


@pytest.mark.parametrize("store", ["containerd", "overlaybd"])
@pytest.mark.parametrize("mode", ["reset", "status:503", "truncate", "flip"])
def test_transient_fault_recovers_in_every_store(proxied, containerd, tmp_path: Path, store: str, mode: str):
    reg, proxy = proxied
    p = pushed(reg, "test/app", "v1")
    args = _store_args(store, tmp_path, containerd)
    proxy.set(mode, times=2)
    r = run_puller("pull", p.ref, *args, "--chunk-size", "1MiB")
    proxy.set("pass", 0)
    assert r.returncode == 0, (mode, r.stderr)
    shown = _layers_in(store, tmp_path, containerd, args)
    for layer in p.manifest["layers"]:
        assert "sha256:" + hashlib.sha256(shown[layer["digest"]]).hexdigest() == layer["digest"]


@pytest.mark.parametrize("store", ["containerd", "overlaybd"])
def test_persistent_corruption_is_never_visible_in_any_store(proxied, tmp_path: Path, store: str):
    reg, proxy = proxied
    p = pushed(reg, "test/app", "v1")
    # A containerd of its own: one that already holds the blob (in any namespace) would rightly answer
    # "already exists" and serve its own verified copy, and nothing of the corrupt download would be needed.
    with Containerd(tmp_path / "ctrd") as containerd:
        args = _store_args(store, tmp_path, containerd)
        proxy.set("flip", times=-1)
        r = run_puller("pull", p.ref, *args)
        proxy.set("pass", 0)
        assert r.returncode == 8, r.stderr
        shown = _layers_in(store, tmp_path, containerd, args)
        for digest, data in shown.items():  # whatever is visible is what its name says
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        big = max(p.manifest["layers"], key=lambda d: d["size"])["digest"]
        assert big not in shown
