"""Command line: ``puller pull REF``. Wiring only; the work is in the engine, registry and stores."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import __version__, config
from .engine.pull import PullProgress, PullResult
from .engine.runtime import Engine
from .errors import PullerError
from .progress import emit_json, show, summary_json, summary_line
from .reference import Reference
from .registry.auth import Credentials

EXIT_INTERRUPTED = 130  # SIGINT
EXIT_TERMINATED = 143  # SIGTERM


async def run_pull(ref: Reference, settings: config.Settings, creds: Credentials | None, output: str) -> PullResult:
    # SIGTERM (what Kubernetes sends) stops the pull like Ctrl-C: cancelled at a clean point, progress kept.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    explicit = {ref.domain: creds, ref.api_host: creds} if creds else {}
    async with Engine(settings, explicit) as engine:
        progress = PullProgress(str(ref))
        async with show(progress, output):
            return await engine.pull(ref, progress=progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puller", description="Pull whole container images, fast.")
    parser.add_argument("--version", action="version", version=f"puller {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pull", help="pull an image into a store")
    p.add_argument("reference", help="image reference, e.g. busybox, ghcr.io/org/app:1.2, repo@sha256:...")
    p.add_argument("--config", help=f"YAML settings file (default: ${config.CONFIG_ENV} if set)")
    p.add_argument(
        "--store",
        help=f"where to put the image: oci:DIR (default oci:{config.DEFAULT_OCI_DIR}), containerd or overlaybd",
    )
    p.add_argument("--platform", help="os/arch[/variant] to pick from a multi-arch index (default: this host)")
    p.add_argument("--plain-http", action="store_true", help="talk plain HTTP to this image's registry")
    p.add_argument("--insecure-skip-verify", action="store_true", help="skip TLS verification for this registry")
    p.add_argument("--creds", help="user:password for this image's registry (else docker config.json)")
    p.add_argument("--concurrency", type=int, help="connection budget shared by all chunks (default 32)")
    p.add_argument(
        "--chunk-size", help="largest ranged request, e.g. 8MiB (blobs get smaller chunks so all connections work)"
    )
    p.add_argument("--json", action="store_true", help="JSON lines on stdout instead of a progress display")
    c = p.add_argument_group("containerd store")
    c.add_argument("--containerd-address", help="containerd socket (default /run/containerd/containerd.sock)")
    c.add_argument("--namespace", help="containerd namespace (default k8s.io, where kubelet looks)")
    c.add_argument("--snapshotter", help="snapshotter to unpack into (default overlayfs)")
    c.add_argument("--no-unpack", dest="unpack", action="store_false", default=None, help="store content only")
    o = p.add_argument_group("overlaybd store")
    o.add_argument(
        "--overlaybd-config", help="overlaybd.json that names the cache (default /etc/overlaybd/overlaybd.json)"
    )
    o.add_argument("--cache-dir", help="registry_cache directory, overriding the one overlaybd.json names")
    c.add_argument(
        "--staging-dir", help="where blobs are staged before containerd takes them (default /var/lib/puller/staging)"
    )
    c.add_argument("--pin", action="store_true", default=None, help="label the image pinned: kubelet GC keeps it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        ref = Reference.parse(args.reference)
        settings = config.load(args.config)
        flags: dict = {
            "store": args.store,
            "platform": args.platform,
            "connections": args.concurrency,
            "chunk_size": args.chunk_size,
            "containerd_address": args.containerd_address,
            "namespace": args.namespace,
            "snapshotter": args.snapshotter,
            "unpack": args.unpack,
            "pin": args.pin,
            "staging_dir": args.staging_dir,
            "overlaybd_config": args.overlaybd_config,
            "cache_dir": args.cache_dir,
        }
        if args.plain_http:
            flags["plain_http"] = [*settings.plain_http, ref.api_host]
        if args.insecure_skip_verify:
            flags["insecure_skip_verify"] = [*settings.insecure_skip_verify, ref.api_host]
        settings = config.apply(settings, flags)
        creds = Credentials.from_user_pass(args.creds) if args.creds else None
        output = "json" if args.json else ("tty" if sys.stderr.isatty() else "plain")
        result = _run(run_pull(ref, settings, creds, output))
    except PullerError as e:
        if args.json:
            emit_json({"event": "error", "error": type(e).__name__, "message": str(e)})
        print(f"puller: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("puller: interrupted; progress is kept and the next pull resumes", file=sys.stderr)
        return EXIT_INTERRUPTED
    except asyncio.CancelledError:
        print("puller: terminated; progress is kept and the next pull resumes", file=sys.stderr)
        return EXIT_TERMINATED
    if args.json:
        emit_json(summary_json(result))
    else:
        print(summary_line(result))
    return 0


def _run(coro):
    """Run on uvloop when it is installed (it is a dependency on Linux), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
