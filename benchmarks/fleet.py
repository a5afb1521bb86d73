"""A simulated fleet: N puller daemons, each in its own network namespace, pulling one image from an upstream
registry behind a shaped link, with and without a shared pull-through-cache mirror, with a per-node bandwidth cap
and with start jitter. Reports the bytes the upstream sent and the time until every node has the image.

    python3 benchmarks/fleet.py [--nodes 8] [--image-mib 64] [--uplink-mbit 400] [--runs 1] [--name fleet]

Topology (all on this machine, torn down at the end and on Ctrl-C):

    root ns: bridge pfbr0 10.231.0.1 (the script polls the daemons from here)
    pf-up:     the upstream registry, 10.231.0.2:5000; its egress shaped (tbf) to --uplink-mbit: the cluster's
               way out to the registry (NAT gateway, WAN, registry quota) is the bottleneck
    pf-mirror: a distribution registry in pull-through-cache mode (proxy -> upstream), 10.231.0.3:5000, unshaped
    pf-nI:     puller daemon I, 10.231.0.(10+I):8470, its own OCI store

A run: start the daemons with an empty list, then give every node the same image list at once (as a ConfigMap
update reaches a fleet), and poll each daemon until the image is present. Upstream bytes are what the upstream's
veth sent.
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.rig import LayoutWriter, skopeo_push, tempdir, wait_http

NET = "10.231.0"
BRIDGE = "pfbr0"
UPSTREAM_IP, MIRROR_IP = f"{NET}.2", f"{NET}.3"
API_PORT = 8470
RESULTS = Path(__file__).parent / "results"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


class Fabric:
    """The bridge and one namespace per host, each with a veth to the bridge."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []

    def __enter__(self) -> Fabric:
        self.__exit__()  # leftovers of an interrupted run
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        return self

    def host(self, name: str, ip: str, egress_mbit: int | None = None) -> str:
        """Namespace ``name`` at ``ip``; returns the bridge-side interface (its rx_bytes = what the host sent)."""
        outer, inner = f"{name}-h"[:15], f"{name}-n"[:15]
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", name)
        sh("ip", "link", "set", outer, "master", BRIDGE, "up")
        for cmd in (
            ["ip", "addr", "add", f"{ip}/24", "dev", inner],
            ["ip", "link", "set", inner, "up"],
            ["ip", "link", "set", "lo", "up"],
        ):
            sh("ip", "netns", "exec", name, *cmd)
        if egress_mbit:
            burst = max(64, egress_mbit * 1000 // 8 // 100)  # kbit: 10 ms worth
            sh("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", inner, "root", "tbf",
               "rate", f"{egress_mbit}mbit", "burst", f"{burst}kb", "latency", "50ms")  # fmt: skip
        return outer

    def __exit__(self, *exc: object) -> None:
        for ns in sh("ip", "netns", "list", check=False).stdout.split("\n"):
            name = ns.split(" ")[0]
            if name.startswith("pf-"):
                sh("ip", "netns", "del", name, check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        self.namespaces.clear()


def rx_bytes(iface: str) -> int:
    return int(Path(f"/sys/class/net/{iface}/statistics/rx_bytes").read_text())


@contextlib.contextmanager
def registry(ns: str, ip: str, root: Path, proxy: str | None = None):
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    lines = [
        "version: 0.1",
        "log: {level: error, accesslog: {disabled: true}}",
        f"storage: {{filesystem: {{rootdirectory: {root / 'storage'}}}}}",
        f"http: {{addr: '{ip}:5000', secret: fleet}}",
    ]
    if proxy:
        lines.append(f"proxy: {{remoteurl: '{proxy}'}}")
    config.write_text("\n".join(lines) + "\n")
    with open(root / "registry.log", "wb") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "docker-registry", "serve", str(config)], stdout=log, stderr=log
        )
        try:
            wait_http(f"http://{ip}:5000/v2/", timeout=30)
            yield
        finally:
            proc.terminate()
            proc.wait(10)


@dataclass
class Scenario:
    key: str
    name: str
    mirror: bool = False
    bandwidth_limit: int | None = None  # bytes/s per node
    start_jitter: float = 0.0
    warm: bool = False  # the mirror already holds the image (a second wave: a later scale-up, a new node pool)


@dataclass
class Outcome:
    scenario: str
    upstream_bytes: int
    image_bytes: int
    done_at: list[float] = field(default_factory=list)  # seconds from the list update, per node

    @property
    def last(self) -> float:
        return max(self.done_at)


def image_state(ip: str, ref: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:{API_PORT}/v1/images", timeout=2) as r:
            body = json.loads(r.read())
    except OSError:
        return None
    return next((i for i in body["images"] if i["reference"] == ref), None)


def run_scenario(fabric: Fabric, work: Path, sc: Scenario, nodes: list[tuple[str, str]], ref: str, size: int,
                 up_iface: str) -> Outcome:  # fmt: skip
    root = work / sc.key
    procs = []
    with contextlib.ExitStack() as stack:
        if sc.mirror:
            stack.enter_context(registry("pf-mirror", MIRROR_IP, root / "mirror", proxy=f"http://{UPSTREAM_IP}:5000"))
        for ns, ip in nodes:
            d = root / ns
            d.mkdir(parents=True)
            (d / "images.yaml").write_text("images: []\n")
            settings = {
                "store": f"oci:{d / 'store'}",
                "images_file": str(d / "images.yaml"),
                "listen": f"{ip}:{API_PORT}",
                "api_allow_unauthenticated": True,  # in the fleet's own network namespaces only
                "plain_http": [f"{UPSTREAM_IP}:5000", f"{MIRROR_IP}:5000"],
                "hosts_dir": None,
                "watch_interval": 0.1,
                "startup_taint": None,
                "connections": 16,
                "start_jitter": sc.start_jitter,
                "bandwidth_limit": sc.bandwidth_limit,
            }
            if sc.mirror:
                settings["mirrors"] = {f"{UPSTREAM_IP}:5000": [{"host": f"http://{MIRROR_IP}:5000"}]}
            (d / "puller.yaml").write_text(json.dumps(settings))
            cmd = [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "puller.cli",
                "daemon",
                "--config",
                str(d / "puller.yaml"),
            ]
            log = stack.enter_context(open(d / "daemon.log", "wb"))
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
        stack.callback(lambda: [p.send_signal(signal.SIGTERM) for p in procs] and [p.wait(30) for p in procs])
        for _, ip in nodes:
            wait_http(f"http://{ip}:{API_PORT}/healthz", timeout=60)
        if sc.warm:
            prewarm(ref.replace(UPSTREAM_IP, MIRROR_IP), root / "mirror" / "storage", size)
        before = rx_bytes(up_iface)
        t0 = time.monotonic()
        for ns, _ in nodes:  # the same list reaches every node at once
            d = root / ns
            (d / "images.tmp").write_text(f"images: ['{ref}']\n")
            os.replace(d / "images.tmp", d / "images.yaml")
        done: dict[str, float] = {}
        while len(done) < len(nodes):
            for ns, ip in nodes:
                if ns not in done and (st := image_state(ip, ref)) and st["state"] == "present":
                    done[ns] = time.monotonic() - t0
            if time.monotonic() - t0 > 900:
                raise TimeoutError(
                    f"{sc.name}: nodes not done after 900 s: {sorted(set(n for n, _ in nodes) - set(done))}"
                )
            time.sleep(0.05)
        time.sleep(0.5)  # let a pull-through cache finish storing what it fetched
        return Outcome(sc.name, rx_bytes(up_iface) - before, size, sorted(done.values()))


def prewarm(mirror_ref: str, storage: Path, size: int) -> None:
    """Fetch the image once through the pull-through cache and wait until the cache has stored it."""
    host, _, rest = mirror_ref.partition("/")
    repo, _, tag = rest.rpartition(":")
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=60) as r:
        manifest = json.loads(r.read())
    for blob in [manifest["config"], *manifest["layers"]]:
        with urllib.request.urlopen(f"http://{host}/v2/{repo}/blobs/{blob['digest']}", timeout=300) as r:
            while r.read(1 << 20):
                pass
    deadline = time.monotonic() + 120
    while sum(f.stat().st_size for f in storage.rglob("data")) < size and time.monotonic() < deadline:
        time.sleep(0.2)


def table(outcomes: list[Outcome], args, machine: str) -> str:
    lines = [
        f"Fleet of {args.nodes} nodes, one {args.image_mib} MiB image, upstream link {args.uplink_mbit} Mbit/s "
        f"({args.uplink_mbit / 8:.0f} MB/s); {machine}; runs: {args.runs} (medians).",
        "",
        "| scenario | upstream MB | x image | first node s | median node s | last node s (all present) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_name: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_name.setdefault(o.scenario, []).append(o)
    for name, os_ in by_name.items():
        up = statistics.median(o.upstream_bytes for o in os_)
        first = statistics.median(o.done_at[0] for o in os_)
        med = statistics.median(statistics.median(o.done_at) for o in os_)
        last = statistics.median(o.last for o in os_)
        lines.append(
            f"| {name} | {up / 1e6:.0f} | {up / os_[0].image_bytes:.2f} | {first:.1f} | {med:.1f} | {last:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(outcomes: list, path: Path, title: str, xlabel: str = "seconds since the list update") -> None:
    """Nodes holding the image over time, a step line per scenario (its first run): ``outcomes`` have
    ``scenario``, ``done_at``, ``upstream_bytes`` and ``image_bytes``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    seen = set()
    for o in outcomes:
        if o.scenario in seen:
            continue
        seen.add(o.scenario)
        xs = [0.0, *o.done_at]
        ax.step(
            xs,
            range(len(xs)),
            where="post",
            label=f"{o.scenario} ({o.upstream_bytes / o.image_bytes:.1f}x image upstream)",
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("nodes with the image")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--image-mib", type=int, default=64)
    p.add_argument("--uplink-mbit", type=int, default=400)
    p.add_argument("--jitter", type=float, default=10.0, help="start_jitter of the jitter scenarios, seconds")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--scenarios", help="comma-separated subset of direct,direct-cap,direct-jitter,mirror,mirror-jitter")
    p.add_argument("--name", default="fleet")
    args = p.parse_args()
    if os.geteuid() != 0 or not shutil.which("docker-registry"):
        print("needs root (network namespaces, tc) and docker-registry (bash .ci/install)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    fair_share = args.uplink_mbit * 1_000_000 // 8 // args.nodes
    scenarios = [
        Scenario("direct", "direct"),
        Scenario("direct-cap", f"direct, cap {fair_share / 1e6:.1f} MB/s/node", bandwidth_limit=fair_share),
        Scenario("direct-jitter", f"direct, jitter {args.jitter:.0f} s", start_jitter=args.jitter),
        Scenario("mirror", "mirror", mirror=True),
        Scenario("mirror-jitter", f"mirror, jitter {args.jitter:.0f} s", mirror=True, start_jitter=args.jitter),
        Scenario("mirror-warm", "mirror, already warm", mirror=True, warm=True),
    ]
    if args.scenarios:
        wanted = args.scenarios.split(",")
        scenarios = [s for s in scenarios if s.key in wanted]
    machine = f"{os.cpu_count()} cores, {platform.machine()}, kernel {platform.release().split('-')[0]}"
    outcomes: list[Outcome] = []
    with tempdir("puller-fleet-") as work, Fabric() as fabric:
        os.chmod(work, 0o755)
        up_iface = fabric.host("pf-up", UPSTREAM_IP, egress_mbit=args.uplink_mbit)
        fabric.host("pf-mirror", MIRROR_IP)
        nodes = [(f"pf-n{i}", f"{NET}.{10 + i}") for i in range(args.nodes)]
        for ns, ip in nodes:
            fabric.host(ns, ip)
        image = LayoutWriter(work / "layout").add_image("app", [args.image_mib << 20], seed=7)
        with registry("pf-up", UPSTREAM_IP, work / "upstream"):
            ref = f"{UPSTREAM_IP}:5000/fleet/app:v1"
            skopeo_push(work / "layout", "app", ref)
            size = sum(n for digest, n in image.blobs.items() if digest != image.digest)
            for run in range(args.runs):
                for sc in scenarios:
                    o = run_scenario(fabric, work / f"run{run}", sc, nodes, ref, size, up_iface)
                    print(
                        f"{sc.name}: upstream {o.upstream_bytes / 1e6:.0f} MB, all present after {o.last:.1f} s",
                        flush=True,
                    )
                    outcomes.append(o)
    text = table(outcomes, args, machine)
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{time.strftime('%Y-%m-%d')}-{args.name}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    plot(
        outcomes,
        stem.with_suffix(".png"),
        f"{args.nodes} nodes, {args.image_mib} MiB, upstream {args.uplink_mbit} Mbit/s",
    )
    print(f"wrote {stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
