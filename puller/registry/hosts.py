"""Per-host settings: which registry hosts speak plain HTTP, which skip TLS verification.

Loopback registries (``localhost``, ``127.0.0.0/8``, ``[::1]``) are plain HTTP by default, as docker treats
127.0.0.0/8 as an insecure registry; every other host is HTTPS with verified TLS unless listed.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field


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

    def scheme(self, host: str) -> str:
        return "http" if host in self.plain_http or "*" in self.plain_http or is_loopback(host) else "https"

    def ssl_for(self, host: str) -> ssl.SSLContext | bool:
        if host in self.insecure_skip_verify:
            return False
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        return True

    def base_url(self, host: str) -> str:
        return f"{self.scheme(host)}://{host}"
