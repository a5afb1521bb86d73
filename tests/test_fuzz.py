"""Property tests: the parsers that see registry or user input never fail with anything but the project's own
errors. Runs a few thousand cases in the test run; set HYPOTHESIS_PROFILE=long for a longer run."""

from __future__ import annotations

import contextlib
import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from puller.digest import Digest
from puller.errors import PullerError
from puller.reference import Reference
from puller.registry import manifest as mf
from puller.registry.auth import parse_www_authenticate

settings.register_profile("default", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=100_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REF_PIECES = st.lists(
    st.sampled_from([*"abcXYZ019._-:/@[]", "sha256:", "a" * 64, "localhost", "docker.io", "__", "--"]), max_size=24
).map("".join)


@given(REF_PIECES | st.text(max_size=300))
def test_reference_parser(text: str):
    try:
        ref = Reference.parse(text)
    except PullerError:
        return
    # Whatever parses round-trips to itself.
    assert Reference.parse(str(ref)) == ref


@given(st.text(max_size=200) | st.builds(lambda h: f"sha256:{h}", st.text("0123456789abcdefABCDEF./", max_size=70)))
def test_digest_parser(text: str):
    try:
        d = Digest.parse(text)
    except PullerError:
        return
    assert "/" not in d.hex and "." not in d.hex and str(d) == text


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
DESCRIPTOR = st.fixed_dictionaries(
    {
        "mediaType": st.sampled_from([mf.OCI_MANIFEST, mf.DOCKER_MANIFEST, "x/y", 3]),
        "digest": st.sampled_from(["sha256:" + "a" * 64, "sha256:../../x", "md5:00", ""]),
        "size": st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=3),
    },
    optional={"platform": JSON},
)
DOCS = st.fixed_dictionaries(
    {
        "schemaVersion": st.sampled_from([2, 1, "2", None]),
        "mediaType": st.sampled_from([mf.OCI_INDEX, mf.OCI_MANIFEST, mf.DOCKER_LIST, mf.DOCKER_MANIFEST, "nope"]),
    },
    optional={
        "manifests": st.lists(DESCRIPTOR, max_size=4) | JSON,
        "layers": st.lists(DESCRIPTOR, max_size=4) | JSON,
        "config": DESCRIPTOR | JSON,
    },
)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(DOCS | JSON, st.sampled_from([None, mf.OCI_MANIFEST, "text/plain"]))
def test_manifest_parser(doc, content_type):
    try:
        parsed = mf.parse(json.dumps(doc).encode(), content_type)
    except PullerError:
        return
    for d in parsed.manifests if isinstance(parsed, mf.Index) else parsed.blobs:
        assert 0 <= d.size <= mf.MAX_BLOB_SIZE and len(d.digest.hex) in (64, 128)


@given(st.binary(max_size=200))
def test_manifest_parser_bytes(body: bytes):
    with contextlib.suppress(PullerError):
        mf.parse(body, None)


@given(st.text(max_size=300))
def test_www_authenticate_parser(header: str):
    challenge = parse_www_authenticate(header)
    assert challenge is None or challenge.scheme in ("bearer", "basic")


@given(st.text(max_size=120) | st.builds(lambda h, p: f"http://{h}:{p}/x", st.text(max_size=20), st.text(max_size=8)))
def test_redirect_and_realm_urls(text: str):
    from puller.registry.client import checked_url

    try:
        assert checked_url(text, "url") == text
    except PullerError:
        return


@given(JSON)
def test_token_answers(payload):
    from puller.registry.auth import TokenCache

    try:
        TokenCache().put(("realm", "service", "scope", ""), payload) if isinstance(payload, dict) else None
    except PullerError:
        return


@settings(max_examples=300, deadline=None)
@given(JSON | st.fixed_dictionaries({"manifests": JSON}))
def test_index_json_shapes(doc):
    import asyncio
    import tempfile

    from puller.stores.oci_layout import OCILayoutStore

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o700)

        async def go() -> None:
            async with OCILayoutStore(d) as store:
                with open(os.path.join(d, "index.json"), "w") as f:
                    json.dump(doc, f)
                store.read_index()

        with contextlib.suppress(PullerError):
            asyncio.run(go())


@given(JSON | st.fixed_dictionaries({"auths": JSON, "credHelpers": JSON}))
def test_docker_config_shapes(doc):
    import tempfile
    from pathlib import Path

    from puller.registry.auth import CredentialStore

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(doc))
        with contextlib.suppress(PullerError):
            CredentialStore(config_path=path).lookup("example.com")
