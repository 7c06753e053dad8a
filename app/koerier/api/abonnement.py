"""``/abonnement``: subscriptions of a callback to kanalen, with optional filters.

``auth`` is write-only: it is stored for delivery and never returned. Only the client that
created an abonnement may change or delete it. When ``callbackUrl`` or ``auth`` is new, the
callback is probed first (see :mod:`koerier.probe`); the abonnement is stored only when the
probe passes.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from koerier import db, filters, logs, probe, sealing
from koerier.api import errors, validation
from koerier.api.base import ApiHandler, many, one
from koerier.api.errors import InvalidParam
from koerier.api.kanaal import parse_uuid
from koerier.clients import SCOPE_CONSUME, SCOPE_PUBLISH

log = logs.get("koerier.api.abonnement")

READ = (SCOPE_CONSUME, SCOPE_PUBLISH)
WRITE = (SCOPE_CONSUME,)
COLUMNS = "id, uuid, callback_url, auth, client_id, kanalen"


def normalised_kanalen(kanalen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The kanalen as stored and returned: every group with its ``filters`` mapping."""
    return [{"naam": group["naam"], "filters": dict(group.get("filters") or {})}
            for group in kanalen]


class AbonnementMixin(ApiHandler):
    def representation(self, row: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": f"{self.base_url()}/api/v1/abonnement/{row['uuid']}",
            "callbackUrl": row["callback_url"],
            "kanalen": row["kanalen"],
        }

    def check_body(self, partial: bool) -> dict[str, Any]:
        problems = validation.check("Abonnement", self.body, partial=partial)
        if isinstance(self.body, dict):
            problems.extend(self._check_limits(self.body))
        if problems:
            raise errors.validation_error(problems)
        assert isinstance(self.body, dict)
        return self.body

    def _check_limits(self, body: dict[str, Any]) -> list[InvalidParam]:
        # The 1.0.1 standard dropped the maximum lengths; these bounds only keep absurd
        # input out, and are settings so that an operator can raise them.
        settings = self.context.settings
        problems = []
        callback_url = body.get("callbackUrl")
        if isinstance(callback_url, str) and callback_url:
            if len(callback_url) > settings.max_callback_url_length:
                problems.append(InvalidParam(
                    "callbackUrl", "max_length",
                    f"must be at most {settings.max_callback_url_length} characters, "
                    f"but has {len(callback_url)}",
                ))
            elif not callback_url.lower().startswith(("http://", "https://")):
                problems.append(InvalidParam(
                    "callbackUrl", "invalid", "must be an http:// or https:// URL"
                ))
        auth = body.get("auth")
        if isinstance(auth, str) and len(auth) > settings.max_auth_length:
            problems.append(InvalidParam(
                "auth", "max_length",
                f"must be at most {settings.max_auth_length} characters, but has {len(auth)}",
            ))
        return problems

    async def check_kanalen(
        self, conn: psycopg.AsyncConnection[Any], kanalen: list[dict[str, Any]]
    ) -> None:
        """Every kanaal must exist, and every filter group must fit its kanaal's filters."""
        names = sorted({group["naam"] for group in kanalen})
        cursor = await conn.execute(
            "SELECT naam, filters FROM kanaal WHERE naam = ANY(%s)", (names,)
        )
        declared = {row["naam"]: row["filters"] for row in many(await cursor.fetchall())}
        problems = []
        for index, group in enumerate(kanalen):
            naam = group["naam"]
            if naam not in declared:
                problems.append(InvalidParam(
                    f"kanalen.{index}.naam", "kanaal_naam", f"kanaal {naam!r} does not exist"
                ))
                continue
            keys = (group.get("filters") or {}).keys()
            if not filters.consistent(keys, declared[naam]):
                problems.append(InvalidParam(
                    f"kanalen.{index}.filters",
                    "inconsistent-abonnement-filters",
                    f"the filter keys must be a subset or superset of the kanaal's filters "
                    f"{sorted(declared[naam])}, but got {sorted(keys)}",
                ))
        if problems:
            raise errors.validation_error(problems)

    async def run_probe(self, callback_url: str, auth: str, field: str = "callbackUrl") -> None:
        """Probe the callback; a failure is an invalidParam on ``field``, the value the
        client changed."""
        settings = self.context.settings
        if not settings.probe_enabled:
            return
        try:
            await probe.probe(
                callback_url,
                auth,
                timeout_seconds=settings.probe_timeout_seconds,
                unauthenticated_hosts=settings.probe_unauthenticated_hosts,
            )
        except probe.ProbeFailed as exc:
            log.info("probe_failed", code=exc.code, reason=exc.reason)
            raise errors.invalid(field, exc.code, exc.reason) from None

    async def save_filters(
        self, conn: psycopg.AsyncConnection[Any], abonnement_id: int,
        kanalen: list[dict[str, Any]],
    ) -> None:
        await conn.execute(
            "DELETE FROM abonnement_filter WHERE abonnement_id = %s", (abonnement_id,)
        )
        rows = [
            (abonnement_id, group["naam"],
             Jsonb(filters.canonical_filters(group.get("filters") or {})))
            for group in kanalen
        ]
        if rows:
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO abonnement_filter (abonnement_id, kanaal_naam, filters)"
                    " VALUES (%s, %s, %s)",
                    rows,
                )

    def owned(self, row: dict[str, Any]) -> bool:
        return self.principal is not None and row["client_id"] == self.principal.client_id

    def visible(self, row: dict[str, Any]) -> bool:
        return self.context.settings.abonnement_read_all or self.owned(row)


class AbonnementListHandler(AbonnementMixin):
    scopes = {"GET": READ, "POST": WRITE}

    async def get(self) -> None:
        assert self.principal is not None
        async with db.connection() as conn:
            if self.context.settings.abonnement_read_all:
                cursor = await conn.execute(f"SELECT {COLUMNS} FROM abonnement ORDER BY id")
            else:
                cursor = await conn.execute(
                    f"SELECT {COLUMNS} FROM abonnement WHERE client_id = %s ORDER BY id",
                    (self.principal.client_id,),
                )
            rows = many(await cursor.fetchall())
        self.send_json([self.representation(row) for row in rows])

    async def post(self) -> None:
        assert self.principal is not None
        body = self.check_body(partial=False)
        kanalen = normalised_kanalen(body["kanalen"])
        async with db.connection() as conn:
            await self.check_kanalen(conn, kanalen)
        await self.run_probe(body["callbackUrl"], body["auth"])

        async with db.connection() as conn:
            # The kanalen are checked again in the transaction that stores the abonnement,
            # because the probe may have taken seconds.
            await self.check_kanalen(conn, kanalen)
            cursor = await conn.execute(
                f"""
                INSERT INTO abonnement (uuid, callback_url, auth, client_id, kanalen)
                VALUES (%s, %s, %s, %s, %s) RETURNING {COLUMNS}
                """,
                (uuid.uuid4(), body["callbackUrl"], sealing.seal(body["auth"]),
                 self.principal.client_id,
                 Jsonb(kanalen)),
            )
            row = one(await cursor.fetchone())
            assert row is not None
            await self.save_filters(conn, row["id"], kanalen)
        log.info("abonnement_created", abonnement=str(row["uuid"]),
                 client_id=self.principal.client_id, kanalen=[g["naam"] for g in kanalen])
        representation = self.representation(row)
        self.set_header("Location", representation["url"])
        self.send_json(representation, 201)


class AbonnementDetailHandler(AbonnementMixin):
    scopes = {"GET": READ, "PUT": WRITE, "PATCH": WRITE, "DELETE": WRITE}

    async def _fetch(self, conn: psycopg.AsyncConnection[Any], raw_uuid: str,
                     lock: bool = False) -> dict[str, Any]:
        abonnement_uuid = parse_uuid(raw_uuid)
        cursor = await conn.execute(
            f"SELECT {COLUMNS} FROM abonnement WHERE uuid = %s"
            + (" FOR UPDATE" if lock else ""),
            (abonnement_uuid,),
        )
        row = one(await cursor.fetchone())
        if row is None or not self.visible(row):
            raise errors.not_found()
        return row

    def _require_owner(self, row: dict[str, Any]) -> None:
        if not self.owned(row):
            raise errors.forbidden(
                "permission_denied",
                "only the client that created this abonnement may change or delete it",
            )

    async def get(self, raw_uuid: str) -> None:
        async with db.connection() as conn:
            row = await self._fetch(conn, raw_uuid)
        self.send_json(self.representation(row))

    async def put(self, raw_uuid: str) -> None:
        await self._update(raw_uuid, partial=False)

    async def patch(self, raw_uuid: str) -> None:
        await self._update(raw_uuid, partial=True)

    async def delete(self, raw_uuid: str) -> None:
        async with db.connection() as conn:
            row = await self._fetch(conn, raw_uuid, lock=True)
            self._require_owner(row)
            await conn.execute("DELETE FROM abonnement WHERE id = %s", (row["id"],))
        log.info("abonnement_deleted", abonnement=str(row["uuid"]),
                 client_id=row["client_id"])
        self.set_status(204)
        self.finish()

    async def _update(self, raw_uuid: str, partial: bool) -> None:
        body = self.check_body(partial=partial)
        async with db.connection() as conn:
            current = await self._fetch(conn, raw_uuid)
            self._require_owner(current)
            callback_url = body.get("callbackUrl", current["callback_url"])
            current_auth = sealing.unseal(current["auth"])
            auth = body.get("auth", current_auth)
            kanalen = (
                normalised_kanalen(body["kanalen"]) if "kanalen" in body
                else current["kanalen"]
            )
            await self.check_kanalen(conn, kanalen)

        # A changed callback or auth is probed with the auth it will be used with: a PATCH
        # that only moves the callback probes with the stored auth.
        if callback_url != current["callback_url"]:
            await self.run_probe(callback_url, auth)
        elif auth != current_auth:
            await self.run_probe(callback_url, auth, field="auth")

        async with db.connection() as conn:
            locked = await self._fetch(conn, raw_uuid, lock=True)
            self._require_owner(locked)
            await self.check_kanalen(conn, kanalen)
            cursor = await conn.execute(
                f"""
                UPDATE abonnement SET callback_url = %s, auth = %s, kanalen = %s,
                    updated_at = now()
                WHERE id = %s RETURNING {COLUMNS}
                """,
                (callback_url, sealing.seal(auth), Jsonb(kanalen), locked["id"]),
            )
            row = one(await cursor.fetchone())
            assert row is not None
            await self.save_filters(conn, row["id"], kanalen)
        log.info("abonnement_updated", abonnement=str(row["uuid"]),
                 client_id=row["client_id"], probed=callback_url != current["callback_url"]
                 or auth != current_auth)
        self.send_json(self.representation(row))
