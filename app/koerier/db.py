"""PostgreSQL access: one psycopg 3 async connection pool per process.

Every query goes through :func:`connection`; when the database cannot be reached it raises
:class:`DatabaseUnavailable`, which the API turns into a 503 and the workers into a pause.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from koerier.config import Settings


class DatabaseUnavailable(Exception):
    """PostgreSQL did not answer (down, restarting, or the pool is exhausted)."""


_pool: AsyncConnectionPool | None = None

# A connection that was given back this recently answered then; checking it again before
# handing it out would cost a round trip per request under load.
RECENTLY_USED_SECONDS = 1.0
_returned_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
    weakref.WeakKeyDictionary())


async def _note_returned(conn: psycopg.AsyncConnection[Any]) -> None:
    _returned_at[conn] = time.monotonic()


async def _check_unless_recent(conn: psycopg.AsyncConnection[Any]) -> None:
    returned = _returned_at.get(conn)
    if returned is not None and time.monotonic() - returned < RECENTLY_USED_SECONDS:
        return
    await AsyncConnectionPool.check_connection(conn)


async def open_pool(
    settings: Settings,
    *,
    max_size: int | None = None,
    autocommit: bool = False,
    check: bool = True,
) -> AsyncConnectionPool:
    """Create the process pool; it connects lazily, so a database that is down is no error.

    With ``autocommit`` (the delivery workers) every statement is its own transaction, which
    saves the BEGIN and COMMIT round trips; blocks that need more use ``conn.transaction()``.
    Without ``check`` a connection is not tested before it is handed out (one round trip
    less); the caller must then retry on :class:`DatabaseUnavailable`, as the workers do.
    """
    global _pool
    if _pool is not None:
        return _pool
    pool = AsyncConnectionPool(
        settings.database_conninfo,
        min_size=settings.db_pool_min,
        max_size=max_size or settings.db_pool_max,
        kwargs={"row_factory": dict_row, "autocommit": autocommit},
        timeout=settings.db_connect_timeout_seconds,
        # A connection that broke while idle (database restart) is found and replaced
        # before it is handed out, so the first request after a restart does not fail.
        # One given back within the last second is not checked (see above): a restart in
        # that second fails what gets such a connection with a 503, which in the API can
        # be a whole intake batch (KOERIER_INTAKE_BATCH_MAX publishes); nothing is stored.
        check=_check_unless_recent if check else None,
        reset=_note_returned if check else None,
        reconnect_timeout=0,
        open=False,
        name="koerier",
    )
    await pool.open(wait=False)
    _pool = pool
    return pool


async def close_pool() -> None:
    global _pool
    if _pool is not None:
        await _pool.close()
        _pool = None


def pool() -> AsyncConnectionPool:
    if _pool is None:
        raise RuntimeError("the database pool is not open; call open_pool() first")
    return _pool


@asynccontextmanager
async def connection() -> AsyncIterator[psycopg.AsyncConnection]:
    """A pooled connection inside a transaction, committed when the block ends cleanly."""
    try:
        async with pool().connection() as conn:
            yield conn
    except PoolTimeout as exc:
        raise DatabaseUnavailable("no database connection within the timeout") from exc
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(str(exc).strip().splitlines()[0]) from exc
