"""The whole comparison matrix in one command: every configuration of bench.py that the benchmark README reports,
one after another, then one summary file.

    python3 benchmarks/matrix.py [--runs 3] [--name matrix] [--only cap16,cap4,fat2g,loopback]

Each configuration is a bench.py run (it sets up its registry, CDN and link, measures the tools alternately, and
tears everything down, also on Ctrl-C) writing results/<date>-<name>-<config>.{md,json,png}; the summary
results/<date>-<name>.md holds all tables. About 45 minutes with --runs 3 on 2 cores (the single-stream peers
at 8 MB/s dominate).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = "curl-16,puller,skopeo,ctr,ctr-pull,puller-ctrd,curl-1,oras-py"
CONFIGS = {
    # per-connection cap 1/16 of the 128 MB/s link (8 MB/s), the shape of a CDN or object store
    "cap16": ["--rate-mbps", "8", "--images", "fat256,layers20,layers200", "--tools", PEERS],
    # per-connection cap 1/4 of the link (32 MB/s)
    "cap4": ["--rate-mbps", "32", "--images", "fat256,layers20,layers200", "--tools", PEERS],
    # 2 GiB in one layer; the single-stream peers would take 4.5 minutes a sample at 8 MB/s: same ratio as fat256
    "fat2g": ["--rate-mbps", "8", "--images", "fat2g", "--tools", "curl-16,puller"],
    # no caps: CPU per byte decides; curl-sync (curl-16 then sync) is the durable reference
    "loopback": [
        "--link",
        "lo",
        "--link-mbit",
        "0",
        "--rate-mbps",
        "0",
        "--images",
        "fat256,layers20,fat2g",
        "--tools",
        "curl-16,curl-sync,puller",
    ],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--name", default="matrix")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(CONFIGS)}")
    args = ap.parse_args()
    chosen = args.only.split(",") if args.only else list(CONFIGS)
    unknown = set(chosen) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configurations {sorted(unknown)}")
    stamp = time.strftime("%Y-%m-%d")
    sections = []
    for config in chosen:
        name = f"{args.name}-{config}"
        print(f"== {config}", flush=True)
        cmd = [sys.executable, str(HERE / "bench.py"), "--runs", str(args.runs), "--name", name, *CONFIGS[config]]
        if subprocess.run(cmd).returncode != 0:
            print(f"{config} failed", file=sys.stderr)
            return 1
        sections.append(f"## {config}\n\n" + (HERE / "results" / f"{stamp}-{name}.md").read_text())
    summary = HERE / "results" / f"{stamp}-{args.name}.md"
    summary.write_text(f"# Benchmark matrix, {stamp}\n\n" + "\n".join(sections))
    print(f"wrote {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
