"""``POST /notificaties``: accept a notification, store it with its deliveries, hand them on.

This is the hot path. With a cached token it costs a share of one transaction: the intake
(``intake.py``) stores the notifications that arrive together with one query for their
kanalen and filter groups, one insert statement and the commit. The deliveries are handed
to the publisher only after the commit, so a crash can never leave a delivery that the
database lacks.
The answer is 201 (as the reference implementation and the incumbent give, and as
``gemma-zds-client`` asserts), not the 200 the OAS documents.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta

from koerier import logs, metrics, routing
from koerier.api import errors, validation
from koerier.api.base import ApiHandler
from koerier.clients import SCOPE_PUBLISH

log = logs.get("koerier.api.notificaties")


class NotificatiesHandler(ApiHandler):
    scopes = {"POST": (SCOPE_PUBLISH,)}

    async def post(self) -> None:
        problems = validation.check("Message", self.body)
        if problems:
            raise errors.validation_error(problems)
        self._check_aanmaakdatum(self.body["aanmaakdatum"])

        try:
            # Shares a transaction with the notifications arriving together (intake.py);
            # returns after the commit.
            stored = await self.context.intake.store(self.body, self.raw_body)
        except routing.RoutingError as exc:
            raise errors.invalid(exc.field, exc.code, exc.reason) from None

        # Only after the commit: the publisher must never see an id the database lacks.
        publisher = self.context.publisher
        if publisher is not None and stored.delivery_ids:
            publisher.submit(stored.delivery_ids)
        metrics.notification_received(self.body["kanaal"])
        log.info(
            "notification_received",
            notification=str(stored.uuid),
            kanaal=self.body["kanaal"],
            actie=self.body.get("actie"),
            deliveries=len(stored.delivery_ids),
            client_id=self.principal.client_id if self.principal else None,
        )
        # There is no URL to read a notification back; the Location names the stored
        # notification by the id it is known by in Koerier's records.
        self.set_header("Location", f"urn:uuid:{stored.uuid}")
        self.set_status(201)
        self.set_header("Content-Type", "application/json")
        self.finish(self.request.body)

    def _check_aanmaakdatum(self, value: str) -> None:
        moment = validation.parse_date_time(value)
        assert moment is not None  # the schema's format check passed
        if moment.tzinfo is None:
            # ZGW components send local time without an offset; they mean Dutch time.
            moment = moment.replace(tzinfo=_local_zone(self.context.settings.naive_time_zone))
        leeway = timedelta(seconds=self.context.settings.aanmaakdatum_leeway_seconds)
        if moment > datetime.now(UTC) + leeway:
            raise errors.invalid(
                "aanmaakdatum",
                "future_not_allowed",
                f"must not lie in the future, but is {value}",
            )


def _local_zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)
