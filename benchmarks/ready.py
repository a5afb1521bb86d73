"""Image ready (pulled and unpacked) on the shaped rig: puller applying layers while they download, against
containerd's own pull at its best and as nodes run it, and puller through containerd's Diff service.

    python3 benchmarks/ready.py [--runs 3] [--images real2g,layers20,ml3g] [--tools TOOL,...] [--link-mbit 1024]

The rig is bench.py's: the registry redirects blob GETs to nginx (``--rate-mbps`` per connection) across a veth
link shaped to ``--link-mbit``; each sample gets a fresh containerd (in the clients' network namespace) whose root
and puller's staging are on a journaled ext4 made afresh for it (:mod:`rig_fs`), and is timed until its command
returns with the image unpacked. Tools:

  ctrd23-best, ctrd24-best   ctr images pull of containerd 2.3 / 2.4: transfer service tuned (32 downloads, 8 MiB
                             ranges within a layer, 4 unpacks at once), igzip on its PATH (it decompresses with it)
  ctrd23-node, ctrd24-node   the same as nodes run it: transfer defaults, CONTAINERD_DISABLE_IGZIP=1 (Go's gzip)
  puller-stream23/24         puller pull --store containerd --unpack-path stream (layers applied while downloading)
  puller-diff24              puller pull --store containerd --unpack-path diff (containerd's Diff service, igzip)

Per image, measured in the same run: the wire time (compressed bytes / link rate) and the apply floor (wall time
of ``igzip -dc | tar -xpf -`` of every layer at once, from blobs in the page cache, into a directory on the
filesystem of containerd's root). The table gives ready times (medians), CPU (the tool's own and containerd's),
peak RSS (the tool's and containerd's), what bounds puller, and the targets: ready within 1.15x of max(wire,
floor); real2g 2x faster than containerd at its best; ml3g 2.5x faster than containerd as nodes run it and 1.3x
than at its best; never slower than containerd at its best.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench
from benchmarks.bench import add_bench_image, run_measured, transfer_config, use_bytecode, use_interpreter
from benchmarks.rig_fs import ScratchFs
from benchmarks.rig_net import VethLink
from tests.rig import Containerd, LayoutWriter, Nginx, Registry, skopeo_push, tempdir

TOOLS = (
    "ctrd23-best",
    "ctrd24-best",
    "ctrd23-node",
    "ctrd24-node",
    "puller-stream23",
    "puller-stream24",
    "puller-diff24",
)
BEST = "d32-c8m-u4"  # bench.TRANSFER: containerd's transfer service at its best on this rig
NO_IGZIP = {"CONTAINERD_DISABLE_IGZIP": "1", "CONTAINERD_DISABLE_PIGZ": "1"}


@dataclass
class Sample:
    seconds: float
    own_cpu: float  # the tool's process (puller, or ctr: a client only)
    containerd_cpu: float
    rss_mb: float
    containerd_rss_mb: float


@dataclass
class Row:
    tool: str
    image: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def containerd_for(tool: str, work: Path, netns: str | None) -> Containerd:
    version = "2.3" if "23" in tool else "2.4"
    if tool.endswith("-node"):
        return Containerd(work / "ctrd", netns, version, None, transfer_config("default"), NO_IGZIP)
    return Containerd(work / "ctrd", netns, version, None, transfer_config(BEST))


def command(tool: str, ref: str, ctrd: Containerd, work: Path, veth: VethLink | None) -> list[str]:
    if tool.startswith("ctrd"):
        return ctrd.ctr("-n", "bench", "images", "pull", "--plain-http", ref)
    path = "stream" if "stream" in tool else "diff"
    prefix = veth.prefix() if veth else []
    return [
        *prefix,
        *bench.PULLER,
        *("pull", ref, "--store", "containerd", "--json", "--plain-http"),
        *("--containerd-address", str(ctrd.socket), "--namespace", "bench"),
        *("--staging-dir", str(work / "staging"), "--unpack-path", path),
    ]


def apply_floor(layer_blobs: list[Path], scratch: Path) -> float:
    """Wall seconds of igzip -dc | tar -xpf - of every layer at once (blobs read once first: page cache)."""
    for blob in layer_blobs:
        with open(blob, "rb") as f:
            while f.read(1 << 24):
                pass
    jobs = []
    for i, blob in enumerate(layer_blobs):
        (scratch / str(i)).mkdir(parents=True)
        jobs.append(f"(igzip -dc {blob} | tar -xpf - -C {scratch / str(i)}) &")
    started = time.monotonic()
    subprocess.run(["sh", "-c", " ".join(jobs) + " wait"], check=True)
    return time.monotonic() - started


def run(args: argparse.Namespace, work: Path) -> tuple[list[Row], dict]:
    images = args.images.split(",")
    tools = args.tools.split(",") if args.tools else list(TOOLS)
    lw = LayoutWriter(work / "layout")
    for name in images:
        add_bench_image(lw, name)
    rows: dict[tuple[str, str], Row] = {}
    floors: dict[str, list[float]] = {}
    compressed: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        fs = stack.enter_context(ScratchFs(work / "fs.img", work / "fs"))
        veth = stack.enter_context(VethLink(args.link_mbit))
        if not veth.ok:
            raise SystemExit(f"no veth link: {veth.error}")
        cdn = Nginx(
            work / "nginx", work / "registry" / "storage", limit_rate=int(args.rate_mbps * 1e6), bind=veth.server_ip
        )
        stack.enter_context(cdn)
        reg = stack.enter_context(Registry(work / "registry", redirect_base=cdn.url + "/", bind=veth.server_ip))
        for name in images:
            skopeo_push(work / "layout", name, f"{reg.host}/bench/{name}:v1", preserve_digests=True)
        for run_no in range(args.runs):
            for name in images:
                ref = f"{reg.host}/bench/{name}:v1"
                _, manifest = reg.manifest(f"bench/{name}", "v1")
                layers = [work / "layout" / "blobs" / "sha256" / d["digest"][7:] for d in manifest["layers"]]
                compressed[name] = sum(d["size"] for d in manifest["layers"]) + manifest["config"]["size"]
                floor = apply_floor(layers, fs.fresh() / "floor")
                floors.setdefault(name, []).append(floor)
                print(f"run {run_no + 1} {name:9} apply floor {floor:6.2f} s", flush=True)
                order = tools[run_no % len(tools) :] + tools[: run_no % len(tools)]
                for tool in order:
                    root = fs.fresh()
                    with containerd_for(tool, root, veth.ns) as ctrd:
                        assert ctrd.proc is not None
                        cmd = command(tool, ref, ctrd, root, veth)
                        cpu0 = ctrd.cpu_seconds()
                        s = run_measured(cmd)
                        ctrd_rss_mb = bench.vm_hwm_kb(ctrd.proc.pid) / 1024
                        sample = Sample(s.seconds, s.own_cpu, ctrd.cpu_seconds() - cpu0, s.rss_mb, ctrd_rss_mb)
                    rows.setdefault((tool, name), Row(tool, name)).samples.append(sample)
                    print(
                        f"run {run_no + 1} {name:9} {tool:16} ready {sample.seconds:7.2f} s  own cpu "
                        f"{sample.own_cpu:6.2f} s  containerd cpu {sample.containerd_cpu:6.2f} s  rss "
                        f"{sample.rss_mb:5.0f} MB  containerd rss {sample.containerd_rss_mb:5.0f} MB",
                        flush=True,
                    )
    link = args.link_mbit * 1e6 / 8
    rig = {
        "link_mbit": args.link_mbit,
        "rate_mbps_per_connection": args.rate_mbps,
        "runs": args.runs,
        "wire_s": {name: compressed[name] / link for name in images},
        "floor_s": {name: statistics.median(v) for name, v in floors.items()},
        "compressed": compressed,
    }
    return list(rows.values()), rig


def table(rows: list[Row], rig: dict) -> tuple[str, list[str]]:
    lines, verdicts = [], []
    for image in dict.fromkeys(r.image for r in rows):
        rs = sorted((r for r in rows if r.image == image), key=lambda r: r.median("seconds"))
        wire, floor = rig["wire_s"][image], rig["floor_s"][image]
        limit = max(wire, floor)
        by = {r.tool: r.median("seconds") for r in rs}
        best = min((by[t] for t in ("ctrd23-best", "ctrd24-best") if t in by), default=None)
        node = min((by[t] for t in ("ctrd23-node", "ctrd24-node") if t in by), default=None)
        lines.append(
            f"\n{image}: {rig['compressed'][image] / 1e6:,.0f} MB compressed; wire {wire:.2f} s, apply floor "
            f"{floor:.2f} s (bound: {'the wire' if wire >= floor else 'applying'}); {len(rs[0].samples)} runs, medians"
        )
        lines.append(
            "| tool | ready s | x max(wire, floor) | ctrd best / tool | own CPU s | containerd CPU s | peak RSS MB "
            "| containerd RSS MB |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rs:
            sec = r.median("seconds")
            vs_best = f"{best / sec:.2f}" if best else "-"
            lines.append(
                f"| {r.tool} | {sec:.2f} | {sec / limit:.2f} | {vs_best} | {r.median('own_cpu'):.1f} | "
                f"{r.median('containerd_cpu'):.1f} | {r.median('rss_mb'):.0f} | {r.median('containerd_rss_mb'):.0f} |"
            )
        for tool in (t for t in by if t.startswith("puller-stream")):
            sec = by[tool]
            checks = [(f"ready within 1.15x of max(wire, floor): {sec / limit:.2f}x", sec <= 1.15 * limit)]
            if best:
                checks.append((f"not slower than containerd at its best: {best / sec:.2f}x", sec <= best))
            wanted = {
                "real2g": [("at its best", best, 2.0)],
                "ml3g": [("at its best", best, 1.3), ("as nodes run it", node, 2.5)],
            }
            for how, peer, factor in wanted.get(image, []):
                if peer:
                    checks.append((f"{factor}x faster than containerd {how}: {peer / sec:.2f}x", peer >= factor * sec))
            for text, ok in checks:
                verdicts.append(f"{image} {tool}: {text}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines), verdicts


def plot(rows: list[Row], rig: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = list(dict.fromkeys(r.image for r in rows))
    tools = list(dict.fromkeys(r.tool for r in rows))
    fig, axes = plt.subplots(1, len(images), figsize=(5 * len(images), 4.5), squeeze=False)
    for ax, image in zip(axes[0], images, strict=True):
        values = [next((r.median("seconds") for r in rows if r.tool == t and r.image == image), 0) for t in tools]
        ax.barh(tools, values, color=["tab:green" if t.startswith("puller-stream") else "tab:gray" for t in tools])
        ax.axvline(rig["wire_s"][image], color="tab:blue", linestyle="--", label="wire")
        ax.axvline(rig["floor_s"][image], color="tab:red", linestyle=":", label="apply floor")
        ax.set_title(image, fontsize=9)
        ax.set_xlabel("seconds until the image is ready (median)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--images", default="real2g,layers20,ml3g")
    ap.add_argument("--tools", default="", help=f"comma-separated subset of {', '.join(TOOLS)}")
    ap.add_argument("--rate-mbps", type=float, default=8.0, help="per-connection CDN cap, MB/s")
    ap.add_argument("--link-mbit", type=int, default=1024)
    ap.add_argument("--python", default=sys.executable, help="the interpreter puller runs on")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="ready")
    args = ap.parse_args()
    if shutil.which("igzip") is None:
        raise SystemExit("igzip is needed (Debian's isal package: bash .ci/install)")
    python_version = use_interpreter(args.python)
    with tempdir("puller-ready-") as work:
        work.chmod(0o755)
        use_bytecode(work)
        rows, rig = run(args, work)
    machine = f"{os.cpu_count()} cores, {platform.machine()}, kernel {platform.release()}"
    stamp = time.strftime("%Y-%m-%d")
    title = (
        f"{stamp}, {machine}; CDN {args.rate_mbps:g} MB/s per connection, veth link {args.link_mbit} Mbit/s; "
        f"puller on Python {python_version}"
    )
    text, verdicts = table(rows, rig)
    report = f"# Image ready: {title}\n{text}\n\nTargets:\n" + "\n".join(f"- {v}" for v in verdicts) + "\n"
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stamp}-{args.name}.md").write_text(report)
    records = [{"tool": r.tool, "image": r.image, "samples": [s.__dict__ for s in r.samples]} for r in rows]
    (out / f"{stamp}-{args.name}.json").write_text(json.dumps({"rig": rig, "rows": records}, indent=1))
    plot(rows, rig, out / f"{stamp}-{args.name}.png", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
