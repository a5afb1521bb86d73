"""A fleet on a real P2P mirror: N nodes, each a network namespace with containerd 2.4, Spegel (static bootstrap)
and a puller daemon; the upstream registry and its blob CDN (nginx) in the root namespace behind a shaped uplink
(tbf on the bridge: what the upstream sends into the fleet), node-to-node traffic unshaped. Each scenario pulls its
own image (same size, other bytes), so no scenario finds another's blobs.

    python3 benchmarks/fleet_spegel.py [--nodes 8] [--image-mib 64] [--uplink-mbit 200] [--name fleet-spegel]

Scenarios (all nodes asked at once unless waves):
    ctrd-spegel         containerd's own pull (crictl, as kubelet pulls) on every node, through Spegel
    puller-direct       puller daemons, hosts.toml without Spegel (`puller warmup`)
    puller-spegel       puller daemons through Spegel, all at once
    puller-waves        through Spegel, `puller warmup --first-wave 1`
    puller-waves-kill   as puller-waves, and the first node's Spegel killed once the second wave pulls

Reports, per scenario: upstream bytes (CDN body bytes of the image's blobs, in copies of the image), the time
until each node held the image, and per-node link use (what each node received, mean and peak MB/s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fleet import plot
from tests.daemon_rig import Daemon
from tests.p2p import SPEGEL, Bridge, SpegelNode
from tests.rig import LayoutWriter, Nginx, Registry, skopeo_push, tempdir

NET = "10.236.0"
RESULTS = Path(__file__).parent / "results"
PULLER = (sys.executable, "-m", "puller")


@dataclass
class Outcome:
    scenario: str
    image_bytes: int
    upstream_bytes: int = 0
    done_at: list[float] = field(default_factory=list)  # seconds from the start, per node, sorted
    received_mb: list[float] = field(default_factory=list)  # per node
    failed: list[str] = field(default_factory=list)

    @property
    def copies(self) -> float:
        return self.upstream_bytes / self.image_bytes

    @property
    def last(self) -> float:
        return max(self.done_at) if self.done_at else float("nan")


def tx_bytes(iface: str) -> int:
    """What the bridge sent into a node's namespace: what the node received."""
    return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())


def cdn_bytes(cdn: Nginx, digests: list[str]) -> int:
    hexes = [d.split(":")[1] for d in digests]
    total = 0
    for line in cdn.requests():
        parts = line.split()
        if len(parts) > 1 and parts[1].isdigit() and any(h in line for h in hexes):
            total += int(parts[1])
    return total


def state(daemon: Daemon, ref: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{daemon.url}/v1/images", timeout=2) as r:
            images = json.loads(r.read())["images"]
    except OSError:
        return None
    return next((i["state"] for i in images if i["reference"] == ref), None)


def run_puller_scenario(
    key: str, nodes: list[SpegelNode], daemons: list[Daemon], ref: str, waves: bool, kill: bool
) -> tuple[list[float], list[str]]:
    """``puller warmup`` of ``ref`` on every daemon; polls each for the time its image became present."""
    args = [*PULLER, "warmup", ref, "--endpoints", ",".join(d.url for d in daemons), "--wait", "--timeout", "600"]
    if waves:
        args += ["--first-wave", "1"]
    started = time.monotonic()
    warmup = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done: dict[int, float] = {}
    killed = False
    while warmup.poll() is None or len(done) < len(daemons):
        for i, d in enumerate(daemons):
            if i not in done and state(d, ref) == "present":
                done[i] = time.monotonic() - started
        if kill and not killed and 0 in done and any(state(d, ref) == "pulling" for d in daemons[1:]):
            nodes[0].kill_spegel()  # the one peer holding the image dies while the second wave pulls from it
            killed = True
        if warmup.poll() is not None and len(done) < len(daemons):
            break
        time.sleep(0.1)
    _, err = warmup.communicate()
    if killed:
        nodes[0].start_spegel()
        nodes[0].wait_ready()
    failed = [] if warmup.returncode == 0 else [err.strip().splitlines()[-1] if err.strip() else "warmup failed"]
    return sorted(done.values()), failed


def run_ctrd_scenario(nodes: list[SpegelNode], ref: str) -> tuple[list[float], list[str]]:
    """crictl pull on every node at once (containerd's CRI pull, through Spegel as hosts.toml says)."""
    started = time.monotonic()
    procs = [subprocess.Popen(n.ctrd.crictl("pull", ref), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for n in nodes]  # fmt: skip
    times: list[float] = []
    failed: list[str] = []
    pending = set(range(len(procs)))
    while pending:
        for i in list(pending):
            if procs[i].poll() is not None:
                pending.discard(i)
                if procs[i].returncode == 0:
                    times.append(time.monotonic() - started)
                else:
                    failed.append(f"{nodes[i].name}: {procs[i].stderr.read().strip()[-200:]}")  # type: ignore[union-attr]
        time.sleep(0.05)
    return sorted(times), failed


def table(outcomes: list[Outcome], args: argparse.Namespace, machine: str, one_copy_s: float) -> str:
    lines = [
        f"{args.nodes} nodes (containerd 2.4, Spegel {spegel_version()} with mirror-resolve-timeout "
        f"{args.spegel_resolve_timeout or '20ms (its default)'}, puller daemon each), one "
        f"{args.image_mib} MiB image per scenario; upstream {args.uplink_mbit} Mbit/s, node links unshaped (veth); "
        f"{machine}. One upstream copy takes {one_copy_s:.1f} s at the uplink's rate.",
        "",
        "| scenario | upstream copies | first node s | median node s | all nodes s | node rx MB/s mean / peak "
        "| failed |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for o in outcomes:
        med = sorted(o.done_at)[len(o.done_at) // 2] if o.done_at else float("nan")
        first = o.done_at[0] if o.done_at else float("nan")
        rates = [mb / t for mb, t in zip(o.received_mb, sorted(o.done_at), strict=False) if t > 0]
        mean = sum(rates) / len(rates) if rates else 0.0
        lines.append(
            f"| {o.scenario} | {o.copies:.2f} | {first:.1f} | {med:.1f} | {o.last:.1f} | "
            f"{mean:.0f} / {max(rates, default=0):.0f} | {'; '.join(o.failed) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def spegel_version() -> str:
    stamp = SPEGEL.parent / ".spegel.version"
    return stamp.read_text().strip() if stamp.exists() else "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--image-mib", type=int, default=64)
    p.add_argument("--uplink-mbit", type=int, default=200)
    p.add_argument("--scenarios", help="comma-separated subset (see above)")
    p.add_argument("--spegel-resolve-timeout", help="Spegel's --mirror-resolve-timeout (default: Spegel's, 20ms)")
    p.add_argument("--name", default="fleet-spegel")
    args = p.parse_args()
    if os.geteuid() != 0 or not SPEGEL.exists():
        print("needs root (network namespaces, tc) and the test components (bash .ci/install-test)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    keys = ["ctrd-spegel", "puller-direct", "puller-spegel", "puller-waves", "puller-waves-kill"]
    if args.scenarios:
        keys = [k for k in keys if k in args.scenarios.split(",")]
    machine = f"{os.cpu_count()} cores, {platform.machine()}, kernel {platform.release().split('-')[0]}"
    layer = args.image_mib << 20
    outcomes: list[Outcome] = []
    with tempdir("puller-fleet-spegel-") as work, Bridge("pfsbr0", NET) as bridge:
        os.chmod(work, 0o755)
        layout = LayoutWriter(work / "layout")
        images = {k: layout.add_image(k, [layer // 4] * 4, seed=300 + i) for i, k in enumerate(keys)}
        cdn = Nginx(work / "cdn", work / "registry" / "storage", bind=bridge.ip)
        with contextlib.ExitStack() as stack:
            stack.enter_context(cdn)
            reg = stack.enter_context(Registry(work / "registry", redirect_base=cdn.url + "/", bind=bridge.ip))
            for k in keys:
                skopeo_push(work / "layout", k, f"{reg.host}/fleet/{k}:v1")
            bridge.shape(args.uplink_mbit)
            ips = [f"{NET}.{10 + i}" for i in range(args.nodes)]
            extra = (f"--mirror-resolve-timeout={args.spegel_resolve_timeout}",) if args.spegel_resolve_timeout else ()
            nodes = [SpegelNode(work / f"n{i}", bridge, f"pfs-n{i}", ip, [reg.host], extra) for i, ip in enumerate(ips)]
            for node in nodes:
                node.peers = [nodes[0].address] if node is not nodes[0] else [nodes[1].address]
            for node in nodes:
                stack.enter_context(node)
            for node in nodes:
                node.wait_ready(120)
            direct = work / "certs.direct" / reg.host
            direct.mkdir(parents=True)
            (direct / "hosts.toml").write_text(f'server = "http://{reg.host}"\n')
            for key in keys:
                image = images[key]
                ref = f"{reg.host}/fleet/{key}:v1"
                digests = list(image.blobs)
                size = sum(image.blobs.values())
                rx0 = [tx_bytes(n.iface) for n in nodes]
                up0 = cdn_bytes(cdn, digests)
                if key == "ctrd-spegel":
                    times, failed = run_ctrd_scenario(nodes, ref)
                else:
                    with contextlib.ExitStack() as ds:
                        daemons = []
                        for n in nodes:
                            settings = n.daemon_settings()
                            if key == "puller-direct":
                                settings["hosts_dir"] = str(work / "certs.direct")
                            daemons.append(ds.enter_context(
                                Daemon(work / f"{key}-{n.name}", settings, host=n.ip, netns=n.name)))  # fmt: skip
                        times, failed = run_puller_scenario(
                            key, nodes, daemons, ref, key.startswith("puller-waves"), key.endswith("kill")
                        )
                o = Outcome(key, size, cdn_bytes(cdn, digests) - up0, times, failed=failed)
                o.received_mb = [(tx_bytes(n.iface) - r) / 1e6 for n, r in zip(nodes, rx0, strict=True)]
                outcomes.append(o)
                print(f"{key}: {o.copies:.2f} copies upstream, all present after {o.last:.1f} s {failed or ''}",
                      flush=True)  # fmt: skip
    one_copy = layer * 8 / (args.uplink_mbit * 1e6)
    text = table(outcomes, args, machine, one_copy)
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{time.strftime('%Y-%m-%d')}-{args.name}-n{args.nodes}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    title = f"{args.nodes} nodes on Spegel, {args.image_mib} MiB, upstream {args.uplink_mbit} Mbit/s"
    plot(outcomes, stem.with_suffix(".png"), title, "seconds since the pull was asked for")
    print(f"wrote {stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
