"""The containerd store against a real containerd (own root, state and socket), checked with the real `ctr`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from puller.stores.containerd.unpack import chain_ids

from .conftest import pushed, run_puller, start_puller
from .rig import Containerd, LayoutWriter, Registry, flip_middle_byte, skopeo_push

NS = "k8s.io"


def ctr(c: Containerd, *args: str) -> str:
    r = subprocess.run(c.ctr("-n", NS, *args), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def pull(c: Containerd, ref: str, tmp_path: Path, *extra: str):
    return run_puller(
        "pull",
        ref,
        "--store",
        "containerd",
        "--containerd-address",
        str(c.socket),
        "--json",
        *extra,
        env={"PULLER_CONFIG": str(_config(tmp_path))},
    )


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "puller.yaml"
    cfg.write_text(f"staging_dir: {tmp_path / 'staging'}\n")
    return cfg


def image_records(c: Containerd, ns: str = NS) -> dict[str, dict]:
    """`ctr images ls` parsed: name -> {digest, labels}."""
    out = {}
    for line in ctr_ns(c, ns, "images", "ls").splitlines()[1:]:
        cols = line.split()
        out[cols[0]] = {"digest": cols[2], "labels": cols[-1]}
    return out


def content_labels(c: Containerd) -> dict[str, str]:
    out = {}
    for line in ctr(c, "content", "ls").splitlines()[1:]:
        cols = line.split()
        out[cols[0]] = cols[-1]
    return out


def test_pull_into_containerd_is_complete_and_unpacked(containerd, cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    p = pushed(reg, "test/app", "v1")
    r = pull(containerd, p.ref, tmp_path)
    assert r.returncode == 0, r.stderr
    images = image_records(containerd)
    assert images[p.ref]["digest"] == p.digest
    assert images[f"{reg.host}/test/app@{p.digest}"]["digest"] == p.digest
    assert "io.cri-containerd.image=managed" in images[p.ref]["labels"]
    assert "pinned" not in images[p.ref]["labels"]
    labels = content_labels(containerd)
    for digest in [p.digest, *p.blobs]:
        assert digest in labels, digest
    manifest_labels = labels[p.digest]
    assert f"containerd.io/gc.ref.content.config={p.manifest['config']['digest']}" in manifest_labels
    for i, layer in enumerate(p.manifest["layers"]):
        assert f"containerd.io/gc.ref.content.l.{i}={layer['digest']}" in manifest_labels
    assert f"containerd.io/distribution.source.{reg.host}=test/app" in manifest_labels
    # unpacked: the config names the top snapshot, and the chain exists in the snapshotter
    config = json.loads(ctr(containerd, "content", "get", p.manifest["config"]["digest"]))
    chains = chain_ids(config["rootfs"]["diff_ids"])
    assert f"containerd.io/gc.ref.snapshot.overlayfs={chains[-1]}" in labels[p.manifest["config"]["digest"]]
    snapshots = ctr(containerd, "snapshots", "--snapshotter", "overlayfs", "ls")
    for chain in chains:
        assert chain in snapshots
    for digest in p.blobs:  # labelled as containerd's own pull labels them
        assert f"containerd.io/distribution.source.{reg.host}=test/app" in labels[digest], labels[digest]
    for layer, diff_id in zip(p.manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        assert f"containerd.io/uncompressed={diff_id}" in labels[layer["digest"]]
    check = ctr(containerd, "images", "check")
    line = next(line for line in check.splitlines() if line.startswith(p.ref + " "))
    n = len(p.blobs)  # ctr counts the manifest's config and layers
    assert f"complete ({n}/{n})" in line and line.split()[-1] == "true"  # every blob present; unpacked
    staging = tmp_path / "staging"
    assert not staging.exists() or list(staging.iterdir()) == []
    # Leases are dropped: nothing holds content except the image records.
    assert "puller-" not in ctr(containerd, "leases", "ls")


def test_multi_arch_pin_and_repull(containerd, cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    index_digest, _ = reg.manifest("test/multi", "v1")
    ref = f"{reg.host}/test/multi:v1"
    r = pull(containerd, ref, tmp_path, "--pin", "--platform", "linux/arm64")
    assert r.returncode == 0, r.stderr
    images = image_records(containerd)
    assert images[ref]["digest"] == index_digest  # the record targets the index, as containerd's pull does
    assert "io.cri-containerd.pinned=pinned" in images[ref]["labels"]
    labels = content_labels(containerd)
    assert "containerd.io/gc.ref.content.m.0=" in labels[index_digest]
    r = pull(containerd, ref, tmp_path, "--pin", "--platform", "linux/arm64")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["fetched"] == 0


def test_gc_keeps_what_the_image_references_and_no_more(containerd, cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    p = pushed(reg, "test/docker", "v1")
    ns = "gc-test"
    r = pull(containerd, p.ref, tmp_path, "--namespace", ns, "--no-unpack")
    assert r.returncode == 0, r.stderr

    def content() -> str:
        return subprocess.run(containerd.ctr("-n", ns, "content", "ls"), capture_output=True, text=True).stdout

    def sync_gc() -> None:  # deleting a lease with --sync runs containerd's garbage collector before returning
        lease = subprocess.run(containerd.ctr("-n", ns, "leases", "create"), capture_output=True, text=True)
        subprocess.run(containerd.ctr("-n", ns, "leases", "delete", "--sync", lease.stdout.strip()), check=True)

    sync_gc()
    assert all(d in content() for d in [p.digest, *p.blobs])  # the image's gc labels keep everything
    assert "snapshot" not in content()  # --no-unpack: no snapshot references
    for name in (p.ref, f"{reg.host}/test/docker@{p.digest}"):
        subprocess.run(containerd.ctr("-n", ns, "images", "rm", name), check=True, capture_output=True)
    sync_gc()
    assert not any(d in content() for d in [p.digest, *p.blobs])  # nothing of ours was left unreferenced


def test_missing_socket_is_a_clear_error(tmp_path: Path, cdn_rig):
    reg, _ = cdn_rig
    r = run_puller(
        "pull",
        f"{reg.host}/test/small:v1",
        "--store",
        "containerd",
        "--containerd-address",
        str(tmp_path / "nope.sock"),
    )
    assert r.returncode == 9
    assert "containerd socket" in r.stderr and "not found" in r.stderr


def test_unknown_snapshotter_is_a_clear_error(containerd, cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    r = pull(containerd, f"{reg.host}/test/small:v1", tmp_path, "--snapshotter", "nosuch")
    assert r.returncode == 9, r.stderr
    assert "snapshotter" in r.stderr and "nosuch" in r.stderr


def test_container_starts_from_the_pulled_image_without_the_registry(containerd, workdir: Path, tmp_path: Path):
    """A static busybox in the image; the registry is stopped before `ctr run`: nothing is fetched lazily."""
    busybox = Path("/bin/busybox")
    lw = LayoutWriter(tmp_path / "layout")
    lw.add_files_image("run", {"/bin/busybox": (busybox.read_bytes(), 0o755)})
    with Registry(tmp_path / "registry") as reg:
        skopeo_push(tmp_path / "layout", "run", f"{reg.host}/test/run:v1")
        ref = f"{reg.host}/test/run:v1"
        r = pull(containerd, ref, tmp_path)
        assert r.returncode == 0, r.stderr
    # the registry is gone now
    out = subprocess.run(
        containerd.ctr(
            "-n",
            NS,
            "run",
            "--rm",
            ref,
            f"puller-test-{os.getpid()}",
            "/bin/busybox",
            "echo",
            "hello from a puller image",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "hello from a puller image" in out.stdout


def test_killed_pull_resumes_from_containerd_ingest(containerd, slow_rig, tmp_path: Path):
    reg, _ = slow_rig
    p = pushed(reg, "test/big", "v1")
    layer = p.manifest["layers"][0]["digest"]
    ns = "resume-test"
    args = [
        "pull",
        p.ref,
        "--store",
        "containerd",
        "--containerd-address",
        str(containerd.socket),
        "--namespace",
        ns,
        "--no-unpack",
        "--chunk-size",
        "1MiB",
        "--concurrency",
        "4",
    ]
    proc = start_puller(
        *args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"PULLER_CONFIG": str(_config(tmp_path))},
    )

    def ingest_offset() -> int:
        active = subprocess.run(containerd.ctr("-n", ns, "content", "active"), capture_output=True, text=True)
        for line in active.stdout.splitlines():
            if f"puller-{layer}" in line:
                return _parse_size(line.split()[1])
        return 0

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ingest_offset() < 4 << 20:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    offset = ingest_offset()
    assert offset >= 4 << 20  # containerd kept what it was sent
    assert layer not in ctr_ns(containerd, ns, "content", "ls")  # and nothing is committed
    r = run_puller(*args, "--json", env={"PULLER_CONFIG": str(_config(tmp_path))})
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    blob = next(e for e in events if e["event"] == "blob" and e["digest"] == layer)
    assert blob["resumed"] >= 0.99 * offset  # what containerd held (ctr prints it rounded) was not fetched again
    assert blob["fetched"] <= blob["size"] - blob["resumed"]
    stored = subprocess.run(containerd.ctr("-n", ns, "content", "get", layer), capture_output=True).stdout
    assert "sha256:" + hashlib.sha256(stored).hexdigest() == layer
    assert ingest_offset() == 0  # the ingest was committed, not left behind


def ctr_ns(c: Containerd, ns: str, *args: str) -> str:
    return subprocess.run(c.ctr("-n", ns, *args), capture_output=True, text=True).stdout


def _parse_size(text: str) -> int:
    """ctr prints sizes like 5.243MB or 1.5MiB or 300B."""
    units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


def test_moved_tag_updates_the_image_record(containerd, cdn_rig, layout, tmp_path: Path):
    reg, _ = cdn_rig
    ref = f"{reg.host}/test/moving:v1"
    skopeo_push(layout["path"], "small", ref)
    first, _ = reg.manifest("test/moving", "v1")
    assert pull(containerd, ref, tmp_path).returncode == 0
    assert image_records(containerd)[ref]["digest"] == first
    skopeo_push(layout["path"], "app", ref)  # the tag moves to another image
    second, _ = reg.manifest("test/moving", "v1")
    assert second != first
    r = pull(containerd, ref, tmp_path, "--pin")
    assert r.returncode == 0, r.stderr
    record = image_records(containerd)[ref]
    assert record["digest"] == second
    assert (
        "io.cri-containerd.pinned=pinned" in record["labels"] and "io.cri-containerd.image=managed" in record["labels"]
    )


def test_containerd_restarted_mid_pull(slow_rig, tmp_path: Path):
    """The pull fails clearly (or completes); a second pull then completes and the image is whole."""
    reg, _ = slow_rig
    p = pushed(reg, "test/big", "v1")
    env = {"PULLER_CONFIG": str(_config(tmp_path))}
    with Containerd(tmp_path / "ctrd") as c:
        args = [
            "pull",
            p.ref,
            "--store",
            "containerd",
            "--containerd-address",
            str(c.socket),
            "--no-unpack",
            "--concurrency",
            "4",
            "--chunk-size",
            "1MiB",
        ]
        proc = start_puller(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(2.0)
        c.__exit__()  # containerd goes away mid-pull ...
        c.__enter__()  # ... and comes back with the same root
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 9), err
        if proc.returncode == 9:
            errors = [line for line in err.splitlines() if line.startswith("puller: error:")]  # besides progress
            assert len(errors) == 1 and errors[0].startswith("puller: error: containerd"), err
        r = run_puller(*args, env=env)
        assert r.returncode == 0, r.stderr
        layer = p.manifest["layers"][0]["digest"]
        stored = subprocess.run(c.ctr("-n", NS, "content", "get", layer), capture_output=True).stdout
        assert "sha256:" + hashlib.sha256(stored).hexdigest() == layer
        assert image_records(c)[p.ref]["digest"] == p.digest


def test_corrupted_blob_is_never_committed_to_containerd(containerd, tmp_path: Path):
    """The containerd store streams bytes into containerd while they download; a blob whose digest does not match
    must still never be committed (containerd's content store holds nothing of it) and no image is named."""
    LayoutWriter(tmp_path / "layout").add_image("corrupt", [300_000], seed=4242)  # layers no other test has
    with Registry(tmp_path / "registry") as reg:
        skopeo_push(tmp_path / "layout", "corrupt", f"{reg.host}/test/corrupt:v1")
        p = pushed(reg, "test/corrupt", "v1")
        layer = p.manifest["layers"][0]["digest"]
        flip_middle_byte(reg.blob_path(layer))
        r = pull(containerd, p.ref, tmp_path)
        assert r.returncode == 8 and "digest mismatch" in r.stderr and layer in r.stderr, r.stderr
        assert layer not in content_labels(containerd)
        assert p.ref not in image_records(containerd)
        assert f"puller-{layer}" not in ctr(containerd, "content", "active")  # the ingest was aborted too
        flip_middle_byte(reg.blob_path(layer))  # repaired: the same pull then completes
        r = pull(containerd, p.ref, tmp_path)
        assert r.returncode == 0, r.stderr
        assert layer in content_labels(containerd) and image_records(containerd)[p.ref]["digest"] == p.digest


async def test_one_store_pulls_several_images_at_once(containerd, tmp_path: Path):
    """The daemon pulls several images at once through one containerd store: each is committed and unpacked, and
    one that fails after its layers began (a corrupted layer) neither holds up nor breaks the others."""
    import asyncio

    from puller.config import Settings
    from puller.engine.pull import PullProgress
    from puller.engine.runtime import Engine
    from puller.errors import DigestMismatch
    from puller.reference import Reference

    lw = LayoutWriter(tmp_path / "layout")
    for i, name in enumerate(("one", "two", "bad")):
        lw.add_image(name, [12_000_000, 700_000], seed=5150 + i)  # layers no other test has
    ns = "several"
    settings = Settings(
        store="containerd", containerd_address=str(containerd.socket), namespace=ns, staging_dir=str(tmp_path / "st")
    )
    with Registry(tmp_path / "registry") as reg:
        for name in ("one", "two", "bad"):
            skopeo_push(tmp_path / "layout", name, f"{reg.host}/test/{name}:v1")
        good = [pushed(reg, f"test/{name}", "v1") for name in ("one", "two")]
        bad = pushed(reg, "test/bad", "v1")
        flip_middle_byte(reg.blob_path(bad.manifest["layers"][0]["digest"]))
        async with Engine(settings) as engine:
            progress = [PullProgress(p.ref) for p in good]

            async def bad_after_the_others_began():
                while any(pr.state != "fetching" for pr in progress):
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.05)  # so that the failing pull is the last to begin
                return await engine.pull(Reference.parse(bad.ref))

            pulls = [
                *(engine.pull(Reference.parse(p.ref), progress=pr) for p, pr in zip(good, progress, strict=True)),
                bad_after_the_others_began(),
            ]
            results = await asyncio.wait_for(asyncio.gather(*pulls, return_exceptions=True), 60)
            store = engine.store  # a daemon runs for weeks: nothing is kept per blob once its pulls are over
            assert not (store._images or store._unpacking or store._blobs or store.leases)
            assert store._shared is not None and store._shared.kept == 0
    assert isinstance(results[-1], DigestMismatch), results[-1]
    records = image_records(containerd, ns)
    assert bad.ref not in records
    snapshots = ctr_ns(containerd, ns, "snapshots", "--snapshotter", "overlayfs", "ls")
    for p, result in zip(good, results[:-1], strict=True):
        assert not isinstance(result, BaseException), result
        assert records[p.ref]["digest"] == p.digest
        config = json.loads(
            subprocess.run(
                containerd.ctr("-n", ns, "content", "get", p.manifest["config"]["digest"]),
                capture_output=True,
                check=True,
            ).stdout
        )
        assert all(chain in snapshots for chain in chain_ids(config["rootfs"]["diff_ids"]))  # unpacked


async def test_a_blob_waiting_for_its_bytes_leaves_the_write_streams_to_others(containerd, tmp_path: Path):
    """containerd's ingest is the limit on a fast link, so only MAX_WRITE_STREAMS blobs send at once; a blob whose
    next bytes are still on their way must not keep a stream from a blob whose bytes are all here."""
    import asyncio
    import contextlib

    from puller.stores.containerd import ContainerdStore
    from puller.stores.containerd.writer import MAX_WRITE_STREAMS

    store = ContainerdStore(str(containerd.socket), "streams", staging_dir=tmp_path / "st")
    async with store, contextlib.AsyncExitStack() as stack:
        stalled = []
        for i in range(MAX_WRITE_STREAMS):  # half of each arrives, then nothing for a while
            desc, data = _random_blob(2_000_000 + i)
            writer = await stack.enter_async_context(store.writer(desc))
            assert not (await writer.status()).done
            await writer.write_at(0, [data[: len(data) // 2]])
            stalled.append((desc, data, writer))
        await asyncio.sleep(0.5)  # the stalled blobs have sent their halves
        desc, data = _random_blob(2_000_099)
        async with store.writer(desc) as ready:
            await ready.status()
            await ready.write_at(0, [data])
            await asyncio.wait_for(ready.commit(), 20)  # committed while the others wait
        assert await store.has_blob(desc)
        for desc, data, writer in stalled:  # the rest of their bytes arrive: they finish too
            await writer.write_at(len(data) // 2, [data[len(data) // 2 :]])
            await asyncio.wait_for(writer.commit(), 20)
            assert await store.has_blob(desc)


def _random_blob(size: int):
    from puller.digest import Digest
    from puller.registry.manifest import Descriptor

    data = os.urandom(size)
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    return Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", digest, size), data


async def test_bytes_ahead_of_containerd_are_kept_then_staged_and_resumed(containerd, tmp_path: Path, monkeypatch):
    """Bytes that are not next wait in memory (for a blob without a stream yet, only MAX_KEPT_WAITING of it),
    the rest are staged; a write far ahead of what containerd took waits, at most MAX_WAIT_S, first.
    Memory is given back when the writer ends; staged bytes are what the next writer resumes from."""
    import time

    from puller.digest import Digest
    from puller.registry.manifest import Descriptor
    from puller.stores.containerd import ContainerdStore
    from puller.stores.containerd import writer as cw

    monkeypatch.setattr(cw, "MAX_WAIT_S", 0.5)
    mib = 1 << 20
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar", Digest.parse("sha256:" + "ab" * 32), 100 * mib)
    async with ContainerdStore(str(containerd.socket), "ahead", staging_dir=tmp_path / "st") as store:
        assert store._shared is not None
        async with store.writer(desc) as writer:
            assert not (await writer.status()).done
            await writer.write_at(8 * mib, [b"k" * (4 * mib)])  # kept: no byte 0 yet, so no stream
            assert store._shared.kept == 4 * mib
            started = time.monotonic()
            await writer.write_at(16 * mib, [b"s" * cw.MAX_KEPT_WAITING])  # more than memory for waiting: staged
            assert time.monotonic() - started < 0.4, "waited for memory with no stream busy (the network the limit)"
            assert store._shared.kept == 4 * mib
            started = time.monotonic()
            await writer.write_at(80 * mib, [b"w" * mib])  # far ahead of containerd: waits, then kept as any
            assert time.monotonic() - started >= 0.5
            assert store._shared.kept == 5 * mib
        assert store._shared.kept == 0
        async with store.writer(desc) as again:
            done = (await again.status()).done
            assert done.as_list() == [[16 * mib, 16 * mib + cw.MAX_KEPT_WAITING]]
            await again.abort()
        async with store.writer(desc) as after:
            assert not (await after.status()).done


async def test_staged_and_kept_bytes_reach_containerd_whole_in_order(containerd, tmp_path: Path, monkeypatch):
    """Bytes arriving back to front, most of them staged (memory for one 1 MiB block): containerd is sent each
    staged range read straight into its message's frames, and each kept block as it was framed; what it commits
    is the blob, byte for byte."""
    from puller.stores.containerd import ContainerdStore
    from puller.stores.containerd import writer as cw

    monkeypatch.setattr(cw, "MAX_KEPT", 1 << 20)
    monkeypatch.setattr(cw, "MAX_KEPT_WAITING", 1 << 20)
    monkeypatch.setattr(cw, "MAX_WAIT_S", 0.2)  # a write ahead of the prefix waits this long for memory first
    desc, data = _random_blob(5 * (1 << 20) + 12_345)
    blocks = [(at, data[at : at + 700_000]) for at in range(0, len(data), 700_000)]
    async with ContainerdStore(str(containerd.socket), "staged", staging_dir=tmp_path / "st") as store:
        assert store._shared is not None
        async with store.writer(desc) as writer:
            assert not (await writer.status()).done
            for at, block in reversed(blocks):  # byte 0 last: everything waits for it
                await writer.write_at(at, [block[:1000], block[1000:]])
            assert list((tmp_path / "st").iterdir()), "nothing was staged"
            await asyncio.wait_for(writer.commit(), 30)
        assert await store.content.read_all(str(desc.digest)) == data


async def test_bytes_ahead_of_a_waiting_blob_wait_for_memory_instead_of_being_staged(
    containerd, tmp_path: Path, monkeypatch
):
    """Where containerd is the limit, staging bytes only to read them back costs CPU containerd needs: a blob
    waiting for its stream keeps bytes ahead of its prefix in part of the memory, and a write beyond that waits
    (bounded) until the blob streams; bytes extending its prefix are kept in the rest, and start its stream."""
    from puller.stores.containerd import ContainerdStore
    from puller.stores.containerd import writer as cw

    # containerd is the limit (on a fast link, a stream has bytes it has yet to take): here, as if always
    monkeypatch.setattr(cw.Shared, "containerd_busy", lambda self: True)
    mib = 1 << 20
    monkeypatch.setattr(cw, "MAX_KEPT_WAITING", 4 * mib)  # 3 MiB of it for bytes ahead of a prefix
    monkeypatch.setattr(cw, "MAX_WAIT_S", 20.0)
    desc, data = _random_blob(6 * mib)
    async with ContainerdStore(str(containerd.socket), "memwait", staging_dir=tmp_path / "st") as store:
        assert store._shared is not None
        async with store.writer(desc) as writer:
            assert not (await writer.status()).done
            await writer.write_at(mib, [data[mib : 4 * mib]])  # ahead, within its part: kept
            assert store._shared.kept == 3 * mib
            waiting = asyncio.ensure_future(writer.write_at(4 * mib, [data[4 * mib :]]))
            await asyncio.sleep(0.5)
            assert not waiting.done(), "a write beyond the memory for waiting blobs did not wait"
            started = time.monotonic()
            await writer.write_at(0, [data[:mib]])  # the prefix: kept at once, and the blob's stream starts
            await asyncio.wait_for(waiting, 10)
            assert time.monotonic() - started < 5, "the waiting write went on only at its deadline"
            assert not any(p.is_file() and p.stat().st_size for p in (tmp_path / "st").rglob("*")), "bytes were staged"
            await asyncio.wait_for(writer.commit(), 30)
        assert await store.content.read_all(str(desc.digest)) == data


async def test_ranges_ahead_wait_for_room_before_they_are_requested_and_the_prefix_never_does(
    containerd, tmp_path: Path, monkeypatch
):
    """Where containerd is the limit and memory is full, a range ahead is not requested (its bytes would only be
    staged) until containerd takes enough; room promised to a requested range counts until its bytes arrive; a
    range that extends the prefix always has room; where the network is the limit, every range has room."""
    from puller.stores.containerd import ContainerdStore
    from puller.stores.containerd import writer as cw

    busy = True
    monkeypatch.setattr(cw.Shared, "containerd_busy", lambda self: busy)
    mib = 1 << 20
    monkeypatch.setattr(cw, "MAX_KEPT", 4 * mib)
    monkeypatch.setattr(cw, "MAX_KEPT_WAITING", 4 * mib)
    desc, data = _random_blob(12 * mib)
    async with ContainerdStore(str(containerd.socket), "room", staging_dir=tmp_path / "st") as store:
        assert store._shared is not None
        async with store.writer(desc) as writer:
            assert not (await writer.status()).done
            assert await writer.room_for(2 * mib, 2 * mib, 0.1)  # room: promised
            assert not await writer.room_for(4 * mib, 3 * mib, 0.3)  # 2 promised + 3 > 4
            await writer.write_at(2 * mib, [data[2 * mib : 4 * mib]])  # arrived: kept, no longer promised
            assert store._shared.kept == 2 * mib and store._shared.promised == 0
            assert not await writer.room_for(4 * mib, 3 * mib, 0.3)  # 2 kept + 3 > 4
            waiting = asyncio.ensure_future(writer.room_for(4 * mib, 3 * mib, 20))
            assert await writer.room_for(0, 2 * mib, 0.1)  # the prefix: always
            started = time.monotonic()
            await writer.write_at(0, [data[: 2 * mib]])  # the stream starts: containerd takes [0, 4 MiB)
            assert await asyncio.wait_for(waiting, 20)
            assert time.monotonic() - started < 5, "woken only at its deadline"
            busy = False
            assert await writer.room_for(8 * mib, 4 * mib, 0.1)  # the network the limit: always
            for start in range(0, 12 * mib, 2 * mib):
                if start != 2 * mib:
                    await writer.write_at(start, [data[start : start + 2 * mib]])
            await asyncio.wait_for(writer.commit(), 30)
            assert await writer.room_for(0, mib, 0.1) and store._shared.promised == 0  # no stream: no promise
        assert store._shared.promised == 0
        assert await store.content.read_all(str(desc.digest)) == data


async def test_a_prefix_write_that_waited_for_a_stream_goes_on_when_the_stream_ends(
    containerd, tmp_path: Path, monkeypatch
):
    """A waiting blob's prefix bytes wait for memory while another blob streams and containerd is the limit; when
    that stream ends they go on at once (they start the next stream), not at their deadline, even though memory is
    still short."""
    from puller.stores.containerd import ContainerdStore
    from puller.stores.containerd import writer as cw

    # containerd is the limit whenever a blob streams (on a fast link, its stream has bytes it has yet to take)
    monkeypatch.setattr(cw.Shared, "containerd_busy", lambda self: bool(self.streaming))
    mib = 1 << 20
    monkeypatch.setattr(cw, "MAX_KEPT_WAITING", 4 * mib)
    monkeypatch.setattr(cw, "MAX_WAIT_S", 20.0)
    streaming, s_data = _random_blob(4 * mib)
    waiting, w_data = _random_blob(5 * mib)
    async with ContainerdStore(str(containerd.socket), "prefixwait", staging_dir=tmp_path / "st") as store:
        async with store.writer(streaming) as s_writer, store.writer(waiting) as w_writer:
            await s_writer.status()
            await w_writer.status()
            await s_writer.write_at(0, [s_data[:mib]])  # its stream starts
            await asyncio.sleep(0.3)
            await w_writer.write_at(2 * mib, [w_data[2 * mib : 5 * mib]])  # ahead: kept
            prefix = asyncio.ensure_future(w_writer.write_at(0, [w_data[: 2 * mib]]))
            await asyncio.sleep(0.5)
            assert not prefix.done(), "the prefix write did not wait while another blob streamed"
            await s_writer.write_at(mib, [s_data[mib:]])
            await asyncio.wait_for(s_writer.commit(), 20)
            started = time.monotonic()
            await asyncio.wait_for(prefix, 10)
            assert time.monotonic() - started < 5, "the prefix write went on only at its deadline"
            await asyncio.wait_for(w_writer.commit(), 20)
        assert await store.content.read_all(str(waiting.digest)) == w_data


def test_unpacked_tree_holds_every_layer_and_whiteouts_hide_lower_files(containerd, tmp_path: Path):
    """Layers applied in parallel (containerd 2.x: prepared without a parent, committed onto it) or one after
    another (1.6) give the same tree: upper files win, whiteouts hide lower files."""
    lw = LayoutWriter(tmp_path / "layout")
    busybox = (Path("/bin/busybox").read_bytes(), 0o755)
    lw.add_layers_image(
        "layered",
        [
            {
                "/bin/busybox": busybox,
                "/data/a": (b"a0", 0o644),
                "/data/b": (b"b0", 0o644),
                "/data/keep": (b"k", 0o644),
            },
            {"/data/a": (b"a1", 0o644), "/data/b": None, "/data/c": (b"c1", 0o644)},
            {"/data/d": (b"d2", 0o644), "/data/c": None},
        ],
    )
    ns = f"tree-{containerd.version}"
    with Registry(tmp_path / "registry") as reg:
        ref = f"{reg.host}/test/layered:v1"
        skopeo_push(tmp_path / "layout", "layered", ref)
        r = run_puller(
            "-v",
            *("pull", ref, "--store", "containerd", "--containerd-address", str(containerd.socket)),
            *("--namespace", ns, "--config", str(_config(tmp_path))),
        )
        assert r.returncode == 0, r.stderr
    assert ("in parallel" in r.stderr) == (containerd.version != "1.6"), r.stderr
    out = subprocess.run(
        containerd.ctr(
            "-n", ns, "run", "--rm", ref, f"tree-{os.getpid()}", "/bin/busybox", "sh", "-c", "ls /data; cat /data/a"
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["a", "d", "keep", "a1"]


async def test_an_ingest_locked_by_another_writer_is_waited_for_then_written(containerd, tmp_path: Path):
    """Another process (or one killed a moment ago, until containerd notices) holds the ingest's lock: the write
    tries again within LOCKED_WAIT_S instead of failing the pull."""
    import asyncio

    from puller.stores.containerd import ContainerdStore
    from puller.stores.containerd.content import ingest_ref
    from puller.stores.containerd_api import content_pb2

    desc, data = _random_blob(300_000)
    other = ContainerdStore(str(containerd.socket), "locked", staging_dir=tmp_path / "a")
    store = ContainerdStore(str(containerd.socket), "locked", staging_dir=tmp_path / "b")
    async with other, store:
        held = await other.content.api.open_write()
        stat = content_pb2.WriteContentRequest(
            action=content_pb2.STAT, ref=ingest_ref(desc), total=desc.size, expected=str(desc.digest)
        )
        await held.send([stat.SerializeToString()])
        await held.receive()  # the other writer holds the lock now
        write = asyncio.ensure_future(store.content.put_bytes(desc, data, {}, None))
        await asyncio.sleep(1.5)
        assert not write.done()  # waiting, not failed
        held.close()  # the other writer goes away
        await asyncio.wait_for(write, 20)
        assert await store.has_blob(desc)


async def test_where_layers_are_applied_while_downloading_fewer_received_bytes_are_kept(containerd, tmp_path: Path):
    """The appliers' memory comes on top of the received bytes kept for their turn: once an image's layers are to
    be applied while they download (containerd 2.x), a blob waiting for its stream keeps at most a quarter of
    MAX_KEPT_APPLYING and stages the rest, and ranges are not held back for memory; through the Diff service (1.6)
    it keeps up to MAX_KEPT_WAITING. One blob streams at a time while applied (MAX_WRITE_STREAMS_APPLYING)."""
    from puller.reference import Reference
    from puller.stores.containerd import ContainerdStore
    from puller.stores.containerd import writer as cw

    from .test_store_contract import _tiny_image

    mib = 1 << 20
    _, _, manifest, _ = _tiny_image()
    desc, _ = _random_blob(64 * mib)  # not the image's: only its memory is looked at
    store = ContainerdStore(str(containerd.socket), "applying", staging_dir=tmp_path / "st", root=containerd.workdir)
    async with store:
        await store.begin_image(Reference.parse("registry.example/kept/image:v1"), manifest)
        applying = containerd.version != "1.6"
        assert store._shared is not None
        assert store._shared.max_kept == (cw.MAX_KEPT_APPLYING if applying else cw.MAX_KEPT)
        assert store._shared.hold_requests is not applying  # ranges are not held back for a stream's applier
        assert store._shared.slots.value == (cw.MAX_WRITE_STREAMS_APPLYING if applying else cw.MAX_WRITE_STREAMS)
        piece = cw.MAX_KEPT_APPLYING // 8  # a waiting blob's bytes ahead of its prefix may keep 3/16 of the limit
        async with store.writer(desc) as writer:
            await writer.status()
            await writer.write_at(8 * mib, [b"k" * piece])  # no byte 0 yet, so no stream: kept in both
            await writer.write_at(8 * mib + piece, [b"s" * piece])  # past what applying leaves a waiting blob
            assert store._shared.kept == (1 if applying else 2) * piece
            await writer.abort()
