"""The write path: store accepted notifications with the deliveries they fan out to.

:func:`store_notifications` stores a batch of notifications (the API's intake hands it
every notification that arrived while earlier ones were being stored) with **one
statement**, in its own transaction: the ``notification`` rows and one ``delivery`` row
per matching abonnement. Which abonnementen match is decided in this process, from a
:class:`RouteCache` of kanalen and filter groups; the statement inserts only while the
``routing_version`` the cache was read at is still current (migration 0004), and when it
is not, the routes are read again and the batch is routed anew. So a cached route is never
used after a change to kanalen or abonnementen is committed, and a refusal (unknown
kanaal, kenmerken that do not fit) is only ever given on routes read just now.

When the statement commits, nothing accepted can be lost: the API then hands the delivery
ids to a :class:`DeliveryPublisher`, and whatever it could not hand over stays
``scheduled`` for the relay.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from koerier import filters
from koerier.db import DatabaseUnavailable


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
    SELECT v.version, k.naam, k.filters AS kanaal_filters, f.abonnement_id, f.filters
    FROM routing_version v
    LEFT JOIN kanaal k ON k.naam = ANY(%s)
    LEFT JOIN abonnement_filter f ON f.kanaal_naam = k.naam
"""

# Many notifications in one statement: the i-th entry of every array belongs to the i-th
# notification; the target arrays pair a notification with an abonnement. Nothing is
# inserted (and no row returned) unless the routes were read at the current version.
_INSERT_QUERY = """
    WITH input AS (
        SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS t(uuid, kanaal, message)
        WHERE EXISTS (SELECT 1 FROM routing_version WHERE version = %s)
    ), stored AS (
        INSERT INTO notification (uuid, kanaal, message)
        SELECT uuid, kanaal, message::json FROM input
        RETURNING id, uuid
    ), targets AS (
        SELECT * FROM unnest(%s::uuid[], %s::bigint[]) AS t(uuid, abonnement_id)
    ), fanned AS (
        INSERT INTO delivery (notification_id, abonnement_id)
        SELECT stored.id, targets.abonnement_id FROM targets JOIN stored USING (uuid)
        RETURNING id, notification_id
    )
    SELECT stored.uuid, stored.id,
           coalesce(array_agg(fanned.id ORDER BY fanned.id)
                    FILTER (WHERE fanned.id IS NOT NULL), '{}') AS delivery_ids
    FROM stored LEFT JOIN fanned ON fanned.notification_id = stored.id
    GROUP BY stored.uuid, stored.id
"""

# Routing changes are rare (people create abonnementen); more than a few in a row while
# one batch is stored means something is wrong, and the publishers should try again.
_ROUTING_ATTEMPTS = 5


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


@dataclass(frozen=True)
class Route:
    """A kanaal as routing sees it: its declared filters and the groups subscribed to it."""

    kanaal_filters: list[str]
    groups: list[tuple[int, Mapping[str, str]]]


class RouteCache:
    """Kanalen (and the absence of one, as None) read at one ``routing_version``.

    At most ``max_entries`` names are kept: a publisher that names ever new kanalen, which
    do not exist, must not grow the process; past the bound the cache starts afresh.
    """

    def __init__(self, max_entries: int = 1000) -> None:
        self.version: int | None = None
        self.routes: dict[str, Route | None] = {}
        self.max_entries = max_entries

    def missing(self, kanalen: Sequence[str]) -> list[str]:
        return [naam for naam in kanalen if naam not in self.routes]

    async def load(self, conn: psycopg.AsyncConnection[Any], kanalen: Sequence[str]) -> None:
        """Read ``kanalen`` now; a newer version than the cache's empties the cache first."""
        cursor = await conn.execute(_ROUTE_QUERY, (list(kanalen),))
        rows = await cursor.fetchall()
        version = int(_column(rows[0], "version", 0))
        if version != self.version or len(self.routes) + len(kanalen) > self.max_entries:
            self.version = version
            self.routes = {}
        loaded: dict[str, Route | None] = {naam: None for naam in kanalen}
        for row in rows:
            naam = _column(row, "naam", 1)
            if naam is None:
                continue
            route = loaded[naam]
            if route is None:
                route = loaded[naam] = Route(_column(row, "kanaal_filters", 2) or [], [])
            abonnement_id = _column(row, "abonnement_id", 3)
            if abonnement_id is not None:
                route.groups.append((abonnement_id, _column(row, "filters", 4)))
        self.routes.update(loaded)


async def store_notifications(
    conn: psycopg.AsyncConnection[Any],
    incoming: Sequence[tuple[Mapping[str, Any], str]],
    cache: RouteCache | None = None,
) -> list[StoredNotification | RoutingError]:
    """Store many notifications (each a parsed message and its body as published) with
    their deliveries, in one statement; ``conn`` must be in autocommit mode.

    The result has one entry per notification, in order: what was stored, or the
    :class:`RoutingError` that kept it out. One notification's error stores nothing of it
    and does not keep the others out. Without a ``cache`` the routes are read every time.
    """
    cache = cache if cache is not None else RouteCache()
    kanalen = sorted({message["kanaal"] for message, _ in incoming})
    fresh = False
    if cache.missing(kanalen):
        await cache.load(conn, kanalen)
        fresh = True
    for _ in range(_ROUTING_ATTEMPTS):
        results = [_route(cache.routes.get(message["kanaal"]), message)
                   for message, _ in incoming]
        if not fresh and any(isinstance(result, RoutingError) for result in results):
            # A refusal on cached routes could be out of date: decide it on fresh ones.
            await cache.load(conn, kanalen)
            fresh = True
            continue
        if await _insert(conn, incoming, results, cache.version):
            return results
        # The routes changed since they were read: read them again and route anew.
        await cache.load(conn, kanalen)
        fresh = True
    raise DatabaseUnavailable("the kanalen and abonnementen kept changing; try again")


async def _insert(
    conn: psycopg.AsyncConnection[Any],
    incoming: Sequence[tuple[Mapping[str, Any], str]],
    results: list[StoredNotification | RoutingError],
    version: int | None,
) -> bool:
    """Insert the routable notifications, filling their ids into ``results`` in place;
    False when ``version`` is no longer the current one (nothing was inserted)."""
    uuids: list[uuid.UUID] = []
    kanalen: list[str] = []
    bodies: list[str] = []
    target_uuids: list[uuid.UUID] = []
    target_ids: list[int] = []
    for position, ((message, raw_message), result) in enumerate(
            zip(incoming, results, strict=True)):
        if isinstance(result, RoutingError):
            continue
        notification_uuid = uuid.uuid4()
        results[position] = StoredNotification(
            notification_uuid, 0, [], result.abonnement_ids)
        uuids.append(notification_uuid)
        kanalen.append(message["kanaal"])
        bodies.append(raw_message)
        target_uuids += [notification_uuid] * len(result.abonnement_ids)
        target_ids += result.abonnement_ids
    if not uuids:
        return True
    cursor = await conn.execute(
        _INSERT_QUERY, (uuids, kanalen, bodies, version, target_uuids, target_ids))
    rows = await cursor.fetchall()
    if not rows:
        return False
    stored = {
        _column(row, "uuid", 0): (int(_column(row, "id", 1)), list(_column(row, "delivery_ids", 2)))
        for row in rows
    }
    for position, result in enumerate(results):
        if isinstance(result, StoredNotification):
            notification_id, delivery_ids = stored[result.uuid]
            results[position] = StoredNotification(
                result.uuid, notification_id, delivery_ids, result.abonnement_ids)
    return True


def _route(route: Route | None, message: Mapping[str, Any]) -> StoredNotification | RoutingError:
    """Where a message goes (a StoredNotification still without ids), or why it cannot."""
    kanaal = message["kanaal"]
    kenmerken: Mapping[str, str] = message.get("kenmerken") or {}
    if route is None:
        return RoutingError("kanaal", "kanaal_naam", f"kanaal {kanaal!r} does not exist")
    if not filters.consistent(kenmerken.keys(), route.kanaal_filters):
        return RoutingError(
            "kenmerken",
            "kenmerken_inconsistent",
            "the kenmerken must be a subset or superset of the kanaal's filters "
            f"{sorted(route.kanaal_filters)}, but got {sorted(kenmerken)}",
        )
    placeholder = uuid.UUID(int=0)
    return StoredNotification(placeholder, 0, [], matching_abonnementen(route.groups, kenmerken))


def _column(row: Any, name: str, index: int) -> Any:
    # Works with the pool's dict rows and with plain tuple rows from a caller's connection.
    return row[name] if isinstance(row, Mapping) else row[index]
