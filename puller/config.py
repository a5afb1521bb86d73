"""One settings model: defaults here, overridden by a YAML file, then by ``PULLER_<SETTING>`` environment variables,
then by command-line flags.

Every option is documented in config/puller.yaml. Unknown keys are refused, so a typo is an error, not a
silently ignored setting; so is a value of the wrong type (``true`` is not 1, ``3.9`` not 3, ``"2"`` not 2).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .engine.budget import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PER_HOST
from .engine.fetcher import DEFAULT_CHUNK_SIZE, DEFAULT_MIN_SPLIT
from .engine.pull import DEFAULT_MAX_BLOB_SIZE
from .engine.staging import DEFAULT_MAX_AGE_S as DEFAULT_STAGING_MAX_AGE
from .engine.staging import DEFAULT_MAX_BYTES as DEFAULT_STAGING_MAX_BYTES
from .errors import ConfigError
from .registry.bodies import DEFAULT_LOW_SPEED_LIMIT, DEFAULT_LOW_SPEED_TIME, SpeedLimit
from .registry.client import CONNECT_TIMEOUT_S, DEFAULT_ATTEMPTS, READ_TIMEOUT_S
from .registry.hosts import HostSettings, is_loopback
from .stores.defaults import (
    CONTAINERD_ADDRESS,
    CONTAINERD_LEASE_EXPIRY,
    CONTAINERD_NAMESPACE,
    CONTAINERD_ROOT,
    CONTAINERD_SNAPSHOTTER,
    CONTAINERD_STAGING,
    OVERLAYBD_CONFIG,
)
from .stores.defaults import OCI_DIR as DEFAULT_OCI_DIR

CONFIG_ENV = "PULLER_CONFIG"
ENV_PREFIX = "PULLER_"  # PULLER_<SETTING>: one setting from the environment
# Variables with the prefix that are not settings: the config file's path, and those of the test and benchmark tools.
ENV_NOT_SETTINGS = frozenset({CONFIG_ENV, "PULLER_TEST_BIN", "PULLER_BENCH_CACHE"})
DAEMON_IMAGES_FILE = "/etc/puller/images.yaml"
DAEMON_LISTEN = "127.0.0.1:8470"
STARTUP_TAINT = "puller.io/prefetch"
HOSTS_DIR = "/etc/containerd/certs.d"
MAX_SIZE = 1 << 60  # no setting of puller's is larger (and a float of 1e999 is not a size)
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a Kubernetes namespace (RFC 1123 label)


@dataclass
class Settings:
    store: str = f"oci:{DEFAULT_OCI_DIR}"
    platform: str | None = None
    connections: int = DEFAULT_MAX_CONNECTIONS
    connections_per_host: int = DEFAULT_MAX_PER_HOST
    chunk_size: int = DEFAULT_CHUNK_SIZE
    bandwidth_limit: int | None = None
    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE
    staging_max_bytes: int = DEFAULT_STAGING_MAX_BYTES
    staging_max_age: float = DEFAULT_STAGING_MAX_AGE
    min_split: int = DEFAULT_MIN_SPLIT
    attempts: int = DEFAULT_ATTEMPTS
    connect_timeout: float = CONNECT_TIMEOUT_S
    read_timeout: float = READ_TIMEOUT_S
    low_speed_limit: int = DEFAULT_LOW_SPEED_LIMIT
    low_speed_time: float = DEFAULT_LOW_SPEED_TIME
    lean_ranges: bool = True
    plain_http: list[str] = field(default_factory=list)
    insecure_skip_verify: list[str] = field(default_factory=list)
    ca_file: str | None = None
    docker_config: str | None = None
    hosts_dir: str | None = HOSTS_DIR
    mirrors: dict[str, list[dict]] = field(default_factory=dict)
    # containerd store
    containerd_address: str = CONTAINERD_ADDRESS
    namespace: str = CONTAINERD_NAMESPACE
    snapshotter: str = CONTAINERD_SNAPSHOTTER
    unpack: bool = True
    unpack_path: str = "auto"  # auto, stream (puller's applier, while downloading) or diff (containerd's, after)
    unpack_max_entries: int = 1_000_000  # bounds on one layer, for puller's applier
    unpack_max_size: int = 256 << 30  # decompressed bytes of one layer
    pin: bool = False
    staging_dir: str = CONTAINERD_STAGING
    lease_expiry: float = CONTAINERD_LEASE_EXPIRY
    containerd_root: str = CONTAINERD_ROOT
    # overlaybd store
    overlaybd_config: str = OVERLAYBD_CONFIG
    cache_dir: str | None = None
    # daemon (puller daemon)
    images_file: str = DAEMON_IMAGES_FILE
    listen: str = DAEMON_LISTEN
    probe_listen: str | None = None
    api_token_file: str | None = None
    node_name: str | None = None
    watch_interval: float = 2.0
    resolve_interval: float = 300.0
    always_resolve_interval: float = 30.0  # images a workload pulls with pullPolicy Always
    parallel_pulls: int = 4
    retry_backoff_max: float = 300.0
    start_jitter: float = 0.0
    startup_taint: str | None = STARTUP_TAINT
    startup_deadline: float = 900.0
    log_format: str = "text"
    pull_timeout: float = 3600.0
    api_max_images: int = 1000
    api_forget_after: float = 3600.0
    api_allow_unauthenticated: bool = False
    api_allow_pin: bool = False
    # daemon: image list sources in the cluster, pull secrets (deploy/sources/)
    knative_images: bool = False
    workload_selector: str | None = None
    source_namespaces: list[str] = field(default_factory=list)
    pull_secret_namespaces: list[str] = field(default_factory=list)

    def validate(self) -> Settings:
        if self.connections < 1 or self.connections_per_host < 1:
            raise ConfigError("connections and connections_per_host must be at least 1")
        if self.min_split < 64 * 1024:
            raise ConfigError("min_split must be at least 64KiB")
        if self.chunk_size < 64 * 1024:
            raise ConfigError("chunk_size must be at least 64KiB")
        if self.attempts < 1:
            raise ConfigError("attempts must be at least 1")
        if self.bandwidth_limit is not None and self.bandwidth_limit < 64 * 1024:
            raise ConfigError("bandwidth_limit must be at least 64KiB (bytes per second), or null for none")
        if self.start_jitter < 0:
            raise ConfigError("start_jitter must be zero or a positive number of seconds")
        if self.max_blob_size < 1 or self.staging_max_bytes < 0:
            raise ConfigError("max_blob_size must be positive and staging_max_bytes zero or positive")
        if self.unpack_path not in ("auto", "stream", "diff"):
            raise ConfigError(f"unpack_path must be auto, stream or diff, not {self.unpack_path!r}")
        if self.unpack_max_entries < 1 or self.unpack_max_size < 1:
            raise ConfigError("unpack_max_entries and unpack_max_size must be positive")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, not {self.log_format!r}")
        if self.api_max_images < 1:
            raise ConfigError("api_max_images must be at least 1")
        if self.parallel_pulls < 1:
            raise ConfigError("parallel_pulls must be at least 1")
        if self.low_speed_limit < 0:
            raise ConfigError("low_speed_limit must be zero (no limit) or a positive number of bytes per second")
        for name in (
            "watch_interval",
            "resolve_interval",
            "always_resolve_interval",
            "retry_backoff_max",
            "startup_deadline",
            "pull_timeout",
            "lease_expiry",
            "api_forget_after",
            "staging_max_age",
            "low_speed_time",
            "connect_timeout",
            "read_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        if not isinstance(self.mirrors, dict) or not all(
            isinstance(k, str) and isinstance(v, list) for k, v in self.mirrors.items()
        ):
            raise ConfigError("mirrors must map a registry (e.g. docker.io) to a list of mirror entries")
        for registry in self.mirrors:
            self.host_settings.endpoints(registry)  # parse every entry now: a bad one is a ConfigError at start
        for name in ("source_namespaces", "pull_secret_namespaces"):
            for namespace in getattr(self, name):
                if not NAMESPACE_NAME.fullmatch(namespace):
                    raise ConfigError(f"{name}: {namespace!r} is not a namespace name")
        if self.workload_selector is not None and not self.workload_selector.strip():
            raise ConfigError("workload_selector must be a label selector such as puller.io/prefetch=true, or null")
        for name in ("listen", "probe_listen"):
            value = getattr(self, name)
            if value is None and name == "probe_listen":
                continue
            host, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or not host or not 0 < int(port) < 65536:
                raise ConfigError(f"{name} must be HOST:PORT with a port from 1 to 65535, not {value!r}")
        return self

    @property
    def host_settings(self) -> HostSettings:
        return HostSettings(
            frozenset(self.plain_http),
            frozenset(self.insecure_skip_verify),
            self.ca_file,
            self.hosts_dir,
            self.mirrors,
        )

    @property
    def speed_limit(self) -> SpeedLimit:
        return SpeedLimit(self.low_speed_limit, self.low_speed_time)

    def daemon(self, node_name: str | None) -> DaemonSettings:
        return DaemonSettings(
            images_file=self.images_file,
            node_name=node_name,
            watch_interval=self.watch_interval,
            resolve_interval=self.resolve_interval,
            always_resolve_interval=self.always_resolve_interval,
            parallel_pulls=self.parallel_pulls,
            retry_backoff_max=self.retry_backoff_max,
            start_jitter=self.start_jitter,
            startup_taint=self.startup_taint,
            startup_deadline=self.startup_deadline,
            pull_timeout=self.pull_timeout,
            pin=self.pin,
            api_max_images=self.api_max_images,
            api_forget_after=self.api_forget_after,
            api_allow_pin=self.api_allow_pin,
            knative_images=self.knative_images,
            workload_selector=self.workload_selector,
            source_namespaces=tuple(self.source_namespaces),
            pull_secret_namespaces=tuple(self.pull_secret_namespaces),
        )

    @property
    def listen_is_loopback(self) -> bool:
        return is_loopback(self.listen)

    @property
    def listen_address(self) -> tuple[str, int]:
        return address(self.listen)


def address(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (validated) -> (host without IPv6 brackets, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class DaemonSettings(NamedTuple):
    """What the daemon's reconcile loop and API read: built once from :class:`Settings` (:meth:`Settings.daemon`),
    never changed. The engine's parts have their own (ClientSettings, FetchSettings, the store's arguments)."""

    images_file: str
    node_name: str | None
    watch_interval: float
    resolve_interval: float
    always_resolve_interval: float
    parallel_pulls: int
    retry_backoff_max: float
    start_jitter: float
    startup_taint: str | None
    startup_deadline: float
    pull_timeout: float
    pin: bool  # listed images' pin, unless an entry says otherwise; never applied to images the API alone asked for
    api_max_images: int
    api_forget_after: float
    api_allow_pin: bool
    knative_images: bool
    workload_selector: str | None
    source_namespaces: tuple[str, ...]
    pull_secret_namespaces: tuple[str, ...]


def parse_size(value: Any) -> int:
    """``8388608``, ``"8MiB"``, ``"8M"``, ``"512k"`` -> bytes."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"invalid size {value!r}: use bytes or a number with KiB/MiB/GiB")
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if text and text[-1] in _UNITS:
            size = float(text[:-1]) * _UNITS[text[-1]]
            if not math.isfinite(size) or size > MAX_SIZE:
                raise ValueError
            return int(size)
        size = int(text)
    except (ValueError, OverflowError):
        raise ConfigError(f"invalid size {value!r}: use bytes or a number with KiB/MiB/GiB") from None
    if size > MAX_SIZE:
        raise ConfigError(f"invalid size {value!r}: larger than {MAX_SIZE} bytes")
    return size


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``path`` (or $PULLER_CONFIG), then ``PULLER_<SETTING>`` variables of the environment (a
    YAML value each: ``PULLER_CONNECTIONS=16``, ``PULLER_PLAIN_HTTP="[reg:5000]"``); defaults otherwise. The
    command line's flags go over both."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CONFIG_ENV)
    settings = _load_file(path) if path else Settings()
    overrides = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k not in ENV_NOT_SETTINGS}
    for key, text in sorted(overrides.items()):
        import yaml

        name = key.removeprefix(ENV_PREFIX).lower()
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"environment: {key} is not a valid YAML value") from None
        apply(settings, {name: value}, where=f"environment ({key})")
    return settings


def _load_file(path: str) -> Settings:
    settings = Settings()
    import yaml  # only with a config file: a plain `puller pull` starts ~20 ms sooner

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config {path} must be a mapping")
    return apply(settings, doc, where=str(path))


def apply(settings: Settings, values: dict[str, Any], where: str = "flags") -> Settings:
    """Override ``settings`` with ``values``. From flags, None means "not given"; in a file or the environment,
    ``null`` sets an optional setting to None (e.g. ``startup_taint: null`` turns the start-up gate off)."""
    known = {f.name: f for f in dataclasses.fields(Settings)}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{where}: unknown setting {key!r}")
        optional = "None" in str(known[name].type)
        if value is None:
            if where == "flags":
                continue
            if not optional:
                raise ConfigError(f"{where}: {key} cannot be null")
            setattr(settings, name, None)
            continue
        if name in (
            "chunk_size",
            "min_split",
            "bandwidth_limit",
            "low_speed_limit",
            "max_blob_size",
            "staging_max_bytes",
            "unpack_max_size",
        ):
            try:
                value = parse_size(value)
            except ConfigError as e:
                raise ConfigError(f"{where}: {key}: {e}") from None
        elif name in ("plain_http", "insecure_skip_verify", "source_namespaces", "pull_secret_namespaces"):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                what = "hosts" if name in ("plain_http", "insecure_skip_verify") else "namespaces"
                raise ConfigError(f"{where}: {key} must be a list of {what}")
        elif known[name].type == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be true or false")
        elif known[name].type == "int":
            if not isinstance(value, int) or isinstance(value, bool):  # true is not 1, 3.9 is not 3, "2" not 2
                raise ConfigError(f"{where}: {key} must be a whole number, not {value!r}")
        elif known[name].type == "float":
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{where}: {key} must be a finite number of seconds, not {value!r}")
            value = float(value)
        elif str(known[name].type).startswith("str") and not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string")
        setattr(settings, name, value)
    return settings.validate()
