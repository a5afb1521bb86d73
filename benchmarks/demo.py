"""Offline demo: a local registry whose blobs come from a throttled CDN, a generated image, and puller against
one stream of the same bytes.

    python3 benchmarks/demo.py [--size-mib 128] [--rate-mbps 8] [--store ./oci-store]

Starts the CNCF distribution registry on 127.0.0.1, redirecting blob GETs to nginx that sends at most
``--rate-mbps`` MB/s per connection (the shape of a registry behind a blob CDN), pushes a generated one-layer
image with skopeo, pulls it with ``puller pull`` into the store, then times ``curl`` fetching the same layer
over one connection, as containerd or skopeo would.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.rig import LayoutWriter, Nginx, Registry, skopeo_push, tempdir

MIB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--rate-mbps", type=float, default=8.0, help="per-connection cap of the CDN, MB/s")
    ap.add_argument("--store", default="./oci-store")
    args = ap.parse_args()
    with tempdir("puller-demo-") as d:
        d.chmod(0o755)
        print(f"generating a {args.size_mib} MiB one-layer image ...", flush=True)
        LayoutWriter(d / "layout").add_image("demo", [args.size_mib * MIB], seed=42)
        cdn = Nginx(d / "nginx", d / "registry" / "storage", limit_rate=int(args.rate_mbps * 1e6))
        with cdn, Registry(d / "registry", redirect_base=cdn.url + "/") as reg:
            ref = f"{reg.host}/demo/app:latest"
            skopeo_push(d / "layout", "demo", ref)
            print(f"registry {reg.host}, blob CDN {cdn.url} capped at {args.rate_mbps:g} MB/s per connection")
            print(f"$ puller pull {ref} --store oci:{args.store}", flush=True)
            t = time.monotonic()
            r = subprocess.run(
                [sys.executable, "-m", "puller.cli", "pull", ref, "--store", f"oci:{args.store}", "--json"],
                capture_output=True,
                text=True,
            )
            wall = time.monotonic() - t
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return r.returncode
            done = json.loads(r.stdout.splitlines()[-1])
            _, manifest = reg.manifest("demo/app", "latest")
            layer = manifest["layers"][0]["digest"]
            url = f"{cdn.url}/docker/registry/v2/blobs/sha256/{layer[7:9]}/{layer[7:]}/data"
            print("$ curl (one stream) of the same layer", flush=True)
            t = time.monotonic()
            subprocess.run(["curl", "-sSf", "-o", str(d / "one-stream"), url], check=True)
            single = time.monotonic() - t
    size = done["bytes"]
    print(
        f"\npuller:     {wall:7.2f} s  {size / 1e6 / wall:8.1f} MB/s  (whole command; {done['seconds']:.2f} s "
        f"from resolve to commit)  digest {done['digest']}"
    )
    print(f"one stream: {single:7.2f} s  {size / 1e6 / single:8.1f} MB/s")
    if done["fetched"] < size:  # the same seeded image, pulled by an earlier run: no comparison to make
        print(
            f"{args.store} already held {(size - done['fetched']) / 1e6:.0f} of {size / 1e6:.0f} MB of the image "
            f"(an earlier run); remove it for a cold pull. Image in {args.store} "
            f"(skopeo inspect oci:{args.store}:{ref})"
        )
        return 0
    print(f"puller was {single / wall:.1f}x faster; image is in {args.store} (skopeo inspect oci:{args.store}:{ref})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
