"""``puller warmup``: ask every node's daemon to pull images now, and wait until all of them have them.

This is what a pre-scale step, a Helm pre-upgrade hook or a Job runs. The daemons are found through the
Kubernetes API (running pods matching a label selector), the DNS records of the headless Service, or a list of
URLs. Each is sent ``POST /v1/pull``; with ``--wait`` each is then polled (``GET /v1/images``) and a live
per-node table is shown until every node reports every image present, or the timeout passes (then the lagging
nodes are named and the exit code is 12). A daemon that cannot be reached is asked again at every poll.

Waves (``--first-wave N`` or ``P%``): a P2P mirror such as Spegel serves a blob to peers only once a node holds
it whole, so a fleet asked at once pulls one upstream copy per node. With a first wave, those nodes are asked
first (the first N: by node name through the Kubernetes API, as listed with --endpoints, by address with
--service); the rest are asked once each of them holds the images (or has failed, or cannot be reached), and
then find the blobs on their peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import aiohttp

from .daemon.node import DaemonPod
from .errors import ConfigError, WarmupError
from .reference import Reference

POLL_S = 1.0
WAVE_POLL_S = 0.25  # a first wave is polled more often: the rest wait on it
REQUEST_TIMEOUT_S = 10.0


@dataclass
class NodeStatus:
    pod: DaemonPod
    accepted: bool = False
    error: str | None = None
    images: dict[str, dict] = field(default_factory=dict)  # image key -> the daemon's view of it
    waiting: bool = False  # in a later wave, not asked yet

    def cell(self, key: str) -> str:
        view = self.images.get(key)
        if self.waiting:
            return "next wave"
        if view is None:
            return self.error or "asked"
        state = view["state"]
        done, total = view.get("done"), view.get("total")
        if state == "pulling" and _count(done) and _count(total) and total:
            return f"pulling {100 * min(done, total) // total}%"
        if state == "failed":
            return f"failed: {view.get('error', '')}"[:80]
        return state

    def done(self, keys: list[str]) -> bool:
        return all(self.images.get(k, {}).get("state") == "present" for k in keys)

    def settled(self, keys: list[str]) -> bool:
        """Nothing more to wait for from this node: every image present, or one failed, or it cannot be reached."""
        failed = any(self.images.get(k, {}).get("state") == "failed" for k in keys)
        return self.done(keys) or failed or (not self.accepted and self.error is not None)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def image_key(reference: str, platform: str | None) -> str:
    return f"{reference}|{platform}" if platform else reference


async def resolve_service(name: str, port: int) -> list[DaemonPod]:
    """The headless Service's DNS records: one address per ready daemon pod."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise WarmupError(f"cannot resolve service {name}: {e.strerror}") from None
    addrs = sorted({str(info[4][0]) for info in infos})
    return [DaemonPod(a, f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}") for a in addrs]


def first_wave_size(spec: str, nodes: int) -> int:
    """How many of ``nodes`` are in the first wave: ``spec`` is a count (``2``) or a share (``10%``, rounded
    up); at least one."""
    text = spec.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return max(1, math.ceil(nodes * share / 100))
        count = int(text)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise ConfigError(f"--first-wave wants a count of nodes (2) or a share (10%), not {spec!r}") from None


class Warmup:
    def __init__(
        self,
        pods: list[DaemonPod],
        images: list[str],
        platform: str | None,
        token: str | None,
        first_wave: int | None = None,
    ):
        refs = [str(Reference.parse(i)) for i in images]  # InvalidReference before any daemon is asked
        self.entries = [{"reference": r, "platform": platform} if platform else r for r in refs]
        self.keys = [image_key(r, platform) for r in refs]
        self.nodes = [NodeStatus(p) for p in pods]
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        if first_wave is not None and first_wave < len(self.nodes):  # else one wave: every node at once
            self.waves = [self.nodes[:first_wave], self.nodes[first_wave:]]  # in the order ``pods`` came
            for node in self.waves[1]:
                node.waiting = True
        else:
            self.waves = [self.nodes]

    async def ask(self, session: aiohttp.ClientSession, node: NodeStatus) -> None:
        try:
            async with session.post(f"{node.pod.url}/v1/pull", json={"images": self.entries}) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 202:
                    why = body.get("error", body) if isinstance(body, dict) else body
                    node.error = f"HTTP {resp.status}: {str(why)[:200]}"
                    return
        except (TimeoutError, aiohttp.ClientError, ValueError, RecursionError) as e:
            node.error = str(e)[:200] or type(e).__name__
            return
        if self._take(node, body):
            node.accepted, node.error = True, None

    async def poll(self, session: aiohttp.ClientSession, node: NodeStatus) -> None:
        if not node.accepted:
            await self.ask(session, node)
            return
        try:
            async with session.get(f"{node.pod.url}/v1/images") as resp:
                body = await resp.json(content_type=None)
                resp.raise_for_status()
        except (TimeoutError, aiohttp.ClientError, ValueError, RecursionError) as e:
            node.error = str(e)[:200] or type(e).__name__
            node.images.clear()
            node.accepted = False  # a restarted daemon may have forgotten the request: ask again
            return
        if self._take(node, body):
            node.error = None

    def _take(self, node: NodeStatus, body: object) -> bool:
        """Take a daemon's answer; False (and the node's error says so) when it is not of the API's shape."""
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(images, list):
            node.error = "the daemon's answer is not of the API's shape"
            node.images.clear()
            return False
        views = {
            image_key(v["reference"], v.get("platform")): v
            for v in images
            if isinstance(v, dict)
            and isinstance(v.get("reference"), str)
            and isinstance(v.get("platform"), str | None)
            and isinstance(v.get("state"), str)
        }
        node.images = {k: views[k] for k in self.keys if k in views}
        if isinstance(body.get("node"), str) and body["node"]:
            node.pod = DaemonPod(body["node"][:253], node.pod.url)
        return True

    def describe(self, nodes: list[NodeStatus]) -> str:
        """``node (what it lacks), ...`` for an error message."""
        parts = []
        for n in nodes:
            cells = sorted({n.cell(k) for k in self.keys if n.images.get(k, {}).get("state") != "present"})
            parts.append(f"{n.pod.node} ({'; '.join(cells)})")
        return ", ".join(parts)

    def lagging(self) -> list[NodeStatus]:
        return [n for n in self.nodes if not n.done(self.keys)]

    async def run(self, wait: bool, timeout: float, show) -> None:
        deadline = time.monotonic() + timeout
        client_timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=client_timeout, headers=self.headers) as session:
            for wave, later in zip(self.waves, self.waves[1:], strict=False):
                await asyncio.gather(*(self.ask(session, n) for n in wave))
                show(self)
                while not all(n.settled(self.keys) for n in wave):
                    if time.monotonic() >= deadline:
                        unsettled = [n for n in wave if not n.settled(self.keys)]
                        raise WarmupError(
                            f"timed out after {timeout:.0f} s in the first wave: {self.describe(unsettled)}"
                        )
                    await asyncio.sleep(WAVE_POLL_S)
                    await asyncio.gather(*(self.poll(session, n) for n in wave if not n.settled(self.keys)))
                    show(self)
                for node in later:
                    node.waiting = False
            await asyncio.gather(*(self.ask(session, n) for n in self.waves[-1]))
            show(self)
            if not wait:
                refused = [n for n in self.nodes if not n.accepted]
                if refused:
                    raise WarmupError(f"{len(refused)} daemon(s) did not take the request: {self.describe(refused)}")
                return
            while self.lagging():
                if time.monotonic() >= deadline:
                    raise WarmupError(f"timed out after {timeout:.0f} s; lagging: {self.describe(self.lagging())}")
                await asyncio.sleep(POLL_S)
                await asyncio.gather(*(self.poll(session, n) for n in self.lagging()))
                show(self)


def table_lines(w: Warmup) -> list[str]:
    """A plain-text table: one row per node, one column per image."""
    header = ["NODE", *(k.split("|")[0] for k in w.keys)]
    rows = [[n.pod.node, *(n.cell(k) for k in w.keys)] for n in w.nodes]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [header, *rows]]


class PlainDisplay:
    """Prints a row whenever a node's row changes; the full table at the end."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def __call__(self, w: Warmup) -> None:
        lines = table_lines(w)
        for line, node in zip(lines[1:], w.nodes, strict=True):
            if self._last.get(node.pod.url) != line:
                self._last[node.pod.url] = line
                print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def display(mode: str) -> Iterator[Callable[[Warmup], None]]:
    """A live table on a TTY (rich), changed rows as plain lines on stderr otherwise; at the end, success or not,
    the final table on stdout."""
    last: list[Warmup] = []
    live = None
    if mode == "tty":
        from rich.live import Live

        live = Live(refresh_per_second=4, transient=True)
        live.start()
    plain = PlainDisplay()

    def show(w: Warmup) -> None:
        last[:] = [w]
        if live is not None:
            live.update(_rich_table(w))
        else:
            plain(w)

    try:
        yield show
    finally:
        if live is not None:
            live.stop()
        if last:
            print("\n".join(table_lines(last[0])), flush=True)


def _rich_table(w: Warmup):
    from rich.table import Table

    table = Table("NODE", *(k.split("|")[0] for k in w.keys))
    for n in w.nodes:
        table.add_row(n.pod.node, *(n.cell(k) for k in w.keys))
    return table
