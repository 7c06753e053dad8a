"""Group commit for published notifications: one transaction for all that arrive together.

Each ``POST /notificaties`` used to cost its own transaction: a route query, an insert and
a commit, each a round trip and a PostgreSQL statement. Under load most of that work is
per transaction, not per notification, so the :class:`Intake` stores the notifications
that arrive while earlier transactions run in one transaction of their own
(:func:`routing.store_notifications`: two statements whatever the number).

No guarantee changes: a publisher gets its 201 only after the transaction that holds its
notification committed. At low load nothing waits: with no transaction running, an arrival
starts one in the next turn of the event loop. Under load, at most ``transactions`` run at
once and the arrivals meanwhile form the next batch (at most ``batch_max``), so batches
grow with the load instead of with a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from koerier import db, logs, routing
from koerier.db import DatabaseUnavailable

log = logs.get("koerier.intake")


@dataclass
class _Entry:
    message: Mapping[str, Any]
    raw: str
    result: asyncio.Future[routing.StoredNotification]


class Intake:
    """Stores notifications in shared transactions; see the module docstring."""

    def __init__(self, batch_max: int = 100, transactions: int = 2) -> None:
        self._batch_max = batch_max
        self._transactions = transactions
        self._waiting: list[_Entry] = []
        self._running = 0
        self._start_pending = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._routes = routing.RouteCache()

    async def store(self, message: Mapping[str, Any], raw: str) -> routing.StoredNotification:
        """Store one notification; returns once its transaction committed.

        Raises :class:`routing.RoutingError` for a notification that cannot be routed,
        :class:`DatabaseUnavailable` when the database did not answer, and whatever else
        storing it raised.
        """
        loop = asyncio.get_running_loop()
        entry = _Entry(message, raw, loop.create_future())
        self._waiting.append(entry)
        self._schedule(loop)
        return await entry.result

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._start_pending or not self._waiting or self._running >= self._transactions:
            return
        # Not at once: requests read in this same turn of the loop join the batch.
        self._start_pending = True
        loop.call_soon(self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._start_pending = False
        while self._waiting and self._running < self._transactions:
            batch = self._waiting[: self._batch_max]
            del self._waiting[: self._batch_max]
            self._running += 1
            task = loop.create_task(self._run(batch, loop))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Entry], loop: asyncio.AbstractEventLoop) -> None:
        try:
            await self._store(batch)
        finally:
            self._running -= 1
            self._schedule(loop)

    async def _store(self, batch: list[_Entry]) -> None:
        try:
            async with db.connection() as conn:
                # One statement is its own transaction: no BEGIN and COMMIT round trips.
                await conn.set_autocommit(True)
                try:
                    results = await routing.store_notifications(
                        conn, [(entry.message, entry.raw) for entry in batch], self._routes)
                finally:
                    if not conn.closed:
                        await conn.set_autocommit(False)
        except DatabaseUnavailable as exc:
            _fail(batch, exc)
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # One notification the database refused (a value it cannot store) must not
            # fail the others: store each on its own, so only its publisher gets the error.
            log.warning("intake_batch_failed", size=len(batch), error=repr(exc))
            for entry in batch:
                await self._store([entry])
        except BaseException as exc:  # cancelled: the process is stopping
            _fail(batch, DatabaseUnavailable(f"storing was interrupted: {exc!r}"))
            raise
        else:
            for entry, result in zip(batch, results, strict=True):
                if entry.result.done():
                    continue
                if isinstance(result, routing.RoutingError):
                    entry.result.set_exception(result)
                else:
                    entry.result.set_result(result)


def _fail(batch: list[_Entry], exc: BaseException) -> None:
    for entry in batch:
        if not entry.result.done():
            entry.result.set_exception(exc)
