"""The Helm chart (deploy/helm/puller) against deploy/ (kustomize): `helm lint` passes; with default values `helm
template` renders the objects that kustomize (kubectl 1.37's) renders from deploy/, but for Helm's own labels and
the DaemonSet's settings checksum; the cluster sources and pull-secret namespaces add exactly deploy/sources/'s RBAC;
every rendered object passes the strict schema validation deploy/ passes. tests/test_kube.py sends the chart's
objects to a real API server."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from puller import config
from puller.daemon.imagelist import parse_list

from .kube import KUBE_RELEASES
from .rig import TEST_BIN

DEPLOY = Path(__file__).parent.parent / "deploy"
CHART = DEPLOY / "helm" / "puller"
HELM = TEST_BIN / "helm"  # built by .ci/build-components
HELM_LABELS = ("app.kubernetes.io/managed-by", "helm.sh/chart")
SOURCES = ["--set", "sources.workloadSelector=puller.io/prefetch=true", "--set", "pullSecretNamespaces={ml,web}"]


def helm(*args: str) -> str:
    r = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def rendered(*args: str) -> str:
    """The chart's objects as `helm template` prints them, release puller in namespace puller."""
    return helm("template", "puller", str(CHART), "--namespace", "puller", *args)


def template(*args: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(rendered(*args)) if d]


def kustomize(path: Path) -> list[dict]:
    kubectl = KUBE_RELEASES["1.37"] / "kubectl"
    out = subprocess.run([str(kubectl), "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def keyed(docs: list[dict]) -> dict[tuple[str, str, str | None], dict]:
    return {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")): d for d in docs}


def comparable(doc: dict) -> dict:
    """``doc`` without what Helm adds on purpose (its labels, the settings checksum), ConfigMap data parsed."""
    doc = copy.deepcopy(doc)
    labels = doc["metadata"].get("labels", {})
    for key in HELM_LABELS:
        labels.pop(key, None)
    if doc["kind"] == "DaemonSet":
        doc["spec"]["template"]["metadata"].pop("annotations", None)
    if doc["kind"] == "ConfigMap":
        doc["data"] = {k: yaml.safe_load(v) for k, v in doc["data"].items()}
    return doc


def test_the_chart_lints():
    out = helm("lint", str(CHART), "--strict")
    assert "0 chart(s) failed" in out
    helm("lint", str(CHART), "--strict", *SOURCES)


def test_default_values_render_what_kustomize_renders_from_deploy():
    charted, kustomized = keyed(template()), keyed(kustomize(DEPLOY))
    assert charted.keys() == kustomized.keys()
    pods = charted[("DaemonSet", "puller", "puller")]["spec"]["template"]
    assert set(pods["metadata"]["annotations"]) == {"checksum/settings"}
    for key, doc in charted.items():
        assert set(HELM_LABELS) <= set(doc["metadata"]["labels"]), key
        assert comparable(doc) == comparable(kustomized[key]), key


def test_cluster_sources_and_pull_secret_namespaces_add_deploy_sources_rbac():
    base, charted = keyed(template()), keyed(template(*SOURCES))
    added = {k: v for k, v in charted.items() if k not in base}
    wanted = keyed(kustomize(DEPLOY / "sources"))
    secrets_role = [d for d in yaml.safe_load_all((DEPLOY / "sources" / "pull-secrets.yaml").read_text()) if d]
    for ns in ("ml", "web"):
        for doc in secrets_role:
            doc = {**doc, "metadata": {**doc["metadata"], "namespace": ns}}
            wanted[(doc["kind"], doc["metadata"]["name"], ns)] = doc
    assert added.keys() == wanted.keys()
    for key, doc in added.items():
        assert comparable(doc) == comparable(wanted[key]), key
    settings = yaml.safe_load(charted[("ConfigMap", "puller", "puller")]["data"]["puller.yaml"])
    assert settings["workload_selector"] == "puller.io/prefetch=true"
    assert settings["pull_secret_namespaces"] == ["ml", "web"]
    checksum = "checksum/settings"
    ds = ("DaemonSet", "puller", "puller")
    before = base[ds]["spec"]["template"]["metadata"]["annotations"][checksum]
    assert charted[ds]["spec"]["template"]["metadata"]["annotations"][checksum] != before  # settings roll the pods


@pytest.mark.parametrize("values", [[], SOURCES, ["--set", "startupTaint=", "--set", "networkPolicy.enabled=false"]])
def test_every_rendered_object_validates_against_the_kubernetes_schema(values):
    for doc in template(*values):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_a_node_with_other_paths_gets_them_mounted_and_configured():
    """k3s keeps containerd's socket and root elsewhere: one value each moves the hostPath, the mount and the
    setting together."""
    sock, root = "/run/k3s/containerd/containerd.sock", "/var/lib/rancher/k3s/agent/containerd"
    docs = keyed(template("--set", f"node.containerdSocket={sock}", "--set", f"node.containerdRoot={root}"))
    settings = yaml.safe_load(docs[("ConfigMap", "puller", "puller")]["data"]["puller.yaml"])
    assert settings["containerd_address"] == sock and settings["containerd_root"] == root
    pod = docs[("DaemonSet", "puller", "puller")]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert mounts["containerd-socket"] == paths["containerd-socket"] == sock
    assert mounts["containerd-root"] == paths["containerd-root"] == root


def test_values_reach_the_settings_puller_reads():
    docs = keyed(template("--set", "startupTaint=", "--set", "store=overlaybd", "--set", "images={busybox:1.36}"))
    data = docs[("ConfigMap", "puller", "puller")]["data"]
    settings = yaml.safe_load(data["puller.yaml"])
    assert settings["startup_taint"] is None and settings["store"] == "overlaybd"
    assert yaml.safe_load(data["images.yaml"]) == {"images": ["busybox:1.36"]}
    assert ("NetworkPolicy", "puller", "puller") in docs
    assert config.apply(config.Settings(), settings, where="chart").store == "overlaybd"  # keys puller knows
    assert parse_list(data["images.yaml"], "chart images.yaml")
