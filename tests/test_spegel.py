"""puller with Spegel, the P2P mirror, on real parts (tests/p2p.py): three nodes, each a network namespace with
containerd 2.4 and Spegel, hosts.toml as Spegel's ``configuration`` command writes it; the upstream registry and
its blob CDN (nginx, whose log counts blob requests) on the bridge. Spegel serves only what the node's containerd
holds committed with distribution-source labels, one range per request, to requests that carry ``?ns=``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .conftest import run_puller
from .daemon_rig import Daemon
from .p2p import Bridge, SpegelNode
from .rig import LayoutWriter, Nginx, Registry, flip_middle_byte, skopeo_push, wait_for

NET = "10.235.0"
MIB = 1 << 20


@pytest.fixture(scope="module")
def fleet(workdir: Path):
    """(upstream registry, its CDN, three Spegel nodes, the layout of the test images)."""
    root = workdir / "spegel"
    layout = LayoutWriter(root / "layout")
    images = {
        "shared": layout.add_image("shared", [3 * MIB, 5 * MIB + 17, 1000], seed=201),
        "killed": layout.add_image("killed", [24 * MIB], seed=202),
        "lying": layout.add_image("lying", [6 * MIB, 2 * MIB], seed=203),
        "waves": layout.add_image("waves", [4 * MIB, 4 * MIB], seed=204),
        "frozen": layout.add_image("frozen", [24 * MIB], seed=205),
    }
    with Bridge("psbr0", NET) as bridge:
        cdn = Nginx(root / "cdn", root / "registry" / "storage", bind=bridge.ip)
        with cdn, Registry(root / "registry", redirect_base=cdn.url + "/", bind=bridge.ip, access_log=True) as reg:
            for tag in images:
                skopeo_push(root / "layout", tag, f"{reg.host}/p2p/{tag}:v1")
            ips = [f"{NET}.{10 + i}" for i in range(3)]
            nodes = [SpegelNode(root / f"node{i}", bridge, f"ps-n{i}", ip, [reg.host]) for i, ip in enumerate(ips)]
            for node in nodes:
                node.peers = [other.address for other in nodes if other is not node]
            try:
                for node in nodes:
                    node.__enter__()
                for node in nodes:
                    node.wait_ready()
                yield reg, cdn, nodes, images
            finally:
                for node in nodes:
                    node.__exit__(None, None, None)


def _manifest(reg: Registry, tag: str) -> dict:
    return reg.manifest(f"p2p/{tag}", "v1")[1]


def _blobs(reg: Registry, tag: str) -> list[str]:
    m = _manifest(reg, tag)
    return [m["config"]["digest"], *(d["digest"] for d in m["layers"])]


def _cdn_blob_requests(cdn: Nginx, digests: list[str]) -> list[str]:
    hexes = [d.split(":")[1] for d in digests]
    return [line for line in cdn.requests() if any(h in line for h in hexes)]


def _done(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_spegel_serves_what_puller_wrote_and_the_next_nodes_pull_from_peers_not_upstream(fleet):
    """Node 0 pulls from upstream (its Spegel finds no peer with the blobs and answers 404: puller falls through
    to the next host of hosts.toml). Its Spegel then advertises what puller committed (distribution-source
    labels), so node 1's puller and node 2's containerd (CRI, as kubelet pulls) get every blob from a peer: the
    CDN serves no blob twice."""
    reg, cdn, nodes, _ = fleet
    ref = f"{reg.host}/p2p/shared:v1"
    blobs = _blobs(reg, "shared")
    first = _done(nodes[0].puller("pull", ref, "--json"))
    assert set(first["hosts"]) == {reg.host}, first["hosts"]  # no peer had a byte of it
    served = len(_cdn_blob_requests(cdn, blobs))
    assert served >= len(blobs)
    wait_for(lambda: all(nodes[1].finds_on_peers("p2p/shared", d) for d in blobs), 30, "Spegel to advertise")

    pulled = nodes[1].puller("-v", "pull", ref, "--json")
    second = _done(pulled)
    # every byte through the node's Spegel (else the log says why puller left it: a stall, a 404, a failed connect)
    assert set(second["hosts"]) == {nodes[1].mirror}, (second["hosts"], pulled.stderr[-4000:])
    subprocess.run(nodes[2].ctrd.crictl("pull", ref), check=True, capture_output=True, timeout=120)
    assert ref in nodes[1].ctrd.cri_tags() and ref in nodes[2].ctrd.cri_tags()
    assert len(_cdn_blob_requests(cdn, blobs)) == served  # not one blob more from upstream


def test_a_peer_killed_mid_blob_the_pull_completes_from_the_next_host_verified(fleet):
    """Node 0 holds a 24 MiB layer and sends at 40 Mbit/s; node 1 pulls it through Spegel, and node 0's Spegel is
    killed 1.5 s in, mid-blob. The pull completes, the rest from the upstream (the next host of hosts.toml), the
    blob verified; the image is whole in node 1's containerd."""
    reg, cdn, nodes, _ = fleet
    ref = f"{reg.host}/p2p/killed:v1"
    blobs = _blobs(reg, "killed")
    _done(nodes[0].puller("pull", ref, "--json"))
    wait_for(lambda: all(nodes[1].finds_on_peers("p2p/killed", d) for d in blobs), 30, "Spegel to advertise")
    before = len(_cdn_blob_requests(cdn, blobs))
    killer = threading.Timer(1.5, nodes[0].kill_spegel)
    nodes[0].shape(40)  # about 5 s for the layer: the kill lands mid-blob
    killer.start()
    try:
        done = _done(nodes[1].puller("pull", ref, "--json"))
    finally:
        killer.cancel()
        nodes[0].shape(None)
        nodes[0].start_spegel()
    mirrored = done["hosts"].get(nodes[1].mirror, 0)
    assert 0 < mirrored < done["bytes"], done["hosts"]  # part came from the peer ...
    assert len(_cdn_blob_requests(cdn, blobs)) > before  # ... the rest from upstream
    assert ref in nodes[1].ctrd.cri_tags()
    nodes[0].wait_ready()


def test_a_peer_that_serves_wrong_bytes_is_refused_by_digest_and_the_blob_fetched_upstream(fleet):
    """Node 0's copy of a layer is corrupted in its content store (same size): Spegel serves it as it is. Node
    2's pull through Spegel gets the wrong bytes, refuses them by digest, and fetches that blob again from the
    upstream only; nothing unverified is committed."""
    reg, cdn, nodes, _ = fleet
    ref = f"{reg.host}/p2p/lying:v1"
    blobs = _blobs(reg, "lying")
    _done(nodes[0].puller("pull", ref, "--json"))
    wait_for(lambda: all(nodes[2].finds_on_peers("p2p/lying", d) for d in blobs), 30, "Spegel to advertise")
    big = max(_manifest(reg, "lying")["layers"], key=lambda d: d["size"])["digest"]
    flip_middle_byte(nodes[0].content_dir / "blobs" / "sha256" / big.split(":")[1])
    before = len(_cdn_blob_requests(cdn, [big]))
    r = nodes[2].puller("pull", ref, "--json")
    done = _done(r)
    assert "digest" in r.stderr.lower() and big in r.stderr  # the refusal is logged, naming the blob
    assert len(_cdn_blob_requests(cdn, [big])) > before  # fetched again, upstream
    assert done["hosts"].get(reg.host, 0) >= max(d["size"] for d in _manifest(reg, "lying")["layers"])
    listed = subprocess.run(nodes[2].ctrd.ctr("-n", "k8s.io", "content", "ls", "-q"), capture_output=True, text=True)
    assert big in listed.stdout.split()  # committed: containerd's content store checked its digest at commit
    assert ref in nodes[2].ctrd.cri_tags()  # and unpacked (its layer applied from the verified blob)


def _cdn_bytes(cdn: Nginx, digest: str) -> int:
    """Body bytes the CDN sent of blob ``digest``."""
    return sum(int(line.split()[1]) for line in cdn.requests() if digest.split(":")[1] in line)


def test_with_waves_the_upstream_serves_each_blob_once_and_every_node_holds_the_image(fleet, tmp_path: Path):
    """A puller daemon on each node; ``puller warmup --first-wave 1``: the first node pulls from upstream, the
    other two once it holds the image, from it through Spegel. The CDN sends each blob's bytes once (without the
    wave, each node pulls its own copy: Spegel shares only whole blobs)."""
    reg, cdn, nodes, _ = fleet
    ref = f"{reg.host}/p2p/waves:v1"
    with contextlib.ExitStack() as stack:
        daemons = [
            stack.enter_context(Daemon(tmp_path / n.name, n.daemon_settings(), host=n.ip, netns=n.name)) for n in nodes
        ]
        endpoints = ",".join(d.url for d in daemons)
        r = run_puller("warmup", ref, "--endpoints", endpoints, "--wait", "--first-wave", "1", "--timeout", "120")
        assert r.returncode == 0, r.stderr
    manifest = _manifest(reg, "waves")
    pulls = "\n".join(  # which node took what from where, for a failure's message
        f"{n.name}: {line}" for n, d in zip(nodes, daemons, strict=True) for line in d.log.read_text().splitlines()
    )
    for desc in [manifest["config"], *manifest["layers"]]:
        assert _cdn_bytes(cdn, desc["digest"]) == desc["size"], f"{desc['digest']}\n{pulls}"  # one copy upstream
    for node in nodes:
        assert ref in node.ctrd.cri_tags()


def test_a_frozen_mirror_mid_blob_is_left_within_seconds_for_the_next_host(fleet):
    """Node 2's own Spegel, the first host of its hosts.toml, is stopped (SIGSTOP: it accepts connections and
    answers nothing) while node 2 pulls a 24 MiB layer through it from node 0 (sending at 40 Mbit/s): every range
    to it stalls at once, so
    no stall takeover can notice; within MIRROR_STALL_S puller gives the mirror up and takes the rest from the
    upstream. The pull takes seconds, not the 30 s read timeout."""
    reg, _, nodes, _ = fleet
    ref = f"{reg.host}/p2p/frozen:v1"
    blobs = _blobs(reg, "frozen")
    _done(nodes[0].puller("pull", ref, "--json"))
    wait_for(lambda: all(nodes[2].finds_on_peers("p2p/frozen", d) for d in blobs), 30, "Spegel to advertise")
    assert nodes[2].spegel is not None
    freezer = threading.Timer(1.5, os.killpg, (nodes[2].spegel.pid, signal.SIGSTOP))
    nodes[0].shape(40)  # about 5 s for the layer: the freeze lands mid-blob
    freezer.start()
    started = time.monotonic()
    try:
        done = _done(nodes[2].puller("pull", ref, "--json"))
    finally:
        freezer.cancel()
        nodes[0].shape(None)
        os.killpg(nodes[2].spegel.pid, signal.SIGCONT)
    took = time.monotonic() - started
    assert done["hosts"].get(nodes[2].mirror, 0) > 0 and done["hosts"].get(reg.host, 0) > 0, done["hosts"]
    assert took < 20, took  # 1.5 s, the stall noticed in 3 s, the rest upstream: not the 30 s read timeout
    assert ref in nodes[2].ctrd.cri_tags()
