"""Shared fixtures: one throwaway PostgreSQL and RabbitMQ for the whole test session.

Tests that break a server (restart PostgreSQL, stop RabbitMQ) start their own instead, so
the shared ones stay healthy for everybody else.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest

from tests.harness import PostgresServer, RabbitServer

# Tables a test may fill; emptied by ``clean_db`` so tests do not see each other's rows.
TABLES = (
    "delivery_attempt", "delivery", "notification", "abonnement_filter", "abonnement",
    "kanaal", "api_client", "circuit",
)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def rabbit_server() -> Iterator[RabbitServer]:
    server = RabbitServer()
    server.start()
    yield server
    server.destroy()


def koerier_env(pg: PostgresServer, rabbit: RabbitServer | None = None) -> dict[str, str]:
    """Environment variables that point a Koerier process at the given servers."""
    env = {
        "KOERIER_ENVIRONMENT": "development",
        "KOERIER_ENV_FILE": os.devnull,
        "KOERIER_LOG_FORMAT": "json",
        "KOERIER_LOG_LEVEL": "info",
        "KOERIER_SECRET_KEY": "test-secret-key",
        **pg.env(),
    }
    if rabbit is not None:
        env.update(rabbit.env())
    return env


@pytest.fixture(scope="session")
def base_env(pg_server: PostgresServer, rabbit_server: RabbitServer) -> Iterator[dict[str, str]]:
    """Point this test process at the session's servers and migrate the database once."""
    env = koerier_env(pg_server, rabbit_server)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)

    from koerier import migrations
    from koerier.config import load_settings

    migrations.upgrade(load_settings())
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def db(base_env: dict[str, str], pg_server: PostgresServer) -> Iterator[psycopg.Connection]:
    """A plain connection to the test database, for arranging and checking rows."""
    with psycopg.connect(pg_server.conninfo(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def clean_db(db: psycopg.Connection) -> psycopg.Connection:
    db.execute("TRUNCATE " + ", ".join(TABLES) + " RESTART IDENTITY CASCADE")
    return db


# The API under test: a real ``koerier serve`` process and loopback subscribers.

PROBE_TIMEOUT_SECONDS = 1.0
CLIENT_CACHE_SECONDS = 1.0


@pytest.fixture(scope="session")
def subscriber():
    from tests.apiharness import start_subscriber

    found, server = start_subscriber()
    yield found
    server.shutdown()


@pytest.fixture(scope="session")
def api_server(base_env, tmp_path_factory):
    """``koerier serve`` on a free port for the whole session, probing with a short timeout."""
    from tests.apiharness import ApiServer

    env = base_env | {
        "KOERIER_PROBE_TIMEOUT_SECONDS": str(PROBE_TIMEOUT_SECONDS),
        "KOERIER_CLIENT_CACHE_SECONDS": str(CLIENT_CACHE_SECONDS),
        "KOERIER_MAX_BODY_BYTES": "65536",
    }
    server = ApiServer(env, tmp_path_factory.mktemp("api") / "koerier.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api(api_server, clean_db):
    """requests against the live server, with the standard test clients in the database."""
    from tests.apiharness import Api, insert_clients

    insert_clients(clean_db)
    return Api(api_server.url)
