"""The worker's shared statements (koerier.delivery): ``claim_many`` claims several
deliveries and ``record_successes`` records several successful attempts, each in one
statement, and must leave the rows as the single-row statements would.

Runs against the session's real PostgreSQL, on an autocommit connection with dict rows as
the worker's pool hands out. Tests that take the ``batch`` fixture run twice: once with
the entry alone (a batch of one takes the single-row statements) and once behind another
delivery's entry in one statement.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.rows import dict_row

from koerier import delivery, relay
from koerier.delivery import AttemptResult, Recorded
from tests.delivery_support import make_abonnementen, message, store_notification

LEASE = 600.0
AUTH = "Bearer batch-token"


@dataclass(frozen=True)
class Arranged:
    """One stored delivery and what its claim should carry."""

    id: int
    abonnement_id: int
    notification_uuid: str
    body: str


@pytest.fixture
async def conn(clean_db, pg_server):
    connection = await psycopg.AsyncConnection.connect(
        pg_server.conninfo(), autocommit=True, row_factory=dict_row)
    async with connection:
        yield connection


def arrange(db, count: int, abonnement_id: int | None = None) -> list[Arranged]:
    """``count`` scheduled deliveries, each of its own notification; each to a new
    abonnement unless ``abonnement_id`` is given."""
    if abonnement_id is None:
        urls = [f"http://127.0.0.1:9/hook-{index}" for index in range(count)]
        abonnementen = make_abonnementen(db, urls, auth=AUTH)
    else:
        abonnementen = [abonnement_id] * count
    made = []
    for abonnement in abonnementen:
        body = message(resource=f"zaak-{len(made)}")
        notification_uuid, [delivery_id] = store_notification(db, [abonnement], body)
        made.append(Arranged(delivery_id, abonnement, notification_uuid, body))
    return made


def row(db, delivery_id: int) -> dict:
    with db.cursor(row_factory=dict_row) as cursor:
        return cursor.execute("SELECT * FROM delivery WHERE id = %s", (delivery_id,)).fetchone()


def lease_left(db, delivery_id: int) -> timedelta:
    return db.execute("SELECT claimed_until - now() FROM delivery WHERE id = %s",
                      (delivery_id,)).fetchone()[0]


def attempt_rows(db, delivery_id: int) -> list[dict]:
    with db.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            "SELECT * FROM delivery_attempt WHERE delivery_id = %s ORDER BY id",
            (delivery_id,)).fetchall()


def circuit_row(db, abonnement_id: int) -> dict | None:
    with db.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(
            "SELECT * FROM circuit WHERE abonnement_id = %s", (abonnement_id,)).fetchone()


def set_delivery(db, delivery_id: int, assignments: str) -> None:
    db.execute(f"UPDATE delivery SET {assignments} WHERE id = %s", (delivery_id,))


def success(status: int = 204, duration_ms: int = 15) -> AttemptResult:
    return AttemptResult(datetime.now(UTC), duration_ms, status, None, None)


class Batch:
    """Claims or records one entry alone, or as the second entry of a batch of two."""

    def __init__(self, db, together: bool) -> None:
        self.db = db
        self.together = together

    async def claim(self, conn, delivery_id: int, redelivered: bool = False):
        if not self.together:
            [claim] = await delivery.claim_many(conn, [(delivery_id, redelivered)], LEASE)
            return claim
        [other] = arrange(self.db, 1)
        company, claim = await delivery.claim_many(
            conn, [(other.id, False), (delivery_id, redelivered)], LEASE)
        assert company is not None and company.delivery_id == other.id
        return claim

    async def record(self, conn, claim, result: AttemptResult) -> Recorded:
        if not self.together:
            [recorded] = await delivery.record_successes(conn, [(claim, result)])
            return recorded
        [other] = arrange(self.db, 1)
        [other_claim] = await delivery.claim_many(conn, [(other.id, False)], LEASE)
        company, recorded = await delivery.record_successes(
            conn, [(other_claim, success()), (claim, result)])
        assert company == Recorded(True, 0, False)
        assert row(self.db, other.id)["state"] == "delivered"
        return recorded


@pytest.fixture(params=["alone", "in_a_batch"])
def batch(request, clean_db) -> Batch:
    return Batch(clean_db, together=request.param == "in_a_batch")


# claim_many


async def test_claim_many_claims_every_claimable_delivery_in_input_order(clean_db, conn):
    first, second, third = arrange(clean_db, 3)
    set_delivery(clean_db, second.id, "state = 'queued', attempts = 4, retry_from = 3")

    claims = await delivery.claim_many(
        conn, [(third.id, False), (first.id, False), (second.id, True)], LEASE)

    assert [claim.delivery_id for claim in claims] == [third.id, first.id, second.id]
    assert [claim.attempt for claim in claims] == [1, 1, 5]
    assert [claim.retry_from for claim in claims] == [0, 0, 3]
    for arranged, claim in zip([third, first, second], claims, strict=True):
        assert claim.abonnement_id == arranged.abonnement_id
        assert claim.notification_uuid == arranged.notification_uuid
        assert claim.message == arranged.body.encode()
    for arranged, attempts in [(first, 1), (second, 5), (third, 1)]:
        stored = row(clean_db, arranged.id)
        assert stored["state"] == "sending"
        assert stored["attempts"] == attempts
        assert timedelta(seconds=LEASE - 60) < lease_left(clean_db, arranged.id)
        assert lease_left(clean_db, arranged.id) <= timedelta(seconds=LEASE)


async def test_claim_many_gives_what_sending_needs(clean_db, conn, batch):
    [arranged] = arrange(clean_db, 1)
    abonnement = clean_db.execute(
        "SELECT uuid::text, callback_url FROM abonnement WHERE id = %s",
        (arranged.abonnement_id,)).fetchone()

    claim = await batch.claim(conn, arranged.id)

    assert claim == delivery.Claim(
        delivery_id=arranged.id, attempt=1, retry_from=0,
        notification_uuid=arranged.notification_uuid, message=arranged.body.encode(),
        received_at=claim.received_at, abonnement_id=arranged.abonnement_id,
        abonnement_uuid=abonnement[0], callback_url=abonnement[1], auth=AUTH,
        circuit_open_for=None, circuit_probing=False,
    )
    assert abs(claim.received_at - datetime.now(UTC).timestamp()) < 60


async def test_claim_many_of_a_delivery_with_an_open_circuit_says_for_how_long(
    clean_db, conn, batch
):
    [arranged] = arrange(clean_db, 1)
    clean_db.execute(
        "INSERT INTO circuit (abonnement_id, consecutive_failures, open_until, probing) "
        "VALUES (%s, 3, now() + interval '100 seconds', true)", (arranged.abonnement_id,))

    claim = await batch.claim(conn, arranged.id)

    assert 40 < claim.circuit_open_for <= 100
    assert claim.circuit_probing is True


async def test_claim_many_of_a_delivery_whose_abonnement_was_deleted_has_no_callback(
    clean_db, conn, batch
):
    [arranged] = arrange(clean_db, 1)
    clean_db.execute("DELETE FROM abonnement WHERE id = %s", (arranged.abonnement_id,))

    claim = await batch.claim(conn, arranged.id)

    assert claim.delivery_id == arranged.id
    assert (claim.callback_url, claim.abonnement_uuid, claim.auth) == (None, None, "")
    assert row(clean_db, arranged.id)["state"] == "sending"


@pytest.mark.parametrize("redelivered", [(False, False), (False, True), (True, False)],
                         ids=["plain", "second_redelivered", "first_redelivered"])
async def test_claim_many_with_an_id_twice_claims_it_for_its_first_entry(
    clean_db, conn, redelivered
):
    twice, other = arrange(clean_db, 2)

    claims = await delivery.claim_many(
        conn, [(twice.id, redelivered[0]), (other.id, False), (twice.id, redelivered[1])],
        LEASE)

    assert claims[0] is not None and claims[0].delivery_id == twice.id
    assert claims[0].attempt == 1
    assert claims[1] is not None and claims[1].delivery_id == other.id
    assert claims[2] is None
    assert row(clean_db, twice.id)["attempts"] == 1


async def test_claim_many_with_a_sending_id_twice_takes_it_over_once(clean_db, conn):
    [twice] = arrange(clean_db, 1)
    set_delivery(clean_db, twice.id,
                 "state = 'sending', attempts = 1, claimed_until = now() + interval '1 hour'")

    claims = await delivery.claim_many(conn, [(twice.id, True), (twice.id, True)], LEASE)

    assert claims[0] is not None and claims[0].attempt == 2
    assert claims[1] is None
    assert row(clean_db, twice.id)["attempts"] == 2


UNCLAIMABLE = {
    "delivered": "state = 'delivered', attempts = 1, finished_at = now()",
    "failed": "state = 'failed', attempts = 6, finished_at = now()",
    "cancelled": "state = 'cancelled', finished_at = now()",
    "scheduled_not_due": "due_at = now() + interval '1 hour'",
    "queued_not_due": "state = 'queued', due_at = now() + interval '1 hour'",
}


@pytest.mark.parametrize("assignments", UNCLAIMABLE.values(), ids=UNCLAIMABLE.keys())
@pytest.mark.parametrize("redelivered", [False, True], ids=["first", "redelivered"])
async def test_claim_many_of_an_unclaimable_delivery_gives_none_and_changes_nothing(
    clean_db, conn, batch, assignments, redelivered
):
    [arranged] = arrange(clean_db, 1)
    set_delivery(clean_db, arranged.id, assignments)
    before = row(clean_db, arranged.id)

    claim = await batch.claim(conn, arranged.id, redelivered)

    assert claim is None
    assert row(clean_db, arranged.id) == before


@pytest.mark.parametrize("redelivered", [False, True], ids=["first", "redelivered"])
async def test_claim_many_takes_a_sending_delivery_over_only_when_redelivered(
    clean_db, conn, batch, redelivered
):
    [arranged] = arrange(clean_db, 1)
    set_delivery(clean_db, arranged.id,
                 "state = 'sending', attempts = 1, claimed_until = now() + interval '1 hour'")

    claim = await batch.claim(conn, arranged.id, redelivered)

    stored = row(clean_db, arranged.id)
    assert stored["state"] == "sending"
    if redelivered:
        assert claim is not None and claim.attempt == 2
        assert stored["attempts"] == 2
        assert lease_left(clean_db, arranged.id) > timedelta(seconds=LEASE - 60)
    else:
        assert claim is None
        assert stored["attempts"] == 1
        assert lease_left(clean_db, arranged.id) <= timedelta(hours=1)


async def test_claim_many_takes_over_a_sending_delivery_whose_lease_ran_out(
    clean_db, conn, batch
):
    [arranged] = arrange(clean_db, 1)
    set_delivery(clean_db, arranged.id,
                 "state = 'sending', attempts = 1, claimed_until = now() - interval '1 second'")

    claim = await batch.claim(conn, arranged.id, redelivered=False)

    assert claim is not None and claim.attempt == 2
    assert row(clean_db, arranged.id)["attempts"] == 2


async def waiting_on_a_lock(db, timeout: float = 10.0) -> None:
    """Until some backend waits for a row lock (the other side of the test is blocked)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not db.execute("SELECT count(*) FROM pg_stat_activity "
                         "WHERE wait_event_type = 'Lock'").fetchone()[0]:
        assert asyncio.get_running_loop().time() < deadline, "nobody came to wait"
        await asyncio.sleep(0.02)


async def test_claim_many_beside_the_apis_mark_queued_never_deadlocks(
    clean_db, conn, pg_server
):
    low, high = arrange(clean_db, 2)
    # The plan a large table gets (the unnest drives an index lookup per id, in the order
    # the ids came), not the hash join a table of two rows would get.
    await conn.execute("SET enable_hashjoin = off")
    await conn.execute("SET enable_mergejoin = off")
    api_side = await psycopg.AsyncConnection.connect(pg_server.conninfo())
    async with api_side:
        # One mark_queued of both, as the API sends it, taken apart: it has locked the
        # lower row ...
        await api_side.execute(relay._MARK_QUEUED, {"ids": [low.id]})
        # ... when a worker claims both, the higher first (the order its messages came in) ...
        claiming = asyncio.ensure_future(delivery.claim_many(
            conn, [(high.id, False), (low.id, False)], LEASE))
        await waiting_on_a_lock(clean_db)
        # ... and it goes on to the higher row.
        await api_side.execute(relay._MARK_QUEUED, {"ids": [high.id]})
        await api_side.commit()
    claims = await asyncio.wait_for(claiming, 10)

    assert [claim.delivery_id for claim in claims if claim] == [high.id, low.id]
    assert {row(clean_db, each.id)["state"] for each in (low, high)} == {"sending"}


async def test_an_attempt_of_a_claim_taken_over_is_recorded_beside_a_batch_holding_its_row(
    clean_db, conn, pg_server
):
    taken_over, other = arrange(clean_db, 2)
    [stale] = await delivery.claim_many(conn, [(taken_over.id, False)], LEASE)
    taking_over = await psycopg.AsyncConnection.connect(pg_server.conninfo(),
                                                        row_factory=dict_row)
    async with taking_over:
        # A second worker got the redelivered message and took the delivery over ...
        [current, companion] = await delivery.claim_many(
            taking_over, [(taken_over.id, True), (other.id, False)], LEASE)
        await taking_over.commit()
        # ... and its batched success record holds both rows (kept open here).
        await delivery.record_successes(
            taking_over, [(current, success()), (companion, success())])
        # The first worker records its old attempt meanwhile. Inserting the attempt row
        # takes KEY SHARE on the delivery, which a batch's FOR UPDATE would block (and,
        # with a circuit lock in between, deadlock); NO KEY UPDATE lets it through.
        recorded = await asyncio.wait_for(delivery.record_successes(
            conn, [(stale, success(200, 40))]), 5)
        await taking_over.commit()

    assert recorded == [Recorded(current=False, consecutive_failures=0, circuit_closed=False)]
    assert row(clean_db, taken_over.id)["state"] == "delivered"
    assert sorted(attempt["number"] for attempt in attempt_rows(clean_db, taken_over.id)) == [
        stale.attempt, current.attempt]


# record_successes


async def test_record_successes_marks_every_claim_delivered_with_one_attempt_row(
    clean_db, conn
):
    arranged = arrange(clean_db, 3)
    for earlier, each in enumerate(arranged):
        set_delivery(clean_db, each.id,
                     f"attempts = {earlier}, last_error = 'HTTP 500: earlier failure'")
    claims = await delivery.claim_many(conn, [(each.id, False) for each in arranged], LEASE)
    results = [success(200, 11), success(201, 22), success(204, 33)]
    done = list(zip(claims, results, strict=True))[::-1]

    recorded = await delivery.record_successes(conn, done)

    assert recorded == [Recorded(current=True, consecutive_failures=0, circuit_closed=False)] * 3
    for claim, result in done:
        stored = row(clean_db, claim.delivery_id)
        assert stored["state"] == "delivered"
        assert stored["finished_at"] is not None
        assert stored["claimed_until"] is None
        assert stored["last_error"] is None
        assert stored["attempts"] == claim.attempt
        [attempt] = attempt_rows(clean_db, claim.delivery_id)
        assert attempt["number"] == claim.attempt
        assert attempt["outcome"] == "success"
        assert (attempt["status_code"], attempt["duration_ms"]) == (
            result.status_code, result.duration_ms)
        assert attempt["started_at"] == result.started_at
        assert (attempt["error_class"], attempt["error_text"]) == (None, None)


async def test_record_successes_of_one_current_claim_marks_it_delivered(clean_db, conn, batch):
    [arranged] = arrange(clean_db, 1)
    set_delivery(clean_db, arranged.id, "attempts = 2, last_error = 'timeout: no answer'")
    claim = await batch.claim(conn, arranged.id)
    result = success(202, 27)

    recorded = await batch.record(conn, claim, result)

    assert recorded == Recorded(current=True, consecutive_failures=0, circuit_closed=False)
    stored = row(clean_db, arranged.id)
    assert (stored["state"], stored["attempts"], stored["claimed_until"], stored["last_error"]
            ) == ("delivered", 3, None, None)
    assert stored["finished_at"] is not None
    [attempt] = attempt_rows(clean_db, arranged.id)
    assert (attempt["number"], attempt["outcome"], attempt["status_code"],
            attempt["duration_ms"], attempt["started_at"]) == (
        3, "success", 202, 27, result.started_at)


async def test_record_successes_of_a_claim_taken_over_leaves_the_delivery_alone(
    clean_db, conn, batch
):
    [arranged] = arrange(clean_db, 1)
    [stale] = await delivery.claim_many(conn, [(arranged.id, False)], LEASE)
    [current] = await delivery.claim_many(conn, [(arranged.id, True)], LEASE)
    assert current.attempt == stale.attempt + 1
    before = row(clean_db, arranged.id)

    recorded = await batch.record(conn, stale, success(200, 40))

    assert recorded == Recorded(current=False, consecutive_failures=0, circuit_closed=False)
    assert row(clean_db, arranged.id) == before
    [attempt] = attempt_rows(clean_db, arranged.id)
    assert (attempt["number"], attempt["outcome"], attempt["status_code"]) == (
        stale.attempt, "success", 200)


async def test_record_successes_answers_each_claim_in_order(clean_db, conn):
    taken_over, fresh = arrange(clean_db, 2)
    claims = await delivery.claim_many(conn, [(taken_over.id, False), (fresh.id, False)],
                                       LEASE)
    await delivery.claim_many(conn, [(taken_over.id, True)], LEASE)

    recorded = await delivery.record_successes(conn, [(claim, success()) for claim in claims])

    assert [each.current for each in recorded] == [False, True]
    assert row(clean_db, taken_over.id)["state"] == "sending"
    assert row(clean_db, fresh.id)["state"] == "delivered"
    assert len(attempt_rows(clean_db, taken_over.id)) == 1


CIRCUITS = {
    "open": ("3, now() + interval '1 hour', false", True),
    "probing": ("3, now() + interval '10 seconds', true", True),
    "counting_failures": ("2, NULL, false", False),
}


@pytest.mark.parametrize("circuit, closes", CIRCUITS.values(), ids=CIRCUITS.keys())
async def test_record_successes_resets_the_circuit_of_the_abonnement(
    clean_db, conn, batch, circuit, closes
):
    [arranged] = arrange(clean_db, 1)
    clean_db.execute(
        "INSERT INTO circuit (abonnement_id, consecutive_failures, open_until, probing) "
        f"VALUES (%s, {circuit})", (arranged.abonnement_id,))
    claim = await batch.claim(conn, arranged.id)

    recorded = await batch.record(conn, claim, success())

    assert recorded == Recorded(current=True, consecutive_failures=0, circuit_closed=closes)
    stored = circuit_row(clean_db, arranged.abonnement_id)
    assert (stored["consecutive_failures"], stored["open_until"], stored["probing"]) == (
        0, None, False)


async def test_record_successes_without_a_circuit_row_creates_none(clean_db, conn, batch):
    [arranged] = arrange(clean_db, 1)
    claim = await batch.claim(conn, arranged.id)

    recorded = await batch.record(conn, claim, success())

    assert recorded.circuit_closed is False
    assert clean_db.execute("SELECT count(*) FROM circuit").fetchone()[0] == 0


async def test_record_successes_reports_a_closed_circuit_for_its_first_success_only(
    clean_db, conn
):
    [elsewhere] = arrange(clean_db, 1)
    first = arrange(clean_db, 1)[0]
    second = arrange(clean_db, 1, abonnement_id=first.abonnement_id)[0]
    clean_db.execute(
        "INSERT INTO circuit (abonnement_id, consecutive_failures, open_until) "
        "VALUES (%s, 3, now() + interval '1 hour')", (first.abonnement_id,))
    claims = await delivery.claim_many(
        conn, [(elsewhere.id, False), (first.id, False), (second.id, False)], LEASE)

    recorded = await delivery.record_successes(conn, [(claim, success()) for claim in claims])

    assert [each.circuit_closed for each in recorded] == [False, True, False]
    assert all(each.current for each in recorded)
    stored = circuit_row(clean_db, first.abonnement_id)
    assert (stored["consecutive_failures"], stored["open_until"]) == (0, None)
    assert circuit_row(clean_db, elsewhere.abonnement_id) is None


async def test_record_successes_of_a_stale_and_a_current_claim_of_one_delivery(
    clean_db, conn
):
    [arranged] = arrange(clean_db, 1)
    [stale] = await delivery.claim_many(conn, [(arranged.id, False)], LEASE)
    [current] = await delivery.claim_many(conn, [(arranged.id, True)], LEASE)

    recorded = await delivery.record_successes(
        conn, [(stale, success()), (current, success())])

    assert row(clean_db, arranged.id)["state"] == "delivered"
    assert len(attempt_rows(clean_db, arranged.id)) == 2
    assert [each.current for each in recorded] == [False, True]


async def test_worker_records_the_rest_of_a_batch_when_one_row_is_refused(
    clean_db, conn, base_env
):
    """A delivery deleted between its claim and its record fails only its own record."""
    from koerier import db
    from koerier.config import load_settings
    from koerier.worker import Worker

    arranged = arrange(clean_db, 3)
    claims = await delivery.claim_many(conn, [(item.id, False) for item in arranged], LEASE)
    clean_db.execute("DELETE FROM delivery WHERE id = %s", (arranged[1].id,))
    settings = load_settings()
    await db.open_pool(settings, autocommit=True, check=False)
    try:
        worker = Worker(settings, concurrency=4)
        outcomes = await worker._record_batch([(claim, success()) for claim in claims])
    finally:
        await db.close_pool()

    assert outcomes[0] == Recorded(True, 0, False)
    assert isinstance(outcomes[1], psycopg.Error)
    assert outcomes[2] == Recorded(True, 0, False)
    assert row(clean_db, arranged[0].id)["state"] == "delivered"
    assert row(clean_db, arranged[2].id)["state"] == "delivered"
