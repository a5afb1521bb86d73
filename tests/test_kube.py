"""deploy/ against a real Kubernetes API server (tests/kube.py: etcd and kube-apiserver of the pinned release):
every object accepted, and deploy/'s RBAC exactly enough: the daemon's ServiceAccount, with a token from the
TokenRequest API, removes its node's start-up taint through puller's own code and can do nothing else it was not
given; the warmup Job's account lists pods in its namespace and nothing more."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from puller.daemon.node import remove_node_taint
from puller.errors import KubernetesError

from .kube import ControlPlane

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).parent.parent / "deploy"
TAINT = "puller.io/prefetch"


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


async def test_the_daemon_account_removes_its_start_up_taint_and_nothing_else(
    cluster: ControlPlane, tmp_path: Path, monkeypatch
):
    _node(
        cluster,
        "node-a",
        [
            {"key": TAINT, "value": "pending", "effect": "NoSchedule"},
            {"key": "gpu", "value": "true", "effect": "NoSchedule"},
        ],
    )
    kubeconfig = cluster.service_account_kubeconfig("puller", "puller", tmp_path / "daemon.kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    await remove_node_taint("node-a", TAINT)
    taints = _taints(cluster, "node-a")
    assert TAINT not in taints and "gpu" in taints  # only its own taint went (the API server adds not-ready)
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
