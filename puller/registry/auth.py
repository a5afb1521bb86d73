"""Registry credentials and the token flow.

Where credentials come from, first match wins: the pull's own credentials (:data:`pull_credentials`: the
daemon sets them from an image's Kubernetes pull secrets), ``--creds user:pass`` (for the image's registry
only), then docker's config.json (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``): ``credHelpers[host]``,
then ``auths[host]``, then ``credsStore``; helpers are ``docker-credential-<name> get``. Docker Hub is also
looked up under its legacy key ``https://index.docker.io/v1/``.

Challenges: ``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` gets a token from the realm (with
basic auth when we have credentials, anonymous otherwise), cached per (realm, service, scope) until it expires;
``Basic`` gets the credentials in an Authorization header.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from ..errors import ConfigError, Unauthorized
from ..reference import DEFAULT_DOMAIN, DOCKER_HUB_API_HOST

DOCKER_HUB_CONFIG_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")
TOKEN_EXPIRY_MARGIN_S = 30.0
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token, what a Bearer header may carry
DEFAULT_TOKEN_LIFETIME_S = 60.0  # the distribution token spec's default when expires_in is absent
CREDENTIAL_HELPER_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    @classmethod
    def from_user_pass(cls, text: str) -> Credentials:
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise ConfigError("credentials must be given as user:password")
        return cls(user, password)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    @property
    def fingerprint(self) -> str:
        """Tells credentials apart (a token got with one secret is not used with another) without holding them."""
        return hashlib.sha256(f"{self.username}\0{self.password}".encode()).hexdigest()[:16]


class Challenge(NamedTuple):
    scheme: str  # "bearer" or "basic"
    params: dict[str, str]


_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_www_authenticate(header: str) -> Challenge | None:
    """Parse one ``WWW-Authenticate`` challenge; ``None`` when the scheme is neither Bearer nor Basic."""
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params: dict[str, str] = {}
    for m in _CHALLENGE_PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else (m.group(3) or "")
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return Challenge(scheme, params)


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


# Credentials of one pull, by registry host, looked up before the node's own. A context variable, so that the
# tasks one pull starts see them and concurrent pulls with other secrets do not.
pull_credentials: contextvars.ContextVar[Mapping[str, Credentials]] = contextvars.ContextVar(
    "pull_credentials", default=MappingProxyType({})
)


def parse_docker_config(doc: object, where: str) -> dict[str, Credentials]:
    """The ``auths`` of a docker config.json (the ``.dockerconfigjson`` of a pull secret), or a legacy
    ``.dockercfg`` (the same entries at the top level) -> credentials by registry host."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: not a JSON object")
    auths = doc.get("auths", doc)
    if not isinstance(auths, dict):
        raise ConfigError(f"{where}: 'auths' must be an object")
    found = {}
    for key, entry in auths.items():
        host = _registry_host(str(key))
        creds = _from_auth_entry(entry, f"{where}: {host}") if isinstance(entry, dict) else None
        if creds:
            found[host] = creds
            if host in DOCKER_HUB_CONFIG_KEYS:
                found[DEFAULT_DOMAIN] = found[DOCKER_HUB_API_HOST] = creds
    return found


def _registry_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``registry.example.com`` unchanged."""
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0]


class CredentialStore:
    """Looks credentials up per registry host; results (also misses) are cached for the process."""

    def __init__(self, explicit: dict[str, Credentials] | None = None, config_path: Path | None = None):
        self._explicit = dict(explicit or {})
        self._config_path = config_path or docker_config_path()
        self._config: dict | None = None
        self._cache: dict[str, Credentials | None] = {}

    def _load_config(self) -> dict:
        if self._config is None:
            try:
                self._config = json.loads(self._config_path.read_text())
            except FileNotFoundError:
                self._config = {}
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read docker config {self._config_path}: {e}") from None
            if not isinstance(self._config, dict):
                raise ConfigError(f"docker config {self._config_path} is not a JSON object")
        return self._config

    def lookup(self, host: str) -> Credentials | None:
        own = pull_credentials.get().get(host)
        if own is not None:
            return own
        if host in self._explicit:
            return self._explicit[host]
        if host not in self._cache:
            self._cache[host] = self._lookup_config(host)
        return self._cache[host]

    def _lookup_config(self, host: str) -> Credentials | None:
        cfg = self._load_config()
        keys = [host]
        if host in (DEFAULT_DOMAIN, DOCKER_HUB_API_HOST):
            keys += DOCKER_HUB_CONFIG_KEYS
        helpers = cfg.get("credHelpers") or {}
        auths = cfg.get("auths") or {}
        if not isinstance(helpers, dict) or not isinstance(auths, dict):
            raise ConfigError(f"docker config {self._config_path}: 'credHelpers' and 'auths' must be objects")
        for key in keys:
            if key in helpers:
                return _run_helper(str(helpers[key]), key)
        for key in keys:
            entry = auths.get(key) or auths.get(f"https://{key}") or auths.get(f"http://{key}")
            if isinstance(entry, dict):
                creds = _from_auth_entry(entry, key)
                if creds:
                    return creds
        if cfg.get("credsStore"):
            for key in keys:
                creds = _run_helper(str(cfg["credsStore"]), key)
                if creds:
                    return creds
        return None


def _from_auth_entry(entry: dict, host: str) -> Credentials | None:
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"docker config: invalid 'auth' value for {host}") from None
        if sep:
            return Credentials(user, password)
    if entry.get("username") and entry.get("password"):
        return Credentials(str(entry["username"]), str(entry["password"]))
    if entry.get("identitytoken"):
        # An identity token is a refresh token: the token server exchanges it; docker uses this username.
        return Credentials("<token>", str(entry["identitytoken"]))
    return None


def _run_helper(name: str, host: str) -> Credentials | None:
    program = f"docker-credential-{name}"
    try:
        proc = subprocess.run(
            [program, "get"], input=host.encode(), capture_output=True, timeout=CREDENTIAL_HELPER_TIMEOUT_S
        )
    except FileNotFoundError:
        raise ConfigError(f"credential helper {program} named in docker config is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"credential helper {program} timed out") from None
    if proc.returncode != 0:
        # Helpers answer "credentials not found in native keychain" with a non-zero exit: not an error.
        return None
    try:
        payload = json.loads(proc.stdout)
        user, secret = str(payload["Username"]), str(payload["Secret"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"credential helper {program} returned malformed output") from None
    return Credentials(user, secret) if secret else None


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


TokenKey = tuple[str, str, str, str]  # realm, service, scope, fingerprint of the credentials ("" anonymous)


class TokenCache:
    """Bearer tokens per (realm, service, scope, credentials), reused until shortly before expiry."""

    def __init__(self) -> None:
        self._tokens: dict[TokenKey, _Token] = {}
        self._locks: dict[TokenKey, asyncio.Lock] = {}

    def get(self, key: TokenKey) -> str | None:
        tok = self._tokens.get(key)
        if tok and tok.expires_at > time.monotonic():
            return tok.value
        return None

    def lock(self, key: TokenKey) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def put(self, key: TokenKey, payload: dict) -> str:
        value = payload.get("token") or payload.get("access_token")
        if not value or not isinstance(value, str):
            raise Unauthorized("token server answered without a token")
        if not _TOKEN.fullmatch(value):  # it goes into a header: no CR/LF, spaces or other bytes
            raise Unauthorized("token server answered with a malformed token")
        try:
            lifetime = float(payload.get("expires_in") or DEFAULT_TOKEN_LIFETIME_S)
        except (TypeError, ValueError, OverflowError):
            lifetime = DEFAULT_TOKEN_LIFETIME_S
        if not math.isfinite(lifetime):
            lifetime = DEFAULT_TOKEN_LIFETIME_S
        self._tokens[key] = _Token(value, time.monotonic() + max(0.0, lifetime - TOKEN_EXPIRY_MARGIN_S))
        return value

    def drop(self, realm: str, service: str, scope: str) -> None:
        """Forget the tokens of this scope, whichever credentials got them."""
        for key in [k for k in self._tokens if k[:3] == (realm, service, scope)]:
            del self._tokens[key]
