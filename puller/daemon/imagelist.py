"""The list of images the daemon keeps present, read from a file that kubelet may swap at any time.

A ConfigMap volume is updated by an atomic symlink swap (``..data`` -> a new timestamped directory), so the
file's path keeps resolving to whole, consistent contents. The watcher polls: it reads the file every
``watch_interval`` and compares bytes. Polling sees symlink swaps, in-place edits and subPath-less mounts
alike, costs one small read per interval, and needs no inotify bookkeeping across swapped directories.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from ..config import NAMESPACE_NAME
from ..errors import ConfigError, InvalidReference
from ..reference import Reference
from ..registry.manifest import Platform

log = logging.getLogger(__name__)
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # RFC 1123 subdomain

MAX_LIST_BYTES = 1 << 20
MAX_IMAGES = 1000
MAX_SELECTOR_LABELS = 32
MAX_PULL_SECRETS = 16
API_KEYS = frozenset({"reference", "platform", "pin"})
LIST_KEYS = API_KEYS | {"nodeSelector", "imagePullSecrets"}


class KubeRef(NamedTuple):
    """Where pull credentials come from: a Secret of type kubernetes.io/dockerconfigjson, or a ServiceAccount
    whose ``imagePullSecrets`` name such Secrets (both in ``namespace``)."""

    kind: str  # "Secret" or "ServiceAccount"
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind.lower()} {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ImageSpec:
    reference: Reference
    platform: str | None = None
    pin: bool | None = None
    node_selector: tuple[tuple[str, str], ...] = ()  # node labels that must all match; () = every node
    pull_secrets: tuple[KubeRef, ...] = ()
    always: bool = False  # pullPolicy Always in the cluster: the tag is resolved again every always_resolve_interval

    @property
    def key(self) -> str:
        """Identity of an image on a node: the reference, and the platform when one is asked for."""
        return f"{self.reference}|{self.platform}" if self.platform else str(self.reference)

    def wanted_on(self, labels: dict[str, str]) -> bool:
        """Whether a node with ``labels`` wants this image (every label of the selector matches)."""
        return all(labels.get(k) == v for k, v in self.node_selector)


def merge(specs: list[ImageSpec]) -> list[ImageSpec]:
    """One spec per key, for an image named by several entries or sources: the first entry's pin and selector,
    every entry's pull secrets (tried in order), and Always if any entry says it."""
    merged: dict[str, ImageSpec] = {}
    for spec in specs:
        first = merged.get(spec.key)
        if first is None:
            merged[spec.key] = spec
            continue
        secrets = first.pull_secrets + tuple(s for s in spec.pull_secrets if s not in first.pull_secrets)
        pin = first.pin if first.pin is not None else spec.pin
        always = first.always or spec.always
        merged[spec.key] = replace(first, pin=pin, pull_secrets=secrets[:MAX_PULL_SECRETS], always=always)
    return list(merged.values())


def parse_node_selector(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """``{label: value}`` (as a pod's nodeSelector) -> sorted pairs; ConfigError if it is not one."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{where}: 'nodeSelector' must map node label names to string values")
    if len(value) > MAX_SELECTOR_LABELS:
        raise ConfigError(f"{where}: 'nodeSelector' has more than {MAX_SELECTOR_LABELS} labels")
    return tuple(sorted(value.items()))


def parse_pull_secrets(value: Any, where: str) -> tuple[KubeRef, ...]:
    """``[{namespace, name}]`` -> Secret references; ConfigError if malformed."""
    if not isinstance(value, list) or len(value) > MAX_PULL_SECRETS:
        raise ConfigError(f"{where}: 'imagePullSecrets' must be a list of at most {MAX_PULL_SECRETS} secrets")
    refs = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"namespace", "name"}:
            raise ConfigError(f"{where}: each of 'imagePullSecrets' is {{namespace: ..., name: ...}}")
        namespace, name = item["namespace"], item["name"]
        if not (isinstance(namespace, str) and NAMESPACE_NAME.fullmatch(namespace)):
            raise ConfigError(f"{where}: imagePullSecrets: {namespace!r} is not a namespace name")
        if not (isinstance(name, str) and _SECRET_NAME.fullmatch(name)):
            raise ConfigError(f"{where}: imagePullSecrets: {name!r} is not a secret name")
        refs.append(KubeRef("Secret", namespace, name))
    return tuple(refs)


def parse_entry(entry: Any, where: str, keys: frozenset[str] = API_KEYS) -> ImageSpec:
    """``"repo:tag"`` or ``{reference, platform?, pin?}`` (plus ``nodeSelector`` and ``imagePullSecrets`` where
    ``keys`` allow them: the list file) -> ImageSpec (ConfigError/InvalidReference if bad)."""
    if isinstance(entry, str):
        entry = {"reference": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an image is a reference or a mapping with 'reference'")
    unknown = set(entry) - keys
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    reference, platform, pin = entry.get("reference"), entry.get("platform"), entry.get("pin")
    if not isinstance(reference, str):
        raise ConfigError(f"{where}: 'reference' must be a string")
    if platform is not None:
        if not isinstance(platform, str):
            raise ConfigError(f"{where}: 'platform' must be a string like linux/amd64")
        try:
            Platform.parse(platform)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if pin is not None and not isinstance(pin, bool):
        raise ConfigError(f"{where}: 'pin' must be true or false")
    selector = parse_node_selector(entry["nodeSelector"], where) if "nodeSelector" in entry else ()
    secrets = parse_pull_secrets(entry["imagePullSecrets"], where) if "imagePullSecrets" in entry else ()
    return ImageSpec(Reference.parse(reference), platform, pin, selector, secrets)


def parse_list(text: str, where: str) -> list[ImageSpec]:
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or set(doc) - {"images"}:
        raise ConfigError(f"{where} must be a mapping with one key, 'images'")
    entries = doc.get("images") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: 'images' must be a list")
    if len(entries) > MAX_IMAGES:
        raise ConfigError(f"{where}: more than {MAX_IMAGES} images")
    specs = []
    for i, entry in enumerate(entries):
        try:
            specs.append(parse_entry(entry, f"{where}: images[{i}]", LIST_KEYS))
        except InvalidReference as e:
            raise ConfigError(f"{where}: images[{i}]: {e}") from None
    return specs


class ImageListWatcher:
    """``poll()`` returns the new list when the file changed since the last poll, else None."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._last: bytes | None = None
        self.error: str | None = None  # why the current file was not taken (the last good list stays)
        self.loaded = 0  # versions of the file taken
        self.refused = 0  # versions of the file refused (unreadable or invalid)

    def poll(self) -> list[ImageSpec] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_LIST_BYTES + 1)
        except OSError as e:
            self._refuse(data=None, why=f"cannot read image list {self.path}: {e.strerror}")
            return None
        if data == self._last:
            return None
        if len(data) > MAX_LIST_BYTES:
            self._refuse(data, f"image list {self.path} is larger than {MAX_LIST_BYTES} bytes")
            return None
        try:
            specs = parse_list(data.decode("utf-8", "replace"), str(self.path))
        except ConfigError as e:
            self._refuse(data, str(e))
            return None
        self._last, self.error = data, None
        self.loaded += 1
        return specs

    def _refuse(self, data: bytes | None, why: str) -> None:
        if why != self.error:
            log.error("%s; keeping the last good list", why)
            self.refused += 1
        self.error = why
        self._last = data
        return None
