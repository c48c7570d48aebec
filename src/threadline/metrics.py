"""Prometheus metrics. Each app owns its registry (no process-global state), so several apps
can live in one process, as they do in tests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.runs_finished = Counter(
            "threadline_runs_finished_total",
            "Runs that ended, by final status",
            ["status"],
            registry=self.registry,
        )
        self.runs_started = Counter(
            "threadline_runs_started_total",
            "Run attempts started by this process",
            registry=self.registry,
        )
        self.runs_active = Gauge(
            "threadline_runs_active", "Runs executing in this process", registry=self.registry
        )
        self.runs_by_state = Gauge(
            "threadline_runs",
            "Runs in the database by state (sampled on scrape)",
            ["status"],
            registry=self.registry,
        )
        self.run_duration = Histogram(
            "threadline_run_duration_seconds",
            "Wall time of finished run attempts",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.tool_calls = Counter(
            "threadline_tool_calls_total", "Tool calls executed", registry=self.registry
        )
        self.sockets_active = Gauge(
            "threadline_sockets_active",
            "Open WebSocket and SSE connections",
            registry=self.registry,
        )
        self.events_delivered = Counter(
            "threadline_events_delivered_total",
            "Events written to client connections",
            registry=self.registry,
        )
        self.events_dropped = Counter(
            "threadline_events_dropped_total",
            "Events not delivered because a connection's queue overflowed (it was closed)",
            registry=self.registry,
        )
        self.deltas_out_of_place = Counter(
            "threadline_deltas_out_of_place_total",
            "Text deltas not sent to a connection because it had not got, or had passed, the "
            "durable event they follow (their text arrives in message_created)",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
