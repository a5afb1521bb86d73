"""deploy/ against a real Kubernetes API server (tests/kube.py: etcd and kube-apiserver of the pinned release):
every object accepted, and deploy/'s RBAC exactly enough: the daemon's ServiceAccount, with a token from the
TokenRequest API, removes its node's start-up taint through puller's own code and can do nothing else it was not
given; the warmup Job's account lists pods in its namespace and nothing more."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from puller.daemon.node import remove_node_taint
from puller.errors import KubernetesError

from .daemon_rig import Daemon
from .kube import LOOPBACK_CNI, ControlPlane, Kubelet
from .rig import Containerd, CRIConfig, Registry, skopeo_push

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).parent.parent / "deploy"
TAINT = "puller.io/prefetch"
CLUSTER_AUTOSCALER_TAINT = "startup-taint.cluster-autoscaler.kubernetes.io/puller"


@pytest.fixture(scope="module")
def cluster(workdir: Path):
    with ControlPlane(workdir / "kube") as cp:
        r = cp.kubectl("apply", "-k", str(DEPLOY), "--validate=strict")
        assert r.returncode == 0, r.stderr
        yield cp


def _objects() -> list[tuple[str, str, str | None]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    out = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            if doc:
                namespaced = doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")
                out.append((doc["kind"], doc["metadata"]["name"], kustomization["namespace"] if namespaced else None))
    return out


def test_every_object_of_deploy_is_accepted_by_the_api_server(cluster: ControlPlane):
    for kind, name, namespace in _objects():
        args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
        found = json.loads(cluster.kubectl(*args).stdout)
        assert found["metadata"]["name"] == name
    ds = json.loads(cluster.kubectl("get", "daemonset", "puller", "-n", "puller", "-o", "json").stdout)
    pod = ds["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "puller"
    assert any(t.get("key") == TAINT for t in pod["tolerations"])  # it runs where the taint keeps others off
    # The API server defaulted and validated the pod template (strict field validation: no unknown field).
    assert pod["containers"][0]["terminationMessagePolicy"] == "File"


def _node(cluster: ControlPlane, name: str, taints: list[dict]) -> None:
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"taints": taints}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(node))


def _taints(cluster: ControlPlane, name: str) -> list[str]:
    node = json.loads(cluster.kubectl("get", "node", name, "-o", "json").stdout)
    return [t["key"] for t in node["spec"].get("taints", [])]


@pytest.mark.parametrize("key", [TAINT, CLUSTER_AUTOSCALER_TAINT])
async def test_the_daemon_account_removes_its_start_up_taint_and_nothing_else(
    cluster: ControlPlane, tmp_path: Path, monkeypatch, key: str
):
    """Also with the key cluster-autoscaler takes for a start-up taint (deploy/README.md, node autoscalers)."""
    node = f"node-{len(key)}"
    taints = [
        {"key": key, "value": "pending", "effect": "NoSchedule"},
        {"key": "gpu", "value": "1", "effect": "NoSchedule"},
    ]
    _node(cluster, node, taints)
    kubeconfig = cluster.service_account_kubeconfig("puller", "puller", tmp_path / "daemon.kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert await remove_node_taint(node, key) == 1
    left = _taints(cluster, node)
    assert key not in left and "gpu" in left  # only its own taint went (the API server adds not-ready)
    for verb, what in (("list", "secrets"), ("delete", "nodes"), ("create", "pods"), ("patch", "daemonsets")):
        r = cluster.kubectl("auth", "can-i", verb, what, "-A", kubeconfig=kubeconfig, check=False)
        assert r.stdout.strip() == "no", (verb, what)


async def test_an_account_without_the_daemon_role_is_refused_by_name(
    cluster: ControlPlane, tmp_path: Path, monkeypatch
):
    _node(cluster, "node-b", [{"key": TAINT, "value": "pending", "effect": "NoSchedule"}])
    kubeconfig = cluster.service_account_kubeconfig("puller", "puller-warmup", tmp_path / "warmup.kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(KubernetesError, match=r"(?i)forbidden|node-b"):
        await remove_node_taint("node-b", TAINT)
    assert TAINT in _taints(cluster, "node-b")
    yes = cluster.kubectl("auth", "can-i", "list", "pods", "-n", "puller", kubeconfig=kubeconfig, check=False)
    assert yes.stdout.strip() == "yes"
    no = cluster.kubectl("auth", "can-i", "list", "pods", "-n", "default", kubeconfig=kubeconfig, check=False)
    assert no.stdout.strip() == "no"


def test_a_new_node_is_held_back_until_its_list_is_present_then_runs_it_without_the_registry(
    cluster: ControlPlane, layout, workdir: Path, tmp_path: Path
):
    """The start-up gate end to end: a node registers with the start-up taint; a pod for a listed image stays
    Pending; puller's daemon, with deploy/'s ServiceAccount, pulls the list into containerd (CRI) and removes the
    taint; the registry is stopped; the pod is scheduled and runs from the prefetched image."""
    w = tmp_path
    with Registry(w / "registry") as reg:
        skopeo_push(layout["path"], "pause", f"{reg.host}/test/pause:v1")
        skopeo_push(layout["path"], "run", f"{reg.host}/test/run:v1")
        image = f"{reg.host}/test/run:v1"
        hosts = w / "certs.d" / reg.host
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(f'server = "http://{reg.host}"\n')
        (w / "ctrd" / "cni").mkdir(parents=True)
        (w / "ctrd" / "cni" / "10-loopback.conflist").write_text(json.dumps(LOOPBACK_CNI))
        cri = CRIConfig(f"{reg.host}/test/pause:v1", w / "certs.d")
        with Containerd(w / "ctrd", version="2.2", cri=cri) as ctrd, _pods_removed(ctrd):
            subprocess.run(ctrd.crictl("pull", cri.sandbox_image), check=True, capture_output=True)  # the node's own
            with Kubelet(w / "kubelet", cluster, ctrd.socket, "node-gate", [f"{TAINT}=pending:NoSchedule"]) as node:
                node.wait_ready()
                cluster.start_scheduler()
                cluster.start_controller_manager()
                cluster.kubectl("create", "namespace", "apps")
                has_sa = ("get", "serviceaccount", "default", "-n", "apps")
                _until(lambda: cluster.kubectl(*has_sa, check=False).returncode == 0, 60, "the default ServiceAccount")
                pod = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "app", "namespace": "apps"},
                    "spec": {
                        "hostNetwork": True,
                        "automountServiceAccountToken": False,
                        "containers": [
                            {
                                "name": "app",
                                "image": image,
                                "imagePullPolicy": "IfNotPresent",
                                "command": ["/bin/busybox", "sleep", "3600"],
                            }
                        ],
                    },
                }
                cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
                time.sleep(3)
                assert _pod(cluster)["status"]["phase"] == "Pending"  # the start-up taint keeps it off the node
                assert not _pod(cluster)["spec"].get("nodeName")
                kubeconfig = cluster.service_account_kubeconfig("puller", "puller", w / "daemon.kubeconfig")
                settings = {
                    "store": "containerd",
                    "containerd_address": str(ctrd.socket),
                    "namespace": "k8s.io",
                    "staging_dir": str(w / "staging"),
                    "containerd_root": str(ctrd.workdir),
                    "startup_taint": TAINT,
                    "node_name": "node-gate",
                    "plain_http": [reg.host],
                }
                daemon = Daemon(w / "daemon", settings, env={"KUBECONFIG": str(kubeconfig)})
                daemon.images.set_images([image])  # the list is there when the daemon starts, as its ConfigMap is
                with daemon:
                    _until(lambda: TAINT not in _taints(cluster, "node-gate"), 120, "the start-up taint to go")
                reg.__exit__(None, None, None)  # the registry is gone: the pod must run from what is on the node
                try:
                    _until(lambda: _pod(cluster)["status"]["phase"] == "Running", 120, "the pod to run")
                except AssertionError as e:
                    described = cluster.kubectl("describe", "pod", "app", "-n", "apps").stdout
                    taints = _taints(cluster, "node-gate")
                    daemon_log = (w / "daemon" / "daemon.log").read_text()[-3000:]
                    images = subprocess.run(ctrd.crictl("images"), capture_output=True, text=True).stdout
                    raise AssertionError(f"{e}: node taints {taints}\n{described}\n{daemon_log}\n{images}") from None
                events = cluster.kubectl("get", "events", "-n", "apps", "-o", "json").stdout
                messages = [e["message"] for e in json.loads(events)["items"] if e["reason"] == "Pulled"]
                assert any("already present on machine" in m for m in messages), messages


@contextlib.contextmanager
def _pods_removed(ctrd: Containerd):
    """On the way out, stop and remove every pod sandbox (its shim and processes outlive containerd otherwise)."""
    try:
        yield
    finally:
        subprocess.run(ctrd.crictl("rmp", "-fa"), capture_output=True, timeout=120)


def _pod(cluster: ControlPlane) -> dict:
    return json.loads(cluster.kubectl("get", "pod", "app", "-n", "apps", "-o", "json").stdout)


def _until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)
