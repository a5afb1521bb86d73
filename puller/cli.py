"""Command line: ``puller pull``, ``puller daemon``, ``puller warmup``. Wiring only; the work is in the engine,
the registry client, the stores, the daemon and the warmup client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from . import __version__, config, logs
from .engine.pull import PullProgress, PullResult
from .engine.runtime import Engine
from .errors import ConfigError, PullerError
from .progress import emit_json, show, summary_json, summary_line
from .reference import Reference
from .registry.auth import Credentials

EXIT_INTERRUPTED = 130  # SIGINT
EXIT_TERMINATED = 143  # SIGTERM
DEFAULT_DAEMON_NAMESPACE = "puller"
DEFAULT_DAEMON_SELECTOR = "app.kubernetes.io/name=puller"
log = logging.getLogger("puller")


async def run_pull(ref: Reference, settings: config.Settings, creds: Credentials | None, output: str) -> PullResult:
    # SIGTERM (what Kubernetes sends) stops the pull like Ctrl-C: cancelled at a clean point, progress kept.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, _current_task().cancel)
    explicit = {ref.domain: creds, ref.api_host: creds} if creds else {}
    async with Engine(settings, explicit) as engine:
        progress = PullProgress(str(ref))
        async with show(progress, output):
            return await engine.pull(ref, progress=progress, pin=settings.pin)


def _current_task() -> asyncio.Task:
    task = asyncio.current_task()
    assert task is not None, "called outside a task"
    return task


def _read_token(path: str | None) -> str | None:
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read token file {path}: {e.strerror}") from None
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


async def run_daemon(settings: config.Settings) -> None:
    """Serve the API and keep the image list present until SIGTERM/SIGINT; then stop pulls at a clean point."""
    from aiohttp import web

    from .daemon.api import make_app, make_probe_app
    from .daemon.service import Daemon

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _current_task().cancel)
    node = settings.node_name or os.environ.get("NODE_NAME")
    token = _read_token(settings.api_token_file)
    if token is None and not settings.listen_is_loopback and not settings.api_allow_unauthenticated:
        raise ConfigError(
            f"listen {settings.listen} is reachable from other hosts and no api_token_file is set: anyone who "
            "reaches it could make this node pull any image; set api_token_file (deploy/ does), listen on "
            "loopback, or set api_allow_unauthenticated: true"
        )
    async with Engine(settings) as engine:
        daemon = Daemon(engine, settings.daemon(node))
        sites = [(web.AppRunner(make_app(daemon, token), access_log=None), settings.listen)]
        if settings.probe_listen:
            sites.append((web.AppRunner(make_probe_app(daemon), access_log=None), settings.probe_listen))
        runners = [runner for runner, _ in sites]
        try:
            for runner, where in sites:
                await runner.setup()
                host, port = config.address(where)
                try:
                    await web.TCPSite(runner, host, port).start()
                except OSError as e:
                    raise ConfigError(f"cannot listen on {where}: {e.strerror}") from None
            log.info(
                "daemon on node %s: API on http://%s%s, image list %s, store %s",
                node or "(unnamed)",
                settings.listen,
                f", probes and metrics also on http://{settings.probe_listen}" if settings.probe_listen else "",
                settings.images_file,
                settings.store,
            )
            await daemon.run()
        except asyncio.CancelledError:
            log.info("stopping: pulls stop at a clean point and resume on the next start")
        finally:
            for runner in runners:
                await runner.cleanup()


async def run_warmup(args: argparse.Namespace, output: str) -> None:
    from .daemon.node import DaemonPod, find_daemon_pods
    from .warmup import Warmup, display, first_wave_size, resolve_service

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, _current_task().cancel)
    for image in args.images:
        Reference.parse(image)  # a bad reference is exit 2 before any daemon is looked for
    if args.first_wave:
        first_wave_size(args.first_wave, 1)  # so is a bad --first-wave
    token = _read_token(args.token_file)
    if args.endpoints:
        urls = [u.strip().rstrip("/") for u in args.endpoints.split(",") if u.strip()]
        pods = [DaemonPod(u.split("://", 1)[-1], u) for u in urls]
    elif args.service:
        pods = await resolve_service(args.service, args.port)
    else:
        pods = sorted(await find_daemon_pods(args.namespace, args.selector, args.port), key=lambda p: p.node)
    first_wave = first_wave_size(args.first_wave, len(pods)) if args.first_wave else None
    warmup = Warmup(pods, args.images, args.platform, token, first_wave)
    if not pods:
        raise ConfigError("no puller daemons found (check --namespace/--selector, --service or --endpoints)")
    with display(output) as show:
        await warmup.run(args.wait, args.timeout, show)


def _seconds(text: str) -> float:
    """A finite, positive number of seconds (``nan`` or ``inf`` would never end a wait)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite, positive number of seconds, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puller", description="Pull whole container images, fast.")
    parser.add_argument("--version", action="version", version=f"puller {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    _pull_parser(sub.add_parser("pull", help="pull an image into a store"))
    d = sub.add_parser("daemon", help="keep a list of images present on this node and serve the warmup API")
    d.add_argument("--config", help=f"YAML settings file (default: ${config.CONFIG_ENV} if set)")
    d.add_argument("--images-file", help=f"the image list to keep present (default {config.DAEMON_IMAGES_FILE})")
    d.add_argument("--listen", help=f"HOST:PORT of the HTTP API (default {config.DAEMON_LISTEN})")
    d.add_argument("--store", help="oci:DIR, containerd or overlaybd (default: from the config)")
    d.add_argument("--log-format", choices=logs.FORMATS, help="text (default) or json: one object per line")
    w = sub.add_parser("warmup", help="ask every node's daemon to pull images now; with --wait, wait for all")
    w.add_argument("images", nargs="+", metavar="IMAGE", help="image references")
    w.add_argument("--wait", action="store_true", help="wait until every node reports every image present")
    w.add_argument("--timeout", type=_seconds, default=600.0, help="seconds to wait with --wait (default 600)")
    w.add_argument("--platform", help="os/arch[/variant] for every image (default: each node's own)")
    w.add_argument(
        "--first-wave",
        metavar="N|P%",
        help="ask these nodes first (a count or a share: the first by node name, or as listed with --endpoints) and "
        "the rest once they hold the images, which then come from their peers through a P2P mirror such as Spegel "
        "(default: all at once)",
    )
    found = w.add_argument_group("finding the daemons (default: the Kubernetes API)")
    found.add_argument("--endpoints", help="comma-separated daemon URLs, e.g. http://10.0.0.5:8470")
    found.add_argument("--service", help="DNS name of the daemons' headless Service, e.g. puller.puller.svc")
    found.add_argument(
        "--namespace", default=DEFAULT_DAEMON_NAMESPACE, help="namespace of the daemon pods (default puller)"
    )
    found.add_argument("--selector", default=DEFAULT_DAEMON_SELECTOR, help="label selector of the daemon pods")
    found.add_argument("--port", type=int, default=8470, help="the daemons' API port (default 8470)")
    found.add_argument("--token-file", help="file with the bearer token the daemons require")
    return parser


def _pull_parser(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--hosts-dir", help="containerd's registry host configuration, for mirrors (default /etc/containerd/certs.d)"
    )
    p.add_argument("--concurrency", type=int, help="connection budget shared by all chunks (default 32)")
    p.add_argument(
        "--chunk-size", help="largest ranged request, e.g. 8MiB (blobs get smaller chunks so all connections work)"
    )
    p.add_argument("--bandwidth-limit", help="cap on download speed, bytes/s shared by all connections, e.g. 50MiB")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout instead of a progress display")
    c = p.add_argument_group("containerd store")
    c.add_argument("--containerd-address", help="containerd socket (default /run/containerd/containerd.sock)")
    c.add_argument("--namespace", help="containerd namespace (default k8s.io, where kubelet looks)")
    c.add_argument("--snapshotter", help="snapshotter to unpack into (default overlayfs)")
    c.add_argument("--no-unpack", dest="unpack", action="store_false", default=None, help="store content only")
    c.add_argument(
        "--unpack-path",
        choices=("auto", "stream", "diff"),
        help="apply layers while they download (stream: puller's applier) or after (diff: containerd's); default auto",
    )
    o = p.add_argument_group("overlaybd store")
    o.add_argument(
        "--overlaybd-config", help="overlaybd.json that names the cache (default /etc/overlaybd/overlaybd.json)"
    )
    o.add_argument("--cache-dir", help="registry_cache directory, overriding the one overlaybd.json names")
    c.add_argument(
        "--staging-dir", help="where blobs are staged before containerd takes them (default /var/lib/puller/staging)"
    )
    c.add_argument("--pin", action="store_true", default=None, help="label the image pinned: kubelet GC keeps it")


def main(argv: list[str] | None = None) -> int:
    gc.freeze()  # what the imports made lives as long as the process: the cyclic collector need not walk it again
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else (logging.INFO if args.command == "daemon" else logging.WARNING)
    logs.configure("text", level)
    json_errors = getattr(args, "json", False)
    try:
        return {"pull": _pull, "daemon": _daemon, "warmup": _warmup}[args.command](args)
    except PullerError as e:
        if json_errors:
            emit_json({"event": "error", "error": type(e).__name__, "message": str(e)})
        print(f"puller: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("puller: interrupted; progress is kept and the next pull resumes", file=sys.stderr)
        return EXIT_INTERRUPTED
    except asyncio.CancelledError:
        print("puller: terminated; progress is kept and the next pull resumes", file=sys.stderr)
        return EXIT_TERMINATED


def _pull(args: argparse.Namespace) -> int:
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
        "unpack_path": args.unpack_path,
        "pin": args.pin,
        "staging_dir": args.staging_dir,
        "overlaybd_config": args.overlaybd_config,
        "cache_dir": args.cache_dir,
        "hosts_dir": args.hosts_dir,
        "bandwidth_limit": args.bandwidth_limit,
    }
    if args.plain_http:
        flags["plain_http"] = [*settings.plain_http, ref.api_host]
    if args.insecure_skip_verify:
        flags["insecure_skip_verify"] = [*settings.insecure_skip_verify, ref.api_host]
    settings = config.apply(settings, flags)
    creds = Credentials.from_user_pass(args.creds) if args.creds else None
    output = "json" if args.json else ("tty" if sys.stderr.isatty() else "plain")
    result = _run(run_pull(ref, settings, creds, output))
    if args.json:
        emit_json(summary_json(result))
    else:
        print(summary_line(result))
    return 0


def _daemon(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    flags = {"images_file": args.images_file, "listen": args.listen, "store": args.store, "log_format": args.log_format}
    settings = config.apply(settings, flags)
    logs.configure(settings.log_format, logging.getLogger().level)
    _run(run_daemon(settings))
    return 0


def _warmup(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    _run(run_warmup(args, "tty" if sys.stderr.isatty() else "plain"))
    return 0


def _run(coro):
    """Run on uvloop when it is installed (it is a dependency on Linux), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run() -> NoReturn:
    """The ``puller`` command: :func:`main`, then exit at once. When main returns, everything is committed, closed
    and written (no thread of puller's has work left); the interpreter's teardown of every module and object would
    add 15-20 ms to every command, a pull's included."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
