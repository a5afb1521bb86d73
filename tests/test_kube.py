"""deploy/ against a real Kubernetes API server (tests/kube.py: etcd and kube-apiserver of each tested release):
every object accepted, and deploy/'s RBAC exactly enough: the daemon's ServiceAccount, with a token from the
TokenRequest API, removes its node's start-up taint through puller's own code and can do nothing else it was not
given; the warmup Job's account lists pods in its namespace and nothing more."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from puller.daemon.node import remove_node_taint
from puller.errors import KubernetesError

from .conftest import run_puller
from .daemon_rig import Daemon
from .kube import BRIDGE, KUBE_RELEASES, LOOPBACK_CNI, ControlPlane, Kubelet, bridge_cni
from .rig import Containerd, CRIConfig, LayoutWriter, Nginx, Registry, skopeo_push

pytestmark = pytest.mark.kube

DEPLOY = Path(__file__).parent.parent / "deploy"
TAINT = "puller.io/prefetch"
CLUSTER_AUTOSCALER_TAINT = "startup-taint.cluster-autoscaler.kubernetes.io/puller"
NODE_CONTAINERD = "2.4"  # the containerd release under the tests' kubelets


@pytest.fixture(scope="module", params=sorted(KUBE_RELEASES))
def cluster(workdir: Path, request):
    """A control plane of each tested Kubernetes release with deploy/ applied; kubelets in these tests run on
    containerd 2.4."""
    with ControlPlane(workdir / f"kube-{request.param}", request.param) as cp:
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


def test_the_charts_objects_with_cluster_sources_are_accepted_by_the_api_server(cluster: ControlPlane):
    """deploy/helm/puller rendered with the cluster sources and pull-secret namespaces on: every object passes the
    API server's strict validation and admission (a server-side dry run: applied for real, its ClusterRoleBinding
    would rebind the account deploy/'s objects give to the other tests)."""
    from .test_helm import SOURCES
    from .test_helm import rendered as chart

    for ns in ("ml", "web"):
        cluster.kubectl("create", "namespace", ns, check=False)
    rendered = chart(*SOURCES)
    r = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=rendered)
    kinds = {line.split("/")[0] for line in r.stdout.splitlines() if "(server dry run)" in line}
    rbac = "rbac.authorization.k8s.io"
    assert {"daemonset.apps", "configmap", f"clusterrole.{rbac}", f"role.{rbac}"} <= kinds
    assert r.stdout.count("(server dry run)") == len([d for d in yaml.safe_load_all(rendered) if d])


def test_the_cluster_generates_the_api_token_and_admits_the_node_agent_pods(cluster: ControlPlane):
    """deploy/'s API token Secret is filled in by the cluster; a pod of the DaemonSet's template passes admission
    in the puller namespace (Pod Security, the system-node-critical priority within its quota) and so does the
    warmup Job."""
    cluster.start_controller_manager()  # its token controller fills in the Secret
    token = ("get", "secret", "puller-api-token", "-n", "puller", "-o", "jsonpath={.data.token}")
    _until(lambda: cluster.kubectl(*token).stdout.strip() != "", 60, "the token controller to fill the Secret")
    assert len(base64.b64decode(cluster.kubectl(*token).stdout)) > 32
    ds = json.loads(cluster.kubectl("get", "daemonset", "puller", "-n", "puller", "-o", "json").stdout)
    template = ds["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "admission-check", "namespace": "puller", "labels": template["metadata"]["labels"]},
        "spec": {**template["spec"], "nodeName": "no-such-node"},
    }
    r = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod), check=False)
    assert r.returncode == 0, r.stderr
    admitted = json.loads(r.stdout)["spec"]
    assert admitted["priorityClassName"] == "system-node-critical" and admitted["priority"] == 2000001000
    job = cluster.kubectl("create", "--dry-run=server", "-f", str(DEPLOY / "warmup-job.yaml"), check=False)
    assert job.returncode == 0, job.stderr


def _node(cluster: ControlPlane, name: str, taints: list[dict], labels: dict[str, str] | None = None) -> None:
    meta = {"name": name, "labels": labels or {}}
    node = {"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": {"taints": taints}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(node))


def _taints(cluster: ControlPlane, name: str) -> list[str]:
    node = json.loads(cluster.kubectl("get", "node", name, "-o", "json").stdout)
    return [t["key"] for t in node["spec"].get("taints", [])]


@pytest.mark.parametrize("key", [TAINT, CLUSTER_AUTOSCALER_TAINT])
async def test_the_daemon_account_removes_its_start_up_taint_and_nothing_else(
    cluster: ControlPlane, tmp_path: Path, monkeypatch, key: str
):
    """Also with the key cluster-autoscaler takes for a start-up taint (docs/deployment.md, node autoscalers)."""
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
        cri = _node_images(reg, layout, w, LOOPBACK_CNI)
        image = f"{reg.host}/test/run:v1"
        with Containerd(w / "ctrd", version=NODE_CONTAINERD, cri=cri) as ctrd, _pods_removed(ctrd):
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
                daemon = _node_daemon(cluster, w, ctrd, reg, "node-gate")
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


def test_a_job_mounting_an_image_volume_runs_with_the_registry_stopped_after_puller_prefetched_it_from_the_template(
    cluster: ControlPlane, layout, tmp_path: Path
):
    """Image volumes on a real kubelet (containerd 2.4's CRI): a labelled Job whose pod mounts an image volume with
    a subPath; puller's daemon, whose only list is the cluster source, prefetches the container's image and the
    volume's from the Job's template, and the start-up gate holds the new node until both are present; the
    registry is stopped; the Job's pod reads the file from its image volume and completes."""
    w = tmp_path
    volume_layout = LayoutWriter(w / "volume-layout")
    volume_layout.add_files_image("data", {"/data/hello.txt": (b"hello from an image volume\n", 0o644)})
    with Registry(w / "registry") as reg:
        cri = _node_images(reg, layout, w, LOOPBACK_CNI)
        image, volume = f"{reg.host}/test/run:v1", f"{reg.host}/test/data:v1"
        skopeo_push(w / "volume-layout", "data", volume)
        with Containerd(w / "ctrd", version=NODE_CONTAINERD, cri=cri) as ctrd, _pods_removed(ctrd):
            subprocess.run(ctrd.crictl("pull", cri.sandbox_image), check=True, capture_output=True)
            node_name = "node-volume"
            with Kubelet(w / "kubelet", cluster, ctrd.socket, node_name, [f"{TAINT}=pending:NoSchedule"]) as node:
                node.wait_ready()
                cluster.start_scheduler()
                cluster.start_controller_manager()
                cluster.kubectl("apply", "-k", str(DEPLOY / "sources"), "--validate=strict")
                cluster.kubectl("create", "namespace", "jobs")
                _default_account(cluster, "jobs")
                check = '[ "$(cat /vol/hello.txt)" = "hello from an image volume" ]'
                pod_spec = {
                    "hostNetwork": True,
                    "automountServiceAccountToken": False,
                    "restartPolicy": "Never",
                    "nodeSelector": {"kubernetes.io/hostname": node_name},  # not a node of an earlier test
                    "containers": [
                        {
                            "name": "job",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["/bin/busybox", "sh", "-c", check],
                            "volumeMounts": [{"name": "runtime", "mountPath": "/vol", "subPath": "data"}],
                        }
                    ],
                    "volumes": [{"name": "runtime", "image": {"reference": volume, "pullPolicy": "IfNotPresent"}}],
                }
                job = {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "metadata": {"name": "reader", "namespace": "jobs", "labels": {PREFETCH_LABEL: "true"}},
                    "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}},
                }
                _apply(cluster, job)
                sources = {"workload_selector": f"{PREFETCH_LABEL}=true", "source_namespaces": ["jobs"]}
                daemon = _node_daemon(cluster, w, ctrd, reg, node_name, **sources)
                with daemon:
                    _until(lambda: TAINT not in _taints(cluster, node_name), 120, "the start-up taint to go")
                    tags = ctrd.cri_tags()
                    assert {image, volume} <= tags, tags  # both present before the gate opened
                reg.__exit__(None, None, None)
                done = ("get", "job", "reader", "-n", "jobs", "-o", "json")
                try:
                    _until(
                        lambda: json.loads(cluster.kubectl(*done).stdout)["status"].get("succeeded") == 1,
                        120,
                        "the Job",
                    )
                except AssertionError as e:
                    described = cluster.kubectl("describe", "pods", "-n", "jobs").stdout
                    daemon_log = (w / "daemon" / "daemon.log").read_text()[-3000:]
                    raise AssertionError(f"{e}\n{described}\n{daemon_log}\n{node.log_tail()}") from None
                finally:  # the labelled Job would stay a source of later tests' daemons (its registry is gone)
                    cluster.kubectl("delete", "job", "reader", "-n", "jobs", "--cascade=orphan", "--wait=true")


def _node_daemon(cluster: ControlPlane, w: Path, ctrd: Containerd, reg: Registry, node: str, **more) -> Daemon:
    """puller's daemon for kubelet node ``node``, as the DaemonSet runs it: deploy/'s ServiceAccount, containerd's
    CRI namespace, the start-up taint; ``more`` settings on top."""
    kubeconfig = cluster.service_account_kubeconfig("puller", "puller", w / "daemon.kubeconfig")
    settings = {
        "store": "containerd",
        "containerd_address": str(ctrd.socket),
        "namespace": "k8s.io",
        "staging_dir": str(w / "staging"),
        "containerd_root": str(ctrd.workdir),
        "startup_taint": TAINT,
        "node_name": node,
        "plain_http": [reg.host],
        **more,
    }
    return Daemon(w / "daemon", settings, env={"KUBECONFIG": str(kubeconfig)})


def _node_images(reg: Registry, layout, w: Path, cni: dict) -> CRIConfig:
    """A kubelet node's images in ``reg`` (test/pause:v1, its sandbox, and test/run:v1), the hosts.toml that has
    its containerd pull them over plain HTTP, and ``cni`` as its network configuration (under ``w / "ctrd"``)."""
    skopeo_push(layout["path"], "pause", f"{reg.host}/test/pause:v1")
    skopeo_push(layout["path"], "run", f"{reg.host}/test/run:v1")
    hosts = w / "certs.d" / reg.host
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(f'server = "http://{reg.host}"\n')
    (w / "ctrd" / "cni").mkdir(parents=True)
    (w / "ctrd" / "cni" / "10-test.conflist").write_text(json.dumps(cni))
    return CRIConfig(f"{reg.host}/test/pause:v1", w / "certs.d")


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


# ---- pull secrets, cluster sources of the list, node targeting (scenarios 6, 7, 8) ------------------------------

USER, PASSWORD = "alice", "kube-s3cret"
WRONG_PASSWORD = "not-the-password"
PREFETCH_LABEL = "puller.io/prefetch"
KNATIVE_IMAGE_CRD = {  # written from the published schema of caching.internal.knative.dev/v1alpha1 Image
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "images.caching.internal.knative.dev"},
    "spec": {
        "group": "caching.internal.knative.dev",
        "names": {"kind": "Image", "plural": "images", "singular": "image", "shortNames": ["img"]},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "image": {"type": "string"},
                                    "serviceAccountName": {"type": "string"},
                                    "imagePullSecrets": {
                                        "type": "array",
                                        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
                                    },
                                },
                            },
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def private(workdir: Path, layout):
    """A registry that wants basic auth, holding test/private:v1..v6, and one without, holding test/public:*."""
    with (
        Registry(workdir / "kube-private", htpasswd={USER: PASSWORD}) as reg,
        Registry(workdir / "kube-public") as pub,
    ):
        for tag in ("v1", "v2", "v3", "v4", "v5", "v6"):
            skopeo_push(layout["path"], "small", f"{reg.host}/test/private:{tag}", creds=f"{USER}:{PASSWORD}")
        for tag in ("web", "gpu", "tpu", "plain", "pod", "file-gpu", "file-tpu", "late"):
            skopeo_push(layout["path"], "small", f"{pub.host}/test/public:{tag}")
        yield reg, pub


def _apply(cluster: ControlPlane, *objs: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))


def _default_account(cluster: ControlPlane, ns: str) -> None:
    """The controller manager makes each namespace's default account; it may not run yet: make it now."""
    _apply(cluster, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}})


def _pull_secret(namespace: str, name: str, host: str, user: str, password: str) -> dict:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = json.dumps({"auths": {host: {"auth": auth}}}).encode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(config).decode()},
    }


def _namespace_with_secrets(cluster: ControlPlane, ns: str, host: str) -> None:
    """``ns`` with deploy/sources/'s Role for pull secrets, a good secret ``regcred`` and a wrong one."""
    cluster.kubectl("apply", "-k", str(DEPLOY / "sources"), "--validate=strict")
    cluster.kubectl("create", "namespace", ns)
    _default_account(cluster, ns)
    cluster.kubectl("apply", "-n", ns, "-f", str(DEPLOY / "sources" / "pull-secrets.yaml"), "--validate=strict")
    _apply(
        cluster,
        _pull_secret(ns, "regcred", host, USER, PASSWORD),
        _pull_secret(ns, "wrong", host, USER, WRONG_PASSWORD),
    )


def _references(daemon: Daemon) -> dict[str, dict]:
    return {i["reference"]: i for i in daemon.get("/v1/images")[1]["images"]}


def test_pull_secrets_are_read_through_the_api_in_allowed_namespaces_and_never_shown(
    cluster: ControlPlane, private, tmp_path: Path
):
    """Scenario 6: list entries name kubernetes.io/dockerconfigjson Secrets; the daemon reads them with deploy/'s
    account and pulls with them; a missing, wrong, mistyped or out-of-bounds secret fails that image with an error
    that names the secret and the registry, never a password. The mounted form: the same secret as a file."""
    reg, _ = private
    ns = "secrets-test"
    _namespace_with_secrets(cluster, ns, reg.host)
    opaque = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "opaque", "namespace": ns}}
    _apply(cluster, {**opaque, "type": "Opaque", "stringData": {"password": PASSWORD}})
    cluster.kubectl("create", "namespace", "elsewhere")
    _apply(cluster, _pull_secret("elsewhere", "regcred", reg.host, USER, PASSWORD))
    kubeconfig = cluster.service_account_kubeconfig("puller", "puller", tmp_path / "daemon.kubeconfig")
    for verb, where, allowed in (("get", ns, "yes"), ("list", ns, "no"), ("get", "elsewhere", "no")):
        r = cluster.kubectl("auth", "can-i", verb, "secrets", "-n", where, kubeconfig=kubeconfig, check=False)
        assert r.stdout.strip() == allowed, (verb, where)

    image = f"{reg.host}/test/private"

    def entry(tag: str, namespace: str, name: str) -> dict:
        return {"reference": f"{image}:{tag}", "imagePullSecrets": [{"namespace": namespace, "name": name}]}

    settings = {"plain_http": [reg.host], "pull_secret_namespaces": [ns]}
    with Daemon(tmp_path / "daemon", settings, env={"KUBECONFIG": str(kubeconfig)}) as daemon:
        daemon.images.set_images(
            [
                entry("v1", ns, "regcred"),
                entry("v2", ns, "wrong"),
                entry("v3", ns, "missing"),
                entry("v4", "elsewhere", "regcred"),
                entry("v5", ns, "opaque"),
                f"{image}:v6",  # no secret, and the node has no credentials
            ]
        )
        daemon.wait_state(f"{image}:v1", "present", timeout=60)
        errors = {
            tag: daemon.wait_state(f"{image}:{tag}", "failed", timeout=60)["error"] for tag in ["v2", "v3", "v4", "v5"]
        }
        assert f"secret {ns}/wrong" in errors["v2"]
        assert f"secret {ns}/missing" in errors["v3"] and "not found" in errors["v3"]
        assert "namespace elsewhere is not in pull_secret_namespaces" in errors["v4"]
        assert "is of type Opaque" in errors["v5"]
        for error in errors.values():
            assert reg.host in error  # the registry that refused
        assert "pull secrets" not in daemon.wait_state(f"{image}:v6", "failed", timeout=60)["error"]
        log = (tmp_path / "daemon" / "daemon.log").read_text()
        dump = json.dumps(daemon.get("/v1/images")[1])
    for shown in (log, dump):
        assert PASSWORD not in shown and WRONG_PASSWORD not in shown
        assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in shown

    # The other common form: the secret mounted as a file (a Secret volume's .dockerconfigjson), as docker_config.
    secret = json.loads(cluster.kubectl("get", "secret", "regcred", "-n", ns, "-o", "json").stdout)
    mounted = tmp_path / "mounted" / ".dockerconfigjson"
    mounted.parent.mkdir()
    mounted.write_bytes(base64.b64decode(secret["data"][".dockerconfigjson"]))
    settings = {"plain_http": [reg.host], "docker_config": str(mounted)}
    with Daemon(tmp_path / "mounted-daemon", settings) as daemon:
        daemon.images.set_images([f"{image}:v6"])
        daemon.wait_state(f"{image}:v6", "present", timeout=60)


def test_the_list_comes_from_knative_images_and_labelled_workloads_meant_for_this_node(
    cluster: ControlPlane, private, tmp_path: Path
):
    """Scenarios 7 and 8: Knative caching Images (with their pull secrets and account) and the pods and Deployments
    that carry the prefetch label join the image list file's entries; entries aimed at other nodes (a workload's
    nodeSelector, an Image's puller.io/node-selector annotation, a file entry's nodeSelector) are left out. The
    start-up gate waits for them all. Removing an object (or its label) ends its prefetch; a new one starts one."""
    reg, pub = private
    ns = "team"
    _namespace_with_secrets(cluster, ns, reg.host)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(KNATIVE_IMAGE_CRD))
    cluster.kubectl("wait", "--for=condition=established", "--timeout=60s", "crd/images.caching.internal.knative.dev")
    builder = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "builder", "namespace": ns}}
    _apply(cluster, {**builder, "imagePullSecrets": [{"name": "regcred"}]})
    node = "node-gpu"
    _node(cluster, node, [{"key": TAINT, "value": "pending", "effect": "NoSchedule"}], {"accelerator": "gpu"})
    public, private_image = f"{pub.host}/test/public", f"{reg.host}/test/private"

    def knative(name: str, image: str, spec: dict | None = None, annotations: dict | None = None) -> dict:
        meta = {"name": name, "namespace": ns, "annotations": annotations or {}}
        return {
            "apiVersion": "caching.internal.knative.dev/v1alpha1",
            "kind": "Image",
            "metadata": meta,
            "spec": {"image": image, **(spec or {})},
        }

    def deployment(name: str, image: str, labelled: bool, node_selector: dict | None = None) -> dict:
        labels = {"app": name, **({PREFETCH_LABEL: "true"} if labelled else {})}
        pod_spec = {"containers": [{"name": "c", "image": image}], "nodeSelector": node_selector or {}}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
            },
        }

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "labelled", "namespace": ns, "labels": {PREFETCH_LABEL: "true"}},
        "spec": {"nodeName": "nowhere", "containers": [{"name": "c", "image": f"{public}:pod"}]},
    }
    _apply(
        cluster,
        knative("by-secret", f"{private_image}:v1", {"imagePullSecrets": [{"name": "regcred"}]}),
        knative("by-account", f"{private_image}:v2", {"serviceAccountName": "builder"}),
        knative("for-tpus", f"{private_image}:v3", annotations={"puller.io/node-selector": "accelerator=tpu"}),
        deployment("web", f"{public}:web", labelled=True),
        deployment("gpu", f"{public}:gpu", labelled=True, node_selector={"accelerator": "gpu"}),
        deployment("tpu", f"{public}:tpu", labelled=True, node_selector={"accelerator": "tpu"}),
        deployment("plain", f"{public}:plain", labelled=False),
        pod,
    )
    kubeconfig = cluster.service_account_kubeconfig("puller", "puller", tmp_path / "daemon.kubeconfig")
    settings = {
        "plain_http": [reg.host, pub.host],
        "node_name": node,
        "startup_taint": TAINT,
        "knative_images": True,
        "workload_selector": f"{PREFETCH_LABEL}=true",
        "pull_secret_namespaces": [ns],
    }
    with Daemon(tmp_path / "daemon", settings, env={"KUBECONFIG": str(kubeconfig)}) as daemon:
        daemon.images.set_images(
            [
                {"reference": f"{public}:file-gpu", "nodeSelector": {"accelerator": "gpu"}},
                {"reference": f"{public}:file-tpu", "nodeSelector": {"accelerator": "tpu"}},
            ]
        )
        _until(lambda: TAINT not in _taints(cluster, node), 90, "the start-up taint to go")
        wanted = {f"{private_image}:v1", f"{private_image}:v2"} | {
            f"{public}:{t}" for t in ("web", "gpu", "pod", "file-gpu")
        }
        images = _references(daemon)
        assert set(images) == wanted, daemon.log.read_text()[-3000:]
        assert all(i["state"] == "present" for i in images.values()), images

        cluster.kubectl("delete", "image.caching.internal.knative.dev", "by-secret", "-n", ns)
        cluster.kubectl("label", "deployment", "web", "-n", ns, f"{PREFETCH_LABEL}-")
        _apply(cluster, knative("late", f"{public}:late"))
        daemon.wait_for(
            lambda: set(_references(daemon)) == wanted - {f"{private_image}:v1", f"{public}:web"} | {f"{public}:late"},
            30,
            "the list to follow the cluster",
        )
        daemon.wait_state(f"{public}:late", "present", timeout=60)


# ---- warmup against the real API server (scenario 5) -------------------------------------------------------------


def test_warmup_finds_the_daemon_pods_by_deploy_labels_and_waits_for_every_node(
    cluster: ControlPlane, layout, tmp_path: Path
):
    """A pod labelled as deploy/'s DaemonSet labels its pods runs on a kubelet node, in its own network namespace
    (bridge CNI); puller's daemon runs in that namespace, so the pod's IP, as kubelet reports it, reaches it. With
    the warmup Job's account, `puller warmup --wait` finds it through the API, reports per node and exits 0 once
    the image is present there, and 12 when the node cannot get an image."""
    w = tmp_path
    with contextlib.ExitStack() as stack:
        reg = stack.enter_context(Registry(w / "registry"))
        cri = _node_images(reg, layout, w, bridge_cni("10.244.77.0/24", w / "ipam"))
        ctrd = stack.enter_context(Containerd(w / "ctrd", version=NODE_CONTAINERD, cri=cri))
        stack.enter_context(_pods_removed(ctrd))
        stack.enter_context(_bridge_removed())
        stack.enter_context(Kubelet(w / "kubelet", cluster, ctrd.socket, "node-warm", [])).wait_ready()
        cluster.start_scheduler()
        run = {"name": "c", "image": f"{reg.host}/test/run:v1", "command": ["/bin/busybox", "sleep", "3600"]}
        _default_account(cluster, "puller")
        # deploy/'s DaemonSet (applied for the whole session) would adopt an orphan with its labels on this node and
        # could delete it as a surplus pod: the stand-in has another controller, so it is never adopted.
        account = ("get", "serviceaccount", "default", "-n", "puller", "-o", "jsonpath={.metadata.uid}")
        owner = {"apiVersion": "v1", "kind": "ServiceAccount", "name": "default", "controller": True}
        owner["uid"] = cluster.kubectl(*account).stdout.strip()
        stand_in = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "puller-stand-in",
                "namespace": "puller",
                "labels": _daemon_labels(),
                "ownerReferences": [owner],
            },
            "spec": {"nodeName": "node-warm", "automountServiceAccountToken": False, "containers": [run]},
        }
        _apply(cluster, stand_in)
        get_pod = ("get", "pod", "puller-stand-in", "-n", "puller", "-o", "json")
        try:
            _until(lambda: json.loads(cluster.kubectl(*get_pod).stdout)["status"].get("phase") == "Running", 90, "it")
        except AssertionError:
            raise AssertionError(cluster.kubectl("describe", "pod", "-n", "puller").stdout) from None
        ip = json.loads(cluster.kubectl(*get_pod).stdout)["status"]["podIP"]
        netns = _pod_netns(ctrd, "puller-stand-in")
        # The daemon's registry is in the pod's namespace too (the tests' servers listen on loopback or there).
        pod_reg = stack.enter_context(Registry(w / "pod-registry", bind=ip, netns=netns))
        image, absent = f"{pod_reg.host}/test/warm:v1", f"{pod_reg.host}/test/absent:v1"
        skopeo_push(layout["path"], "small", image)
        token = w / "api-token"  # the API on an address other hosts reach is closed without one
        token.write_text("warm-s3cret\n")
        settings = {"plain_http": [pod_reg.host], "port": 8470, "api_token_file": str(token)}
        daemon = stack.enter_context(Daemon(w / "daemon", settings, host=ip, netns=netns))
        kubeconfig = cluster.service_account_kubeconfig("puller", "puller-warmup", w / "warmup.kubeconfig")
        env = {"KUBECONFIG": str(kubeconfig)}
        refused = run_puller("warmup", "--timeout", "10", image, env=env)
        assert refused.returncode == 12 and "401" in refused.stderr, refused.stderr
        ok = run_puller("warmup", "--wait", "--timeout", "60", "--token-file", str(token), image, env=env)
        assert ok.returncode == 0, ok.stderr
        assert "node-warm" in ok.stdout + ok.stderr
        _, status = daemon.get("/v1/images", headers={"Authorization": "Bearer warm-s3cret"})
        assert {i["reference"]: i["state"] for i in status["images"]} == {image: "present"}
        late = run_puller("warmup", "--wait", "--timeout", "8", "--token-file", str(token), absent, env=env)
        assert late.returncode == 12, late.stderr
        assert "node-warm" in late.stdout + late.stderr


def _daemon_labels() -> dict[str, str]:
    ds = next(d for d in yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()) if d)
    return ds["spec"]["template"]["metadata"]["labels"]


def _pod_netns(ctrd: Containerd, name: str) -> str:
    """The name (under /run/netns) of the network namespace of pod ``name``'s sandbox."""
    ids = subprocess.run(ctrd.crictl("pods", "--name", name, "-q"), capture_output=True, text=True, check=True)
    info = subprocess.run(ctrd.crictl("inspectp", ids.stdout.split()[0]), capture_output=True, text=True, check=True)
    namespaces = json.loads(info.stdout)["info"]["runtimeSpec"]["linux"]["namespaces"]
    return Path(next(n["path"] for n in namespaces if n["type"] == "network")).name


@contextlib.contextmanager
def _bridge_removed():
    try:
        yield
    finally:
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


# ---- image volumes with pull policy Always; kubelet's credential checks (KEP-2535) ------------------------------


SLEEP = ["/bin/busybox", "sleep", "3600"]


@contextlib.contextmanager
def _kubelet_node(
    cluster: ControlPlane, w: Path, reg: Registry, layout, name: str, kubelet_config: dict | None = None, *more_hosts
):
    """Node ``name``: containerd 2.4 with CRI (its images in ``reg``; plain HTTP to ``reg`` and ``more_hosts``), its
    sandbox image pulled, and a kubelet registered with the start-up taint, Ready; scheduler and controller manager
    running. Yields (containerd, kubelet)."""
    cri = _node_images(reg, layout, w, LOOPBACK_CNI)
    for host in more_hosts:
        (w / "certs.d" / host).mkdir(parents=True)
        (w / "certs.d" / host / "hosts.toml").write_text(f'server = "http://{host}"\n')
    with Containerd(w / "ctrd", version=NODE_CONTAINERD, cri=cri) as ctrd, _pods_removed(ctrd):
        subprocess.run(ctrd.crictl("pull", cri.sandbox_image), check=True, capture_output=True)
        taint = [f"{TAINT}=pending:NoSchedule"]
        with Kubelet(w / "kubelet", cluster, ctrd.socket, name, taint, kubelet_config) as node:
            node.wait_ready()
            cluster.start_scheduler()
            cluster.start_controller_manager()
            yield ctrd, node


def _sleeper(name: str, ns: str, node: str, image: str, secret: str | None = None, **more) -> dict:
    """A pod on ``node`` that runs ``image`` (IfNotPresent), with pull secret ``secret`` if given."""
    spec: dict = {
        "hostNetwork": True,
        "automountServiceAccountToken": False,
        "nodeSelector": {"kubernetes.io/hostname": node},
        "containers": [{"name": "c", "image": image, "imagePullPolicy": "IfNotPresent", "command": SLEEP}],
        **more,
    }
    if secret:
        spec["imagePullSecrets"] = [{"name": secret}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _phase(cluster: ControlPlane, ns: str, name: str) -> tuple[str, str]:
    """(phase, waiting reason of its first container or "") of pod ``ns/name``."""
    pod = json.loads(cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json").stdout)
    statuses = pod["status"].get("containerStatuses") or [{}]
    return pod["status"].get("phase", ""), statuses[0].get("state", {}).get("waiting", {}).get("reason", "")


def _running(cluster: ControlPlane, ns: str, name: str, node: Kubelet, phase: str = "Running") -> None:
    try:
        _until(lambda: _phase(cluster, ns, name)[0] == phase, 90, f"pod {ns}/{name} to be {phase}")
    except AssertionError as e:
        described = cluster.kubectl("describe", "pod", name, "-n", ns).stdout
        raise AssertionError(f"{e}\n{described}\n{node.log_tail()}") from None


def _prefetched_private(
    cluster: ControlPlane, w: Path, ctrd: Containerd, reg: Registry, node: str, image: str, private_host: str
) -> None:
    """puller's daemon on ``node`` (node-<ns>) pulls ``image`` with pull secret <ns>/regcred into the node's
    containerd and opens the start-up gate."""
    ns = node.removeprefix("node-")  # the namespace of the test's pods and secrets
    entry = {"reference": image, "imagePullSecrets": [{"namespace": ns, "name": "regcred"}]}
    more = {"pull_secret_namespaces": [ns], "plain_http": [reg.host, private_host]}
    daemon = _node_daemon(cluster, w, ctrd, reg, node, **more)
    daemon.images.set_images([entry])
    with daemon:
        _until(lambda: TAINT not in _taints(cluster, node), 120, "the start-up taint to go")


@contextlib.contextmanager
def _private_registry(w: Path, layout):
    """A registry wanting basic auth (USER, PASSWORD), logging its requests, that holds test/private:run (busybox)."""
    with Registry(w / "private", htpasswd={USER: PASSWORD}, access_log=True) as reg:
        skopeo_push(layout["path"], "run", f"{reg.host}/test/private:run", creds=f"{USER}:{PASSWORD}")
        yield reg


def test_under_kubelets_default_policy_a_private_image_puller_prefetched_with_a_secret_starts_with_the_registry_down(
    cluster: ControlPlane, layout, tmp_path: Path
):
    """KubeletEnsureSecretPulledImages, default policy NeverVerifyPreloadedImages: an image puller pulled (outside
    kubelet) counts as preloaded. A pod with imagePullSecrets and IfNotPresent starts from the private image puller
    prefetched with that secret while its registry is stopped; so does a pod of a namespace without the secret
    (preloaded images are not verified: the policy that forbids it is AlwaysVerify, tested below)."""
    w, ns, node_name = tmp_path, "creds-default", "node-creds-default"
    with Registry(w / "registry") as reg, _private_registry(w, layout) as private:
        image = f"{private.host}/test/private:run"
        with _kubelet_node(cluster, w, reg, layout, node_name, None, private.host) as (ctrd, node):
            _namespace_with_secrets(cluster, ns, private.host)
            _prefetched_private(cluster, w, ctrd, reg, node_name, image, private.host)
            private.__exit__(None, None, None)
            cluster.kubectl("create", "namespace", "creds-other")
            _default_account(cluster, "creds-other")
            _apply(
                cluster,
                _sleeper("with-secret", ns, node_name, image, "regcred"),
                _sleeper("without", "creds-other", node_name, image),
            )
            try:
                _running(cluster, ns, "with-secret", node)
                _running(cluster, "creds-other", "without", node)
            finally:
                cluster.kubectl("delete", "namespace", ns, "creds-other", "--wait=false")


def test_under_always_verify_kubelet_checks_each_pods_secret_with_the_registry_and_fetches_no_blob(
    cluster: ControlPlane, layout, tmp_path: Path
):
    """KubeletEnsureSecretPulledImages with imagePullCredentialsVerificationPolicy AlwaysVerify: a pod's use of an
    image puller prefetched is checked by a pull through the CRI with the pod's credentials. With the right secret
    the pod runs and the registry sees manifest requests only, never a blob; with a wrong secret, or none, the
    pod is refused the image that is on the node. Once checked, the secret is on kubelet's record: another pod with
    it starts with the registry stopped."""
    w, ns, node_name = tmp_path, "creds-verify", "node-creds-verify"
    policy = {"imagePullCredentialsVerificationPolicy": "AlwaysVerify"}
    with Registry(w / "registry") as reg, _private_registry(w, layout) as private:
        image = f"{private.host}/test/private:run"
        with _kubelet_node(cluster, w, reg, layout, node_name, policy, private.host) as (ctrd, node):
            _namespace_with_secrets(cluster, ns, private.host)
            _prefetched_private(cluster, w, ctrd, reg, node_name, image, private.host)
            before = len(private.requests())
            try:
                _apply(cluster, _sleeper("with-secret", ns, node_name, image, "regcred"))
                _running(cluster, ns, "with-secret", node)
                asked = private.requests()[before:]
                # The check is containerd resolving the tag with the pod's secret: HEAD of the manifest (a 401,
                # then with basic auth a 200); no GET of the manifest, no blob.
                assert {(m, p) for m, p, _, _ in asked} == {("HEAD", "/v2/test/private/manifests/run")}, asked
                assert [s for *_, s, agent in asked if "containerd" in agent][-1] == 200, asked
                _apply(
                    cluster,
                    _sleeper("wrong-secret", ns, node_name, image, "wrong"),
                    _sleeper("no-secret", ns, node_name, image),
                )
                refusals = ("ErrImagePull", "ImagePullBackOff")
                for name in ("wrong-secret", "no-secret"):
                    _until(lambda n=name: _phase(cluster, ns, n)[1] in refusals, 90, f"{name} to be refused")
                time.sleep(3)
                for name in ("wrong-secret", "no-secret"):
                    assert _phase(cluster, ns, name)[0] == "Pending"
                # kubelet recorded the check: another pod with the same secret starts with the registry down.
                private.__exit__(None, None, None)
                _apply(cluster, _sleeper("same-secret", ns, node_name, image, "regcred"))
                _running(cluster, ns, "same-secret", node)
            finally:
                cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_an_image_volume_with_pull_policy_always_starts_its_pod_with_no_blob_fetched_after_puller_prefetched_it(
    cluster: ControlPlane, layout, tmp_path: Path
):
    """Image volumes, ``pullPolicy: Always``: kubelet pulls through the CRI at every pod start; once puller's
    daemon prefetched the image from the pod's template, that pull finds every blob in containerd: the registry
    answers manifest requests and its blob CDN serves nothing."""
    w, node_name = tmp_path, "node-volume-always"
    volume_layout = LayoutWriter(w / "volume-layout")
    volume_layout.add_files_image("data", {"/data/hello.txt": (b"always\n", 0o644)})
    with (
        Nginx(w / "cdn", w / "registry" / "storage") as cdn,
        Registry(w / "registry", redirect_base=cdn.url + "/", access_log=True) as reg,
    ):
        volume = f"{reg.host}/test/data:v1"
        skopeo_push(w / "volume-layout", "data", volume)
        with _kubelet_node(cluster, w, reg, layout, node_name) as (ctrd, node):
            ns = "volume-always"
            cluster.kubectl("apply", "-k", str(DEPLOY / "sources"), "--validate=strict")
            cluster.kubectl("create", "namespace", ns)
            _default_account(cluster, ns)
            pod = _sleeper("reader", ns, node_name, f"{reg.host}/test/run:v1")
            pod["metadata"]["labels"] = {PREFETCH_LABEL: "true"}
            pod["spec"]["restartPolicy"] = "Never"
            check = '[ "$(cat /vol/hello.txt)" = always ]'
            pod["spec"]["containers"][0]["command"] = ["/bin/busybox", "sh", "-c", check]
            pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "v", "mountPath": "/vol", "subPath": "data"}]
            pod["spec"]["volumes"] = [{"name": "v", "image": {"reference": volume, "pullPolicy": "Always"}}]
            cdn_before, registry_before = len(cdn.requests()), len(reg.requests())  # the node's sandbox pull
            _apply(cluster, pod)
            sources = {"workload_selector": f"{PREFETCH_LABEL}=true", "source_namespaces": [ns]}
            try:
                with _node_daemon(cluster, w, ctrd, reg, node_name, **sources):
                    _until(lambda: TAINT not in _taints(cluster, node_name), 120, "the start-up taint to go")
                _running(cluster, ns, "reader", node, "Succeeded")  # it read the volume's file
                assert not [r for r in cdn.requests()[cdn_before:] if "containerd" in r]  # not one blob
                asked = [(m, p, s) for m, p, s, agent in reg.requests()[registry_before:] if "containerd" in agent]
                assert ("HEAD", "/v2/test/data/manifests/v1", 200) in asked, asked  # kubelet's Always pull
                assert not any("/blobs/" in p for _, p, _ in asked), asked
            finally:
                cluster.kubectl("delete", "namespace", ns, "--wait=false")


# ---- the DaemonSet as real pods: deploy/ and the chart, with the node image of deploy/build-image -----------------

POD_NET = "10.244.79"  # the pods' bridge network of the DaemonSet test


def _daemonset_overlay(w: Path, reg: Registry, ctrd: Containerd, images: list[str]) -> Path:
    """A kustomize overlay of deploy/ for this node: the node image in ``reg``, the node's paths (containerd's
    socket and root, its hosts.toml, puller's state) as hostPaths, deploy/'s settings with plain HTTP to ``reg``
    (the tests' registry), and ``images`` as the list."""
    overlay = w / "overlay"
    overlay.mkdir()
    settings = yaml.safe_load(
        next(d for d in yaml.safe_load_all((DEPLOY / "configmap.yaml").read_text()) if d)["data"]["puller.yaml"]
    )
    settings["plain_http"] = [reg.host]
    host_paths = {
        "containerd-socket": str(ctrd.socket),
        "containerd-root": str(ctrd.workdir),
        "registry-hosts": str(w / "certs.d"),
        "staging": str(w / "state"),
    }
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "puller", "namespace": "puller"},
        "spec": {
            "template": {
                "spec": {"volumes": [{"name": name, "hostPath": {"path": path}} for name, path in host_paths.items()]}
            }
        },
    }
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "puller", "namespace": "puller"},
        "data": {"puller.yaml": yaml.safe_dump(settings), "images.yaml": yaml.safe_dump({"images": images})},
    }
    (overlay / "daemonset.yaml").write_text(json.dumps(daemonset))
    (overlay / "configmap.yaml").write_text(json.dumps(configmap))
    base_image = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["images"][0]["newName"]
    kustomization = {
        "resources": [os.path.relpath(DEPLOY, overlay)],
        "images": [{"name": base_image, "newName": f"{reg.host}/puller", "newTag": "v1"}],
        "patches": [{"path": "daemonset.yaml"}, {"path": "configmap.yaml"}],
    }
    (overlay / "kustomization.yaml").write_text(json.dumps(kustomization))
    return overlay


def _chart_values(w: Path, reg: Registry, ctrd: Containerd, images: list[str], tag: str) -> Path:
    """Values for deploy/helm/puller with the same node, image list and registry as :func:`_daemonset_overlay`."""
    values = {
        "image": {"repository": f"{reg.host}/puller", "tag": tag},
        "images": images,
        "node": {
            "containerdSocket": str(ctrd.socket),
            "containerdRoot": str(ctrd.workdir),
            "hostsDir": str(w / "certs.d"),
            "stateDir": str(w / "state"),
        },
        "settings": {"plain_http": [reg.host]},  # merged into the chart's own settings
        "applyWhileDownloading": True,
    }
    path = w / "values.yaml"
    path.write_text(json.dumps(values))
    return path


def _daemon_pods(cluster: ControlPlane, node: str) -> list[dict]:
    selector = ",".join(f"{k}={v}" for k, v in _daemon_labels().items())
    pods = json.loads(cluster.kubectl("get", "pods", "-n", "puller", "-l", selector, "-o", "json").stdout)["items"]
    return [p for p in pods if p["spec"].get("nodeName") == node]


def _ready_daemon(cluster: ControlPlane, node: str, image: str) -> dict | None:
    """The node's daemon pod running ``image``, once it is Ready and the only one there."""
    pods = _daemon_pods(cluster, node)
    if (
        len(pods) != 1
        or pods[0]["spec"]["containers"][0]["image"] != image
        or pods[0]["metadata"].get("deletionTimestamp")
    ):
        return None
    conditions = pods[0]["status"].get("conditions", [])
    return pods[0] if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None


def _container_logs(ctrd: Containerd, name: str) -> list[str]:
    """What the containers named ``name`` on the node wrote (stderr: puller logs there)."""
    ids = subprocess.run(ctrd.crictl("ps", "-a", "-q", "--name", name), capture_output=True, text=True)
    return [subprocess.run(ctrd.crictl("logs", i), capture_output=True, text=True).stderr for i in ids.stdout.split()]


def test_the_daemonset_runs_as_pods_opens_the_gate_answers_warmup_and_rolls_over_keeping_the_images(
    cluster: ControlPlane, layout, node_image: Path, tmp_path: Path
):
    """deploy/'s DaemonSet as real pods of puller's node image (deploy/build-image) on a kubelet node with the
    start-up taint, pods on a bridge network: the pod becomes Ready, prefetches its list into the node's containerd
    through the API server's ClusterIP (its ServiceAccount token, in-cluster), removes the taint; the Service's
    endpoints name it; deploy/'s warmup Job, run as a pod, gets an image onto the node through its API port and
    token. Then the chart's objects with a new image and applyWhileDownloading roll the DaemonSet over: the list
    stays on the node throughout, no blob of it is fetched again, the new pod is Ready and applies the layers of the
    next image while they download (capabilities added, containerd's root writable)."""
    from .p2p import Bridge
    from .test_helm import rendered as chart

    w, node_name = tmp_path, "node-ds"
    for stale in json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]:
        # earlier tests' nodes (their kubelets are gone): the DaemonSet would keep pods pending there
        cluster.kubectl("delete", "node", stale["metadata"]["name"], "--wait=false")
    # and their pods labelled as the daemon's (which warmup would wait for)
    cluster.kubectl("delete", "pods", "-n", "puller", "--all", "--force", "--grace-period=0")
    try:
        with contextlib.ExitStack() as stack:
            bridge = stack.enter_context(Bridge(BRIDGE, POD_NET))  # the pods' bridge, and its address for the registry
            reg = stack.enter_context(Registry(w / "registry", bind=bridge.ip, access_log=True))
            cri = _node_images(reg, layout, w, bridge_cni(f"{POD_NET}.0/24", w / "ipam", default_route=True))
            for tag in ("v1", "v2"):
                skopeo_push(node_image, tag, f"{reg.host}/puller:{tag}")
            listed, warm = f"{reg.host}/test/run:v1", f"{reg.host}/test/warm:v1"
            skopeo_push(layout["path"], "small", warm)
            ctrd = stack.enter_context(Containerd(w / "ctrd", version=NODE_CONTAINERD, cri=cri))
            stack.enter_context(_pods_removed(ctrd))
            stack.enter_context(cluster.served_on(bridge.name))
            subprocess.run(ctrd.crictl("pull", cri.sandbox_image), check=True, capture_output=True)
            node = stack.enter_context(
                Kubelet(w / "kubelet", cluster, ctrd.socket, node_name, [f"{TAINT}=pending:NoSchedule"])
            )
            node.wait_ready()
            cluster.start_scheduler()
            cluster.start_controller_manager()

            def diagnosis() -> str:
                described = cluster.kubectl("describe", "pods", "-n", "puller").stdout
                logs = "\n".join(log[-3000:] for log in _container_logs(ctrd, "puller"))
                return f"{described}\n{logs}\n{node.log_tail()}"

            # deploy/, as kustomize renders it for this node
            overlay = _daemonset_overlay(w, reg, ctrd, [listed])
            r = cluster.kubectl("apply", "-k", str(overlay), "--validate=strict", check=False)
            assert r.returncode == 0, r.stderr
            v1 = f"{reg.host}/puller:v1"
            try:
                _until(lambda: _ready_daemon(cluster, node_name, v1) is not None, 180, "the daemon pod to be Ready")
                _until(lambda: TAINT not in _taints(cluster, node_name), 120, "the start-up taint to go")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{diagnosis()}") from None
            assert listed in ctrd.cri_tags()
            pod = _ready_daemon(cluster, node_name, v1)
            assert pod is not None
            ip = pod["status"]["podIP"]
            assert ip.startswith(POD_NET + "."), ip  # its own network namespace, not the host's

            # the Service selects it, with both ports
            slices = cluster.kubectl(
                "get", "endpointslices", "-n", "puller", "-l", "kubernetes.io/service-name=puller", "-o", "json"
            )
            items = json.loads(slices.stdout)["items"]
            addresses = {a for s in items for e in s.get("endpoints") or [] for a in e["addresses"]}
            ports = {p["name"]: p["port"] for s in items for p in s.get("ports") or []}
            assert ip in addresses and ports == {"api": 8470, "probes": 8471}, items

            # deploy/'s warmup Job, as a pod: finds the daemon through the API, asks it with the token, waits
            job = yaml.safe_load((DEPLOY / "warmup-job.yaml").read_text())
            container = job["spec"]["template"]["spec"]["containers"][0]
            container["image"] = v1
            container["args"] = [*container["args"][:-1], warm]
            created = cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(job))
            job_name = json.loads(created.stdout)["metadata"]["name"]
            status = ("get", "job", job_name, "-n", "puller", "-o", "json")
            try:
                _until(lambda: json.loads(cluster.kubectl(*status).stdout)["status"].get("succeeded") == 1, 120, "it")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{diagnosis()}") from None
            assert warm in ctrd.cri_tags()
            # as shipped (capabilities dropped, containerd's root read-only) layers go through the Diff service
            daemon_log = "\n".join(_container_logs(ctrd, "puller"))
            assert "layers applied by diff: puller lacks CAP_CHOWN" in daemon_log, daemon_log
            assert "WARNING" not in daemon_log, daemon_log

            # the chart's objects with image v2: a rolling update
            values = _chart_values(w, reg, ctrd, [listed], "v2")
            before = len(reg.requests())
            cluster.kubectl("apply", "-f", "-", input=chart("-f", str(values)))
            v2 = f"{reg.host}/puller:v2"
            missing: list[set[str]] = []

            def rolled_over() -> bool:
                tags = ctrd.cri_tags()
                if listed not in tags or warm not in tags:
                    missing.append(tags)
                return _ready_daemon(cluster, node_name, v2) is not None

            try:
                _until(rolled_over, 180, "the new daemon pod to be Ready")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{diagnosis()}") from None
            assert not missing, missing  # the list stayed on the node while the daemon was replaced
            refetched = [r for r in reg.requests()[before:] if r[1].startswith("/v2/test/run/blobs/")]
            assert not refetched, refetched
            assert TAINT not in _taints(cluster, node_name)

            # with applyWhileDownloading the new pod applies layers while they download, into containerd's snapshots
            streamed = f"{reg.host}/test/streamed:v1"
            skopeo_push(layout["path"], "app", streamed)
            new_pod = _ready_daemon(cluster, node_name, v2)
            assert new_pod is not None
            token = w / "api-token"
            secret = ("get", "secret", "puller-api-token", "-n", "puller", "-o", "jsonpath={.data.token}")
            token.write_bytes(base64.b64decode(cluster.kubectl(*secret).stdout))
            endpoint = f"http://{new_pod['status']['podIP']}:8470"
            asked = ("--endpoints", endpoint, "--token-file", str(token), streamed)
            ok = run_puller("warmup", "--wait", "--timeout", "60", *asked)
            assert ok.returncode == 0, f"{ok.stderr}\n{diagnosis()}"
            assert streamed in ctrd.cri_tags()
            logs = _container_logs(ctrd, "puller")
            assert any("layers applied by stream: " in log for log in logs), logs
            assert not any("WARNING" in log for log in logs), logs
    finally:
        cluster.kubectl("apply", "-k", str(DEPLOY))  # deploy/ as the module's other tests know it
