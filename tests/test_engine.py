"""The engine against small aiohttp servers on loopback that misbehave on purpose: a registry that redirects
to a "CDN" on another origin, which can expire URLs, throttle with 429, fail with 500 or cut bodies short."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from puller.engine.budget import ConnectionBudget
from puller.engine.fetcher import BlobFetcher, BlobProgress, FetchSettings
from puller.engine.pull import pull_image
from puller.errors import DigestMismatch
from puller.reference import Reference
from puller.registry.auth import Credentials, CredentialStore
from puller.registry.client import ClientSettings, RegistryClient
from puller.registry.manifest import Descriptor
from puller.stores.oci_layout import OCILayoutStore

AUTH = Credentials("bob", "pw")
STALL_S = 120.0  # longer than the test's own timeout: the pull must not wait it out
READ_TIMEOUT_S = 0.5


@dataclass
class Behaviour:
    """What the CDN does; each counter is consumed as requests arrive."""

    expire_first: int = 0  # answer 403 to this many requests
    throttle_first: int = 0  # answer 429 Retry-After: 0 to this many
    fail_first: int = 0  # answer 500 to this many
    cut_first: int = 0  # send half the range, then close
    stall_first: int = 0  # send half the range, then go silent (connection left open) for STALL_S
    stall_at: int | None = None  # the first request for the range starting here: the head, then silence until
    # the range is asked for again
    stall_sends: float = 0.0  # ... after this fraction of its body
    corrupt: bool = False
    delay_s: float = 0.0  # before each range is answered
    requests: list[dict] = field(default_factory=list)
    stalls: int = 0


class Fake:
    def __init__(self, blobs: dict[str, bytes], behaviour: Behaviour):
        self.blobs = blobs
        self.b = behaviour
        self.registry_requests: list[dict] = []

    async def start(self):
        self.released = asyncio.Event()
        self.asked_again = asyncio.Event()
        self.stalled_range = (-1, -1)
        cdn = web.Application()
        cdn.router.add_get("/cdn/{digest}", self.cdn_blob)
        self.cdn_runner = web.AppRunner(cdn)
        await self.cdn_runner.setup()
        site = web.TCPSite(self.cdn_runner, "127.0.0.1", 0)
        await site.start()
        self.cdn_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        reg = web.Application()
        reg.router.add_get("/v2/r/manifests/{ref}", self.manifest)
        reg.router.add_get("/v2/r/blobs/{digest}", self.reg_blob)
        self.reg_runner = web.AppRunner(reg)
        await self.reg_runner.setup()
        site = web.TCPSite(self.reg_runner, "127.0.0.1", 0)
        await site.start()
        self.host = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self):
        self.released.set()
        await self.reg_runner.cleanup()
        await self.cdn_runner.cleanup()

    def _authorized(self, request) -> bool:
        self.registry_requests.append(dict(request.headers))
        return request.headers.get("Authorization") == AUTH.basic_header()

    async def manifest(self, request):
        if not self._authorized(request):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        layers = [d for d in self.blobs if d != self.config]
        doc = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": self.config,
                "size": len(self.blobs[self.config]),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": len(self.blobs[d])}
                for d in layers
            ],
        }
        return web.Response(body=json.dumps(doc).encode(), content_type="application/vnd.oci.image.manifest.v1+json")

    async def reg_blob(self, request):
        if not self._authorized(request):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        raise web.HTTPTemporaryRedirect(f"{self.cdn_url}/cdn/{request.match_info['digest']}?sig=1")

    async def cdn_blob(self, request):
        b = self.b
        b.requests.append(
            {
                "auth": request.headers.get("Authorization"),
                "range": request.headers.get("Range"),
                "digest": request.match_info["digest"],
            }
        )
        if b.expire_first:
            b.expire_first -= 1
            return web.Response(status=403, text="expired")
        if b.throttle_first:
            b.throttle_first -= 1
            return web.Response(status=429, headers={"Retry-After": "0"})
        if b.fail_first:
            b.fail_first -= 1
            return web.Response(status=500)
        await asyncio.sleep(b.delay_s)
        data = self.blobs[request.match_info["digest"]]
        if b.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        start, end = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
        body = data[start : end + 1]
        resp = web.StreamResponse(
            status=206, headers={"Content-Range": f"bytes {start}-{end}/{len(data)}", "Content-Length": str(len(body))}
        )
        await resp.prepare(request)
        if b.stall_at == start and b.stalls == 0:
            b.stalls += 1
            self.stalled_range = (start, end)
            if b.stall_sends:
                await resp.write(body[: int(len(body) * b.stall_sends)])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.asked_again.wait(), STALL_S)
            return resp
        if b.stalls == 1 and self.stalled_range[0] <= start <= self.stalled_range[1]:  # its rest, asked again
            b.stalls += 1
            self.asked_again.set()
        if b.cut_first:
            b.cut_first -= 1
            await resp.write(body[: len(body) // 2])
            request.transport.close()
            return resp
        if b.stall_first:
            b.stall_first -= 1
            await resp.write(body[: len(body) // 2])
            with contextlib.suppress(TimeoutError):  # silent until the test ends: only a read timeout helps
                await asyncio.wait_for(self.released.wait(), STALL_S)
            return resp
        await resp.write(body)
        return resp


def _blobs(n_layers: int, size: int, seed: int) -> tuple[dict[str, bytes], str]:
    rnd = random.Random(seed)
    blobs = {}
    for _ in range(n_layers):
        data = rnd.randbytes(size)
        blobs["sha256:" + hashlib.sha256(data).hexdigest()] = data
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": seed}).encode()
    cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
    blobs[cdigest] = config
    return blobs, cdigest


@pytest.fixture()
async def fake(request):
    behaviour = request.param if hasattr(request, "param") else Behaviour()
    blobs, config = _blobs(3, 600_000, seed=7)
    f = Fake(blobs, behaviour)
    f.config = config
    await f.start()
    yield f
    await f.stop()


async def _pull(fake: Fake, tmp_path, attempts: int = 6, ref_text: str = "r:t", read_timeout_s: float = READ_TIMEOUT_S):
    ref = Reference.parse(f"{fake.host}/{ref_text}")
    creds = CredentialStore({fake.host: AUTH}, config_path=tmp_path / "none.json")
    settings = ClientSettings(read_timeout_s=read_timeout_s)
    async with RegistryClient(settings, creds) as client, OCILayoutStore(tmp_path / "store") as store:
        fetcher = BlobFetcher(client, ConnectionBudget(8, 8), FetchSettings(chunk_size=128 * 1024, attempts=attempts))
        return await pull_image(ref, client, fetcher, store), store


def _assert_complete(fake: Fake, store: OCILayoutStore):
    for digest, data in fake.blobs.items():
        assert (store.root / "blobs" / "sha256" / digest[7:]).read_bytes() == data


async def test_credentials_never_follow_redirect_to_other_host(fake, tmp_path):
    result, store = await _pull(fake, tmp_path)
    _assert_complete(fake, store)
    assert fake.b.requests and all(r["auth"] is None for r in fake.b.requests)
    assert all(r.get("Authorization") in (None, AUTH.basic_header()) for r in fake.registry_requests)
    # the redirect was resolved once per blob, then the CDN URL reused for the other ranges
    blob_hits = [r for r in fake.registry_requests if r.get("Authorization")]
    assert len(blob_hits) <= 1 + len(fake.blobs) + 1
    assert len(fake.b.requests) > len(fake.blobs)
    assert result.fetched_bytes == sum(len(d) for d in fake.blobs.values())


@pytest.mark.parametrize(
    "fake",
    [
        Behaviour(expire_first=3),
        Behaviour(throttle_first=4),
        Behaviour(fail_first=3),
        Behaviour(cut_first=3),
        Behaviour(stall_first=2),
    ],
    indirect=True,
    ids=["expired-url", "429-retry-after", "500", "truncated-body", "stalled-body"],
)
@pytest.mark.timeout(60)
async def test_transient_faults_recover(fake, tmp_path):
    _, store = await _pull(fake, tmp_path)
    _assert_complete(fake, store)
    assert list((store.staging_dir).glob("*.partial")) == []


def _asked(fake: Fake) -> list[tuple[int, int]]:
    """The byte ranges the CDN was asked for, in the order asked: (first, last) inclusive."""
    return [
        (int(first), int(last))
        for first, last in (r["range"].removeprefix("bytes=").split("-") for r in fake.b.requests if r["range"])
    ]


def _asked_again(fake: Fake) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The range at 128 KiB that stalled, and the ranges within it asked for after it."""
    ranges = _asked(fake)
    stalled = next(r for r in ranges if r[0] == 128 * 1024)
    return stalled, [r for r in ranges[ranges.index(stalled) + 1 :] if stalled[0] <= r[0] <= stalled[1]]


async def _pull_with_a_stalled_front(tmp_path, size: int, seed: int, sends: float = 0.0) -> Fake:
    """Pull a one-layer image whose range at 128 KiB goes silent (head sent, then ``sends`` of its body); check it
    is complete."""
    blobs, config = _blobs(1, size, seed=seed)
    f = Fake(blobs, Behaviour(stall_at=128 * 1024, stall_sends=sends))
    f.config = config
    await f.start()
    try:
        _, store = await _pull(f, tmp_path, read_timeout_s=STALL_S)
    finally:
        await f.stop()
    _assert_complete(f, store)
    return f


@pytest.mark.timeout(60)
async def test_a_stalled_range_at_the_front_is_taken_over_by_another_connection(tmp_path, monkeypatch):
    """The range at 128 KiB (the front once the first chunk is in) goes silent (head sent, no body) while the
    others stream: another connection asks for it again and the silent request is dropped (the read timeout,
    longer than the test's own, is not what rescues it), and the blob is complete and verified. Its rest is asked
    for in pieces of TAKEOVER_PIECE, over several connections (one new request might starve again)."""
    from puller.engine import fetcher as fetcher_module

    monkeypatch.setattr(fetcher_module, "TAKEOVER_PIECE", 32 * 1024)  # the test's chunks are 128 KiB
    f = await _pull_with_a_stalled_front(tmp_path, 40 << 20, seed=11)
    assert f.b.stalls == 2  # asked for again, once
    stalled, pieces = _asked_again(f)
    assert len(pieces) > 1 and all(end - start + 1 <= 32 * 1024 for start, end in pieces)
    assert sum(end - start + 1 for start, end in pieces) == stalled[1] - stalled[0] + 1


@pytest.mark.timeout(60)
async def test_a_stalled_range_hands_over_the_bytes_it_received_before_it_went_silent(tmp_path):
    """The range at 128 KiB sends half its body, then goes silent: those bytes, received but short of a whole
    block, are kept (written, and not asked for again); only the rest is asked for again."""
    f = await _pull_with_a_stalled_front(tmp_path, 40 << 20, seed=13, sends=0.5)
    assert f.b.stalls == 2
    stalled, again = _asked_again(f)
    half = (stalled[1] - stalled[0] + 1) // 2
    assert again and min(start for start, _ in again) == stalled[0] + half


@pytest.mark.timeout(60)
async def test_ranges_the_store_has_no_room_for_wait_and_a_stalled_front_is_still_taken_over(tmp_path, monkeypatch):
    """A store that has no room for ranges ahead (the containerd store, where containerd is the limit) holds
    them back before they are requested; while every other connection is held, the silent front range is taken
    over all the same (by its silence alone: no bytes arrive to tell), and the pull completes."""
    import time

    from puller.engine import fetcher as fetcher_module
    from puller.stores.staged import FileWriter

    asked: list[int] = []

    async def no_room_ahead(self, offset: int, n: int, timeout: float) -> bool:
        """Room for 1 MiB past the prefix, as memory for bytes waiting for their turn would be."""
        asked.append(offset)
        if offset <= self._staged.ranges.prefix_end() + (1 << 20):
            return True
        await asyncio.sleep(timeout)
        return False

    monkeypatch.setattr(FileWriter, "room_for", no_room_ahead)
    monkeypatch.setattr(fetcher_module, "ROOM_WAIT_S", 30.0)  # only a takeover can rescue the front in time
    started = time.monotonic()
    f = await _pull_with_a_stalled_front(tmp_path, 8 << 20, seed=12)
    assert f.b.stalls == 2  # asked for again, once
    assert time.monotonic() - started < 20, "the held ranges went on only at their deadline"
    assert any(offset >= 1 << 20 for offset in asked)


@pytest.mark.parametrize("fake", [Behaviour(fail_first=100)], indirect=True)
async def test_persistent_failure_is_bounded(fake, tmp_path):
    from puller.registry.client import RetryableStatus

    with pytest.raises(RetryableStatus):
        await _pull(fake, tmp_path, attempts=2)
    assert len(fake.b.requests) < 40


@pytest.mark.parametrize("fake", [Behaviour(corrupt=True)], indirect=True)
async def test_corrupt_cdn_fails_with_both_digests(fake, tmp_path):
    with pytest.raises(DigestMismatch) as info:
        await _pull(fake, tmp_path)
    assert info.value.expected in fake.blobs and info.value.actual not in fake.blobs
    store_blobs = list((tmp_path / "store" / "blobs" / "sha256").glob("*"))
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in store_blobs)


async def test_same_digest_twice_is_fetched_once(fake, tmp_path):
    ref = Reference.parse(f"{fake.host}/r:t")
    digest = next(d for d in fake.blobs if d != fake.config)
    desc = Descriptor(
        "application/octet-stream", __import__("puller.digest").digest.Digest.parse(digest), len(fake.blobs[digest])
    )
    creds = CredentialStore({fake.host: AUTH}, config_path=tmp_path / "none.json")
    async with RegistryClient(ClientSettings(), creds) as client, OCILayoutStore(tmp_path / "s") as store:
        fetcher = BlobFetcher(client, ConnectionBudget(4, 4), FetchSettings(chunk_size=128 * 1024))
        p1, p2 = BlobProgress(digest, desc.size), BlobProgress(digest, desc.size)
        await asyncio.gather(fetcher.fetch(ref, desc, store, p1), fetcher.fetch(ref, desc, store, p2))
    assert p1.fetched + p2.fetched == desc.size
    served = sorted(_asked(fake))
    assert [s for s, _ in served] == [0, *(e + 1 for _, e in served[:-1])]  # each byte asked for once, in order
    assert served[-1][1] == desc.size - 1


async def test_blobs_take_connections_in_manifest_order(tmp_path):
    """Connections go to the lower layers first, so the bottom layer (here the biggest) lands first and a store
    that unpacks can start on it while the others download; with first-come connections it would land last."""
    rnd = random.Random(11)
    layers = [rnd.randbytes(n) for n in (2_000_000, 300_000, 300_000, 300_000)]
    blobs = {"sha256:" + hashlib.sha256(d).hexdigest(): d for d in layers}
    config = b'{"architecture": "amd64", "os": "linux"}'
    blobs["sha256:" + hashlib.sha256(config).hexdigest()] = config
    fake = Fake(blobs, Behaviour(delay_s=0.1))  # each range takes a while: every blob is queued for one
    fake.config = list(blobs)[-1]
    await fake.start()
    try:
        ref = Reference.parse(f"{fake.host}/r:t")
        creds = CredentialStore({fake.host: AUTH}, config_path=tmp_path / "none.json")
        async with RegistryClient(ClientSettings(), creds) as client, OCILayoutStore(tmp_path / "store") as store:
            fetcher = BlobFetcher(client, ConnectionBudget(4, 4), FetchSettings(chunk_size=128 * 1024))
            await pull_image(ref, client, fetcher, store)
    finally:
        await fake.stop()
    _assert_complete(fake, store)
    served = [r["digest"] for r in fake.b.requests]
    finished = sorted(list(blobs)[:4], key=lambda d: max(i for i, x in enumerate(served) if x == d))
    # The bottom layer is first, or second when a small layer ran on while its first range was still out.
    assert finished.index(next(iter(blobs))) <= 1, f"the bottom layer finished late: {served}"


async def test_manifest_by_digest_must_match(fake, tmp_path):
    from puller.errors import DigestMismatch as Mismatch

    wanted = "sha256:" + "0" * 64
    with pytest.raises(Mismatch) as info:
        await _pull(fake, tmp_path, ref_text=f"r@{wanted}")
    assert info.value.expected == wanted and info.value.actual != wanted
    assert not (tmp_path / "store" / "blobs" / "sha256" / ("0" * 64)).exists()
