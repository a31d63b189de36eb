"""Prometheus metrics of one server (its own registry, so several apps can share a process).

Three sources feed them:

- the HTTP middleware: requests by route and status, requests in progress;
- the request path (``RequestObserver``, one per generation): time to first token,
  inter-token latency, end-to-end latency, queue time, prompt / latent / generated token
  counters, thoughts per request, finish reasons;
- the engine loop (``on_step``, called in the engine thread after every step; the
  client library is thread-safe): batch size per step, steps, prefills, stop-classifier
  early exits; and the engine process's supervision: restarts.

The waiting / running gauges are read from the engine when scraped, so they always
tell the current truth (they return to 0 once every request is done or aborted).
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

from engine.core import StepStats
from engine.output import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512)
_THOUGHT_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256, 1024)


class ServerMetrics:
    def __init__(self, prefix: str = "coconut"):
        self.registry = r = CollectorRegistry(auto_describe=True)
        p = prefix
        self.http_requests = Counter(f"{p}_http_requests", "HTTP requests by route, method and status",
                                     ["route", "method", "status"], registry=r)
        self.http_in_progress = Gauge(f"{p}_http_requests_in_progress", "HTTP requests being served",
                                      registry=r)
        self.waiting = Gauge(f"{p}_num_requests_waiting", "requests waiting for a batch slot", registry=r)
        self.running = Gauge(f"{p}_num_requests_running", "requests in the running batch", registry=r)
        self.batch_size = Histogram(f"{p}_batch_size", "rows in each step's mixed (decode/latent) forward",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.prefill_size = Histogram(f"{p}_prefill_batch_size", "prompts prefilled together in a step",
                                      buckets=_BATCH_BUCKETS, registry=r)
        self.steps = Counter(f"{p}_engine_steps", "engine steps that ran a forward pass", registry=r)
        self.early_exits = Counter(f"{p}_stop_classifier_early_exits",
                                   "auto-policy requests the stop classifier ended before the cap", registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "arrival to first answer token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{p}_inter_token_latency_seconds", "between consecutive answer tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "arrival to last output",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{p}_request_queue_time_seconds", "arrival to admission into the batch",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.prefix_cache_hits = Counter(f"{p}_prefix_cache_hits", "prompt tokens taken from the prefix cache "
                                         "(copied from a slot that held them) instead of computed", registry=r)
        self.latent_tokens = Counter(f"{p}_latent_thoughts", "continuous thoughts fed (latent positions)",
                                     registry=r)
        self.generated_tokens = Counter(f"{p}_generation_tokens", "answer tokens generated", registry=r)
        self.thoughts = Histogram(f"{p}_thoughts_per_request", "continuous thoughts per finished request",
                                  buckets=_THOUGHT_BUCKETS, registry=r)
        self.engine_restarts = Counter(f"{p}_engine_restarts", "engine processes started to replace one "
                                       "that died", registry=r)
        self.finished = Counter(f"{p}_requests_finished", "generations by finish reason "
                                "(stop, length, abort, error)", ["reason"], registry=r)

    def bind_engine(self, num_waiting: Callable[[], int], num_running: Callable[[], int]) -> None:
        self.waiting.set_function(num_waiting)
        self.running.set_function(num_running)

    def on_step(self, stats: StepStats) -> None:
        """Engine-thread callback, once per step."""
        if stats.cached_prompt_tokens:
            self.prefix_cache_hits.inc(stats.cached_prompt_tokens)
        if stats.batch_size == 0 and stats.num_prefilled == 0:
            return
        self.steps.inc()
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
        if stats.num_prefilled:
            self.prefill_size.observe(stats.num_prefilled)
        if stats.early_stops:
            self.early_exits.inc(stats.early_stops)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observer(self) -> "RequestObserver":
        return RequestObserver(self)


class RequestObserver:
    """Timing of one generation as its outputs arrive on the event loop."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.start = time.perf_counter()
        self.last_token_at: float | None = None
        self.num_tokens = 0
        self.last: RequestOutput | None = None
        self.done = False

    def on_output(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        new = len(out.token_ids) - self.num_tokens
        if new > 0:
            if self.last_token_at is None:
                self.metrics.ttft.observe(now - self.start)
            else:
                gap = (now - self.last_token_at) / new
                for _ in range(new):
                    self.metrics.itl.observe(gap)
            self.last_token_at = now
            self.num_tokens = len(out.token_ids)
        self.last = out

    def finish(self, reason: str | None = None) -> None:
        """Record the request's totals once (``reason`` overrides, e.g. 'abort' on disconnect)."""
        if self.done:
            return
        self.done = True
        m, out = self.metrics, self.last
        m.e2e.observe(time.perf_counter() - self.start)
        if out is None:
            m.finished.labels(reason or "abort").inc()
            return
        m.finished.labels(reason or out.finish_reason or "abort").inc()
        m.prompt_tokens.inc(len(out.prompt_token_ids))
        m.latent_tokens.inc(out.num_thoughts)
        m.generated_tokens.inc(len(out.token_ids))
        m.thoughts.observe(out.num_thoughts)
        if "queue" in out.timings:
            m.queue_time.observe(out.timings["queue"])
