"""One delivery attempt: claim it, POST it to the subscriber, record the outcome.

The claim rule (docs/design.md): a broker message only carries a delivery id, and a worker
sends the delivery only after one conditional UPDATE made it ``sending`` for that worker.
The claim increments ``attempts``; that number is the attempt's number and the claim's
token, so recording the outcome (or deferring) changes the delivery only while the claim
is still the current one.

The retry schedule lives here too: retry ``n`` (1-based) waits
``min(base * factor ** (n - 1), max_delay)`` seconds, spread by +/- ``jitter``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import aiohttp
import psycopg

from koerier import __version__, sealing
from koerier.config import Settings

ERROR_TEXT_LIMIT = 1000
RESPONSE_READ_LIMIT = 2048

NOTIFICATION_ID_HEADER = "Koerier-Notification-Id"
ATTEMPT_HEADER = "Koerier-Delivery-Attempt"
USER_AGENT = f"Koerier/{__version__}"


def retry_delay(settings: Settings, retry: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``retry`` (1 is the first retry)."""
    nominal = min(
        settings.retry_base_seconds * settings.retry_factor ** (retry - 1),
        settings.retry_max_delay_seconds,
    )
    spread = settings.retry_jitter
    return nominal * (rng or random).uniform(1 - spread, 1 + spread)


def retry_schedule(settings: Settings) -> list[float]:
    """The nominal delays (no jitter) of every retry, in order."""
    return [
        min(settings.retry_base_seconds * settings.retry_factor ** (retry - 1),
            settings.retry_max_delay_seconds)
        for retry in range(1, settings.retry_max + 1)
    ]


@dataclass(frozen=True)
class Claim:
    """A delivery this worker now owns, with what it needs to send it."""

    delivery_id: int
    attempt: int
    retry_from: int
    notification_uuid: str
    message: bytes
    received_at: float
    abonnement_id: int
    abonnement_uuid: str | None
    callback_url: str | None
    auth: str
    circuit_open_for: float | None
    circuit_probing: bool = False

    @property
    def retry(self) -> int:
        """How many attempts of the current series (since the last resend) this makes."""
        return self.attempt - self.retry_from


@dataclass(frozen=True)
class AttemptResult:
    started_at: datetime
    duration_ms: int
    status_code: int | None
    error_class: str | None
    error_text: str | None

    @property
    def success(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def summary(self) -> str:
        if self.success:
            return f"HTTP {self.status_code}"
        if self.status_code is not None:
            return f"HTTP {self.status_code}"
        return f"{self.error_class}: {self.error_text}"


# What a worker needs of a claimed delivery to send it (``claimed``: the updated rows).
_CLAIMED_SELECT = """
    SELECT c.id, c.attempts, c.retry_from, c.abonnement_id,
           n.uuid::text AS notification_uuid, n.message::text AS message,
           extract(epoch FROM n.received_at)::float8 AS received_at,
           a.uuid::text AS abonnement_uuid, a.callback_url, a.auth,
           CASE WHEN ci.open_until IS NOT NULL
                THEN extract(epoch FROM ci.open_until - now())::float8 END AS circuit_open_for,
           coalesce(ci.probing, false) AS circuit_probing
    FROM claimed c
    JOIN notification n ON n.id = c.notification_id
    LEFT JOIN abonnement a ON a.id = c.abonnement_id
    LEFT JOIN circuit ci ON ci.abonnement_id = c.abonnement_id
"""

# One delivery: the primary key lookup every plan takes.
_CLAIM_ONE = """
    WITH claimed AS (
        UPDATE delivery
        SET state = 'sending', attempts = attempts + 1,
            claimed_until = now() + make_interval(secs => %(lease)s)
        WHERE id = %(id)s AND (
            (state IN ('scheduled', 'queued') AND due_at <= now())
            OR (state = 'sending' AND (%(redelivered)s OR claimed_until < now()))
        )
        RETURNING id, notification_id, abonnement_id, attempts, retry_from
    )
""" + _CLAIMED_SELECT

# Every statement that locks several deliveries locks them in id order first (lock_in_order):
# in the order the ids came, a claim and the API's mark_queued (or two claims) could each
# hold a row the other waits for, and PostgreSQL would end one of them after a second.
# NO KEY UPDATE, as a plain UPDATE takes: FOR UPDATE would also block the KEY SHARE lock that
# inserting a delivery_attempt takes on its delivery, and a worker recording an attempt that
# was taken over could then deadlock with the one that took it over. Only rows that meet
# ``condition`` (SQL) are locked, so a stale message for a finished delivery waits for nothing.
def lock_in_order(condition: str) -> str:
    return f"""
    locked AS MATERIALIZED (
        SELECT id FROM delivery
        WHERE id = ANY(%(ids)s::bigint[]) AND {condition}
        ORDER BY id FOR NO KEY UPDATE
    )
"""

# Several deliveries at once. Not prepared (see claim_many): its plan depends on the
# table's size, and a plan kept from when the table was small would scan all of it.
_CLAIM_MANY = """
    WITH wanted AS (
        SELECT * FROM unnest(%(ids)s::bigint[], %(redelivered)s::bool[]) AS t(id, redelivered)
    ), """ + lock_in_order("state IN ('scheduled', 'queued', 'sending')") + """, claimed AS (
        UPDATE delivery d
        SET state = 'sending', attempts = d.attempts + 1,
            claimed_until = now() + make_interval(secs => %(lease)s)
        FROM wanted w JOIN locked USING (id)
        WHERE d.id = w.id AND (
            (d.state IN ('scheduled', 'queued') AND d.due_at <= now())
            OR (d.state = 'sending' AND (w.redelivered OR d.claimed_until < now()))
        )
        RETURNING d.id, d.notification_id, d.abonnement_id, d.attempts, d.retry_from
    )
""" + _CLAIMED_SELECT



async def claim(
    conn: psycopg.AsyncConnection[Any], delivery_id: int, redelivered: bool, lease: float
) -> Claim | None:
    """Make the delivery ``sending`` for this worker, or None when it is not claimable."""
    cursor = await conn.execute(
        _CLAIM_ONE, {"id": delivery_id, "redelivered": redelivered, "lease": lease})
    row = await cursor.fetchone()
    return None if row is None else _claim_from(row)


async def claim_many(
    conn: psycopg.AsyncConnection[Any], wanted: Sequence[tuple[int, bool]], lease: float
) -> list[Claim | None]:
    """Claim several deliveries (id, whether its message was redelivered) in one statement;
    one entry per wanted delivery, None where it is not claimable. An id wanted twice is
    claimed at most once (for its first entry)."""
    if len(wanted) == 1:
        [(delivery_id, redelivered)] = wanted
        return [await claim(conn, delivery_id, redelivered, lease)]
    cursor = await conn.execute(_CLAIM_MANY, prepare=False, params={
        "ids": [delivery_id for delivery_id, _ in wanted],
        "redelivered": [redelivered for _, redelivered in wanted],
        "lease": lease,
    })
    claims = {row["id"]: _claim_from(row) for row in await cursor.fetchall()}
    return [claims.pop(delivery_id, None) for delivery_id, _ in wanted]


def _claim_from(row: Mapping[str, Any]) -> Claim:
    return Claim(
        delivery_id=row["id"],
        attempt=row["attempts"],
        retry_from=row["retry_from"],
        notification_uuid=row["notification_uuid"],
        message=row["message"].encode(),
        received_at=row["received_at"],
        abonnement_id=row["abonnement_id"],
        abonnement_uuid=row["abonnement_uuid"],
        callback_url=row["callback_url"],
        auth=row["auth"] or "",
        circuit_open_for=row["circuit_open_for"],
        circuit_probing=row["circuit_probing"],
    )


async def defer(conn: psycopg.AsyncConnection[Any], target: Claim, delay: float) -> bool:
    """Give the claim back without an attempt: ``scheduled`` again, due after ``delay``."""
    cursor = await conn.execute(
        """
        UPDATE delivery
        SET state = 'scheduled', attempts = attempts - 1, claimed_until = NULL,
            due_at = now() + make_interval(secs => %s)
        WHERE id = %s AND state = 'sending' AND attempts = %s
        """,
        (delay, target.delivery_id, target.attempt),
    )
    return cursor.rowcount == 1


async def cancel(conn: psycopg.AsyncConnection[Any], target: Claim, reason: str) -> None:
    """End a delivery that can never be made (its abonnement was deleted)."""
    await conn.execute(
        """
        UPDATE delivery
        SET state = 'cancelled', attempts = attempts - 1, claimed_until = NULL,
            finished_at = now(), last_error = %s
        WHERE id = %s AND state = 'sending' AND attempts = %s
        """,
        (reason, target.delivery_id, target.attempt),
    )


@dataclass(frozen=True)
class Recorded:
    """What recording an attempt changed."""

    current: bool  # False: another worker had taken the claim over meanwhile
    consecutive_failures: int  # of the abonnement's circuit breaker, after this attempt
    circuit_closed: bool  # this success closed a circuit that had been open


_RECORD = """
    WITH attempt AS (
        INSERT INTO delivery_attempt (delivery_id, number, started_at, duration_ms,
                                      status_code, error_class, error_text, outcome)
        VALUES (%(id)s, %(attempt)s, %(started_at)s, %(duration_ms)s, %(status)s,
                %(error_class)s, %(error_text)s,
                CASE WHEN %(success)s THEN 'success' ELSE 'failure' END)
    ), updated AS (
        UPDATE delivery
        SET state = %(state)s, claimed_until = NULL, last_error = %(error)s,
            due_at = CASE WHEN %(retry_in)s::float8 IS NULL THEN due_at
                          ELSE now() + make_interval(secs => %(retry_in)s::float8) END,
            finished_at = CASE WHEN %(state)s IN ('delivered', 'failed') THEN now() END
        WHERE id = %(id)s AND state = 'sending' AND attempts = %(attempt)s
        RETURNING id
    ), old_circuit AS (
        SELECT open_until FROM circuit WHERE abonnement_id = %(abonnement)s
    ), closed AS (
        UPDATE circuit SET consecutive_failures = 0, open_until = NULL, probing = false
        WHERE %(success)s AND abonnement_id = %(abonnement)s
          AND (consecutive_failures > 0 OR open_until IS NOT NULL)
        RETURNING abonnement_id
    ), failed AS (
        INSERT INTO circuit (abonnement_id, consecutive_failures, open_until)
        SELECT %(abonnement)s, 1, CASE WHEN %(threshold)s <= 1
                                       THEN now() + make_interval(secs => %(open)s) END
        WHERE NOT %(success)s
        ON CONFLICT (abonnement_id) DO UPDATE
        SET consecutive_failures = circuit.consecutive_failures + 1,
            open_until = CASE WHEN circuit.consecutive_failures + 1 >= %(threshold)s
                              THEN now() + make_interval(secs => %(open)s)
                              ELSE circuit.open_until END,
            probing = false
        RETURNING consecutive_failures
    )
    SELECT EXISTS (SELECT 1 FROM updated) AS current,
           coalesce((SELECT consecutive_failures FROM failed), 0) AS consecutive_failures,
           EXISTS (SELECT 1 FROM closed)
             AND coalesce((SELECT open_until IS NOT NULL FROM old_circuit), false)
             AS circuit_closed
"""


async def record(
    conn: psycopg.AsyncConnection[Any],
    target: Claim,
    result: AttemptResult,
    next_state: str,
    retry_in: float | None,
    circuit_threshold: int,
    circuit_open_seconds: float,
) -> Recorded:
    """Store the attempt, the delivery's new state and the circuit breaker's count, in one
    statement. The attempt row is written even when the claim was taken over meanwhile:
    the request happened, and operators should see it.
    """
    cursor = await conn.execute(_RECORD, {
        "id": target.delivery_id, "attempt": target.attempt, "abonnement": target.abonnement_id,
        "started_at": result.started_at, "duration_ms": result.duration_ms,
        "status": result.status_code, "error_class": result.error_class,
        "error_text": result.error_text, "success": result.success,
        "state": next_state, "error": None if result.success else result.summary,
        "retry_in": retry_in, "threshold": circuit_threshold, "open": circuit_open_seconds,
    })
    row = await cursor.fetchone()
    assert row is not None
    return Recorded(bool(row["current"]), int(row["consecutive_failures"]),
                    bool(row["circuit_closed"]))


_RECORD_SUCCESSES = """
    WITH input AS (
        SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(abonnementen)s::bigint[],
                             %(started)s::timestamptz[], %(durations)s::int[], %(statuses)s::int[])
             WITH ORDINALITY AS t(id, attempt, abonnement_id, started_at, duration_ms,
                                  status_code, position)
    ), """ + lock_in_order("state = 'sending'") + """, attempt AS (
        INSERT INTO delivery_attempt (delivery_id, number, started_at, duration_ms,
                                      status_code, outcome)
        SELECT id, attempt, started_at, duration_ms, status_code, 'success' FROM input
    ), updated AS (
        UPDATE delivery d
        SET state = 'delivered', claimed_until = NULL, last_error = NULL, finished_at = now()
        FROM input i JOIN locked USING (id)
        WHERE d.id = ANY(%(ids)s::bigint[]) AND d.id = i.id
          AND d.state = 'sending' AND d.attempts = i.attempt
        RETURNING d.id, d.attempts
    ), closed AS (
        UPDATE circuit c SET consecutive_failures = 0, open_until = NULL, probing = false
        FROM (SELECT abonnement_id, open_until FROM circuit
              WHERE abonnement_id IN (SELECT abonnement_id FROM input)
                AND (consecutive_failures > 0 OR open_until IS NOT NULL)
              ORDER BY abonnement_id
              FOR NO KEY UPDATE) AS old
        WHERE c.abonnement_id = old.abonnement_id
        RETURNING c.abonnement_id, old.open_until IS NOT NULL AS was_open
    )
    SELECT i.id, EXISTS (SELECT 1 FROM updated u
                                  WHERE u.id = i.id AND u.attempts = i.attempt) AS current,
           coalesce((SELECT was_open FROM closed WHERE closed.abonnement_id = i.abonnement_id),
                    false) AS circuit_closed
    FROM input i
    ORDER BY i.position
"""


async def record_successes(
    conn: psycopg.AsyncConnection[Any], done: Sequence[tuple[Claim, AttemptResult]]
) -> list[Recorded]:
    """Record several successful attempts in one statement (what :func:`record` does for
    one success). A circuit that one of them closed is reported for the first only.

    The statement is not prepared, so that it is planned for the table as it is now."""
    if len(done) == 1:
        [(target, result)] = done
        return [await record(conn, target, result, "delivered", None, 1, 0.0)]
    cursor = await conn.execute(_RECORD_SUCCESSES, prepare=False, params={
        "ids": [target.delivery_id for target, _ in done],
        "attempts": [target.attempt for target, _ in done],
        "abonnementen": [target.abonnement_id for target, _ in done],
        "started": [result.started_at for _, result in done],
        "durations": [result.duration_ms for _, result in done],
        "statuses": [result.status_code for _, result in done],
    })
    rows = await cursor.fetchall()
    recorded: list[Recorded] = []
    closed_reported: set[int] = set()
    for (target, _), row in zip(done, rows, strict=True):
        closed = bool(row["circuit_closed"]) and target.abonnement_id not in closed_reported
        if closed:
            closed_reported.add(target.abonnement_id)
        recorded.append(Recorded(bool(row["current"]), 0, closed))
    return recorded


@lru_cache(maxsize=4096)
def _authorization(sealed: str) -> str:
    # Unsealing costs an HMAC and an AES decryption; an abonnement's value seldom changes,
    # and the sealed text (random IV included) changes with it.
    return sealing.unseal(sealed)


def new_session(settings: Settings, concurrency: int) -> aiohttp.ClientSession:
    """The worker process's one HTTP client session, with a pooled connector."""
    connector = aiohttp.TCPConnector(
        limit=max(concurrency * 2, 10), limit_per_host=0, keepalive_timeout=30,
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.delivery_timeout_seconds,
        sock_connect=settings.delivery_connect_timeout_seconds,
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers={"User-Agent": USER_AGENT},
        auto_decompress=False, raise_for_status=False,
    )


async def send(session: aiohttp.ClientSession, target: Claim) -> AttemptResult:
    """POST the stored message to the callback once; never raises for network trouble."""
    assert target.callback_url is not None
    headers = {
        "Content-Type": "application/json",
        NOTIFICATION_ID_HEADER: target.notification_uuid,
        ATTEMPT_HEADER: str(target.attempt),
    }
    try:
        authorization = _authorization(target.auth)
    except sealing.UnsealError as exc:
        # Sending without the subscriber's credentials would be worse than not sending.
        return AttemptResult(datetime.now(UTC), 0, None, "credentials_unreadable", str(exc))
    if authorization:
        headers["Authorization"] = authorization
    started_at = datetime.now(UTC)
    start = time.monotonic()
    status: int | None = None
    error_class: str | None = None
    error_text: str | None = None
    try:
        async with session.post(
            target.callback_url, data=target.message, headers=headers, allow_redirects=False
        ) as response:
            status = response.status
            if not 200 <= status < 300:
                body = await response.content.read(RESPONSE_READ_LIMIT)
                error_class = "http_status"
                error_text = f"HTTP {status}: {body.decode('utf-8', 'replace')}"
            else:
                await response.read()
    except TimeoutError:
        error_class, error_text = "timeout", "no answer within the delivery timeout"
    except aiohttp.InvalidURL as exc:
        error_class, error_text = "invalid_url", str(exc)
    except aiohttp.ClientConnectorError as exc:
        error_class, error_text = "connection_error", str(exc)
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        error_class = "protocol_error" if status is None else "response_error"
        error_text = f"{type(exc).__name__}: {exc}"
    duration_ms = int((time.monotonic() - start) * 1000)
    if error_text is not None:
        error_text = error_text[:ERROR_TEXT_LIMIT]
    return AttemptResult(started_at, duration_ms, status, error_class, error_text)
