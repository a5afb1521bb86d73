"""deploy/build-image, the node image built without Docker, against deploy/Dockerfile: the same Python minor and
the same packages at the same versions (what the Dockerfile's pip command resolves to here, against what the built
image holds). The image itself runs as the DaemonSet's pods in tests/test_kube.py."""

from __future__ import annotations

import email.parser
import json
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

from .rig import layout_image

ROOT = Path(__file__).parent.parent
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages/"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _layers(layout: Path, tag: str) -> tuple[dict, list[Path]]:
    _, manifest, config = layout_image(layout, tag)
    return config, [layout / "blobs" / "sha256" / layer["digest"][7:] for layer in manifest["layers"]]


def _dockerfile_pip_args() -> list[str]:
    """The arguments of the Dockerfile's ``pip install`` (options that only concern pip's cache left out)."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    run = next(line for line in text.splitlines() if line.startswith("RUN pip install "))
    words = shlex.split(run.removeprefix("RUN pip install ").split("&&")[0])
    return [w for w in words if w != "--no-cache-dir"]


def _dockerfile_resolution() -> dict[str, str]:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-"]
    r = subprocess.run([*cmd, *_dockerfile_pip_args()], cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(r.stdout)
    return {_canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


def _installed(layer: Path) -> dict[str, str]:
    out = {}
    with tarfile.open(layer) as tar:
        for member in tar:
            parts = member.name.removeprefix("./").removeprefix(SITE_PACKAGES).split("/")
            if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "METADATA":
                f = tar.extractfile(member)
                assert f is not None
                meta = email.parser.BytesParser().parse(f, headersonly=True)
                out[_canonical(meta["Name"])] = meta["Version"]
    return out


def test_the_debian_build_installs_the_packages_of_the_dockerfile_at_the_same_versions(node_image: Path):
    config, (debian, puller) = _layers(node_image, "v1")
    installed = _installed(puller)
    resolved = _dockerfile_resolution()
    assert "puller" in installed and "aiohttp" in installed, installed
    assert installed == resolved
    # The same Python minor as the Dockerfile's base, whose wheels pip picked.
    base = re.search(r"^FROM python:(\d+\.\d+)-", (ROOT / "deploy" / "Dockerfile").read_text(), re.M)
    assert base, "the Dockerfile's base is no longer python:X.Y"
    with tarfile.open(debian) as tar:
        names = {m.name.removeprefix("./") for m in tar}
    assert f"usr/bin/python{base[1]}" in names
    assert config["config"]["Entrypoint"] == ["puller"]
