"""Mirrors as containerd configures them (hosts.toml), with real registries: a pull-through cache, a mirror
without the image, a pull-only mirror, and a mirror that fails in the middle of a blob."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from puller.errors import ConfigError
from puller.registry.hosts import (
    ALL_CAPABILITIES,
    HostSettings,
    find_hosts_dir,
    host_directory_names,
    parse_hosts_toml,
)

from .conftest import assert_store_holds, pushed, run_puller
from .rig import FaultProxy, Registry, skopeo_push, wait_for

# ---- parsing, against the forms containerd documents ---------------------------------------------------------


def test_hosts_toml_forms(tmp_path):
    text = """
server = "https://registry-1.docker.io"
capabilities = ["pull", "resolve"]
ca = "/etc/certs/upstream.pem"

[host."https://mirror-a.example.com"]
  capabilities = ["pull"]
  skip_verify = true
  ca = ["certs/a.pem", "/abs/b.pem"]
  client = [["client.cert", "client.key"], "both.pem"]
  override_path = true
  [host."https://mirror-a.example.com".header]
    x-custom-1 = "a"
    x-custom-2 = ["b", "c"]

[host."http://mirror-b:5000/registry"]
  capabilities = ["pull", "resolve"]
  dial_timeout = "1m30.5s"

[host."mirror-c.example.com"]
  dial_timeout = "200ms"
"""
    a, b, c, server = parse_hosts_toml(text, tmp_path)
    assert (a.scheme, a.host, a.path) == ("https", "mirror-a.example.com", "")  # override_path: no /v2 added
    assert a.capabilities == {"pull"} and a.skip_verify is True
    assert a.ca == (str(tmp_path / "certs/a.pem"), "/abs/b.pem")
    assert a.client == ((str(tmp_path / "client.cert"), str(tmp_path / "client.key")), (str(tmp_path / "both.pem"), ""))
    assert a.header == (("x-custom-1", "a"), ("x-custom-2", "b"), ("x-custom-2", "c"))
    assert (b.scheme, b.host, b.path, b.capabilities) == ("http", "mirror-b:5000", "/registry/v2", {"pull", "resolve"})
    assert (c.scheme, c.host, c.path, c.capabilities) == ("https", "mirror-c.example.com", "/v2", ALL_CAPABILITIES)
    assert (a.dial_timeout, b.dial_timeout, c.dial_timeout) == (None, 90.5, 0.2)  # Go durations, as containerd reads
    assert (b.origin(), c.origin()) == ("mirror-b:5000", "mirror-c.example.com:443")
    assert (server.host, server.capabilities, server.ca) == (
        "registry-1.docker.io",
        {"pull", "resolve"},
        ("/etc/certs/upstream.pem",),
    )

    for bad, message in [
        ('[host."https://m"]\ncapabilities = ["fly"]', "unknown capability fly"),
        ('[host."https://m"]\nskip_verify = "yes"', "skip_verify must be true or false"),
        ('server = "http://"', "invalid server URL"),
        ("server = [", "not valid TOML"),
        ('[host."https://m"]\nclient = [["only-one"]]', "invalid client entry"),
        ('[host."https://m"]\ndial_timeout = "200"', "dial_timeout must be a duration"),
        ('[host."https://m"]\ndial_timeout = 5', "dial_timeout must be a duration"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_hosts_toml(bad, tmp_path)
    started = time.monotonic()  # a long bad duration is refused at once: its pattern reads each string one way
    with pytest.raises(ConfigError, match="dial_timeout must be a duration"):
        parse_hosts_toml(f'[host."https://m"]\ndial_timeout = "{"1" * 100_000}x"', tmp_path)
    assert time.monotonic() - started < 5  # the ambiguous pattern took minutes (0.4 s at 5,000 digits, quadratic)


def test_host_directories_as_containerd_looks_them_up(tmp_path):
    assert host_directory_names("reg.example:5000") == ["reg.example_5000_", "reg.example:5000", "_default"]
    assert host_directory_names("docker.io") == ["docker.io", "_default"]
    assert find_hosts_dir(str(tmp_path), "docker.io") is None
    (tmp_path / "_default").mkdir()
    assert find_hosts_dir(str(tmp_path), "docker.io") == tmp_path / "_default"
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_text('[host."https://mirror.gcr.io"]\ncapabilities = ["pull"]\n')
    hub = HostSettings(hosts_dir=str(tmp_path)).endpoints("docker.io")
    assert [(e.host, e.is_mirror) for e in hub] == [("mirror.gcr.io", True), ("registry-1.docker.io", False)]
    assert (
        hub[0].url("https", "library/busybox", "blobs/x")
        == "https://mirror.gcr.io/v2/library/busybox/blobs/x?ns=docker.io"
    )
    assert (
        hub[1].url("https", "library/busybox", "blobs/x") == "https://registry-1.docker.io/v2/library/busybox/blobs/x"
    )
    (tmp_path / "_default" / "hosts.toml").write_text("")  # a directory without mirrors: the registry itself
    assert [e.host for e in HostSettings(hosts_dir=str(tmp_path)).endpoints("quay.io")] == ["quay.io"]
    assert [e.host for e in HostSettings().endpoints("quay.io")] == ["quay.io"]  # no hosts_dir: not read


# ---- real registries --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(workdir: Path, layout):
    with Registry(workdir / "mirror-upstream") as reg:
        skopeo_push(layout["path"], "app", f"{reg.host}/test/app:v1")
        skopeo_push(layout["path"], "big", f"{reg.host}/test/big:v1")
        yield reg


def hosts_dir(root: Path, registry: str, text: str, directory: str | None = None) -> Path:
    d = root / "certs.d" / (directory or registry)
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(text)
    return root / "certs.d"


def pull_json(*args: str) -> dict:
    r = run_puller("pull", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_pull_through_a_pull_through_cache_mirror(upstream, tmp_path):
    app = pushed(upstream, "test/app", "v1")
    with Registry(tmp_path / "cache", proxy_remote=f"http://{upstream.host}") as cache:
        certs = hosts_dir(
            tmp_path,
            upstream.host,
            f'server = "http://{upstream.host}"\n[host."http://{cache.host}"]\n  capabilities = ["pull", "resolve"]\n',
            directory=upstream.host.replace(":", "_") + "_",
        )
        done = pull_json(app.ref, "--store", f"oci:{tmp_path / 'store'}", "--hosts-dir", str(certs))
        assert done["hosts"] == {cache.host: sum(app.blobs.values())}  # every blob byte came from the mirror
        # ... which really fetched and cached them (the proxy commits a blob after its last byte went out)
        wait_for(lambda: all(cache.blob_path(d).exists() for d in app.blobs), 10, "the mirror to cache the blobs")
        assert_store_holds(tmp_path / "store", app)


def test_a_mirror_without_the_image_falls_back_to_upstream(upstream, tmp_path):
    app = pushed(upstream, "test/app", "v1")
    with Registry(tmp_path / "empty") as empty:
        certs = hosts_dir(tmp_path, upstream.host, f'[host."http://{empty.host}"]\n', directory="_default")
        done = pull_json(app.ref, "--store", f"oci:{tmp_path / 'store'}", "--hosts-dir", str(certs))
        assert done["hosts"] == {upstream.host: sum(app.blobs.values())}
        assert_store_holds(tmp_path / "store", app)

        # The same mirror from puller's own config instead of hosts.toml.
        config = tmp_path / "puller.yaml"
        config.write_text(json.dumps({"mirrors": {upstream.host: [{"host": f"http://{empty.host}"}]}}))
        done = pull_json(app.ref, "--store", f"oci:{tmp_path / 'store2'}", "--config", str(config))
        assert done["hosts"] == {upstream.host: sum(app.blobs.values())}


def test_a_mirror_that_does_not_answer_connects_is_left_after_its_dial_timeout(upstream, tmp_path):
    """A mirror whose listen queue is full (its host drops the SYNs: connects hang) with ``dial_timeout = "200ms"``:
    the pull goes upstream within seconds, though puller's own connect_timeout is a minute."""
    app = pushed(upstream, "test/app", "v1")
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(0)
        queued = socket.create_connection(mute.getsockname())  # fills the queue: later connects hang
        host = f"127.0.0.1:{mute.getsockname()[1]}"
        certs = hosts_dir(tmp_path, upstream.host, f'[host."http://{host}"]\n  dial_timeout = "200ms"\n')
        config = tmp_path / "puller.yaml"
        config.write_text(json.dumps({"connect_timeout": 60}))
        started = time.monotonic()
        done = pull_json(
            app.ref, "--store", f"oci:{tmp_path / 'store'}", "--hosts-dir", str(certs), "--config", str(config)
        )
        took = time.monotonic() - started
        queued.close()
    assert done["hosts"] == {upstream.host: sum(app.blobs.values())}
    assert took < 20, took  # a few 0.2 s connects, not 60 s each
    assert_store_holds(tmp_path / "store", app)


def test_tags_resolve_only_through_hosts_that_may_resolve(upstream, tmp_path):
    app = pushed(upstream, "test/app", "v1")
    with FaultProxy(f"http://{upstream.host}") as mirror:
        mirror_host = mirror.url.split("://")[1]
        certs = hosts_dir(tmp_path, upstream.host, f'[host."{mirror.url}"]\n  capabilities = ["pull"]\n')
        done = pull_json(app.ref, "--store", f"oci:{tmp_path / 'store'}", "--hosts-dir", str(certs))
        assert done["hosts"] == {mirror_host: sum(app.blobs.values())}
        assert not [p for p in mirror.paths if "/manifests/v1" in p]  # the tag was resolved upstream only
        assert all(parse_qs(urlsplit(p).query) == {"ns": [upstream.host]} for p in mirror.paths), mirror.paths
        assert_store_holds(tmp_path / "store", app)


def test_a_mirror_failing_mid_blob_hands_the_rest_to_upstream(upstream, tmp_path):
    big = pushed(upstream, "test/big", "v1")
    size = sum(big.blobs.values())
    with FaultProxy(f"http://{upstream.host}") as mirror:
        mirror.set("reset", times=-1)  # every blob response: half the body, then a TCP reset
        certs = hosts_dir(tmp_path, upstream.host, f'[host."{mirror.url}"]\n  capabilities = ["pull"]\n')
        done = pull_json(big.ref, "--store", f"oci:{tmp_path / 'store'}", "--hosts-dir", str(certs))
        from_mirror = done["hosts"].get(mirror.url.split("://")[1], 0)
        assert from_mirror > 0 and done["hosts"][upstream.host] > 0  # one blob, served by both
        assert sum(done["hosts"].values()) == done["fetched"] >= size
        assert_store_holds(tmp_path / "store", big)  # and verified as one


def test_a_mirror_that_stalls_mid_blob_is_left_within_seconds_not_the_read_timeout(upstream, tmp_path):
    """Every blob response of the mirror stops halfway and stays open (a frozen peer): each range to it stalls at
    once, so no other range shows the stall; after MIRROR_STALL_S without a byte the mirror is given up and the
    rest comes from upstream, long before the 30 s read timeout."""
    big = pushed(upstream, "test/big", "v1")
    with FaultProxy(f"http://{upstream.host}") as mirror:
        mirror.set("stall", times=-1)
        certs = hosts_dir(tmp_path, upstream.host, f'[host."{mirror.url}"]\n  capabilities = ["pull"]\n')
        started = time.monotonic()
        done = pull_json(big.ref, "--store", f"oci:{tmp_path / 'store'}", "--hosts-dir", str(certs))
        took = time.monotonic() - started
        assert done["hosts"].get(mirror.url.split("://")[1], 0) > 0 and done["hosts"][upstream.host] > 0
        assert took < 15, took
        assert_store_holds(tmp_path / "store", big)


def test_a_blob_a_mirror_served_wrong_is_fetched_again_from_upstream_only(upstream, tmp_path):
    """The mirror flips a byte of every blob it serves: the digest refuses the bytes, and the second try of each
    blob goes to the registry itself (no mirror is trusted beyond the digest); the image is whole."""
    app = pushed(upstream, "test/app", "v1")
    with FaultProxy(f"http://{upstream.host}") as mirror:
        mirror.set("flip", times=-1)
        certs = hosts_dir(tmp_path, upstream.host, f'[host."{mirror.url}"]\n  capabilities = ["pull"]\n')
        r = run_puller("pull", "--json", app.ref, "--store", f"oci:{tmp_path / 'store'}", "--hosts-dir", str(certs))
        assert r.returncode == 0, r.stderr
        assert "digest mismatch" in r.stderr
        done = json.loads(r.stdout.splitlines()[-1])
        assert done["hosts"][upstream.host] >= sum(app.blobs.values())
        assert_store_holds(tmp_path / "store", app)


def test_a_404_from_the_mirror_that_served_the_manifest_is_asked_again_not_taken_upstream(upstream, tmp_path):
    """A P2P mirror answers a blob 404 when its peer lookup times out although its peers hold the image (they
    served the manifest through it): the blob is asked of it again (up to 4 times, backing off) and every byte
    comes from the mirror."""
    app = pushed(upstream, "test/app", "v1")
    with FaultProxy(f"http://{upstream.host}") as mirror:
        mirror.set("status:404", times=3)  # the first three blob requests
        certs = hosts_dir(tmp_path, upstream.host, f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n')
        done = pull_json(app.ref, "--store", f"oci:{tmp_path / 'store'}", "--hosts-dir", str(certs))
        assert done["hosts"] == {mirror.url.split("://")[1]: sum(app.blobs.values())}
        assert_store_holds(tmp_path / "store", app)


def test_unreadable_mirror_settings_are_clear_errors(upstream, tmp_path):
    app = pushed(upstream, "test/app", "v1")
    certs = hosts_dir(tmp_path, upstream.host, '[host."https://m"]\ncapabilities = ["teleport"]\n')
    r = run_puller("pull", app.ref, "--store", f"oci:{tmp_path / 'store'}", "--hosts-dir", str(certs))
    assert r.returncode == 2 and "unknown capability teleport" in r.stderr
    config = tmp_path / "puller.yaml"
    config.write_text(json.dumps({"mirrors": {upstream.host: [{"capabilities": ["pull"]}]}}))
    r = run_puller("pull", app.ref, "--config", str(config))
    assert r.returncode == 2 and "needs host" in r.stderr
    # puller's own mirrors setting is strict (a shared hosts.toml only warns: containerd may know more keys)
    config.write_text(json.dumps({"mirrors": {upstream.host: [{"host": "http://m", "skip_verfy": True}]}}))
    r = run_puller("pull", app.ref, "--config", str(config))
    assert r.returncode == 2 and f"mirrors.{upstream.host}[0]: unknown key(s) skip_verfy" in r.stderr


# ---- fleet controls: bandwidth cap and start jitter ------------------------------------------------------------


def test_bandwidth_cap_holds_across_all_connections(upstream, tmp_path):
    big = pushed(upstream, "test/big", "v1")
    size = sum(big.blobs.values())
    cap = 8 << 20
    done = pull_json(
        big.ref, "--store", f"oci:{tmp_path / 'store'}", "--bandwidth-limit", "8MiB", "--concurrency", "16"
    )
    # A lower bound only: the cap may never be beaten (the burst allowance is a tenth of a second's worth).
    assert done["seconds"] >= 0.9 * (size - cap / 10) / cap, done
    assert_store_holds(tmp_path / "store", big)


async def test_start_jitter_spreads_first_pulls_of_a_new_list(tmp_path):
    import time

    from puller.config import Settings
    from puller.daemon.imagelist import parse_list
    from puller.daemon.service import Daemon
    from puller.engine.runtime import Engine

    settings = Settings(store=f"oci:{tmp_path}", start_jitter=5.0)
    daemon = Daemon(Engine(settings), settings.daemon(None))
    before = time.monotonic()
    specs = parse_list("images: [" + ", ".join(f"r.example/app{i}:1" for i in range(30)) + "]", "test")
    daemon.apply_list(specs)
    starts = [st.next_attempt - before for st in daemon.images.values()]
    assert all(0 <= s <= 5.1 for s in starts) and max(starts) - min(starts) > 2
    daemon.apply_list(specs)  # the same list again: nobody's start moves
    assert [st.next_attempt - before for st in daemon.images.values()] == starts
    (requested,) = daemon.request(specs[:1])
    assert requested.next_attempt == 0 and requested.task is not None  # an API request is never delayed
    requested.task.cancel()
    await asyncio.gather(requested.task, return_exceptions=True)
