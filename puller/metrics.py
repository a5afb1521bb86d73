"""Prometheus metrics of the daemon (prometheus_client, one registry per daemon).

Counters are fed as pulls finish; gauges (connections in flight, images present, per-image readiness) are read
from the live engine and daemon state at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
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


class DaemonMetrics:
    def __init__(self, connections_in_use: Callable[[], int], images: Callable[[], Iterable[tuple[str, str]]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.pulls = Counter("puller_pulls", "Pulls finished, by result", ["result"], registry=r)
        self.pull_seconds = Histogram(
            "puller_pull_seconds", "Seconds per successful pull", buckets=PULL_SECONDS_BUCKETS, registry=r
        )
        self.bytes_fetched = Counter(
            "puller_fetched_bytes",
            "Blob bytes received, by the registry host (mirror or upstream) that served them",
            ["host"],
            registry=r,
        )
        self.checks = Counter(
            "puller_image_checks", "Checks of present images that found them current and complete", registry=r
        )
        self.retries = Counter("puller_retries", "Requests retried after a transient failure", registry=r)
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

    def pull_finished(self, progress: PullProgress, result: str) -> None:
        """Account one pull: ``result`` is success, failure or cancelled."""
        self.pulls.labels(result).inc()
        for host, n in progress.by_host.items():
            self.bytes_fetched.labels(host).inc(n)
        self.retries.inc(sum(b.retries for b in progress.blobs.values()))
        if result == "success" and progress.finished is not None:
            self.pull_seconds.observe(progress.finished - progress.started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
