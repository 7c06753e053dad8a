"""The schema migrations: applied by ``koerier migrate``, safe to run again."""

from __future__ import annotations

import os

import psycopg

from tests.conftest import koerier_env
from tests.harness import PostgresServer, run_koerier


def test_migrate_twice_creates_the_schema_and_then_changes_nothing(pg_server: PostgresServer):
    pg_server.create_database("migrate_twice")
    env = koerier_env(pg_server) | {"KOERIER_DB_NAME": "migrate_twice"}

    first = run_koerier(env, "migrate")
    second = run_koerier(env, "migrate")

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert "version 0004" in second.stdout
    with psycopg.connect(pg_server.conninfo("migrate_twice")) as conn:
        tables = {row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"kanaal", "abonnement", "notification", "delivery", "delivery_attempt"} <= tables


def test_migrate_with_unreachable_database_says_why(pg_server: PostgresServer):
    env = koerier_env(pg_server) | {"KOERIER_DB_PORT": "1"}

    result = run_koerier(env, "migrate")

    assert result.returncode == 1
    assert "migration failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_production_mode_without_secrets_lists_each_missing_one(pg_server: PostgresServer):
    env = {"KOERIER_ENV_FILE": os.devnull, "KOERIER_ENVIRONMENT": "production",
           "KOERIER_DB_PASSWORD": "", "KOERIER_BROKER_PASSWORD": "", "KOERIER_SECRET_KEY": ""}

    result = run_koerier(env, "migrate")

    assert result.returncode == 2
    assert "KOERIER_DB_PASSWORD" in result.stderr
    assert "KOERIER_BROKER_PASSWORD" in result.stderr
    assert "KOERIER_SECRET_KEY" in result.stderr
