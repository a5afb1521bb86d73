"""The overlaybd registry_cache store: config parsing as overlaybd reads it, and pulls into a cache directory
checked file by file (name, size, sha256, no holes or unwritten extents via FIEMAP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from puller.errors import ConfigError
from puller.stores.overlaybd import (
    DEFAULT_CACHE_DIR,
    FIEMAP_EXTENT_UNWRITTEN,
    OverlaybdSettings,
    file_extents,
    is_complete,
)
from puller.stores.safedir import SafeDir

from .conftest import pushed, run_puller, start_puller
from .rig import sha256_file


def test_config_cache_config_shape(tmp_path: Path):
    cfg = tmp_path / "overlaybd.json"
    cfg.write_text(
        json.dumps(
            {
                "cacheConfig": {"cacheType": "file", "cacheDir": "/x/cache", "cacheSizeGB": 9},
                "registryCacheDir": "/ignored",
                "p2pConfig": {"enable": True},
            }
        )
    )
    s = OverlaybdSettings.load(str(cfg))
    assert (s.cache_dir, s.cache_size_gb, s.p2p) == ("/x/cache", 9, True)


def test_config_legacy_shape(tmp_path: Path):
    cfg = tmp_path / "overlaybd.json"
    cfg.write_text(json.dumps({"registryCacheDir": "/old/cache", "registryCacheSizeGB": 2, "cacheConfig": {}}))
    s = OverlaybdSettings.load(str(cfg))
    assert (s.cache_dir, s.cache_size_gb, s.p2p) == ("/old/cache", 2, False)


def test_config_missing_file_means_defaults(tmp_path: Path):
    s = OverlaybdSettings.load(str(tmp_path / "nope.json"))
    assert (s.cache_dir, s.cache_size_gb) == (DEFAULT_CACHE_DIR, 4)


@pytest.mark.parametrize("doc", [{"cacheConfig": {"cacheType": "ocf"}}, {"cacheType": "download"}])
def test_config_other_cache_types_refused(tmp_path: Path, doc: dict):
    cfg = tmp_path / "overlaybd.json"
    cfg.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="not supported"):
        OverlaybdSettings.load(str(cfg))


def complete(path: Path, size: int) -> bool:
    with SafeDir.open(path.parent, create=False) as d:
        return is_complete(d, path.name, size)


def test_completeness_check_sees_holes_and_unwritten_extents(tmp_path: Path):
    """The negative controls for the FIEMAP check the pull tests rely on."""
    size = 1 << 20
    full = tmp_path / "full"
    full.write_bytes(os.urandom(size))
    assert complete(full, size)
    assert not complete(full, size + 1)
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(size)
        f.write(b"x" * 4096)
    assert not complete(sparse, size)
    unwritten = tmp_path / "unwritten"
    fd = os.open(unwritten, os.O_RDWR | os.O_CREAT)
    os.posix_fallocate(fd, 0, size)
    os.pwrite(fd, b"y" * 8192, 0)
    os.fsync(fd)
    extents = file_extents(fd)
    os.close(fd)
    assert extents is not None and any(flags & FIEMAP_EXTENT_UNWRITTEN for _, _, flags in extents)
    assert not complete(unwritten, size)


def _pull(ref: str, cache: Path, *extra: str):
    return run_puller(
        "pull",
        ref,
        "--store",
        "overlaybd",
        "--cache-dir",
        str(cache),
        "--json",
        "--overlaybd-config",
        str(cache.parent / "none.json"),
        *extra,
    )


def _assert_cache(cache: Path, manifest: dict):
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted(layer["digest"] for layer in manifest["layers"])  # layers only, nothing else
    for layer in manifest["layers"]:
        f = cache / layer["digest"]
        assert f.stat().st_size == layer["size"]
        assert "sha256:" + sha256_file(f) == layer["digest"]
        assert complete(f, layer["size"])
        fd = os.open(f, os.O_RDONLY)
        extents = file_extents(fd)
        os.close(fd)
        assert extents is not None
        assert not any(flags & FIEMAP_EXTENT_UNWRITTEN for _, _, flags in extents)


def test_pull_into_cache_dir_then_nothing_to_do(cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    p = pushed(reg, "test/app", "v1")
    cache = tmp_path / "opt" / "registry_cache"
    r = _pull(p.ref, cache)
    assert r.returncode == 0, r.stderr
    _assert_cache(cache, p.manifest)
    assert not any(cache.rglob("*.partial")) and not any(cache.rglob("*.ranges"))
    inodes = {f.name: f.stat().st_ino for f in cache.iterdir()}
    r = _pull(p.ref, cache)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["fetched"] == 0
    assert {f.name: f.stat().st_ino for f in cache.iterdir()} == inodes  # nothing rewritten


def test_incomplete_file_is_replaced(cdn_rig, tmp_path: Path):
    """A lazily filled overlaybd file (right size, holes) is not complete: the pull replaces it."""
    reg, _ = cdn_rig
    p = pushed(reg, "test/app", "v1")
    cache = tmp_path / "registry_cache"
    cache.mkdir()
    layer = max(p.manifest["layers"], key=lambda d: d["size"])
    with open(cache / layer["digest"], "wb") as f:
        f.truncate(layer["size"])
    r = _pull(p.ref, cache)
    assert r.returncode == 0, r.stderr
    _assert_cache(cache, p.manifest)


def test_cache_limit_refused_before_writing(cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    p = pushed(reg, "test/app", "v1")
    cache = tmp_path / "registry_cache"
    cfg = tmp_path / "overlaybd.json"
    cfg.write_text(json.dumps({"cacheConfig": {"cacheType": "file", "cacheDir": str(cache), "cacheSizeGB": 1}}))
    cache.mkdir()
    filler = cache / ("sha256:" + "0" * 64)
    with open(filler, "wb") as f:  # 1 GiB - 1 MiB already used (allocated: overlaybd counts st_blocks)
        os.posix_fallocate(f.fileno(), 0, (1 << 30) - (1 << 20))
    r = run_puller("pull", p.ref, "--store", "overlaybd", "--overlaybd-config", str(cfg))
    assert r.returncode == 10, r.stderr
    assert "cacheSizeGB" in r.stderr
    assert sorted(x.name for x in cache.iterdir()) == [filler.name]


def test_killed_pull_leaves_nothing_in_cache(slow_rig, tmp_path: Path):
    reg, _ = slow_rig
    p = pushed(reg, "test/big", "v1")
    cache = tmp_path / "registry_cache"
    args = [
        "pull",
        p.ref,
        "--store",
        "overlaybd",
        "--cache-dir",
        str(cache),
        "--overlaybd-config",
        str(tmp_path / "none.json"),
        "--concurrency",
        "4",  # 4 connections of 1 MB/s: about 6 s for the layer
    ]
    proc = start_puller(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / ".puller-staging"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(staging.glob("*.ranges")):
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Partial data lives outside the cache directory: what is there is a whole, verified layer.
    layers = {f"sha256:{x['digest'].split(':')[1]}": x for x in p.manifest["layers"]}
    largest = max(layers.values(), key=lambda x: x["size"])
    assert f"sha256:{largest['digest'].split(':')[1]}" not in {f.name for f in cache.iterdir()}
    for f in cache.iterdir():
        assert "sha256:" + sha256_file(f) == layers[f.name]["digest"]
    assert any(staging.glob("*.partial"))
    r = _pull(p.ref, cache)
    assert r.returncode == 0, r.stderr
    _assert_cache(cache, p.manifest)
