"""A throwaway local Koerier for a perf run: PostgreSQL, RabbitMQ, API and workers.

The servers come from ``tests/harness.py`` (free loopback ports, temporary directories);
Koerier itself is started with its own commands (``koerier migrate``, ``client add``,
``serve``, ``worker``), exactly as an operator would, so the run measures what ships.
Every process is started in its own session so it can be stopped with its children.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from tests.harness import PostgresServer, RabbitServer, free_port, wait_for_port


@dataclass
class StackOptions:
    api_processes: int = 1
    worker_processes: int = 1
    worker_concurrency: int = 64
    log_level: str = "info"  # what operators run; access lines are part of the cost
    extra_env: dict[str, str] = field(default_factory=dict)


def koerier_command() -> list[str]:
    """The ``koerier`` entry point of the interpreter that runs the harness."""
    beside = Path(sys.executable).parent / "koerier"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("koerier")
    if found is None:
        raise RuntimeError("the koerier command is not installed (run make test or make run)")
    return [found]


def read_statements(conninfo: str, limit: int = 15) -> list[dict[str, Any]]:
    """The statements PostgreSQL spent most time executing during the run, with the
    number of calls and rows (from pg_stat_statements)."""
    with psycopg.connect(conninfo, row_factory=dict_row) as conn:
        return conn.execute(
            """
            SELECT calls, rows, total_exec_time AS total_ms,
                   total_exec_time / greatest(calls, 1) AS mean_ms,
                   regexp_replace(query, '\\s+', ' ', 'g') AS query
            FROM pg_stat_statements
            WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND query !~* '^\\s*(--|CREATE|ALTER|INSERT INTO alembic|SELECT pg_advisory)'
            ORDER BY total_exec_time DESC LIMIT %s
            """,
            (limit,),
        ).fetchall()


def write_statements(rows: list[dict[str, Any]], path: Path, notifications: int) -> None:
    """``statements.md``: where PostgreSQL's time went, per statement."""
    lines = [
        "# PostgreSQL statements",
        "",
        "The statements the database spent most execution time on during the whole run",
        "(pg_stat_statements; planning time not included). Per notification: total time",
        f"divided by the {notifications} accepted notifications.",
        "",
        "| calls | rows | total ms | mean ms | ms per notification | statement |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        query = row["query"].strip().replace("|", "\\|")
        if len(query) > 160:
            query = query[:157] + "..."
        per = row["total_ms"] / notifications if notifications else 0.0
        lines.append(f"| {row['calls']} | {row['rows']} | {row['total_ms']:.1f} | "
                     f"{row['mean_ms']:.3f} | {per:.3f} | `{query}` |")
    path.write_text("\n".join(lines) + "\n")


class LocalStack:
    """Starts and stops the whole local Koerier; ``components()`` names its root processes."""

    def __init__(self, options: StackOptions, logs: Path, client_id: str, secret: str):
        self.options = options
        self.logs = logs
        self.client_id = client_id
        self.secret = secret
        # pg_stat_statements: statements.md of a result tells what the database spent on
        # which statement, where the sampler can only tell how much it spent.
        self.pg = PostgresServer(settings={"shared_preload_libraries": "pg_stat_statements"})
        self.rabbit = RabbitServer()
        self.port = free_port()
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.statements: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "KOERIER_ENVIRONMENT": "development",
            "KOERIER_ENV_FILE": os.devnull,
            "KOERIER_LOG_FORMAT": "json",
            "KOERIER_LOG_LEVEL": self.options.log_level,
            "KOERIER_SECRET_KEY": "perf-secret-key",
            **self.pg.env(), **self.rabbit.env(), **self.options.extra_env,
        })
        return env

    def start(self, say: Callable[[str], None] = print) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        say("starting PostgreSQL and RabbitMQ")
        self.pg.start()
        self.rabbit.start()

        say("migrating and registering the perf client")
        self._run("migrate")
        with psycopg.connect(self.pg.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self._run("client", "add", self.client_id, "--secret", self.secret, "--all")

        say(f"starting koerier serve ({self.options.api_processes} processes) and "
            f"koerier worker ({self.options.worker_processes} x "
            f"{self.options.worker_concurrency})")
        self.api = self._spawn(
            "api", "serve", "--address", "127.0.0.1", "--port", str(self.port),
            "--processes", str(self.options.api_processes),
        )
        self.worker = self._spawn(
            "worker", "worker", "--processes", str(self.options.worker_processes),
            "--concurrency", str(self.options.worker_concurrency),
        )
        wait_for_port(self.port, timeout=60)
        self._wait_ready()

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*koerier_command(), *args], env=self.env(), capture_output=True, text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"koerier {' '.join(args[:2])} failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        return subprocess.Popen(
            [*koerier_command(), *args], env=self.env(), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Every API replica must answer before the load starts, not only the first one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in (self.api, self.worker):
                if process is not None and process.poll() is not None:
                    raise RuntimeError(
                        f"a koerier process exited with {process.returncode}; see {self.logs}"
                    )
            try:
                with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"the API did not answer /metrics within {timeout} s")

    def components(self) -> dict[str, int]:
        """Root process id per component; the sampler adds their descendants."""
        roots = {}
        for name, process in (("api", self.api), ("worker", self.worker),
                              ("postgresql", self.pg.process), ("rabbitmq", self.rabbit.process)):
            if process is not None:
                roots[name] = process.pid
        return roots

    def stop(self) -> None:
        for process in (self.api, self.worker):
            if process is None or process.poll() is not None:
                continue
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        self.rabbit.destroy()
        try:
            self.statements = read_statements(self.pg.conninfo())
        except psycopg.Error as exc:
            print(f"  (no statement statistics: {exc})")
        self.pg.destroy()
