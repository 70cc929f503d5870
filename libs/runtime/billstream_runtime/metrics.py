"""Prometheus metrics shared by every service (each process has its own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "billstream_http_requests_total", "HTTP requests", ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "billstream_http_request_seconds", "HTTP request duration", ["route"], registry=r
        )
        self.events_appended = Counter(
            "billstream_events_appended_total", "Events appended to the log", ["type"], registry=r
        )
        self.events_published = Counter(
            "billstream_events_published_total", "Events published by the relay", ["topic"],
            registry=r,
        )
        self.relay_lag = Gauge(
            "billstream_relay_lag_events",
            "Log rows (events; a usage batch is one) not yet published", registry=r
        )
        self.relay_republishes = Counter(
            "billstream_relay_republish_total", "Times the relay republished its whole log",
            registry=r,
        )
        self.events_consumed = Counter(
            "billstream_events_consumed_total",
            "Events consumed, by outcome (applied, duplicate, unknown_type, dead_lettered)",
            ["consumer", "outcome"], registry=r,
        )
        self.consumer_batch = Histogram(
            "billstream_consumer_batch_seconds", "Time to apply one consumed batch", ["consumer"],
            registry=r,
        )
        self.custom: dict[str, object] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)
