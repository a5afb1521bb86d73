"""Parsers and small pieces: references, digests, manifests, challenges, range bookkeeping, settings."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import dataclasses
import itertools
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from puller import config
from puller.digest import Digest
from puller.engine.budget import ConnectionBudget
from puller.engine.plan import Chunk, plan_chunks, split_for_tail, take_stalled
from puller.errors import (
    ConfigError,
    InvalidDigest,
    InvalidReference,
    KubernetesError,
    ManifestError,
    PlatformNotFound,
    RegistryError,
)
from puller.priority import PrioritySemaphore
from puller.ranges import RangeSet
from puller.reference import Reference
from puller.registry import manifest as mf
from puller.registry.auth import Credentials, CredentialStore, parse_www_authenticate
from puller.registry.client import RetryableStatus, parse_retry_after, retried, same_origin
from puller.registry.hosts import HostSettings

H = "a" * 64


@pytest.mark.parametrize(
    ("text", "expected", "api_host"),
    [
        ("busybox", "docker.io/library/busybox:latest", "registry-1.docker.io"),
        ("library/busybox:1.36", "docker.io/library/busybox:1.36", "registry-1.docker.io"),
        ("docker.io/busybox", "docker.io/library/busybox:latest", "registry-1.docker.io"),
        ("index.docker.io/user/app", "docker.io/user/app:latest", "registry-1.docker.io"),
        ("user/app:v1", "docker.io/user/app:v1", "registry-1.docker.io"),
        ("localhost/app", "localhost/app:latest", "localhost"),
        ("localhost:5000/a/b/c:t", "localhost:5000/a/b/c:t", "localhost:5000"),
        ("ghcr.io/org/app:1.2.3", "ghcr.io/org/app:1.2.3", "ghcr.io"),
        (f"quay.io/org/app@sha256:{H}", f"quay.io/org/app@sha256:{H}", "quay.io"),
        (f"reg:5000/app:tag@sha256:{H}", f"reg:5000/app:tag@sha256:{H}", "reg:5000"),
        ("[::1]:5000/app", "[::1]:5000/app:latest", "[::1]:5000"),
        ("my-reg.example.com/a_b/c__d/e-f.g:T_1", "my-reg.example.com/a_b/c__d/e-f.g:T_1", "my-reg.example.com"),
    ],
)
def test_reference_normalisation(text: str, expected: str, api_host: str):
    ref = Reference.parse(text)
    assert str(ref) == expected
    assert ref.api_host == api_host


def test_reference_digest_wins_for_fetching():
    ref = Reference.parse(f"app:v1@sha256:{H}")
    assert ref.object == f"sha256:{H}" and ref.tag == "v1"
    assert Reference.parse("app:v1").object == "v1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Busybox",
        "docker.io/Library/x",
        "app:",
        "app:-bad",
        "a" * 300,
        "host:99999/app",
        "app@sha256:short",
        "app@md5:" + "a" * 32,
        "app:" + "t" * 129,
        " app",
        "app//x",
        "app/",
        "-app",
        "host:port/app",
    ],
)
def test_reference_rejects(text: str):
    with pytest.raises(InvalidReference):
        Reference.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "A" * 64,
        "sha256:../../etc/passwd",
        "sha256:" + "a" * 63,
        "sha1:" + "a" * 40,
        "sha256",
        f"sha256:{H}/",
        "sha512:" + "a" * 64,
    ],
)
def test_digest_rejects(text: str):
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_digest_roundtrip():
    d = Digest.of(b"hello")
    assert Digest.parse(str(d)) == d and d.algorithm == "sha256"
    assert Digest.parse("sha512:" + "b" * 128).algorithm == "sha512"


def _desc(digest: str = f"sha256:{H}", size: int = 10, **extra) -> dict:
    return {"mediaType": mf.OCI_MANIFEST, "digest": digest, "size": size, **extra}


def test_manifest_parse_and_limits():
    config = _desc(digest="sha256:" + "c" * 64)  # one digest with two sizes is a manifest of its own (refused)
    m = {"schemaVersion": 2, "mediaType": mf.OCI_MANIFEST, "config": config, "layers": [_desc(size=5)]}
    parsed = mf.parse(json.dumps(m).encode(), None)
    assert isinstance(parsed, mf.Manifest) and parsed.layers[0].size == 5
    with pytest.raises(ManifestError, match="over the"):
        mf.parse(b" " * (mf.MAX_MANIFEST_BYTES + 1), None)
    with pytest.raises(ManifestError, match="not valid JSON"):
        mf.parse(b"{", None)
    with pytest.raises(ManifestError, match="media type"):
        mf.parse(json.dumps({**m, "mediaType": "text/html"}).encode(), None)
    with pytest.raises(ManifestError, match="invalid size"):
        mf.parse(json.dumps({**m, "layers": [_desc(size=-1)]}).encode(), None)
    with pytest.raises(ManifestError, match="sha256"):
        mf.parse(json.dumps({**m, "layers": [_desc(digest="sha256:../../x")]}).encode(), None)
    with pytest.raises(ManifestError, match="over the limit"):
        mf.parse(json.dumps({**m, "layers": [_desc()] * (mf.MAX_DESCRIPTORS + 1)}).encode(), None)


def test_platform_selection():
    idx = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_INDEX,
        "manifests": [
            _desc(digest="sha256:" + "1" * 64, platform={"os": "linux", "architecture": "amd64"}),
            _desc(digest="sha256:" + "2" * 64, platform={"os": "linux", "architecture": "arm", "variant": "v6"}),
            _desc(digest="sha256:" + "3" * 64, platform={"os": "linux", "architecture": "arm", "variant": "v7"}),
            _desc(digest="sha256:" + "4" * 64, platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
        ],
    }
    index = mf.parse(json.dumps(idx).encode(), None)
    assert isinstance(index, mf.Index)
    assert mf.select_platform(index, mf.Platform.parse("linux/amd64")).digest.hex == "1" * 64
    assert mf.select_platform(index, mf.Platform.parse("linux/arm/v7")).digest.hex == "3" * 64
    assert mf.select_platform(index, mf.Platform.parse("linux/aarch64")).digest.hex == "4" * 64
    with pytest.raises(PlatformNotFound, match="linux/arm/v6"):
        mf.select_platform(index, mf.Platform.parse("windows/amd64"))


def test_nested_index_is_a_clear_error():
    idx = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_INDEX,
        "manifests": [
            {
                "mediaType": mf.OCI_INDEX,
                "digest": f"sha256:{H}",
                "size": 10,
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    index = mf.parse(json.dumps(idx).encode(), None)
    with pytest.raises(ManifestError, match="nested indexes are not supported"):
        mf.select_platform(index, mf.Platform.parse("linux/amd64"))


def test_www_authenticate():
    c = parse_www_authenticate('Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"')
    assert c and c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example/token", "service": "reg", "scope": "repository:a/b:pull"}
    assert parse_www_authenticate('Basic realm="x"').scheme == "basic"
    assert parse_www_authenticate("Negotiate abc") is None
    c = parse_www_authenticate('Bearer realm="a,b", error="invalid_token"')
    assert c.params["realm"] == "a,b" and c.params["error"] == "invalid_token"


def test_credentials_from_docker_config(tmp_path):
    import base64

    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
                    "reg.example:5000": {"username": "u", "password": "p"},
                }
            }
        )
    )
    store = CredentialStore(config_path=cfg)
    assert store.lookup("docker.io") == Credentials("hub", "pw")
    assert store.lookup("reg.example:5000") == Credentials("u", "p")
    assert store.lookup("other.example") is None
    assert "pw" not in repr(store.lookup("docker.io"))
    cfg.write_text(json.dumps({"credsStore": "does-not-exist-puller"}))
    with pytest.raises(ConfigError, match="not on PATH"):
        CredentialStore(config_path=cfg).lookup("x.example")


def test_rangeset_and_plan():
    rs = RangeSet([(10, 20), (0, 5)])
    rs.add(5, 10)
    assert rs.as_list() == [[0, 20]] and rs.prefix_end() == 20
    rs.add(30, 40)
    assert list(rs.missing(50)) == [(20, 30), (40, 50)] and rs.total() == 30
    chunks = plan_chunks(rs.missing(50), 4)
    assert [(c.start, c.end) for c in chunks] == [(20, 24), (24, 28), (28, 30), (40, 44), (44, 48), (48, 50)]
    assert RangeSet([(3, 9)]).prefix_end() == 0


def test_chunks_shrink_toward_the_end_of_a_blob():
    """With ``spread``, each chunk is at most 1/spread of what is left from its start, down to ``least``: the
    ranges in flight at the end span a few MiB, not connections x chunk size (the hash reads that back last)."""
    mib = 1 << 20
    chunks = plan_chunks([(0, 1024 * mib)], 8 * mib, spread=32, least=mib)
    sizes = [c.end - c.start for c in chunks]
    assert chunks[0].start == 0 and chunks[-1].end == 1024 * mib
    assert all(a.end == b.start for a, b in itertools.pairwise(chunks))
    assert sizes[0] == 8 * mib and sizes[-31:-1] == [mib] * 30 and sizes[-1] <= mib  # the last MiBs one by one
    assert sizes == sorted(sizes, reverse=True)
    left = 1024 * mib
    for c in chunks:  # never more than a 32nd of what is left, rounded up to the split alignment
        assert c.end - c.start <= max(mib, -(-left // 32) + 64 * 1024)
        left -= c.end - c.start
    # Over several missing ranges (a resumed pull) the taper counts what is left in all of them.
    resumed = plan_chunks([(0, 64 * mib), (128 * mib, 192 * mib)], 8 * mib, spread=32, least=mib)
    assert resumed[0].end - resumed[0].start == 4 * mib
    assert all(c.end <= 64 * mib or c.start >= 128 * mib for c in resumed)
    assert sum(c.end - c.start for c in resumed) == 128 * mib and resumed[-1].end == 192 * mib
    assert len(plan_chunks([(0, 64 * mib)], 8 * mib)) == 8  # no spread: all the same size


def test_tail_split_takes_second_half_of_slowest():
    mib = 1 << 20
    slow = Chunk(0, 16 * mib, pos=2 * mib, streaming=True)
    fast = Chunk(16 * mib, 24 * mib, pos=23 * mib, streaming=True)
    idle = Chunk(24 * mib, 40 * mib)  # not streaming yet: never split
    told: list[int] = []
    slow.request_cut = told.append  # the request in flight is told where it now ends (see lean.Cut)
    tail = split_for_tail([slow, fast, idle], min_split=mib)
    assert tail is not None and tail.end == 16 * mib and slow.end == tail.start == 9 * mib
    assert told == [9 * mib]
    assert split_for_tail([fast], min_split=mib) is None


def test_a_stalled_front_range_is_taken_over_whole():
    mib = 1 << 20
    front = Chunk(8 * mib, 16 * mib, pos=9 * mib, streaming=True, mark=100 * mib, heard_at=10.0)
    others = [Chunk(s * mib, (s + 8) * mib, pos=(s + 4) * mib, streaming=True, mark=130 * mib) for s in (16, 24, 32)]
    waiting = Chunk(0, mib)  # lower, but not streaming (waiting for a retry): not the stalled one

    def take(chunks: list[Chunk], received: int, patience: int = 10 * mib, now: float = 11.0):
        return take_stalled(chunks, received=received, patience=patience, silence=0.5, now=now)

    # the other three received 10 MiB each (in all 30) since the front's last bytes: patience 10 MiB is not exceeded
    assert take([front, *others, waiting], received=130 * mib) is None
    front.writing = True  # its bytes are being handed to the store: not stalled
    assert take([front, *others], received=131 * mib) is None
    front.writing = False
    # enough bytes went by, but only 0.4 s: a request just sent while short chunks completed in a burst
    assert take([front, *others, waiting], received=131 * mib, now=10.4) is None
    taken = take([front, *others, waiting], received=131 * mib)
    assert taken is not None and taken[0] is front
    assert (taken[1].start, taken[1].end) == (9 * mib, 16 * mib) and front.end == front.pos == 9 * mib
    # taken over once: the new front is the next streaming range, which is not stalled
    assert front.remaining == 0 and take([front, *others], received=131 * mib) is None
    # alone, a range is judged by what the blob received since its last bytes: nothing, so not stalled ...
    assert take([others[0]], received=130 * mib, patience=mib) is None
    # ... unless the ranges before it finished meanwhile (the front is then the last one streaming)
    assert take([others[0]], received=135 * mib, patience=mib) is not None


def test_stalled_ranges_are_taken_over_lowest_first_not_only_the_front():
    mib = 1 << 20
    fine = Chunk(0, 8 * mib, pos=4 * mib, streaming=True, mark=130 * mib, heard_at=10.9)  # the front streams
    starved = [Chunk(s * mib, (s + 8) * mib, pos=s * mib, streaming=True, mark=100 * mib) for s in (16, 8)]
    others = [Chunk(s * mib, (s + 8) * mib, pos=(s + 4) * mib, streaming=True, mark=130 * mib) for s in (24, 32)]
    chunks = [fine, *starved, *others]

    def take():
        return take_stalled(chunks, received=131 * mib, patience=mib, silence=0.5, now=11.0)

    first, second = take(), take()  # two starved ranges side by side: both at once, the lower one first
    assert first is not None and first[0] is starved[1] and first[1].start == 8 * mib
    assert second is not None and second[0] is starved[0] and second[1].start == 16 * mib
    assert take() is None  # the front and the others stream


def test_a_stalled_range_is_taken_over_from_where_its_request_has_received_to():
    mib = 1 << 20
    stalled = Chunk(0, 2 * mib, pos=mib, streaming=True, mark=0)
    told: list[int] = []
    stalled.request_cut, stalled.request_received = told.append, lambda: mib + 300_000  # part of a block, held
    other = Chunk(2 * mib, 8 * mib, pos=6 * mib, streaming=True, mark=20 * mib)
    taken = take_stalled([stalled, other], received=20 * mib, patience=mib, silence=0.5, now=stalled.heard_at + 1)
    assert taken is not None and taken[1].start == mib + 300_000 and taken[1].end == 2 * mib
    assert stalled.end == mib + 300_000 and told == [mib + 300_000]  # it hands its bytes over, then ends
    other.mark = 30 * mib  # streaming on
    # taken over once: while it hands its last bytes over, it is not taken over again
    later = stalled.heard_at + 2
    assert take_stalled([stalled, other], received=30 * mib, patience=mib, silence=0.5, now=later) is None


async def test_priority_semaphore_serves_the_most_urgent_first():
    sem = PrioritySemaphore(1)
    await sem.acquire(5)  # taken at once: nobody waits
    served: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await sem.acquire(priority)
        served.append(name)

    tasks = [asyncio.ensure_future(wait(n, p)) for n, p in [("late", 9), ("a", 2), ("b", 2), ("urgent", 1)]]
    cancelled = asyncio.ensure_future(wait("cancelled", 0))
    await asyncio.sleep(0)
    assert sem.outranks(2) and not sem.outranks(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    for _ in tasks:
        sem.release()
        await asyncio.sleep(0)
    assert served == ["urgent", "a", "b", "late"]  # by priority, first come first served among equals
    sem.release()
    await sem.acquire(3)  # the slot given back is free again, not lost to the cancelled waiter


async def test_priority_semaphore_resized_takes_back_slots_as_they_are_released():
    sem = PrioritySemaphore(2)
    await sem.acquire()
    await sem.acquire()
    sem.resize(1)  # both still held
    waiter = asyncio.ensure_future(sem.acquire())
    sem.release()  # taken back: 1 is held, the value
    await asyncio.sleep(0)
    assert not waiter.done()
    sem.release()
    await asyncio.wait_for(waiter, 1)  # the one slot, passed on
    sem.resize(3)  # two more: one acquired at once, the next too, the fourth waits
    await asyncio.wait_for(sem.acquire(), 1)
    await asyncio.wait_for(sem.acquire(), 1)
    fourth = asyncio.ensure_future(sem.acquire())
    await asyncio.sleep(0)
    assert not fourth.done() and sem.value == 3
    fourth.cancel()


async def test_connection_is_kept_across_requests_until_outranked():
    budget = ConnectionBudget(total=1, per_host=1)
    conn = budget.connection(priority=3)
    await conn.acquire("r.example")
    await conn.acquire("r.example")  # the same slot, kept
    assert budget.in_use == 1
    later = asyncio.ensure_future(budget.connection(priority=7).acquire("r.example"))
    await asyncio.sleep(0)
    conn.yield_if_outranked()  # only a later blob waits: keep it
    assert conn.host == "r.example" and not later.done()
    urgent_conn = budget.connection(priority=1)
    urgent = asyncio.ensure_future(urgent_conn.acquire("r.example"))
    await asyncio.sleep(0)
    conn.yield_if_outranked()  # a more urgent blob waits: hand it over
    await asyncio.sleep(0)
    assert conn.host is None and urgent.done() and not later.done()
    urgent_conn.release()
    await asyncio.wait_for(later, 1)
    assert budget.in_use == 1


def test_settings_file_and_sizes(tmp_path):
    f = tmp_path / "puller.yaml"
    f.write_text("connections: 8\nchunk_size: 4MiB\nplain_http: [reg:5000]\n")
    s = config.load(str(f))
    assert s.connections == 8 and s.chunk_size == 4 << 20 and s.plain_http == ["reg:5000"]
    f.write_text("conections: 8\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        config.load(str(f))
    with pytest.raises(ConfigError):
        config.apply(config.Settings(), {"chunk_size": "1k"})


def test_the_daemon_gets_its_own_frozen_settings():
    s = config.apply(config.Settings(), {"source_namespaces": ["a"], "pin": True, "watch_interval": 1})
    d = s.daemon("node-1")
    assert d.node_name == "node-1" and d.pin is True and d.watch_interval == 1.0 and d.source_namespaces == ("a",)
    with pytest.raises(AttributeError):  # frozen
        d.pin = False  # type: ignore[misc]
    daemon_fields = set(config.DaemonSettings._fields) - {"node_name"}
    assert daemon_fields <= {f.name for f in dataclasses.fields(config.Settings)}  # each from one setting


def test_example_config_is_valid():
    s = config.load(str(Path(__file__).parent.parent / "config" / "puller.yaml"))
    assert s == config.Settings()  # the example documents the defaults
    documented = yaml.safe_load((Path(__file__).parent.parent / "config" / "puller.yaml").read_text())
    assert set(documented) == {f.name for f in dataclasses.fields(config.Settings)}  # ... every one of them


def test_settings_null_and_types(tmp_path):
    f = tmp_path / "puller.yaml"
    f.write_text("startup_taint: null\nlisten: 127.0.0.1:9000\n")
    s = config.load(str(f))
    assert s.startup_taint is None and s.listen_address == ("127.0.0.1", 9000)
    for bad, message in [
        ("connections: null", "cannot be null"),
        ("listen: ':9000'", "HOST:PORT"),
        ("listen: 9000", "must be a string"),
        ("images_file: [a]", "must be a string"),
        ("resolve_interval: 0", "positive"),
    ]:
        f.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=message):
            config.load(str(f))
    assert config.apply(config.Settings(), {"startup_taint": None}).startup_taint == config.STARTUP_TAINT


def test_settings_from_the_environment_are_as_strict_as_the_file(tmp_path):
    f = tmp_path / "puller.yaml"
    f.write_text("connections: 8\nlog_format: text\n")
    env = {
        "PULLER_CONFIG": str(f),
        "PULLER_CONNECTIONS": "16",  # over the file
        "PULLER_PLAIN_HTTP": "reg:5000",
        "PULLER_STARTUP_TAINT": "null",
        "PULLER_READ_TIMEOUT": "2.5",
        "PULLER_TEST_BIN": "/opt/x",  # the tests' own variable, not a setting
        "OTHER": "x",
    }
    s = config.load(environ=env)
    assert s.connections == 16 and s.plain_http == ["reg:5000"] and s.startup_taint is None and s.read_timeout == 2.5
    assert s.log_format == "text"
    for key, value, message in [
        ("PULLER_CONNECTIONS", "true", r"environment \(PULLER_CONNECTIONS\): connections must be a whole number"),
        ("PULLER_CONNECTIONS", "0", "at least 1"),
        ("PULLER_CONECTIONS", "8", r"environment \(PULLER_CONECTIONS\): unknown setting 'conections'"),
        ("PULLER_LISTEN", "[", "not a valid YAML value"),
        ("PULLER_MIRRORS", "{docker.io: [{host: 'http://m', colour: red}]}", r"unknown key\(s\) colour"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config.load(environ={key: value})


def test_hosts_and_helpers():
    hs = HostSettings(plain_http=frozenset({"reg:5000"}))
    assert hs.scheme("reg:5000") == "http" and hs.scheme("ghcr.io") == "https"
    assert hs.scheme("127.0.0.1:5000") == "https" and hs.may_fall_back_to_http("127.0.0.1:5000")
    assert hs.may_fall_back_to_http("[::1]:5000") and hs.may_fall_back_to_http("localhost:5000")
    assert not hs.may_fall_back_to_http("ghcr.io") and not hs.may_fall_back_to_http("reg:5000")
    assert hs.ssl_for("ghcr.io") is True
    assert same_origin("http://a:1/x", "http://a:1/y") and not same_origin("http://a:1/x", "http://a:2/x")
    assert parse_retry_after("3") == 3.0 and parse_retry_after("soon") is None


def test_image_list_entries_aim_at_nodes_and_name_pull_secrets():
    from puller.daemon.imagelist import KubeRef, merge, parse_list

    text = """images:
      - {reference: "ml:1", nodeSelector: {accelerator: gpu}, imagePullSecrets: [{namespace: apps, name: a}]}
      - {reference: "ml:1", imagePullSecrets: [{namespace: apps, name: b}, {namespace: apps, name: a}], pin: true}
      - {reference: "web:1", nodeSelector: {zone: a, accelerator: gpu}}
    """
    specs = parse_list(text, "list")
    assert specs[0].node_selector == (("accelerator", "gpu"),) and specs[2].node_selector[0] == ("accelerator", "gpu")
    gpu, cpu = {"accelerator": "gpu", "zone": "b"}, {"zone": "a"}
    assert [s.wanted_on(gpu) for s in specs] == [True, True, False]
    assert [s.wanted_on(cpu) for s in specs] == [False, True, False]
    (ml,) = merge([s for s in specs if s.wanted_on(gpu)][:2])
    assert ml.pull_secrets == (KubeRef("Secret", "apps", "a"), KubeRef("Secret", "apps", "b")) and ml.pin is True
    assert str(ml.pull_secrets[0]) == "secret apps/a"
    for bad, message in [
        ("images: [{reference: a, nodeSelector: [gpu]}]", "nodeSelector"),
        ("images: [{reference: a, nodeSelector: {gpu: 1}}]", "string values"),
        ("images: [{reference: a, imagePullSecrets: [regcred]}]", "namespace: ..., name: ..."),
        ("images: [{reference: a, imagePullSecrets: [{namespace: Apps, name: x}]}]", "not a namespace"),
        ("images: [{reference: a, imagePullSecrets: {namespace: a, name: x}}]", "must be a list"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_list(bad, "list")
    from puller.daemon.api import parse_pull_request

    with pytest.raises(ValueError, match="unknown field"):  # the API takes no secrets or node selectors
        parse_pull_request({"images": [{"reference": "a", "imagePullSecrets": []}]})


def test_a_pull_secret_gives_credentials_by_host_and_names_itself_never_its_contents():
    from puller.daemon.imagelist import KubeRef
    from puller.daemon.node import _secret_credentials
    from puller.registry.auth import pull_credentials

    ref = KubeRef("Secret", "apps", "regcred")

    def data(doc) -> dict:
        return {".dockerconfigjson": base64.b64encode(json.dumps(doc).encode()).decode()}

    auth = base64.b64encode(b"alice:s3cret").decode()
    doc = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": auth},
            "reg.example:5000": {"username": "bob", "password": "pw"},
        }
    }
    found = _secret_credentials(ref, "kubernetes.io/dockerconfigjson", data(doc))
    assert found["docker.io"].username == "alice" and found["reg.example:5000"].password == "pw"
    legacy = {".dockercfg": base64.b64encode(json.dumps({"reg.example:5000": {"auth": auth}}).encode()).decode()}
    assert _secret_credentials(ref, "kubernetes.io/dockercfg", legacy)["reg.example:5000"].password == "s3cret"
    for kind, given, message in [
        ("Opaque", data(doc), "secret apps/regcred is of type Opaque"),
        ("kubernetes.io/dockerconfigjson", {".dockerconfigjson": "not base64!"}, "not base64-encoded JSON"),
        ("kubernetes.io/dockerconfigjson", data({"auths": {"r": {"auth": "//46"}}}), "invalid 'auth'"),
    ]:
        with pytest.raises(KubernetesError, match=re.escape(message)) as e:
            _secret_credentials(ref, kind, given)
        assert "s3cret" not in str(e.value) and "regcred" in str(e.value)
    store = CredentialStore({"reg.example:5000": Credentials("node", "x")})
    assert store.lookup("reg.example:5000").username == "node"
    pull = contextvars.copy_context()  # as a pull's task has its own
    pull.run(pull_credentials.set, found)
    assert pull.run(store.lookup, "reg.example:5000").username == "bob"
    assert store.lookup("reg.example:5000").username == "node"  # other pulls do not see them
    assert found["docker.io"].fingerprint != found["reg.example:5000"].fingerprint


def test_image_list_watcher_follows_swaps_and_keeps_the_last_good_list(tmp_path):
    from puller.daemon.imagelist import ImageListWatcher, merge

    from .daemon_rig import ConfigMapDir

    cm = ConfigMapDir(tmp_path / "cm")
    watcher = ImageListWatcher(cm.path)
    assert watcher.poll() is None and "cannot read image list" in watcher.error  # not there yet
    cm.set_images(["busybox", {"reference": "ghcr.io/a/b:1", "platform": "linux/arm64", "pin": True}, "busybox"])
    specs = merge(watcher.poll())  # listed twice: kept once
    assert [s.key for s in specs] == ["docker.io/library/busybox:latest", "ghcr.io/a/b:1|linux/arm64"]
    assert specs[1].pin is True and watcher.poll() is None  # unchanged: nothing new
    for bad, message in [
        ("images: [{reference: a, colour: red}]", "unknown field(s) colour"),
        ("images: ['docker.io/A']", "lowercase"),
        ("- a\n", "one key, 'images'"),
        ("images: {a: 1}", "must be a list"),
    ]:
        cm.write(bad)
        assert watcher.poll() is None and message in watcher.error, (bad, watcher.error)
    assert watcher.refused == 5 and watcher.loaded == 1
    cm.set_images([])
    assert watcher.poll() == [] and watcher.error is None


def test_readme_guarantees_name_tests_that_exist():
    """Every `test_file.py::test_name` the docs cite as evidence is a test in that file."""
    import fnmatch
    import re

    root = Path(__file__).parent.parent
    docs = "".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    cited = re.findall(r"`(test_\w+\.py)::(test_[\w*]+)", docs)
    assert len(cited) > 20
    for file, name in cited:
        defined = re.findall(r"^(?:async )?def (test_\w+)", (root / "tests" / file).read_text(), re.M)
        assert fnmatch.filter(defined, name), f"README cites {file}::{name}, which does not exist"


def test_hand_built_containerd_write_message_is_what_protobuf_builds():
    from puller.stores.containerd.content import write_message
    from puller.stores.containerd_api import content_pb2

    for offset in (0, 1, 127, 128, 300, 5 << 30):
        payload = write_message(b"puller-sha256:abc", offset, [b"x" * 200, b"", b"yz"]).payload()
        assert payload[:5] == b"\x00" + (len(payload) - 5).to_bytes(4, "big")  # gRPC's prefix: uncompressed, length
        raw = payload[5:]
        expected = content_pb2.WriteContentRequest(
            action=content_pb2.WRITE, ref="puller-sha256:abc", offset=offset, data=b"x" * 200 + b"yz"
        )
        assert content_pb2.WriteContentRequest.FromString(raw) == expected
        if offset:  # protobuf leaves a zero offset out; containerd reads both the same
            assert raw == expected.SerializeToString()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("connections", True),
        ("connections", 3.9),
        ("connections", "2"),
        ("parallel_pulls", "4"),
        ("watch_interval", "2"),
        ("watch_interval", float("nan")),
        ("chunk_size", True),
        ("chunk_size", [1]),
        ("min_split", 10),
    ],
)
def test_config_values_of_the_wrong_type_are_refused_by_name(key, value):
    from puller import config

    with pytest.raises(ConfigError, match=key):
        config.apply(config.Settings(), {key: value}, where="puller.yaml")


def test_python_dash_m_puller_runs():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "puller", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("puller "), r.stderr


async def test_retried_tries_once_then_hands_failures_to_the_retry_policy():
    """The first try runs alone; a retryable failure is tenacity's first outcome (its Retry-After waited for),
    a non-retryable one is raised at once, and the tries are bounded."""
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    def script(*outcomes: BaseException | str):
        todo = list(outcomes)

        async def call() -> str:
            calls.append(loop.time())
            outcome = todo.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return call

    assert await retried(3, script("ok")) == "ok" and len(calls) == 1
    calls.clear()
    assert await retried(3, script(RetryableStatus("busy", 503, retry_after=0.2), "ok")) == "ok"
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.2  # the first failure's Retry-After was honoured
    calls.clear()
    with pytest.raises(RegistryError, match="denied"):
        await retried(3, script(RegistryError("denied"), "ok"))
    assert len(calls) == 1
    calls.clear()
    busy = [RetryableStatus(f"busy {i}", 503, retry_after=0) for i in range(3)]
    with pytest.raises(RetryableStatus, match="busy 2"):
        await retried(3, script(*busy, "ok"))
    assert len(calls) == 3


async def test_thread_work_is_awaited_to_its_end_even_when_the_caller_is_cancelled():
    """A cancelled caller of in_thread gets its CancelledError only once the thread is done (so what the
    thread works on, a file descriptor, may be closed after), and what the work acquired is undone."""
    import threading

    from puller.stores.threads import SerialLane, in_thread, lane_pool

    started, release = threading.Event(), threading.Event()
    events: list[str] = []

    def work() -> int:
        started.set()
        release.wait(5)
        events.append("thread done")
        return 7

    task = asyncio.ensure_future(in_thread(work, undo=lambda result: events.append(f"undo {result}")))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == ["thread done", "undo 7"]

    lane = SerialLane(lane_pool())  # one lane runs in order, one at a time
    order: list[int] = []
    results = await asyncio.gather(*(lane.run(order.append, i) for i in range(50)))
    assert order == list(range(50)) and results == [None] * 50


def test_writeback_of_written_ranges_is_started_and_a_failure_is_only_advisory(tmp_path: Path):
    from puller.stores.staged import start_writeback

    fd = os.open(tmp_path / "blob", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x" * (1 << 20), 4096)
        assert start_writeback(fd, 4096, 1 << 20)  # the kernel took it (sync_file_range's signature is right)
    finally:
        os.close(fd)
    assert not start_writeback(fd, 0, 1)  # a closed descriptor: no exception, only False
