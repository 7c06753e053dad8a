"""Group commit (koerier.intake): notifications that arrive together share a transaction, and
each still gets its own answer: stored with its own deliveries, or its own error.

Runs against the session's real PostgreSQL; batches form because the stores are started in
one turn of the event loop, as requests read together by the API are.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import psycopg
import pytest

from koerier import db, routing
from koerier.config import load_settings
from koerier.intake import Intake
from tests.delivery_support import make_abonnementen


@pytest.fixture
async def pool(base_env):
    await db.open_pool(load_settings())
    yield
    await db.close_pool()


class Sizes(list):
    """Notifications per transaction, and the most transactions seen running at once."""

    running = 0
    most_running = 0


@pytest.fixture
def batch_sizes(monkeypatch):
    """Watches the real routing.store_notifications: the database work is not replaced."""
    sizes = Sizes()
    real = routing.store_notifications

    async def recording(conn, incoming, *rest):
        sizes.append(len(incoming))
        sizes.running += 1
        sizes.most_running = max(sizes.most_running, sizes.running)
        try:
            return await real(conn, incoming, *rest)
        finally:
            sizes.running -= 1

    monkeypatch.setattr(routing, "store_notifications", recording)
    return sizes


def message(kanaal: str, **kenmerken: str) -> tuple[dict, str]:
    body = {
        "kanaal": kanaal,
        "hoofdObject": "https://zaken.example/api/v1/zaken/1",
        "resource": "zaak",
        "resourceUrl": f"https://zaken.example/api/v1/zaken/{uuid.uuid4()}",
        "actie": "create",
        "aanmaakdatum": "2026-12-03T10:00:00Z",
        "kenmerken": kenmerken,
    }
    return body, json.dumps(body)


async def test_a_batch_answers_each_notification_on_its_own(clean_db, pool, batch_sizes):
    zaken = make_abonnementen(clean_db, ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"])
    clean_db.execute(
        "UPDATE abonnement_filter SET filters = '{\"bron\": \"x\"}' WHERE abonnement_id = %s",
        (zaken[1],))
    besluiten = make_abonnementen(clean_db, ["http://127.0.0.1:9/c"], kanaal="besluiten")
    intake = Intake(batch_max=100, transactions=1)

    wanted = [
        ("zaken", {"bron": "x"}, zaken),          # both zaken abonnementen match
        ("zaken", {"bron": "y"}, zaken[:1]),      # the filter of the second one does not
        ("besluiten", {}, besluiten),
        ("onbekend", {}, "kanaal_naam"),          # no such kanaal
        ("zaken", {"kleur": "rood"}, "kenmerken_inconsistent"),
    ] * 6
    outcomes = await asyncio.gather(
        *(intake.store(*message(kanaal, **kenmerken)) for kanaal, kenmerken, _ in wanted),
        return_exceptions=True,
    )

    assert max(batch_sizes) > 1, batch_sizes
    assert sum(batch_sizes) == len(wanted)
    stored_uuids = set()
    for (kanaal, _, expected), outcome in zip(wanted, outcomes, strict=True):
        if isinstance(expected, str):
            assert isinstance(outcome, routing.RoutingError)
            assert outcome.code == expected
            continue
        assert isinstance(outcome, routing.StoredNotification), outcome
        assert outcome.abonnement_ids == sorted(expected)
        rows = clean_db.execute(
            "SELECT n.uuid, n.kanaal, d.id, d.abonnement_id FROM notification n "
            "JOIN delivery d ON d.notification_id = n.id WHERE n.id = %s ORDER BY d.id",
            (outcome.id,),
        ).fetchall()
        assert [row[2] for row in rows] == outcome.delivery_ids
        assert sorted(row[3] for row in rows) == sorted(expected)
        assert {row[0] for row in rows} == {outcome.uuid}
        assert {row[1] for row in rows} == {kanaal}
        stored_uuids.add(outcome.uuid)
    total = clean_db.execute("SELECT count(*) FROM notification").fetchone()[0]
    assert total == len(stored_uuids) == 18


async def test_one_refused_notification_does_not_fail_its_batch(clean_db, pool, batch_sizes):
    make_abonnementen(clean_db, ["http://127.0.0.1:9/a"])
    intake = Intake(batch_max=100, transactions=1)
    good = [message("zaken", bron="x") for _ in range(5)]
    # Text PostgreSQL refuses as json: the parsed message routes fine, the insert fails.
    refused = (good[0][0], '{"kanaal": "zaken",')

    outcomes = await asyncio.gather(
        *(intake.store(*item) for item in [*good[:2], refused, *good[2:]]),
        return_exceptions=True,
    )

    assert batch_sizes[0] == 6  # tried together first, then one by one
    assert isinstance(outcomes[2], psycopg.DataError)
    stored = [outcome for outcome in outcomes if isinstance(outcome, routing.StoredNotification)]
    assert len(stored) == 5
    assert clean_db.execute("SELECT count(*) FROM notification").fetchone()[0] == 5
    assert clean_db.execute("SELECT count(*) FROM delivery").fetchone()[0] == 5


async def test_database_lost_while_storing_one_by_one_fails_only_the_unstored(
        clean_db, pool, monkeypatch):
    make_abonnementen(clean_db, ["http://127.0.0.1:9/a"])
    intake = Intake(batch_max=100, transactions=1)
    good = [message("zaken", bron="x") for _ in range(5)]
    refused = (good[0][0], '{"kanaal": "zaken",')
    real = routing.store_notifications
    calls = 0

    async def losing_the_fourth(conn, incoming, *rest):
        # The batch, then the rows one by one: the connection of the third row really
        # dies (its backend is terminated), as in a database restart.
        nonlocal calls
        calls += 1
        if calls == 4:
            with pytest.raises(psycopg.OperationalError):
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return await real(conn, incoming, *rest)

    monkeypatch.setattr(routing, "store_notifications", losing_the_fourth)
    outcomes = await asyncio.gather(
        *(intake.store(*item) for item in [good[0], refused, *good[1:]]),
        return_exceptions=True,
    )

    assert isinstance(outcomes[0], routing.StoredNotification)
    assert isinstance(outcomes[1], psycopg.DataError)
    assert all(isinstance(outcome, db.DatabaseUnavailable) for outcome in outcomes[2:])
    stored = clean_db.execute("SELECT uuid FROM notification").fetchall()
    assert [row[0] for row in stored] == [outcomes[0].uuid]


async def test_a_notification_no_transaction_takes_in_time_gets_unavailable(
        clean_db, pool, pg_server):
    make_abonnementen(clean_db, ["http://127.0.0.1:9/a"])
    intake = Intake(batch_max=100, transactions=1, wait_seconds=0.3)
    await intake.store(*message("zaken", bron="x"))  # routes cached, connection warm
    blocker = await psycopg.AsyncConnection.connect(pg_server.conninfo())
    async with blocker:
        # A stalled database: the storing transaction waits for this lock.
        await blocker.execute("LOCK TABLE notification IN ACCESS EXCLUSIVE MODE")
        stuck = asyncio.ensure_future(intake.store(*message("zaken", bron="x")))
        await asyncio.sleep(0.1)
        with pytest.raises(db.DatabaseUnavailable):
            await intake.store(*message("zaken", bron="x"))
        await blocker.commit()
    # The one whose transaction had started is stored, however long it took.
    stored = await asyncio.wait_for(stuck, 10)
    assert clean_db.execute("SELECT count(*) FROM notification WHERE uuid = %s",
                            (stored.uuid,)).fetchone()[0] == 1
    assert clean_db.execute("SELECT count(*) FROM notification").fetchone()[0] == 2


async def test_at_most_the_configured_transactions_run_at_once(clean_db, pool, batch_sizes):
    make_abonnementen(clean_db, ["http://127.0.0.1:9/a"])
    intake = Intake(batch_max=7, transactions=2)
    outcomes = await asyncio.gather(
        *(intake.store(*message("zaken", bron="x")) for _ in range(40)))

    assert all(isinstance(outcome, routing.StoredNotification) for outcome in outcomes)
    assert max(batch_sizes) == 7
    assert sum(batch_sizes) == 40
    assert batch_sizes.most_running == 2
    assert len({outcome.uuid for outcome in outcomes}) == 40


async def test_cached_routes_follow_every_committed_change(clean_db, pool):
    """The intake caches kanalen and filter groups; no change may be missed because of it."""
    intake = Intake(batch_max=100, transactions=1)
    with pytest.raises(routing.RoutingError) as refused:
        await intake.store(*message("zaken", bron="x"))  # cached: no such kanaal
    assert refused.value.code == "kanaal_naam"

    first = make_abonnementen(clean_db, ["http://127.0.0.1:9/a"])  # creates kanaal zaken
    stored = await intake.store(*message("zaken", bron="x"))
    assert stored.abonnement_ids == first

    second = make_abonnementen(clean_db, ["http://127.0.0.1:9/b"])
    stored = await intake.store(*message("zaken", bron="x"))
    assert stored.abonnement_ids == sorted(first + second)

    clean_db.execute("DELETE FROM abonnement WHERE id = %s", (first[0],))
    stored = await intake.store(*message("zaken", bron="x"))
    assert stored.abonnement_ids == second

    clean_db.execute(
        "UPDATE abonnement_filter SET filters = '{\"bron\": \"y\"}' WHERE abonnement_id = %s",
        (second[0],))
    stored = await intake.store(*message("zaken", bron="x"))
    assert stored.abonnement_ids == []

    clean_db.execute("UPDATE kanaal SET filters = '{kleur}' WHERE naam = 'zaken'")
    with pytest.raises(routing.RoutingError) as refused:
        await intake.store(*message("zaken", bron="x"))
    assert refused.value.code == "kenmerken_inconsistent"
    stored = await intake.store(*message("zaken", kleur="rood"))
    assert stored.abonnement_ids == second  # a filter on a kenmerk it lacks lets it pass
    assert clean_db.execute("SELECT count(*) FROM notification").fetchone()[0] == 5


async def test_a_change_committed_while_routes_are_cached_reroutes_the_batch(clean_db, pool):
    make_abonnementen(clean_db, ["http://127.0.0.1:9/a"])
    intake = Intake(batch_max=100, transactions=1)
    await intake.store(*message("zaken", bron="x"))  # routes now cached
    version = clean_db.execute("SELECT version FROM routing_version").fetchone()[0]

    added = make_abonnementen(clean_db, ["http://127.0.0.1:9/b"])
    assert clean_db.execute("SELECT version FROM routing_version").fetchone()[0] > version
    outcomes = await asyncio.gather(*(intake.store(*message("zaken")) for _ in range(10)))

    for outcome in outcomes:
        assert added[0] in outcome.abonnement_ids
        assert len(outcome.delivery_ids) == 2


async def test_the_route_cache_stays_bounded_by_names_of_kanalen_that_do_not_exist(
        clean_db, pool):
    make_abonnementen(clean_db, ["http://127.0.0.1:9/a"])
    cache = routing.RouteCache(max_entries=4)
    async with db.connection() as conn:
        await conn.set_autocommit(True)
        for attempt in range(10):
            [refused] = await routing.store_notifications(
                conn, [message(f"nergens-{attempt}")], cache)
            assert isinstance(refused, routing.RoutingError)
            assert len(cache.routes) <= 4
        [stored] = await routing.store_notifications(conn, [message("zaken", bron="x")], cache)
        await conn.set_autocommit(False)
    assert isinstance(stored, routing.StoredNotification) and len(stored.delivery_ids) == 1
