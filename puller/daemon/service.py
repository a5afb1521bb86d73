"""The reconcile loop: keep the listed images present, pull what the API asks for, check present images again.

Every image the daemon knows has one :class:`ImageState`, keyed by reference (and platform). An image is
listed (by the image list file or a source in the cluster, sources.py, for this node: entries with a
``nodeSelector`` only where the node's labels match), requested (through the API), or both; a pull of it is
one task, whoever asked. An image with pull secrets is pulled with their credentials (node.py).
All pulls share the engine's one connection budget; ``parallel_pulls`` bounds how many run at once.
A failing image backs off exponentially and never blocks the others. Cancelling :meth:`Daemon.run` stops the
pulls at a clean point (the engine keeps verified ranges), so the next start resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field, replace

from ..config import DaemonSettings
from ..engine.pull import PullProgress
from ..engine.runtime import Engine
from ..errors import Forbidden, KubernetesError, PullerError, PullTimeout, Unauthorized
from ..metrics import DaemonMetrics
from ..registry.auth import pull_credentials
from .imagelist import MAX_IMAGES, ImageListWatcher, ImageSpec, merge
from .node import read_node_labels, read_pull_credentials, remove_node_taint
from .sources import sources_for

log = logging.getLogger(__name__)

LISTED, REQUESTED = "list", "api"
ABSENT, PULLING, PRESENT, FAILED = "absent", "pulling", "present", "failed"
BACKOFF_BASE_S = 2.0
TICK_S = 1.0
GATE_RETRY_S = 10.0
COLLECT_INTERVAL_S = 600.0  # how often failed pulls' staged files are collected (staging_max_age/_bytes)
NODE_LABELS_S = 30.0  # how often the node's labels are read again while an entry has a nodeSelector


@dataclass
class ImageState:
    spec: ImageSpec
    sources: set[str] = field(default_factory=set)
    state: str = ABSENT
    digest: str | None = None
    error: str | None = None
    progress: PullProgress | None = None
    failures: int = 0
    next_attempt: float = 0.0  # monotonic time before which a failed image is not retried
    checked: float | None = None  # monotonic time the image was last found present and current
    requested: float = 0.0  # monotonic time the API last asked for it
    task: asyncio.Task | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set while no pull or check runs

    def view(self) -> dict:
        """What the API reports for this image."""
        out: dict = {
            "reference": str(self.spec.reference),
            "platform": self.spec.platform,
            "state": self.state,
            "digest": self.digest,
            "sources": sorted(self.sources),
        }
        if self.progress is not None and self.state == PULLING:
            out["done"], out["total"] = self.progress.done, self.progress.total
        if self.error:
            out["error"] = self.error
        return out


class Daemon:
    def __init__(self, engine: Engine, settings: DaemonSettings):
        self.engine = engine
        self.settings = settings
        self.node_name = node_name = settings.node_name
        self.started = time.monotonic()
        # The start-up gate: None = no gate (no taint or no node name), False = closed, True = opened.
        self.gate_open: bool | None = None if not (node_name and settings.startup_taint) else False
        self._gate_task: asyncio.Task | None = None
        self._gate_retry_at = 0.0
        self.watcher = ImageListWatcher(settings.images_file)
        self.sources = sources_for(settings.knative_images, settings.workload_selector, settings.source_namespaces)
        self._file_specs: list[ImageSpec] | None = None  # the image list file's entries, once read
        self._composed: tuple | None = None  # what the listed set was last composed from
        self.node_labels: dict[str, str] | None = None  # read when an entry has a nodeSelector
        self._labels_task: asyncio.Task | None = None
        self._labels_at = 0.0
        self._labels_error: str | None = None
        self.images: dict[str, ImageState] = {}
        self.listed: set[str] = set()
        self.list_loaded = False
        self._slots = asyncio.Semaphore(settings.parallel_pulls)
        self._tasks: set[asyncio.Task] = set()  # unpins, staging collection
        self._next_collect = time.monotonic() + COLLECT_INTERVAL_S  # the engine collected when it started
        self.metrics = DaemonMetrics(
            lambda: engine.budget.in_use,
            lambda: ((k, s.state) for k, s in self.images.items()),
            lambda: ((k, s.progress) for k, s in self.images.items() if s.task is not None and s.progress),
        )

    # ---- what the API and the gate read ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The image list and every source were read and every listed image is present."""
        return self.list_loaded and all(self.images[k].state == PRESENT for k in self.listed)

    def why_not_loaded(self) -> str:
        """Why the list is not composed yet: the file, a cluster source, or this node's labels."""
        if self._file_specs is None:
            return self.watcher.error or "image list not read yet"
        unread = [
            f"image source {s} not read yet" + (f": {s.error}" if s.error else "") for s in self.sources if not s.synced
        ]
        if unread:
            return "; ".join(unread)
        return self._labels_error or f"the labels of node {self.node_name} not read yet"

    def missing(self) -> list[str]:
        return sorted(k for k in self.listed if self.images[k].state != PRESENT)

    # ---- what changes the set of images ---------------------------------------------------------------------

    def apply_list(self, specs: list[ImageSpec], complete: bool = True) -> None:
        """Make ``specs`` (this node's, one per key) the listed images; ``complete``: they are all of them."""
        wanted = {s.key: s for s in specs}
        for key in self.listed - wanted.keys():
            self._drop_source(key, LISTED)
        now = time.monotonic()
        for key, spec in wanted.items():
            st = self.images.get(key)
            if st is None:
                st = self.images[key] = ImageState(spec)
                # A fleet gets a new list at about the same moment: spread the first pulls over start_jitter.
                st.next_attempt = now + random.uniform(0, self.settings.start_jitter)
            if st.spec.pin != spec.pin:
                st.checked = None  # pin changed: record the image again
            st.spec = spec
            st.sources.add(LISTED)
        self.listed = set(wanted)
        self.list_loaded = complete
        log.info("image list: %d image(s)%s", len(wanted), "" if complete else " so far")

    def request(self, specs: list[ImageSpec]) -> list[ImageState]:
        """Pull these now (API): retried at once even if backing off, present ones checked again. An image the
        API alone asks for is pinned only if the request says so: the ``pin`` setting is for listed images."""
        states = []
        for spec in specs:
            st = self.images.setdefault(spec.key, ImageState(replace(spec, pin=bool(spec.pin))))
            st.sources.add(REQUESTED)
            st.requested = time.monotonic()
            if st.task is None:
                st.next_attempt, st.checked = 0.0, None
                self._start(st)
            states.append(st)
        return states

    async def wait(self, states: list[ImageState], timeout: float) -> bool:
        """Wait until no pull of ``states`` is running; False on timeout."""
        waits = [asyncio.ensure_future(st.settled.wait()) for st in states]
        try:
            _, pending = await asyncio.wait(waits, timeout=timeout) if waits else (set(), set())
        finally:
            for w in waits:
                w.cancel()
        return not pending

    def requested_count(self) -> int:
        """Images tracked only because the API asked for them (what ``api_max_images`` bounds)."""
        return sum(1 for st in self.images.values() if st.sources == {REQUESTED})

    def _forget_requests(self, now: float) -> None:
        """Forget images asked for through the API and not listed, once ``api_forget_after`` passed since the
        last request and no pull of them runs: a daemon that runs for weeks does not grow with its callers."""
        for key, st in list(self.images.items()):
            if REQUESTED in st.sources and st.task is None and now - st.requested > self.settings.api_forget_after:
                self._drop_source(key, REQUESTED)

    def _drop_source(self, key: str, source: str) -> None:
        st = self.images.get(key)
        if st is None:
            return
        st.sources.discard(source)
        if source == LISTED and self._pinned(st.spec):
            self._background(self._unpin(st))
        if not st.sources:
            del self.images[key]
            if st.task is not None:
                st.task.cancel()  # no longer wanted; what it fetched stays staged for a later request

    def _pinned(self, spec: ImageSpec) -> bool:
        """The one place the ``pin`` setting applies: an entry without its own ``pin`` (API specs always have one)."""
        return self.settings.pin if spec.pin is None else spec.pin

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unpin(self, st: ImageState) -> None:
        """The list no longer names a pinned image: take off the pin puller set (kubelet's GC may take it)."""
        try:
            await self.engine.store.unpin_image(st.spec.reference, st.digest)
            log.info("%s left the image list: unpinned", st.spec.reference)
        except PullerError as e:
            log.warning("%s left the image list; unpinning it failed: %s", st.spec.reference, e)

    # ---- the loop --------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile until cancelled; then stop every pull at a clean point."""
        for source in self.sources:
            self._background(source.run())
        try:
            while True:
                self._reload()
                now = time.monotonic()
                self._forget_requests(now)
                if now >= self._next_collect:
                    self._next_collect = now + COLLECT_INTERVAL_S
                    self._background(self.engine.collect_staging())
                for st in list(self.images.values()):
                    if st.task is None and self._due(st, now):
                        self._start(st)
                self._check_gate(now)
                await asyncio.sleep(min(TICK_S, self.settings.watch_interval))
        finally:
            tasks = [st.task for st in self.images.values() if st.task is not None] + list(self._tasks)
            tasks += [t for t in (self._gate_task, self._labels_task) if t is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _reload(self) -> None:
        refused = self.watcher.refused
        specs = self.watcher.poll()
        if specs is not None:
            self._file_specs = specs
            self.metrics.list_reloads.labels("ok").inc()
        elif self.watcher.refused != refused:
            self.metrics.list_reloads.labels("error").inc()
        self._compose()

    def _compose(self) -> None:
        """The listed images: the file's and every source's entries meant for this node, once all were read."""
        if self._file_specs is None or not all(s.synced for s in self.sources):
            return
        entries = self._file_specs + [spec for source in self.sources for spec in source.specs()]
        # Until this node's labels are read, the entries without a nodeSelector are pulled and the list is not
        # complete (the start-up gate waits).
        known = self._node_labels_known() if any(spec.node_selector for spec in entries) else True
        labels = self.node_labels or {}
        inputs = (self.watcher.loaded, tuple(s.version for s in self.sources), known, tuple(sorted(labels.items())))
        if inputs == self._composed:
            return
        self._composed = inputs
        mine = merge([spec for spec in entries if (spec.wanted_on(labels) if known else not spec.node_selector)])
        if len(mine) > MAX_IMAGES:
            log.error("the image list and its sources name %d images; keeping the first %d", len(mine), MAX_IMAGES)
        self.apply_list(mine[:MAX_IMAGES], complete=known)

    def _node_labels_known(self) -> bool:
        """Whether this node's labels were read; starts reading them (again, every NODE_LABELS_S)."""
        if not self.node_name:
            if self.node_labels is None:
                log.error("entries with a nodeSelector need node_name (NODE_NAME): they are left out")
                self.node_labels = {}
            return True
        now = time.monotonic()
        if self._labels_task is None and now >= self._labels_at:
            self._labels_at = now + NODE_LABELS_S
            self._labels_task = asyncio.ensure_future(self._read_labels())
        return self.node_labels is not None

    async def _read_labels(self) -> None:
        assert self.node_name
        try:
            self.node_labels = await read_node_labels(self.node_name)
            self._labels_error = None
        except PullerError as e:
            self._labels_error = f"cannot read the labels of node {self.node_name}: {e}"
            log.error("%s", self._labels_error)
            self._labels_at = time.monotonic() + GATE_RETRY_S
        finally:
            self._labels_task = None

    def _check_gate(self, now: float) -> None:
        if self.gate_open is not False or self._gate_task is not None or now < self._gate_retry_at:
            return
        if self.ready:
            reason = "present"
        elif now - self.started >= self.settings.startup_deadline:
            reason = "deadline"
        else:
            return
        self._gate_task = asyncio.ensure_future(self._open_gate(reason))

    async def _open_gate(self, reason: str) -> None:
        assert self.node_name and self.settings.startup_taint
        try:
            removed = await remove_node_taint(self.node_name, self.settings.startup_taint)
        except PullerError as e:
            log.error("start-up gate: %s (retrying in %.0f s)", e, GATE_RETRY_S)
            self._gate_retry_at = time.monotonic() + GATE_RETRY_S
            return
        finally:
            self._gate_task = None
        self.gate_open = True
        if not removed:
            log.info("start-up gate: node %s has no %s taint", self.node_name, self.settings.startup_taint)
            return
        self.metrics.gate_released.labels(reason).inc()
        if reason == "deadline":
            log.error(
                "start-up gate: deadline of %.0f s passed with %s missing; removed taint %s from node %s anyway",
                self.settings.startup_deadline,
                ", ".join(self.missing()) or "the image list",
                self.settings.startup_taint,
                self.node_name,
            )
        else:
            log.info(
                "start-up gate: all images present; removed taint %s from node %s",
                self.settings.startup_taint,
                self.node_name,
            )

    def _due(self, st: ImageState, now: float) -> bool:
        if now < st.next_attempt:
            return False
        if st.state != PRESENT or st.checked is None:
            return True
        # Present images are checked again: a tag may have moved, and kubelet's image GC or an operator may
        # have removed content from the store. Images a workload pulls with pullPolicy Always, more often: kubelet
        # resolves their tag at every pod start, and the new digest should be here by then.
        interval = self.settings.always_resolve_interval if st.spec.always else self.settings.resolve_interval
        return now - st.checked >= interval

    def _start(self, st: ImageState) -> None:
        st.settled.clear()
        st.task = asyncio.ensure_future(self._pull(st))

    async def _pull(self, st: ImageState) -> None:
        """Pull, or check a present image: the same idempotent engine pull, which resolves the reference,
        skips every blob the store still has and records the image again (cheap when nothing changed)."""
        ref = st.spec.reference
        recheck = st.state == PRESENT
        try:
            async with self._slots:
                st.progress = PullProgress(str(ref))
                if not recheck:
                    st.state = PULLING
                try:
                    # The deadline frees the slot: slow images (above the low-speed limit, yet slow) must not
                    # keep healthy ones waiting for ever.
                    async with asyncio.timeout(self.settings.pull_timeout):
                        result = await self._pull_with_secrets(st)
                except TimeoutError:
                    self.metrics.pull_finished(st.progress, "failure")
                    raise PullTimeout(
                        f"not present within pull_timeout ({self.settings.pull_timeout:.0f} s); "
                        "what was fetched stays staged for the next try"
                    ) from None
                except asyncio.CancelledError:
                    self.metrics.pull_finished(st.progress, "cancelled")
                    raise
                except BaseException:
                    self.metrics.pull_finished(st.progress, "failure")
                    raise
            if recheck and result.digest == st.digest and result.fetched_bytes == 0:
                self.metrics.checks.inc()
                self.metrics.account(st.progress)
            else:
                self.metrics.pull_finished(st.progress, "success")
                hosts = ", ".join(f"{h} {n / 1e6:.1f} MB" for h, n in result.by_host.items()) or "nothing fetched"
                why = " (moved or incomplete)" if recheck else ""
                fields = {
                    "event": "pull",
                    "image": str(ref),
                    "result": "success",
                    "digest": result.digest,
                    "bytes": result.fetched_bytes,
                    "seconds": round(result.seconds, 3),
                    "hosts": result.by_host,
                }
                if result.unpacked_by is not None:
                    fields["unpack"] = result.unpacked_by
                log.info(
                    "%s present%s: %s in %.1f s; %s",
                    *(ref, why, result.digest, result.seconds, hosts),
                    extra={"fields": fields},
                )
            st.state, st.digest, st.error, st.failures = PRESENT, result.digest, None, 0
            st.checked = time.monotonic()
        except asyncio.CancelledError:
            if st.state == PULLING:
                st.state = ABSENT
            raise
        except Exception as e:
            self._failed(st, e)
        finally:
            st.task = None
            st.settled.set()

    async def _pull_with_secrets(self, st: ImageState):
        """The engine's pull, with the credentials of the image's pull secrets (this task's context only)."""
        spec = st.spec
        problems: list[str] = []
        if spec.pull_secrets:
            try:
                creds, problems = await read_pull_credentials(spec.pull_secrets, self.settings.pull_secret_namespaces)
            except KubernetesError as e:
                creds, problems = {}, [str(e)]
            pull_credentials.set(creds)
        try:
            return await self.engine.pull(spec.reference, spec.platform, st.progress, self._pinned(spec))
        except (Unauthorized, Forbidden) as e:
            if not spec.pull_secrets:
                raise
            used = ", ".join(str(ref) for ref in spec.pull_secrets)
            why = f"; {'; '.join(problems)}" if problems else ""
            raise type(e)(f"{e} (pull secrets: {used}{why})", e.status, e.codes) from None

    def _failed(self, st: ImageState, e: Exception) -> None:
        st.failures += 1
        st.error = str(e) if isinstance(e, PullerError) else f"internal error: {e!r}"
        if not isinstance(e, PullerError):
            log.exception("%s: unexpected failure", st.spec.reference)
        if st.state != PRESENT:  # a failed re-check leaves a present image present
            st.state = FAILED
        backoff = min(self.settings.retry_backoff_max, BACKOFF_BASE_S * 2 ** (st.failures - 1))
        st.next_attempt = time.monotonic() + backoff * random.uniform(0.5, 1.0)
        fields = {
            "event": "pull",
            "image": str(st.spec.reference),
            "result": "failure",
            "error": st.error,
            "cause": type(e).__name__,
            "retry_in_s": round(backoff),
        }
        log.warning("%s: %s (retry in about %.0f s)", st.spec.reference, st.error, backoff, extra={"fields": fields})


@contextlib.asynccontextmanager
async def running(daemon: Daemon):
    """Run the daemon's loop in the background for the body of the block."""
    task = asyncio.ensure_future(daemon.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
