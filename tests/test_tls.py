"""TLS is verified by default, also on loopback; a CA from the config makes a private registry trusted; skipping
verification is per host and explicit. A certificate error never falls back to plain HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_puller
from .rig import Registry, make_tls_cert, skopeo_push


@pytest.fixture(scope="module")
def tls_registry(workdir: Path, layout):
    root = workdir / "tls"
    root.mkdir()
    ca, cert, key = make_tls_cert(root)
    with Registry(root / "registry", tls=(cert, key)) as reg:
        skopeo_push(layout["path"], "small", f"{reg.host}/test/small:v1")
        yield reg, ca


def test_untrusted_certificate_is_refused(tls_registry, tmp_path: Path):
    reg, _ = tls_registry
    r = run_puller("pull", f"{reg.host}/test/small:v1", "--store", str(tmp_path))
    assert r.returncode == 7, r.stderr
    assert "certificate not trusted" in r.stderr and "ca_file" in r.stderr


def test_ca_file_makes_it_trusted(tls_registry, tmp_path: Path):
    reg, ca = tls_registry
    cfg = tmp_path / "puller.yaml"
    cfg.write_text(f"ca_file: {ca}\n")
    r = run_puller("pull", f"{reg.host}/test/small:v1", "--store", str(tmp_path / "s"), "--config", str(cfg))
    assert r.returncode == 0, r.stderr


def test_insecure_skip_verify_is_explicit_and_per_host(tls_registry, tmp_path: Path):
    reg, _ = tls_registry
    r = run_puller("pull", f"{reg.host}/test/small:v1", "--store", str(tmp_path), "--insecure-skip-verify")
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "puller.yaml"
    cfg.write_text("insecure_skip_verify: ['other.example:5000']\n")
    r = run_puller("pull", f"{reg.host}/test/small:v1", "--store", str(tmp_path / "s"), "--config", str(cfg))
    assert r.returncode == 7  # another host's exception does not cover this one
