"""Prometheus metrics of the server (prometheus-client), fed by the engine's observer hooks."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine import EngineObserver, EngineRequest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)


class Metrics(EngineObserver):
    """One registry per server (so several apps in one process, e.g. tests, do not collide)."""

    def __init__(self, engine_stats: Any = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("moeport_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("moeport_running_requests", "Requests in the running batch", registry=r)
        self.prompt_tokens = Counter("moeport_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Counter(
            "moeport_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.generated_tokens = Counter("moeport_generated_tokens", "Tokens generated", registry=r)
        self.requests = Counter("moeport_requests", "Finished requests by finish reason", ["finish_reason"], registry=r)
        self.hit_rate = Gauge(
            "moeport_prefix_cache_hit_rate", "Share of looked-up prompt tokens served from the prefix cache", registry=r
        )
        self.prefix_bytes = Gauge("moeport_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r)
        self.ttft = Histogram(
            "moeport_time_to_first_token_seconds", "Time from arrival to the first token", buckets=_LATENCY, registry=r
        )
        self.tpot = Histogram(
            "moeport_time_per_output_token_seconds",
            "Time per generated token after the first",
            buckets=_TPOT,
            registry=r,
        )
        self.queue_time = Histogram(
            "moeport_queue_time_seconds", "Time from arrival to admission", buckets=_LATENCY, registry=r
        )
        self.step_seconds = Histogram(
            "moeport_step_seconds", "Duration of one batched model step", buckets=_LATENCY, registry=r
        )
        self._engine = engine_stats

    def bind(self, engine: Any) -> None:
        """Read the live gauges from ``engine`` at scrape time."""
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.running.set_function(lambda: engine.running)
        self.hit_rate.set_function(lambda: engine.prefix_cache.hit_rate)
        self.prefix_bytes.set_function(lambda: engine.prefix_cache.nbytes)

    # -- engine hooks (engine thread) ----------------------------------------------------------------------
    def admitted(self, request: EngineRequest, queued_seconds: float) -> None:
        self.prompt_tokens.inc(len(request.prompt))
        self.cached_tokens.inc(request.cached_tokens)
        self.queue_time.observe(queued_seconds)

    def first_token(self, request: EngineRequest, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generated_tokens.inc(request.n)

    def tokens(self, count: int, seconds_per_token: float) -> None:
        self.generated_tokens.inc(count)
        for _ in range(count):
            self.tpot.observe(seconds_per_token)

    def finished(self, request: EngineRequest) -> None:
        if request.error is not None:
            self.requests.labels("error").inc()
            return
        for c in request.choices:
            self.requests.labels(c.finish_reason or "unknown").inc()

    def step(self, batch: int, seconds: float) -> None:
        self.step_seconds.observe(seconds)
