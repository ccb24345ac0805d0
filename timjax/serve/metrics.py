"""Prometheus metrics of one server (a registry per app, so tests can run several).

The engine's own figures (queue depth, running, parked, KV pages used / free, tokens generated, pruned
tokens, tool calls, finished requests, preemptions, steps) are read from ``engine.stats()`` (an
``EngineStats`` snapshot) when ``/metrics`` is scraped, never recomputed here. The server adds what only it
sees: HTTP requests by route and status, finished requests by status, prompt tokens, and each tool call's
status and latency (from the results)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# EngineStats field -> (metric name, help, kind)
_ENGINE = {
    "waiting": ("timjax_queue_depth", "requests accepted and waiting for a cache slot", "gauge"),
    "running": ("timjax_running", "requests holding a cache slot", "gauge"),
    "parked": ("timjax_parked", "requests waiting on a tool call", "gauge"),
    "kv_pages_used": ("timjax_kv_pages_used", "KV cache pages held by running sequences", "gauge"),
    "kv_pages_free": ("timjax_kv_pages_free", "KV cache pages free", "gauge"),
    "tokens_generated_total": ("timjax_generated_tokens", "tokens written for requests (sampled and forced)", "counter"),
    "pruned_tokens_total": ("timjax_pruned_tokens", "KV entries dropped by subtask pruning", "counter"),
    "tool_calls_total": ("timjax_tool_calls", "tool calls inside the inference", "counter"),
    "requests_finished_total": ("timjax_engine_requests_finished", "requests the engine finished", "counter"),
    "preemptions_total": ("timjax_preemptions", "sequences preempted for pages", "counter"),
    "steps_total": ("timjax_engine_steps", "engine iterations", "counter"),
    "warmup_shapes_left": ("timjax_warmup_shapes_left", "step shapes the background warmup has still to compile", "gauge"),
    "prefix_cache_hit_tokens_total": (
        "timjax_prefix_cache_hit_tokens",
        "prompt tokens mapped from cached KV pages instead of computed",
        "counter",
    ),
    "prefix_cache_pages": ("timjax_prefix_cache_pages", "KV pages the prefix cache holds", "gauge"),
    "prefix_cache_evictions_total": (
        "timjax_prefix_cache_evictions",
        "cached KV pages reclaimed for the allocator (LRU)",
        "counter",
    ),
}


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        for field, (name, doc, kind) in _ENGINE.items():
            fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc)
            fam.add_metric([], s[field])
            yield fam


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("timjax_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("timjax_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.finished = Counter("timjax_generations", "finished generations by status", ["status"], registry=r)
        self.tool_status = Counter(
            "timjax_tool_call_results", "tool calls of finished requests by status", ["status"], registry=r
        )
        self.tool_latency = Histogram(
            "timjax_tool_call_seconds",
            "tool call latency",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )

    def watch(self, stats: Callable[[], dict]) -> None:
        """Read the engine's figures from ``stats()`` (``Backend.stats``) at each scrape."""
        self.registry.register(_EngineCollector(stats))

    def on_finish(self, job) -> None:
        """Called on the server's event loop when a job ends."""
        res = job.result
        self.finished.labels(job.status).inc()
        self.prompt_tokens.inc(res.stats.prompt_tokens)
        for c in res.tool_calls:
            self.tool_status.labels(c.status).inc()
            self.tool_latency.observe(c.latency_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
