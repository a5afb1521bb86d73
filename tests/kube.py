"""A Kubernetes control plane from real parts, started by the tests: etcd and kube-apiserver of one pinned release
(built by .ci/build-components into /opt/puller-test/bin), on loopback, with certificates and the service-account
key made here. ``kubectl`` talks to it as cluster admin, or as any ServiceAccount with a token from the
TokenRequest API.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from .rig import TEST_BIN

KUBE_BINS = ("etcd", "kube-apiserver", "kubectl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pem_key(key: Any) -> bytes:
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption())


class Certificates:
    """A CA, the API server's serving certificate, an admin client certificate and the service-account keys."""

    def __init__(self, where: Path):
        where.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "puller-test-ca")])

        def sign(subject: x509.Name, key: Any, ca: bool, extensions: list[x509.ExtensionType]) -> x509.Certificate:
            b = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            )
            for ext in extensions:
                b = b.add_extension(ext, critical=False)
            return b.sign(ca_key, hashes.SHA256())

        def write(name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
            (where / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (where / f"{name}-key.pem").write_bytes(_pem_key(key))
            (where / f"{name}-key.pem").chmod(0o600)
            return where / f"{name}.pem", where / f"{name}-key.pem"

        self.ca, _ = write("ca", sign(ca_name, ca_key, True, []), ca_key)
        server_key = ec.generate_private_key(ec.SECP256R1())
        names = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
        san = x509.SubjectAlternativeName(
            [*(x509.DNSName(n) for n in names), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
        self.server, self.server_key = write("apiserver", sign(server_name, server_key, False, [san]), server_key)
        admin_key = ec.generate_private_key(ec.SECP256R1())
        admin_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "puller-test-admin"),
            ]
        )
        self.admin, self.admin_key = write("admin", sign(admin_name, admin_key, False, []), admin_key)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key = where / "sa-key.pem"
        self.sa_key.write_bytes(_pem_key(sa_key))
        self.sa_key.chmod(0o600)
        self.sa_pub = where / "sa.pub"
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        self.sa_pub.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM, spki))


class ControlPlane:
    """etcd + kube-apiserver under ``workdir``; use as a context manager."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = workdir / "admin.kubeconfig"

    @staticmethod
    def available() -> bool:
        return all((TEST_BIN / b).exists() for b in KUBE_BINS)

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
                    str(TEST_BIN / "kube-apiserver"),
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
                    "--service-cluster-ip-range=10.96.0.0/16",
                    "--authorization-mode=Node,RBAC",
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

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (the process owns it)
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
        return subprocess.run(
            [str(TEST_BIN / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
            input=input,
            timeout=120,
        )

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name``, with a token from the TokenRequest
        API (as kubelet mounts one into the account's pods)."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()
        path.write_text(self._kubeconfig(f"{namespace}-{name}", {"token": token}))
        path.chmod(0o600)
        return path
