"""A realistic image for the benchmarks: layers tarred from real trees of this machine, gzip level 6.

Random layers are incompressible and unpack to one file each; real layers are about 2-3x compressible and
unpack to thousands of files of every size, which is what containerd's decompression and snapshotter work on.
``real2g`` is about 2 GiB unpacked in 8 layers, the lowest about 1 GiB (an OS and runtime base), then smaller
ones (libraries, the application, configuration), as images are built. ``ml3g`` is an ML-style image: two layers,
3 GiB unpacked, of large compressible binaries only (files of 1 MiB and more: shared libraries, toolchains), as
CUDA and PyTorch layers are.

Files are taken in sorted order from the trees below, each layer filled up to its size; symbolic links and
special files are skipped. The layers are cached under ``$PULLER_BENCH_CACHE`` (default
/var/tmp/puller-bench-cache), keyed by the recipe, so a second run does not tar and gzip 2 GiB again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

MIB = 1 << 20
TREES = ("/usr/lib", "/usr/share", "/usr/local", "/usr/bin", "/root/.rustup", "/opt")
RECIPES = {"real2g": [1024, 384, 256, 160, 96, 64, 32, 16], "ml3g": [2048, 1024]}  # MiB unpacked per layer
MIN_FILE = {"ml3g": MIB}  # only files at least this large go into the recipe's layers
GZIP_LEVEL = 6  # what docker and buildkit use
CACHE = Path(os.environ.get("PULLER_BENCH_CACHE", "/var/tmp/puller-bench-cache"))


def _files(min_size: int = 0) -> Iterator[Path]:
    for tree in TREES:
        for root, dirs, files in os.walk(tree):
            dirs.sort()
            for name in sorted(files):
                p = Path(root, name)
                if p.is_file() and not p.is_symlink() and (not min_size or p.stat().st_size >= min_size):
                    yield p


def cached_layers(name: str) -> list[dict]:
    """[{path, digest, size, diff_id}] of the recipe's layers, made once and cached."""
    from tests.rig import _HashingWriter

    recipe = RECIPES[name]
    what: list = [recipe, TREES, GZIP_LEVEL] + ([MIN_FILE[name]] if name in MIN_FILE else [])
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
    cache = CACHE / f"{name}-{key}"
    index = cache / "layers.json"
    if index.exists():
        return json.loads(index.read_text())
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    files = _files(MIN_FILE.get(name, 0))
    out = []
    for i, mib in enumerate(recipe):
        path = cache / f"layer{i}.tar.gz"
        with open(path, "wb") as raw:
            gz_sink = _HashingWriter(raw)
            with gzip.GzipFile(fileobj=gz_sink, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
                tar_sink = _HashingWriter(gz)
                with tarfile.open(fileobj=tar_sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    budget = mib * MIB
                    for f in files:
                        try:
                            info = tar.gettarinfo(str(f), arcname=str(f).lstrip("/"))
                            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                            with open(f, "rb") as src:
                                tar.addfile(info, src)
                        except OSError:
                            continue
                        budget -= info.size
                        if budget <= 0:
                            break
        out.append(
            {
                "path": str(path),
                "digest": "sha256:" + gz_sink.h.hexdigest(),
                "size": gz_sink.n,
                "diff_id": "sha256:" + tar_sink.h.hexdigest(),
                "unpacked": tar_sink.n,
            }
        )
        print(f"  {name} layer {i}: {tar_sink.n / MIB:.0f} MiB -> {gz_sink.n / MIB:.0f} MiB gzip", flush=True)
    index.write_text(json.dumps(out))
    return out


def add_real_image(lw, name: str) -> int:
    """Put image ``name`` (a key of RECIPES) into LayoutWriter ``lw``; returns its unpacked size."""
    from tests.rig import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST  # the layout's media types

    layers = cached_layers(name)
    blobs_dir = lw.root / "blobs" / "sha256"
    for layer in layers:
        target = blobs_dir / layer["digest"][7:]
        if not target.exists():
            os.link(layer["path"], target) if _same_fs(layer["path"], blobs_dir) else shutil.copy(layer["path"], target)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [x["diff_id"] for x in layers]},
    }
    cdigest, csize = lw.put(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": x["digest"], "size": x["size"]} for x in layers],
    }
    mdigest, msize = lw.put(json.dumps(manifest).encode())
    lw._name(
        name,
        {
            "mediaType": OCI_MANIFEST,
            "digest": mdigest,
            "size": msize,
            "annotations": {"org.opencontainers.image.ref.name": name},
        },
    )
    return sum(x["unpacked"] for x in layers)


def _same_fs(a: str, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev
