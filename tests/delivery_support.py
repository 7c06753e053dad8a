"""Helpers for the delivery, worker and fault tests: arrange rows, run workers, wait.

Until a test goes through the real API, :func:`store_notification` writes what the API's
write path writes (a notification and one ``scheduled`` delivery per abonnement, in one
transaction), and the test hands the ids to a real publisher or leaves them to the relay.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from tests.harness import KOERIER

KANAAL = "zaken"

# Short, test-sized timings; a test overrides what it is about.
FAST_ENV = {
    "KOERIER_RETRY_BASE_SECONDS": "0.2",
    "KOERIER_RETRY_FACTOR": "2",
    "KOERIER_RETRY_MAX_DELAY_SECONDS": "2",
    "KOERIER_RETRY_JITTER": "0.1",
    "KOERIER_RELAY_INTERVAL_SECONDS": "0.2",
    "KOERIER_RELAY_GRACE_SECONDS": "1",
    "KOERIER_DEFER_SECONDS": "0.3",
    "KOERIER_DELIVERY_TIMEOUT_SECONDS": "3",
    "KOERIER_DELIVERY_CONNECT_TIMEOUT_SECONDS": "1",
    "KOERIER_CIRCUIT_FAILURE_THRESHOLD": "50",
    "KOERIER_CIRCUIT_OPEN_SECONDS": "2",
    "KOERIER_LOG_LEVEL": "info",
}


def message(kanaal: str = KANAAL, **extra: Any) -> str:
    """A notification body as a publisher would send it: odd key order and spacing kept."""
    a_minute_ago = datetime.now(UTC) - timedelta(minutes=1)
    body = {
        "kanaal": kanaal,
        "hoofdObject": "https://zaken.example/api/v1/zaken/1",
        "resource": "zaak",
        "resourceUrl": "https://zaken.example/api/v1/zaken/1",
        "actie": "create",
        "aanmaakdatum": a_minute_ago.isoformat(timespec="seconds"),
        "kenmerken": {"bron": "082096752011", "zaaktype": "https://zt.example/1"},
        **extra,
    }
    return json.dumps(body, indent=1)


def ensure_kanaal(conn: psycopg.Connection[Any], naam: str = KANAAL) -> None:
    conn.execute(
        "INSERT INTO kanaal (uuid, naam, filters) VALUES (%s, %s, '{bron,zaaktype}') "
        "ON CONFLICT (naam) DO NOTHING",
        (uuid.uuid4(), naam),
    )


def make_abonnementen(
    conn: psycopg.Connection[Any], callback_urls: list[str], auth: str = "Bearer test-token",
    kanaal: str = KANAAL,
) -> list[int]:
    """Abonnementen on ``kanaal`` without filters, one per callback URL; returns their ids."""
    ensure_kanaal(conn, kanaal)
    rows = conn.execute(
        """
        WITH made AS (
            INSERT INTO abonnement (uuid, callback_url, auth, client_id, kanalen)
            SELECT gen_random_uuid(), url, %s, 'test', '[]' FROM unnest(%s::text[]) AS url
            RETURNING id
        ), grouped AS (
            INSERT INTO abonnement_filter (abonnement_id, kanaal_naam, filters)
            SELECT id, %s, '{}' FROM made
        )
        SELECT id FROM made ORDER BY id
        """,
        (auth, callback_urls, kanaal),
    ).fetchall()
    return [row[0] for row in rows]


def store_notification(
    conn: psycopg.Connection[Any], abonnement_ids: list[int], body: str | None = None,
    kanaal: str = KANAAL,
) -> tuple[str, list[int]]:
    """What the API's write path stores: returns the notification uuid and delivery ids."""
    notification_uuid = str(uuid.uuid4())
    with conn.transaction():
        notification_id = conn.execute(
            "INSERT INTO notification (uuid, kanaal, message) VALUES (%s, %s, %s::json) "
            "RETURNING id",
            (notification_uuid, kanaal, body or message(kanaal)),
        ).fetchone()[0]
        rows = conn.execute(
            "INSERT INTO delivery (notification_id, abonnement_id) "
            "SELECT %s, unnest(%s::bigint[]) RETURNING id",
            (notification_id, abonnement_ids),
        ).fetchall()
    return notification_uuid, sorted(row[0] for row in rows)


def states(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT state, count(*) FROM delivery GROUP BY state").fetchall()
    return {row[0]: row[1] for row in rows}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


class WorkerProcess:
    """A real ``koerier worker`` subprocess with its log in a file."""

    def __init__(self, env: dict[str, str], log_dir: Path, processes: int = 1,
                 concurrency: int = 16, name: str = "worker", extra: list[str] | None = None):
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [str(KOERIER), "worker", "--processes", str(processes),
             "--concurrency", str(concurrency), *(extra or [])],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "wb"), start_new_session=True,
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                found.append(event)
        return found

    def wait_for_event(self, name: str, timeout: float = 30.0, count: int = 1
                       ) -> list[dict[str, Any]]:
        return wait_until(lambda: len(self.events(name)) >= count and self.events(name),
                          timeout, f"{count} x {name} in {self.log_path}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_for_event("broker_connected", timeout, count=2)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Published:
    """The answer to one ``POST /notificaties``."""

    status: int  # 0: no answer (connection error or client timeout)
    notification_uuid: str | None
    content_type: str
    at: float
    error: str = ""


def publish(api_url: str, token: str, count: int, concurrency: int = 20,
            timeout: float = 15.0, body: Callable[[int], str] | None = None) -> list[Published]:
    """POST ``count`` notifications, ``concurrency`` at a time, through the real API."""
    return asyncio.run(_publish(api_url, token, count, concurrency, timeout, body))


async def _publish(api_url: str, token: str, count: int, concurrency: int, timeout: float,
                   body: Callable[[int], str] | None) -> list[Published]:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    results: list[Published] = []
    indexes = iter(range(count))
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout),
        connector=aiohttp.TCPConnector(limit=concurrency),
    ) as session:

        async def one_after_another() -> None:
            for index in indexes:
                data = body(index) if body else message()
                try:
                    async with session.post(f"{api_url}/api/v1/notificaties", data=data,
                                            headers=headers) as response:
                        await response.read()
                        location = response.headers.get("Location", "")
                        results.append(Published(
                            response.status, location.removeprefix("urn:uuid:") or None,
                            response.headers.get("Content-Type", ""), time.time()))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    results.append(Published(0, None, "", time.time(), repr(exc)))

        await asyncio.gather(*(one_after_another() for _ in range(concurrency)))
    return results


def api_token(conn: psycopg.Connection[Any]) -> str:
    """Register the test publisher client and return a fresh token for it."""
    from koerier.auth import make_token
    from tests.apiharness import insert_clients, secret_of

    insert_clients(conn)
    return make_token("publisher", secret_of("publisher"))
