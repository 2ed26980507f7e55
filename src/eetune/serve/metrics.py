"""Prometheus metrics of `eetune serve`, in the server's own `CollectorRegistry` (GET /metrics).

The scheduler calls `first_token`, `inter_token`, `tokens`, `finished` and `gauges` from its
thread; prometheus-client's metrics are thread-safe.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("eetune_requests", "requests finished, by resolved mode and how they ended "
                                "(eos|stop|length|cancelled|error) or were refused (rejected)",
                                ["mode", "status"], registry=r)
        self.generated = Counter("eetune_generated_tokens", "tokens generated, by resolved mode", ["mode"], registry=r)
        self.ttft = Histogram("eetune_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("eetune_inter_token_latency_seconds", "time between tokens of a request (a self-spec "
                             "round's tokens share its interval)", buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("eetune_queue_depth", "requests waiting for a row", registry=r)
        self.batch = Gauge("eetune_batch_size", "requests decoding now (batched rows and solo requests)", registry=r)
        self.exit_layer_sum = Counter("eetune_exit_layer_sum", "sum over generated tokens of the layer that produced "
                                      "them (the full model: its layer count)", registry=r)
        self.mean_exit = Gauge("eetune_mean_exit_layer", "mean layer at which generated tokens were produced, "
                               "since start", registry=r)
        self.drafted = Counter("eetune_draft_tokens", "self-spec: draft tokens proposed", registry=r)
        self.accepted = Counter("eetune_draft_accepted_tokens", "self-spec: draft tokens accepted", registry=r)
        self.acceptance = Gauge("eetune_draft_acceptance", "self-spec: accepted / proposed drafts since start",
                                registry=r)
        self._tokens = 0
        self._layers = 0
        self._drafted = 0
        self._accepted = 0

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float, n: int) -> None:
        for _ in range(n):
            self.itl.observe(seconds)

    def tokens(self, mode: str, stats, num_layers: int) -> None:
        n = len(stats)
        if not n:
            return
        layers = sum(min(s.exit_layer, num_layers) for s in stats)
        self.generated.labels(mode or "?").inc(n)
        self.exit_layer_sum.inc(layers)
        self._tokens += n
        self._layers += layers
        self.mean_exit.set(self._layers / self._tokens)

    def finished(self, job) -> None:
        self.requests.labels(job.mode or job.requested_mode or "?", job.finished_by or "?").inc()
        if job.drafted:
            self.drafted.inc(job.drafted)
            self.accepted.inc(job.accepted)
            self._drafted += job.drafted
            self._accepted += job.accepted
            self.acceptance.set(self._accepted / self._drafted if self._drafted else math.nan)

    def rejected(self, mode: str) -> None:
        self.requests.labels(mode or "?", "rejected").inc()

    def gauges(self, queue: int, batch: int) -> None:
        self.queue.set(queue)
        self.batch.set(batch)

    def render(self) -> bytes:
        return generate_latest(self.registry)
