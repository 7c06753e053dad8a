"""Delivery end to end: publisher -> RabbitMQ -> a real ``koerier worker`` -> subscriber.

The notification rows are written as the API's write path writes them, and the ids are
handed to the same publisher the API uses (``relay.api_publisher``), in this process.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from structlog.testing import capture_logs

from koerier import db, delivery, relay
from koerier.broker import Publisher
from koerier.config import load_settings
from tests.delivery_support import (
    FAST_ENV,
    WorkerProcess,
    make_abonnementen,
    message,
    states,
    store_notification,
    wait_until,
)
from tests.harness import run_koerier
from tests.subscriber import Subscriber

WORKER_ENV = FAST_ENV | {
    "KOERIER_RETRY_MAX": "3",
    "KOERIER_CIRCUIT_FAILURE_THRESHOLD": "3",
    "KOERIER_CIRCUIT_OPEN_SECONDS": "2",
}


@pytest.fixture(scope="module")
def worker(base_env, tmp_path_factory):
    process = WorkerProcess(base_env | WORKER_ENV, tmp_path_factory.mktemp("worker"))
    process.wait_ready()
    yield process
    process.terminate()


@pytest.fixture
def callback_server():
    with Subscriber(ports=2) as server:
        yield server


@pytest.fixture
async def publisher(base_env):
    settings = load_settings()
    await db.open_pool(settings)
    publisher = relay.api_publisher(settings)
    publisher.start()
    assert await publisher.wait_connected(15)
    yield publisher
    await publisher.close()
    await db.close_pool()


def run_cli(env, *args):
    return run_koerier(env, *args, timeout=60)


async def test_published_delivery_reaches_the_subscriber_unchanged_with_headers(
    clean_db, worker, publisher, callback_server
):
    [abonnement] = make_abonnementen(clean_db, [callback_server.url()], auth="Bearer abc")
    body = message()
    notification_uuid, delivery_ids = store_notification(clean_db, [abonnement], body)

    started = time.time()
    publisher.submit(delivery_ids)
    [received] = await asyncio.to_thread(callback_server.wait_for, 1, 10)
    latency = received.at - started

    assert received.body == body.encode()
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["Authorization"] == "Bearer abc"
    assert received.headers["Koerier-Notification-Id"] == notification_uuid
    assert received.headers["Koerier-Delivery-Attempt"] == "1"
    assert latency < 1.0, f"first attempt took {latency:.3f} s"
    await asyncio.to_thread(wait_until, lambda: states(clean_db) == {"delivered": 1}, 5,
                            "delivery recorded as delivered")
    attempt = clean_db.execute(
        "SELECT number, status_code, outcome FROM delivery_attempt").fetchall()
    assert attempt == [(1, 204, "success")]


async def test_duplicate_broker_messages_cause_one_request(
    clean_db, worker, publisher, callback_server
):
    [abonnement] = make_abonnementen(clean_db, [callback_server.url()])
    _, delivery_ids = store_notification(clean_db, [abonnement])

    await publisher.publish(delivery_ids * 5)
    await asyncio.to_thread(callback_server.wait_for, 1, 10)
    await asyncio.sleep(1.0)

    assert len(callback_server.requests()) == 1
    assert states(clean_db) == {"delivered": 1}


async def test_failed_attempts_are_retried_with_rising_attempt_numbers(
    clean_db, worker, publisher, callback_server
):
    [abonnement] = make_abonnementen(clean_db, [callback_server.url()])
    _, delivery_ids = store_notification(clean_db, [abonnement])
    callback_server.set_mode("error")

    publisher.submit(delivery_ids)
    await asyncio.to_thread(callback_server.wait_for, 2, 10)
    callback_server.set_mode("ok")
    received = await asyncio.to_thread(callback_server.wait_for, 3, 10)

    assert [item.headers["Koerier-Delivery-Attempt"] for item in received] == ["1", "2", "3"]
    await asyncio.to_thread(wait_until, lambda: states(clean_db) == {"delivered": 1}, 5,
                            "delivered after the retries")
    outcomes = clean_db.execute(
        "SELECT number, status_code, outcome FROM delivery_attempt ORDER BY number").fetchall()
    assert outcomes == [(1, 500, "failure"), (2, 500, "failure"), (3, 204, "success")]


async def test_delivery_that_never_succeeds_ends_failed_and_can_be_resent(
    clean_db, worker, publisher, callback_server, base_env
):
    [abonnement] = make_abonnementen(clean_db, [callback_server.url(1)])
    notification_uuid, delivery_ids = store_notification(clean_db, [abonnement])
    callback_server.set_mode("error", 1)

    publisher.submit(delivery_ids)
    await asyncio.to_thread(wait_until, lambda: states(clean_db) == {"failed": 1}, 20,
                            "delivery failed after the last retry")
    listed = run_cli(base_env, "deliveries", "failed")
    callback_server.set_mode("ok", 1)
    resent = run_cli(base_env, "deliveries", "resend", str(delivery_ids[0]))
    await asyncio.to_thread(wait_until, lambda: states(clean_db) == {"delivered": 1}, 15,
                            "re-sent delivery delivered")

    assert len(callback_server.requests()) == 5
    assert str(delivery_ids[0]) in listed.stdout and notification_uuid in listed.stdout
    assert resent.returncode == 0, resent.stderr
    last = callback_server.requests()[-1]
    assert last.headers["Koerier-Delivery-Attempt"] == "5"
    worker.wait_for_event("delivery_given_up")


async def test_delivery_the_api_could_not_publish_is_relayed(clean_db, worker, callback_server):
    [abonnement] = make_abonnementen(clean_db, [callback_server.url()])
    _, delivery_ids = store_notification(clean_db, [abonnement])

    # Nothing published: as if the broker had been down when the API answered 201.
    [received] = await asyncio.to_thread(callback_server.wait_for, 1, 10)

    assert received.headers["Koerier-Delivery-Attempt"] == "1"
    await asyncio.to_thread(wait_until, lambda: states(clean_db) == {"delivered": 1}, 5,
                            "relayed delivery delivered")


@pytest.mark.parametrize("lost", ["queued", "sending_lease_expired"])
async def test_delivery_whose_broker_message_was_lost_is_republished_by_the_safety_net(
    clean_db, worker, callback_server, lost
):
    [abonnement] = make_abonnementen(clean_db, [callback_server.url()])
    _, [delivery_id] = store_notification(clean_db, [abonnement])
    # Its message is gone (a broker that lost it, a worker killed after its claim): only
    # the relay's look at old queued and expired sending deliveries can bring it back.
    if lost == "queued":
        assignments = "state = 'queued'"
    else:
        assignments = ("state = 'sending', attempts = 1, "
                       "claimed_until = now() - interval '1 minute'")
    # The worker is shared by the module: count only this test's republish.
    republished_before = len(worker.events("relay_republished_stale"))
    clean_db.execute(
        f"UPDATE delivery SET {assignments}, queued_at = now() - interval '2 hours' "
        "WHERE id = %s", (delivery_id,))

    [received] = await asyncio.to_thread(callback_server.wait_for, 1, 10)

    expected_attempt = "1" if lost == "queued" else "2"
    assert received.headers["Koerier-Delivery-Attempt"] == expected_attempt
    await asyncio.to_thread(wait_until, lambda: states(clean_db) == {"delivered": 1}, 5,
                            "republished delivery delivered")
    worker.wait_for_event("relay_republished_stale", count=republished_before + 1)


async def test_delivery_being_sent_under_a_live_lease_is_not_republished(
    clean_db, worker, callback_server
):
    [abonnement] = make_abonnementen(clean_db, [callback_server.url()])
    _, [delivery_id] = store_notification(clean_db, [abonnement])
    clean_db.execute(
        "UPDATE delivery SET state = 'sending', attempts = 1, "
        "claimed_until = now() + interval '1 hour', queued_at = now() - interval '2 hours' "
        "WHERE id = %s", (delivery_id,))

    republished_before = len(worker.events("relay_republished_stale"))
    # Several relay passes (every 0.2 s here) find nothing to take.
    await asyncio.sleep(2)

    assert len(worker.events("relay_republished_stale")) == republished_before
    assert callback_server.requests() == []
    assert states(clean_db) == {"sending": 1}


async def test_circuit_opens_after_repeated_failures_and_closes_after_a_good_probe(
    clean_db, worker, publisher, callback_server
):
    [abonnement] = make_abonnementen(clean_db, [callback_server.url(1)])
    callback_server.set_mode("error", 1)
    delivery_ids = []
    for _ in range(6):
        delivery_ids += store_notification(clean_db, [abonnement])[1]
    opened_before = len(worker.events("circuit_opened"))

    publisher.submit(delivery_ids)
    await asyncio.to_thread(
        wait_until, lambda: len(worker.events("circuit_opened")) > opened_before, 10,
        "circuit_opened logged")
    await asyncio.sleep(0.5)
    attempts_while_open = len(callback_server.requests())
    callback_server.set_mode("ok", 1)
    await asyncio.to_thread(wait_until, lambda: states(clean_db) == {"delivered": 6}, 20,
                            "all delivered after the circuit closed")

    # Six deliveries at once, threshold three: the breaker stops the rest of the first
    # round from being attempted (a few were in flight when it opened).
    assert attempts_while_open < 12
    worker.wait_for_event("circuit_closed")


async def test_publisher_during_an_outage_logs_left_to_relay_once_then_a_summary(base_env):
    # Not started yet: every submit finds no channel, as during a broker outage.
    publisher = Publisher(load_settings())
    with capture_logs() as events:
        for delivery_id in range(1, 6):
            publisher.submit([delivery_id, delivery_id + 100])
        publisher.start()
        try:
            assert await publisher.wait_connected(15)
        finally:
            await publisher.close()

    left = [event for event in events if event["event"] == "publish_left_to_relay"]
    ended = [event for event in events if event["event"] == "publish_left_to_relay_ended"]
    assert len(left) == 1
    assert len(ended) == 1
    assert (ended[0]["publishes"], ended[0]["count"]) == (5, 10)


@pytest.fixture
def default_settings(monkeypatch):
    """The settings as shipped: no env file, no KOERIER_RETRY_* from anywhere."""
    monkeypatch.setenv("KOERIER_ENV_FILE", os.devnull)
    monkeypatch.setenv("KOERIER_ENVIRONMENT", "development")
    for name in list(os.environ):
        if name.startswith("KOERIER_RETRY_"):
            monkeypatch.delenv(name)
    return load_settings()


def test_retry_schedule_defaults_match_the_incumbent_about_a_day(default_settings):
    settings = default_settings

    schedule = delivery.retry_schedule(settings)

    assert schedule == [25, 100, 400, 1600, 6400, 25600, 52000]
    assert 23 * 3600 < sum(schedule) < 25 * 3600


@pytest.mark.parametrize("retry", [1, 4, 7])
def test_retry_delay_stays_within_the_jitter(default_settings, retry):
    settings = default_settings
    nominal = delivery.retry_schedule(settings)[retry - 1]

    delays = [delivery.retry_delay(settings, retry) for _ in range(200)]

    assert all(nominal * 0.8 <= value <= nominal * 1.2 for value in delays)
    assert len(set(delays)) > 1
