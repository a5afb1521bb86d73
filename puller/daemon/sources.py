"""Sources of the image list in the cluster, watched through the Kubernetes API: Knative's caching ``Image``
resources, and the images of the workloads that match a label selector (what they will need on a node before they
scale out onto it): Pods, Deployments, StatefulSets, DaemonSets, Jobs and CronJobs, from their pod templates. In
each pod spec: containers, init containers and image volumes (``volumes[].image.reference``). An image pulled
with ``Always`` (``imagePullPolicy`` of a container, ``pullPolicy`` of an image volume; a ``:latest`` or untagged
reference without one, as Kubernetes defaults it) is resolved again every ``always_resolve_interval``: kubelet
resolves its tag at every pod start.

Each source lists its objects (in pages), then watches from the list's resourceVersion; a watch that ends is
resumed from the last version seen, and an error (410 Gone included) means listing again after a backoff. The
daemon reads :meth:`Source.specs` and :attr:`Source.synced`; a source that is not synced yet holds the start-up
gate, as an unread image list does. Node targeting: a workload's own ``nodeSelector``, or a Knative Image's
``puller.io/node-selector`` annotation (``label=value,label=value``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, InvalidReference, KubernetesError
from ..reference import Reference
from .imagelist import MAX_PULL_SECRETS, ImageSpec, KubeRef, parse_node_selector
from .node import kube_api

log = logging.getLogger(__name__)

KNATIVE = ("caching.internal.knative.dev", "v1alpha1", "images")
NODE_SELECTOR_ANNOTATION = "puller.io/node-selector"
PAGE = 500  # objects per list request
MAX_OBJECTS = 20000  # per source: more is refused (the daemon keeps its last good view)
WATCH_S = 300  # the API server ends each watch after this long; it is resumed
WATCH_SLACK_S = 30  # the client's own bound on a watch request beyond WATCH_S
LIST_TIMEOUT_S = 60  # one page of a list, answer and body
MAX_PAGE_BYTES = 64 << 20  # one page's body
BACKOFF_S = (1.0, 60.0)


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of object the image list can come from."""

    name: str
    specs: Callable[[dict], list[ImageSpec]]
    list_call: Callable[[Any, str | None], tuple[Callable, tuple]]  # (api, namespace) -> (list function, args)


def _knative_specs(obj: dict) -> list[ImageSpec]:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    namespace = meta.get("namespace", "")
    refs = _secret_refs(namespace, spec.get("imagePullSecrets"))
    if isinstance(spec.get("serviceAccountName"), str) and spec["serviceAccountName"]:
        refs += (KubeRef("ServiceAccount", namespace, spec["serviceAccountName"]),)
    selector = _annotation_selector((meta.get("annotations") or {}).get(NODE_SELECTOR_ANNOTATION))
    return _specs(obj, [(spec.get("image"), None)], selector, refs)


def _pod_spec_specs(obj: dict, pod: Any, account: bool) -> list[ImageSpec]:
    if not isinstance(pod, dict):
        return []
    namespace = (obj.get("metadata") or {}).get("namespace", "")
    containers = [c for key in ("initContainers", "containers") for c in _dicts(pod.get(key))]
    images = [(c.get("image"), c.get("imagePullPolicy")) for c in containers]
    for volume in _dicts(pod.get("volumes")):
        image = volume.get("image")
        if isinstance(image, dict):
            images.append((image.get("reference"), image.get("pullPolicy")))
    refs = _secret_refs(namespace, pod.get("imagePullSecrets"))
    if account:  # a template's account: its imagePullSecrets join the pods' when they are created
        refs += (KubeRef("ServiceAccount", namespace, str(pod.get("serviceAccountName") or "default")),)
    selector = pod.get("nodeSelector") or {}
    return _specs(obj, images, selector, refs)


def _dicts(value: Any) -> list[dict]:
    """The mappings of a list field (anything else in it, or a field that is not a list, is left out)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _template(obj: dict, *path: str) -> Any:
    """The value at ``path`` under ``obj``, or None where any step is missing or not a mapping."""
    value: Any = obj
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _pod_specs(obj: dict) -> list[ImageSpec]:
    # A pod's imagePullSecrets already hold its account's: the ServiceAccount admission plugin adds them.
    return _pod_spec_specs(obj, obj.get("spec") or {}, account=False)


def _workload_specs(obj: dict) -> list[ImageSpec]:
    """Deployments, StatefulSets, DaemonSets and Jobs: ``spec.template.spec``."""
    return _pod_spec_specs(obj, _template(obj, "spec", "template", "spec"), account=True)


def _cronjob_specs(obj: dict) -> list[ImageSpec]:
    return _pod_spec_specs(obj, _template(obj, "spec", "jobTemplate", "spec", "template", "spec"), account=True)


def _secret_refs(namespace: str, value: Any) -> tuple[KubeRef, ...]:
    names = [s.get("name") for s in value or [] if isinstance(s, dict)] if isinstance(value, list) else []
    return tuple(KubeRef("Secret", namespace, n) for n in names if isinstance(n, str) and n)[:MAX_PULL_SECRETS]


def _annotation_selector(value: Any) -> dict[str, str]:
    if not isinstance(value, str) or not value.strip():
        return {}
    pairs = [p.partition("=") for p in value.split(",")]
    return {k.strip(): v.strip() for k, _, v in pairs}


def _always(reference: Reference, policy: Any) -> bool:
    """Whether kubelet resolves the image at every pod start: pullPolicy Always, or none given and the tag
    ``latest`` or no tag (Kubernetes' default; the API server fills it in for containers)."""
    if policy is None:
        return reference.digest is None and reference.tag in (None, "latest")
    return policy == "Always"


def _specs(obj: dict, images: list[tuple[Any, Any]], selector: Any, refs: tuple[KubeRef, ...]) -> list[ImageSpec]:
    """ImageSpecs of one object from its (image, pull policy) pairs; what is malformed is logged and left out,
    never fails the others."""
    meta = obj.get("metadata") or {}
    where = f"{obj.get('kind', 'object')} {meta.get('namespace')}/{meta.get('name')}"
    try:
        node_selector = parse_node_selector(selector, where)
    except ConfigError as e:
        log.warning("%s; ignored", e)
        return []
    specs = []
    for image, policy in images:
        try:
            reference = Reference.parse(image) if isinstance(image, str) else None
        except InvalidReference as e:
            log.warning("%s: %s; ignored", where, e)
            continue
        if reference is not None:
            always = _always(reference, policy)
            specs.append(ImageSpec(reference, node_selector=node_selector, pull_secrets=refs, always=always))
    return specs


def _knative_list(api: Any, namespace: str | None) -> tuple[Callable, tuple]:
    from kubernetes_asyncio import client

    custom = client.CustomObjectsApi(api)
    if namespace:
        return custom.list_namespaced_custom_object, (KNATIVE[0], KNATIVE[1], namespace, KNATIVE[2])
    return custom.list_cluster_custom_object, KNATIVE


def _pod_list(api: Any, namespace: str | None) -> tuple[Callable, tuple]:
    from kubernetes_asyncio import client

    core = client.CoreV1Api(api)
    return (core.list_namespaced_pod, (namespace,)) if namespace else (core.list_pod_for_all_namespaces, ())


def _api_list(group: str, plural: str) -> Callable[[Any, str | None], tuple[Callable, tuple]]:
    """The list call of kind ``plural`` of an API group's client (AppsV1Api, BatchV1Api)."""

    def list_call(api: Any, namespace: str | None) -> tuple[Callable, tuple]:
        from kubernetes_asyncio import client

        group_api = getattr(client, group)(api)
        if namespace:
            return getattr(group_api, f"list_namespaced_{plural}"), (namespace,)
        return getattr(group_api, f"list_{plural}_for_all_namespaces"), ()

    return list_call


KNATIVE_IMAGES = Kind("knative images", _knative_specs, _knative_list)
PODS = Kind("pods", _pod_specs, _pod_list)
DEPLOYMENTS = Kind("deployments", _workload_specs, _api_list("AppsV1Api", "deployment"))
STATEFULSETS = Kind("statefulsets", _workload_specs, _api_list("AppsV1Api", "stateful_set"))
DAEMONSETS = Kind("daemonsets", _workload_specs, _api_list("AppsV1Api", "daemon_set"))
JOBS = Kind("jobs", _workload_specs, _api_list("BatchV1Api", "job"))
CRONJOBS = Kind("cronjobs", _cronjob_specs, _api_list("BatchV1Api", "cron_job"))
WORKLOADS = (PODS, DEPLOYMENTS, STATEFULSETS, DAEMONSETS, JOBS, CRONJOBS)


class Source:
    """The objects of one kind in one namespace (None: all), with a label selector; see the module docstring."""

    def __init__(self, kind: Kind, namespace: str | None, selector: str | None = None):
        self.kind, self.namespace, self.selector = kind, namespace, selector
        self.synced = False
        self.version = 0  # moves whenever specs() may have changed
        self.error: str | None = None
        self._objects: dict[str, list[ImageSpec]] = {}  # by uid

    def __str__(self) -> str:
        where = f"namespace {self.namespace}" if self.namespace else "all namespaces"
        return f"{self.kind.name} in {where}" + (f" matching {self.selector}" if self.selector else "")

    def specs(self) -> list[ImageSpec]:
        return [spec for specs in self._objects.values() for spec in specs]

    async def run(self) -> None:
        """List and watch until cancelled."""
        failures = 0
        while True:
            try:
                async with kube_api() as api:
                    await self._list_and_watch(api)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the API, the network or the content: all end in listing again
                failures += 1
                why = _describe(e)
                if why != self.error:
                    log.error("image source %s: %s (listing again)", self, why)
                self.error = why
                await asyncio.sleep(min(BACKOFF_S[1], BACKOFF_S[0] * 2**failures) * random.uniform(0.5, 1.0))
            else:
                failures = 0

    async def _list_and_watch(self, api: Any) -> None:
        from kubernetes_asyncio import watch

        func, args = self.kind.list_call(api, self.namespace)
        selector = {"label_selector": self.selector} if self.selector else {}
        version = await self._list(func, args, selector)
        while True:
            stream = watch.Watch().stream(
                func,
                *args,
                **selector,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_S,
                _request_timeout=WATCH_S + WATCH_SLACK_S,
            )
            async with stream:
                async for event in stream:
                    kind, obj = event["type"], event["raw_object"]
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind in ("ADDED", "MODIFIED"):
                        self._put(obj)
                    elif kind == "DELETED":
                        self._drop(obj)

    async def _list(self, func: Callable, args: tuple, selector: dict) -> str:
        objects: dict[str, list[ImageSpec]] = {}
        token = None
        while True:
            page: dict[str, str] = {"_continue": token} if token else {}
            resp = await func(
                *args, **selector, **page, limit=PAGE, _preload_content=False, _request_timeout=LIST_TIMEOUT_S
            )
            async with resp:
                body = json.loads(await _read_page(resp))
            for obj in body.get("items") or []:
                objects[_uid(obj)] = self.kind.specs(obj)
            if len(objects) > MAX_OBJECTS:
                raise KubernetesError(f"more than {MAX_OBJECTS} objects; narrow the selector or the namespaces")
            token = (body.get("metadata") or {}).get("continue")
            if not token:
                break
        self._objects, self.synced, self.error = objects, True, None
        self.version += 1
        log.info("image source %s: %d object(s)", self, len(objects))
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _put(self, obj: dict) -> None:
        uid = _uid(obj)
        if uid not in self._objects and len(self._objects) >= MAX_OBJECTS:
            raise KubernetesError(f"more than {MAX_OBJECTS} objects; narrow the selector or the namespaces")
        specs = self.kind.specs(obj)
        if self._objects.get(uid) != specs:
            self._objects[uid] = specs
            self.version += 1

    def _drop(self, obj: dict) -> None:
        if self._objects.pop(_uid(obj), None) is not None:
            self.version += 1


async def _read_page(resp: Any) -> bytes:
    """One list page's body, at most MAX_PAGE_BYTES (already decompressed by the client)."""
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > MAX_PAGE_BYTES:
            raise KubernetesError(f"a page of {PAGE} objects is larger than {MAX_PAGE_BYTES} bytes")
    return bytes(body)


def _uid(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")


def _describe(e: Exception) -> str:
    status = getattr(e, "status", None)
    if status == 403:
        return "403 forbidden: check the RBAC rules of deploy/sources/"
    if status == 404:
        return "404 not found (is the resource's CRD installed?)"
    return str(e) or type(e).__name__


def sources_for(knative: bool, workload_selector: str | None, namespaces: Sequence[str]) -> list[Source]:
    """The sources the settings ask for, one per kind and namespace."""
    kinds = ([KNATIVE_IMAGES] if knative else []) + (list(WORKLOADS) if workload_selector else [])
    where: list[str | None] = list(namespaces) or [None]
    return [
        Source(kind, namespace, None if kind is KNATIVE_IMAGES else workload_selector)
        for kind in kinds
        for namespace in where
    ]
