"""Daemon mode for real: `puller daemon` processes against real registries and the OCI layout store, its HTTP
API over loopback, `puller warmup` against several daemons, and the Kubernetes calls against a stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse

from puller import config

from .conftest import PULLER, assert_store_holds, pushed, run_puller, staged_files
from .daemon_rig import Daemon, KubeStandIn, fetched_bytes, http
from .rig import free_port, skopeo_push

TAINT = {"key": "puller.io/prefetch", "value": "pending", "effect": "NoSchedule"}
OTHER_TAINT = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}


def test_daemon_follows_the_image_list_through_symlink_swaps(cdn_rig, tmp_path):
    reg, _ = cdn_rig
    app, small = pushed(reg, "test/app", "v1"), pushed(reg, "test/small", "v1")
    with Daemon(tmp_path / "d") as d:
        d.images.set_images([app.ref])
        got = d.wait_state(app.ref, "present")
        assert got["digest"] == app.digest and got["sources"] == ["list"]
        assert_store_holds(d.store, app)
        assert d.get("/readyz?list=1")[0] == 200

        d.images.set_images([{"reference": small.ref, "pin": True}])  # kubelet's atomic ..data swap
        d.wait_state(small.ref, "present")
        d.wait_for(lambda: d.image(app.ref) is None, what="the removed image no longer reported")
        assert_store_holds(d.store, small)

        d.images.write("images: [this is: not, a list\n")  # a broken version: refused, the last good list stays
        d.wait_for(lambda: d.metrics().get(("puller_image_list_reloads_total", (("result", "error"),))) == 1)
        assert d.image(small.ref)["state"] == "present" and d.get("/readyz?list=1")[0] == 200

        m = d.metrics()
        assert m[("puller_pulls_total", (("result", "success"),))] == 2
        assert fetched_bytes(m) == sum(app.blobs.values()) + sum(small.blobs.values())
        assert m[("puller_image_present", (("image", small.ref),))] == 1
        assert m[("puller_images_present", ())] == 1
        assert d.stop() == 0


def test_moved_tags_are_pulled_again_and_a_failing_image_blocks_nothing(cdn_rig, layout, tmp_path):
    reg, _ = cdn_rig
    skopeo_push(layout["path"], "small", f"{reg.host}/test/moving:v1")
    before = pushed(reg, "test/moving", "v1")
    missing = f"{reg.host}/test/nonexistent:v1"
    with Daemon(tmp_path / "d", {"resolve_interval": 0.5}) as d:
        d.images.set_images([missing, before.ref])
        d.wait_state(before.ref, "present")
        skopeo_push(layout["path"], "app", f"{reg.host}/test/moving:v1")  # the tag moves
        after = pushed(reg, "test/moving", "v1")
        assert after.digest != before.digest
        d.wait_for(lambda: d.image(before.ref)["digest"] == after.digest, what="the moved tag pulled again")
        assert assert_store_holds(d.store, after)["digest"] == after.digest  # the name now points at the new one
        layer = next(iter(after.manifest["layers"]))["digest"]
        (d.store / "blobs" / "sha256" / layer[7:]).unlink()  # as if an image GC had taken it
        d.wait_for(lambda: (d.store / "blobs" / "sha256" / layer[7:]).exists(), what="the removed layer back")
        assert_store_holds(d.store, after)
        d.wait_for(lambda: d.metrics().get(("puller_image_checks_total", ()), 0) >= 1, what="an unchanged check")
        failed = d.image(missing)
        assert failed["state"] == "failed" and "not found" in failed["error"]
        time.sleep(3)
        failures = d.metrics()[("puller_pulls_total", (("result", "failure"),))]
        assert 1 <= failures <= 3  # backing off (2 s, 4 s, ...), not retried every tick
        assert d.get("/readyz?list=1")[0] == 503  # the list is not present ...
        assert d.get("/readyz")[0] == 200  # ... but the daemon serves: a failing image holds no rollout


def test_api_refuses_bad_requests_with_clear_4xx(cdn_rig, tmp_path):
    reg, _ = cdn_rig
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with Daemon(tmp_path / "d", {"api_token_file": str(token)}) as d:
        auth = {"Authorization": "Bearer s3cret"}
        assert d.post("/v1/pull", {"images": ["a/b"]})[0] == 401  # no token
        assert d.post("/v1/pull", {"images": ["a/b"]}, headers={"Authorization": "Bearer nope"})[0] == 401
        assert d.get("/v1/images")[0] == 401
        assert d.get("/healthz")[0] == 200 and d.get("/metrics")[0] == 200  # probes and scrapes stay open
        cases = [
            (b"{not json", 400, "not valid JSON"),
            (b"[]", 400, "JSON object"),
            (b'{"images": ["a/b"], "colour": 1}', 400, "unknown field(s): colour"),
            (b'{"images": []}', 400, "non-empty list"),
            (b'{"images": ["docker.io/UPPER/case"]}', 400, "must be lowercase"),
            (b'{"images": [{"reference": "a/b", "pin": "yes"}]}', 400, "'pin' must be true or false"),
            (b'{"images": [{"reference": "a/b", "platform": "linux"}]}', 400, "images[0]"),
            (b'{"images": ["a/b"], "wait": true, "timeout": -1}', 400, "'timeout'"),
            (b'{"images": ["a/b"], "wait": "yes"}', 400, "'wait'"),
            (json.dumps({"images": ["a/b"] * 65}).encode(), 400, "at most 64"),
            (b'{"images": ["' + b"a" * 70_000 + b'"]}', 413, ""),
        ]
        for raw, status, message in cases:
            got, body = d.post("/v1/pull", raw=raw, headers=auth)
            assert got == status, (raw[:60], got, body)
            if message:
                assert message in body["error"], (raw[:60], body)
        got, body = d.post("/v1/pull", raw=b"x", headers={**auth, "Content-Type": "text/plain"})
        assert got == 415 and "application/json" in body["error"]
        assert d.get("/v1/images", headers=auth)[1]["images"] == []  # nothing bad got in

        missing = f"{reg.host}/test/nonexistent:v1"
        got, body = d.post("/v1/pull", {"images": [missing], "wait": True, "timeout": 60}, headers=auth)
        assert got == 502 and body["images"][0]["state"] == "failed" and "not found" in body["images"][0]["error"]
        m = d.metrics()
        assert m[("puller_pulls_total", (("result", "failure"),))] == 1


def test_api_status_while_pulling_wait_and_timeout(slow_rig, tmp_path):
    reg, _ = slow_rig
    big = pushed(reg, "test/big", "v1")
    size = sum(big.blobs.values())
    with Daemon(tmp_path / "d", {"connections": 3}) as d:  # 3 x 1 MB/s: about 8 s for 24 MiB
        got, body = d.post("/v1/pull", {"images": [big.ref]})
        assert got == 202 and body["images"][0]["state"] in ("absent", "pulling")
        view = d.wait_for(lambda: (i := d.image(big.ref)) and i.get("done", 0) > 0 and i, what="bytes done")
        assert view["state"] == "pulling" and view["total"] == size and view["done"] < size
        assert d.get("/readyz?list=1")[0] == 200  # the list's readiness is about the list (empty), not API requests

        got, body = d.post("/v1/pull", {"images": [big.ref], "wait": True, "timeout": 0.5})
        assert got == 504 and body["images"][0]["state"] == "pulling"
        got, body = d.post("/v1/pull", {"images": [big.ref], "wait": True, "timeout": 120})
        assert got == 200 and body["images"][0]["state"] == "present" and body["images"][0]["digest"] == big.digest
        assert_store_holds(d.store, big)
        m = d.metrics()
        assert m[("puller_pulls_total", (("result", "success"),))] == 1  # the two requests shared one pull
        assert fetched_bytes(m) == size
        assert m[("puller_pull_seconds_count", ())] == 1 and m[("puller_pull_seconds_sum", ())] > 2
        assert m[("puller_connections_in_flight", ())] == 0


def test_sigterm_stops_pulls_cleanly_and_the_next_start_resumes(slow_rig, tmp_path):
    reg, _ = slow_rig
    big = pushed(reg, "test/big", "v1")
    size = sum(big.blobs.values())
    d = Daemon(tmp_path / "d", {"connections": 3})
    d.images.set_images([big.ref])
    with d:
        d.wait_for(lambda: (i := d.image(big.ref)) and i.get("done", 0) > 4_000_000, what="some bytes")
        assert d.stop() == 0  # SIGTERM: a clean stop, exit 0
    assert staged_files(d.store), "verified ranges are kept for the next start"
    with d:
        d.wait_state(big.ref, "present", timeout=120)
        fetched = fetched_bytes(d.metrics())
        assert 0 < fetched < size - 4_000_000  # resumed, not started over
    assert_store_holds(d.store, big)


def test_warmup_waits_for_every_node_and_names_the_laggard(slow_rig, tmp_path):
    reg, _ = slow_rig
    big = pushed(reg, "test/big", "v1")
    fast = {"connections": 24}  # 24 x 1 MB/s: about 1 s
    slow = {"connections": 1}  # 1 MB/s: about 25 s
    with (
        Daemon(tmp_path / "a", dict(fast), env={"NODE_NAME": "node-a"}) as a,
        Daemon(tmp_path / "b", dict(fast), env={"NODE_NAME": "node-b"}) as b,
        Daemon(tmp_path / "c", dict(slow), env={"NODE_NAME": "node-c"}) as c,
    ):
        endpoints = ",".join(x.url for x in (a, b, c))
        r = run_puller("warmup", big.ref, "--endpoints", endpoints, "--wait", "--timeout", "6")
        assert r.returncode == 12, r.stderr
        assert "timed out after 6 s; lagging: node-c (pulling" in r.stderr
        table = r.stdout.splitlines()
        assert table[0].split() == ["NODE", big.ref]
        rows = {line.split()[0]: line.split(None, 1)[1] for line in table[1:]}
        assert rows["node-a"] == rows["node-b"] == "present" and rows["node-c"].startswith("pulling")

        r = run_puller("warmup", big.ref, "--endpoints", endpoints, "--wait", "--timeout", "120")
        assert r.returncode == 0, r.stderr
        assert {line.split()[1] for line in r.stdout.splitlines()[1:]} == {"present"}
        for d in (a, b, c):
            assert_store_holds(d.store, big)

        # On a terminal: the live table (rich), then the final one. `script` gives warmup a pseudo-terminal.
        tty = subprocess.run(
            [
                "script",
                "-qec",
                f"{sys.executable} -m puller warmup {big.ref} --endpoints {endpoints} --wait",
                "/dev/null",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "160", "TERM": "xterm"},
        )
        assert tty.returncode == 0 and "┏━" in tty.stdout and "node-c" in tty.stdout, tty.stdout  # the rich table

        r = run_puller("warmup", big.ref, "--endpoints", endpoints + ",http://127.0.0.1:1")  # no --wait
        assert r.returncode == 12 and "1 daemon(s) did not take the request: 127.0.0.1:1" in r.stderr
        r = run_puller("warmup", "Bad Ref", "--endpoints", endpoints)
        assert r.returncode == 2


def test_warmup_in_waves_asks_the_rest_only_once_the_first_wave_holds_the_images(slow_rig, layout, tmp_path):
    """``--first-wave 1``: node-a (first listed) is asked alone; node-b and node-c are asked once it holds the
    image (the rest then find it on their peers through a P2P mirror). Bad wave sizes are exit 2."""
    reg, _ = slow_rig
    skopeo_push(layout["path"], "app", f"{reg.host}/test/app:v1")
    app = pushed(reg, "test/app", "v1")
    with (
        Daemon(tmp_path / "a", {"connections": 2}, env={"NODE_NAME": "node-a"}) as a,  # about 6 s
        Daemon(tmp_path / "b", {"connections": 24}, env={"NODE_NAME": "node-b"}) as b,
        Daemon(tmp_path / "c", {"connections": 24}, env={"NODE_NAME": "node-c"}) as c,
    ):
        endpoints = ",".join(x.url for x in (a, b, c))

        def state(d: Daemon) -> str | None:
            views = {i["reference"]: i for i in d.get("/v1/images")[1]["images"]}
            return views.get(app.ref, {}).get("state")

        warmup = subprocess.Popen(
            [*PULLER, "warmup", app.ref, "--endpoints", endpoints, "--wait", "--first-wave", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen_a_alone = False
        while warmup.poll() is None:
            later = (state(b), state(c))  # read before node-a: node-a was present before they were asked
            first = state(a)
            if first != "present":
                assert later == (None, None), (first, later)
                seen_a_alone = seen_a_alone or first == "pulling"
            time.sleep(0.2)
        _, err = warmup.communicate()
        assert warmup.returncode == 0, err
        assert seen_a_alone
        assert "next wave" in err  # the table said why node-b and node-c waited
        for d in (a, b, c):
            assert_store_holds(d.store, app)
        for bad in ("0", "0%", "150%", "some"):
            r = run_puller("warmup", app.ref, "--endpoints", endpoints, "--first-wave", bad)
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert "--first-wave" in r.stderr


def test_startup_taint_removed_once_the_list_is_present(direct_registry, tmp_path):
    app = pushed(direct_registry, "test/app", "v1")
    with KubeStandIn(tmp_path) as kube:
        kube.add_node("node-1", [OTHER_TAINT, TAINT])
        d = Daemon(tmp_path / "d", {"startup_taint": TAINT["key"]}, env={"NODE_NAME": "node-1", **kube.env})
        d.images.set_images([app.ref])
        with d:
            d.wait_for(lambda: kube.nodes["node-1"]["spec"]["taints"] == [OTHER_TAINT], what="taint removed")
            assert d.image(app.ref)["state"] == "present"
            assert d.metrics()[("puller_startup_taint_removed_total", (("reason", "present"),))] == 1
        patches = [body for verb, _, body in kube.calls if verb == "PATCH"]
        assert patches == [
            [
                {"op": "test", "path": "/spec/taints/1/key", "value": TAINT["key"]},
                {"op": "remove", "path": "/spec/taints/1"},
            ]
        ]
        assert not kube.unexpected


def test_startup_taint_removed_at_the_deadline_when_the_registry_fails(direct_registry, tmp_path):
    missing = f"{direct_registry.host}/test/nonexistent:v1"
    with KubeStandIn(tmp_path) as kube:
        kube.add_node("node-1", [TAINT])
        settings = {"startup_taint": TAINT["key"], "startup_deadline": 2}
        d = Daemon(tmp_path / "d", settings, env={"NODE_NAME": "node-1", **kube.env})
        d.images.set_images([missing])
        with d:
            d.wait_for(lambda: kube.nodes["node-1"]["spec"]["taints"] == [], what="taint removed at the deadline")
            assert d.image(missing)["state"] == "failed"
            assert d.metrics()[("puller_startup_taint_removed_total", (("reason", "deadline"),))] == 1
            status, text = d.get("/readyz?list=1")
            assert status == 503 and missing in text
        assert "deadline of 2 s passed with" in d.log.read_text()
        assert not kube.unexpected


def test_warmup_finds_daemons_through_the_kubernetes_api(direct_registry, tmp_path):
    app = pushed(direct_registry, "test/app", "v1")
    labels = {"app.kubernetes.io/name": "puller"}
    with KubeStandIn(tmp_path) as kube:
        first = Daemon(tmp_path / "a", {}, env={"NODE_NAME": "node-a"}, host="127.0.0.2")
        port = first.port
        second = Daemon(tmp_path / "b", {"port": port}, env={"NODE_NAME": "node-b"}, host="127.0.0.3")
        kube.add_pod("puller", "puller-a", "node-a", "127.0.0.2", labels)
        kube.add_pod("puller", "puller-b", "node-b", "127.0.0.3", labels)
        kube.add_pod("puller", "puller-c", "node-c", "127.0.0.4", labels, phase="Pending")  # not asked
        kube.add_pod("puller", "other", "node-a", "127.0.0.5", {"app": "other"})  # not selected
        with first, second:
            r = run_puller("warmup", app.ref, "--wait", "--port", str(port), "--timeout", "60", env=kube.env)
            assert r.returncode == 0, r.stderr
            assert [line.split() for line in r.stdout.splitlines()[1:]] == [
                ["node-a", "present"],
                ["node-b", "present"],
            ]
            # The headless Service's DNS records (here a name that resolves to one daemon's address).
            r = run_puller("warmup", app.ref, "--wait", "--service", "127.0.0.3", "--port", str(port))
            assert r.returncode == 0 and r.stdout.splitlines()[1].split() == ["node-b", "present"], r.stderr
        gets = [urllib.parse.unquote(path) for verb, path, _ in kube.calls if verb == "GET"]
        assert gets == ["/api/v1/namespaces/puller/pods?labelSelector=app.kubernetes.io/name=puller"]
        assert not kube.unexpected

        r = run_puller("warmup", app.ref, "--namespace", "elsewhere", env=kube.env)
        assert r.returncode == 2 and "no puller daemons found" in r.stderr
        r = run_puller("warmup", app.ref, env={**kube.env, "KUBECONFIG": str(tmp_path / "missing")})
        assert r.returncode == 11 and "no Kubernetes API access" in r.stderr


def test_daemon_refuses_a_bad_config(tmp_path):
    config = tmp_path / "puller.yaml"
    config.write_text("listen: nowhere\n")
    r = run_puller("daemon", "--config", str(config))
    assert r.returncode == 2 and "listen must be HOST:PORT" in r.stderr
    config.write_text("listen: 127.0.0.1:1\n")
    r = run_puller("daemon", "--config", str(config), env={"PULLER_PARALLEL_PULLS": "1.5"})
    assert r.returncode == 2 and "PULLER_PARALLEL_PULLS" in r.stderr and "whole number" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_api_is_closed_by_default(tmp_path):
    """A listen address other hosts reach needs a token (or an explicit opt-out); the default is loopback; pinning
    through the API needs api_allow_pin."""
    assert config.Settings().listen_is_loopback
    for address, loopback in (("127.0.0.1:1", True), ("[::1]:1", True), ("localhost:1", True), ("0.0.0.0:1", False)):
        assert config.apply(config.Settings(), {"listen": address}).listen_is_loopback is loopback
    cfg = tmp_path / "puller.yaml"
    cfg.write_text(f"images_file: {tmp_path / 'list'}\nstore: oci:{tmp_path / 'store'}\n")
    r = run_puller("daemon", "--config", str(cfg), "--listen", "0.0.0.0:8470")  # refused before it binds
    assert r.returncode == 2 and "no api_token_file is set" in r.stderr and "Traceback" not in r.stderr
    with Daemon(tmp_path / "d") as d:
        got, body = d.post("/v1/pull", {"images": [{"reference": "a/b", "pin": True}]})
        assert got == 403 and "api_allow_pin" in body["error"]
        assert d.image("docker.io/a/b:latest") is None  # refused whole: nothing was asked
    with Daemon(tmp_path / "e", {"api_allow_pin": True}) as d:
        assert d.post("/v1/pull", {"images": [{"reference": "a/b", "pin": True}]})[0] == 202
    # probe_listen: the probes and metrics alone, without the token (what a NetworkPolicy can open to all).
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    probes = free_port()
    with Daemon(tmp_path / "f", {"api_token_file": str(token), "probe_listen": f"127.0.0.1:{probes}"}) as d:
        url = f"http://127.0.0.1:{probes}"
        assert http("GET", url + "/healthz")[0] == 200 and http("GET", url + "/readyz")[0] == 200
        assert http("GET", url + "/metrics")[0] == 200
        assert http("GET", url + "/v1/images")[0] == 404  # the API is not there, token or not
        assert http("POST", url + "/v1/pull", {"images": ["a/b"]}, headers={"Authorization": "Bearer s3cret"})[0] == 404
        assert d.get("/v1/images")[0] == 401 and d.get("/healthz")[0] == 200  # the API port as before


def test_daemon_keeps_images_in_containerd_pinned(containerd, direct_registry, tmp_path):
    """The DaemonSet's configuration: the containerd store, images pinned so kubelet's image GC keeps them."""
    app = pushed(direct_registry, "test/app", "v1")
    namespace = "daemon-test"
    settings = {
        "store": "containerd",
        "containerd_address": str(containerd.socket),
        "namespace": namespace,
        "staging_dir": str(tmp_path / "staging"),
    }
    d = Daemon(tmp_path / "d", settings)
    d.images.set_images([{"reference": app.ref, "pin": True}])
    with d:
        d.wait_state(app.ref, "present", timeout=120)
        listing = subprocess.run(
            containerd.ctr("-n", namespace, "images", "ls"), capture_output=True, text=True, check=True
        ).stdout
        (row,) = [line.split() for line in listing.splitlines()[1:] if line.startswith(app.ref + " ")]
        assert row[2] == app.digest and "io.cri-containerd.pinned=pinned" in row[-1]
        check = subprocess.run(
            containerd.ctr("-n", namespace, "images", "check"), capture_output=True, text=True, check=True
        ).stdout
        assert "complete" in next(line for line in check.splitlines() if line.startswith(app.ref + " "))
        assert d.stop() == 0


def test_startup_gate_with_the_in_cluster_service_account(direct_registry, tmp_path):
    """The path a DaemonSet pod takes: $KUBERNETES_SERVICE_HOST/PORT, the service account's token and CA at the
    standard path, HTTPS with the CA verified."""
    import shutil
    from pathlib import Path

    from .rig import make_tls_cert

    account = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    assert not account.exists(), "this machine has a real service account; not overwriting it"
    ca, cert, key = make_tls_cert(tmp_path)
    app = pushed(direct_registry, "test/app", "v1")
    created = next(p for p in [account, *account.parents] if p.parent.exists())  # the first missing ancestor
    try:
        account.mkdir(parents=True)
        (account / "token").write_text("in-cluster-token")
        shutil.copy(ca, account / "ca.crt")
        (account / "namespace").write_text("puller")
        with KubeStandIn(tmp_path, token="in-cluster-token", tls=(cert, key)) as kube:
            kube.add_node("node-1", [TAINT])
            env = {
                "NODE_NAME": "node-1",
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": str(kube.port),
            }
            d = Daemon(tmp_path / "d", {"startup_taint": TAINT["key"]}, env=env)
            d.images.set_images([app.ref])
            with d:
                d.wait_for(lambda: kube.nodes["node-1"]["spec"]["taints"] == [], what="taint removed in-cluster")
            assert not kube.unexpected
    finally:
        shutil.rmtree(created, ignore_errors=True)


def test_metrics_move_while_a_pull_runs(slow_rig, tmp_path):
    """Bytes and a per-image progress gauge while the pull runs (not only when it ends); process metrics; no
    _created series."""
    reg, _ = slow_rig
    p = pushed(reg, "test/big", "v1")
    with Daemon(tmp_path / "d", {"connections": 2}) as d:  # 2 MB/s: about 12 s for the 24 MiB layer
        d.images.set_images([p.ref])

        def counted_while_pulling():
            m = d.metrics()
            done = [v for (name, _), v in m.items() if name == "puller_pull_done_bytes"]
            pulling = (d.image(p.ref) or {}).get("state") == "pulling"
            return pulling and fetched_bytes(m) > 0 and done and done[0] > 0 and m

        m = d.wait_for(counted_while_pulling, 60, "bytes counted while the pull runs")
        assert ("process_resident_memory_bytes", ()) in m
        assert not [name for name, _ in m if name.endswith("_created")]
        d.wait_state(p.ref, "present", timeout=120)
        final = d.metrics()
        assert fetched_bytes(final) >= sum(p.blobs.values())
        assert not [v for (name, _), v in final.items() if name == "puller_pull_done_bytes"]  # none in flight


def test_json_logs_one_object_per_line_with_an_event_per_pull(cdn_rig, tmp_path):
    reg, _ = cdn_rig
    small = pushed(reg, "test/small", "v1")
    missing = f"{reg.host}/test/nonexistent:v1"
    with Daemon(tmp_path / "d", {"log_format": "json"}) as d:
        d.images.set_images([small.ref, missing])
        d.wait_state(small.ref, "present")
        d.wait_state(missing, "failed")
        assert d.stop() == 0
    lines = [line for line in d.log.read_text().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in events)
    pulls = {(e["image"], e["result"]): e for e in events if e.get("event") == "pull"}
    ok = pulls[(small.ref, "success")]
    assert ok["digest"] == small.digest and ok["bytes"] == sum(small.blobs.values()) and ok["seconds"] >= 0
    assert sum(ok["hosts"].values()) == ok["bytes"]
    failed = pulls[(missing, "failure")]
    assert failed["cause"] == "NotFound" and "not found" in failed["error"]


def test_the_list_waits_for_every_cluster_source_and_says_which(tmp_path):
    """A source that cannot be read (here: no API access at all) keeps the list unready, named in /readyz?list=1,
    while the daemon serves."""
    settings = {"workload_selector": "puller.io/prefetch=true"}
    with Daemon(tmp_path / "d", settings, env={"KUBECONFIG": str(tmp_path / "missing")}) as d:
        d.images.set_images([])

        def named():
            answer = d.get("/readyz?list=1")
            return answer if "no Kubernetes API access" in str(answer[1]) else None

        status, text = d.wait_for(named, what="the unread source named")
        assert status == 503 and "image source pods in all namespaces matching puller.io/prefetch=true" in text
        assert d.get("/readyz")[0] == 200  # serving all the while


def test_entries_for_every_node_are_pulled_while_the_node_labels_cannot_be_read(cdn_rig, tmp_path):
    """The node's labels are unreadable (here: no API access): the entries without a nodeSelector are pulled, the
    others wait, and the list is not complete (the start-up gate would wait), with the reason in /readyz?list=1."""
    reg, _ = cdn_rig
    small, app = pushed(reg, "test/small", "v1"), pushed(reg, "test/app", "v1")
    settings = {"node_name": "gpu-7"}
    with Daemon(tmp_path / "d", settings, env={"KUBECONFIG": str(tmp_path / "missing")}) as d:
        d.images.set_images([small.ref, {"reference": app.ref, "nodeSelector": {"accelerator": "gpu"}}])
        d.wait_state(small.ref, "present")
        status, text = d.get("/readyz?list=1")
        assert status == 503 and "cannot read the labels of node gpu-7" in text
        assert d.image(app.ref) is None  # not known to be meant for this node
