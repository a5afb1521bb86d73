"""The long-lived parts of pulling, built from :class:`~puller.config.Settings`: one registry client, one store,
one connection budget and one blob fetcher, shared by every pull of a process (``puller pull`` makes one pull;
the daemon makes many, concurrently, under the same budget)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from pathlib import Path

from .. import config
from ..errors import ConfigError
from ..reference import Reference
from ..registry.auth import Credentials, CredentialStore
from ..registry.client import ClientSettings, RegistryClient
from ..registry.manifest import Platform
from ..stores import Store
from ..stores.oci_layout import OCILayoutStore
from .budget import BandwidthCap, ConnectionBudget
from .fetcher import BlobFetcher, FetchSettings
from .pull import PullProgress, PullResult, pull_image
from .staging import collect

log = logging.getLogger(__name__)


def open_store(settings: config.Settings) -> Store:
    """``oci:DIR`` (or a bare directory) -> the OCI layout store; ``containerd``; ``overlaybd``."""
    spec = settings.store
    kind, sep, arg = spec.partition(":")
    if spec == "containerd":
        from ..stores.containerd import ContainerdStore  # grpc is loaded only for this store
        from ..unpack import Limits

        return ContainerdStore(
            settings.containerd_address,
            settings.namespace,
            settings.snapshotter,
            settings.unpack,
            settings.staging_dir,
            settings.lease_expiry,
            settings.containerd_root,
            settings.unpack_path,
            Limits(max_entries=settings.unpack_max_entries, max_unpacked=settings.unpack_max_size),
        )
    if spec == "overlaybd":
        from ..stores.overlaybd import OverlaybdStore

        return OverlaybdStore(settings.overlaybd_config, settings.cache_dir)
    if sep and kind == "oci":
        return OCILayoutStore(arg or config.DEFAULT_OCI_DIR)
    if not sep or "/" in kind or kind.startswith("."):
        return OCILayoutStore(spec)
    raise ConfigError(f"unknown store {spec!r}: use oci:DIR, containerd or overlaybd")


class Engine:
    """Use as ``async with Engine(settings) as engine: await engine.pull(ref)``."""

    def __init__(self, settings: config.Settings, explicit_credentials: dict[str, Credentials] | None = None):
        self.settings = settings
        docker_config = Path(settings.docker_config) if settings.docker_config else None
        credentials = CredentialStore(explicit_credentials or {}, docker_config)
        client_settings = ClientSettings(
            settings.host_settings,
            settings.connect_timeout,
            settings.read_timeout,
            settings.attempts,
            settings.speed_limit,
            settings.lean_ranges,
        )
        self.client = RegistryClient(client_settings, credentials)
        self.store = open_store(settings)
        self.budget = ConnectionBudget(settings.connections, settings.connections_per_host)
        fetch_settings = FetchSettings(settings.chunk_size, settings.min_split, settings.attempts)
        bandwidth = BandwidthCap(settings.bandwidth_limit) if settings.bandwidth_limit else None
        self.fetcher = BlobFetcher(self.client, self.budget, fetch_settings, bandwidth)
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Engine:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.client)
            await stack.enter_async_context(self.store)
            self._stack = stack.pop_all()
        await self.collect_staging()
        return self

    async def collect_staging(self) -> None:
        """Remove what failed pulls left staged beyond staging_max_age / staging_max_bytes (engine/staging.py)."""
        s = self.settings
        try:
            await asyncio.to_thread(collect, self.store.staging, s.staging_max_bytes, s.staging_max_age)
        except OSError as e:
            log.warning("could not collect the staging directory: %s", e)

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def platform_for(self, platform: str | None) -> Platform | None:
        """An entry's own platform, else the configured one, else None (this host)."""
        chosen = platform or self.settings.platform
        return Platform.parse(chosen) if chosen else None

    async def pull(
        self,
        ref: Reference,
        platform: str | None = None,
        progress: PullProgress | None = None,
        pin: bool = False,
    ) -> PullResult:
        """Pull ``ref``; ``pin`` asks the store to keep it from garbage collection (the caller decides)."""
        return await pull_image(
            ref,
            self.client,
            self.fetcher,
            self.store,
            self.platform_for(platform),
            progress,
            pin=pin,
            max_blob_size=self.settings.max_blob_size,
        )
