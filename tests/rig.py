"""Test and benchmark rig: the CNCF distribution registry, nginx as its blob CDN, a token issuer, and images
generated here (random layers, known digests) pushed with skopeo. Everything listens on 127.0.0.1 and stops
with its context manager."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import gzip
import hashlib
import io
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
ACCEPT_ALL = ", ".join(
    [
        OCI_INDEX,
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0, ok=(200, 401)) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not come up")
        time.sleep(0.1)


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} did not open")
        time.sleep(0.1)


def pem_private_key(key: Any) -> bytes:
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption())


class TestCA:
    """A certificate authority for the tests: ``ca.pem`` under ``where``, and EC certificates it issues, each
    written as ``NAME.pem`` and ``NAME-key.pem``."""

    __test__ = False  # not a pytest class

    def __init__(self, where: Path, name: str = "puller test CA"):
        where.mkdir(parents=True, exist_ok=True)
        self.where = where
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert, _ = self._write("ca", self._sign(self._name, self._key, True, []), self._key)

    def issue(
        self, file: str, cn: str, org: str | None = None, sans: list[x509.GeneralName] | None = None
    ) -> tuple[Path, Path]:
        """A certificate for ``cn`` (in organisation ``org``, for the names ``sans``): (cert.pem, key.pem)."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
        subject = x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        extensions = [x509.SubjectAlternativeName(sans)] if sans else []
        return self._write(file, self._sign(subject, key, False, extensions), key)

    def _sign(self, subject: x509.Name, key: Any, ca: bool, extensions: list[x509.ExtensionType]) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for ext in extensions:
            b = b.add_extension(ext, critical=False)
        return b.sign(self._key, hashes.SHA256())

    def _write(self, name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
        cert_path, key_path = self.where / f"{name}.pem", self.where / f"{name}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(pem_private_key(key))
        key_path.chmod(0o600)
        return cert_path, key_path


def make_tls_cert(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, its key)."""
    ca = TestCA(workdir)
    cert, key = ca.issue(
        "cert", "127.0.0.1", sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    return ca.cert, cert, key


class ScriptedServer:
    """An asyncio server on 127.0.0.1 whose subclass answers each connection in :meth:`serve`; with ``tls`` (a
    directory for the test CA), HTTPS. Use as ``async with``: ``base`` is its URL, ``ca`` the CA certificate (None
    without TLS), ``connections`` how many it accepted."""

    def __init__(self, tls: Path | None = None):
        self.tls = tls
        self.connections = 0
        self.base = ""
        self.ca: Path | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self.serve(reader, writer)

    async def __aenter__(self) -> Self:
        context = None
        if self.tls:
            self.ca, cert, key = make_tls_cert(self.tls)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=context)
        port = self._server.sockets[0].getsockname()[1]
        self.base = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()


def flip_middle_byte(path: Path) -> None:
    """Corrupt a stored blob in place (one byte inverted); a second call repairs it."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---- images ------------------------------------------------------------------------------------------------


class _HashingWriter:
    """File-like sink that hashes and counts what passes through to ``f``."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.h.update(data)
        self.n += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_random_layer(dest: Path, size: int, seed: int) -> tuple[str, str, int]:
    """Write a valid tar+gzip layer holding ``size`` random bytes in one file, streaming (any size, little
    memory). gzip level 0 (stored blocks) keeps it incompressible and fast, and skopeo pushes it as it is (it
    only compresses uncompressed layers). Returns (diff_id, digest, compressed size)."""
    import random

    rnd = random.Random(seed)
    with open(dest, "wb") as out:
        gz_sink = _HashingWriter(out)
        with gzip.GzipFile(fileobj=gz_sink, mode="wb", compresslevel=0, mtime=0) as gz:
            tar_sink = _HashingWriter(gz)
            header = tarfile.TarInfo(f"data-{seed}.bin")
            header.size, header.mtime = size, 0
            tar_sink.write(header.tobuf(format=tarfile.PAX_FORMAT))
            left = size
            while left:
                n = min(left, 4 << 20)
                tar_sink.write(rnd.randbytes(n))
                left -= n
            pad = (-size) % tarfile.BLOCKSIZE
            tar_sink.write(b"\0" * (pad + 2 * tarfile.BLOCKSIZE))  # end of archive
            tar_sink.write(b"\0" * ((-tar_sink.n) % tarfile.RECORDSIZE))
    return "sha256:" + tar_sink.h.hexdigest(), "sha256:" + gz_sink.h.hexdigest(), gz_sink.n


@dataclass
class Image:
    """What was written into a layout: the manifest/index digest and every blob (digest -> size)."""

    tag: str
    digest: str
    media_type: str
    blobs: dict[str, int] = field(default_factory=dict)
    size: int = 0


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


def _tar(files: dict[str, tuple[bytes, int] | None]) -> bytes:
    """A layer tar of ``files``, with their parent directories; None makes a whiteout of that path."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, entry in sorted(files.items()):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = tarfile.TarInfo("/".join(parts[:i]))
                if d.name not in tar.getnames():
                    d.type, d.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(d)
            if entry is None:
                info, data = tarfile.TarInfo("/".join([*parts[:-1], ".wh." + parts[-1]])), b""
            else:
                (data, mode), info = entry, tarfile.TarInfo("/".join(parts))
                info.mode = mode
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def layout_image(layout: Path, tag: str) -> tuple[dict, dict, dict]:
    """Image ``tag`` of an OCI layout: its descriptor in index.json, its manifest and its config."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads((blobs / desc["digest"].split(":")[1]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())
    return desc, manifest, config


def relabel(layout: Path, tag: str, new_tag: str, labels: dict[str, str]) -> None:
    """Adds image ``new_tag`` to an OCI layout: image ``tag`` with ``labels`` added to its config (the same layers,
    another image ID)."""
    blobs = layout / "blobs" / "sha256"
    desc, manifest, config = layout_image(layout, tag)
    config["config"]["Labels"] = {**(config["config"].get("Labels") or {}), **labels}

    def put(doc: dict) -> tuple[str, int]:
        data = json.dumps(doc).encode()
        hexd = hashlib.sha256(data).hexdigest()
        (blobs / hexd).write_bytes(data)
        return f"sha256:{hexd}", len(data)

    manifest["config"]["digest"], manifest["config"]["size"] = put(config)
    digest, size = put(manifest)
    new = {**desc, "digest": digest, "size": size, "annotations": {"org.opencontainers.image.ref.name": new_tag}}
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].append(new)
    (layout / "index.json").write_text(json.dumps(index))


class LayoutWriter:
    """Writes OCI image layouts for skopeo to push."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self.index: dict = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}

    def put(self, data: bytes) -> tuple[str, int]:
        hexd = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / hexd).write_bytes(data)
        return f"sha256:{hexd}", len(data)

    def manifest(
        self, layer_sizes: list[int], seed: int, os_: str = "linux", arch: str = "amd64"
    ) -> tuple[dict, Image]:
        layers, diff_ids, blobs = [], [], {}
        for i, size in enumerate(layer_sizes):
            tmp = self.root / "blobs" / "sha256" / f"tmp-{os.getpid()}"
            diff_id, digest, n = write_random_layer(tmp, size, seed * 1000 + i)
            tmp.rename(self.root / "blobs" / "sha256" / digest.split(":")[1])
            layers.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": n})
            diff_ids.append(diff_id)
            blobs[digest] = n
        config = {
            "architecture": arch,
            "os": os_,
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "puller test"}],
        }
        cdigest, csize = self.put(json.dumps(config).encode())
        blobs[cdigest] = csize
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
            "layers": layers,
        }
        mdigest, msize = self.put(json.dumps(manifest).encode())
        desc = {
            "mediaType": OCI_MANIFEST,
            "digest": mdigest,
            "size": msize,
            "platform": {"os": os_, "architecture": arch},
        }
        return desc, Image("", mdigest, OCI_MANIFEST, blobs, sum(blobs.values()))

    def add_files_image(
        self, tag: str, files: dict[str, tuple[bytes, int]], cmd: tuple[str, ...] = ("/bin/busybox", "true")
    ) -> Image:
        """A one-layer image holding ``files`` (path -> (content, mode)), e.g. a static binary to run."""
        return self.add_layers_image(tag, [files], cmd)

    def add_layers_image(
        self,
        tag: str,
        layers: list[dict[str, tuple[bytes, int] | None]],
        cmd: tuple[str, ...] = ("/bin/busybox", "true"),
    ) -> Image:
        """An image of gzip layers, bottom first; in each, path -> (content, mode), or None for a whiteout
        (``.wh.<name>``: the file of a lower layer is deleted)."""
        return self.add_tar_layers_image(tag, [(_tar(files), "gzip") for files in layers], cmd)

    def add_tar_layers_image(
        self, tag: str, layers: list[tuple[bytes, str]], cmd: tuple[str, ...] = ("/bin/busybox", "true")
    ) -> Image:
        """An image of the layer tars ``layers``, bottom first, each compressed as its second item says ("gzip",
        "zstd" or "" for none); the config's diff IDs are the tars' digests."""
        descs, diff_ids, blobs = [], [], {}
        for raw, compression in layers:
            blob = {"gzip": lambda b: gzip.compress(b, mtime=0), "zstd": _zstd, "": bytes}[compression](raw)
            digest, size = self.put(blob)
            media_type = OCI_LAYER + (f"+{compression}" if compression else "")
            descs.append({"mediaType": media_type, "digest": digest, "size": size})
            diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
            blobs[digest] = size
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": list(cmd)},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        cdigest, csize = self.put(json.dumps(config).encode())
        blobs[cdigest] = csize
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
            "layers": descs,
        }
        mdigest, msize = self.put(json.dumps(manifest).encode())
        self._name(
            tag,
            {
                "mediaType": OCI_MANIFEST,
                "digest": mdigest,
                "size": msize,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            },
        )
        return Image(tag, mdigest, OCI_MANIFEST, blobs, sum(blobs.values()))

    def add_image(self, tag: str, layer_sizes: list[int], seed: int) -> Image:
        desc, image = self.manifest(layer_sizes, seed)
        desc = {**desc, "annotations": {"org.opencontainers.image.ref.name": tag}}
        self._name(tag, desc)
        image.tag = tag
        return image

    def add_index(self, tag: str, platforms: list[tuple[str, str]], layer_sizes: list[int], seed: int) -> dict:
        """A multi-arch index; returns {platform: Image} plus the index digest under key 'index'."""
        out = {}
        descs = []
        for i, (os_, arch) in enumerate(platforms):
            desc, image = self.manifest(layer_sizes, seed * 10 + i, os_, arch)
            descs.append(desc)
            out[f"{os_}/{arch}"] = image
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs}
        idigest, isize = self.put(json.dumps(index).encode())
        self._name(
            tag,
            {
                "mediaType": OCI_INDEX,
                "digest": idigest,
                "size": isize,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            },
        )
        out["index"] = idigest
        return out

    def _name(self, tag: str, desc: dict) -> None:
        self.index["manifests"] = [
            m
            for m in self.index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
        ]
        self.index["manifests"].append(desc)
        (self.root / "index.json").write_text(json.dumps(self.index))


def skopeo_push(
    layout: Path,
    tag: str,
    dest: str,
    *,
    all_images: bool = False,
    fmt: str | None = None,
    creds: str | None = None,
    preserve_digests: bool = False,
) -> None:
    """Push image ``tag`` of an OCI layout; ``preserve_digests``: layers as they are (skopeo otherwise compresses
    an uncompressed one)."""
    cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if preserve_digests:
        cmd.append("--preserve-digests")
    if all_images:
        cmd.append("--all")
    if fmt:
        cmd += ["--format", fmt]
    if creds:
        cmd += ["--dest-creds", creds]
    subprocess.run([*cmd, f"oci:{layout}:{tag}", f"docker://{dest}"], check=True, capture_output=True, timeout=600)


# ---- servers -----------------------------------------------------------------------------------------------


_ACCESS_LINE = re.compile(  # distribution's access log: the combined log format
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) \S+ "[^"]*" "(?P<agent>[^"]*)"'
)


class Registry:
    """docker-registry (CNCF distribution) on 127.0.0.1 with a temp root. Options: htpasswd users, a token
    issuer, a redirect of blob GETs to ``redirect_base`` (the redirect storage middleware)."""

    def __init__(
        self,
        workdir: Path,
        *,
        htpasswd: dict[str, str] | None = None,
        token: TokenIssuer | None = None,
        redirect_base: str | None = None,
        tls: tuple[Path, Path] | None = None,
        proxy_remote: str | None = None,
        bind: str = "127.0.0.1",
        netns: str | None = None,
        access_log: bool = False,
    ):
        self.workdir = workdir
        self.access_log = access_log  # log each request (method, path, status, user agent): see requests()
        self.netns = netns  # serve inside this network namespace (then bind to an address of it)
        self.proxy_remote = proxy_remote  # pull-through cache of this registry URL
        self.root = workdir / "storage"
        self.port = free_port()
        self.bind = bind  # the benchmarks serve on a veth address
        self.host = f"{bind}:{self.port}"
        self.htpasswd = htpasswd
        self.token = token
        self.redirect_base = redirect_base
        self.tls = tls  # (certificate, key): serve HTTPS
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            f"    disabled: {'false' if self.access_log else 'true'}",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.root}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
            "  secret: puller-test-secret",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.tls[0]}", f"    key: {self.tls[1]}"]
        if self.proxy_remote:
            lines += ["proxy:", f"  remoteurl: {self.proxy_remote}"]
        if self.redirect_base:
            lines += [
                "middleware:",
                "  storage:",
                "    - name: redirect",
                "      options:",
                f"        baseurl: {self.redirect_base}",
            ]
        if self.htpasswd:
            path = self.workdir / "htpasswd"
            path.write_text("")
            for user, pw in self.htpasswd.items():
                subprocess.run(["htpasswd", "-Bb", str(path), user, pw], check=True, capture_output=True)
            lines += ["auth:", "  htpasswd:", "    realm: puller-test", f"    path: {path}"]
        if self.token:
            lines += [
                "auth:",
                "  token:",
                f"    realm: {self.token.url}/token",
                f"    service: {self.token.service}",
                f"    issuer: {self.token.issuer}",
                f"    rootcertbundle: {self.token.cert_path}",
            ]
        return "\n".join(lines) + "\n"

    def __enter__(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "registry.yml"
        cfg.write_text(self.config())
        self.log = open(self.workdir / "registry.log", "wb")
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*prefix, "docker-registry", "serve", str(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.tls:
            wait_port(self.port)
        else:
            wait_http(f"http://{self.host}/v2/")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def requests(self) -> list[tuple[str, str, int, str]]:
        """(method, path, status, user agent) of each request served so far (``access_log`` on)."""
        self.log.flush()
        out = []
        for line in (self.workdir / "registry.log").read_text(errors="replace").splitlines():
            m = _ACCESS_LINE.search(line)
            if m:
                out.append((m["method"], m["path"], int(m["status"]), m["agent"]))
        return out

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def manifest(self, repo: str, ref: str, auth: str | None = None) -> tuple[str, dict]:
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT_ALL})
        if auth:
            req.add_header("Authorization", auth)
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return "sha256:" + hashlib.sha256(body).hexdigest(), json.loads(body)


class Nginx:
    """nginx serving ``root`` (the registry's storage) as a blob CDN, with a per-connection ``limit_rate``
    (bytes/s, 0 = none) and optionally ignoring Range (``max_ranges 0``). Its access log records
    status, bytes sent, the Range asked for, the URI and the user agent."""

    def __init__(self, workdir: Path, root: Path, *, limit_rate: int = 0, ranges: bool = True, bind: str = "127.0.0.1"):
        self.workdir = workdir
        self.root = root
        self.port = free_port()
        self.bind = bind
        self.url = f"http://{bind}:{self.port}"
        self.limit_rate = limit_rate
        self.ranges = ranges
        self.access_log = workdir / "nginx-access.log"

    def __enter__(self) -> Nginx:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  log_format transfer '$status $body_bytes_sent "$http_range" $request_uri "$http_user_agent"';
  access_log {self.access_log} transfer;
  client_body_temp_path {self.workdir}/body; proxy_temp_path {self.workdir}/proxy;
  fastcgi_temp_path {self.workdir}/fcgi; uwsgi_temp_path {self.workdir}/uwsgi; scgi_temp_path {self.workdir}/scgi;
  sendfile on; tcp_nopush on; keepalive_requests 100000;
  default_type application/octet-stream;
  server {{
    listen {self.bind}:{self.port};
    root {self.root};
    limit_rate {self.limit_rate};
    {"" if self.ranges else "max_ranges 0;"}
  }}
}}
""")
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(self.workdir)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(self.url + "/", ok=(200, 403, 404))
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def bytes_sent(self) -> int:
        """Body bytes nginx sent for blob requests."""
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for line in self.access_log.read_text().splitlines():
                parts = line.split(" ", 2)
                if len(parts) >= 2 and parts[1].isdigit() and "/blobs/" in line:
                    total += int(parts[1])
        return total

    def requests(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return self.access_log.read_text().splitlines()
        return []


class TokenIssuer:
    """A token server for the registry's ``auth: token`` mode: checks basic auth against ``users`` and signs a
    JWT (RS256, x5c chain of a self-signed cert the registry trusts) granting the requested scope."""

    service = "puller-test-registry"
    issuer = "puller-test-issuer"

    def __init__(self, workdir: Path, users: dict[str, str], lifetime: int = 300):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = users
        self.lifetime = lifetime
        self.requests: list[dict] = []
        self.issued: list[str] = []
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "puller-test-token")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-cert.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._der = self.cert.public_bytes(serialization.Encoding.DER)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def sign(self, subject: str, access: list[dict]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(self._der).decode()]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.lifetime,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing_input}.{b64(sig)}"
        self.issued.append(token)
        return token

    def __enter__(self) -> TokenIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                from urllib.parse import parse_qs, urlsplit

                q = parse_qs(urlsplit(self.path).query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    if issuer.users.get(u) != p:
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = u
                issuer.requests.append({"user": user, "scope": q.get("scope", []), "service": q.get("service")})
                access = []
                for scope in q.get("scope", []):
                    kind, name, actions = scope.split(":", 2) if scope.count(":") >= 2 else ("", "", "")
                    if kind == "repository":
                        # anonymous users get nothing: the registry then answers 401 again
                        allowed = actions.split(",") if user else []
                        access.append({"type": kind, "name": name, "actions": allowed})
                body = json.dumps({"token": issuer.sign(user or "", access), "expires_in": issuer.lifetime}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(predicate, timeout: float, what: str):
    """``predicate()``'s first truthy value, polled every 0.1 s for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "4m") mounted at ``where`` (made), unmounted after: a small disk to fill."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def tempdir(prefix: str = "puller-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


TEST_BIN = Path(os.environ.get("PULLER_TEST_BIN", "/opt/puller-test/bin"))  # built by .ci/build-components
# Debian's 1.6.20, and the 2.x releases built by .ci/build-components (each with its own ctr and shim)
CONTAINERD_BINS = {"1.6": Path("/usr/bin"), "2.3": TEST_BIN / "containerd-2.3", "2.4": TEST_BIN / "containerd-2.4"}
CRICTL = TEST_BIN / "crictl"


@dataclass
class CRIConfig:
    """The CRI plugin's settings for a test containerd: the sandbox (pause) image, and a hosts directory so that
    its own pulls reach the tests' plain-HTTP loopback registries."""

    sandbox_image: str
    hosts_dir: Path


class Containerd:
    """containerd of ``version`` (a key of :data:`CONTAINERD_BINS`: "1.6" is Debian's) with its own root,
    state and sockets under ``workdir``. With ``cri`` the CRI plugin serves on the same socket (crictl talks to
    it, as kubelet does); without, it is disabled. These machines withhold CAP_SYS_RESOURCE, so a pod sandbox's
    oom_score_adj of -998 is refused; the CRI's own ``restrict_oom_score_adj`` (meant for such hosts) is set."""

    def __init__(
        self,
        workdir: Path,
        netns: str | None = None,
        version: str = "1.6",
        cri: CRIConfig | None = None,
        extra_config: str = "",
        env: dict[str, str] | None = None,
    ):
        self.workdir = workdir
        self.env = env or {}  # more environment (e.g. CONTAINERD_DISABLE_IGZIP=1: Go's gzip, not igzip)
        self.socket = workdir / "containerd.sock"
        self.netns = netns  # run in this network namespace (the benchmarks' client side)
        self.version = version
        self.bin = CONTAINERD_BINS[version]
        self.cri = cri
        self.extra_config = extra_config  # more TOML (e.g. the transfer service's settings for the benchmarks)
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("containerd") and shutil.which("ctr"))

    def _config(self) -> str:
        w = self.workdir
        common = (
            f'root = "{w}/root"\nstate = "{w}/state"\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
        )
        cri = self.cri
        if self.version == "1.6":
            if cri is None:
                return 'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n' + common
            return (
                "version = 2\n" + common + '[plugins."io.containerd.grpc.v1.cri"]\n'
                f'  sandbox_image = "{cri.sandbox_image}"\n  stream_server_port = "0"\n'
                "  restrict_oom_score_adj = true\n"
                '[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "overlayfs"\n'
                f'[plugins."io.containerd.grpc.v1.cri".cni]\n  bin_dir = "/usr/lib/cni"\n  conf_dir = "{w}/cni"\n'
                f'[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{cri.hosts_dir}"\n'
            )
        # containerd 2.x, config version 3; NRI off (its socket is one per host)
        disabled = ["io.containerd.nri.v1.nri"] + ([] if cri else ["io.containerd.grpc.v1.cri"])
        text = "version = 3\n" + f"disabled_plugins = {json.dumps(disabled)}\n" + common
        if cri is not None:
            text += (
                "[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n"
                f"[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = '{cri.sandbox_image}'\n"
                f"[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '{cri.hosts_dir}'\n"
                "[plugins.'io.containerd.cri.v1.runtime']\n  restrict_oom_score_adj = true\n"
                f"[plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dirs = ['/usr/lib/cni']\n  conf_dir = '{w}/cni'\n"
                "[plugins.'io.containerd.grpc.v1.cri']\n  stream_server_port = '0'\n"
            )
        return text

    def __enter__(self) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.toml"
        cfg.write_text(self._config() + self.extra_config)
        self.log = open(self.workdir / "containerd.log", "wb")
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        env = {**os.environ, **self.env}
        if self.bin != Path("/usr/bin"):  # its own shim first
            env["PATH"] = f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}"
        self.proc = subprocess.Popen(
            [*prefix, str(self.bin / "containerd"), "--config", str(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        deadline = time.monotonic() + 30
        while subprocess.run(self.ctr("version"), capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"containerd {self.version} did not start; see {self.workdir / 'containerd.log'}")
            time.sleep(0.1)
        return self

    def ctr(self, *args: str) -> list[str]:
        return [str(self.bin / "ctr"), "--address", str(self.socket), *args]

    def crictl(self, *args: str) -> list[str]:
        endpoint = f"unix://{self.socket}"
        return [str(CRICTL), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint, "--timeout", "60s", *args]

    def cri_tags(self) -> set[str]:
        """The image names the CRI lists (what kubelet sees on the node)."""
        listed = subprocess.run(self.crictl("images", "-o", "json"), capture_output=True, text=True, check=True)
        return {t for i in json.loads(listed.stdout)["images"] for t in i.get("repoTags") or []}

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used so far."""
        assert self.proc
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (the blob CDN) that misbehaves on purpose.

    ``mode`` applies to the next ``times`` requests whose path holds ``target`` (blobs by default; then it passes
    through; ``times=-1``: always):
    reset (half the body, then a TCP reset), status:<code> (e.g. status:503; 429 carries Retry-After: 1),
    truncate (full Content-Length, half the body, close), short-length (a Content-Length smaller than the body),
    flip (one byte inverted), stall (half the body, then silence), ignore-range (200 with the whole blob),
    expire (403, as an expired signed URL), other-blob (the bytes of ``other`` instead).
    ``bytes_sent`` counts body bytes passed to the client."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.mode = "pass"
        self.times = 0
        self.other: bytes = b""
        self.bytes_sent = 0
        self.requests: list[str] = []
        self.paths: list[str] = []  # path and query of every request
        self.target = "/blobs/"  # which requests the faults apply to (e.g. "/manifests/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def set(self, mode: str, times: int = 2, other: bytes = b"") -> None:
        self.mode, self.times, self.other = mode, times, other

    def _take(self) -> str:
        if self.times == 0:
            return "pass"
        if self.times > 0:
            self.times -= 1
        return self.mode

    def __enter__(self) -> FaultProxy:
        import asyncio

        from aiohttp import ClientSession, web

        proxy = self

        async def handle(request: web.Request) -> web.StreamResponse:
            proxy.paths.append(request.path_qs)
            mode = proxy._take() if proxy.target in request.path else "pass"
            proxy.requests.append(f"{mode} {request.headers.get('Range')}")
            if mode.startswith("status:"):
                code = int(mode.split(":")[1])
                return web.Response(status=code, headers={"Retry-After": "1"} if code == 429 else {})
            if mode == "expire":
                return web.Response(status=403, text="Request has expired")
            forward = ("Accept",) if mode == "ignore-range" else ("Accept", "Range")
            headers = {k: v for k, v in request.headers.items() if k in forward}
            async with (
                ClientSession(auto_decompress=False) as s,
                s.get(proxy.upstream + request.path_qs, headers=headers) as up,
            ):
                body = await up.read()
                status, out_headers = (
                    up.status,
                    {k: v for k, v in up.headers.items() if k in ("Content-Range", "Content-Type")},
                )
            if mode == "flip" and body:
                body = body[:-1] + bytes([body[-1] ^ 0xFF])
            if mode == "other-blob" and proxy.other:
                start = int(headers.get("Range", "bytes=0-").split("=")[1].split("-")[0])
                body = proxy.other[start : start + len(body)]
            length = len(body) - 1 if mode == "short-length" and len(body) > 1 else len(body)
            resp = web.StreamResponse(status=status, headers={**out_headers, "Content-Length": str(length)})
            await resp.prepare(request)
            if mode in ("reset", "truncate", "stall"):
                await resp.write(body[: len(body) // 2])
                proxy.bytes_sent += len(body) // 2
                if mode == "stall":
                    await asyncio.sleep(30)
                elif mode == "reset":
                    request.transport.abort()
                else:
                    request.transport.close()
                return resp
            await resp.write(body[:length])
            proxy.bytes_sent += length
            if mode == "short-length":
                request.transport.close()
            return resp

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/{tail:.*}", handle)
            self._runner = web.AppRunner(app, shutdown_timeout=1)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._ready = threading.Event()
        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
