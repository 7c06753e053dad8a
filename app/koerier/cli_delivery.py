"""The delivery commands: ``koerier worker``, ``deliveries``, ``notifications``, ``cleanup``.

The inspection and repair commands talk to PostgreSQL only: a re-sent delivery becomes
``scheduled`` and due now, and the relay of any running worker hands it to the broker.
"""

from __future__ import annotations

import json
import sys
import uuid
from datetime import datetime
from typing import Any

import click
import psycopg
from psycopg.rows import dict_row

from koerier.config import Settings


def _settings() -> Settings:
    from koerier.cli import get_settings

    return get_settings()


def _connect(settings: Settings) -> psycopg.Connection[dict[str, Any]]:
    try:
        return psycopg.connect(settings.database_conninfo, row_factory=dict_row, autocommit=True)
    except psycopg.OperationalError as exc:
        click.echo(f"cannot reach the database: {str(exc).strip().splitlines()[0]}", err=True)
        sys.exit(1)


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.BadParameter(f"must be a UUID, but got {value!r}", param_hint=what) from None


def _count(number: int, singular: str, plural: str) -> str:
    """``1 attempt``, ``2 attempts``: operators read these lines, not just scripts."""
    return f"{number} {singular if number == 1 else plural}"


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"must be an ISO 8601 date or time, but got {value!r}", param_hint="--since"
        ) from None


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


@click.command()
@click.option("--processes", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Worker processes to run.")
@click.option("--concurrency", type=click.IntRange(1, 10_000), default=None,
              help="HTTP deliveries in flight per process [KOERIER_WORKER_CONCURRENCY, 32].")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve /metrics on this port (process i on port + i); off by default.")
@click.option("--metrics-address", default="127.0.0.1", show_default=True,
              help="Address the metrics port listens on.")
def worker(processes: int, concurrency: int | None, metrics_port: int | None,
           metrics_address: str) -> None:
    """Deliver notifications to subscribers (and relay due retries) until SIGTERM."""
    from koerier import logs
    from koerier.worker import run_pool

    settings = _settings()
    logs.setup(settings)
    run_pool(settings, processes, concurrency or settings.worker_concurrency,
             metrics_port, metrics_address)


@click.group()
def deliveries() -> None:
    """Inspect and re-send deliveries."""


@deliveries.command("failed")
@click.option("--abonnement", "abonnement_uuid", help="Only this abonnement (UUID).")
@click.option("--since", help="Only deliveries that failed at or after this ISO time.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def deliveries_failed(abonnement_uuid: str | None, since: str | None, as_json: bool) -> None:
    """List deliveries that failed after their last retry."""
    settings = _settings()
    abonnement = _uuid(abonnement_uuid, "--abonnement") if abonnement_uuid else None
    since_at = _since(since)
    with _connect(settings) as conn:
        rows = conn.execute(
            """
            SELECT d.id, n.uuid::text AS notification, a.uuid::text AS abonnement,
                   a.callback_url, d.attempts, d.finished_at, d.last_error
            FROM delivery d
            JOIN notification n ON n.id = d.notification_id
            LEFT JOIN abonnement a ON a.id = d.abonnement_id
            WHERE d.state = 'failed'
              AND (%(abonnement)s::uuid IS NULL OR a.uuid = %(abonnement)s::uuid)
              AND (%(since)s::timestamptz IS NULL OR d.finished_at >= %(since)s::timestamptz)
            ORDER BY d.finished_at, d.id
            """,
            {"abonnement": abonnement, "since": since_at},
        ).fetchall()
    if as_json:
        for row in rows:
            click.echo(json.dumps({**row, "finished_at": _when(row["finished_at"])}))
        return
    if not rows:
        click.echo("no failed deliveries")
        return
    click.echo(f"{'delivery':>9}  {'failed at':25}  {'attempts':>8}  notification / abonnement")
    for row in rows:
        click.echo(f"{row['id']:>9}  {_when(row['finished_at']):25}  {row['attempts']:>8}  "
                   f"{row['notification']} -> {row['abonnement'] or '(deleted)'}")
        click.echo(f"{'':>9}  {row['callback_url'] or '-'}: {row['last_error'] or '-'}")
    click.echo(_count(len(rows), "failed delivery", "failed deliveries"))


@deliveries.command("resend")
@click.argument("delivery_ids", nargs=-1, type=int)
@click.option("--abonnement", "abonnement_uuid", help="All failed deliveries of this abonnement.")
@click.option("--all", "resend_all", is_flag=True, help="All failed deliveries.")
def deliveries_resend(delivery_ids: tuple[int, ...], abonnement_uuid: str | None,
                      resend_all: bool) -> None:
    """Send deliveries again, with a fresh retry schedule.

    By id, any finished delivery (failed, delivered or cancelled) is sent again; with
    --abonnement or --all, the failed ones. A running worker picks them up within about
    a second.
    """
    chosen = sum(bool(choice) for choice in (delivery_ids, abonnement_uuid, resend_all))
    if chosen != 1:
        raise click.UsageError("give delivery ids, or --abonnement UUID, or --all (one of them)")
    settings = _settings()
    where = "d.state = 'failed'"
    params: dict[str, Any] = {}
    if delivery_ids:
        where = "d.id = ANY(%(ids)s) AND d.state IN ('failed', 'delivered', 'cancelled')"
        params = {"ids": list(delivery_ids)}
    elif abonnement_uuid:
        where += " AND a.uuid = %(abonnement)s::uuid"
        params = {"abonnement": _uuid(abonnement_uuid, "--abonnement")}
    with _connect(settings) as conn:
        rows = conn.execute(
            f"""
            UPDATE delivery d
            SET state = 'scheduled', due_at = now(), retry_from = d.attempts,
                finished_at = NULL, claimed_until = NULL
            FROM abonnement a
            WHERE a.id = d.abonnement_id AND {where}
            RETURNING d.id
            """,
            params,
        ).fetchall()
    resent = sorted(row["id"] for row in rows)
    missing = sorted(set(delivery_ids) - set(resent))
    click.echo(f"{_count(len(resent), 'delivery', 'deliveries')} scheduled to be sent again")
    if missing:
        click.echo("not re-sent (unknown, still in progress, or abonnement deleted): "
                   + ", ".join(str(delivery_id) for delivery_id in missing), err=True)
        sys.exit(1)


@click.group()
def notifications() -> None:
    """Inspect stored notifications."""


@notifications.command("show")
@click.argument("notification_uuid")
def notifications_show(notification_uuid: str) -> None:
    """Print a notification with its deliveries and every attempt."""
    settings = _settings()
    key = _uuid(notification_uuid, "NOTIFICATION_UUID")
    with _connect(settings) as conn:
        notification = conn.execute(
            "SELECT id, uuid::text AS uuid, kanaal, message::text AS message, received_at "
            "FROM notification WHERE uuid = %s", (key,)).fetchone()
        if notification is None:
            click.echo(f"no notification {key}", err=True)
            sys.exit(1)
        rows = conn.execute(
            """
            SELECT d.id, d.state, d.attempts, d.due_at, d.finished_at, d.last_error,
                   a.uuid::text AS abonnement, a.callback_url
            FROM delivery d LEFT JOIN abonnement a ON a.id = d.abonnement_id
            WHERE d.notification_id = %s ORDER BY d.id
            """, (notification["id"],)).fetchall()
        attempts = conn.execute(
            """
            SELECT t.delivery_id, t.number, t.started_at, t.duration_ms, t.status_code,
                   t.error_class, t.error_text, t.outcome
            FROM delivery_attempt t JOIN delivery d ON d.id = t.delivery_id
            WHERE d.notification_id = %s ORDER BY t.delivery_id, t.number, t.id
            """, (notification["id"],)).fetchall()
    click.echo(f"notification {notification['uuid']}")
    click.echo(f"  kanaal:   {notification['kanaal']}")
    click.echo(f"  received: {_when(notification['received_at'])}")
    click.echo(f"  message:  {notification['message']}")
    click.echo(f"deliveries: {len(rows)}")
    for row in rows:
        made = _count(row["attempts"], "attempt", "attempts")
        target = (f"{row['callback_url']} (abonnement {row['abonnement']})"
                  if row["abonnement"] else "(abonnement deleted)")
        click.echo(f"  delivery {row['id']}: {row['state']}, {made} -> {target}")
        if row["state"] == "scheduled":
            click.echo(f"    next attempt due {_when(row['due_at'])}")
        for attempt in (item for item in attempts if item["delivery_id"] == row["id"]):
            answer = (f"HTTP {attempt['status_code']}" if attempt["status_code"] is not None
                      else attempt["error_class"])
            line = (f"    attempt {attempt['number']}: {_when(attempt['started_at'])} "
                    f"{attempt['outcome']}, {answer}, {attempt['duration_ms']} ms")
            if attempt["outcome"] == "failure" and attempt["error_text"]:
                line += f": {attempt['error_text'][:200]}"
            click.echo(line)


@click.command()
@click.option("--days", type=click.IntRange(1), default=None,
              help="Keep this many days [KOERIER_RETENTION_DAYS, 30].")
def cleanup(days: int | None) -> None:
    """Delete notifications, deliveries and attempts older than the retention."""
    settings = _settings()
    keep = days or settings.retention_days
    with _connect(settings) as conn:
        attempts = conn.execute(
            "DELETE FROM delivery_attempt WHERE started_at < now() - make_interval(days => %s)",
            (keep,)).rowcount
        removed = conn.execute(
            """
            DELETE FROM notification n
            WHERE n.received_at < now() - make_interval(days => %s)
              AND NOT EXISTS (SELECT 1 FROM delivery d WHERE d.notification_id = n.id
                              AND d.state IN ('scheduled', 'queued', 'sending'))
            """,
            (keep,)).rowcount
        conn.execute(
            "DELETE FROM circuit c WHERE open_until IS NULL AND consecutive_failures = 0")
    click.echo(f"removed {_count(removed, 'notification', 'notifications')} (with their "
               f"deliveries) and {_count(attempts, 'attempt', 'attempts')} older than "
               f"{_count(keep, 'day', 'days')}")


def register(main: click.Group) -> None:
    """Attach the delivery commands to the ``koerier`` group."""
    main.add_command(worker)
    main.add_command(deliveries)
    main.add_command(notifications)
    main.add_command(cleanup)
