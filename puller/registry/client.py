"""The HTTP side: one connection pool (:mod:`.http`), registry auth, manifests, and blob range requests.

Redirects are followed by hand so that the Authorization header goes only to the registry host that asked
for it; a blob's final (CDN) URL is returned to the caller to be reused for every range of that blob.
HTTP statuses are translated into :mod:`puller.errors` here and nowhere else.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

from ..digest import Digest
from ..errors import (
    ConfigError,
    DigestMismatch,
    Forbidden,
    ManifestError,
    NotFound,
    PullerError,
    RegistryError,
    SizeMismatch,
    TransportError,
    Unauthorized,
    VerificationError,
)
from ..reference import Reference
from . import manifest as mf
from .auth import Challenge, CredentialStore, TokenCache, TokenKey, parse_www_authenticate
from .bodies import USER_AGENT, SpeedLimit, read_body
from .hosts import PULL, RESOLVE, Endpoint, HostSettings
from .http import ConnectionFailed, HttpPool, Response, Timeouts, TLSFailed, TLSNotTrusted
from .lean import LeanRanges

if TYPE_CHECKING:
    from tenacity import AsyncRetrying

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_REDIRECTS = 5
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CONNECT_TIMEOUT_S = 15.0
READ_TIMEOUT_S = 30.0  # between two reads of one response: a stalled connection fails after this
MAX_ERROR_BODY = 64 * 1024
MAX_TOKEN_BODY = 1 << 20  # a token answer: a JWT or two and a few fields
NET_ERRORS = (ConnectionFailed, OSError)  # OSError covers TimeoutError
DEFAULT_ATTEMPTS = 6  # tries per request (a manifest, a chunk) on the last host of a registry
MIRROR_ATTEMPTS = 2  # tries per request on a mirror before the next host takes over
MAX_RETRY_AFTER_S = 60.0


class RetryableStatus(RegistryError):
    """A status worth trying again (5xx, 429, 408); ``retry_after`` in seconds when the server said."""

    def __init__(self, message: str, status: int, retry_after: float | None = None):
        super().__init__(message, status)
        self.retry_after = retry_after


class _NoTLS(Exception):
    """A loopback registry answered a TLS handshake with something else: it speaks plain HTTP."""


class ExpiredURL(RegistryError):
    """A redirect target (blob CDN URL) answered 401/403/410: resolve the blob through the registry again."""


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils  # imported here: only a Retry-After date needs it, and every pull pays for an import

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def is_retryable(e: BaseException) -> bool:
    return isinstance(e, TransportError | RetryableStatus | ExpiredURL)


def _retry_wait(retry_state) -> float:
    e = retry_state.outcome.exception() if retry_state.outcome else None
    if isinstance(e, ExpiredURL):
        return 0.0
    if isinstance(e, RetryableStatus) and e.retry_after is not None:
        return min(e.retry_after, MAX_RETRY_AFTER_S)
    from tenacity import wait_random_exponential

    return wait_random_exponential(multiplier=0.25, max=8.0)(retry_state)


def retrying(attempts: int) -> AsyncRetrying:
    """The one retry policy (tenacity): network errors, cut bodies, 5xx, 408 and 429 (honouring Retry-After,
    capped), expired CDN URLs at once; bounded tries, exponential backoff with jitter. tenacity is imported only
    once a retry is needed (5 ms of every pull's start otherwise: the first try runs without it, see retried)."""
    from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=_retry_wait,
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )


async def retried(attempts: int, call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` under :func:`retrying`'s policy. The first try runs without tenacity's machinery (about 0.1 ms
    of the event loop per request here, and most requests need one try); a retryable failure hands over to
    tenacity, which takes it as its first attempt's outcome and waits as it would have."""
    try:
        return await call()
    except BaseException as e:
        if attempts <= 1 or not is_retryable(e):
            raise
        first = e
    async for attempt in retrying(attempts):
        with attempt:
            if attempt.retry_state.attempt_number == 1:
                raise first
            return await call()
    raise AssertionError("tenacity ended without an outcome")  # reraise=True: the last error is raised


def same_origin(a: str, b: str) -> bool:
    sa, sb = urlsplit(a), urlsplit(b)
    return (sa.scheme, sa.hostname, sa.port) == (sb.scheme, sb.hostname, sb.port)


def checked_url(url: str, what: str) -> str:
    """``url`` if it is an http(s) URL with a host and a valid port (what a registry sends may be anything)."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:
        valid = False
    if not valid or any(c in url for c in "\r\n\x00 "):
        raise RegistryError(f"{what} is not a valid http(s) URL: {url[:200]!r}")
    return url


@dataclass(frozen=True, slots=True)
class ClientSettings:
    hosts: HostSettings = field(default_factory=HostSettings)
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S
    attempts: int = DEFAULT_ATTEMPTS  # tries per manifest request
    speed: SpeedLimit = field(default_factory=SpeedLimit)  # the low-speed limit of every response body
    lean_ranges: bool = True  # ranges of resolved blob URLs through lean.py (else http.py)

    @property
    def headers_timeout_s(self) -> float:
        """From sending a request to its last header line: a server that trickles headers is dropped too."""
        return self.connect_timeout_s + self.read_timeout_s


class RegistryClient:
    """Talks to registries. Use as ``async with RegistryClient(...) as client``."""

    def __init__(self, settings: ClientSettings | None = None, credentials: CredentialStore | None = None):
        self.settings = settings or ClientSettings()
        self.credentials = credentials or CredentialStore()
        self._tokens = TokenCache()
        # (host, repository) -> challenge last seen, so later requests authenticate up front
        self._challenges: dict[tuple[str, str], Challenge] = {}
        self._http: HttpPool | None = None
        self._ssl: dict[tuple[str, Endpoint | None], ssl.SSLContext | bool] = {}  # (host, its hosts.toml entry)
        self._schemes: dict[str, str] = {}  # loopback hosts found to speak plain HTTP
        self._endpoints: dict[str, tuple[Endpoint, ...]] = {}  # registry -> its hosts, mirrors first
        s = self.settings
        self._dial: dict[str, float] = {}  # "host:port" -> dial_timeout of the hosts that set one
        self._timeouts = Timeouts(s.connect_timeout_s, s.headers_timeout_s, s.read_timeout_s, self._dial)
        self.lean = LeanRanges(self._ssl_for, self._timeouts) if s.lean_ranges else None

    async def __aenter__(self) -> RegistryClient:
        # identity: registries' gzip would hide the bytes that digests and ranges are about (bodies.py)
        self._http = HttpPool(self._ssl_for, self._timeouts, {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.lean is not None:
            await self.lean.__aexit__()
        if self._http:
            self._http.close()
            self._http = None

    @property
    def http(self) -> HttpPool:
        if self._http is None:
            raise RuntimeError("RegistryClient used outside 'async with'")
        return self._http

    def _ssl_for(self, url: str, endpoint: Endpoint | None = None) -> ssl.SSLContext | bool:
        """TLS for ``url``: the endpoint's own settings (hosts.toml) on its host, puller's rules elsewhere."""
        host = urlsplit(url).netloc
        key = (host, endpoint if endpoint is not None and endpoint.host == host else None)
        if key not in self._ssl:
            default = self.settings.hosts.ssl_for(host)
            self._ssl[key] = key[1].ssl_context(default) if key[1] is not None else default
        return self._ssl[key]

    def endpoints(self, ref: Reference, *capabilities: str) -> tuple[Endpoint, ...]:
        """The hosts that serve ``ref``'s registry with ``capabilities``, mirrors first (see hosts.py)."""
        if ref.domain not in self._endpoints:
            self._endpoints[ref.domain] = self.settings.hosts.endpoints(ref.domain)
            for ep in self._endpoints[ref.domain]:
                if ep.dial_timeout is not None:
                    self._dial[ep.origin()] = ep.dial_timeout
            if len(self._endpoints[ref.domain]) > 1:
                log.info("%s: hosts %s", ref.domain, ", ".join(e.host for e in self._endpoints[ref.domain]))
        found = tuple(e for e in self._endpoints[ref.domain] if e.can(*capabilities))
        if not found:
            raise ConfigError(f"no host of {ref.domain} may {' and '.join(capabilities)} (check its hosts.toml)")
        return found

    def endpoint_url(self, endpoint: Endpoint, ref: Reference, path: str) -> str:
        scheme = endpoint.scheme or self._schemes.get(endpoint.host) or self.settings.hosts.scheme(endpoint.host)
        return endpoint.url(scheme, ref.repository, path)

    # ---- auth ---------------------------------------------------------------------------------------------

    async def _auth_header(self, ref: Reference, endpoint: Endpoint) -> str | None:
        challenge = self._challenges.get((endpoint.host, ref.repository))
        if challenge is None:
            return None
        # A mirror gets the credentials of its own host (as containerd looks them up), never the upstream's.
        if endpoint.is_mirror:
            creds = self.credentials.lookup(endpoint.host)
        else:
            creds = self.credentials.lookup(ref.domain) or self.credentials.lookup(endpoint.host)
        if challenge.scheme == "basic":
            if creds is None:
                raise Unauthorized(f"{endpoint.host} asks for basic auth and no credentials are configured", 401)
            return creds.basic_header()
        realm = challenge.params.get("realm")
        if not realm:
            raise Unauthorized(f"{endpoint.host} sent a Bearer challenge without a realm", 401)
        try:
            checked_url(realm, f"{endpoint.host}'s token realm")
        except RegistryError as e:
            raise Unauthorized(str(e), 401) from None
        scope = f"repository:{ref.repository}:pull"
        key = (realm, challenge.params.get("service", ""), scope, creds.fingerprint if creds else "")
        token = self._tokens.get(key)
        if token is None:
            async with self._tokens.lock(key):
                token = self._tokens.get(key) or await self._fetch_token(key, creds)
        return f"Bearer {token}"

    async def _fetch_token(self, key: TokenKey, creds) -> str:
        realm, service, scope, _ = key
        query = {"scope": scope}
        if service:
            query["service"] = service
        if creds and creds.username == "<token>":
            # identity token (refresh token): the OAuth2 POST form of the token spec
            form = {"grant_type": "refresh_token", "refresh_token": creds.password, "client_id": "puller", **query}
            body = urlencode(form).encode()
            req = self.http.request("POST", realm, {"Content-Type": "application/x-www-form-urlencoded"}, body)
        else:
            headers = {"Authorization": creds.basic_header()} if creds else {}
            url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}"
            req = self.http.request("GET", url, headers)
        try:
            resp = await req
            async with resp:
                body = await read_body(
                    resp, MAX_TOKEN_BODY, self.settings.speed, f"token server {urlsplit(realm).netloc}"
                )
                if resp.status in (401, 403):
                    raise Unauthorized(
                        f"token server {urlsplit(realm).netloc} refused the credentials for {scope}", resp.status
                    )
                if resp.status in RETRYABLE_STATUS:
                    raise RetryableStatus(f"token server answered {resp.status}", resp.status)
                if resp.status != 200:
                    raise Unauthorized(f"token server {urlsplit(realm).netloc} answered {resp.status}", resp.status)
        except NET_ERRORS as e:
            raise TransportError(f"token server {urlsplit(realm).netloc}: {_describe(e)}") from None
        if len(body) > MAX_TOKEN_BODY:
            raise Unauthorized(f"token server answered with more than {MAX_TOKEN_BODY:,} bytes", 200)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise Unauthorized("token server answered with invalid JSON", 200) from None
        if not isinstance(payload, dict):
            raise Unauthorized("token server answered with invalid JSON", 200)
        return self._tokens.put(key, payload)

    def _remember_challenge(self, ref: Reference, endpoint: Endpoint, resp: Response) -> bool:
        """Record the 401's challenge; True when it is new (worth one more try)."""
        challenge = None
        for header in resp.headers.getall("WWW-Authenticate", []):
            challenge = parse_www_authenticate(header)
            if challenge:
                break
        if challenge is None:
            return False
        key = (endpoint.host, ref.repository)
        old = self._challenges.get(key)
        self._challenges[key] = challenge
        if old is not None and old.scheme == "bearer" and challenge.scheme == "bearer":
            realm = old.params.get("realm", "")
            self._tokens.drop(realm, old.params.get("service", ""), f"repository:{ref.repository}:pull")
            return old != challenge or "error" in challenge.params
        return old != challenge

    # ---- requests -----------------------------------------------------------------------------------------

    @asynccontextmanager
    async def registry_get(
        self, ref: Reference, path: str, headers: dict[str, str] | None = None, endpoint: Endpoint | None = None
    ) -> AsyncIterator[tuple[Response, str]]:
        """GET ``<endpoint>/v2/<repo>/<path>`` (default: the registry itself) with auth, following redirects by
        hand. Yields the final successful (2xx) response and its URL. Credentials and the host's configured
        headers go only to the endpoint's own origin."""
        ep = endpoint or self.endpoints(ref)[-1]
        for attempt in range(2):
            url = self.endpoint_url(ep, ref, path)
            auth = await self._auth_header(ref, ep)
            origin_headers = dict(ep.header)
            if auth:
                origin_headers["Authorization"] = auth
            try:
                resp, final_url = await self._get_following(url, headers or {}, origin_headers, ep, tls_fallback=True)
            except _NoTLS:
                self._schemes[ep.host] = "http"  # a loopback registry without TLS
                url = self.endpoint_url(ep, ref, path)
                resp, final_url = await self._get_following(url, headers or {}, origin_headers, ep)
            if resp.status == 401 and attempt == 0 and same_origin(final_url, url):
                retry = self._remember_challenge(ref, ep, resp)
                await resp.discard()
                if retry:
                    continue
                raise Unauthorized(f"{ep.host}: 401 Unauthorized for {ref.repository}", 401)
            break
        try:
            if resp.status in (401, 403, 410) and not same_origin(final_url, url):
                # A redirect target refusing a fresh URL: signed URL expired or skewed clock. Worth a new resolve.
                raise ExpiredURL(f"blob URL on {urlsplit(final_url).netloc} answered {resp.status}", resp.status)
            if resp.status >= 300:
                await _raise_for_status(resp, ref, final_url)
            yield resp, final_url
        finally:
            resp.release()

    @asynccontextmanager
    async def url_get(self, url: str, headers: dict[str, str]) -> AsyncIterator[Response]:
        """GET a redirect target (CDN URL) without credentials. 401/403/410 raise :class:`ExpiredURL`."""
        resp, final_url = await self._get_following(url, headers, {})
        try:
            if resp.status in (401, 403, 410):
                raise ExpiredURL(f"blob URL on {urlsplit(final_url).netloc} answered {resp.status}", resp.status)
            if resp.status >= 300:
                await _raise_for_status(resp, None, final_url)
            yield resp
        finally:
            resp.release()

    async def _get_following(
        self,
        url: str,
        headers: dict[str, str],
        origin_headers: dict[str, str],
        endpoint: Endpoint | None = None,
        tls_fallback: bool = False,
    ) -> tuple[Response, str]:
        origin = url
        for _ in range(MAX_REDIRECTS + 1):
            h = {**headers, **origin_headers} if same_origin(url, origin) else dict(headers)
            try:
                tls = functools.partial(self._ssl_for, endpoint=endpoint)
                resp = await self.http.request("GET", url, h, ssl_for=tls)
            except TLSNotTrusted as e:
                raise TransportError(
                    f"{urlsplit(url).netloc}: TLS certificate not trusted ({e.reason}); "
                    "add its CA with ca_file, or list the host in insecure_skip_verify"
                ) from None
            except TLSFailed as e:
                netloc = urlsplit(url).netloc
                if tls_fallback and url == origin and self.settings.hosts.may_fall_back_to_http(netloc):
                    raise _NoTLS from None
                raise TransportError(str(e)) from None
            except OSError as e:
                raise TransportError(f"{urlsplit(url).netloc}: {_describe(e)}") from None
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                await resp.discard()  # the registry's connection serves the next blob's redirect
                try:
                    url = urljoin(url, resp.headers["Location"])
                except ValueError:
                    url = resp.headers["Location"]
                checked_url(url, "redirect target")
                continue
            return resp, url
        raise RegistryError(f"more than {MAX_REDIRECTS} redirects fetching {urlsplit(origin).path}")

    # ---- manifests ----------------------------------------------------------------------------------------

    async def get_manifest(
        self, ref: Reference, expected: mf.Descriptor | None = None
    ) -> tuple[mf.Descriptor, bytes, Endpoint]:
        """Fetch a manifest or index by ``ref.object``; size-capped and, when the digest is known (pulled by
        digest, or a child of an index), verified. Returns its descriptor, raw bytes and the host that served it.

        Hosts are tried in order as containerd does: a tag only through hosts that may resolve, a digest through
        hosts that may pull; a host that fails or lacks it passes to the next. If all fail, the most telling
        error is raised (another HTTP error over not found over unreachable)."""
        by_digest = ref.digest is not None or expected is not None
        hosts = self.endpoints(ref, PULL) if by_digest else self.endpoints(ref, PULL, RESOLVE)
        best: tuple[int, PullerError] | None = None
        for i, ep in enumerate(hosts):
            try:
                attempts = self.settings.attempts if i == len(hosts) - 1 else MIRROR_ATTEMPTS
                desc, body = await retried(attempts, functools.partial(self._get_manifest_from, ep, ref, expected))
                return desc, body, ep
            except (RegistryError, TransportError, VerificationError) as e:
                rank = 1 if isinstance(e, TransportError) else 2 if isinstance(e, NotFound) else 3
                if best is None or rank > best[0]:
                    best = (rank, e)
                if i < len(hosts) - 1:
                    log.info("%s: %s; trying %s", ep.host, e, hosts[i + 1].host)
        assert best is not None
        raise best[1]

    async def _get_manifest_from(
        self, ep: Endpoint, ref: Reference, expected: mf.Descriptor | None
    ) -> tuple[mf.Descriptor, bytes]:
        async with self.registry_get(ref, f"manifests/{ref.object}", {"Accept": mf.ACCEPT}, ep) as (resp, _):
            length = resp.content_length
            if length is not None and length > mf.MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest for {ref} is {length} bytes, over the {mf.MAX_MANIFEST_BYTES} limit")
            try:
                body = await read_body(
                    resp, mf.MAX_MANIFEST_BYTES, self.settings.speed, f"{ep.host}: manifest of {ref}"
                )
            except NET_ERRORS as e:
                raise TransportError(f"{ep.host}: {_describe(e)} reading manifest") from None
            if len(body) > mf.MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest for {ref} is over the {mf.MAX_MANIFEST_BYTES} byte limit")
            content_type = resp.headers.get("Content-Type", "")
        want = expected.digest if expected else ref.digest
        actual = Digest.of(body, want.algorithm if want else "sha256")
        if want and actual != want:
            raise DigestMismatch(str(want), str(actual), what=f"manifest of {ref}")
        if expected and expected.size != len(body):
            raise SizeMismatch(expected.size, len(body), what=f"manifest of {ref}")
        doc = mf.parse(body, content_type)
        media_type = doc.media_type
        return mf.Descriptor(media_type, actual, len(body)), body


async def _raise_for_status(resp: Response, ref: Reference | None, url: str) -> None:
    status = resp.status
    try:
        body = (await read_body(resp, MAX_ERROR_BODY, SpeedLimit(), "error body"))[:MAX_ERROR_BODY]
    except (*NET_ERRORS, PullerError):
        body = b""
    codes: tuple[str, ...] = ()
    detail = ""
    try:
        errors = json.loads(body).get("errors") or []
        codes = tuple(str(e.get("code")) for e in errors if isinstance(e, dict))
        detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError, TypeError, RecursionError):
        pass
    where = f"{urlsplit(url).netloc}{urlsplit(url).path}"
    what = f"{ref} " if ref else ""
    msg = f"{what}({where}): HTTP {status}" + (f" {detail}" if detail else "")
    if status in RETRYABLE_STATUS:
        raise RetryableStatus(msg, status, parse_retry_after(resp.headers.get("Retry-After")))
    if status == 404 or any(c in ("MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN") for c in codes):
        raise NotFound(f"not found: {msg}", status, codes)
    if status == 401:
        raise Unauthorized(f"unauthorized: {msg}", status, codes)
    if status == 403:
        raise Forbidden(f"forbidden: {msg}", status, codes)
    raise RegistryError(msg, status, codes)


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    text = str(e) or type(e).__name__
    return text[:300]
