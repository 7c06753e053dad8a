"""Group commit for published notifications: one statement for all that arrive together.

Each ``POST /notificaties`` used to cost its own transaction: a route query, an insert and
a commit, each a round trip and a PostgreSQL statement. Most of that work is per
statement, not per notification, so the :class:`Intake` hands the notifications that
arrive while earlier ones are being stored to :func:`routing.store_notifications`
together (:mod:`koerier.batching`): one autocommitted statement, whatever their number,
with the routes taken from the process's route cache.

No guarantee changes: a publisher gets its 201 only after the statement that holds its
notification committed, and at low load nothing waits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from koerier import db, logs, routing
from koerier.batching import Batcher, NotStarted
from koerier.db import DatabaseUnavailable

log = logs.get("koerier.intake")

Incoming = tuple[Mapping[str, Any], str]
Outcome = routing.StoredNotification | BaseException


class Intake:
    """Stores notifications in shared statements; see the module docstring."""

    def __init__(self, batch_max: int = 100, transactions: int = 2,
                 wait_seconds: float | None = 3.0) -> None:
        self._routes = routing.RouteCache()
        self._batcher: Batcher[Incoming, routing.StoredNotification] = Batcher(
            self._store, batch_max, transactions)
        # As long as a request would have waited for a pool connection: a database that
        # takes nothing must give publishers a 503, not hold them (and their bodies).
        self._wait_seconds = wait_seconds

    async def store(self, message: Mapping[str, Any], raw: str) -> routing.StoredNotification:
        """Store one notification; returns once its statement committed.

        Raises :class:`routing.RoutingError` for a notification that cannot be routed,
        :class:`DatabaseUnavailable` when the database did not answer or no statement could
        take it within ``wait_seconds``, and whatever else storing it raised.
        """
        try:
            return await self._batcher.submit((message, raw), self._wait_seconds)
        except NotStarted as exc:
            raise DatabaseUnavailable(f"the database took no notification: {exc}") from None

    async def _store(self, batch: Sequence[Incoming]) -> list[Outcome]:
        try:
            return list(await self._store_together(batch))
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            if len(batch) == 1:
                raise
            # One notification the database refused (a value it cannot store) must not
            # fail the others: store each on its own, so only its publisher gets the error.
            log.warning("intake_batch_failed", size=len(batch), error=repr(exc))
            outcomes: list[Outcome] = []
            for position, incoming in enumerate(batch):
                try:
                    outcomes += await self._store_together([incoming])
                except DatabaseUnavailable as unavailable:
                    # The ones stored so far are committed and keep their 201; only those
                    # not stored get the 503 (a publisher that retries a stored one would
                    # publish it twice, under a new id).
                    outcomes += [unavailable] * (len(batch) - position)
                    break
                except Exception as single:
                    outcomes.append(single)
            return outcomes

    async def _store_together(self, batch: Sequence[Incoming]) -> list[Outcome]:
        async with db.connection() as conn:
            # One statement is its own transaction: no BEGIN and COMMIT round trips.
            await conn.set_autocommit(True)
            try:
                return list(await routing.store_notifications(conn, batch, self._routes))
            finally:
                if not conn.closed:
                    await conn.set_autocommit(False)
