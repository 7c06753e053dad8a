"""The seven faults Koerier's delivery must survive, each against real RabbitMQ and
PostgreSQL, real ``koerier serve`` and ``koerier worker`` processes and real loopback
subscribers. Tests that break a server start their own, so the session's stay healthy.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import psycopg
import pytest

from tests.apiharness import ApiServer
from tests.conftest import koerier_env
from tests.delivery_support import (
    FAST_ENV,
    WorkerProcess,
    api_token,
    make_abonnementen,
    publish,
    states,
    store_notification,
    wait_until,
)
from tests.harness import PostgresServer, RabbitServer
from tests.harness import run_koerier as koerier
from tests.subscriber import Subscriber

pytestmark = pytest.mark.timeout(240)

ENV = FAST_ENV | {"KOERIER_CLIENT_CACHE_SECONDS": "60"}


@pytest.fixture
def logs(tmp_path):
    return tmp_path


def start_api(env, logs, processes=1):
    server = ApiServer(env, logs / "api.log", processes=processes)
    server.start()
    return server


def accepted(results):
    return {item.notification_uuid for item in results if item.status == 201}


def duplicates(server):
    """Requests beyond the first per (notification, callback path)."""
    counts = Counter((item.headers.get("Koerier-Notification-Id"), item.path)
                     for item in server.requests())
    return sum(count - 1 for count in counts.values())


def test_worker_killed_with_sigkill_mid_delivery_delivers_every_notification(
    clean_db, base_env, logs
):
    env = base_env | ENV
    with Subscriber(ports=2, delay=0.2) as server:
        make_abonnementen(clean_db, [server.url(0, "/a"), server.url(1, "/b")])
        token = api_token(clean_db)
        api = start_api(env, logs)
        first = WorkerProcess(env, logs, concurrency=16)
        try:
            first.wait_ready()
            results = publish(api.url, token, 150)
            server.wait_for(60, timeout=30)

            first.kill()
            second = WorkerProcess(env, logs, concurrency=16)
            wait_until(lambda: states(clean_db) == {"delivered": 300}, 90,
                       "every delivery delivered after the kill")
            second.terminate()
        finally:
            first.kill()
            api.stop()

        assert len(accepted(results)) == 150
        received = {(item.headers["Koerier-Notification-Id"], item.path)
                    for item in server.requests()}
        assert received == {(uuid, path) for uuid in accepted(results) for path in ("/a", "/b")}
        # Only the requests in flight at the kill may repeat: at most the concurrency.
        assert duplicates(server) <= 16


def test_broker_stopped_while_publishing_and_while_queued_loses_and_repeats_nothing(
    clean_db, pg_server, logs
):
    rabbit = RabbitServer()
    rabbit.start()
    env = koerier_env(pg_server, rabbit) | ENV
    api = None
    worker = None
    try:
        with Subscriber() as server:
            make_abonnementen(clean_db, [server.url()])
            token = api_token(clean_db)
            api = start_api(env, logs)
            wait_until(lambda: api_ready(api), 30, "API connected to the broker")

            # No worker yet: these wait in the queue when the broker goes down.
            queued = publish(api.url, token, 100)
            wait_until(lambda: states(clean_db) == {"queued": 100}, 20, "100 queued")
            rabbit.stop()
            during_outage = publish(api.url, token, 100)
            rabbit.start()
            worker = WorkerProcess(env, logs)
            wait_until(lambda: len(server.requests()) >= 200, 90, "200 delivered")

            # And once more with the worker running: broker gone mid-stream.
            stream: list = []
            publisher = threading.Thread(target=lambda: stream.extend(
                publish(api.url, token, 150, concurrency=5)))
            publisher.start()
            wait_until(lambda: len(server.requests()) >= 230, 30, "stream under way")
            rabbit.stop()
            time.sleep(1)
            rabbit.start()
            publisher.join(60)
            wait_until(lambda: states(clean_db) == {"delivered": 350}, 120, "350 delivered")
            time.sleep(1)
    finally:
        if worker is not None:
            worker.terminate()
        if api is not None:
            api.stop()
        rabbit.destroy()

    everything = queued + during_outage + stream
    assert [item.status for item in everything] == [201] * 350, \
        Counter((item.status, item.error) for item in everything)
    assert set(server.count_by_notification()) == accepted(everything)
    # Only attempts interrupted by the outage may repeat (the worker's concurrency bounds them).
    assert duplicates(server) <= 32


def api_ready(api):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api.url}/readyz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_database_restarted_under_load_answers_503_problems_and_recovers(
    rabbit_server, logs
):
    pg = PostgresServer()
    pg.start()
    env = koerier_env(pg, rabbit_server) | ENV
    migrate = koerier(env, "migrate")
    assert migrate.returncode == 0, migrate.stderr
    api = worker = None
    results: list = []
    try:
        with Subscriber() as server, psycopg.connect(pg.conninfo(), autocommit=True) as conn:
            make_abonnementen(conn, [server.url()])
            token = api_token(conn)
            api = start_api(env, logs)
            worker = WorkerProcess(env, logs)
            worker.wait_ready()

            stop = threading.Event()

            def load():
                while not stop.is_set():
                    results.extend(publish(api.url, token, 10, concurrency=2, timeout=10))

            loader = threading.Thread(target=load)
            loader.start()
            time.sleep(2)
            pg.stop()
            time.sleep(3)
            pg.start()
            time.sleep(4)
            stop.set()
            loader.join(30)

            delivered = accepted(results)
            wait_until(lambda: delivered <= set(server.count_by_notification()), 60,
                       "every 201'd notification delivered")
    finally:
        if worker is not None:
            worker.terminate()
        if api is not None:
            api.stop()
        pg.destroy()

    statuses = Counter(item.status for item in results)
    assert set(statuses) <= {201, 503}, Counter((item.status, item.error) for item in results)
    assert statuses[503] > 0, "the outage was not seen"
    assert all(item.content_type.startswith("application/problem+json")
               for item in results if item.status == 503)
    after = [item.status for item in results][-5:]
    assert after == [201] * 5, "the API did not recover without a restart"


def test_subscriber_failing_500_timeout_refused_then_recovering_is_delivered_with_attempts(
    clean_db, base_env, logs
):
    env = base_env | ENV | {"KOERIER_RELAY_GRACE_SECONDS": "0", "KOERIER_RETRY_MAX": "8",
                            "KOERIER_DELIVERY_TIMEOUT_SECONDS": "1"}
    with Subscriber(keep_alive=False) as server:
        [abonnement] = make_abonnementen(clean_db, [server.url()])
        worker = WorkerProcess(env, logs)
        try:
            worker.wait_ready()
            server.set_mode("error")
            store_notification(clean_db, [abonnement])
            server.wait_for(1, timeout=10)
            server.set_mode("hang")
            server.wait_for(2, timeout=10)
            server.set_mode("refuse")
            wait_until(lambda: attempts(clean_db)[2:3] == [("connection_error", None)], 15,
                       "a refused attempt recorded")
            server.set_mode("ok")
            wait_until(lambda: states(clean_db) == {"delivered": 1}, 15, "delivered")
        finally:
            worker.terminate()

    recorded = attempts(clean_db)
    assert recorded[:2] == [("http_status", 500), ("timeout", None)]
    assert set(recorded[2:-1]) == {("connection_error", None)}
    assert recorded[-1] == (None, 204)


def attempts(conn):
    return [tuple(row) for row in conn.execute(
        "SELECT error_class, status_code FROM delivery_attempt ORDER BY number").fetchall()]


def test_subscriber_that_never_recovers_ends_failed_listed_and_resendable(
    clean_db, base_env, logs
):
    env = base_env | ENV | {"KOERIER_RELAY_GRACE_SECONDS": "0", "KOERIER_RETRY_MAX": "3"}
    with Subscriber() as server:
        [abonnement] = make_abonnementen(clean_db, [server.url()])
        abonnement_uuid = clean_db.execute("SELECT uuid::text FROM abonnement").fetchone()[0]
        worker = WorkerProcess(env, logs)
        try:
            worker.wait_ready()
            server.set_mode("refuse")
            store_notification(clean_db, [abonnement])
            wait_until(lambda: states(clean_db) == {"failed": 1}, 30, "failed")
            listed = koerier(env, "deliveries", "failed", "--abonnement", abonnement_uuid)
            server.set_mode("ok")
            resent = koerier(env, "deliveries", "resend", "--abonnement", abonnement_uuid)
            wait_until(lambda: states(clean_db) == {"delivered": 1}, 15, "delivered")
        finally:
            worker.terminate()

    assert "1 failed delivery\n" in listed.stdout
    assert "connection_error" in listed.stdout
    assert resent.returncode == 0, resent.stderr
    assert len(attempts(clean_db)) == 5
    assert worker.events("delivery_given_up")



def test_one_hanging_subscriber_does_not_delay_fifty_healthy_ones(clean_db, base_env, logs):
    env = base_env | ENV | {"KOERIER_DELIVERY_TIMEOUT_SECONDS": "10"}
    with Subscriber(ports=51) as server:
        server.set_mode("hang", 0)
        make_abonnementen(clean_db, [server.url(i, f"/s{i}") for i in range(51)])
        token = api_token(clean_db)
        api = start_api(env, logs)
        worker = WorkerProcess(env, logs, concurrency=16)
        try:
            worker.wait_ready()
            results = []
            for _ in range(12):
                results += publish(api.url, token, 1, concurrency=1)
                time.sleep(0.3)
            wait_until(lambda: len(server.requests()) >= 12 * 50 + 8, 20,
                       "every healthy subscriber served")
        finally:
            worker.kill()
            api.stop()

    published_at = {item.notification_uuid: item.at for item in results}
    healthy = [item for item in server.requests() if item.port_index != 0]
    delays = sorted(item.at - published_at[item.headers["Koerier-Notification-Id"]]
                    for item in healthy)
    print(f"\nhealthy deliveries beside a hanging one: median {delays[len(delays) // 2]:.3f} s,"
          f" slowest {delays[-1]:.3f} s")
    assert len(healthy) == 12 * 50
    assert delays[-1] < 1.0, f"slowest healthy delivery took {delays[-1]:.2f} s"


@pytest.mark.slow
def test_fan_out_to_a_thousand_abonnementen_reaches_each_exactly_once(clean_db, base_env, logs):
    env = base_env | ENV
    with Subscriber(ports=20) as server:
        make_abonnementen(clean_db, [server.url(i % 20, f"/a{i}") for i in range(1000)])
        token = api_token(clean_db)
        api = start_api(env, logs)
        worker = WorkerProcess(env, logs, processes=2, concurrency=32)
        try:
            worker.wait_for_event("broker_connected", count=4)
            [result] = publish(api.url, token, 1)
            server.wait_for(1000, timeout=60)
            wait_until(lambda: states(clean_db) == {"delivered": 1000}, 30, "all recorded")
            time.sleep(1)
        finally:
            worker.terminate()
            api.stop()

    assert result.status == 201
    paths = Counter(item.path for item in server.requests())
    assert paths == Counter({f"/a{i}": 1 for i in range(1000)})


@pytest.mark.slow
@pytest.mark.timeout(600)  # about a minute on a quiet machine; CI machines are shared
def test_burst_of_five_thousand_notifications_is_delivered_once_each(clean_db, base_env, logs):
    env = base_env | ENV
    with Subscriber() as server:
        make_abonnementen(clean_db, [server.url()])
        token = api_token(clean_db)
        api = start_api(env, logs, processes=2)
        worker = WorkerProcess(env, logs, processes=2, concurrency=32)
        try:
            worker.wait_for_event("broker_connected", count=4)
            started = time.monotonic()
            results = publish(api.url, token, 5000, concurrency=50)
            published = time.monotonic() - started
            server.wait_for(5000, timeout=400)
            finished = time.monotonic() - started
            time.sleep(1)
        finally:
            worker.terminate()
            api.stop()

    print(f"\nburst: 5000 accepted in {published:.1f} s, all delivered after {finished:.1f} s")
    assert [item.status for item in results].count(201) == 5000
    counts = server.count_by_notification()
    assert set(counts) == accepted(results)
    assert set(counts.values()) == {1}
