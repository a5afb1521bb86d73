"""What kubelet sees: containerd's CRI plugin, asked with crictl (built from cri-tools), about images puller
prefetched. Runs against every tested containerd version (Debian's 1.6, and 2.3 and 2.4 built from their Go modules)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .conftest import pushed
from .rig import Containerd, Registry, skopeo_push, wait_for
from .test_containerd import NS, ctr, pull


def crictl(c: Containerd, *args: str) -> str:
    r = subprocess.run(c.crictl(*args), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


def cri_image(c: Containerd, ref: str) -> dict | None:
    images = json.loads(crictl(c, "images", "-o", "json"))["images"]
    return next((i for i in images if ref in (i.get("repoTags") or [])), None)


def blob_requests(cdn) -> int:
    return sum(1 for line in cdn.requests() if "/blobs/" in line)


def test_cri_lists_a_prefetched_image_under_tag_and_digest_with_its_size(containerd, cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    p = pushed(reg, "test/app", "v1")
    r = pull(containerd, p.ref, tmp_path)
    assert r.returncode == 0, r.stderr
    # the CRI plugin learns of images from containerd's events: give it a moment
    image = wait_for(lambda: cri_image(containerd, p.ref), 20, "the image in crictl images")
    assert f"{reg.host}/test/app@{p.digest}" in image["repoDigests"]
    assert image["id"] == p.manifest["config"]["digest"]  # CRI's image id is the config digest
    manifest_size = len(
        subprocess.run(containerd.ctr("-n", NS, "content", "get", p.digest), capture_output=True).stdout
    )
    assert int(image["size"]) == sum(p.blobs.values()) + manifest_size
    status = json.loads(crictl(containerd, "inspecti", "-o", "json", p.ref))["status"]
    assert status["id"] == image["id"] and p.ref in status["repoTags"]
    by_digest = json.loads(crictl(containerd, "inspecti", "-o", "json", f"{reg.host}/test/app@{p.digest}"))
    assert by_digest["status"]["id"] == image["id"]


def test_pinned_prefetch_is_pinned_for_cri(containerd, cdn_rig, tmp_path: Path):
    reg, _ = cdn_rig
    p = pushed(reg, "test/small", "v1")
    r = pull(containerd, p.ref, tmp_path, "--pin")
    assert r.returncode == 0, r.stderr
    image = wait_for(lambda: cri_image(containerd, p.ref), 20, "the image in crictl images")
    if containerd.version == "1.6":
        assert not image.get("pinned")  # 1.6's CRI has no pinned images; kubelet's GC does not see the label
    else:
        assert image["pinned"] is True


def test_crictl_pull_of_a_prefetched_image_fetches_no_blob(containerd, cdn_rig, tmp_path: Path):
    reg, cdn = cdn_rig
    p = pushed(reg, "test/multi", "v1")
    r = pull(containerd, p.ref, tmp_path, "--platform", "linux/amd64")
    assert r.returncode == 0, r.stderr
    before = blob_requests(cdn)
    out = crictl(containerd, "pull", p.ref)
    assert "Image is up to date" in out
    wait_for(lambda: cri_image(containerd, p.ref), 20, "the image in crictl images")
    assert blob_requests(cdn) == before  # kubelet's pull of a prefetched image moves no layer byte


def test_a_cri_container_runs_from_a_prefetched_image_with_the_registry_stopped(
    containerd, cdn_rig, layout, tmp_path: Path
):
    """Through CRI, as kubelet starts it: a pod and a container from images puller prefetched (and unpacked: on
    containerd 2.3 and 2.4 by its own applier, while downloading), with the registry stopped."""
    _reg, cdn = cdn_rig
    sandbox = containerd.cri.sandbox_image
    assert pull(containerd, sandbox, tmp_path).returncode == 0  # the pause image is prefetched too
    with Registry(tmp_path / "registry") as own:
        ref = f"{own.host}/test/run:v1"
        skopeo_push(layout["path"], "run", ref)
        r = pull(containerd, ref, tmp_path)
        assert r.returncode == 0, r.stderr
    # on 2.3 and 2.4 the layers were applied while they downloaded, by puller's applier
    unpack = json.loads(r.stdout.strip().splitlines()[-1])["unpack"]
    assert unpack["path"] == ("diff" if containerd.version == "1.6" else "stream"), unpack
    # the image's registry is gone; the sandbox image's must not be asked either
    before = blob_requests(cdn)
    uid = f"puller-{os.getpid()}-{containerd.version}"
    pod = tmp_path / "pod.json"
    pod.write_text(
        json.dumps(
            {
                "metadata": {"name": uid, "namespace": "default", "uid": uid, "attempt": 1},
                "log_directory": str(tmp_path / "logs"),
                "linux": {"security_context": {"namespace_options": {"network": 2}}},  # host network: no CNI
            }
        )
    )
    container = tmp_path / "container.json"
    container.write_text(
        json.dumps(
            {
                "metadata": {"name": "hello"},
                "image": {"image": ref},
                "command": ["/bin/busybox", "sh", "-c", "echo hello from a prefetched image; sleep 60"],
                "log_path": "hello.log",
                "linux": {},
            }
        )
    )
    pod_id = crictl(containerd, "runp", str(pod)).strip()
    try:
        cid = crictl(containerd, "create", "--no-pull", pod_id, str(container), str(pod)).strip()
        crictl(containerd, "start", cid)
        wait_for(
            lambda: "hello from a prefetched image" in crictl(containerd, "logs", cid),
            30,
            "the container's output",
        )
        state = json.loads(crictl(containerd, "inspect", "-o", "json", cid))["status"]["state"]
        assert state == "CONTAINER_RUNNING"
    finally:
        subprocess.run(containerd.crictl("stopp", pod_id), capture_output=True, timeout=120)
        subprocess.run(containerd.crictl("rmp", "-f", pod_id), capture_output=True, timeout=120)
    assert blob_requests(cdn) == before
    assert ref in ctr(containerd, "images", "ls", "-q")
