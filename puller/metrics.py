"""Prometheus metrics of the daemon (prometheus_client, one registry per daemon).

Bytes and retries are read at scrape time: what finished pulls accounted plus what the pulls in flight have
received so far, so a 30 GB pull shows its progress while it runs (``puller_pull_done_bytes`` and
``puller_pull_total_bytes`` per image being pulled, too). Gauges (connections in flight, images present,
per-image readiness) are read from the live engine and daemon state. The process collector adds RSS, CPU and open
files; ``_created`` series are off (they double the series and no dashboard reads them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine.pull import PullProgress

PULL_SECONDS_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ImageReadiness(Collector):
    def __init__(self, images: Callable[[], Iterable[tuple[str, str]]]):
        self._images = images  # -> (key, state)

    def collect(self):
        present = GaugeMetricFamily(
            "puller_image_present", "1 when the image is present on this node", labels=["image"]
        )
        count = 0
        for key, state in self._images():
            present.add_metric([key], 1.0 if state == "present" else 0.0)
            count += state == "present"
        yield present
        yield GaugeMetricFamily("puller_images_present", "Images present on this node", value=count)


class _Transfer(Collector):
    """Bytes per host and retries: finished pulls' totals plus the live counters of the pulls in flight."""

    def __init__(self, metrics: DaemonMetrics, pulling: Callable[[], Iterable[tuple[str, PullProgress]]]):
        self._metrics = metrics
        self._pulling = pulling  # -> (image key, progress) of the pulls running now

    def collect(self):
        by_host = dict(self._metrics.finished_bytes)
        retries = self._metrics.finished_retries
        done = GaugeMetricFamily("puller_pull_done_bytes", "Bytes present of an image being pulled", labels=["image"])
        total = GaugeMetricFamily("puller_pull_total_bytes", "Bytes of an image being pulled", labels=["image"])
        for key, progress in self._pulling():
            if progress.accounted:
                continue
            for host, n in progress.by_host.items():
                by_host[host] = by_host.get(host, 0) + n
            retries += sum(b.retries for b in progress.blobs.values())
            done.add_metric([key], float(progress.done))
            total.add_metric([key], float(progress.total))
        fetched = CounterMetricFamily(
            "puller_fetched_bytes", "Blob bytes received, by the registry host (mirror or upstream)", labels=["host"]
        )
        for host, n in sorted(by_host.items()):
            fetched.add_metric([host], float(n))
        yield fetched
        yield CounterMetricFamily("puller_retries", "Requests retried after a transient failure", value=retries)
        yield done
        yield total


class DaemonMetrics:
    def __init__(
        self,
        connections_in_use: Callable[[], int],
        images: Callable[[], Iterable[tuple[str, str]]],
        pulling: Callable[[], Iterable[tuple[str, PullProgress]]] = tuple,
    ):
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.finished_bytes: dict[str, int] = {}  # per host, of finished pulls
        self.finished_retries = 0
        self.pulls = Counter("puller_pulls", "Pulls finished, by result", ["result"], registry=r)
        self.pull_seconds = Histogram(
            "puller_pull_seconds", "Seconds per successful pull", buckets=PULL_SECONDS_BUCKETS, registry=r
        )
        self.checks = Counter(
            "puller_image_checks", "Checks of present images that found them current and complete", registry=r
        )
        self.list_reloads = Counter("puller_image_list_reloads", "Image list versions read", ["result"], registry=r)
        self.gate_released = Counter(
            "puller_startup_taint_removed",
            "Start-up taint removals, by reason",
            ["reason"],
            registry=r,
        )
        in_flight = Gauge("puller_connections_in_flight", "HTTP connections to registries in use", registry=r)
        in_flight.set_function(lambda: float(connections_in_use()))
        r.register(_ImageReadiness(images))
        r.register(_Transfer(self, pulling))
        ProcessCollector(registry=r)

    def pull_finished(self, progress: PullProgress, result: str) -> None:
        """Account one pull: ``result`` is success, failure or cancelled."""
        self.pulls.labels(result).inc()
        self.account(progress)
        if result == "success" and progress.finished is not None:
            self.pull_seconds.observe(progress.finished - progress.started)

    def account(self, progress: PullProgress) -> None:
        """Move a pull's bytes and retries into the totals (once)."""
        if progress.accounted:
            return
        progress.accounted = True  # from now on in the totals, not among the pulls in flight
        for host, n in progress.by_host.items():
            self.finished_bytes[host] = self.finished_bytes.get(host, 0) + n
        self.finished_retries += sum(b.retries for b in progress.blobs.values())

    def render(self) -> bytes:
        return generate_latest(self.registry)
