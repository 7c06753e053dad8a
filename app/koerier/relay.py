"""The relay: hands deliveries that are due from PostgreSQL to RabbitMQ.

Every worker process runs one. About once a second (``KOERIER_RELAY_INTERVAL_SECONDS``) it
takes, with ``FOR NO KEY UPDATE SKIP LOCKED`` so relays of other processes take other rows:

- ``scheduled`` deliveries whose ``due_at`` has come: retries, deferred deliveries,
  re-sends, and fresh deliveries the API could not publish (broker down). A fresh delivery
  (``due_at = created_at``, as the API writes it) is left alone for
  ``KOERIER_RELAY_GRACE_SECONDS`` so the relay does not race the API's own publish;
- the safety net: ``queued`` deliveries older than ``KOERIER_RELAY_STALE_QUEUED_SECONDS``,
  and ``sending`` ones as old whose claim expired (their message was lost).

It publishes them with confirms and marks the confirmed ones ``queued``, in the same
transaction. A message published twice is harmless: the claim rule drops the second.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from koerier import db, logs, metrics
from koerier.broker import API_RECONNECT_MAX_SECONDS, Publisher
from koerier.config import Settings
from koerier.db import DatabaseUnavailable
from koerier.delivery import lock_in_order

log = logs.get("koerier.relay")


_DUE = """
    SELECT id FROM delivery
    WHERE state = 'scheduled' AND due_at <= now()
      AND (due_at > created_at OR created_at <= now() - make_interval(secs => %(grace)s))
    ORDER BY due_at
    LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED
"""

_STALE = """
    SELECT id FROM delivery
    WHERE state IN ('queued', 'sending')
      AND queued_at <= now() - make_interval(secs => %(stale)s)
      AND (state = 'queued' OR claimed_until < now())
    ORDER BY queued_at
    LIMIT %(limit)s
    FOR NO KEY UPDATE SKIP LOCKED
"""

# Only a delivery nobody has touched yet (due_at still equals created_at): a fast worker
# may have claimed, attempted and rescheduled it before the broker's confirm came back,
# and such a retry must stay 'scheduled' for the relay.
# Rows are locked in id order, like a worker's claims.
_MARK_QUEUED = "WITH " + lock_in_order("state = 'scheduled' AND due_at = created_at") + """
    UPDATE delivery d SET state = 'queued', queued_at = now()
    FROM locked
    WHERE d.id = locked.id AND d.state = 'scheduled' AND d.due_at = d.created_at
"""


MARK_QUEUED_EVERY_SECONDS = 0.25


async def mark_queued(delivery_ids: list[int]) -> None:
    """Mark deliveries the broker confirmed as ``queued`` (one UPDATE for the batch)."""
    async with db.connection() as conn:
        await conn.execute(_MARK_QUEUED, {"ids": delivery_ids})


def api_publisher(settings: Settings) -> Publisher:
    """The publisher for an API process: confirmed deliveries are marked ``queued``,
    gathered for a quarter of a second (well inside the relay's grace period; a mark that
    comes too late or never costs one duplicate message, which the claim rule drops)."""
    return Publisher(settings, on_confirmed=mark_queued,
                     reconnect_max_seconds=API_RECONNECT_MAX_SECONDS,
                     confirmed_every_seconds=MARK_QUEUED_EVERY_SECONDS)


class Relay:
    """The relay loop of one worker process (see the module docstring)."""

    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self._settings = settings
        self._publisher = publisher
        self._database_down = False

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay until ``stopping`` is set; survives broker and database outages."""
        next_stats = 0.0
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            moved = 0
            try:
                if self._publisher.is_connected():
                    moved = await self.relay_once()
                if loop.time() >= next_stats:
                    await self.refresh_stats()
                    next_stats = loop.time() + metrics.INSTALLATION_REFRESH_SECONDS
                self._database_is(up=True)
            except DatabaseUnavailable as exc:
                self._database_is(up=False, error=str(exc))
            except psycopg.Error as exc:
                log.error("relay_failed", error=str(exc).strip().splitlines()[0])
            except Exception:  # the relay must outlive any one bad pass
                log.exception("relay_failed")
            if moved < self._settings.relay_batch_size:
                try:
                    await asyncio.wait_for(stopping.wait(), self._settings.relay_interval_seconds)
                except TimeoutError:
                    pass

    def _database_is(self, up: bool, error: str = "") -> None:
        metrics.DATABASE_UP.set(1 if up else 0)
        if up and self._database_down:
            log.info("database_available", component="relay")
        elif not up and not self._database_down:
            log.warning("database_unavailable", component="relay", error=error)
        self._database_down = not up

    async def relay_once(self) -> int:
        """One pass: publish what is due and what is stale; returns how many were taken."""
        limit = self._settings.relay_batch_size
        async with db.connection() as conn, conn.transaction():
            due = await self._ids(conn, _DUE, {
                "grace": self._settings.relay_grace_seconds, "limit": limit})
            stale = await self._ids(conn, _STALE, {
                "stale": self._settings.relay_stale_queued_seconds, "limit": limit})
            if not due and not stale:
                return 0
            confirmed = await self._publisher.publish(due + stale)
            if confirmed:
                await conn.execute(
                    "UPDATE delivery SET state = CASE WHEN state = 'scheduled' THEN 'queued' "
                    "ELSE state END, queued_at = now() WHERE id = ANY(%s)",
                    (confirmed,),
                )
        confirmed_set = set(confirmed)
        due_count = sum(1 for delivery_id in due if delivery_id in confirmed_set)
        metrics.RELAYED.labels("due").inc(due_count)
        metrics.RELAYED.labels("stale").inc(len(confirmed) - due_count)
        if stale:
            log.warning("relay_republished_stale", count=len(stale))
        if len(confirmed) < len(due) + len(stale):
            log.warning("relay_publish_unconfirmed", count=len(due) + len(stale) - len(confirmed))
        return len(due) + len(stale)

    @staticmethod
    async def _ids(conn: psycopg.AsyncConnection[Any], query: str, params: dict[str, Any]
                   ) -> list[int]:
        cursor = await conn.execute(query, params)
        return [row["id"] for row in await cursor.fetchall()]

    async def refresh_stats(self) -> None:
        """Read the installation-wide gauges (backlog, failed, open circuits)."""
        async with db.connection() as conn:
            await metrics.refresh_installation(conn)
