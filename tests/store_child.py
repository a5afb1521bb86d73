"""Stores for the conformance suite, opened from a JSON spec, so that a child process opens the same store.

``python -m tests.store_child SPEC SEED SIZE``: opens the store, writes the blob of ``SEED`` and ``SIZE``
(:func:`blob`) in 64 KiB pieces from byte 0, says ``writing`` after the first second of writes and goes on
writing slowly until it is killed (the suite's SIGKILL test).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
import time
from typing import Any

from puller.digest import Digest
from puller.registry.manifest import Descriptor
from puller.stores import Store
from puller.stores.containerd import ContainerdStore
from puller.stores.oci_layout import OCILayoutStore
from puller.stores.overlaybd import OverlaybdStore

LAYER = "application/vnd.oci.image.layer.v1.tar"


def open_store(spec: dict[str, Any]) -> Store:
    kind = spec["kind"]
    if kind == "oci":
        return OCILayoutStore(spec["root"])
    if kind == "overlaybd":
        return OverlaybdStore(spec["config"], cache_dir=spec["cache"], staging_dir=spec["staging"])
    return ContainerdStore(spec["socket"], spec["namespace"], staging_dir=spec["staging"], root=spec["root"])


def blob(seed: int, size: int) -> tuple[Descriptor, bytes]:
    data = random.Random(seed).randbytes(size)
    return Descriptor(LAYER, Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()), size), data


async def _write_until_killed(spec: dict[str, Any], seed: int, size: int) -> None:
    desc, data = blob(seed, size)
    async with open_store(spec) as store, store.writer(desc) as writer:
        await writer.status()
        started, told = time.monotonic(), False
        for offset in range(0, size, 64 * 1024):
            await writer.write_at(offset, [data[offset : offset + 64 * 1024]])
            if not told and time.monotonic() - started > 1.0:
                print("writing", flush=True)
                told = True
            await asyncio.sleep(0.02)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(_write_until_killed(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
