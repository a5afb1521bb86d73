"""deploy/ is installable and consistent: every object validates against the Kubernetes schemas
(kubernetes-validate, offline), and the pieces agree with each other and with puller's own settings."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from puller import config
from puller.daemon.imagelist import parse_list

DEPLOY = Path(__file__).parent.parent / "deploy"
K8S_VERSION = "1.30.0"


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def objects() -> dict[tuple[str, str], dict]:
    kustomization = load("kustomization.yaml")[0]
    out = {}
    for name in kustomization["resources"]:
        for doc in load(name):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.mark.parametrize(
    "name",
    sorted(
        str(p.relative_to(DEPLOY))
        for p in DEPLOY.rglob("*.yaml")
        if p.name != "kustomization.yaml" and "helm" not in p.relative_to(DEPLOY).parts  # the chart: test_helm.py
    ),
)
def test_every_manifest_validates_against_the_kubernetes_schema(name):
    for doc in load(name):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on unknown or missing fields


def test_the_pieces_agree():
    objs = objects()
    kustomization = load("kustomization.yaml")[0]
    assert all((DEPLOY / r).exists() for r in kustomization["resources"])
    ns = kustomization["namespace"]
    assert objs[("Namespace", ns)]
    for (kind, _), doc in objs.items():
        if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == ns

    ds = objs[("DaemonSet", "puller")]
    pod = ds["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = objs[("Service", "puller")]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"].items() <= labels.items()
    from puller.cli import DEFAULT_DAEMON_NAMESPACE, DEFAULT_DAEMON_SELECTOR

    key, value = DEFAULT_DAEMON_SELECTOR.split("=")
    assert labels[key] == value and ns == DEFAULT_DAEMON_NAMESPACE  # what `puller warmup` looks for by default

    # The ConfigMap holds valid puller settings and a valid image list, wired to the pod's mounts and ports.
    cm = objs[("ConfigMap", "puller")]
    settings = config.apply(config.Settings(), yaml.safe_load(cm["data"]["puller.yaml"]), where="configmap")
    assert parse_list(cm["data"]["images.yaml"], "configmap images.yaml")
    (container,) = pod["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert set(mounts.values()) <= volumes.keys()
    config_dir = next(p for p, n in mounts.items() if n == "config")
    assert volumes["config"]["configMap"]["name"] == "puller"
    assert container["args"][-1] == f"{config_dir}/puller.yaml"
    assert Path(settings.images_file).parent == Path(config_dir) and "images.yaml" in cm["data"]
    assert volumes[mounts[settings.containerd_address]]["hostPath"]["path"] == settings.containerd_address
    assert any(Path(settings.staging_dir).is_relative_to(p) for p in mounts)
    assert volumes[mounts[settings.hosts_dir]]["hostPath"]["path"] == settings.hosts_dir  # the node's mirrors
    assert volumes[mounts[settings.containerd_root]]["hostPath"]["path"] == settings.containerd_root
    port = settings.listen_address[1]
    assert container["ports"][0]["containerPort"] == port == svc["spec"]["ports"][0]["port"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert any(t.get("key") == settings.startup_taint for t in pod["spec"]["tolerations"])
    assert "memory" in container["resources"]["limits"]


def test_the_api_is_closed_and_the_daemon_is_a_node_agent():
    """The API port needs the cluster-generated token and admits only the warmup Job's pods; probes and metrics
    have their own port, open; the pods carry what node agents carry."""
    objs = objects()
    cm = objs[("ConfigMap", "puller")]
    settings = config.apply(config.Settings(), yaml.safe_load(cm["data"]["puller.yaml"]), where="configmap")
    assert not settings.listen_is_loopback and settings.api_token_file and settings.probe_listen
    assert not settings.api_allow_unauthenticated and not settings.api_allow_pin
    secret = objs[("Secret", "puller-api-token")]
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"]["kubernetes.io/service-account.name"] == "puller-warmup"

    def token_mount(pod_spec: dict) -> str:
        (volume,) = [v for v in pod_spec["volumes"] if v.get("secret", {}).get("secretName") == "puller-api-token"]
        mounts = [m for c in pod_spec["containers"] for m in c.get("volumeMounts", []) if m["name"] == volume["name"]]
        (item,) = volume["secret"]["items"]
        assert item["key"] == "token" and len(mounts) == 1
        return f"{mounts[0]['mountPath']}/{item['path']}"

    pod = objs[("DaemonSet", "puller")]["spec"]["template"]["spec"]
    assert token_mount(pod) == settings.api_token_file
    job = load("warmup-job.yaml")[0]["spec"]["template"]
    args = job["spec"]["containers"][0]["args"]
    assert args[args.index("--token-file") + 1] == token_mount(job["spec"])

    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    api_port, probe_port = settings.listen_address[1], config.address(settings.probe_listen)[1]
    assert ports == {"api": api_port, "probes": probe_port}
    assert container["readinessProbe"]["httpGet"]["port"] == container["livenessProbe"]["httpGet"]["port"] == "probes"
    policy = objs[("NetworkPolicy", "puller")]["spec"]
    assert (
        policy["podSelector"]["matchLabels"].items()
        <= objs[("DaemonSet", "puller")]["spec"]["template"]["metadata"]["labels"].items()
    )
    api_rule, probe_rule = policy["ingress"]
    assert [p["port"] for p in api_rule["ports"]] == [api_port]
    assert api_rule["from"][0]["podSelector"]["matchLabels"].items() <= job["metadata"]["labels"].items()
    assert [p["port"] for p in probe_rule["ports"]] == [probe_port] and "from" not in probe_rule

    assert pod["priorityClassName"] == "system-node-critical"
    quota = objs[("ResourceQuota", "puller-critical-pods")]["spec"]["scopeSelector"]["matchExpressions"][0]
    assert quota["scopeName"] == "PriorityClass" and quota["values"] == ["system-node-critical"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert job["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert {"operator": "Exists"} in pod["tolerations"]  # every taint, NoSchedule and NoExecute alike
    ns = objs[("Namespace", "puller")]["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "privileged"  # hostPath volumes need it
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]


def test_rbac_is_least_privilege():
    objs = objects()
    ds = objs[("DaemonSet", "puller")]
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "puller"
    gate = objs[("ClusterRole", "puller-startup-gate")]
    assert gate["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    binding = objs[("ClusterRoleBinding", "puller-startup-gate")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "puller", "namespace": "puller"}]
    warmup = objs[("Role", "puller-warmup")]
    assert warmup["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    job = load("warmup-job.yaml")[0]
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "puller-warmup"
    assert objs[("RoleBinding", "puller-warmup")]["subjects"][0]["name"] == "puller-warmup"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] == "warmup"


def test_the_image_is_reproducible_and_ci_installs_the_same_versions():
    """The Dockerfile's base is pinned by digest, and it and CI install from the same constraints.txt, which pins
    every dependency puller declares; what this machine runs is what it pins."""
    import re
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = DEPLOY.parent
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", base), base
    assert "-c constraints.txt" in dockerfile and "COPY pyproject.toml README.md constraints.txt" in dockerfile
    assert "-c constraints.txt" in (root / ".ci" / "install").read_text()
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for text in declared:
        name = canonicalize_name(Requirement(text).name)
        assert name in pins, f"{name} is not pinned in constraints.txt (run .ci/freeze-constraints)"
        assert metadata.version(name) == pins[name], f"{name}: installed {metadata.version(name)}, pinned {pins[name]}"
