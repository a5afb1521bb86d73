"""puller's layer applier alone, beside the apply floor: an image's cached layers (``benchmarks/realistic.py``)
applied one after another from memory, with no download, registry or containerd, each sample on a fresh filesystem
(``rig_fs.ScratchFs``). Prints wall, user and system seconds per layer and in all, for puller's applier
(:class:`~puller.unpack.layer.LayerStream`, as its worker process runs it: a decompressing thread and a tar thread
per layer) and for ``igzip -dc | tar -xpf -`` (``igzip+tar``: the apply floor's tools, here one layer after
another). Rounds alternate the two, so that both see the machine as it is.

    python3 benchmarks/apply_alone.py [--image real2g] [--rounds 3]

What it tells: how much of a pull's CPU is the applier's own, and how far it is from the native tools'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.realistic import cached_layers
from benchmarks.rig_fs import ScratchFs
from puller.digest import Digest
from puller.registry.manifest import Descriptor
from puller.unpack import Limits
from puller.unpack.layer import LayerStream

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
FEED = 1 << 20  # bytes fed at once, as the worker receives them


def cpu() -> tuple[float, float, float]:
    """(wall, user, system) seconds so far, of this process and its waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def apply_puller(layer: dict, blob: bytes, into: Path, overlay: bool) -> int:
    """Apply one layer with puller's applier; returns its tar entries."""
    into.mkdir()
    fd = os.open(into, os.O_RDONLY | os.O_DIRECTORY)
    desc = Descriptor(GZIP_LAYER, Digest.parse(layer["digest"]), layer["size"])
    stream = LayerStream(desc, layer["diff_id"], fd, overlay, Limits(), check_digest=False)
    try:
        view = memoryview(blob)
        for i in range(0, len(view), FEED):
            stream.feed(view[i : i + FEED])
        return stream.finish().entries
    finally:
        stream.close()
        os.close(fd)


def apply_tar(layer: dict, into: Path) -> int | None:
    """Apply one layer with ``igzip -dc | tar -xpf -`` (entries not counted)."""
    into.mkdir()
    subprocess.run(["sh", "-c", f"igzip -dc {layer['path']} | tar -xpf - -C {into}"], check=True)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default="real2g")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/puller-apply-alone")
    args = ap.parse_args()
    layers = cached_layers(args.image)
    blobs = [Path(x["path"]).read_bytes() for x in layers]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    totals: dict[str, list[tuple[float, float, float]]] = {"puller": [], "igzip+tar": []}
    with ScratchFs(work / "fs.img", work / "fs") as fs:
        for round_no in range(args.rounds):
            for tool in totals if round_no % 2 == 0 else reversed(list(totals)):
                root = fs.fresh()
                start = cpu()
                for i, (layer, blob) in enumerate(zip(layers, blobs, strict=True)):
                    before = cpu()
                    into = root / str(i)
                    entries = apply_puller(layer, blob, into, i > 0) if tool == "puller" else apply_tar(layer, into)
                    after = cpu()
                    wall, user, system = (b - a for a, b in zip(before, after, strict=True))
                    what = f"{entries:6d} entries" if entries is not None else ""
                    print(
                        f"round {round_no + 1} {tool:12} layer {i}: wall {wall:5.2f} user {user:5.2f} "
                        f"sys {system:5.2f} {what}",
                        flush=True,
                    )
                end = cpu()
                totals[tool].append(tuple(b - a for a, b in zip(start, end, strict=True)))  # type: ignore[arg-type]
    unpacked = sum(x["unpacked"] for x in layers) / 2**20
    print(f"\n{args.image}: {len(layers)} layers, {unpacked:,.0f} MiB unpacked; {args.rounds} rounds, medians")
    print("| tool | wall s | user s | system s | CPU s |\n|---|---:|---:|---:|---:|")
    for tool, samples in totals.items():
        wall, user, system = (statistics.median(s[k] for s in samples) for k in range(3))
        print(f"| {tool} | {wall:.2f} | {user:.2f} | {system:.2f} | {user + system:.2f} |")
    print(json.dumps({tool: samples for tool, samples in totals.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
