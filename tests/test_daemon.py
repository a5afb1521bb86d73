"""Daemon mode for real: `puller daemon` processes against real registries and the OCI layout store, its HTTP
API over loopback, `puller warmup` against several daemons, and the Kubernetes calls against a stand-in."""

from __future__ import annotations

from .conftest import assert_store_holds, pushed
from .daemon_rig import Daemon


def test_daemon_follows_the_image_list_through_symlink_swaps(cdn_rig, tmp_path):
    reg, _ = cdn_rig
    app, small = pushed(reg, "test/app", "v1"), pushed(reg, "test/small", "v1")
    with Daemon(tmp_path / "d") as d:
        d.images.set_images([app.ref])
        got = d.wait_state(app.ref, "present")
        assert got["digest"] == app.digest and got["sources"] == ["list"]
        assert_store_holds(d.store, app)
        assert d.get("/readyz")[0] == 200

        d.images.set_images([{"reference": small.ref, "pin": True}])  # kubelet's atomic ..data swap
        d.wait_state(small.ref, "present")
        d.wait_for(lambda: d.image(app.ref) is None, what="the removed image no longer reported")
        assert_store_holds(d.store, small)

        d.images.write("images: [this is: not, a list\n")  # a broken version: refused, the last good list stays
        d.wait_for(lambda: d.metrics().get(("puller_image_list_reloads_total", (("result", "error"),))) == 1)
        assert d.image(small.ref)["state"] == "present" and d.get("/readyz")[0] == 200

        m = d.metrics()
        assert m[("puller_pulls_total", (("result", "success"),))] == 2
        assert m[("puller_fetched_bytes_total", ())] == sum(app.blobs.values()) + sum(small.blobs.values())
        assert m[("puller_image_present", (("image", small.ref),))] == 1
        assert m[("puller_images_present", ())] == 1
        assert d.stop() == 0
