"""What a registry, a neighbour or a slow network can do to puller: links planted in shared directories,
answers real servers send (split, gzipped), and servers that trickle. Each test fails on the code before the fix."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from puller.errors import StoreError
from puller.stores.safedir import SafeDir, UnsafeDirectory

from .conftest import run_puller, start_puller
from .daemon_rig import Daemon
from .hostile import Behaviour, HostileRegistry, make_image

NOBODY = 65534


def _one_line_error(r, code: int, *needles: str) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _config(tmp_path: Path, **settings) -> str:
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


# ---- 1. links planted in shared directories ----------------------------------------------------------------


def test_planted_links_in_staging_and_store_are_never_followed(tmp_path: Path):
    image = make_image("t/app", "v1", [300_000, 5000])
    layer = image.layers[0]
    hexd = layer["digest"].split(":")[1]
    store = tmp_path / "store"
    staging = store / ".puller" / "staging"
    staging.mkdir(parents=True, mode=0o700)
    (store / "blobs" / "sha256").mkdir(parents=True)
    victims = {}
    for name in ("partial", "lock", "ranges", "blob"):
        v = tmp_path / f"victim-{name}"
        v.write_bytes(b"precious " + name.encode() + b"\0" * (layer["size"] - 20))
        v.chmod(0o600)
        victims[name] = (v, v.read_bytes())
    for suffix in ("partial", "lock", "ranges"):
        (staging / f"sha256-{hexd}.{suffix}").symlink_to(victims[suffix][0])
    (store / "blobs" / "sha256" / hexd).symlink_to(victims["blob"][0])  # same size: looks present by size

    with HostileRegistry([image]) as reg:
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(store))
    assert r.returncode == 0, r.stderr
    for v, content in victims.values():
        assert v.read_bytes() == content and stat.S_IMODE(v.stat().st_mode) == 0o600  # untouched, not chmod-ed
    for d, data in image.blobs.items():
        if d == image.digest:
            continue
        blob = store / "blobs" / "sha256" / d.split(":")[1]
        st = blob.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o644
        assert blob.read_bytes() == data
    assert not any(p.is_symlink() for p in staging.iterdir())


def _owned_by_nobody(p: Path) -> None:
    p.mkdir(parents=True)
    os.chown(p, NOBODY, NOBODY)


def _world_writable(p: Path) -> None:
    p.mkdir(parents=True)
    p.chmod(0o777)


def _link_by_nobody(p: Path) -> None:
    elsewhere = p.parent.parent / "elsewhere"
    p.parent.mkdir(parents=True)
    elsewhere.mkdir(mode=0o700)
    p.symlink_to(elsewhere)
    os.lchown(p, NOBODY, NOBODY)


@pytest.mark.parametrize(
    ("where", "make", "needle"),
    [
        ("store/.puller/staging", _owned_by_nobody, "belongs to uid 65534"),
        ("store", _world_writable, "writable by group or others"),
        ("store/.puller", _link_by_nobody, "symbolic link owned by uid 65534"),
    ],
)
def test_directories_others_own_or_can_write_are_refused(tmp_path: Path, where, make, needle):
    image = make_image("t/app", "v1", [1000])
    make(tmp_path / "w" / where)
    with HostileRegistry([image]) as reg:
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(tmp_path / "w" / "store"))
        assert not reg.paths("/blobs/")  # refused before any byte
    _one_line_error(r, 9, needle)
    elsewhere = tmp_path / "w" / "elsewhere"
    assert not elsewhere.exists() or not any(elsewhere.iterdir())


def test_overlaybd_cache_directory_owned_by_another_user_is_refused(tmp_path: Path):
    image = make_image("t/app", "v1", [1000])
    _owned_by_nobody(tmp_path / "cache")
    with HostileRegistry([image]) as reg:
        cache = ("--cache-dir", str(tmp_path / "cache"), "--overlaybd-config", str(tmp_path / "none.json"))
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", "overlaybd", *cache)
    _one_line_error(r, 9, "belongs to uid 65534")


def test_safedir_walk_rules(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    theirs = shared / "theirs"
    _owned_by_nobody(theirs)
    with pytest.raises(UnsafeDirectory, match="in a directory others can write"):
        SafeDir.open(theirs / "sub")
    assert not (theirs / "sub").exists()
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(mine)  # a link root made: followed
    with SafeDir.open(tmp_path / "link" / "staging") as d:
        fd = d.open_file("f", os.O_RDWR | os.O_CREAT)
        os.close(fd)
        (mine / "staging" / "planted").symlink_to(tmp_path / "victim")
        (tmp_path / "victim").write_text("keep")
        fd = d.open_file("planted", os.O_RDWR | os.O_CREAT)  # the link is replaced, never written through
        os.write(fd, b"new")
        os.close(fd)
        assert (tmp_path / "victim").read_text() == "keep"
        os.mkfifo(mine / "staging" / "fifo")
        with pytest.raises(StoreError, match="not a regular file"):
            d.read_bytes("fifo", 10)  # a planted fifo is refused, not waited on
    assert (mine / "staging" / "f").exists() and stat.S_IMODE((mine / "staging").stat().st_mode) == 0o700


# ---- 2. answers that real servers send ----------------------------------------------------------------------


def test_token_answer_in_two_writes_is_read_whole(tmp_path: Path):
    image = make_image("t/app", "v1", [5000])
    with HostileRegistry([image], Behaviour(token_auth=True, token_split_s=0.3)) as reg:
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(tmp_path / "s"))
        assert r.returncode == 0, r.stderr
        assert reg.paths("/token")


def test_identity_is_asked_and_a_gzipped_manifest_is_decoded(tmp_path: Path):
    image = make_image("t/app", "v1", [5000])
    with HostileRegistry([image], Behaviour(gzip_manifests=True)) as reg:
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(tmp_path / "s"), "--json")
        assert r.returncode == 0, r.stderr
        asked = {h.get("Accept-Encoding") for _, p, h in reg.requests if "/manifests/" in p or "/blobs/" in p}
        assert asked == {"identity"}
    assert image.digest in r.stdout  # the digest of the decoded bytes: the manifest itself


def test_a_gzipped_blob_is_refused_with_one_line(tmp_path: Path):
    image = make_image("t/app", "v1", [5000])
    with HostileRegistry([image], Behaviour(gzip_blobs=True)) as reg:
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(tmp_path / "s"))
    _one_line_error(r, 3, "Content-Encoding 'gzip'")
    assert not list((tmp_path / "s" / "blobs" / "sha256").iterdir())


# ---- 3. servers that trickle --------------------------------------------------------------------------------


def test_a_trickling_blob_server_is_dropped_then_the_pull_fails_with_one_line(tmp_path: Path):
    image = make_image("t/app", "v1", [200_000])
    cfg = _config(tmp_path, low_speed_limit=1024, low_speed_time=1.0, attempts=2)
    with HostileRegistry([image], Behaviour(trickle_blobs_s=0.05)) as reg:
        t0 = time.monotonic()
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(tmp_path / "s"), "--config", cfg)
        took = time.monotonic() - t0
    _one_line_error(r, 7, "below the low-speed limit")
    assert took < 30, took


def test_a_trickling_mirror_hands_its_ranges_to_the_upstream(tmp_path: Path):
    image = make_image("t/app", "v1", [400_000])
    with (
        HostileRegistry([image]) as upstream,
        HostileRegistry([image], Behaviour(trickle_blobs_s=0.05)) as mirror,
    ):
        cfg = _config(
            tmp_path,
            low_speed_limit=1024,
            low_speed_time=1.0,
            hosts_dir=None,
            mirrors={upstream.host: [{"host": f"http://{mirror.host}", "capabilities": ["pull"]}]},
        )
        r = run_puller("pull", f"{upstream.host}/t/app:v1", "--store", str(tmp_path / "s"), "--config", cfg)
        assert r.returncode == 0, r.stderr
        assert mirror.paths("/blobs/") and upstream.paths("/blobs/")
    layer = image.layers[0]["digest"]
    blob = tmp_path / "s" / "blobs" / "sha256" / layer.split(":")[1]
    assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == layer


def test_a_trickling_manifest_is_dropped(tmp_path: Path):
    image = make_image("t/app", "v1", [1000])
    cfg = _config(tmp_path, low_speed_limit=1024, low_speed_time=1.0, attempts=2)
    with HostileRegistry([image], Behaviour(trickle_manifests_s=0.05)) as reg:
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(tmp_path / "s"), "--config", cfg)
    _one_line_error(r, 7, "below the low-speed limit")


def test_trickled_headers_are_dropped(tmp_path: Path):
    cfg = _config(tmp_path, connect_timeout=1.0, read_timeout=1.0, attempts=2)
    with HostileRegistry([], Behaviour(trickle_headers_s=0.2)) as reg:
        t0 = time.monotonic()
        ref = f"{reg.host}/t/app:v1"
        r = run_puller("pull", ref, "--store", str(tmp_path / "s"), "--config", cfg, "--plain-http", timeout=60)
        took = time.monotonic() - t0
    _one_line_error(r, 7)
    assert took < 20, took


def test_slow_images_do_not_starve_healthy_ones_in_the_daemon(tmp_path: Path):
    slow = [make_image(f"t/slow{i}", "v1", [100_000], seed=i) for i in range(4)]
    healthy = make_image("t/ok", "v1", [5000], seed=9)
    with (
        HostileRegistry(slow, Behaviour(trickle_blobs_s=0.01)) as slow_reg,  # ~100 B/s: above a 0 limit
        HostileRegistry([healthy]) as ok_reg,
    ):
        refs = [f"{slow_reg.host}/{i.repo}:v1" for i in slow]
        good = f"{ok_reg.host}/t/ok:v1"
        settings = {"parallel_pulls": 4, "pull_timeout": 2.0, "low_speed_limit": 0, "start_jitter": 0}
        with Daemon(tmp_path / "d", settings) as d:
            d.images.set_images(refs)
            d.wait_for(lambda: all((i := d.image(r)) and i["state"] == "pulling" for r in refs), 30, "4 pulling")
            d.images.set_images([*refs, good])
            d.wait_state(good, "present", timeout=30)
            failed = d.wait_state(refs[0], "failed", timeout=30)
            assert "pull_timeout" in failed["error"]


# ---- 5. many pulls of one image at once ---------------------------------------------------------------------


def test_many_pulls_of_one_image_in_one_process_and_in_several(tmp_path: Path):
    """64 tags of one image pulled at once through one engine (as the daemon does), then 8 processes at once:
    every pull succeeds, index.json names every tag, no temp file is left."""
    import asyncio
    import json

    from puller import config
    from puller.engine.runtime import Engine
    from puller.reference import Reference

    image = make_image("t/app", "v1", [200_000, 3000])
    store = tmp_path / "store"
    with HostileRegistry([image], tags=73) as reg:
        refs = [f"{reg.host}/t/app:v1-{n}" for n in range(1, 65)]

        async def pull_all() -> list:
            settings = config.apply(config.Settings(), {"store": f"oci:{store}", "plain_http": [reg.host]})
            async with Engine(settings) as engine:
                return await asyncio.gather(*(engine.pull(Reference.parse(r)) for r in refs), return_exceptions=True)

        results = asyncio.run(pull_all())
        assert not [r for r in results if isinstance(r, BaseException)], results
        procs = [
            start_puller("pull", f"{reg.host}/t/app:v1-{n}", "--store", str(store), stderr=subprocess.PIPE, text=True)
            for n in range(65, 73)
        ]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, errors
    names = {
        m["annotations"]["org.opencontainers.image.ref.name"]
        for m in json.loads((store / "index.json").read_text())["manifests"]
    }
    assert names == {f"{reg.host}/t/app:v1-{n}" for n in range(1, 73)}
    leftovers = [p.name for p in store.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial")]
    assert leftovers == []


# ---- 6. an API that callers cannot grow without bound -------------------------------------------------------


def test_api_tracks_a_bounded_number_of_requested_images_and_forgets_them(tmp_path: Path):
    images = [make_image(f"t/img{i}", "v1", [1000], seed=i) for i in range(4)]
    with HostileRegistry(images) as reg:
        refs = [f"{reg.host}/t/img{i}:v1" for i in range(4)]
        settings = {"api_max_images": 3, "api_forget_after": 1.0, "plain_http": [reg.host]}
        with Daemon(tmp_path / "d", settings) as d:
            status, body = d.post("/v1/pull", {"images": refs[:3], "wait": True, "timeout": 60})
            assert status == 200, body
            status, body = d.post("/v1/pull", {"images": [refs[3]]})
            assert status == 429 and "api_max_images" in body["error"], body
            status, body = d.post("/v1/pull", {"images": [refs[0]]})  # one already tracked: asked again is fine
            assert status == 202, body
            status, body = d.post("/v1/pull", raw=b"[" * 30_000 + b"]" * 30_000)
            assert status == 400 and "nested" in body["error"], body
            d.wait_for(lambda: d.get("/v1/images")[1]["images"] == [], 30, "requested images forgotten")
            metrics = d.get("/metrics")[1]
            assert "t/img1" not in metrics  # their series go with them
            status, body = d.post("/v1/pull", {"images": [refs[3]], "wait": True, "timeout": 60})
            assert status == 200, body
            assert d.stop() == 0


# ---- 4. disk kept by failures -------------------------------------------------------------------------------


def test_a_blob_larger_than_max_blob_size_is_refused_before_any_byte(tmp_path: Path):
    image = make_image("t/app", "v1", [5000])
    cfg = _config(tmp_path, max_blob_size=4096)
    with HostileRegistry([image]) as reg:
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(tmp_path / "s"), "--config", cfg)
        assert not reg.paths("/blobs/")
    _one_line_error(r, 6, "over max_blob_size")


def test_failed_pulls_hold_only_what_they_received_and_are_collected(tmp_path: Path):
    big = make_image("t/big", "v1", [8 << 20])
    ok = make_image("t/ok", "v1", [1000], seed=3)
    store = tmp_path / "s"
    staging = store / ".puller" / "staging"
    hexd = big.layers[0]["digest"].split(":")[1]
    fail = _config(tmp_path, low_speed_limit=1024, low_speed_time=1.0, attempts=1)
    with HostileRegistry([big], Behaviour(trickle_blobs_s=0.01)) as slow, HostileRegistry([ok]) as good:
        r = run_puller("pull", f"{slow.host}/t/big:v1", "--store", str(store), "--config", fail)
        assert r.returncode == 7, r.stderr
        partial = staging / f"sha256-{hexd}.partial"
        assert partial.stat().st_size == 8 << 20 and partial.stat().st_blocks * 512 < 1 << 20  # not preallocated
        r = run_puller("pull", f"{good.host}/t/ok:v1", "--store", str(store))
        assert r.returncode == 0 and partial.exists()  # within the bounds: kept, so the next pull resumes
        r = run_puller(
            "pull", f"{good.host}/t/ok:v1", "--store", str(store), "--config", _config(tmp_path, staging_max_bytes=0)
        )
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in staging.iterdir()) == []  # collected


def test_collect_removes_staged_blobs_that_hold_nothing_whatever_their_order(tmp_path: Path):
    """A pull that failed before its first byte leaves an empty ``.partial``: nothing to resume, so it is removed
    even within the bounds, and ``max_bytes=0`` removes it whether it is older or newer than the others."""
    from puller.engine.staging import collect

    for empty_is_newer in (False, True):
        staging = tmp_path / f"staging-{empty_is_newer}"
        staging.mkdir()
        (staging / "sha256-full.partial").write_bytes(os.urandom(64 << 10))
        (staging / "sha256-empty.partial").write_bytes(b"")
        os.utime(staging / "sha256-empty.partial", (1e9 + empty_is_newer * 10, 1e9 + empty_is_newer * 10))
        os.utime(staging / "sha256-full.partial", (1e9 + 5, 1e9 + 5))
        with SafeDir.open(staging) as d:
            collect(d, max_bytes=1 << 30, max_age=1e12)
            assert sorted(os.listdir(staging)) == ["sha256-full.partial"]  # within bounds: kept to resume
            (staging / "sha256-empty.partial").write_bytes(b"")
            os.utime(staging / "sha256-empty.partial", (1e9 + empty_is_newer * 10, 1e9 + empty_is_newer * 10))
            collect(d, max_bytes=0, max_age=1e12)
        assert os.listdir(staging) == []


# ---- 7. one line, the documented exit code, never a traceback ------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "code", "needle"),
    [
        (Behaviour(blob_redirect="http://127.0.0.1:99999/blob"), 3, "redirect target is not a valid"),
        (Behaviour(blob_redirect="http://[::1/blob"), 3, "redirect target is not a valid"),
        (Behaviour(token_auth=True, realm="::not a url"), 5, "token realm is not a valid"),
        (Behaviour(token_auth=True, token_value="abc\r\nX-Injected: 1"), 5, "malformed token"),
    ],
)
def test_malformed_registry_answers_are_one_line_errors(tmp_path: Path, behaviour, code, needle):
    image = make_image("t/app", "v1", [1000])
    cfg = _config(tmp_path, attempts=1)
    with HostileRegistry([image], behaviour) as reg:
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(tmp_path / "s"), "--config", cfg)
    _one_line_error(r, code, needle)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--chunk-size", "1e999M"], "invalid size"),
        (["--platform", "foo"], "invalid platform"),
    ],
)
def test_bad_flags_are_exit_2(tmp_path: Path, args, needle):
    r = run_puller("pull", "127.0.0.1:1/t/app:v1", "--store", str(tmp_path / "s"), *args)
    _one_line_error(r, 2, needle)


def test_non_ascii_tags_and_bad_listen_ports_are_exit_2(tmp_path: Path):
    _one_line_error(run_puller("pull", "127.0.0.1:1/t/app:vé", "--store", str(tmp_path / "s")), 2)
    r = run_puller("daemon", "--listen", ":99999", "--config", _config(tmp_path, images_file=str(tmp_path / "l")))
    _one_line_error(r, 2, "port from 1 to 65535")


def test_manifest_parser_refuses_odd_shapes():
    from puller.errors import ManifestError
    from puller.registry import manifest as mf

    index = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_INDEX,
        "manifests": [
            {
                "mediaType": mf.OCI_MANIFEST,
                "digest": "sha256:" + "a" * 64,
                "size": 10,
                "platform": {"os": "linux", "architecture": "amd64", "variant": 5},
            }
        ],
    }
    with pytest.raises(ManifestError, match="variant"):
        mf.parse(json.dumps(index).encode(), None)
    layer = {"mediaType": "x", "digest": "sha256:" + "b" * 64, "size": 10}
    twice = {"schemaVersion": 2, "mediaType": mf.OCI_MANIFEST, "config": layer, "layers": [{**layer, "size": 11}]}
    with pytest.raises(ManifestError, match="twice"):
        mf.parse(json.dumps(twice).encode(), None)
    with pytest.raises(ManifestError, match="nested"):
        mf.parse(b"[" * 100_000 + b"]" * 100_000, None)


def test_wrong_shapes_of_index_json_and_docker_config_are_one_line(tmp_path: Path):
    image = make_image("t/app", "v1", [1000])
    store = tmp_path / "s"
    store.mkdir()
    (store / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": {"a": 1}}))
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": ["not", "a", "map"]}))
    with HostileRegistry([image]) as reg:
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(store))
        _one_line_error(r, 9, "not a list of descriptors")
    with HostileRegistry([image], Behaviour(token_auth=True)) as reg:
        r = run_puller(
            "pull", f"{reg.host}/t/app:v1", "--store", str(tmp_path / "s2"), env={"DOCKER_CONFIG": str(docker)}
        )
        _one_line_error(r, 2, "must be objects")


def test_a_thousand_layers_fit_a_small_open_files_limit(tmp_path: Path):
    image = make_image("t/many", "v1", [100 + i for i in range(300)])
    with HostileRegistry([image]) as reg:
        cmd = f"ulimit -n 384; exec {sys.executable} -m puller pull {reg.host}/t/many:v1 --store {tmp_path / 's'}"
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_read_only_store_is_one_line(tmp_path: Path):
    image = make_image("t/app", "v1", [1000])
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    try:
        with HostileRegistry([image]) as reg:
            r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(ro / "store"))
        _one_line_error(r, 9, "Read-only")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_warmup_survives_malformed_daemon_answers_and_refuses_nan(tmp_path: Path):
    from .hostile import serve_json

    for answer in ([1, 2], {"images": "x"}, {"images": [{"reference": 5}], "node": ["x"]}, "[" * 5000):
        with serve_json(202, answer) as url:
            r = run_puller("warmup", "127.0.0.1:1/t/app:v1", "--endpoints", url, "--wait", "--timeout", "1")
        assert r.returncode == 12 and "Traceback" not in r.stderr, (answer, r.stderr)
    r = run_puller("warmup", "127.0.0.1:1/t/app:v1", "--endpoints", "http://127.0.0.1:1", "--timeout", "nan")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "finite" in r.stderr, r.stderr


# ---- 8. presence is verified, not assumed ---------------------------------------------------------------------


def test_a_same_size_blob_puller_did_not_write_is_hashed_before_it_is_trusted(tmp_path: Path):
    image = make_image("t/app", "v1", [5000])
    layer = image.layers[0]
    store = tmp_path / "s"
    cache = tmp_path / "cache"
    for path in (store / "blobs" / "sha256" / layer["digest"][7:], cache / layer["digest"]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * layer["size"])  # right size, wrong bytes
    with HostileRegistry([image]) as reg:
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", str(store))
        assert r.returncode == 0, r.stderr
        cache_args = ("--cache-dir", str(cache), "--overlaybd-config", str(tmp_path / "none.json"))
        r = run_puller("pull", f"{reg.host}/t/app:v1", "--store", "overlaybd", *cache_args)
        assert r.returncode == 0, r.stderr
    want = image.blobs[layer["digest"]]
    assert (store / "blobs" / "sha256" / layer["digest"][7:]).read_bytes() == want
    assert (cache / layer["digest"]).read_bytes() == want
