"""The Kubernetes API, for what puller asks of it about one node and its credentials: remove this node's start-up
taint, read its labels, read pull secrets, and find the daemon pods (for ``puller warmup``). kubernetes_asyncio,
with the in-cluster service account when running in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config).
The watched sources of the image list are in sources.py.

The calls, which deploy/'s RBAC allows and nothing more:
- ``GET /api/v1/nodes/{name}`` and ``PATCH /api/v1/nodes/{name}`` (JSON patch: test the taint's key at its
  index, then remove it; if the list changed meanwhile the test fails and the node is read again);
- ``GET /api/v1/namespaces/{ns}/secrets/{name}`` and ``.../serviceaccounts/{name}``, only in the namespaces
  ``pull_secret_namespaces`` names (deploy/sources/pull-secrets.yaml is the Role for one);
- ``GET /api/v1/namespaces/{ns}/pods?labelSelector=...`` (warmup only).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ..errors import ConfigError, KubernetesError
from ..registry.auth import Credentials, parse_docker_config
from .imagelist import KubeRef

log = logging.getLogger(__name__)

PATCH_ATTEMPTS = 5
SECRET_TYPES = {"kubernetes.io/dockerconfigjson": ".dockerconfigjson", "kubernetes.io/dockercfg": ".dockercfg"}
MAX_SERVICE_ACCOUNT_SECRETS = 16
CALL_TIMEOUT_S = 30  # one API call, answer and body


@asynccontextmanager
async def kube_api() -> AsyncIterator:
    """An ApiClient configured in-cluster or from kubeconfig (the big client package is imported only here)."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            # $KUBECONFIG read now: the client library reads it once, when it is first imported.
            await config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    except (config.ConfigException, OSError, TypeError) as e:
        raise KubernetesError(f"no Kubernetes API access (not in a pod, and no usable kubeconfig): {e}") from None
    async with client.ApiClient(configuration) as api:
        yield api


def _api_error(e: Exception, what: str) -> KubernetesError:
    status = getattr(e, "status", None)
    hints = {401: "unauthorized", 403: "forbidden: check the RBAC rules in deploy/", 404: "not found"}
    hint = hints.get(status, "") if isinstance(status, int) else ""
    return KubernetesError(f"{what}: {status or ''} {hint or e}".strip())


async def remove_node_taint(node_name: str, taint_key: str) -> int:
    """Remove every taint with ``taint_key`` from ``node_name``; return how many were removed (0: none there)."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    async with kube_api() as api:
        core = client.CoreV1Api(api)
        for _ in range(PATCH_ATTEMPTS):
            try:
                node = await core.read_node(node_name)
            except ApiException as e:
                raise _api_error(e, f"reading node {node_name}") from None
            taints = node.spec.taints or []
            indexes = [i for i, t in enumerate(taints) if t.key == taint_key]
            if not indexes:
                return 0
            patch = []
            for i in reversed(indexes):  # highest first, so earlier indexes stay valid
                patch += [
                    {"op": "test", "path": f"/spec/taints/{i}/key", "value": taint_key},
                    {"op": "remove", "path": f"/spec/taints/{i}"},
                ]
            try:
                await core.patch_node(node_name, patch)
                return len(indexes)
            except ApiException as e:
                if e.status in (409, 422):  # the taints changed under us: read again
                    continue
                raise _api_error(e, f"removing taint {taint_key} from node {node_name}") from None
        raise KubernetesError(f"node {node_name}: taints kept changing; gave up after {PATCH_ATTEMPTS} attempts")


@dataclass(frozen=True, slots=True)
class DaemonPod:
    node: str
    url: str


async def find_daemon_pods(namespace: str, selector: str, port: int) -> list[DaemonPod]:
    """Running daemon pods with an IP, as API base URLs."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    async with kube_api() as api:
        try:
            pods = await client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector)
        except ApiException as e:
            raise _api_error(e, f"listing pods {selector!r} in namespace {namespace}") from None
    found = []
    for pod in pods.items:
        ip = pod.status.pod_ip if pod.status else None
        if not ip or pod.status.phase != "Running":
            continue
        host = f"[{ip}]" if ":" in ip else ip
        found.append(DaemonPod(pod.spec.node_name or pod.metadata.name, f"http://{host}:{port}"))
    return sorted(found, key=lambda p: p.node)


async def read_node_labels(node_name: str) -> dict[str, str]:
    """The labels of ``node_name`` (what list entries' ``nodeSelector`` is matched against)."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    async with kube_api() as api:
        try:
            node = await client.CoreV1Api(api).read_node(node_name, _request_timeout=CALL_TIMEOUT_S)
        except ApiException as e:
            raise _api_error(e, f"reading node {node_name}") from None
    return dict(node.metadata.labels or {})


async def read_pull_credentials(
    refs: Iterable[KubeRef], allowed: Iterable[str]
) -> tuple[dict[str, Credentials], list[str]]:
    """Credentials by registry host from pull secrets (and the ``imagePullSecrets`` of service accounts), and
    why any of them could not be used. As kubelet does, an unusable secret does not stop the pull: it is pulled
    with the rest (the node's own credentials, or none), and the reasons go into the error if the registry
    refuses. The first secret naming a host wins (the order of ``imagePullSecrets``). Reasons name the secret,
    never its contents."""
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    allowed = set(allowed)
    found: dict[str, Credentials] = {}
    problems: list[str] = []
    async with kube_api() as api:
        core = client.CoreV1Api(api)
        secrets: list[KubeRef] = []
        for ref in refs:
            if ref.namespace not in allowed:
                if ref.kind == "Secret":  # an account's secrets elsewhere are simply not ours to read
                    problems.append(f"{ref}: namespace {ref.namespace} is not in pull_secret_namespaces")
                continue
            if ref.kind == "Secret":
                secrets.append(ref)
                continue
            try:
                account = await core.read_namespaced_service_account(
                    ref.name, ref.namespace, _request_timeout=CALL_TIMEOUT_S
                )
            except ApiException as e:
                problems.append(str(_api_error(e, f"reading {ref}")))
                continue
            names = [s.name for s in (account.image_pull_secrets or []) if s.name][:MAX_SERVICE_ACCOUNT_SECRETS]
            secrets += [KubeRef("Secret", ref.namespace, name) for name in names]
        for ref in dict.fromkeys(secrets):
            try:
                secret = await core.read_namespaced_secret(ref.name, ref.namespace, _request_timeout=CALL_TIMEOUT_S)
                for host, creds in _secret_credentials(ref, secret.type, secret.data or {}).items():
                    found.setdefault(host, creds)
            except ApiException as e:
                problems.append(str(_api_error(e, f"reading pull {ref}")))
            except KubernetesError as e:
                problems.append(str(e))
    return found, problems


def _secret_credentials(ref: KubeRef, kind: str | None, data: dict[str, str]) -> dict[str, Credentials]:
    key = SECRET_TYPES.get(kind or "")
    if key is None:
        raise KubernetesError(f"pull {ref} is of type {kind}, not kubernetes.io/dockerconfigjson")
    try:
        doc = json.loads(base64.b64decode(data.get(key, ""), validate=True))
        return parse_docker_config(doc, f"pull {ref}")
    except (ValueError, RecursionError):
        raise KubernetesError(f"pull {ref}: {key} is not base64-encoded JSON") from None
    except ConfigError as e:
        raise KubernetesError(str(e)) from None
