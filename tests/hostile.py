"""A registry that misbehaves on purpose: aiohttp on loopback, in a thread of the test process.

It serves images held in memory (OCI manifest, config, layers) under the distribution API, honours Range, and
can be told to: answer tokens in two TCP writes, gzip manifests or blobs, trickle blob, manifest or header bytes.
Every request is recorded (path, headers) so tests can assert what puller asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class MemImage:
    repo: str
    tag: str
    manifest: bytes
    blobs: dict[str, bytes]

    @property
    def digest(self) -> str:
        return sha(self.manifest)

    @property
    def layers(self) -> list[dict]:
        return json.loads(self.manifest)["layers"]


def make_image(repo: str, tag: str, layer_sizes: list[int], seed: int = 0) -> MemImage:
    rnd = __import__("random").Random(seed)
    layers = [rnd.randbytes(n) for n in layer_sizes]
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG, "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": LAYER, "digest": sha(x), "size": len(x)} for x in layers],
        }
    ).encode()
    return MemImage(repo, tag, manifest, {sha(b): b for b in [config, *layers]})


@dataclass
class Behaviour:
    """What the server does wrong; change fields between requests."""

    token_auth: bool = False  # /v2/ needs a Bearer token from /token
    token_split_s: float | None = None  # token JSON sent in two writes, this far apart
    gzip_manifests: bool = False  # Content-Encoding: gzip on manifests, whatever was asked
    gzip_blobs: bool = False
    trickle_blobs_s: float | None = None  # one byte of blob body per this many seconds
    trickle_manifests_s: float | None = None
    trickle_headers_s: float | None = None  # raw socket: one header byte per this many seconds
    blob_redirect: str | None = None  # blob GETs answer 307 to this Location, whatever it is
    realm: str | None = None  # the Bearer challenge's realm, whatever it is
    token_value: str | None = None  # the token the token server hands out
    extra: dict = field(default_factory=dict)


class HostileRegistry:
    """``with HostileRegistry([image, ...]) as reg``: ``reg.host`` is ``127.0.0.1:PORT`` (plain HTTP)."""

    def __init__(self, images: list[MemImage], behaviour: Behaviour | None = None, tags: int = 1):
        """``tags``: each image is also served as ``<tag>-1`` ... ``<tag>-<tags-1>``."""
        self.images = {(i.repo, i.tag): i for i in images} | {(i.repo, i.digest): i for i in images}
        self.images |= {(i.repo, f"{i.tag}-{n}"): i for i in images for n in range(1, tags)}
        self.blobs = {d: b for i in images for d, b in i.blobs.items()} | {i.digest: i.manifest for i in images}
        self.behaviour = behaviour or Behaviour()
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.token = "tok-" + os.urandom(8).hex()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> HostileRegistry:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def paths(self, part: str) -> list[str]:
        return [p for _, p, _ in self.requests if part in p]

    async def _start(self) -> None:
        if self.behaviour.trickle_headers_s is not None:
            server = await asyncio.start_server(self._trickle_headers, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._raw = server
            return
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2/{repo:.+}/manifests/{ref}", self._manifest)
        app.router.add_route("*", "/v2/{repo:.+}/blobs/{digest}", self._blob)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if getattr(self, "_raw", None) is not None:
            self._raw.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _record(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path_qs, dict(request.headers)))

    def _authorized(self, request: web.Request) -> bool:
        return not self.behaviour.token_auth or request.headers.get("Authorization") == f"Bearer {self.token}"

    def _challenge(self) -> web.Response:
        realm = self.behaviour.realm or f"http://{self.host}/token"
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED"}]},
            status=401,
            headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="hostile"'},
        )

    async def _base(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        return web.json_response({}) if self._authorized(request) else self._challenge()

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        token = self.behaviour.token_value or self.token
        body = json.dumps({"token": token, "expires_in": 300, "padding": "x" * 3000}).encode()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        if self.behaviour.token_split_s is None:
            await resp.write(body)
        else:
            await resp.write(body[:100])
            await asyncio.sleep(self.behaviour.token_split_s)
            await resp.write(body[100:])
        await resp.write_eof()
        return resp

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if not self._authorized(request):
            return self._challenge()
        image = self.images.get((request.match_info["repo"], request.match_info["ref"]))
        if image is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": image.digest}
        body = image.manifest
        if self.behaviour.gzip_manifests:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        if request.method == "HEAD":
            return web.Response(headers=headers | {"Content-Length": str(len(body))})
        return await self._send(request, body, headers, 200, self.behaviour.trickle_manifests_s)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if not self._authorized(request):
            return self._challenge()
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if self.behaviour.blob_redirect is not None:
            return web.Response(status=307, headers={"Location": self.behaviour.blob_redirect})
        headers = {"Content-Type": "application/octet-stream"}
        status = 200
        rng = request.http_range
        if rng.start is not None or rng.stop is not None:
            start, stop = rng.start or 0, min(rng.stop or len(data), len(data))
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            data, status = data[start:stop], 206
        if self.behaviour.gzip_blobs:
            data = gzip.compress(data)
            headers["Content-Encoding"] = "gzip"
        return await self._send(request, data, headers, status, self.behaviour.trickle_blobs_s)

    async def _send(
        self, request: web.Request, body: bytes, headers: dict, status: int, trickle: float | None
    ) -> web.StreamResponse:
        if trickle is None:
            return web.Response(body=body, headers=headers, status=status)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        try:
            for i in range(len(body)):
                await resp.write(body[i : i + 1])
                await asyncio.sleep(trickle)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    async def _trickle_headers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests.append(("?", "raw", {}))
        try:
            await reader.readuntil(b"\r\n\r\n")
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(self.behaviour.trickle_headers_s or 0.1)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@contextlib.contextmanager
def serve_json(status: int, answer) -> Iterator[str]:
    """A stand-in daemon that answers every request with ``status`` and ``answer`` (JSON, or text as it is):
    for clients that must survive malformed answers. Yields its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    body = answer if isinstance(answer, str) else json.dumps(answer)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type="application/json")

    async def start() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
