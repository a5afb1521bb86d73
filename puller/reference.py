"""Image references, parsed and normalised the way docker and containerd do it.

``busybox`` -> ``docker.io/library/busybox:latest``; ``host:port/repo``; ``repo:tag``; ``repo@sha256:...``;
``repo:tag@sha256:...`` (the digest wins for fetching, the tag is kept for naming). The grammar is the one of
distribution's ``reference`` package.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .digest import Digest
from .errors import InvalidDigest, InvalidReference

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?")
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[_.]|__|[-]+)[a-z0-9]+)*"
_REMOTE_NAME = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # distribution's grammar: ASCII only


class Reference(NamedTuple):
    """A normalised image reference. ``domain`` is the name users see (``docker.io``);
    :attr:`api_host` is where its API lives."""

    domain: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not text or not isinstance(text, str):
            raise InvalidReference("empty image reference")
        if text != text.strip() or any(c.isspace() for c in text):
            raise InvalidReference(f"invalid image reference {text[:100]!r}: contains whitespace")
        name, at, digest_text = text.partition("@")
        digest = None
        if at:
            try:
                digest = Digest.parse(digest_text)
            except InvalidDigest as e:
                raise InvalidReference(f"invalid image reference {text[:100]!r}: {e}") from None
        # A tag follows the last ':' that comes after the last '/' (a ':' before it is a port).
        tag = None
        colon = name.rfind(":")
        if colon > name.rfind("/"):
            name, tag = name[:colon], name[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise InvalidReference(f"invalid tag {tag[:140]!r} in image reference {text[:100]!r}")
        domain, remote = _split_domain(name, text)
        if len(name) > NAME_TOTAL_LENGTH_MAX:
            raise InvalidReference(f"repository name longer than {NAME_TOTAL_LENGTH_MAX} characters")
        if remote.lower() != remote:
            raise InvalidReference(f"invalid image reference {text[:100]!r}: repository name must be lowercase")
        if not _REMOTE_NAME.fullmatch(remote):
            raise InvalidReference(f"invalid repository name {remote[:100]!r} in image reference {text[:100]!r}")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(domain, remote, tag, digest)

    @property
    def api_host(self) -> str:
        """host[:port] that serves the /v2/ API for this reference."""
        return DOCKER_HUB_API_HOST if self.domain == DEFAULT_DOMAIN else self.domain

    @property
    def name(self) -> str:
        """domain/repository, without tag or digest."""
        return f"{self.domain}/{self.repository}"

    @property
    def object(self) -> str:
        """What to ask /v2/<repo>/manifests/ for: the digest when there is one, else the tag."""
        return str(self.digest) if self.digest else str(self.tag)

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.domain, self.repository, None, digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _split_domain(name: str, original: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost" and first.lower() == first):
        domain, remote = DEFAULT_DOMAIN, name
    else:
        if not _DOMAIN.fullmatch(first):
            raise InvalidReference(f"invalid registry host {first[:100]!r} in image reference {original[:100]!r}")
        port = first.rpartition(":")[2] if ":" in first and not first.endswith("]") else None
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise InvalidReference(f"invalid port in registry host {first[:100]!r}")
        domain, remote = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remote:
        remote = OFFICIAL_REPO_PREFIX + remote
    return domain, remote
