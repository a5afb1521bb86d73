"""One exception hierarchy for everything puller raises on purpose.

    PullerError                    base; ``exit_code`` is what the CLI exits with
    ├── InvalidReference           an image reference that does not parse
    ├── InvalidDigest              a digest string with a bad algorithm or hex
    ├── ConfigError                a bad setting or config file
    ├── RegistryError              the registry answered, but not with what we need
    │   ├── NotFound               404 / MANIFEST_UNKNOWN / BLOB_UNKNOWN / NAME_UNKNOWN
    │   ├── Unauthorized           401 after trying every credential we have
    │   ├── Forbidden              403 from the registry itself (not an expired CDN URL)
    │   ├── RetryableStatus        5xx, 408, 429: retried, then reported (registry/client.py)
    │   ├── ExpiredURL             401/403/410 from a reused CDN URL: resolved again (registry/client.py)
    │   └── ManifestError          unknown media type, oversize, invalid JSON, no matching platform
    │       └── PlatformNotFound
    ├── TransportError             could not talk to the host (DNS, refused, reset, TLS, timeout, too slow)
    │   ├── SlowTransfer           under low_speed_limit for low_speed_time (registry/bodies.py)
    │   ├── TruncatedBody          a body ended before its range did (engine/fetcher.py)
    │   └── PullTimeout            daemon: an image not present within pull_timeout
    ├── VerificationError          bytes did not match their descriptor
    │   ├── DigestMismatch
    │   ├── SizeMismatch
    │   └── InvalidLayer           a layer's bytes are not a tar puller's applier may apply (unpack/)
    ├── StoreError                 the store could not take the data
    │   ├── DiskFull
    │   └── UnsafeDirectory        a staging or store directory others could plant links in (stores/safedir.py)
    ├── KubernetesError            the Kubernetes API refused or could not be reached (daemon, warmup)
    └── WarmupError                warmup: a daemon refused the request, or the images were not everywhere in time

Lower-level exceptions (HTTP connections, OSError) are translated into these in one place each:
:mod:`puller.registry.client` for HTTP and :mod:`puller.stores` for files.
"""

from __future__ import annotations


class PullerError(Exception):
    """Base of every error puller raises on purpose."""

    exit_code = 1


class InvalidReference(PullerError, ValueError):
    exit_code = 2


class InvalidDigest(PullerError, ValueError):
    exit_code = 2


class ConfigError(PullerError):
    exit_code = 2


class RegistryError(PullerError):
    """The registry answered with an error. ``status`` is the HTTP status, ``codes`` the
    distribution-spec error codes parsed from the body (``errors[].code``)."""

    exit_code = 3

    def __init__(self, message: str, status: int | None = None, codes: tuple[str, ...] = ()):
        super().__init__(message)
        self.status = status
        self.codes = codes


class NotFound(RegistryError):
    exit_code = 4


class Unauthorized(RegistryError):
    exit_code = 5


class Forbidden(RegistryError):
    exit_code = 5


class ManifestError(RegistryError):
    exit_code = 6


class PlatformNotFound(ManifestError):
    exit_code = 6


class TransportError(PullerError):
    """Network-level failure: DNS, connection refused or reset, TLS, timeout."""

    exit_code = 7


class PullTimeout(TransportError):
    """The daemon gave up on one pull after ``pull_timeout`` (it is tried again after a back-off)."""


class VerificationError(PullerError):
    exit_code = 8


class DigestMismatch(VerificationError):
    def __init__(self, expected: str, actual: str, what: str = "blob"):
        super().__init__(f"{what} digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(VerificationError):
    def __init__(self, expected: int, actual: int, what: str = "blob"):
        super().__init__(f"{what} size mismatch: expected {expected} bytes, got {actual}")
        self.expected = expected
        self.actual = actual


class InvalidLayer(VerificationError):
    """A layer cannot be applied: broken compression or tar, an entry type containerd refuses, or an unpack
    limit exceeded."""


class StoreError(PullerError):
    exit_code = 9


class DiskFull(StoreError):
    exit_code = 10


class KubernetesError(PullerError):
    exit_code = 11


class WarmupError(PullerError):
    exit_code = 12
