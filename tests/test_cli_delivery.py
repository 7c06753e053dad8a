"""The operator commands: ``deliveries failed``, ``deliveries resend``, ``notifications
show`` and ``cleanup``, against rows arranged directly in PostgreSQL."""

from __future__ import annotations

import pytest

from tests.delivery_support import make_abonnementen, store_notification
from tests.harness import run_koerier as koerier


def fail(conn, delivery_id, when="now()"):
    conn.execute(
        f"UPDATE delivery SET state = 'failed', attempts = 8, finished_at = {when}, "
        "last_error = 'HTTP 500' WHERE id = %s", (delivery_id,))
    conn.execute(
        "INSERT INTO delivery_attempt (delivery_id, number, started_at, duration_ms, "
        "status_code, error_class, error_text, outcome) "
        "VALUES (%s, 8, now(), 12, 500, 'http_status', 'HTTP 500: broken', 'failure')",
        (delivery_id,))


@pytest.fixture
def two_failed(clean_db):
    first, second = make_abonnementen(clean_db, ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"])
    _, [one] = store_notification(clean_db, [first])
    _, [other] = store_notification(clean_db, [second])
    fail(clean_db, one)
    fail(clean_db, other, "now() - interval '2 days'")
    uuids = dict(clean_db.execute("SELECT id, uuid::text FROM abonnement").fetchall())
    return clean_db, (one, uuids[first]), (other, uuids[second])


def test_deliveries_failed_lists_every_failed_delivery(two_failed, base_env):
    _, (one, _), (other, _) = two_failed

    result = koerier(base_env, "deliveries", "failed")

    assert result.returncode == 0, result.stderr
    assert "2 failed deliveries" in result.stdout
    assert "HTTP 500" in result.stdout


def test_deliveries_failed_filters_by_abonnement(two_failed, base_env):
    _, (one, first_uuid), _ = two_failed

    result = koerier(base_env, "deliveries", "failed", "--abonnement", first_uuid, "--json")

    assert result.returncode == 0, result.stderr
    assert [line.count(f'"id": {one},') for line in result.stdout.splitlines()] == [1]


def test_deliveries_failed_filters_by_since(two_failed, base_env):
    db, (one, _), _ = two_failed
    since = db.execute("SELECT (now() - interval '1 day')::text").fetchone()[0]

    result = koerier(base_env, "deliveries", "failed", "--since", since.replace(" ", "T"))

    assert "1 failed delivery" in result.stdout
    assert f"{one:>9}" in result.stdout


def test_deliveries_failed_with_a_bad_since_says_what_it_expected(two_failed, base_env):
    result = koerier(base_env, "deliveries", "failed", "--since", "yesterday")

    assert result.returncode == 2
    assert "ISO 8601" in result.stderr


def test_resend_by_abonnement_schedules_only_that_abonnements_failed_deliveries(
    two_failed, base_env
):
    db, (one, first_uuid), (other, _) = two_failed

    result = koerier(base_env, "deliveries", "resend", "--abonnement", first_uuid)

    assert result.returncode == 0, result.stderr
    rows = dict(db.execute("SELECT id, state FROM delivery").fetchall())
    assert rows == {one: "scheduled", other: "failed"}
    assert db.execute("SELECT retry_from FROM delivery WHERE id = %s", (one,)).fetchone() == (8,)


def test_resend_all_schedules_every_failed_delivery(two_failed, base_env):
    db, _, _ = two_failed

    result = koerier(base_env, "deliveries", "resend", "--all")

    assert "2 deliveries scheduled" in result.stdout
    assert db.execute("SELECT DISTINCT state FROM delivery").fetchall() == [("scheduled",)]


def test_resend_of_one_delivery_says_delivery_in_the_singular(two_failed, base_env):
    _, (one, _), _ = two_failed

    result = koerier(base_env, "deliveries", "resend", str(one))

    assert result.returncode == 0, result.stderr
    assert "1 delivery scheduled to be sent again" in result.stdout


def test_notifications_show_of_a_delivery_with_one_attempt_says_attempt_in_the_singular(
    clean_db, base_env
):
    [abonnement] = make_abonnementen(clean_db, ["http://127.0.0.1:9/a"])
    notification, [one] = store_notification(clean_db, [abonnement])
    clean_db.execute("UPDATE delivery SET state = 'scheduled', attempts = 1 WHERE id = %s",
                     (one,))

    result = koerier(base_env, "notifications", "show", notification)

    assert result.returncode == 0, result.stderr
    assert f"delivery {one}: scheduled, 1 attempt -> " in result.stdout


def test_notifications_show_of_a_delivery_whose_abonnement_was_deleted_says_so(
    clean_db, base_env
):
    [abonnement] = make_abonnementen(clean_db, ["http://127.0.0.1:9/a"])
    notification, [one] = store_notification(clean_db, [abonnement])
    clean_db.execute("UPDATE delivery SET state = 'cancelled' WHERE id = %s", (one,))
    clean_db.execute("DELETE FROM abonnement WHERE id = %s", (abonnement,))

    result = koerier(base_env, "notifications", "show", notification)

    assert result.returncode == 0, result.stderr
    assert f"delivery {one}: cancelled, 0 attempts -> (abonnement deleted)\n" in result.stdout


def test_notifications_show_of_a_non_uuid_names_the_argument_and_expects_a_uuid(
    clean_db, base_env
):
    result = koerier(base_env, "notifications", "show", "nope")

    assert result.returncode == 2
    assert ("Invalid value for NOTIFICATION_UUID: must be a UUID, but got 'nope'"
            in result.stderr)


def test_resend_of_an_unknown_id_names_it_and_fails(two_failed, base_env):
    result = koerier(base_env, "deliveries", "resend", "999999")

    assert result.returncode == 1
    assert "999999" in result.stderr


def test_resend_without_a_selection_is_a_usage_error(two_failed, base_env):
    result = koerier(base_env, "deliveries", "resend")

    assert result.returncode == 2
    assert "--abonnement" in result.stderr


def test_notifications_show_prints_deliveries_and_attempts(two_failed, base_env):
    db, (one, _), _ = two_failed
    notification = db.execute(
        "SELECT n.uuid::text FROM notification n JOIN delivery d ON d.notification_id = n.id "
        "WHERE d.id = %s", (one,)).fetchone()[0]

    result = koerier(base_env, "notifications", "show", notification)

    assert result.returncode == 0, result.stderr
    assert f"notification {notification}" in result.stdout
    assert f"delivery {one}: failed, 8 attempts -> http://127.0.0.1:9/a" in result.stdout
    assert "attempt 8:" in result.stdout and "HTTP 500" in result.stdout
    assert '"kanaal": "zaken"' in result.stdout


def test_notifications_show_of_an_unknown_uuid_fails(clean_db, base_env):
    result = koerier(base_env, "notifications", "show", "5d1c9a5e-0000-4000-8000-000000000000")

    assert result.returncode == 1
    assert "no notification" in result.stderr


def test_cleanup_removes_old_finished_notifications_and_keeps_the_rest(clean_db, base_env):
    [abonnement] = make_abonnementen(clean_db, ["http://127.0.0.1:9/a"])
    old_uuid, [old] = store_notification(clean_db, [abonnement])
    pending_uuid, [pending] = store_notification(clean_db, [abonnement])
    recent_uuid, [recent] = store_notification(clean_db, [abonnement])
    fail(clean_db, old)
    fail(clean_db, recent)
    clean_db.execute("UPDATE notification SET received_at = now() - interval '40 days' "
                     "WHERE uuid IN (%s, %s)", (old_uuid, pending_uuid))
    clean_db.execute("UPDATE delivery_attempt SET started_at = now() - interval '40 days' "
                     "WHERE delivery_id = %s", (old,))

    result = koerier(base_env, "cleanup")

    assert result.returncode == 0, result.stderr
    assert "removed 1 notification " in result.stdout
    left = {row[0] for row in clean_db.execute("SELECT uuid::text FROM notification")}
    assert left == {pending_uuid, recent_uuid}
    assert clean_db.execute("SELECT count(*) FROM delivery_attempt").fetchone() == (1,)
