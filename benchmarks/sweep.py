"""Scaling sweeps for choosing puller's defaults: throughput against the connection budget and against the
chunk size (shaped rig), and peak RSS against image size (loopback, no caps). Prints tables, writes a PNG.

    python3 benchmarks/sweep.py [--runs 3] [--rate-mbps 8] [--link-mbit 1024] [--sizes 256,1024,2048]

Same rig as bench.py (registry redirecting to nginx with limit_rate, an HTB link on lo). Each point is the
median of --runs whole `puller pull` commands, measured in one run of this script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench import MIB, run_measured
from benchmarks.rig_net import LoopbackLink
from tests.rig import LayoutWriter, Nginx, Registry, skopeo_push, tempdir

BUDGETS = [1, 2, 4, 8, 16, 32, 64]
CHUNKS = ["1MiB", "2MiB", "4MiB", "8MiB", "16MiB"]


def pull(work: Path, ref: str, *flags: str):
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    sample = run_measured(
        [sys.executable, "-m", "puller.cli", "pull", ref, "--store", f"oci:{store}", "--json", *flags]
    )
    shutil.rmtree(store, ignore_errors=True)
    return sample


def median_point(work, ref, runs, size, *flags) -> dict:
    samples = [pull(work, ref, *flags) for _ in range(runs)]
    sec = statistics.median(s.seconds for s in samples)
    inner = statistics.median(s.inner_seconds or s.seconds for s in samples)
    return {
        "seconds": round(sec, 3),
        "mb_s": round(size / 1e6 / sec, 1),
        "mb_s_in_process": round(size / 1e6 / inner, 1),
        "rss_mb": round(statistics.median(s.rss_mb for s in samples), 1),
    }


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    budget, chunk, rss = out["budget"], out["chunk"], out["rss"]
    xs = [int(n) for n in budget]
    axes[0].plot(xs, [p["mb_s"] for p in budget.values()], "o-", label="whole command")
    axes[0].plot(xs, [p["mb_s_in_process"] for p in budget.values()], "s--", label="in-process")
    axes[0].set_xscale("log", base=2)
    axes[0].set(xlabel="connection budget", ylabel="MB/s", title="throughput vs connections", ylim=(0, None))
    axes[0].legend()
    axes[1].plot(list(chunk), [p["mb_s"] for p in chunk.values()], "o-", label="whole command")
    axes[1].plot(list(chunk), [p["mb_s_in_process"] for p in chunk.values()], "s--", label="in-process")
    axes[1].set(xlabel="chunk size (max)", ylabel="MB/s", title="throughput vs chunk size", ylim=(0, None))
    axes[1].legend()
    axes[2].plot([int(m) for m in rss], [p["rss_mb"] for p in rss.values()], "o-")
    axes[2].set(xlabel="image size (MiB)", ylabel="peak RSS (MB)", title="memory vs image size", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ap = argparse.ArgumentParser(description="puller scaling sweeps")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate-mbps", type=float, default=8.0)
    ap.add_argument("--link-mbit", type=int, default=1024)
    ap.add_argument("--sizes", default="256,1024,2048", help="image sizes (MiB) for the RSS sweep")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--replot", help="only redraw the plot from a sweep's JSON")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    out: dict = {"budget": {}, "chunk": {}, "rss": {}}
    with tempdir("puller-sweep-") as work:
        work.chmod(0o755)
        lw = LayoutWriter(work / "layout")
        for mib in sorted({256, *sizes}):
            lw.add_image(f"s{mib}", [mib * MIB], seed=mib)
        shaped = Nginx(work / "nginx", work / "registry" / "storage", limit_rate=int(args.rate_mbps * 1e6))
        with shaped, Registry(work / "registry", redirect_base=shaped.url + "/") as reg:
            for mib in sorted({256, *sizes}):
                skopeo_push(work / "layout", f"s{mib}", f"{reg.host}/sweep/s{mib}:v1")
            ref = f"{reg.host}/sweep/s256:v1"
            size = 256 * MIB
            with LoopbackLink(args.link_mbit, [shaped.port, reg.port]) as link:
                if not link.ok:
                    print(f"warning: no link limit ({link.error})", file=sys.stderr)
                for n in BUDGETS:
                    out["budget"][n] = median_point(work, ref, args.runs, size, "--concurrency", str(n))
                    print("budget", n, out["budget"][n], flush=True)
                for c in CHUNKS:
                    out["chunk"][c] = median_point(work, ref, args.runs, size, "--chunk-size", c)
                    print("chunk", c, out["chunk"][c], flush=True)
        free = Nginx(work / "nginx-free", work / "registry" / "storage")
        with free, Registry(work / "registry", redirect_base=free.url + "/") as reg:
            for mib in sizes:
                out["rss"][mib] = median_point(work, f"{reg.host}/sweep/s{mib}:v1", args.runs, mib * MIB)
                print("rss", mib, out["rss"][mib], flush=True)
    stamp = time.strftime("%Y-%m-%d")
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{stamp}-sweep.json").write_text(json.dumps(out, indent=1))
    lines = [
        f"# sweeps {stamp}: fat256 on the shaped rig ({args.rate_mbps:g} MB/s per connection, link "
        f"{args.link_mbit} Mbit/s), RSS on loopback; medians of {args.runs}",
        "",
        "| connections | s | MB/s | MB/s in-process |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {p['seconds']} | {p['mb_s']} | {p['mb_s_in_process']} |" for n, p in out["budget"].items()]
    lines += ["", "| chunk size (max) | s | MB/s | MB/s in-process |", "|---:|---:|---:|---:|"]
    lines += [f"| {c} | {p['seconds']} | {p['mb_s']} | {p['mb_s_in_process']} |" for c, p in out["chunk"].items()]
    lines += ["", "| image MiB | s | peak RSS MB |", "|---:|---:|---:|"]
    lines += [f"| {m} | {p['seconds']} | {p['rss_mb']} |" for m, p in out["rss"].items()]
    text = "\n".join(lines) + "\n"
    (dest / f"{stamp}-sweep.md").write_text(text)
    print(text)
    plot(out, dest / f"{stamp}-sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
