"""Prometheus metrics (prometheus-client), one registry per process.

Every Koerier process serves its own metrics: an API process at ``/metrics`` on its own
port, a worker process on ``--metrics-port`` (+ its index). Prometheus scrapes each process
and sums counters across them. The gauges read from PostgreSQL (retry backlog, failed
deliveries, open circuit breakers) describe the whole installation: every process that
serves them reports the same value, so aggregate them with ``max``, not ``sum``. Worker
processes refresh them from their relay loop, API processes when scraped; both at most
every ``INSTALLATION_REFRESH_SECONDS``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import tornado.web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

DATABASE_CHECK_SECONDS = 2.0
# The installation-wide gauges count rows of the delivery table; reading them at most this
# often keeps frequent scrapes from turning into a load on PostgreSQL.
INSTALLATION_REFRESH_SECONDS = 10.0

_INSTALLATION_QUERY = """
    SELECT
      (SELECT count(*) FROM delivery WHERE state = 'scheduled' AND attempts > 0) AS backlog,
      (SELECT count(*) FROM delivery WHERE state = 'failed') AS failed,
      (SELECT count(*) FROM circuit WHERE open_until > now()) AS open_circuits
"""

NOTIFICATIONS_RECEIVED = Counter(
    "koerier_notifications_received_total",
    "Notifications accepted by the API (answered 201), per kanaal.",
    ["kanaal"],
)
PUBLISHED = Counter(
    "koerier_broker_published_total",
    "Delivery messages published to RabbitMQ, by result: confirmed, nacked, lost (the "
    "connection closed before the confirm) or left_to_relay (no connection at all).",
    ["result"],
)
RELAYED = Counter(
    "koerier_relay_published_total",
    "Deliveries the relay handed to RabbitMQ: due (retries, deferred, and what the API "
    "could not publish) or stale (queued too long, the safety net).",
    ["reason"],
)
DELIVERIES = Counter(
    "koerier_deliveries_total",
    "Delivery messages handled by workers, by outcome: delivered, retry_scheduled, failed, "
    "deferred_host_busy, deferred_circuit_open, cancelled, duplicate.",
    ["outcome"],
)
ATTEMPTS = Counter(
    "koerier_delivery_attempts_total",
    "HTTP delivery attempts, by result: success (2xx) or the error class of the failure.",
    ["result"],
)
LATENCY = Histogram(
    "koerier_delivery_latency_seconds",
    "From the notification's acceptance by the API to the subscriber's 2xx answer.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
)
ATTEMPT_DURATION = Histogram(
    "koerier_delivery_attempt_duration_seconds",
    "Duration of one HTTP delivery attempt, whatever its result.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRY_BACKLOG = Gauge(
    "koerier_retry_backlog",
    "Deliveries waiting for a retry (scheduled after at least one failed attempt); "
    "installation-wide, read from PostgreSQL.",
)
FAILED_DELIVERIES = Gauge(
    "koerier_failed_deliveries",
    "Deliveries in state failed (all retries used); installation-wide, read from PostgreSQL.",
)
OPEN_CIRCUITS = Gauge(
    "koerier_open_circuit_breakers",
    "Abonnementen whose circuit breaker is open now; installation-wide, read from PostgreSQL.",
)
CIRCUIT_EVENTS = Counter(
    "koerier_circuit_breaker_events_total",
    "Circuit breaker transitions seen by this process: opened or closed.",
    ["event"],
)
BROKER_CONNECTED = Gauge(
    "koerier_broker_connected",
    "1 when this process's RabbitMQ connection (publisher or consumer) is open.",
    ["role"],
)
DATABASE_UP = Gauge(
    "koerier_database_up",
    "1 when this process's last PostgreSQL query succeeded.",
)
IN_FLIGHT = Gauge(
    "koerier_worker_in_flight",
    "Delivery messages this worker process holds (claimed, waiting or sending).",
)


def notification_received(kanaal: str) -> None:
    """Count one accepted notification; the API calls this after the commit."""
    NOTIFICATIONS_RECEIVED.labels(kanaal).inc()


async def refresh_installation(conn: Any) -> None:
    """Read the installation-wide gauges (backlog, failed, open circuits) over ``conn``."""
    cursor = await conn.execute(_INSTALLATION_QUERY)
    row = await cursor.fetchone()
    assert row is not None
    RETRY_BACKLOG.set(row["backlog"])
    FAILED_DELIVERIES.set(row["failed"])
    OPEN_CIRCUITS.set(row["open_circuits"])


def render() -> tuple[bytes, str]:
    """The process's metrics in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def serve(port: int, address: str = "127.0.0.1") -> None:
    """Serve ``/metrics`` from a background thread (the worker processes use this)."""
    start_http_server(port, addr=address)


class MetricsHandler(tornado.web.RequestHandler):
    """``GET /metrics`` of an API process; refreshes the connectivity gauges first, and the
    installation-wide gauges when they are older than ``INSTALLATION_REFRESH_SECONDS``.

    The API refreshes them itself because it is the endpoint operators scrape, and workers
    serve metrics only with ``--metrics-port``. It does so here, on a scrape, so the publish
    path never waits for these counts.
    """

    # Monotonic time of this process's last successful refresh; shared by all requests.
    _installation_read_at: float | None = None

    def initialize(self, publisher: Any = None) -> None:
        self._publisher = publisher

    async def get(self) -> None:
        from koerier import db

        if self._publisher is not None:
            BROKER_CONNECTED.labels("publisher").set(1 if self._publisher.is_connected() else 0)
        read_at = MetricsHandler._installation_read_at
        now = time.monotonic()
        stale = read_at is None or now - read_at >= INSTALLATION_REFRESH_SECONDS
        try:
            async with asyncio.timeout(DATABASE_CHECK_SECONDS), db.connection() as conn:
                if stale:
                    # The counts double as the connectivity check.
                    await refresh_installation(conn)
                    MetricsHandler._installation_read_at = now
                else:
                    await conn.execute("SELECT 1")
            DATABASE_UP.set(1)
        except (TimeoutError, db.DatabaseUnavailable):
            DATABASE_UP.set(0)
        body, content_type = render()
        self.set_header("Content-Type", content_type)
        self.finish(body)
