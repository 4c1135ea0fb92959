"""Prometheus metrics of the edge server, served on their own HTTP port (`--metrics-port`, bound to
`--metrics-host`, 127.0.0.1 by default: scrape it from the host or a sidecar, never from the device network).

A UNet evaluation is one sample through the UNet at one step (a classifier-free-guidance step counts 2), as in
sage_core.sampler.UNetCounter. For a group of N requests with T steps sharing the first k: independent sampling
needs N*T steps, SAGE runs k once plus N*(T-k) on the devices, so it saves (N-1)*k.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "sage_edge"
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GROUP_SIZE_BUCKETS = (1, 2, 3, 4, 5, 8, 16, 32)
WINDOW_REQUESTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHARED_PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EdgeMetrics:
    """The server's counters and histograms, in their own registry (no process-wide globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "RequestImage calls by final status code", ["code"], registry=r)
        self.errors = Counter(
            f"{PREFIX}_errors", "calls that ended with a non-OK status (auth included), by code", ["code"], registry=r
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "admission to dispatch of a window, per delivered request",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.group_size = Histogram(
            f"{PREFIX}_group_size", "requests per group run", buckets=GROUP_SIZE_BUCKETS, registry=r
        )
        self.unet_used = Counter(
            f"{PREFIX}_unet_evaluations",
            "UNet evaluations of served groups (server shared + devices' branch)",
            registry=r,
        )
        self.unet_independent = Counter(
            f"{PREFIX}_unet_evaluations_independent", "UNet evaluations independent sampling would need", registry=r
        )
        self.unet_saved = Counter(
            f"{PREFIX}_unet_evaluations_saved", "UNet evaluations saved by sharing vs independent", registry=r
        )
        self.window_requests = Histogram(
            f"{PREFIX}_window_requests", "requests per window run on a worker", buckets=WINDOW_REQUESTS_BUCKETS,
            registry=r,
        )
        self.shared_phase = Histogram(
            f"{PREFIX}_shared_phase_seconds",
            "a window's time on its worker from taking the model to its latents encoded (Done.shared_phase_ms)",
            buckets=SHARED_PHASE_BUCKETS,
            registry=r,
        )
        self.bytes_sent = Counter(f"{PREFIX}_bytes_sent", "latent payload bytes streamed to devices", registry=r)
        self.active = Gauge(f"{PREFIX}_active_requests", "admitted, unfinished requests", registry=r)

    def observe_group(self, size: int, steps: int, branch_step: int, server_steps: int, cfg: bool) -> None:
        """One group's shared phase finished: its size and UNet evaluations used (the server's trajectory steps
        attributed to it, cached ones free, plus its devices' branch steps), independent and saved."""
        per_step = 2 if cfg else 1
        independent = size * steps * per_step
        used = (server_steps + size * (steps - branch_step)) * per_step
        self.group_size.observe(size)
        self.unet_independent.inc(independent)
        self.unet_used.inc(used)
        self.unet_saved.inc(independent - used)

    def observe_window(self, requests: int, shared_phase_s: float) -> None:
        """A window of `requests` ran on a worker: `shared_phase_s` from taking the model to its latents encoded."""
        self.window_requests.observe(requests)
        self.shared_phase.observe(shared_phase_s)

    def observe_request(self, code: str, sent_bytes: int, queue_wait_s: float | None) -> None:
        """One RequestImage call ended with status `code` after sending `sent_bytes`."""
        self.requests.labels(code=code).inc()
        if code != "OK":
            self.errors.labels(code=code).inc()
        if sent_bytes:
            self.bytes_sent.inc(sent_bytes)
        if queue_wait_s is not None:
            self.queue_wait.observe(queue_wait_s)

    def observe_denied(self, code: str) -> None:
        """A call refused before the servicer ran (e.g. UNAUTHENTICATED)."""
        self.errors.labels(code=code).inc()

    def serve(self, host: str, port: int) -> tuple[Any, threading.Thread]:
        """Serve /metrics on http://host:port (port 0: a free one); returns (http server, thread)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, thread
