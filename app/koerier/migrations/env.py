"""Alembic's run-time environment: connect with psycopg 3 and apply the versions online."""

from __future__ import annotations

import psycopg
from alembic import context
from sqlalchemy import create_engine, pool

conninfo = context.config.attributes["conninfo"]
engine = create_engine(
    "postgresql+psycopg://",
    creator=lambda: psycopg.connect(conninfo),
    poolclass=pool.NullPool,
)

with engine.connect() as connection:
    # Several processes may migrate at once (replicas starting together): a lock makes
    # the second wait and then find nothing to do.
    connection.exec_driver_sql("SELECT pg_advisory_lock(742001)")
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.exec_driver_sql("SELECT pg_advisory_unlock(742001)")
    connection.commit()
