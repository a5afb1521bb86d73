"""Nodes of a fleet with a P2P mirror, for the Spegel tests and the fleet benchmark: a bridge in the root network
namespace, and per node a network namespace on it with containerd 2.4 (CRI on, so crictl pulls as kubelet does),
Spegel (``spegel registry``, static bootstrap to the other nodes) and the hosts.toml that Spegel's own
``configuration`` command writes. Registries the nodes pull from listen on the bridge's address."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .rig import TEST_BIN, Containerd, CRIConfig

SPEGEL = TEST_BIN / "spegel"  # built by .ci/build-components
SPEGEL_REGISTRY_PORT, SPEGEL_ROUTER_PORT, SPEGEL_METRICS_PORT = 5000, 5001, 9090


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _tbf(dev: str, egress_mbit: int, netns: str | None = None) -> None:
    """Shape what ``dev`` (in ``netns``) sends to ``egress_mbit`` with tbf (a burst of 10 ms)."""
    burst = max(64, egress_mbit * 1000 // 8 // 100)  # kbit
    prefix = ("ip", "netns", "exec", netns) if netns else ()
    _sh(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
        "rate", f"{egress_mbit}mbit", "burst", f"{burst}kb", "latency", "50ms")  # fmt: skip


class Bridge:
    """Bridge ``name`` with ``<net>.1/24``, and network namespaces on it (a veth each). Removes all on exit."""

    def __init__(self, name: str, net: str):
        self.name, self.net = name, net
        self.ip = f"{net}.1"
        self.namespaces: list[str] = []

    def __enter__(self) -> Bridge:
        _sh("ip", "link", "del", self.name, check=False)  # leftovers of an interrupted run
        _sh("ip", "link", "add", self.name, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.ip}/24", "dev", self.name)
        _sh("ip", "link", "set", self.name, "up")
        return self

    def namespace(self, ns: str, ip: str, egress_mbit: int | None = None) -> str:
        """Namespace ``ns`` at ``ip`` on the bridge, its egress shaped to ``egress_mbit``; returns the bridge-side
        interface, whose rx_bytes count what the namespace sent."""
        outer, inner = f"{ns}-h"[:15], f"{ns}-n"[:15]
        _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        _sh("ip", "link", "set", inner, "netns", ns)
        _sh("ip", "link", "set", outer, "master", self.name, "up")
        for cmd in (["ip", "addr", "add", f"{ip}/24", "dev", inner], ["ip", "link", "set", inner, "up"]):
            _sh("ip", "netns", "exec", ns, *cmd)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        if egress_mbit:
            _tbf(inner, egress_mbit, ns)
        return outer

    def shape(self, egress_mbit: int) -> None:
        """Shape what the bridge sends into the namespaces (the root namespace's servers: the upstream)."""
        _tbf(self.name, egress_mbit)

    def __exit__(self, *exc: object) -> None:
        for ns in self.namespaces:
            _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", self.name, check=False)
        self.namespaces.clear()


def rx_bytes(iface: str) -> int:
    return int(Path(f"/sys/class/net/{iface}/statistics/rx_bytes").read_text())


class SpegelNode:
    """One node: namespace ``name`` at ``ip`` on ``bridge``; containerd 2.4 in it (namespace k8s.io is Spegel's);
    Spegel serving its content store on ``ip``:5000 to peers found through ``peers`` (static bootstrap) for
    ``registries`` (host:port, plain HTTP); ``hosts_dir`` as ``spegel configuration`` writes it: each registry
    mirrored by this node's Spegel first, then itself."""

    def __init__(
        self,
        workdir: Path,
        bridge: Bridge,
        name: str,
        ip: str,
        registries: list[str],
        spegel_args: tuple[str, ...] = (),
    ):
        self.workdir, self.bridge, self.name, self.ip = workdir, bridge, name, ip
        self.registries = registries
        self.spegel_args = spegel_args  # more flags of `spegel registry` (e.g. --mirror-resolve-timeout=500ms)
        self.peers: list[str] = []  # static bootstrap addresses of the other nodes (set before entering)
        self.peer_id = spegel_key(workdir / "spegel")
        self.address = f"/ip4/{ip}/tcp/{SPEGEL_ROUTER_PORT}/p2p/{self.peer_id}"
        self.hosts_dir = workdir / "certs.d"
        self.mirror = f"{ip}:{SPEGEL_REGISTRY_PORT}"
        self.ctrd = Containerd(
            workdir / "ctrd", netns=name, version="2.4", cri=CRIConfig("unused.invalid/pause:1", self.hosts_dir)
        )
        self.spegel: subprocess.Popen | None = None
        self.iface = ""

    @property
    def content_dir(self) -> Path:
        return self.ctrd.workdir / "root" / "io.containerd.content.v1.content"

    def __enter__(self) -> SpegelNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.iface = self.bridge.namespace(self.name, self.ip)
        self.ctrd.__enter__()
        subprocess.run(
            [
                str(SPEGEL), "configuration",
                f"--containerd-registry-config-path={self.hosts_dir}",
                f"--mirror-targets=http://{self.mirror}",
                *(f"--mirrored-registries=http://{r}" for r in self.registries),
            ],
            check=True, capture_output=True, env=_spegel_env(),
        )  # fmt: skip
        self.start_spegel()
        return self

    def start_spegel(self) -> None:
        """Spegel on this node (again, after :meth:`kill_spegel`)."""
        with open(self.workdir / "spegel.log", "ab") as log:  # the child keeps its own descriptor
            self.spegel = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.name, str(SPEGEL), "registry",
                    f"--registry-addr=:{SPEGEL_REGISTRY_PORT}",
                    f"--router-addr=:{SPEGEL_ROUTER_PORT}",
                    f"--metrics-addr={self.ip}:{SPEGEL_METRICS_PORT}",
                    f"--containerd-sock={self.ctrd.socket}",
                    "--containerd-namespace=k8s.io",
                    f"--containerd-content-path={self.content_dir}",
                    f"--data-dir={self.workdir / 'spegel'}",
                    "--bootstrap-kind=static",
                    *(f"--static-bootstrap-peers={p}" for p in self.peers),
                    *(f"--mirrored-registries=http://{r}" for r in self.registries),
                    "--debug-web-enabled=false",
                    *self.spegel_args,
                ],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=_spegel_env(),
            )  # fmt: skip

    def shape(self, egress_mbit: int | None) -> None:
        """Limit what this node sends to ``egress_mbit`` (None: unlimited again)."""
        inner = f"{self.name}-n"[:15]
        _sh("ip", "netns", "exec", self.name, "tc", "qdisc", "del", "dev", inner, "root", check=False)
        if egress_mbit:
            _tbf(inner, egress_mbit, self.name)

    def wait_ready(self, timeout: float = 60) -> None:
        """Spegel's /readyz: its router found a peer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.spegel is not None
            if self.spegel.poll() is not None:
                raise RuntimeError(f"spegel on {self.name} exited: {self.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{self.mirror}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"spegel on {self.name} not ready in {timeout} s: {self.log_tail()}")

    def kill_spegel(self) -> None:
        if self.spegel is not None and self.spegel.poll() is None:
            os.killpg(self.spegel.pid, 9)
            self.spegel.wait()

    def log_tail(self) -> str:
        return (self.workdir / "spegel.log").read_text(errors="replace")[-3000:]

    def finds_on_peers(self, repository: str, digest: str) -> bool:
        """Whether this node's Spegel finds ``digest`` on a peer (it answers a HEAD it cannot serve from its own
        store only when a peer advertised the blob), as containerd's pull would ask it."""
        req = urllib.request.Request(
            f"http://{self.mirror}/v2/{repository}/blobs/{digest}?ns={self.registries[0]}", method="HEAD"
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def puller(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """``puller`` in this node's namespace, into its containerd (namespace k8s.io), mirrors from hosts_dir."""
        store = [
            "--store=containerd",
            f"--containerd-address={self.ctrd.socket}",
            f"--hosts-dir={self.hosts_dir}",
            f"--staging-dir={self.workdir / 'staging'}",
        ]
        return subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-m", "puller", *args, *store],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PULLER_CONTAINERD_ROOT": str(self.ctrd.workdir / "root")},
        )  # fmt: skip

    def daemon_settings(self) -> dict:
        """``puller daemon`` settings for this node: its containerd, k8s.io, its hosts.toml."""
        return {
            "store": "containerd",
            "containerd_address": str(self.ctrd.socket),
            "namespace": "k8s.io",
            "containerd_root": str(self.ctrd.workdir / "root"),
            "staging_dir": str(self.workdir / "daemon-staging"),
            "hosts_dir": str(self.hosts_dir),
            "api_allow_unauthenticated": True,  # on the test bridge only
        }

    def __exit__(self, *exc: object) -> None:
        if self.spegel is not None:
            self.spegel.terminate()
            try:
                self.spegel.wait(10)
            except subprocess.TimeoutExpired:
                self.kill_spegel()
        self.ctrd.__exit__(*exc)


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def spegel_key(data_dir: Path) -> str:
    """Write an Ed25519 key where Spegel's ``--data-dir`` keeps it (``private.key``, PKCS#8 PEM) and return its
    libp2p peer ID, which static bootstrap addresses must name: the identity multihash of the protobuf-encoded
    public key (type Ed25519 = 1), base58btc."""
    key = ed25519.Ed25519PrivateKey.generate()
    data_dir.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (data_dir / "private.key").write_bytes(pem)
    (data_dir / "private.key").chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    encoded = bytes([0x08, 0x01, 0x12, len(public)]) + public  # PublicKey{Type: Ed25519, Data: public}
    multihash = bytes([0x00, len(encoded)]) + encoded  # identity hash: the key itself
    n, out = int.from_bytes(multihash, "big"), ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(multihash) - len(multihash.lstrip(b"\0"))) + out


def _spegel_env() -> dict[str, str]:
    """Spegel's preflight refuses to run in a pod of another distro: these nodes are not pods."""
    return {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
