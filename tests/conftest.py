"""Shared fixtures: real registries (CNCF distribution), nginx as blob CDN, images generated and pushed here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .kube import KUBE_BINS, KUBE_RELEASES
from .rig import (
    CONTAINERD_BINS,
    CRICTL,
    TEST_BIN,
    Containerd,
    CRIConfig,
    Image,
    LayoutWriter,
    Nginx,
    Registry,
    TokenIssuer,
    relabel,
    sha256_file,
    skopeo_push,
    tempdir,
)

REQUIRED = ("docker-registry", "skopeo", "nginx", "htpasswd", "containerd", "ctr", "mmdebstrap")
MIB = 1024 * 1024
BUSYBOX = (Path("/bin/busybox").read_bytes(), 0o755)  # busybox-static: runs in any image


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    missing += [str(b / "containerd") for b in CONTAINERD_BINS.values() if not (b / "containerd").exists()]
    kube = [b / name for b in KUBE_RELEASES.values() for name in KUBE_BINS]
    tools = (CRICTL, TEST_BIN / "etcd", TEST_BIN / "spegel", TEST_BIN / "helm", *kube)
    missing += [str(p) for p in tools if not p.exists()]
    if missing:
        # Real parts are the point of these tests: fail loudly rather than skip.
        raise pytest.UsageError(f"missing test tools {missing}: run bash .ci/install-test")


@dataclass
class Pushed:
    """An image in a registry: reference and what the registry's manifest says."""

    ref: str
    digest: str  # manifest (or index) digest as the registry serves it
    manifest: dict
    blobs: dict[str, int]  # config + layers of the (platform) manifest: digest -> size


def pushed(registry: Registry, repo: str, tag: str, auth: str | None = None) -> Pushed:
    digest, manifest = registry.manifest(repo, tag, auth)
    blobs = {}
    if "layers" in manifest:
        blobs = {d["digest"]: d["size"] for d in [manifest["config"], *manifest["layers"]]}
    return Pushed(f"{registry.host}/{repo}:{tag}", digest, manifest, blobs)


@pytest.fixture(scope="session")
def workdir():
    with tempdir("puller-tests-") as d:
        os.chmod(d, 0o755)
        yield d


@pytest.fixture(scope="session")
def layout(workdir: Path) -> dict[str, object]:
    """One OCI layout holding every test image, written once per session."""
    lw = LayoutWriter(workdir / "layout")
    return {
        "path": workdir / "layout",
        "app": lw.add_image("app", [2 * MIB, 9 * MIB + 12345, 100], seed=1),
        "big": lw.add_image("big", [24 * MIB], seed=2),
        "multi": lw.add_index("multi", [("linux", "amd64"), ("linux", "arm64")], [MIB, 3 * MIB], seed=3),
        "small": lw.add_image("small", [300_000], seed=4),
        # a static busybox: "pause" is the CRI sandbox image, "run" what containers run
        "pause": lw.add_files_image("pause", {"/bin/busybox": BUSYBOX}, ("/bin/busybox", "sleep", "2147483647")),
        "run": lw.add_files_image("run", {"/bin/busybox": BUSYBOX}),
    }


NODE_IMAGE_CACHE = TEST_BIN.parent / "node-image-cache"  # deploy/build-image's Debian layer, kept between runs


@pytest.fixture(scope="session")
def node_image(workdir: Path) -> Path:
    """puller's node image built by deploy/build-image from this tree, as an OCI layout: tag v1, and v2, the same
    image with one more label (a new image for a rolling update)."""
    out = workdir / "node-image"
    build = [sys.executable, str(Path(__file__).parent.parent / "deploy" / "build-image"), str(out), "--tag", "v1"]
    subprocess.run([*build, "--cache", str(NODE_IMAGE_CACHE)], check=True, capture_output=True)
    relabel(out, "v1", "v2", {"dev.puller.test": "v2"})
    return out


@pytest.fixture(scope="session")
def cdn_rig(workdir: Path, layout):
    """A registry that redirects blob GETs (307) to nginx serving its storage: the registry + CDN shape."""
    root = workdir / "cdn-rig"
    cdn = Nginx(root / "nginx", root / "registry" / "storage")
    with cdn, Registry(root / "registry", redirect_base=cdn.url + "/") as reg:
        path = layout["path"]
        skopeo_push(path, "app", f"{reg.host}/test/app:v1")
        skopeo_push(path, "multi", f"{reg.host}/test/multi:v1", all_images=True)
        skopeo_push(path, "app", f"{reg.host}/test/docker:v1", fmt="v2s2")
        skopeo_push(path, "small", f"{reg.host}/test/small:v1")
        skopeo_push(path, "pause", f"{reg.host}/test/pause:v1")
        yield reg, cdn


@pytest.fixture(scope="session")
def direct_registry(workdir: Path, layout):
    """A registry serving blobs itself (no redirect)."""
    with Registry(workdir / "direct") as reg:
        skopeo_push(layout["path"], "app", f"{reg.host}/test/app:v1")
        yield reg


@pytest.fixture()
def slow_rig(workdir: Path, layout, tmp_path: Path):
    """A 24 MiB single-layer image behind a CDN that sends 1 MB/s per connection."""
    root = tmp_path / "slow"
    cdn = Nginx(root / "nginx", root / "registry" / "storage", limit_rate=1_000_000)
    with cdn, Registry(root / "registry", redirect_base=cdn.url + "/") as reg:
        skopeo_push(layout["path"], "big", f"{reg.host}/test/big:v1")
        yield reg, cdn


@pytest.fixture(scope="session")
def containerds(workdir: Path, cdn_rig):
    """containerd by version, started when first asked for and kept for the session, each with its own root,
    state and socket, and its CRI plugin on (sandbox image: test/pause:v1 of cdn_rig's registry, reached over
    plain HTTP)."""
    reg, _ = cdn_rig
    started: dict[str, Containerd] = {}

    def get(version: str) -> Containerd:
        if version not in started:
            root = workdir / f"containerd-{version}"
            hosts = root / "certs.d"
            (hosts / reg.host).mkdir(parents=True, exist_ok=True)
            (hosts / reg.host / "hosts.toml").write_text(
                f'server = "http://{reg.host}"\n[host."http://{reg.host}"]\n  capabilities = ["pull", "resolve"]\n'
            )
            cri = CRIConfig(f"{reg.host}/test/pause:v1", hosts)
            started[version] = Containerd(root, version=version, cri=cri).__enter__()
        return started[version]

    yield get
    for c in started.values():
        c.__exit__(None, None, None)


@pytest.fixture(scope="session", params=sorted(CONTAINERD_BINS))
def containerd(request, containerds):
    """One containerd of each tested version (see ``containerds``)."""
    return containerds(request.param)


PULLER = (sys.executable, "-m", "puller")  # the installed package, whatever PATH says


def start_puller(*args: str, env: dict | None = None, prefix: list[str] | None = None, **popen) -> subprocess.Popen:
    """puller as a background process (to be killed or signalled mid-pull); ``prefix`` runs it through a wrapper
    (``ip netns exec NAME``)."""
    return subprocess.Popen([*(prefix or []), *PULLER, *args], env={**os.environ, **(env or {})}, **popen)


def run_puller(
    *args: str, env: dict | None = None, timeout: float = 240, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    """puller run to its end; ``prefix`` runs it through a wrapper (``setpriv ...``)."""
    return subprocess.run(
        [*(prefix or []), *PULLER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_store_holds(store: Path, p: Pushed, name: str | None = None) -> dict:
    """Every blob of ``p`` is in the store with the right size and sha256; index.json names the image."""
    for digest, size in p.blobs.items():
        path = store / "blobs" / "sha256" / digest.split(":")[1]
        assert path.stat().st_size == size, digest
        assert "sha256:" + sha256_file(path) == digest
    index = json.loads((store / "index.json").read_text())
    names = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
    assert (name or p.ref) in names, names.keys()
    return names[name or p.ref]


def staged_files(store: Path) -> list[Path]:
    staging = store / ".puller" / "staging"
    return sorted(p for p in staging.iterdir()) if staging.exists() else []


__all__ = [
    "MIB",
    "Image",
    "Nginx",
    "Pushed",
    "Registry",
    "TokenIssuer",
    "assert_store_holds",
    "pushed",
    "run_puller",
    "staged_files",
]
