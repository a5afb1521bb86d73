"""Progress output: rich bars on a TTY, JSON lines with ``--json``, a few plain lines otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator

from .engine.pull import PullProgress, PullResult

REFRESH_S = 0.2
JSON_INTERVAL_S = 1.0


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@contextlib.asynccontextmanager
async def show(progress: PullProgress, mode: str) -> AsyncIterator[None]:
    """Display ``progress`` while the body runs. ``mode`` is ``tty``, ``json`` or ``plain``."""
    render = {"tty": _rich, "json": _json_lines, "plain": _plain}[mode]
    task = asyncio.ensure_future(render(progress))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _rich(progress: PullProgress) -> None:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[state]}"),
    )
    with Progress(*columns, transient=False, refresh_per_second=10) as bars:
        total_id = bars.add_task(f"[bold]{progress.reference}", total=None, state=progress.state)
        ids: dict[str, TaskID] = {}

        def sync() -> None:
            for digest, b in progress.blobs.items():
                if digest not in ids:
                    ids[digest] = bars.add_task(f"  {digest[7:19]}", total=b.size, state=b.state)
                bars.update(ids[digest], completed=b.done, state=b.state)
            bars.update(total_id, total=progress.total or None, completed=progress.done, state=progress.state)

        try:
            while True:
                sync()
                await asyncio.sleep(REFRESH_S)
        finally:
            sync()


def emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _json_lines(progress: PullProgress) -> None:
    reported: set[str] = set()
    try:
        while True:
            _json_tick(progress, reported)
            await asyncio.sleep(JSON_INTERVAL_S)
    finally:
        _json_tick(progress, reported)  # blobs that finished since the last tick


def _json_tick(progress: PullProgress, reported: set[str]) -> None:
    for digest, b in progress.blobs.items():
        if digest not in reported and b.state in ("done", "present"):
            reported.add(digest)
            emit_json(
                {
                    "event": "blob",
                    "digest": digest,
                    "size": b.size,
                    "state": b.state,
                    "fetched": b.fetched,
                    "resumed": b.resumed,
                    "retries": b.retries,
                }
            )
    emit_json(
        {
            "event": "progress",
            "reference": progress.reference,
            "state": progress.state,
            "done": progress.done,
            "total": progress.total,
            "fetched": progress.fetched,
            "elapsed": round(time.monotonic() - progress.started, 3),
        }
    )


async def _plain(progress: PullProgress) -> None:
    while True:
        await asyncio.sleep(5.0)
        if progress.total:
            print(
                f"{progress.reference}: {_mb(progress.done)} of {_mb(progress.total)} ({progress.state})",
                file=sys.stderr,
                flush=True,
            )


def summary_line(result: PullResult) -> str:
    line = (
        f"pulled {result.reference} digest={result.digest} bytes={result.total_bytes} "
        f"fetched={result.fetched_bytes} seconds={result.seconds:.2f} MB/s={result.mb_per_s:.1f}"
    )
    if len(result.by_host) > 1:
        line += " from " + ",".join(f"{host}={n}" for host, n in result.by_host.items())
    if result.unpacked_by is not None:
        line += f" unpack={result.unpacked_by['path']}"
    return line


def summary_json(result: PullResult) -> dict:
    return {
        "event": "done",
        "reference": str(result.reference),
        "digest": result.digest,
        "manifest": result.manifest_digest,
        "bytes": result.total_bytes,
        "fetched": result.fetched_bytes,
        "seconds": round(result.seconds, 3),
        "mb_per_s": round(result.mb_per_s, 1),
        "hosts": result.by_host,
        **({"unpack": result.unpacked_by} if result.unpacked_by is not None else {}),
    }
