"""API clients: who may call Koerier, with which secret and scopes.

A client is a ``client_id`` with an HS256 secret and a set of scopes (or all of them), kept
in the ``api_client`` table. Verifying a ZGW JWT needs the shared secret itself, so it cannot
be hashed: it is sealed with the secret key instead (see ``sealing``).

The API reads clients through :class:`ClientCache`, which keeps each answer (also "no such
client") for ``KOERIER_CLIENT_CACHE_SECONDS``, so removing a client or changing its scopes
takes effect in every process within that time without a database query per request.
The CLI manages clients with plain synchronous connections.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import psycopg

from koerier import db, logs, sealing

log = logs.get(__name__)

SCOPE_PUBLISH = "notificaties.publiceren"
SCOPE_CONSUME = "notificaties.consumeren"
KNOWN_SCOPES = (SCOPE_PUBLISH, SCOPE_CONSUME)


@dataclass(frozen=True)
class ApiClient:
    client_id: str
    secret: str
    scopes: frozenset[str]
    all_scopes: bool

    def has_scope(self, scope: str) -> bool:
        return self.all_scopes or scope in self.scopes


def generate_secret() -> str:
    """A strong random secret: 256 bits, URL-safe, easy to paste into a client's config."""
    return secrets.token_urlsafe(32)


class ClientCache:
    """Clients by id, read from PostgreSQL and kept for a few seconds."""

    def __init__(self, ttl_seconds: float):
        self.ttl_seconds = ttl_seconds
        self._entries: dict[str, tuple[float, ApiClient | None]] = {}

    async def get(self, client_id: str) -> ApiClient | None:
        now = time.monotonic()
        entry = self._entries.get(client_id)
        if entry is not None and entry[0] > now:
            return entry[1]
        client = await self._load(client_id)
        # Unknown ids are cached too, but the table cannot grow without bound: a caller who
        # tries many ids only ever evicts the oldest entries.
        if len(self._entries) >= 10_000:
            self._entries.clear()
        self._entries[client_id] = (now + self.ttl_seconds, client)
        return client

    def expires_at(self, client_id: str) -> float:
        """When the cached answer for ``client_id`` must be read again (monotonic clock)."""
        entry = self._entries.get(client_id)
        return entry[0] if entry is not None else 0.0

    async def _load(self, client_id: str) -> ApiClient | None:
        async with db.connection() as conn:
            cursor = await conn.execute(
                "SELECT client_id, secret, scopes, all_scopes FROM api_client"
                " WHERE client_id = %s",
                (client_id,),
            )
            row = await cursor.fetchone()
        if not row:
            return None
        try:
            return _client_from_row(row)  # type: ignore[arg-type]
        except sealing.UnsealError as exc:
            # The secret key changed without the old one in KOERIER_SECRET_KEY_PREVIOUS: the
            # client cannot be verified, which is an operator's problem, not the caller's.
            log.error("client_secret_unreadable", client_id=client_id, reason=str(exc))
            return None


def _client_from_row(row: dict[str, object]) -> ApiClient:
    scopes = row["scopes"] or []
    assert isinstance(scopes, list)
    return ApiClient(
        client_id=str(row["client_id"]),
        secret=sealing.unseal(str(row["secret"])),
        scopes=frozenset(str(scope) for scope in scopes),
        all_scopes=bool(row["all_scopes"]),
    )


# Synchronous management, for the CLI.


def add(
    conninfo: str, client_id: str, secret: str, scopes: list[str], all_scopes: bool,
    replace: bool = False,
) -> bool | None:
    """Create the client; True when it was new. An existing client keeps its secret and
    scopes (None) unless ``replace``, which overwrites them (False)."""
    conflict = (
        """DO UPDATE SET secret = EXCLUDED.secret, scopes = EXCLUDED.scopes,
                all_scopes = EXCLUDED.all_scopes, updated_at = now()"""
        if replace else "DO NOTHING"
    )
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            f"""
            INSERT INTO api_client (client_id, secret, scopes, all_scopes)
            VALUES (%s, %s, %s, %s)
            ON CONFLICT (client_id) {conflict}
            RETURNING (xmax = 0) AS inserted
            """,
            (client_id, sealing.seal(secret), sorted(set(scopes)), all_scopes),
        ).fetchone()
    if row is None:
        return None
    return bool(row[0])


def get(conninfo: str, client_id: str) -> ApiClient | None:
    with psycopg.connect(conninfo, row_factory=psycopg.rows.dict_row) as conn:
        row = conn.execute(
            "SELECT client_id, secret, scopes, all_scopes FROM api_client WHERE client_id = %s",
            (client_id,),
        ).fetchone()
    return _client_from_row(row) if row else None


def list_all(conninfo: str) -> list[ApiClient]:
    """Every client, without its secret: listing must work even when a secret cannot be
    unsealed (a changed KOERIER_SECRET_KEY), which ``koerier check`` reports instead."""
    with psycopg.connect(conninfo, row_factory=psycopg.rows.dict_row) as conn:
        rows = conn.execute(
            "SELECT client_id, '' AS secret, scopes, all_scopes FROM api_client"
            " ORDER BY client_id"
        ).fetchall()
    return [_client_from_row(row) for row in rows]


def remove(conninfo: str, client_id: str) -> bool:
    """Delete the client; True when it existed."""
    with psycopg.connect(conninfo) as conn:
        cursor = conn.execute("DELETE FROM api_client WHERE client_id = %s", (client_id,))
        return cursor.rowcount > 0
