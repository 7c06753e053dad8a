"""RabbitMQ through pika's asyncio adapter: topology, confirmed publishing, consuming.

Koerier declares its own topology at every connect: a durable direct exchange ``koerier``
and a durable queue ``koerier.deliveries`` bound with routing key ``delivery``. A message is
persistent and carries only a delivery id (ASCII digits); PostgreSQL holds everything else.

Both classes here keep one connection and one channel alive on the running asyncio loop:
they connect in the background, reconnect with capped exponential backoff when the broker
goes away, and never block their caller. What to do with a message, or with a delivery
that could not be published, is decided by the modules that use them (``relay``,
``worker``), not here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection

from koerier import logs, metrics
from koerier.config import Settings

EXCHANGE = "koerier"
QUEUE = "koerier.deliveries"
ROUTING_KEY = "delivery"

# How long one step of the connect sequence (TCP, AMQP handshake, a declare) may take.
STEP_TIMEOUT_SECONDS = 10.0
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 15.0
# The API's publisher: every second it is disconnected, publishes go the slower way through
# the relay, so it tries again sooner than the workers' connections do.
API_RECONNECT_MAX_SECONDS = 2.0

log = logs.get("koerier.broker")

_PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="text/plain")


class BrokerUnavailable(Exception):
    """RabbitMQ cannot be reached, or the connection broke during an operation."""

    code = "broker_unavailable"


def connection_parameters(
    settings: Settings, name: str, **overrides: Any
) -> pika.ConnectionParameters:
    """The pika parameters for one Koerier connection; ``name`` shows in the management UI."""
    options: dict[str, Any] = {
        "heartbeat": 30,
        "blocked_connection_timeout": 60,
        "connection_attempts": 1,
        "socket_timeout": 5,
        **overrides,
    }
    return pika.ConnectionParameters(
        host=settings.broker_host,
        port=settings.broker_port,
        virtual_host=settings.broker_vhost,
        credentials=pika.PlainCredentials(settings.broker_user, settings.broker_password),
        client_properties={"connection_name": f"koerier {name}"},
        **options,
    )


class _ChannelKeeper:
    """Keeps one connection with one channel open, reconnecting with backoff.

    Subclasses set the channel up in :meth:`_on_channel_ready` and forget its state in
    :meth:`_on_channel_lost`.
    """

    role = "broker"

    def __init__(self, settings: Settings,
                 reconnect_max_seconds: float = RECONNECT_MAX_SECONDS) -> None:
        self._settings = settings
        self._reconnect_max_seconds = reconnect_max_seconds
        self._connection: AsyncioConnection | None = None
        self._channel: pika.channel.Channel | None = None
        self._closed: asyncio.Future[BaseException | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready = asyncio.Event()
        # Bumped at every new channel, so late acks for an old channel can be told apart.
        self.generation = 0

    def start(self) -> None:
        """Connect in the background (call inside the running loop)."""
        # pika logs every refused connection with a traceback; broker_connect_failed says
        # the same once per try, as one structured line.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep_connected())

    def is_connected(self) -> bool:
        return self._channel is not None and self._channel.is_open

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self._stopping = True
        await self._before_close()
        task, self._task = self._task, None
        connection = self._connection
        if self.is_connected() and connection is not None and not connection.is_closing:
            connection.close()
            if task is not None:
                await asyncio.wait({task}, timeout=STEP_TIMEOUT_SECONDS)
        elif connection is not None and not (connection.is_closed or connection.is_closing):
            connection.close()
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1)

    async def _before_close(self) -> None:
        """What a subclass finishes before its connection closes."""

    async def _keep_connected(self) -> None:
        delay = RECONNECT_MIN_SECONDS
        while not self._stopping:
            try:
                await self._connect()
            except (BrokerUnavailable, pika.exceptions.AMQPError, OSError) as exc:
                self._abandon_connection()
                log.warning("broker_connect_failed", role=self.role, error=str(exc) or
                            type(exc).__name__, retry_in_s=round(delay, 2))
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._reconnect_max_seconds)
                continue
            delay = RECONNECT_MIN_SECONDS
            log.info("broker_connected", role=self.role)
            metrics.BROKER_CONNECTED.labels(self.role).set(1)
            self._ready.set()
            assert self._closed is not None
            reason = await self._closed
            self._ready.clear()
            metrics.BROKER_CONNECTED.labels(self.role).set(0)
            self._lose_channel()
            if not self._stopping:
                log.warning("broker_connection_lost", role=self.role, error=str(reason))

    def _abandon_connection(self) -> None:
        connection = self._connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            try:
                connection.close()
            except pika.exceptions.AMQPError:
                pass
        self._lose_channel()

    def _lose_channel(self) -> None:
        if self._channel is not None:
            self._channel = None
            self._on_channel_lost()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        closed: asyncio.Future[BaseException | None] = loop.create_future()
        self._closed = closed

        def on_open(_connection: Any) -> None:
            if not opened.done():
                opened.set_result(None)

        def on_open_error(_connection: Any, error: BaseException | str) -> None:
            if not opened.done():
                opened.set_exception(BrokerUnavailable(str(error) or "connection refused"))
            if not closed.done():
                closed.set_result(None)

        def on_close(_connection: Any, reason: BaseException | None) -> None:
            if not opened.done():
                opened.set_exception(BrokerUnavailable(str(reason)))
            if not closed.done():
                closed.set_result(reason)

        parameters = connection_parameters(self._settings, self.role)
        self._connection = AsyncioConnection(
            parameters, on_open, on_open_error, on_close, custom_ioloop=loop
        )
        await asyncio.wait_for(opened, STEP_TIMEOUT_SECONDS)

        channel: pika.channel.Channel = await self._rpc(
            lambda done: self._connection.channel(on_open_callback=done)  # type: ignore[union-attr]
        )
        channel.add_on_close_callback(self._on_channel_closed)
        await self._rpc(lambda done: channel.exchange_declare(
            EXCHANGE, exchange_type="direct", durable=True, callback=done))
        await self._rpc(lambda done: channel.queue_declare(QUEUE, durable=True, callback=done))
        await self._rpc(lambda done: channel.queue_bind(
            QUEUE, EXCHANGE, routing_key=ROUTING_KEY, callback=done))
        self.generation += 1
        self._channel = channel
        await self._on_channel_ready(channel)

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        # A channel closed by the broker (an error) takes the connection with it, so the
        # keeper reconnects from scratch and the channel state stays simple.
        connection = self._connection
        if connection is not None and connection.is_open and not self._stopping:
            log.warning("broker_channel_closed", role=self.role, error=str(reason))
            connection.close()

    async def _rpc(self, start: Callable[[Callable[[Any], None]], None]) -> Any:
        """Run one callback-style pika call and wait for its reply (or the connection's end)."""
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()

        def done(result: Any) -> None:
            if not reply.done():
                reply.set_result(result)

        start(done)
        assert self._closed is not None
        await asyncio.wait(
            {reply, self._closed}, timeout=STEP_TIMEOUT_SECONDS,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not reply.done():
            reply.cancel()
            raise BrokerUnavailable("the broker did not answer (connection closed or timed out)")
        return reply.result()

    async def _on_channel_ready(self, channel: pika.channel.Channel) -> None:
        """Set the fresh channel up (confirm mode, consumer); raise to reconnect."""

    def _on_channel_lost(self) -> None:
        """Forget everything bound to the channel that is gone."""


class Publisher(_ChannelKeeper):
    """Publishes delivery ids with publisher confirms.

    :meth:`publish` waits for the broker's confirms and returns the confirmed ids (the
    relay's way). :meth:`submit` returns at once and hands the confirmed ids, in batches, to
    ``on_confirmed`` (the API's way: it marks them ``queued`` with one UPDATE per batch).
    An id that was not confirmed (broker down, nack, connection lost) is not retried here:
    its delivery stays ``scheduled`` in PostgreSQL and the relay publishes it later.
    """

    role = "publisher"

    def __init__(
        self,
        settings: Settings,
        on_confirmed: Callable[[list[int]], Awaitable[None]] | None = None,
        reconnect_max_seconds: float = RECONNECT_MAX_SECONDS,
        confirmed_every_seconds: float = 0.0,
    ) -> None:
        super().__init__(settings, reconnect_max_seconds)
        self._on_confirmed = on_confirmed
        # How long confirmed ids are gathered before ``on_confirmed`` gets them: one
        # UPDATE a fraction of a second instead of one per publish.
        self._confirmed_every = confirmed_every_seconds
        # Publishes left to the relay since the channel was lost: one log line per outage,
        # not one per publish (an API under load would write hundreds a second).
        self._left_publishes = 0
        self._left_deliveries = 0
        self._next_tag = 1
        # Delivery tag -> (delivery id, future resolved with True on ack, False otherwise).
        self._unconfirmed: OrderedDict[int, tuple[int, asyncio.Future[bool]]] = OrderedDict()
        self._confirmed_batch: list[int] = []
        self._flush_task: asyncio.Task[None] | None = None

    async def _on_channel_ready(self, channel: pika.channel.Channel) -> None:
        self._next_tag = 1
        await self._rpc(lambda done: channel.confirm_delivery(self._on_confirm, callback=done))
        if self._left_publishes:
            log.info("publish_left_to_relay_ended", publishes=self._left_publishes,
                     count=self._left_deliveries)
            self._left_publishes = self._left_deliveries = 0

    async def _before_close(self) -> None:
        # Confirmed ids still being gathered are handed over now, not lost with the task.
        task = self._flush_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=STEP_TIMEOUT_SECONDS)

    def _on_channel_lost(self) -> None:
        pending = list(self._unconfirmed.values())
        self._unconfirmed.clear()
        for _delivery_id, future in pending:
            if not future.done():
                future.set_result(False)
        if pending:
            metrics.PUBLISHED.labels("lost").inc(len(pending))

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tag = method.delivery_tag
        if method.multiple:
            while self._unconfirmed:
                first = next(iter(self._unconfirmed))
                if first > tag:
                    break
                self._resolve(self._unconfirmed.popitem(last=False)[1], acked)
        elif tag in self._unconfirmed:
            self._resolve(self._unconfirmed.pop(tag), acked)

    @staticmethod
    def _resolve(entry: tuple[int, asyncio.Future[bool]], acked: bool) -> None:
        future = entry[1]
        if not future.done():
            future.set_result(acked)
        metrics.PUBLISHED.labels("confirmed" if acked else "nacked").inc()

    def _publish_now(self, delivery_ids: Iterable[int]) -> list[tuple[int, asyncio.Future[bool]]]:
        channel = self._channel
        if channel is None or not channel.is_open:
            raise BrokerUnavailable("no open channel to the broker")
        loop = asyncio.get_running_loop()
        published = []
        for delivery_id in delivery_ids:
            future: asyncio.Future[bool] = loop.create_future()
            channel.basic_publish(EXCHANGE, ROUTING_KEY, str(delivery_id).encode(), _PERSISTENT)
            self._unconfirmed[self._next_tag] = (delivery_id, future)
            self._next_tag += 1
            published.append((delivery_id, future))
        return published

    async def publish(self, delivery_ids: list[int], timeout: float = 10.0) -> list[int]:
        """Publish and wait for the confirms; returns the ids the broker confirmed."""
        if not delivery_ids:
            return []
        try:
            published = self._publish_now(delivery_ids)
        except (BrokerUnavailable, pika.exceptions.AMQPError):
            return []
        futures = [future for _delivery_id, future in published]
        await asyncio.wait(futures, timeout=timeout)
        return [
            delivery_id for delivery_id, future in published
            if future.done() and future.result()
        ]

    def submit(self, delivery_ids: list[int]) -> None:
        """Publish without waiting; never raises and never blocks.

        Ids that cannot be published now stay ``scheduled`` and are the relay's to publish.
        """
        if not delivery_ids:
            return
        try:
            published = self._publish_now(delivery_ids)
        except (BrokerUnavailable, pika.exceptions.AMQPError) as exc:
            metrics.PUBLISHED.labels("left_to_relay").inc(len(delivery_ids))
            if not self._left_publishes:
                log.warning("publish_left_to_relay", count=len(delivery_ids), error=str(exc))
            self._left_publishes += 1
            self._left_deliveries += len(delivery_ids)
            return
        for delivery_id, future in published:
            future.add_done_callback(functools.partial(self._confirmed_one, delivery_id))

    def _confirmed_one(self, delivery_id: int, future: asyncio.Future[bool]) -> None:
        if not future.result() or self._on_confirmed is None:
            return
        self._confirmed_batch.append(delivery_id)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_confirmed())

    async def _flush_confirmed(self) -> None:
        assert self._on_confirmed is not None
        if self._confirmed_every > 0 and not self._stopping:
            try:
                await asyncio.sleep(self._confirmed_every)
            except asyncio.CancelledError:
                pass  # closing: hand over what was gathered, below
        while self._confirmed_batch:
            batch, self._confirmed_batch = self._confirmed_batch, []
            try:
                await self._on_confirmed(batch)
            except Exception as exc:  # the relay republishes whatever was not marked
                log.warning("mark_queued_failed", count=len(batch), error=str(exc))


@dataclass(frozen=True)
class Message:
    """One broker message as the worker sees it."""

    delivery_tag: int
    body: bytes
    redelivered: bool
    generation: int


class Consumer(_ChannelKeeper):
    """Consumes ``koerier.deliveries`` with manual acks and a named prefetch.

    ``on_message`` is called on the loop for every message; the caller must later call
    :meth:`ack` (outcome recorded) or :meth:`requeue`. Messages of a channel that is gone
    cannot be acked any more: the broker hands them out again, flagged as redelivered.
    """

    role = "consumer"

    def __init__(
        self, settings: Settings, prefetch: int, on_message: Callable[[Message], None]
    ) -> None:
        super().__init__(settings)
        self._prefetch = prefetch
        self._on_message_callback = on_message
        self._consumer_tag: str | None = None
        self._consuming = True

    async def _on_channel_ready(self, channel: pika.channel.Channel) -> None:
        await self._rpc(lambda done: channel.basic_qos(
            prefetch_count=self._prefetch, callback=done))
        if self._consuming:
            self._consumer_tag = channel.basic_consume(
                QUEUE, self._on_delivery, auto_ack=False)

    def _on_channel_lost(self) -> None:
        self._consumer_tag = None

    def _on_delivery(
        self,
        _channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        _properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        self._on_message_callback(Message(
            delivery_tag=method.delivery_tag, body=body,
            redelivered=bool(method.redelivered), generation=self.generation,
        ))

    def _usable(self, message: Message) -> pika.channel.Channel | None:
        channel = self._channel
        if channel is None or not channel.is_open or message.generation != self.generation:
            return None
        return channel

    def ack(self, message: Message) -> None:
        channel = self._usable(message)
        if channel is not None:
            channel.basic_ack(message.delivery_tag)

    def requeue(self, message: Message) -> None:
        channel = self._usable(message)
        if channel is not None:
            channel.basic_nack(message.delivery_tag, requeue=True)

    async def stop_consuming(self) -> None:
        """Ask the broker for no more messages; those already here may still be acked."""
        self._consuming = False
        channel, tag = self._channel, self._consumer_tag
        if channel is None or tag is None or not channel.is_open:
            return
        try:
            await self._rpc(lambda done: channel.basic_cancel(tag, callback=done))
        except (BrokerUnavailable, pika.exceptions.AMQPError):
            pass
        self._consumer_tag = None
