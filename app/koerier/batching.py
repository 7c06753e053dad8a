"""Natural batching: items that arrive while earlier batches are being handled share one.

Koerier's database work is mostly per statement, not per row: the round trip, parsing and
planning, the commit. A :class:`Batcher` lets many concurrent callers share one statement
without adding a timer: with fewer than ``concurrency`` batches running, an item starts a
batch in the next turn of the event loop (joined by whatever else arrived in that turn);
otherwise it waits for a running batch to end and goes with everything that arrived
meanwhile (at most ``batch_max``). At low load every item is handled at once and alone;
the busier the process, the larger the batches.

An item may be given a time to start within: one still waiting then is taken out and
fails with :class:`NotStarted`, so a stalled handler cannot gather callers without bound.
An item whose batch has started is never abandoned: its outcome is what the handler did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Handles a batch; returns one result (or exception, raised to that caller) per item.
Handler = Callable[[Sequence[Item]], Awaitable[Sequence[Result | BaseException]]]


class NotStarted(Exception):
    """The item's batch did not start within the time it was given; it was not handled."""


class Batcher(Generic[Item, Result]):
    """Runs ``handler`` over batches of the items given to :meth:`submit`."""

    def __init__(self, handler: Handler[Item, Result], batch_max: int = 100,
                 concurrency: int = 1) -> None:
        self._handler = handler
        self._batch_max = batch_max
        self._concurrency = concurrency
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._running = 0
        self._start_pending = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item, start_within: float | None = None) -> Result:
        """Handle ``item`` in the next batch; its result, or its exception raised.

        With ``start_within`` (seconds), raises :class:`NotStarted` if no batch took the
        item by then."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        entry = (item, future)
        self._waiting.append(entry)
        self._schedule(loop)
        if start_within is None:
            return await future
        timer = loop.call_later(start_within, self._expire, entry, start_within)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, entry: tuple[Item, asyncio.Future[Result]], waited: float) -> None:
        # By identity: two equal items are still two callers.
        for position, waiting in enumerate(self._waiting):
            if waiting is entry:
                del self._waiting[position]
                if not entry[1].done():
                    entry[1].set_exception(NotStarted(f"not started within {waited:g} s"))
                return

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._start_pending or not self._waiting or self._running >= self._concurrency:
            return
        self._start_pending = True
        loop.call_soon(self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._start_pending = False
        while self._waiting and self._running < self._concurrency:
            batch = self._waiting[: self._batch_max]
            del self._waiting[: self._batch_max]
            self._running += 1
            task = loop.create_task(self._run(batch, loop))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]],
                   loop: asyncio.AbstractEventLoop) -> None:
        try:
            results = await self._handler([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller was cancelled
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._running -= 1
            self._schedule(loop)
