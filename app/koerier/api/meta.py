"""The served OpenAPI document and the health endpoints."""

from __future__ import annotations

import asyncio

from koerier import db
from koerier.api import errors, validation
from koerier.api.base import ApiHandler

READY_TIMEOUT_SECONDS = 2.0


class SpecHandler(ApiHandler):
    """The Notificaties API 1.0.1 document; older publishers fetch it with ``?v=3``."""

    public = True
    negotiate = False
    query_parameters = frozenset({"v", "format"})

    def get(self) -> None:
        self.set_header("Content-Type", "application/vnd.oai.openapi; charset=utf-8")
        self.set_header("X-OAS-Version", str(validation.spec()["openapi"]))
        self.finish(validation.spec_text())


class HealthHandler(ApiHandler):
    """Alive: the process answers HTTP. Says nothing about its dependencies."""

    public = True

    def get(self) -> None:
        self.send_json({"status": "ok"})


class ReadyHandler(ApiHandler):
    """Ready: the database answers. The broker's state is reported but does not count.

    A notification accepted while the broker is down waits in the outbox (its delivery
    rows) and the relay publishes it later, so the API still serves. A load balancer that
    took the process out of rotation on a broker outage would turn it into an API outage.
    """

    public = True

    async def get(self) -> None:
        try:
            await asyncio.wait_for(self._ping_database(), READY_TIMEOUT_SECONDS)
        except (TimeoutError, db.DatabaseUnavailable):
            raise errors.unavailable("database not reachable") from None
        publisher = self.context.publisher
        if publisher is None:
            broker = "not used"
        elif publisher.is_connected():
            broker = "ok"
        else:
            broker = "unavailable"
        self.send_json({"status": "ready", "database": "ok", "broker": broker})

    async def _ping_database(self) -> None:
        async with db.connection() as conn:
            await conn.execute("SELECT 1")
