"""A Kubernetes control plane from real parts, started by the tests: etcd and kube-apiserver of a pinned release
(each built by .ci/build-components into /opt/puller-test/bin/kubernetes-<minor>), on loopback, with certificates
and the service-account key made here. ``kubectl`` talks to it as cluster admin, or as any ServiceAccount with a
token from the TokenRequest API.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .rig import TEST_BIN, TestCA, pem_private_key

# The oldest and the newest supported release: .ci/kube/<minor>/go.mod pins each
KUBE_RELEASES = {minor: TEST_BIN / f"kubernetes-{minor}" for minor in ("1.35", "1.37")}
KUBE_BINS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")
LOOPBACK_CNI = {"cniVersion": "1.0.0", "name": "puller-test", "plugins": [{"type": "loopback"}]}
BRIDGE = "pullertest0"
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"  # the ClusterIP of Service default/kubernetes: what pods' in-cluster clients dial


def bridge_cni(subnet: str, data_dir: Path, default_route: bool = False) -> dict:
    """A CNI configuration giving each pod its own network namespace and an address of ``subnet`` on a bridge the
    host reaches (no masquerade, no route out): servers in a pod's namespace are reachable from the node only.
    ``default_route``: pods route everything through the node (then :meth:`ControlPlane.served_on` gives them
    the API server at its ClusterIP)."""
    ipam = {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": str(data_dir)}
    bridge = {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "isDefaultGateway": default_route}
    bridge.update(ipMasq=False, ipam=ipam)
    return {"cniVersion": "1.0.0", "name": "puller-test-bridge", "plugins": [bridge]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Certificates:
    """A CA, the API server's serving certificate, an admin client certificate and the service-account keys."""

    def __init__(self, where: Path):
        self._ca = TestCA(where, "puller-test-ca")
        self.ca = self._ca.cert
        names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
        ips = ("127.0.0.1", API_SERVICE_IP)
        sans = [*(x509.DNSName(n) for n in names), *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)]
        self.server, self.server_key = self._ca.issue("apiserver", "kube-apiserver", sans=sans)
        self.admin, self.admin_key = self._ca.issue("admin", "puller-test-admin", org="system:masters")
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key = where / "sa-key.pem"
        self.sa_key.write_bytes(pem_private_key(sa_key))
        self.sa_key.chmod(0o600)
        self.sa_pub = where / "sa.pub"
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        self.sa_pub.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM, spki))

    def client(self, name: str, cn: str, org: str) -> tuple[Path, Path]:
        """A client certificate for user ``cn`` in group ``org`` (e.g. a node: system:node:NAME, system:nodes)."""
        return self._ca.issue(name, cn, org)


class ControlPlane:
    """etcd + kube-apiserver of ``release`` (a key of :data:`KUBE_RELEASES`) under ``workdir``; use as a context
    manager."""

    def __init__(self, workdir: Path, release: str):
        self.workdir = workdir
        self.release = release
        self.bin = KUBE_RELEASES[release]  # kube-apiserver, the other control-plane parts, kubelet and kubectl
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = workdir / "admin.kubeconfig"

    def __enter__(self) -> ControlPlane:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        certs = self.certs = Certificates(w / "pki")
        client, peer = free_port(), free_port()
        etcd = f"http://127.0.0.1:{client}"
        try:
            self._start(
                "etcd",
                [
                    str(TEST_BIN / "etcd"),
                    f"--data-dir={w / 'etcd'}",
                    f"--listen-client-urls={etcd}",
                    f"--advertise-client-urls={etcd}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                    f"--initial-cluster=default=http://127.0.0.1:{peer}",
                    "--log-level=warn",
                ],
            )
            self._start(
                "kube-apiserver",
                [
                    str(self.bin / "kube-apiserver"),
                    f"--etcd-servers={etcd}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={self.port}",
                    f"--cert-dir={w / 'apiserver-certs'}",
                    f"--tls-cert-file={certs.server}",
                    f"--tls-private-key-file={certs.server_key}",
                    f"--client-ca-file={certs.ca}",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-account-key-file={certs.sa_pub}",
                    f"--service-account-signing-key-file={certs.sa_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--authorization-mode=Node,RBAC",
                    # 1.37 refuses a loopback advertise address for the endpoints of the kubernetes Service, which
                    # nothing here reaches (no kube-proxy): that Service gets no endpoints
                    "--endpoint-reconciler-type=none",
                    "--v=1",
                ],
            )
            self.kubeconfig.write_text(
                self._kubeconfig("admin", {"client-certificate": str(certs.admin), "client-key": str(certs.admin_key)})
            )
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    @contextlib.contextmanager
    def served_on(self, bridge: str) -> Iterator[None]:
        """What kube-proxy does for Service default/kubernetes, for pods on ``bridge`` only: their connections to
        its ClusterIP, port 443, go to the API server on loopback (a DNAT rule; the API server still listens on
        loopback only)."""
        rule = ["PREROUTING", "-i", bridge, "-d", API_SERVICE_IP, "-p", "tcp", "--dport", "443"]
        rule += ["-j", "DNAT", "--to-destination", f"127.0.0.1:{self.port}"]
        route_localnet = Path(f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet")
        subprocess.run(["iptables", "-t", "nat", "-A", *rule], check=True, capture_output=True)
        route_localnet.write_text("1")  # packets from the bridge may then be delivered to 127.0.0.1
        try:
            yield
        finally:
            subprocess.run(["iptables", "-t", "nat", "-D", *rule], capture_output=True)
            with contextlib.suppress(OSError):
                route_localnet.write_text("0")

    def _start(self, name: str, cmd: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited {p.returncode}: {self.log_tail()}")
            r = self.kubectl("get", "--raw", "/readyz", check=False)
            if r.returncode == 0 and r.stdout.strip() == "ok":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the API server was not ready within {timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-2000:] for p in sorted(self.workdir.glob("*.log"))
        )

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def _kubeconfig(self, user: str, credentials: dict[str, str]) -> str:
        ca = self.certs.ca
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority": str(ca)}}],
                "users": [{"name": user, "user": credentials}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
                "current-context": "test",
            }
        )

    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = True, input: str | None = None):
        """kubectl as the admin (or ``kubeconfig``); with ``check``, a failure is an AssertionError with its stderr."""
        r = subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r

    def start_controller_manager(self) -> None:
        """kube-controller-manager: among others the node lifecycle controller (it lifts the not-ready taint the
        API server puts on a new node) and the service-account controllers. One identity for all its controllers,
        in group system:masters (the bootstrap role of system:kube-controller-manager expects one account per
        controller)."""
        self._start_component(
            "kube-controller-manager",
            ("system:kube-controller-manager", "system:masters"),
            f"--service-account-private-key-file={self.certs.sa_key}",
            f"--root-ca-file={self.certs.ca}",
            "--use-service-account-credentials=false",
        )

    def start_scheduler(self) -> None:
        """kube-scheduler, as user system:kube-scheduler (bound by the API server's bootstrap RBAC)."""
        self._start_component("kube-scheduler", ("system:kube-scheduler", "system:kube-scheduler"))

    def _start_component(self, name: str, identity: tuple[str, str], *flags: str) -> None:
        """A control-plane component authenticating with a client certificate for (user, group); once per
        control plane (several tests ask for it)."""
        if (self.workdir / f"{name}.log").exists():
            return
        cert, key = self.certs.client(name, *identity)
        kubeconfig = self.client_kubeconfig(self.workdir / f"{name}.kubeconfig", name, cert, key)
        self._start(
            name,
            [
                str(self.bin / name),
                *(
                    f"--{k}={kubeconfig}"
                    for k in ("kubeconfig", "authentication-kubeconfig", "authorization-kubeconfig")
                ),
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.workdir / (name + '-certs')}",
                *flags,
            ],
        )

    def client_kubeconfig(self, path: Path, user: str, cert: Path, key: Path) -> Path:
        path.write_text(self._kubeconfig(user, {"client-certificate": str(cert), "client-key": str(key)}))
        return path

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name``, with a token from the TokenRequest
        API (as kubelet mounts one into the account's pods)."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()
        path.write_text(self._kubeconfig(f"{namespace}-{name}", {"token": token}))
        path.chmod(0o600)
        return path


class Kubelet:
    """kubelet of the control plane's release for node ``name``, on containerd's CRI socket, registering with
    ``taints``; use as a context manager inside a :class:`ControlPlane`. The tests' pods use the host's network: the CNI
    configuration containerd is given (:data:`LOOPBACK_CNI`) only makes its network "ready" for kubelet."""

    def __init__(
        self,
        workdir: Path,
        cp: ControlPlane,
        cri_socket: Path,
        name: str,
        taints: list[str],
        config: dict[str, Any] | None = None,
    ):
        self.workdir, self.cp, self.cri_socket, self.name, self.taints = workdir, cp, cri_socket, name, taints
        self.config = config or {}  # KubeletConfiguration fields on top of the tests' own
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Kubelet:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        cert, key = self.cp.certs.client(f"node-{self.name}", f"system:node:{self.name}", "system:nodes")
        kubeconfig = self.cp.client_kubeconfig(w / "kubelet.kubeconfig", self.name, cert, key)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.cp.certs.ca)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,  # these machines boot with cgroup v1, refused by default since 1.35
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.cri_socket}",
            "registerWithTaints": [
                {"key": k, "value": v, "effect": e} for k, v, e in (t.replace("=", ":").split(":") for t in self.taints)
            ],
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "localStorageCapacityIsolation": False,
            "resolvConf": "/etc/resolv.conf",
            "serializeImagePulls": False,
            **self.config,
        }
        (w / "config.json").write_text(json.dumps(config))
        with open(w / "kubelet.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = self._popen(log, kubeconfig)
        return self

    def _popen(self, log: Any, kubeconfig: Path) -> subprocess.Popen:
        w = self.workdir
        return subprocess.Popen(
            [
                str(self.cp.bin / "kubelet"),
                f"--config={w / 'config.json'}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                f"--root-dir={w / 'root'}",
                f"--cert-dir={w / 'pki'}",
                "--v=2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self) -> str:
        return (self.workdir / "kubelet.log").read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kubelet exited: {(self.workdir / 'kubelet.log').read_text()[-3000:]}")
            r = self.cp.kubectl("get", "node", self.name, "-o", "json", check=False)
            if r.returncode == 0:
                conditions = json.loads(r.stdout)["status"].get("conditions", [])
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    return
            time.sleep(0.5)
        raise RuntimeError(
            f"node {self.name} not ready in {timeout} s: {(self.workdir / 'kubelet.log').read_text()[-3000:]}"
        )

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # kubelet makes its root directory a mount and mounts pod volumes under it: none may outlive the test.
        root = str(self.workdir / "root")
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m == root or m.startswith(root + "/")), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
