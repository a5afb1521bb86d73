"""gzip inflate libraries side by side, as the layer applier uses them (decompressobj, 1 MiB pieces in, at most
1 MiB out per call): CPython's zlib, zlib-ng (``zlib-ng``) and ISA-L (``isal``, what puller uses); with GNU gzip,
igzip and pigz where installed, as commands (``-dc`` to /dev/null). Prints CPU seconds and MB/s of decompressed
output per library, the median of --repeat rounds (interleaved), on a layer tarred from a real tree of this machine.

    python3 benchmarks/decompress.py [--tree /usr/lib/x86_64-linux-gnu] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

PIECE = 1 << 20


def libraries() -> dict[str, object]:
    import zlib_ng.zlib_ng as zlib_ng
    from isal import isal_zlib

    return {"zlib": zlib, "zlib-ng": zlib_ng, "isal": isal_zlib}


def inflate(module, blob: bytes) -> int:
    d = module.decompressobj(31)
    n = 0
    for i in range(0, len(blob), PIECE):
        data = blob[i : i + PIECE]
        while data:
            n += len(d.decompress(data, PIECE))
            data = d.unconsumed_tail
    return n


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default="/usr/lib/x86_64-linux-gnu", help="directory tarred into the test layer")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tree = Path(args.tree)
    raw = subprocess.run(["tar", "-C", str(tree.parent), "-cf", "-", tree.name], capture_output=True).stdout
    blob = gzip.compress(raw, 6)
    sizes = f"{len(raw) / 1e6:,.0f} MB, gzip -6 {len(blob) / 1e6:,.0f} MB"
    print(f"layer: {tree} tarred, {sizes}; python {sys.version.split()[0]}")
    samples: dict[str, list[float]] = {}
    commands = [c for c in ("gzip", "igzip", "pigz") if shutil.which(c)]
    with tempfile.NamedTemporaryFile(suffix=".gz") as f:
        f.write(blob)
        f.flush()
        for _ in range(args.repeat):
            for name, module in libraries().items():
                started = time.process_time()
                assert inflate(module, blob) == len(raw)
                samples.setdefault(name, []).append(time.process_time() - started)
            for command in commands:
                before = child_cpu()
                with open(os.devnull, "wb") as null:
                    subprocess.run([command, "-dc", f.name], stdout=null, check=True)
                samples.setdefault(f"{command} (command)", []).append(child_cpu() - before)
    print(f"{'inflate':18s} {'CPU s':>7s} {'MB/s out':>9s} {'vs zlib':>8s}")
    base = statistics.median(samples["zlib"])
    for name, cpu in samples.items():
        median = statistics.median(cpu)
        print(f"{name:18s} {median:7.2f} {len(raw) / 1e6 / median:9.0f} {base / median:7.2f}x")


if __name__ == "__main__":
    main()
