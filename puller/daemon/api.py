"""The daemon's HTTP API (aiohttp).

- ``POST /v1/pull``   ``{"images": [REF | {"reference", "platform"?, "pin"?}], "wait"?: bool, "timeout"?: s}``
  starts pulls now. Without wait: 202 and the images' states. With wait: 200 when all are present, 502 when
  one failed (its ``error`` says why), 504 when ``timeout`` passed first.
- ``GET /v1/images``  this node's images: absent, pulling (done/total bytes), present (digest), failed (error).
- ``/healthz`` (the process runs), ``/readyz`` (it serves: what a rollout waits for), ``/readyz?list=1`` (the
  image list is present: 200, else 503 with what is missing), ``/metrics`` (Prometheus). These three are also
  served alone, without a token, on ``probe_listen`` (:func:`make_probe_app`): a NetworkPolicy can then admit
  kubelet and scrapers there and only the warmup Job to the API.

Every request is validated: JSON only, known fields only, at most ``MAX_BODY`` bytes and ``MAX_IMAGES_PER_REQUEST``
images, references parsed before anything is pulled, JSON nested too deeply refused; at most ``api_max_images``
images asked for through the API are tracked at once (429 beyond), each forgotten ``api_forget_after`` seconds
after it was last asked for (unless listed); errors are 4xx with ``{"error": message}``. With
``api_token_file`` set, /v1/* needs ``Authorization: Bearer <token>``; probes and metrics stay open.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from aiohttp import web

from ..errors import ConfigError, InvalidReference
from ..metrics import CONTENT_TYPE
from .imagelist import ImageSpec, parse_entry
from .service import FAILED, PRESENT, Daemon

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_IMAGES_PER_REQUEST = 64
MAX_WAIT_S = 3600.0
DEFAULT_WAIT_S = 600.0
PULL_FIELDS = {"images", "wait", "timeout"}

DAEMON_KEY = web.AppKey("daemon", Daemon)
TOKEN_KEY = web.AppKey("token", str)


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=1))


@web.middleware
async def _auth(request: web.Request, handler):
    token = request.app[TOKEN_KEY]
    if token and request.path.startswith("/v1/"):
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise _error(web.HTTPUnauthorized, "missing or wrong bearer token")
    return await handler(request)


def _status(daemon: Daemon, images: list | None = None) -> dict:
    states = images if images is not None else list(daemon.images.values())
    return {"node": daemon.node_name, "ready": daemon.ready, "images": [st.view() for st in states]}


def parse_pull_request(body: Any) -> tuple[list[ImageSpec], bool, float]:
    """Validate a /v1/pull body -> (images, wait, timeout); ValueError with a message for the client."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(body) - PULL_FIELDS
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    images, wait, timeout = body.get("images"), body.get("wait", False), body.get("timeout", DEFAULT_WAIT_S)
    if not isinstance(images, list) or not images:
        raise ValueError("'images' must be a non-empty list")
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise ValueError(f"at most {MAX_IMAGES_PER_REQUEST} images per request")
    if not isinstance(wait, bool):
        raise ValueError("'wait' must be true or false")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_WAIT_S:
        raise ValueError(f"'timeout' must be a number of seconds in (0, {MAX_WAIT_S:.0f}]")
    specs = []
    for i, entry in enumerate(images):
        try:
            specs.append(parse_entry(entry, f"images[{i}]"))
        except (ConfigError, InvalidReference) as e:
            raise ValueError(str(e)) from None
    return specs, wait, float(timeout)


async def pull(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    if request.content_type != "application/json":
        raise _error(web.HTTPUnsupportedMediaType, "send Content-Type: application/json")
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _error(web.HTTPBadRequest, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise _error(web.HTTPBadRequest, "body is nested too deeply") from None
    try:
        specs, wait, timeout = parse_pull_request(body)
    except ValueError as e:
        raise _error(web.HTTPBadRequest, str(e)) from None
    if any(s.pin for s in specs) and not daemon.settings.api_allow_pin:
        raise _error(
            web.HTTPForbidden,
            "pinning through the API is off: pinned images are kept from kubelet's image GC (api_allow_pin)",
        )
    new = sum(1 for s in specs if s.key not in daemon.images)
    if daemon.requested_count() + new > daemon.settings.api_max_images:
        raise _error(
            web.HTTPTooManyRequests,
            f"this daemon tracks at most {daemon.settings.api_max_images} images asked for through the API "
            "(api_max_images); they are forgotten api_forget_after seconds after the last request",
        )
    states = daemon.request(specs)
    log.info("API: pull %s", ", ".join(str(s.reference) for s in specs))
    if not wait:
        return _json(_status(daemon, states), status=202)
    finished = await daemon.wait(states, timeout)
    if not finished:
        status = 504
    elif any(st.state == FAILED for st in states):
        status = 502
    else:
        status = 200 if all(st.state == PRESENT for st in states) else 504
    return _json(_status(daemon, states), status=status)


async def images(request: web.Request) -> web.Response:
    return _json(_status(request.app[DAEMON_KEY]))


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """200 while the daemon serves (what a rollout waits for: an image that fails must not hold it; the start-up
    taint is the gate for the list). ``?list=1``: 200 only once every listed image is present."""
    daemon = request.app[DAEMON_KEY]
    if request.query.get("list") not in ("1", "true"):
        return web.Response(text="serving\n")
    if daemon.ready:
        return web.Response(text="ready\n")
    if not daemon.list_loaded:
        why = daemon.why_not_loaded()
        return web.Response(status=503, text=f"not ready: {why}\n")
    return web.Response(status=503, text="not ready; missing: " + ", ".join(daemon.missing()) + "\n")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[DAEMON_KEY].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def make_app(daemon: Daemon, token: str | None = None) -> web.Application:
    """The API (``/v1/*``, behind ``token`` when given) and the probes and metrics."""
    app = make_probe_app(daemon)
    app.middlewares.append(_auth)
    app[TOKEN_KEY] = token or ""
    app.router.add_post("/v1/pull", pull)
    app.router.add_get("/v1/images", images)
    return app


def make_probe_app(daemon: Daemon) -> web.Application:
    """Only ``/healthz``, ``/readyz`` and ``/metrics``: nothing here changes the node."""
    app = web.Application(client_max_size=MAX_BODY)
    app[DAEMON_KEY] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
