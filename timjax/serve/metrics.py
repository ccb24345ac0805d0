"""Prometheus metrics of one server (a registry per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("timjax_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.queue = Gauge("timjax_queue_depth", "requests waiting for the engine", registry=r)
        self.running = Gauge("timjax_running", "requests in the engine", registry=r)
        self.tokens = Counter("timjax_tokens", "tokens by kind (prompt, generated)", ["kind"], registry=r)
        self.pages_used = Gauge("timjax_kv_pages_used", "KV cache pages held by running sequences", registry=r)
        self.pages_free = Gauge("timjax_kv_pages_free", "KV cache pages free", registry=r)
        self.pruned = Counter("timjax_pruned_tokens", "KV entries pruned (finished subtask lists)", registry=r)
        self.finished = Counter("timjax_generations", "finished generations by status", ["status"], registry=r)
        self.tool_calls = Counter("timjax_tool_calls", "tool calls inside the inference", ["status"], registry=r)
        self.tool_latency = Histogram(
            "timjax_tool_call_seconds",
            "tool call latency",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )

    def on_finish(self, job) -> None:
        """Called on the engine thread when a job ends."""
        res = job.result
        self.finished.labels(job.status).inc()
        self.tokens.labels("prompt").inc(res.stats.prompt_tokens)
        self.tokens.labels("generated").inc(res.stats.generated_tokens)
        self.pruned.inc(res.stats.pruned_tokens)
        for c in res.tool_calls:
            self.tool_calls.labels(c.status).inc()
            self.tool_latency.observe(c.latency_s)

    def render(self, backend_stats: dict) -> bytes:
        self.queue.set(backend_stats["queued"])
        self.running.set(backend_stats["running"])
        self.pages_used.set(backend_stats["kv_pages_used"])
        self.pages_free.set(backend_stats["kv_pages_free"])
        return generate_latest(self.registry)
