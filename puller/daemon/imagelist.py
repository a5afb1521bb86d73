"""The list of images the daemon keeps present, read from a file that kubelet may swap at any time.

A ConfigMap volume is updated by an atomic symlink swap (``..data`` -> a new timestamped directory), so the
file's path keeps resolving to whole, consistent contents. The watcher polls: it reads the file every
``watch_interval`` and compares bytes. Polling sees symlink swaps, in-place edits and subPath-less mounts
alike, costs one small read per interval, and needs no inotify bookkeeping across swapped directories.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, InvalidReference
from ..reference import Reference
from ..registry.manifest import Platform

log = logging.getLogger(__name__)

MAX_LIST_BYTES = 1 << 20
MAX_IMAGES = 1000
ENTRY_KEYS = {"reference", "platform", "pin"}


@dataclass(frozen=True, slots=True)
class ImageSpec:
    reference: Reference
    platform: str | None = None
    pin: bool | None = None

    @property
    def key(self) -> str:
        """Identity of an image on a node: the reference, and the platform when one is asked for."""
        return f"{self.reference}|{self.platform}" if self.platform else str(self.reference)


def parse_entry(entry: Any, where: str) -> ImageSpec:
    """``"repo:tag"`` or ``{reference, platform?, pin?}`` -> ImageSpec (ConfigError/InvalidReference if bad)."""
    if isinstance(entry, str):
        entry = {"reference": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: an image is a reference or a mapping with 'reference'")
    unknown = set(entry) - ENTRY_KEYS
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
    return ImageSpec(Reference.parse(reference), platform, pin)


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
    specs: dict[str, ImageSpec] = {}
    for i, entry in enumerate(entries):
        try:
            spec = parse_entry(entry, f"{where}: images[{i}]")
        except InvalidReference as e:
            raise ConfigError(f"{where}: images[{i}]: {e}") from None
        specs.setdefault(spec.key, spec)  # listed twice: kept once
    return list(specs.values())


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
