"""The delivery worker: a pool of processes, each consuming deliveries with C tasks.

One worker process holds one RabbitMQ consumer (manual acks, prefetch
``KOERIER_WORKER_PREFETCH``), one publisher for its relay, one aiohttp session and one
PostgreSQL pool. For every message it claims the delivery (docs/design.md), sends it, records
the attempt and the new state, and only then acks the message. Claims, and the records of
successful attempts, of messages handled at the same time share one statement
(batching.py); at low load each still goes alone, with the single-row statement.

Isolation, so that one bad subscriber cannot slow the others:

- ``--concurrency`` bounds the HTTP requests in flight in the process;
- a callback host (scheme, host and port) gets at most ``KOERIER_PER_HOST_CONCURRENCY`` of
  them; more deliveries for a quick host wait for it without holding a request slot, but
  once one of the host's requests has run ``KOERIER_HOST_SLOW_SECONDS``, a delivery that
  would have to wait is deferred (rescheduled ``KOERIER_DEFER_SECONDS`` later, not counted
  as an attempt) and its message acked;
- a circuit breaker per abonnement, shared by all workers through the ``circuit`` table:
  after ``KOERIER_CIRCUIT_FAILURE_THRESHOLD`` consecutive failed attempts it opens for
  ``KOERIER_CIRCUIT_OPEN_SECONDS``; deliveries for an open circuit are deferred until it
  ends, then exactly one of them is let through as the probe. Its success closes the circuit,
  its failure opens it again.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import psycopg

from koerier import db, delivery, logs, metrics
from koerier.batching import Batcher
from koerier.broker import Consumer, Message, Publisher
from koerier.config import Settings
from koerier.db import DatabaseUnavailable
from koerier.relay import Relay

log = logs.get("koerier.worker")

T = TypeVar("T")

DATABASE_RETRY_MAX_SECONDS = 5.0
# After SIGTERM, in-flight attempts get the delivery timeout plus this to finish.
SHUTDOWN_MARGIN_SECONDS = 5.0


class ShuttingDown(Exception):
    """The worker is stopping; the message is left to the broker to hand out again."""


class _Host:
    """The requests of one callback host in this process."""

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)
        self.users = 0
        self.started: dict[int, float] = {}


class HostGate:
    """At most ``limit`` requests per callback host; the others wait without a request slot.

    A delivery waits for its host only while the host is quick. The host counts as slow
    when one of its requests has been running for ``slow_after`` seconds; then a delivery
    that would have to wait is deferred instead, so a hanging host cannot fill the
    prefetch with waiting messages.
    """

    def __init__(self, limit: int, slow_after: float) -> None:
        self._limit = limit
        self._slow_after = slow_after
        self._hosts: dict[str, _Host] = {}
        self._tokens = itertools.count()

    def _slow(self, host: _Host) -> bool:
        if not host.started:
            return False
        return time.monotonic() - min(host.started.values()) >= self._slow_after

    async def acquire(self, key: str) -> int | None:
        """A token for a request slot of the host, or None when the delivery should defer."""
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(self._limit)
        host.users += 1
        try:
            while True:
                if host.semaphore.locked() and self._slow(host):
                    return None
                try:
                    await asyncio.wait_for(host.semaphore.acquire(), self._slow_after)
                    break
                except TimeoutError:
                    continue
        except BaseException:
            self._leave(key, host)
            raise
        token = next(self._tokens)
        host.started[token] = time.monotonic()
        return token

    def release(self, key: str, token: int | None) -> None:
        """Give the slot back (token from :meth:`acquire`) or, with None, the waiting place."""
        host = self._hosts[key]
        if token is not None:
            del host.started[token]
            host.semaphore.release()
        self._leave(key, host)

    def _leave(self, key: str, host: _Host) -> None:
        host.users -= 1
        if host.users == 0:
            del self._hosts[key]


def host_key(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"


async def _circuit_take_probe(
    conn: psycopg.AsyncConnection[Any], abonnement_id: int, open_seconds: float
) -> bool:
    """Whether this delivery becomes the probe of a circuit whose open time is over."""
    cursor = await conn.execute(
        """
        UPDATE circuit SET open_until = now() + make_interval(secs => %s), probing = true
        WHERE abonnement_id = %s AND open_until <= now()
        """,
        (open_seconds, abonnement_id),
    )
    return cursor.rowcount == 1


class Worker:
    """One worker process: consumer, delivery tasks, relay (see the module docstring)."""

    def __init__(self, settings: Settings, concurrency: int, index: int = 0) -> None:
        self._settings = settings
        self._concurrency = concurrency
        self._index = index
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._hosts = HostGate(settings.per_host_concurrency, settings.host_slow_seconds)
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer = Consumer(settings, settings.worker_prefetch, self._on_message)
        self._publisher = Publisher(settings)
        self._session: aiohttp.ClientSession | None = None
        self._database_down = False
        # Long enough to cover waiting for a slot and the attempt itself; it only matters
        # when the message of a claimed delivery is lost (see the claim rule).
        self._lease = settings.delivery_timeout_seconds * 4 + 300
        # Claims and successful outcomes of deliveries handled at the same time share one
        # statement each (batching.py); failures are recorded one by one (circuit counts).
        self._claims: Batcher[tuple[int, bool], delivery.Claim | None] = Batcher(
            self._claim_batch, batch_max=100, concurrency=2)
        self._successes: Batcher[tuple[delivery.Claim, delivery.AttemptResult],
                                 delivery.Recorded] = Batcher(
            self._record_batch, batch_max=100, concurrency=2)

    def stop(self) -> None:
        if not self._stopping.is_set():
            log.info("worker_stopping", worker=self._index, in_flight=len(self._tasks))
            self._stopping.set()

    async def run(self) -> None:
        """Run until :meth:`stop` (SIGTERM/SIGINT); then finish in-flight work and return."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        await db.open_pool(self._settings, autocommit=True, check=False)
        self._session = delivery.new_session(self._settings, self._concurrency)
        self._consumer.start()
        self._publisher.start()
        relay = loop.create_task(Relay(self._settings, self._publisher).run(self._stopping))
        log.info("worker_started", worker=self._index, pid=os.getpid(),
                 concurrency=self._concurrency, prefetch=self._settings.worker_prefetch)

        await self._stopping.wait()

        await self._consumer.stop_consuming()
        grace = self._settings.delivery_timeout_seconds + SHUTDOWN_MARGIN_SECONDS
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.wait({relay}, timeout=self._settings.relay_interval_seconds + 5)
        await self._consumer.close()
        await self._publisher.close()
        await self._session.close()
        await db.close_pool()
        log.info("worker_stopped", worker=self._index)

    def _on_message(self, message: Message) -> None:
        if self._stopping.is_set():
            self._consumer.requeue(message)
            return
        task = asyncio.get_running_loop().create_task(self._handle(message))
        self._tasks.add(task)
        metrics.IN_FLIGHT.set(len(self._tasks))
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        metrics.IN_FLIGHT.set(len(self._tasks))
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery_task_crashed", error=repr(task.exception()))

    async def _with_database(self, action: Callable[[psycopg.AsyncConnection[Any]],
                                                    Awaitable[T]]) -> T:
        """Run ``action`` in a transaction, waiting out a database outage (until shutdown)."""
        delay = 0.2
        while True:
            try:
                async with db.connection() as conn:
                    result = await action(conn)
            except DatabaseUnavailable as exc:
                if not self._database_down:
                    log.warning("database_unavailable", component="worker", error=str(exc))
                    self._database_down = True
                metrics.DATABASE_UP.set(0)
                if self._stopping.is_set():
                    raise ShuttingDown from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, DATABASE_RETRY_MAX_SECONDS)
                continue
            if self._database_down:
                log.info("database_available", component="worker")
                self._database_down = False
                metrics.DATABASE_UP.set(1)
            return result

    async def _claim_batch(self, wanted: Sequence[tuple[int, bool]]
                           ) -> list[delivery.Claim | None]:
        return await self._with_database(
            lambda conn: delivery.claim_many(conn, wanted, self._lease))

    async def _record_batch(
        self, done: Sequence[tuple[delivery.Claim, delivery.AttemptResult]]
    ) -> list[delivery.Recorded | BaseException]:
        try:
            return list(await self._with_database(
                lambda conn: delivery.record_successes(conn, done)))
        except ShuttingDown:
            raise
        except Exception:
            if len(done) == 1:
                raise
        # One row the database refused (its delivery deleted meanwhile, say) must not
        # fail the others: record each on its own, so only that one is tried again.
        recorded: list[delivery.Recorded | BaseException] = []
        for item in done:
            try:
                recorded += await self._record_one(item)
            except ShuttingDown:
                raise
            except Exception as exc:
                recorded.append(exc)
        return recorded

    async def _record_one(self, item: tuple[delivery.Claim, delivery.AttemptResult]
                          ) -> list[delivery.Recorded]:
        return await self._with_database(lambda conn: delivery.record_successes(conn, [item]))

    async def _handle(self, message: Message) -> None:
        try:
            delivery_id = int(message.body)
        except ValueError:
            log.error("broker_message_invalid", body=message.body[:64].decode("ascii", "replace"))
            self._consumer.ack(message)
            return
        try:
            outcome = await self._deliver(delivery_id, message.redelivered)
        except ShuttingDown:
            # Not acked: the broker hands the message out again, flagged as redelivered,
            # and the claim rule lets the next worker take the delivery over.
            return
        except Exception:
            # A bug or an unexpected database error: keep the message, try again shortly.
            log.exception("delivery_error", delivery_id=delivery_id)
            await asyncio.sleep(1)
            self._consumer.requeue(message)
            return
        metrics.DELIVERIES.labels(outcome).inc()
        self._consumer.ack(message)

    async def _deliver(self, delivery_id: int, redelivered: bool) -> str:
        """Claim, send and record one delivery; returns the outcome for the metrics."""
        target = await self._claims.submit((delivery_id, redelivered))
        if target is None:
            log.debug("delivery_duplicate_dropped", delivery_id=delivery_id)
            return "duplicate"
        bound = log.bind(delivery_id=delivery_id, notification_id=target.notification_uuid,
                         abonnement_id=target.abonnement_uuid, attempt=target.attempt)
        if target.callback_url is None:
            await self._with_database(
                lambda conn: delivery.cancel(conn, target, "the abonnement was deleted"))
            bound.info("delivery_cancelled", reason="abonnement_deleted")
            return "cancelled"

        if target.circuit_open_for is not None:
            deferred = await self._circuit_gate(target, bound)
            if deferred:
                return "deferred_circuit_open"

        host = host_key(target.callback_url)
        token = await self._hosts.acquire(host)
        try:
            if token is None:
                delay = self._settings.defer_seconds * random.uniform(1, 1.5)
                await self._with_database(lambda conn: delivery.defer(conn, target, delay))
                bound.info("delivery_deferred", reason="host_busy", retry_in_s=round(delay, 2))
                return "deferred_host_busy"
            async with self._slots:
                if self._stopping.is_set():
                    await self._with_database(lambda conn: delivery.defer(conn, target, 0))
                    return "deferred_shutdown"
                assert self._session is not None
                result = await delivery.send(self._session, target)
        finally:
            self._hosts.release(host, token)
        return await self._record(target, result, bound)

    async def _circuit_gate(self, target: delivery.Claim, bound: Any) -> bool:
        """Defer the delivery while its circuit is open; True when deferred."""
        open_for = target.circuit_open_for or 0.0
        probing = target.circuit_probing
        if open_for <= 0:
            became_probe = await self._with_database(lambda conn: _circuit_take_probe(
                conn, target.abonnement_id, self._settings.circuit_open_seconds))
            if became_probe:
                bound.info("circuit_probe", abonnement_id=target.abonnement_uuid)
                return False
            probing = True  # another delivery won the race and is the probe
        if probing:
            # The probe's answer comes within a delivery timeout; waiting out its whole
            # lease would hold these deliveries back long after a success closes the circuit.
            delay = self._settings.defer_seconds * random.uniform(1, 1.5)
        else:
            delay = open_for + random.uniform(0, min(5.0, open_for * 0.2 + 0.1))
        await self._with_database(lambda conn: delivery.defer(conn, target, delay))
        bound.debug("delivery_deferred", reason="circuit_open", retry_in_s=round(delay, 2))
        return True

    async def _record(self, target: delivery.Claim, result: delivery.AttemptResult,
                      bound: Any) -> str:
        settings = self._settings
        metrics.ATTEMPTS.labels("success" if result.success else result.error_class).inc()
        metrics.ATTEMPT_DURATION.observe(result.duration_ms / 1000)
        if result.success:
            next_state, retry_in = "delivered", None
        elif target.retry > settings.retry_max:
            next_state, retry_in = "failed", None
        else:
            next_state, retry_in = "scheduled", delivery.retry_delay(settings, target.retry)

        if result.success:
            recorded = await self._successes.submit((target, result))
        else:
            recorded = await self._with_database(lambda conn: delivery.record(
                conn, target, result, next_state, retry_in,
                settings.circuit_failure_threshold, settings.circuit_open_seconds))
        failures, closed, current = (recorded.consecutive_failures, recorded.circuit_closed,
                                     recorded.current)
        if closed:
            metrics.CIRCUIT_EVENTS.labels("closed").inc()
            bound.info("circuit_closed", abonnement_id=target.abonnement_uuid)
        if failures >= settings.circuit_failure_threshold and (
            failures == settings.circuit_failure_threshold or target.circuit_open_for is not None
        ):
            metrics.CIRCUIT_EVENTS.labels("opened").inc()
            bound.warning("circuit_opened", abonnement_id=target.abonnement_uuid,
                          consecutive_failures=failures,
                          open_for_s=settings.circuit_open_seconds)
        if not current:
            bound.warning("delivery_claim_taken_over", outcome=next_state)

        if result.success:
            latency = max(0.0, time.time() - target.received_at)
            metrics.LATENCY.observe(latency)
            bound.info("delivery_succeeded", status=result.status_code,
                       duration_ms=result.duration_ms, latency_ms=int(latency * 1000))
            return "delivered"
        if next_state == "failed":
            bound.error("delivery_given_up", status=result.status_code,
                        error_class=result.error_class, attempts=target.retry)
            return "failed"
        bound.warning("delivery_failed", status=result.status_code,
                      error_class=result.error_class, duration_ms=result.duration_ms,
                      retry_in_s=round(retry_in or 0, 1))
        return "retry_scheduled"


def run_process(settings: Settings, concurrency: int, index: int,
                metrics_port: int | None, metrics_address: str) -> None:
    """Entry point of one worker process."""
    if metrics_port is not None:
        metrics.serve(metrics_port + index, metrics_address)
    worker = Worker(settings, concurrency, index)
    parent = os.getppid()

    async def main() -> None:
        watch = asyncio.get_running_loop().create_task(_watch_parent(parent, worker))
        try:
            await worker.run()
        finally:
            watch.cancel()

    asyncio.run(main())


async def _watch_parent(parent: int, worker: Worker) -> None:
    """A pool member stops when its parent is gone (killed), like the parent wants."""
    while True:
        await asyncio.sleep(1)
        if os.getppid() != parent:
            log.warning("worker_parent_gone", worker_parent=parent)
            worker.stop()
            return


def run_pool(settings: Settings, processes: int, concurrency: int,
             metrics_port: int | None, metrics_address: str = "127.0.0.1") -> None:
    """Run ``processes`` worker processes (in this one when it is 1) until SIGTERM."""
    if processes == 1:
        run_process(settings, concurrency, 0, metrics_port, metrics_address)
        return

    context = multiprocessing.get_context("fork")
    members: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def start(index: int) -> None:
        process = context.Process(
            target=run_process, name=f"koerier-worker-{index}",
            args=(settings, concurrency, index, metrics_port, metrics_address),
        )
        process.start()
        members[index] = process

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for process in members.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(processes):
        start(index)
    while members:
        for index, process in list(members.items()):
            process.join(timeout=0.5)
            if process.is_alive():
                continue
            del members[index]
            if not stopping:
                log.error("worker_process_exited", worker=index, exitcode=process.exitcode)
                time.sleep(1)
                start(index)
