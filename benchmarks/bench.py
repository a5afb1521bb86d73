"""puller against its peers on one rig, in one run: a table, a JSON record and a PNG plot.

    python3 benchmarks/bench.py [--runs 3] [--rate-mbps 8] [--link-mbit 1024] [--images fat256,layers20]
                                [--rss] [--out benchmarks/results]

The rig: the CNCF distribution registry redirects blob GETs (307) to nginx serving its storage, with
``limit_rate`` per connection (the registry + blob CDN shape); an HTB class on loopback limits everything the
CDN and registry send to one link (default 1024 Mbit/s = 128 MB/s, so one connection gets 1/16 of the link).

Peers, measured alternately in each run (the order rotates), medians reported:
  puller          puller pull REF --store oci:DIR                    (defaults: 32 connections)
  skopeo          skopeo copy docker://REF oci:DIR:x
  ctr             ctr content fetch --plain-http REF (a private containerd; its CPU is counted too)
  ctr-pull        ctr images pull --plain-http REF: fetch and unpack, containerd 1.6 (opt-in: --tools)
  puller-ctrd     puller pull --store containerd: fetch, stream into containerd 1.6 and unpack (opt-in: --tools)
  ctr2-pull@CFG   ctr images pull of containerd 2.2 (its transfer service), with transfer settings CFG (a key of
                  TRANSFER; plain ctr2-pull: --ctr2-config) (opt-in: --tools)
  puller-ctrd2    puller pull --store containerd into containerd 2.2 (parallel unpack) (opt-in: --tools)
  oras-py         oras.client.OrasClient(...).pull(REF) (layers one after another, one stream each)
  curl-1          curl, one stream per blob, one blob after another (what a single-stream puller can do)
  curl-16         curl --parallel, each blob cut into 16 ranges, 16 at a time: the physical reference
  curl-sync       curl-16, then sync: the bytes made durable, as puller makes them
  sha256          openssl dgst -sha256 of the blobs in the registry's storage (in the page cache): with curl-sync's,
                  the CPU floor of a verified pull (the table's "x floor" column for puller's tools)
  TOOL~REV        a puller tool (puller, puller-ctrd, puller-ctrd2) as of git revision REV: before/after tables

Needs root (tc), docker-registry, nginx, skopeo, curl; containerd and oras-py are used when installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.rig_net import LoopbackLink, VethLink
from tests.rig import Containerd, LayoutWriter, Nginx, Registry, skopeo_push, tempdir

MIB = 1 << 20
IMAGES = {
    "tiny": [256 * 1024],  # a pull's fixed cost: start-up, resolve, the store's calls
    "fat256": [256 * MIB],
    # 20 layers of mixed sizes, 512 MiB in all: two big, a few medium, many small, as real images are.
    "layers20": [
        128 * MIB,
        96 * MIB,
        64 * MIB,
        48 * MIB,
        40 * MIB,
        32 * MIB,
        24 * MIB,
        20 * MIB,
        16 * MIB,
        12 * MIB,
        8 * MIB,
        8 * MIB,
        6 * MIB,
        4 * MIB,
        2 * MIB,
        2 * MIB,
        1 * MIB,
        1 * MIB,
        512 * 1024,
        512 * 1024,
    ],
    "fat1g": [1024 * MIB],
    "fat2g": [2048 * MIB],
    "fat4g": [4096 * MIB],
    # 200 layers, 512 MiB in all, sizes falling off as 1/rank (a few big layers, a long tail of small ones).
    "layers200": [max(64 * 1024, int(512 * MIB / (i + 1) / sum(1 / (k + 1) for k in range(200)))) for i in range(200)],
}
RSS_SERIES = ("fat256", "fat1g", "fat2g", "fat4g")  # --rss: peak RSS must not grow with the image
CURL_RANGES = 16
KNOWN_TOOLS = (
    "curl-16",
    "curl-sync",
    "puller",
    "ctr",
    "skopeo",
    "curl-1",
    "oras-py",
    "ctr-pull",
    "puller-ctrd",
    "ctr2-pull",
    "puller-ctrd2",
    "sha256",
)
# containerd 2.2's transfer service (what `ctr images pull` uses): max_concurrent_downloads (also the ranges per
# layer when concurrent_layer_fetch_buffer, the bytes per range, is set), max_concurrent_unpacks (parallel unpack
# where the snapshotter can rebase). "default" is containerd's own default.
TRANSFER = {
    "default": (3, 0, 1),
    "d16-c8m-u1": (16, 8 * MIB, 1),
    "d32-c8m-u4": (32, 8 * MIB, 4),
    "d32-c32m-u4": (32, 32 * MIB, 4),
    "d64-c4m-u8": (64, 4 * MIB, 8),
}


def transfer_config(name: str) -> str:
    downloads, buffer, unpacks = TRANSFER[name]
    return (
        "[plugins.'io.containerd.transfer.v1.local']\n"
        f"  max_concurrent_downloads = {downloads}\n"
        f"  concurrent_layer_fetch_buffer = {buffer}\n"
        f"  max_concurrent_unpacks = {unpacks}\n"
    )


def ctrd_version(tool: str) -> str | None:
    """The containerd a tool needs (a fresh one per sample), or None."""
    tool = tool.partition("~")[0]
    if tool in ("ctr", "ctr-pull", "puller-ctrd"):
        return "1.6"
    if tool.startswith("ctr2-pull") or tool == "puller-ctrd2":
        return "2.2"
    return None


def known_tool(tool: str) -> bool:
    tool, _, rev = tool.partition("~")
    if rev and not tool.startswith("puller"):
        return False
    name, _, cfg = tool.partition("@")
    return name in KNOWN_TOOLS and (not cfg or (name == "ctr2-pull" and cfg in TRANSFER))


@dataclass
class Sample:
    seconds: float
    cpu: float  # the tool's and, for tools that hand bytes to containerd, containerd's
    rss_mb: float
    inner_seconds: float | None = None  # puller's own figure (resolve to commit), without interpreter start
    own_cpu: float = 0.0  # the tool's process alone


@dataclass
class Result:
    tool: str
    image: str
    bytes: int
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def run_measured(cmd: list[str], extra_cpu=None) -> Sample:
    """Run ``cmd``; wall seconds, CPU seconds (user+sys, plus ``extra_cpu()`` delta) and its peak RSS.

    Peak RSS is read from /proc/PID/status VmHWM while it runs: wait4's ru_maxrss would carry over the RSS of
    this (forking) Python process into every child. It is the sum of the peaks of the process and of every process
    it starts (puller's applier process), an upper bound of their peak together; a child is counted once it runs
    its own program (before its exec it shares or copies the parent's pages, and its VmHWM is the parent's).
    wait4's CPU times count the children it waited for."""
    cpu0 = extra_cpu() if extra_cpu else 0.0
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outs: list[bytes] = []
    out_reader = threading.Thread(target=lambda: outs.append(proc.stdout.read()), daemon=True)
    out_reader.start()
    peaks: dict[int, int] = {}  # of the process and each of its descendants (puller's applier process)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            for pid in _tree(proc.pid):
                if pid == proc.pid or _cmdline(pid) != _cmdline(proc.pid):  # a child not yet exec'd is a copy
                    peaks[pid] = max(peaks.get(pid, 0), vm_hwm_kb(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    stop.set()
    watcher.join()
    out_reader.join()
    proc.stderr.close()
    proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err[-500:]}")
    own = usage.ru_utime + usage.ru_stime
    cpu = own + ((extra_cpu() - cpu0) if extra_cpu else 0.0)
    last = outs[0].strip().rsplit(b"\n", 1)[-1] if outs and outs[0].strip() else b""
    inner = json.loads(last)["seconds"] if last.startswith(b'{"event":"done"') else None
    return Sample(seconds, cpu, sum(peaks.values()) / 1024, inner, own)


def add_bench_image(lw: LayoutWriter, name: str) -> None:
    """Image ``name`` into the layout: one of realistic.py's recipes (this machine's files), or of IMAGES."""
    from benchmarks.realistic import RECIPES, add_real_image

    if name in RECIPES:
        add_real_image(lw, name)
    else:
        lw.add_image(name, IMAGES[name], seed=sum(name.encode()))


def python_as_installed(tree: Path, python: str = sys.executable) -> list[str]:
    """The command that starts ``python`` for puller from ``tree``, as a wheel install runs it: without this
    machine's .pth files (-S). The development install's editable finder costs about 11 ms at every start, and
    this sandbox's CA hook about 9; the image in deploy/ has neither. This interpreter's site-packages follow the
    tree on the path, for the dependencies (``python`` must be the same minor version); -P keeps the working
    directory off it."""
    paths = sysconfig.get_paths()
    path = os.pathsep.join(dict.fromkeys([str(tree), paths["purelib"], paths["platlib"]]))
    return ["env", f"PYTHONPATH={path}", python, "-S", "-P"]


REPO = Path(__file__).resolve().parent.parent
PYTHON = python_as_installed(REPO)  # set again by --python
PULLER = [*PYTHON, "-m", "puller"]  # puller's command line, from this checkout


def use_interpreter(python: str) -> str:
    """Run puller's tools on ``python`` (see --python); returns its version. The dependencies come from this
    interpreter's site-packages, so it must be the same minor version."""
    global PYTHON, PULLER
    out = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True)
    version = out.stdout.strip()
    minor = ".".join(map(str, sys.version_info[:2]))
    if out.returncode != 0 or version.rsplit(".", 1)[0] != minor:
        raise SystemExit(f"--python {python}: needs Python {minor}, got {version or out.stderr.strip()}")
    PYTHON = python_as_installed(REPO, python)
    PULLER = [*PYTHON, "-m", "puller"]
    return version


def use_bytecode(work: Path) -> None:
    """Python tools run from compiled bytecode, as an installed package does (pip compiles it; the image in
    deploy/ is built so), even where PYTHONDONTWRITEBYTECODE is set: else every run of puller would compile its
    own modules first (about 0.1 CPU-s here), a cost no node pays. The bytecode goes under ``work``."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    compile_bytecode(REPO / "puller")
    # The dependencies' bytecode lands under the prefix too, here and not in the first measured run.
    subprocess.run([*PULLER, "--version"], check=True, capture_output=True)


def compile_bytecode(package: Path) -> None:
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (each thread's children, from /proc)."""
    found, i = [pid], 0
    while i < len(found):
        for task in Path(f"/proc/{found[i]}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                found.extend(int(child) for child in task.read_text().split())
        i += 1
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def vm_hwm_kb(pid: int) -> int:
    """A process's peak RSS so far (VmHWM), in KiB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Bench:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.veth: VethLink | None = None

    def checkout(self, rev: str) -> Path:
        """puller/ as of git revision ``rev``, exported once under the work directory."""
        where = self.work / f"rev-{rev}"
        if not where.exists():
            where.mkdir()
            repo = Path(__file__).resolve().parent.parent
            archive = subprocess.run(
                ["git", "-C", str(repo), "archive", rev, "puller"], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
            compile_bytecode(where / "puller")
        return where

    def blob_urls(self, reg: Registry, cdn: Nginx, repo: str) -> list[tuple[str, int]]:
        _, manifest = reg.manifest(repo, "v1")
        blobs = [manifest["config"], *manifest["layers"]]
        return [
            (f"{cdn.url}/docker/registry/v2/blobs/sha256/{d['digest'][7:9]}/{d['digest'][7:]}/data", d["size"])
            for d in blobs
        ]

    def commands(self, tool: str, ref: str, urls: list[tuple[str, int]], out: Path, ctrd: Containerd | None):
        tool, _, rev = tool.partition("~")
        if rev:  # puller as of git revision REV, side by side with the working tree's
            cmd, extra = self.commands(tool, ref, urls, out, ctrd)
            assert cmd[: len(PYTHON)] == PYTHON
            return [*python_as_installed(self.checkout(rev), self.args.python), *cmd[len(PYTHON) :]], extra
        if tool == "puller":
            return [*PULLER, "pull", ref, "--store", f"oci:{out}", "--json", "--plain-http"], None
        if tool == "skopeo":
            return ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}", f"oci:{out}:x"], None
        if tool == "ctr":
            assert ctrd
            return ctrd.ctr("-n", "bench", "content", "fetch", "--plain-http", ref), ctrd.cpu_seconds
        if tool in ("puller-ctrd", "puller-ctrd2"):
            assert ctrd
            return [
                *PULLER,
                "pull",
                ref,
                "--store",
                "containerd",
                "--json",
                "--containerd-address",
                str(ctrd.socket),
                "--namespace",
                "bench",
                "--staging-dir",
                str(out / "staging"),
                "--plain-http",
            ], ctrd.cpu_seconds
        if tool == "ctr-pull" or tool.startswith("ctr2-pull"):
            assert ctrd
            return ctrd.ctr("-n", "bench", "images", "pull", "--plain-http", ref), ctrd.cpu_seconds
        if tool == "oras-py":
            host = ref.partition("/")[0]
            code = (
                "import oras.client,sys; oras.client.OrasClient(hostname=sys.argv[1], insecure=True)"
                ".pull(target=sys.argv[2], outdir=sys.argv[3])"
            )
            return [sys.executable, "-c", code, host, ref, str(out)], None
        if tool == "curl-1":
            cmd = ["curl", "-sSf"]
            for i, (url, _) in enumerate(urls):
                cmd += ["-o", str(out / f"b{i}"), url]
            return cmd, None
        if tool == "sha256":  # what verifying the bytes costs at least: OpenSSL's sha256 over them
            storage = self.work / "registry" / "storage"
            return [
                "openssl",
                "dgst",
                "-sha256",
                *(str(storage / urlsplit(url).path.lstrip("/")) for url, _ in urls),
            ], None
        if tool == "curl-sync":  # curl-16, then the data made durable as puller makes it (fsync before rename)
            curl, _ = self.commands("curl-16", ref, urls, out, ctrd)
            return ["sh", "-c", f"{shlex.join(curl)} && sync"], None
        if tool == "curl-16":
            cmd = [
                "curl",
                "-sSf",
                "--no-progress-meter",
                "-Z",
                "--parallel-immediate",
                "--parallel-max",
                str(CURL_RANGES),
            ]
            first = True
            for i, (url, size) in enumerate(urls):
                per = max(MIB, -(-size // CURL_RANGES))
                for j, start in enumerate(range(0, size, per)):
                    if not first:
                        cmd.append("-:")
                    first = False
                    cmd += ["-r", f"{start}-{min(size, start + per) - 1}", "-o", str(out / f"b{i}-{j}"), url]
            return cmd, None
        raise ValueError(tool)

    def run(self) -> tuple[list[Result], dict]:
        a = self.args
        work = self.work
        images = a.images.split(",")
        tools = ["curl-16", "puller", "skopeo", "curl-1"]
        if Containerd.available():
            tools.insert(2, "ctr")
        try:
            import oras.client  # noqa: F401

            tools.append("oras-py")
        except ImportError:
            pass
        if a.tools:
            tools = a.tools.split(",")
            unknown = {t for t in tools if not known_tool(t)}
            if unknown:
                raise SystemExit(f"unknown tools {sorted(unknown)}; known: {', '.join(KNOWN_TOOLS)}")
        generate = list(dict.fromkeys(images + (list(RSS_SERIES) if a.rss else [])))
        print(f"generating images {generate} ...", flush=True)
        lw = LayoutWriter(work / "layout")
        for name in generate:
            add_bench_image(lw, name)
        with contextlib.ExitStack() as stack:
            veth = None
            if a.link == "veth":
                veth = stack.enter_context(VethLink(a.link_mbit))
                if not veth.ok:
                    print(f"warning: no veth link ({veth.error}); measuring on loopback", file=sys.stderr)
                    veth = None
            self.veth = veth
            bind = veth.server_ip if veth else "127.0.0.1"
            cdn = Nginx(work / "nginx", work / "registry" / "storage", limit_rate=int(a.rate_mbps * 1e6), bind=bind)
            stack.enter_context(cdn)
            reg = stack.enter_context(Registry(work / "registry", redirect_base=cdn.url + "/", bind=bind))
            for name in generate:
                skopeo_push(work / "layout", name, f"{reg.host}/bench/{name}:v1")
            link = None
            if a.link == "lo" and a.link_mbit:
                link = stack.enter_context(LoopbackLink(a.link_mbit, [cdn.port, reg.port]))
                if not link.ok:
                    print(f"warning: no link limit ({link.error})", file=sys.stderr)
            results = self.matrix(reg, cdn, images, tools)
            if link:
                link.__exit__()
            rss = self.rss_series(reg, cdn) if a.rss else {}  # from this namespace: unshaped, the worst case
            shaped = (veth is not None and a.link_mbit) or (link is not None and link.ok)
            rig = {
                "rate_mbps_per_connection": a.rate_mbps,
                "link": "veth, MTU 1500" if veth else "loopback",
                "link_mbit": a.link_mbit if shaped else None,
                "runs": a.runs,
                "rss": rss,
            }
        return results, rig

    def matrix(self, reg, cdn, images, tools) -> list[Result]:
        results: dict[tuple[str, str], Result] = {}
        for run in range(self.args.runs):
            for name in images:
                ref = f"{reg.host}/bench/{name}:v1"
                urls = self.blob_urls(reg, cdn, f"bench/{name}")
                total = sum(size for _, size in urls)
                order = tools[run % len(tools) :] + tools[: run % len(tools)]
                for tool in order:
                    out = self.work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    with contextlib.ExitStack() as stack:
                        # containerd shares content across namespaces: a fresh one per sample, started untimed.
                        version = ctrd_version(tool)
                        netns = self.veth.ns if self.veth else None
                        ctrd = None
                        if version:
                            cfg = tool.partition("@")[2] or self.args.ctr2_config
                            extra = transfer_config(cfg) if version != "1.6" else ""
                            ctrd = stack.enter_context(Containerd(self.work / "ctrd", netns, version, None, extra))
                        cmd, extra = self.commands(tool, ref, urls, out, ctrd)
                        # ctr asks containerd (in the clients' namespace) to fetch; every other tool fetches itself
                        fetches_itself = tool not in ("ctr", "ctr-pull") and not tool.startswith("ctr2-pull")
                        prefix = self.veth.prefix() if self.veth and fetches_itself else []
                        if self.args.wrap and tool.startswith("puller"):  # a profiler, say
                            label = f"{tool.replace('~', '-')}-{name}-{run + 1}"
                            prefix += [part.replace("{run}", label) for part in shlex.split(self.args.wrap)]
                        sample = run_measured([*prefix, *cmd], extra)
                    shutil.rmtree(self.work / "ctrd", ignore_errors=True)
                    results.setdefault((tool, name), Result(tool, name, total)).samples.append(sample)
                    print(
                        f"run {run + 1} {name:9} {tool:8} {sample.seconds:7.2f} s "
                        f"{total / 1e6 / sample.seconds:8.1f} MB/s  cpu {sample.cpu:6.2f} s  "
                        f"rss {sample.rss_mb:6.1f} MB",
                        flush=True,
                    )
                    shutil.rmtree(out, ignore_errors=True)
        return list(results.values())

    def rss_series(self, reg, cdn) -> dict[str, float]:
        """puller's peak RSS for one-layer images from 256 MiB to 4 GiB (loopback: the link limit does not apply)."""
        out = {}
        for name in RSS_SERIES:
            store = self.work / "rss-store"
            shutil.rmtree(store, ignore_errors=True)
            s = run_measured(
                [
                    *PULLER,
                    "pull",
                    f"{reg.host}/bench/{name}:v1",
                    "--store",
                    f"oci:{store}",
                    "--json",
                    "--plain-http",
                ]
            )
            shutil.rmtree(store, ignore_errors=True)
            out[name] = round(s.rss_mb, 1)
            print(f"rss {name}: {s.rss_mb:.1f} MB ({s.seconds:.1f} s)", flush=True)
        return out


def floor_cpu(rs: list[Result]) -> float | None:
    """CPU seconds of the floor: curl-sync (fetch, write, make durable) plus sha256 (verify), when both ran."""
    parts = [next((r for r in rs if r.tool == t), None) for t in ("curl-sync", "sha256")]
    return sum(r.median("cpu") for r in parts if r) if all(parts) else None


def table(results: list[Result], rig: dict) -> str:
    by_image: dict[str, list[Result]] = {}
    for r in results:
        by_image.setdefault(r.image, []).append(r)
    lines = []
    link_mb = rig["link_mbit"] / 8 if rig["link_mbit"] else None
    for image, rs in by_image.items():
        # the reference: curl-16 where it ran, else curl-sync (loopback: curl's 16 ranges, then sync)
        ref = next((r for t in ("curl-16", "curl-sync") for r in rs if r.tool == t), None)
        pul = next((r for r in rs if r.tool == "puller"), None)
        floor = floor_cpu(rs)
        lines.append(f"\n{image}: {rs[0].bytes / 1e6:.0f} MB, {len(rs[0].samples)} runs, medians")
        if floor:
            lines.append(f"CPU floor (curl-sync + sha256, medians of this run): {floor / (rs[0].bytes / 1e9):.2f} s/GB")
        lines.append(
            f"| tool | seconds | MB/s | vs {ref.tool if ref else 'curl-16'} | puller is x faster | of link | CPU s/GB "
            "| own CPU s/GB | x floor | peak RSS MB |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(rs, key=lambda r: r.median("seconds")):
            sec = r.median("seconds")
            mbps = r.bytes / 1e6 / sec
            vs_ref = f"{ref.median('seconds') / sec:.2f}" if ref else "-"
            faster = f"{sec / pul.median('seconds'):.1f}" if pul else "-"
            of_link = f"{mbps / link_mb:.2f}" if link_mb else "-"
            x_floor = f"{r.median('cpu') / floor:.2f}" if floor and r.tool.startswith("puller") else "-"
            lines.append(
                f"| {r.tool} | {sec:.2f} | {mbps:.1f} | {vs_ref} | {faster} | {of_link} | "
                f"{r.median('cpu') / (r.bytes / 1e9):.2f} | {r.median('own_cpu') / (r.bytes / 1e9):.2f} | "
                f"{x_floor} | {r.median('rss_mb'):.0f} |"
            )
            if ref and r.samples[0].inner_seconds:
                inner = statistics.median(s.inner_seconds or 0 for s in r.samples)
                of_link_inner = f"{r.bytes / 1e6 / inner / link_mb:.2f}" if link_mb else "-"
                lines.append(
                    f"| {r.tool} (in-process) | {inner:.2f} | {r.bytes / 1e6 / inner:.1f} | "
                    f"{ref.median('seconds') / inner:.2f} | | {of_link_inner} | | | | |"
                )
    if rig.get("rss"):
        lines.append("\npuller peak RSS by image size: " + ", ".join(f"{k} {v} MB" for k, v in rig["rss"].items()))
    return "\n".join(lines)


def plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = list(dict.fromkeys(r.image for r in results))
    tools = list(dict.fromkeys(r.tool for r in results))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        vals = [
            next((r.bytes / 1e6 / r.median("seconds") for r in results if r.tool == tool and r.image == im), 0)
            for im in images
        ]
        ax.bar([x + i * width for x in range(len(images))], vals, width, label=tool)
    ax.set_xticks([x + width * (len(tools) - 1) / 2 for x in range(len(images))], images)
    ax.set_ylabel("MB/s (median)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM tears the rig down like Ctrl-C
    ap = argparse.ArgumentParser(description="puller against its peers")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate-mbps", type=float, default=8.0, help="per-connection CDN cap, MB/s")
    ap.add_argument("--link-mbit", type=int, default=1024, help="link limit, Mbit/s (0 = none)")
    ap.add_argument(
        "--link",
        choices=("veth", "lo"),
        default="veth",
        help="veth: clients in their own network namespace, servers across a shaped veth (MTU 1500); "
        "lo: everything on loopback, an HTB class on lo shapes the servers' ports",
    )
    ap.add_argument("--images", default="fat256,layers20")
    ap.add_argument("--tools", default="", help="comma-separated subset")
    ap.add_argument("--ctr2-config", default="d32-c8m-u4", choices=sorted(TRANSFER), help="for plain ctr2-pull")
    ap.add_argument(
        "--wrap",
        default="",
        help="run puller's tools under this command; {run} names the run, e.g. "
        "'py-spy record --format raw -o /tmp/{run}.txt --'",
    )
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter puller's tools run on (default: this one). The image in deploy/ runs CPython built "
        "with PGO and LTO (python:3.11-slim); an unoptimised build (pyenv's default) starts puller about 15 ms slower",
    )
    ap.add_argument("--rss", action="store_true", help="also measure puller's peak RSS from 256 MiB to 4 GiB")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="pullers", help="file name stem of the results")
    args = ap.parse_args()
    python_version = use_interpreter(args.python)
    if os.geteuid() != 0 and args.link_mbit:
        print("warning: not root, no link limit", file=sys.stderr)
    with tempdir("puller-bench-") as work:
        work.chmod(0o755)
        use_bytecode(work)
        results, rig = Bench(args, work).run()
    rig["python"] = f"{args.python} ({python_version})"
    machine = f"{os.cpu_count()} cores, {platform.machine()}, kernel {platform.release()}"
    stamp = time.strftime("%Y-%m-%d")
    title = (
        f"{stamp}, {machine}; CDN {args.rate_mbps:g} MB/s per connection, {rig['link']} link "
        f"{rig['link_mbit'] or 'unlimited'} Mbit/s; puller on Python {python_version}"
    )
    text = f"# {title}\n{table(results, rig)}\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stamp}-{args.name}.md").write_text(text)
    (out / f"{stamp}-{args.name}.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "rig": rig,
                "results": [
                    {"tool": r.tool, "image": r.image, "bytes": r.bytes, "samples": [s.__dict__ for s in r.samples]}
                    for r in results
                ],
            },
            indent=1,
        )
    )
    try:
        plot(results, out / f"{stamp}-{args.name}.png", title)
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
