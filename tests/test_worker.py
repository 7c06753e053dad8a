"""The ``koerier worker`` process: graceful stop, several processes, its metrics port; and
the installation-wide gauges on the API's ``/metrics``, which need no worker at all."""

from __future__ import annotations

import urllib.request

from tests.apiharness import ApiServer
from tests.delivery_support import (
    FAST_ENV,
    WorkerProcess,
    make_abonnementen,
    states,
    store_notification,
    wait_until,
)
from tests.harness import free_port
from tests.subscriber import Subscriber

# Fresh deliveries go through the relay at once: these tests need no publisher of their own.
ENV = FAST_ENV | {"KOERIER_RELAY_GRACE_SECONDS": "0"}


def test_worker_on_sigterm_finishes_in_flight_deliveries_and_exits(
    clean_db, base_env, tmp_path
):
    with Subscriber(delay=1.5) as server:
        [abonnement] = make_abonnementen(clean_db, [server.url()])
        worker = WorkerProcess(base_env | ENV, tmp_path)
        worker.wait_ready()
        for _ in range(5):
            store_notification(clean_db, [abonnement])
        server.wait_for(5, timeout=10)

        exit_code = worker.terminate(timeout=20)

        assert exit_code == 0, worker.log_tail()
        assert states(clean_db) == {"delivered": 5}
        assert len(server.requests()) == 5
        assert worker.events("worker_stopped")


def test_worker_pool_of_two_processes_delivers_and_stops_on_sigterm(
    clean_db, base_env, tmp_path
):
    with Subscriber(ports=4) as server:
        abonnementen = make_abonnementen(clean_db, [server.url(i) for i in range(4)])
        worker = WorkerProcess(base_env | ENV, tmp_path, processes=2, concurrency=4)
        worker.wait_for_event("broker_connected", count=4)
        for _ in range(25):
            store_notification(clean_db, abonnementen)

        wait_until(lambda: states(clean_db) == {"delivered": 100}, 30, "all 100 delivered")
        exit_code = worker.terminate(timeout=20)

        assert exit_code == 0, worker.log_tail()
        assert len(server.requests()) == 100
        assert {event["worker"] for event in worker.events("worker_started")} == {0, 1}
        assert len(worker.events("worker_stopped")) == 2


def test_worker_metrics_port_serves_delivery_metrics(clean_db, base_env, tmp_path):
    port = free_port()
    with Subscriber() as server:
        [abonnement] = make_abonnementen(clean_db, [server.url()])
        worker = WorkerProcess(base_env | ENV, tmp_path, extra=["--metrics-port", str(port)])
        try:
            worker.wait_ready()
            store_notification(clean_db, [abonnement])
            wait_until(lambda: states(clean_db) == {"delivered": 1}, 10, "delivered")

            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) \
                .read().decode()
        finally:
            worker.terminate()

    assert 'koerier_deliveries_total{outcome="delivered"} 1.0' in text
    assert 'koerier_broker_connected{role="consumer"} 1.0' in text
    assert 'koerier_broker_connected{role="publisher"} 1.0' in text
    assert "koerier_delivery_latency_seconds_count 1.0" in text
    assert "koerier_database_up 1.0" in text
    for name in ("koerier_retry_backlog", "koerier_failed_deliveries",
                 "koerier_open_circuit_breakers", "koerier_relay_published_total"):
        assert name in text


def test_api_metrics_without_any_worker_report_the_installation_wide_gauges(
    clean_db, base_env, tmp_path
):
    [abonnement] = make_abonnementen(clean_db, ["http://127.0.0.1:9/"])
    _, delivery_ids = store_notification(clean_db, [abonnement] * 5)
    clean_db.execute("UPDATE delivery SET state = 'scheduled', attempts = 1 WHERE id = ANY(%s)",
                     (delivery_ids[:3],))
    clean_db.execute("UPDATE delivery SET state = 'failed', attempts = 8 WHERE id = ANY(%s)",
                     (delivery_ids[3:],))
    clean_db.execute("INSERT INTO circuit (abonnement_id, consecutive_failures, open_until) "
                     "VALUES (%s, 5, now() + interval '1 hour')", (abonnement,))
    # A server of its own: a scrape by another test must not have primed its gauges.
    server = ApiServer(base_env, tmp_path / "api.log")
    server.start()
    try:
        text = urllib.request.urlopen(f"{server.url}/metrics", timeout=10).read().decode()
    finally:
        server.stop()

    assert "\nkoerier_retry_backlog 3.0\n" in text
    assert "\nkoerier_failed_deliveries 2.0\n" in text
    assert "\nkoerier_open_circuit_breakers 1.0\n" in text


def test_circuit_probe_success_lets_the_losers_of_the_probe_race_follow_within_seconds(
    clean_db, base_env, tmp_path
):
    # An open period far longer than the test: a loser deferred by it would miss the deadline.
    env = base_env | ENV | {"KOERIER_CIRCUIT_OPEN_SECONDS": "60"}
    with Subscriber(delay=1.0) as server:
        [abonnement] = make_abonnementen(clean_db, [server.url()])
        clean_db.execute("INSERT INTO circuit (abonnement_id, consecutive_failures, open_until) "
                         "VALUES (%s, 50, now() - interval '1 second')", (abonnement,))
        worker = WorkerProcess(env, tmp_path)
        try:
            worker.wait_ready()
            for _ in range(4):
                store_notification(clean_db, [abonnement])

            wait_until(lambda: states(clean_db) == {"delivered": 4}, 10, "all 4 delivered")
        finally:
            worker.terminate()

    assert len(worker.events("circuit_probe")) == 1
    assert len(worker.events("circuit_closed")) == 1
    assert len(server.requests()) == 4
