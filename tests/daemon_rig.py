"""Rigs for daemon mode: a puller daemon process with a kubelet-style ConfigMap directory, and a stand-in for
the few Kubernetes API calls puller makes (no API server runs here)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from .conftest import start_puller
from .rig import free_port, wait_http


def http(method: str, url: str, body=None, headers: dict | None = None, raw: bytes | None = None):
    """(status, parsed JSON body or text) without raising on 4xx/5xx."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class ConfigMapDir:
    """A directory laid out as kubelet lays out a ConfigMap volume, updated as kubelet does: the data goes into
    a new timestamped directory, then the ``..data`` symlink is swapped atomically."""

    def __init__(self, root: Path, key: str = "images.yaml"):
        self.root, self.key = root, key
        self.root.mkdir(parents=True, exist_ok=True)
        self._n = 0

    @property
    def path(self) -> Path:
        return self.root / self.key

    def write(self, text: str) -> None:
        self._n += 1
        version = self.root / f"..2026_11_25_00_00_{self._n:02d}.{os.getpid()}"
        version.mkdir()
        (version / self.key).write_text(text)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to(f"..data/{self.key}")
        if old is not None:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def set_images(self, images: list) -> None:
        self.write(yaml.safe_dump({"images": images}))


class Daemon:
    """``puller daemon`` in the background with its own OCI store, config and image list."""

    def __init__(
        self,
        root: Path,
        settings: dict | None = None,
        env: dict | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
    ):
        self.root = root
        self.netns = netns  # run inside this network namespace (a pod's: it then stands for a daemon pod)
        self.images = ConfigMapDir(root / "configmap")
        self.port = (settings or {}).pop("port", None) or free_port()
        self.url = f"http://{host}:{self.port}"
        self.store = root / "store"
        self.settings = {
            "store": f"oci:{self.store}",
            "images_file": str(self.images.path),
            "listen": f"{host}:{self.port}",
            "watch_interval": 0.2,
            "startup_taint": None,
            **(settings or {}),
        }
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log = root / "daemon.log"

    def __enter__(self) -> Daemon:
        if not self.images.path.exists():
            self.images.set_images([])
        config = self.root / "puller.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = start_puller(
            "daemon",
            "--config",
            str(config),
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
            prefix=prefix,
        )
        wait_http(self.url + "/healthz", timeout=30)
        return self

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def get(self, path: str, **kw):
        return http("GET", self.url + path, **kw)

    def post(self, path: str, body=None, **kw):
        return http("POST", self.url + path, body, **kw)

    def image(self, reference: str) -> dict | None:
        _, body = self.get("/v1/images")
        return next((i for i in body["images"] if i["reference"] == reference), None)

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; daemon log:\n{self.log.read_text()[-3000:]}")

    def wait_state(self, reference: str, state: str, timeout: float = 60) -> dict:
        return self.wait_for(
            lambda: (i := self.image(reference)) and i["state"] == state and i, timeout, f"{reference} {state}"
        )

    def metrics(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        status, text = self.get("/metrics")
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def fetched_bytes(metrics: dict) -> float:
    """puller_fetched_bytes_total summed over its host label."""
    return sum(v for (name, _), v in metrics.items() if name == "puller_fetched_bytes_total")


class KubeStandIn:
    """The Kubernetes API calls puller makes, exactly: GET/PATCH a node (JSON patch), list pods by selector.
    Anything else is answered 404 and recorded in ``unexpected``."""

    NODE = re.compile(r"^/api/v1/nodes/([^/?]+)$")
    PODS = re.compile(r"^/api/v1/namespaces/([^/?]+)/pods$")

    def __init__(self, root: Path, token: str = "stand-in-token", tls: tuple[Path, Path] | None = None):
        self.token = token
        self.nodes: dict[str, dict] = {}
        self.pods: dict[str, list[dict]] = {}  # namespace -> pods
        self.calls: list[tuple[str, str, object]] = []
        self.unexpected: list[str] = []
        self.kubeconfig = root / "kubeconfig"
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if tls:  # as the API server is reached from a pod: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
                    "users": [{"name": "puller", "user": {"token": token}}],
                    "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "puller"}}],
                    "current-context": "stand-in",
                }
            )
        )

    @property
    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig), "KUBERNETES_SERVICE_HOST": ""}

    def add_node(self, name: str, taints: list[dict]) -> None:
        self.nodes[name] = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "resourceVersion": "1"},
            "spec": {"taints": taints},
        }

    def add_pod(self, namespace: str, name: str, node: str, ip: str, labels: dict, phase: str = "Running") -> None:
        self.pods.setdefault(namespace, []).append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "puller", "image": "puller"}]},
                "status": {"phase": phase, "podIP": ip},
            }
        )

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                                  "message": message, "code": code})  # fmt: skip

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {stand_in.token}":
                    self._status(401, "Unauthorized", "Unauthorized")
                    return False
                return True

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                stand_in.calls.append(("GET", self.path, None))
                if not self._authorized():
                    return
                if m := KubeStandIn.NODE.match(url.path):
                    node = stand_in.nodes.get(m[1])
                    return self._send(200, node) if node else self._status(404, "NotFound", f"node {m[1]}")
                if m := KubeStandIn.PODS.match(url.path):
                    query = urllib.parse.parse_qs(url.query)
                    selector = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                    items = [
                        p for p in stand_in.pods.get(m[1], []) if selector.items() <= p["metadata"]["labels"].items()
                    ]
                    return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
                stand_in.unexpected.append(f"GET {self.path}")
                self._status(404, "NotFound", self.path)

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.calls.append(("PATCH", self.path, body))
                if not self._authorized():
                    return
                m = KubeStandIn.NODE.match(self.path)
                if not m or m[1] not in stand_in.nodes:
                    stand_in.unexpected.append(f"PATCH {self.path}")
                    return self._status(404, "NotFound", self.path)
                if self.headers.get("Content-Type") != "application/json-patch+json":
                    stand_in.unexpected.append(f"PATCH content type {self.headers.get('Content-Type')}")
                    return self._status(415, "UnsupportedMediaType", "want a JSON patch")
                taints = list(stand_in.nodes[m[1]]["spec"]["taints"])
                for op in body:  # the two operations puller sends: test a taint's key, remove a taint
                    index = re.fullmatch(r"/spec/taints/(\d+)(/key)?", op["path"])
                    if not index or int(index[1]) >= len(taints):
                        return self._status(422, "Invalid", f"bad path {op['path']}")
                    i = int(index[1])
                    if op["op"] == "test" and index[2] and taints[i]["key"] == op["value"]:
                        continue
                    if op["op"] == "remove" and not index[2]:
                        del taints[i]
                        continue
                    return self._status(422, "Invalid", f"test failed or unsupported op {op}")
                stand_in.nodes[m[1]]["spec"]["taints"] = taints
                self._send(200, stand_in.nodes[m[1]])

        return Handler

    def __enter__(self) -> KubeStandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
