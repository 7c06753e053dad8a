"""The write path: store an accepted notification with the deliveries it fans out to.

:func:`store_notification` runs inside the caller's transaction: it reads the kanaal and
the filter groups subscribed to it in one query, checks the kenmerken against the kanaal,
and inserts the ``notification`` row and one ``delivery`` row per matching abonnement in
one statement. When the transaction commits, nothing accepted can be lost: the API then
hands the delivery ids to a :class:`DeliveryPublisher`, and whatever it could not hand
over stays ``scheduled`` for the relay.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Json

from koerier import filters


class DeliveryPublisher(Protocol):
    """Hands stored deliveries to the broker; implemented by the delivery side."""

    def submit(self, delivery_ids: list[int]) -> None:
        """Queue the ids for publishing and return at once (never blocks the request)."""

    def is_connected(self) -> bool:
        """Whether the broker connection is up (for ``/readyz``)."""


class RoutingError(Exception):
    """The notification cannot be routed; ``field`` and ``code`` feed ``invalidParams``."""

    def __init__(self, field: str, code: str, reason: str):
        super().__init__(reason)
        self.field = field
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class StoredNotification:
    uuid: uuid.UUID
    id: int
    delivery_ids: list[int]
    abonnement_ids: list[int]


_ROUTE_QUERY = """
    SELECT k.filters AS kanaal_filters, f.abonnement_id, f.filters
    FROM kanaal k
    LEFT JOIN abonnement_filter f ON f.kanaal_naam = k.naam
    WHERE k.naam = %s
"""

_INSERT_QUERY = """
    WITH stored AS (
        INSERT INTO notification (uuid, kanaal, message) VALUES (%s, %s, %s) RETURNING id
    ), fanned AS (
        INSERT INTO delivery (notification_id, abonnement_id)
        SELECT stored.id, target FROM stored, unnest(%s::bigint[]) AS target
        RETURNING id
    )
    SELECT (SELECT id FROM stored) AS notification_id,
           coalesce((SELECT array_agg(id ORDER BY id) FROM fanned), '{}') AS delivery_ids
"""


def matching_abonnementen(
    groups: list[tuple[int, Mapping[str, str]]], kenmerken: Mapping[str, str]
) -> list[int]:
    """Abonnement ids with at least one matching filter group (groups are OR), once each."""
    canonical_kenmerken = filters.canonical_filters(kenmerken)
    matched = {
        abonnement_id
        for abonnement_id, group in groups
        if filters.matches(filters.canonical_filters(group), canonical_kenmerken)
    }
    return sorted(matched)


async def store_notification(
    conn: psycopg.AsyncConnection[Any], message: Mapping[str, Any], raw_message: str
) -> StoredNotification:
    """Store ``raw_message`` (the body as published) and its deliveries in ``conn``'s
    transaction; the caller commits.

    Raises :class:`RoutingError` when the kanaal does not exist or the kenmerken do not fit
    the kanaal's declared filters.
    """
    kanaal = message["kanaal"]
    kenmerken: Mapping[str, str] = message.get("kenmerken") or {}

    cursor = await conn.execute(_ROUTE_QUERY, (kanaal,))
    rows = await cursor.fetchall()
    if not rows:
        raise RoutingError("kanaal", "kanaal_naam", f"kanaal {kanaal!r} does not exist")
    kanaal_filters = _column(rows[0], "kanaal_filters", 0) or []
    if not filters.consistent(kenmerken.keys(), kanaal_filters):
        raise RoutingError(
            "kenmerken",
            "kenmerken_inconsistent",
            "the kenmerken must be a subset or superset of the kanaal's filters "
            f"{sorted(kanaal_filters)}, but got {sorted(kenmerken)}",
        )
    groups = [
        (_column(row, "abonnement_id", 1), _column(row, "filters", 2))
        for row in rows
        if _column(row, "abonnement_id", 1) is not None
    ]
    targets = matching_abonnementen(groups, kenmerken)

    notification_uuid = uuid.uuid4()
    cursor = await conn.execute(
        _INSERT_QUERY, (notification_uuid, kanaal, Json(raw_message, dumps=_as_is), targets)
    )
    stored = await cursor.fetchone()
    assert stored is not None
    return StoredNotification(
        uuid=notification_uuid,
        id=int(_column(stored, "notification_id", 0)),
        delivery_ids=list(_column(stored, "delivery_ids", 1)),
        abonnement_ids=targets,
    )


def _as_is(text: str) -> str:
    # The message is stored as the publisher sent it; it was parsed (and so checked) before.
    return text


def _column(row: Any, name: str, index: int) -> Any:
    # Works with the pool's dict rows and with plain tuple rows from a caller's connection.
    return row[name] if isinstance(row, Mapping) else row[index]
