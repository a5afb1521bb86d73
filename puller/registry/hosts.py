"""Where a registry's API is served, and how to talk to each place.

Two layers:

- :class:`HostSettings`: puller's own per-host rules. Every host is HTTPS with verified TLS unless listed in
  ``plain_http`` or ``insecure_skip_verify``. Loopback registries (``localhost``, ``127.0.0.0/8``, ``[::1]``) are
  tried over HTTPS first and fall back to plain HTTP when the server does not speak TLS at all (as docker does
  for 127.0.0.0/8 and containerd for localhost); a TLS server on loopback whose certificate does not verify is
  an error, not a reason to fall back.
- :class:`Endpoint` lists from containerd's registry host configuration (``<hosts_dir>/<host>/hosts.toml``,
  read exactly as containerd reads it, so a node set up for Spegel or Dragonfly serves puller from peers), or
  from the same keys in puller's own ``mirrors`` setting. Mirrors come first, in file order; the upstream
  (``server``, else the registry itself) comes last. Resolving a tag uses only hosts with both ``pull`` and
  ``resolve``; fetching by digest uses hosts with ``pull``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import posixpath
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from ..errors import ConfigError

log = logging.getLogger(__name__)

PULL, RESOLVE, PUSH, REFERRERS = "pull", "resolve", "push", "referrers"
ALL_CAPABILITIES = frozenset({PULL, RESOLVE, PUSH, REFERRERS})
DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
HOST_KEYS = {"capabilities", "ca", "client", "skip_verify", "header", "override_path", "dial_timeout"}


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    name = _hostname(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HostSettings:
    plain_http: frozenset[str] = field(default_factory=frozenset)
    insecure_skip_verify: frozenset[str] = field(default_factory=frozenset)
    ca_file: str | None = None
    hosts_dir: str | None = None  # containerd's certs.d; None = not read
    mirrors: dict[str, list[dict]] = field(default_factory=dict)  # registry -> host entries (hosts.toml keys)

    def scheme(self, host: str) -> str:
        return "http" if host in self.plain_http or "*" in self.plain_http else "https"

    def may_fall_back_to_http(self, host: str) -> bool:
        return is_loopback(host) and self.scheme(host) == "https"

    def ssl_for(self, host: str) -> ssl.SSLContext | bool:
        if host in self.insecure_skip_verify:
            return False
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        return True

    def endpoints(self, registry: str) -> tuple[Endpoint, ...]:
        """Every place that serves ``registry`` (a reference's domain, e.g. docker.io), mirrors first."""
        if registry in self.mirrors:
            hosts = []
            for i, entry in enumerate(self.mirrors[registry]):
                where = f"mirrors.{registry}[{i}]"
                if not isinstance(entry, dict) or not isinstance(entry.get("host"), str) or not entry["host"]:
                    raise ConfigError(f"{where}: needs host: URL of the mirror")
                unknown = set(entry) - HOST_KEYS - {"host"}
                if unknown:  # puller's own setting: a typo is an error (a shared hosts.toml only warns)
                    raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
                hosts.append(parse_host_entry(entry["host"], entry, "", where))
            return self._finish(registry, [*hosts, Endpoint(registry=registry)])
        directory = find_hosts_dir(self.hosts_dir, registry) if self.hosts_dir else None
        if directory is None:
            return (self._upstream(registry),)
        return self._finish(registry, load_hosts_dir(directory))

    def _upstream(self, registry: str) -> Endpoint:
        host = DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
        return Endpoint(registry=registry, host=host, scheme="", path="/v2")

    def _finish(self, registry: str, hosts: list[Endpoint]) -> tuple[Endpoint, ...]:
        out = []
        for ep in hosts:
            if not ep.host:  # no `server`: the registry itself, with puller's own scheme rules, every capability
                ep = Endpoint(**{**ep.__dict__, "host": self._upstream(registry).host, "scheme": "", "path": "/v2"})
            out.append(Endpoint(**{**ep.__dict__, "registry": registry}))
        return tuple(out)


@dataclass(frozen=True)
class Endpoint:
    """One place a registry's API is served (containerd's RegistryHost): a mirror or the upstream."""

    registry: str  # the reference's domain this endpoint serves
    host: str = ""  # host[:port]
    scheme: str = ""  # "" = puller's rules for the upstream (HostSettings: https, loopback fallback)
    path: str = "/v2"
    capabilities: frozenset[str] = ALL_CAPABILITIES
    skip_verify: bool | None = None
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()  # (certificate, key); key "" = in the certificate file
    header: tuple[tuple[str, str], ...] = ()
    dial_timeout: float | None = None  # seconds to connect to it (hosts.toml ``dial_timeout``), else connect_timeout

    @property
    def is_mirror(self) -> bool:
        """Not the registry itself: requests carry ``?ns=<registry>`` as containerd sends them."""
        return self.host != self.registry and not (self.registry == DOCKER_HUB and self.host == DOCKER_HUB_API_HOST)

    def origin(self) -> str:
        """``host:port`` as connections name it (the scheme's port where the URL has none)."""
        parts = urlsplit(f"//{self.host}")
        return f"{parts.hostname}:{parts.port or (80 if self.scheme == 'http' else 443)}"

    def can(self, *capabilities: str) -> bool:
        return all(c in self.capabilities for c in capabilities)

    def url(self, scheme: str, repository: str, path: str) -> str:
        query = f"?{urlencode({'ns': self.registry})}" if self.is_mirror else ""
        return f"{scheme}://{self.host}{self.path}/{repository}/{path}{query}"

    def ssl_context(self, default: ssl.SSLContext | bool) -> ssl.SSLContext | bool:
        """The TLS settings of this host (``skip_verify``, ``ca``, ``client``), else ``default``."""
        if self.skip_verify is None and not self.ca and not self.client:
            return default
        if self.skip_verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context()
            for ca in self.ca:
                try:
                    ctx.load_verify_locations(cafile=ca)
                except (OSError, ssl.SSLError) as e:
                    raise ConfigError(f"{self.host}: cannot load CA {ca}: {e}") from None
        for cert, key in self.client:
            try:
                ctx.load_cert_chain(cert, key or None)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"{self.host}: cannot load client certificate {cert}: {e}") from None
        return ctx


def host_directory_names(registry: str) -> list[str]:
    """containerd's lookup order: ``host_port_`` (for host:port), ``host:port``, then ``_default``."""
    names = []
    idx = registry.rfind(":")
    if idx > 0:
        names.append(f"{registry[:idx]}_{registry[idx + 1 :]}_")
    return [*names, registry, "_default"]


def find_hosts_dir(root: str, registry: str) -> Path | None:
    for name in host_directory_names(registry):
        candidate = Path(root) / name
        if candidate.is_dir():
            return candidate
    return None


def load_hosts_dir(directory: Path) -> list[Endpoint]:
    """``hosts.toml`` of one host directory. Errors are ConfigErrors: a node's mirror set-up that puller cannot
    read should fail the pull loudly rather than bypass the mirrors silently."""
    path = directory / "hosts.toml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return [Endpoint(registry="")]  # a directory without hosts.toml: the registry itself
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    return parse_hosts_toml(text, directory, str(path))


def parse_hosts_toml(text: str, base_dir: Path, where: str = "hosts.toml") -> list[Endpoint]:
    import tomllib  # imported here: most nodes have no hosts.toml, and every pull would pay for the import

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise ConfigError(f"{where}: server must be a string")
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f'{where}: host must be a table of [host."URL"] tables')
    # tomllib keeps the file's order, which is the order containerd tries them in.
    out = [parse_host_entry(url, entry, str(base_dir), f"{where}: host.{url!r}") for url, entry in hosts.items()]
    top = {k: v for k, v in doc.items() if k in HOST_KEYS}
    out.append(parse_host_entry(server, top, str(base_dir), where))
    return out


def parse_host_entry(server: str, entry: Any, base_dir: str, where: str) -> Endpoint:
    """One ``[host."URL"]`` table (or the top level with ``server``), as containerd's parseHostConfig does."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(entry) - HOST_KEYS - {"host"}
    if unknown:
        log.warning("%s: ignoring unknown key(s) %s", where, ", ".join(sorted(unknown)))
    override_path = _bool(entry.get("override_path", False), "override_path", where)
    scheme = host = ""
    path = "/v2"
    if server:
        if not server.startswith("http"):
            server = "https://" + server
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{where}: invalid server URL {server!r}")
        scheme, host = parts.scheme, parts.netloc
        if parts.path:
            path = posixpath.normpath(parts.path)
            if not path.endswith("/v2") and not override_path:
                path += "/v2"
        elif override_path:
            path = ""
    caps = entry.get("capabilities")
    if caps is None or caps == []:
        capabilities = ALL_CAPABILITIES
    else:
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise ConfigError(f"{where}: capabilities must be a list of strings")
        unknown_caps = {c.lower() for c in caps} - ALL_CAPABILITIES
        if unknown_caps:
            raise ConfigError(f"{where}: unknown capability {', '.join(sorted(unknown_caps))}")
        capabilities = frozenset(c.lower() for c in caps)
    skip = entry.get("skip_verify")
    return Endpoint(
        registry="",
        host=host,
        scheme=scheme,
        path=path,
        capabilities=capabilities,
        skip_verify=None if skip is None else _bool(skip, "skip_verify", where),
        ca=tuple(_abs(p, base_dir) for p in _strings(entry.get("ca"), "ca", where)),
        client=_client_pairs(entry.get("client"), base_dir, where),
        header=_headers(entry.get("header"), where),
        dial_timeout=_dial_timeout(entry.get("dial_timeout"), where),
    )


# Go's grammar: digits with an optional fraction, then a unit; one way to read each string (no backtracking blow-up)
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def go_duration(text: str) -> float:
    """Seconds of a Go duration (``time.ParseDuration``: "200ms", "1.5s", "1m30s", "0"); ValueError if it is not
    one."""
    body = text[1:] if text[:1] in "+-" else text
    if body == "0":
        return 0.0
    if not body or not re.fullmatch(f"(?:{_DURATION_PART})+", body):
        raise ValueError(text)
    seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in re.findall(_DURATION_PART, body))
    return -seconds if text.startswith("-") else seconds


def _dial_timeout(value: Any, where: str) -> float | None:
    """``dial_timeout``: a Go duration, as containerd parses it; zero or less leaves puller's connect_timeout (Go's
    dialer has no timeout of its own then)."""
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        seconds = go_duration(value)
    except ValueError:
        raise ConfigError(f"{where}: dial_timeout must be a duration such as '200ms' or '2s', not {value!r}") from None
    return seconds if seconds > 0 else None


def _bool(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false")
    return value


def _abs(p: str, base_dir: str) -> str:
    return p if os.path.isabs(p) or not base_dir else os.path.join(base_dir, p)


def _strings(value: Any, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ConfigError(f"{where}: {key} must be a string or a list of strings")


def _client_pairs(value: Any, base_dir: str, where: str) -> tuple[tuple[str, str], ...]:
    """``"cert.pem"``, ``["a.pem", "b.pem"]`` or ``[["cert.pem", "key.pem"], ...]``, as containerd accepts."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f"{where}: client must be a path, a list of paths, or a list of [cert, key] pairs")
    pairs = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_abs(item, base_dir), ""))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            pairs.append((_abs(item[0], base_dir), _abs(item[1], base_dir)))
        else:
            raise ConfigError(f"{where}: invalid client entry {item!r}")
    return tuple(pairs)


def _headers(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: header must be a table")
    out = []
    for key, v in value.items():
        for item in _strings(v, f"header {key}", where):
            out.append((key, item))
    return tuple(out)
