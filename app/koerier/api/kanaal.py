"""``/kanaal``: the channels publishers register and abonnementen refer to by name."""

from __future__ import annotations

import uuid
from typing import Any

from koerier import db, filters, logs
from koerier.api import errors, validation
from koerier.api.base import ApiHandler, Row, many, one
from koerier.clients import SCOPE_CONSUME, SCOPE_PUBLISH

log = logs.get("koerier.api.kanaal")

READ = (SCOPE_PUBLISH, SCOPE_CONSUME)
WRITE = (SCOPE_PUBLISH,)
COLUMNS = "uuid, naam, documentatie_link, filters"


def parse_uuid(value: str) -> uuid.UUID:
    """The uuid in a path; anything that is not one names no resource (404)."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.not_found(f"{value!r} is not a uuid, so no resource has it") from None


def kanaal_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "naam": body.get("naam"),
        "documentatie_link": body.get("documentatieLink") or "",
        "filters": list(body.get("filters") or []),
    }


class KanaalMixin(ApiHandler):
    def representation(self, row: dict[str, Any]) -> dict[str, Any]:
        representation = {
            "url": f"{self.base_url()}/api/v1/kanaal/{row['uuid']}",
            "naam": row["naam"],
            "documentatieLink": row["documentatie_link"],
            "filters": list(row["filters"]),
        }
        # The schema makes documentatieLink an optional URI, and "" is no URI: a kanaal
        # registered without one is returned without the field.
        if not row["documentatie_link"]:
            del representation["documentatieLink"]
        return representation

    def check_body(self, partial: bool = False) -> dict[str, Any]:
        problems = validation.check("Kanaal", self.body, partial=partial)
        if problems:
            raise errors.validation_error(problems)
        assert isinstance(self.body, dict)
        _check_distinct_filters(self.body.get("filters") or [])
        return self.body


def _check_distinct_filters(names: list[str]) -> None:
    """Kenmerken are compared in canonical form, so two names that share one would be the
    same filter declared twice; the publisher most likely meant something else."""
    seen: dict[str, str] = {}
    for name in names:
        key = filters.canonical(name)
        if key in seen:
            raise errors.invalid(
                "filters", "unique",
                f"must be distinct in canonical form (lower case without _ and -), but "
                f"{seen[key]!r} and {name!r} are both {key!r}",
            )
        seen[key] = name


class KanaalListHandler(KanaalMixin):
    scopes = {"GET": READ, "POST": WRITE}
    query_parameters = frozenset({"naam"})

    async def get(self) -> None:
        naam = self.get_query_argument("naam", None)
        async with db.connection() as conn:
            if naam is None:
                cursor = await conn.execute(f"SELECT {COLUMNS} FROM kanaal ORDER BY id")
            else:
                cursor = await conn.execute(
                    f"SELECT {COLUMNS} FROM kanaal WHERE naam = %s ORDER BY id", (naam,)
                )
            rows = many(await cursor.fetchall())
        self.send_json([self.representation(row) for row in rows])

    async def post(self) -> None:
        fields = kanaal_fields(self.check_body())
        async with db.connection() as conn:
            cursor = await conn.execute(
                f"""
                INSERT INTO kanaal (uuid, naam, documentatie_link, filters)
                VALUES (%s, %s, %s, %s)
                ON CONFLICT (naam) DO NOTHING
                RETURNING {COLUMNS}
                """,
                (uuid.uuid4(), fields["naam"], fields["documentatie_link"], fields["filters"]),
            )
            row = one(await cursor.fetchone())
        if row is None:
            raise errors.invalid("naam", "unique", f"a kanaal named {fields['naam']!r} exists")
        log.info("kanaal_created", kanaal=row["naam"], uuid=str(row["uuid"]),
                 client_id=self.principal.client_id if self.principal else None)
        representation = self.representation(row)
        self.set_header("Location", representation["url"])
        self.send_json(representation, 201)


class KanaalDetailHandler(KanaalMixin):
    """One kanaal. ``PUT``/``PATCH`` are not in the 1.0 standard, but publishers use them
    (the incumbent supports them) to keep their kanaal's filters up to date; ``naam`` cannot
    change, and kanalen cannot be deleted."""

    scopes = {"GET": READ, "PUT": WRITE, "PATCH": WRITE}

    async def get(self, raw_uuid: str) -> None:
        async with db.connection() as conn:
            row = await self._fetch(conn, parse_uuid(raw_uuid))
        self.send_json(self.representation(row))

    @staticmethod
    async def _fetch(conn: Any, kanaal_uuid: uuid.UUID, lock: bool = False) -> Row:
        """The kanaal's row (locked for an update when asked), or a 404."""
        query = f"SELECT {COLUMNS} FROM kanaal WHERE uuid = %s" + (" FOR UPDATE" if lock else "")
        cursor = await conn.execute(query, (kanaal_uuid,))
        row = one(await cursor.fetchone())
        if row is None:
            raise errors.not_found()
        return row

    async def put(self, raw_uuid: str) -> None:
        await self._update(raw_uuid, partial=False)

    async def patch(self, raw_uuid: str) -> None:
        await self._update(raw_uuid, partial=True)

    async def _update(self, raw_uuid: str, partial: bool) -> None:
        kanaal_uuid = parse_uuid(raw_uuid)
        body = self.check_body(partial=partial)
        async with db.connection() as conn:
            current = await self._fetch(conn, kanaal_uuid, lock=True)
            if "naam" in body and body["naam"] != current["naam"]:
                raise errors.invalid(
                    "naam", "immutable", "the naam of a kanaal cannot be changed"
                )
            wanted = kanaal_fields(body)
            documentatie_link = (
                wanted["documentatie_link"] if "documentatieLink" in body or not partial
                else current["documentatie_link"]
            )
            kanaal_filters = (
                wanted["filters"] if "filters" in body or not partial else current["filters"]
            )
            cursor = await conn.execute(
                f"""
                UPDATE kanaal SET documentatie_link = %s, filters = %s WHERE uuid = %s
                RETURNING {COLUMNS}
                """,
                (documentatie_link, kanaal_filters, kanaal_uuid),
            )
            row = one(await cursor.fetchone())
        assert row is not None
        log.info("kanaal_updated", kanaal=row["naam"], uuid=str(row["uuid"]))
        self.send_json(self.representation(row))

