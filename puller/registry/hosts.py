"""Per-host settings: which registry hosts speak plain HTTP, which skip TLS verification.

Every host is HTTPS with verified TLS unless listed in ``plain_http`` or ``insecure_skip_verify``. Loopback
registries (``localhost``, ``127.0.0.0/8``, ``[::1]``) are tried over HTTPS first and fall back to plain HTTP
when the server does not speak TLS at all (as docker does for 127.0.0.0/8 and containerd for localhost); a TLS
server on loopback whose certificate does not verify is an error, not a reason to fall back.
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
        return "http" if host in self.plain_http or "*" in self.plain_http else "https"

    def may_fall_back_to_http(self, host: str) -> bool:
        return is_loopback(host) and self.scheme(host) == "https"

    def ssl_for(self, host: str) -> ssl.SSLContext | bool:
        if host in self.insecure_skip_verify:
            return False
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        return True
