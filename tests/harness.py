"""Throwaway PostgreSQL and RabbitMQ servers for the tests and the perf harness.

Each server runs from Debian's binaries in its own temporary directory, on free loopback
ports, so tests never touch the machine's system services. The servers can be stopped and
started again on the same data, which the fault tests use.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ROOT = Path(__file__).resolve().parent.parent
# The spec Koerier serves, and the official file it must equal (beside the checkout in CI).
SHIPPED_SPEC = ROOT / "app" / "koerier" / "spec" / "openapi.yaml"
OFFICIAL_SPEC = ROOT.parent / "shared" / "spec" / "openapi.yaml"
# The koerier command of the venv running the tests, wherever the checkout is.
KOERIER = Path(sys.executable).parent / "koerier"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768 and up).

    Ports handed out by ``bind(0)`` come from the ephemeral range, where any outgoing
    connection of a busy test run may take them between this check and the server's
    bind; RabbitMQ failed to start on exactly that race.
    """
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def _stop_group(process: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def run_koerier(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run one ``koerier`` command with these variables on top of this process's environment."""
    return subprocess.run(
        [str(KOERIER), *args], env={**os.environ, **env},
        capture_output=True, text=True, timeout=timeout,
    )


class PostgresServer:
    """A PostgreSQL 15 cluster in a temporary directory, run as the ``postgres`` user."""

    user = "koerier"
    password = "koerier-test"
    database = "koerier"

    def __init__(self, root: Path | None = None, settings: dict[str, str] | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="koerier-pg-"))
        self.data = self.root / "data"
        # More postgresql.conf lines, e.g. the perf harness's pg_stat_statements.
        self.settings = settings or {}
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0

    def _run_as(self) -> dict[str, object]:
        if not self._as_postgres:
            return {}
        entry = pwd.getpwnam("postgres")
        return {"user": entry.pw_uid, "group": entry.pw_gid}

    def init(self) -> None:
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self._as_postgres:
            shutil.chown(pwfile, "postgres", "postgres")
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", self.user, "-A", "md5",
             "--pwfile", str(pwfile), "-E", "UTF8", "--locale", "C.UTF-8"],
            check=True, capture_output=True, **self._run_as(),  # type: ignore[arg-type]
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            # Durability off: these clusters are thrown away, and tests want speed.
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 300\nshared_buffers = 128MB\n"
            )
            conf.writelines(f"{name} = '{value}'\n" for name, value in self.settings.items())

    def start(self) -> None:
        fresh = not self.data.exists()
        if fresh:
            self.init()
        self.process = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(self.data)],
            stdout=open(self.root / "postgres.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True, **self._run_as(),  # type: ignore[arg-type]
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                if fresh:
                    self.create_database(self.database)
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        log = (self.root / "postgres.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"PostgreSQL did not start:\n{log}")

    def stop(self, fast: bool = True) -> None:
        # SIGINT is PostgreSQL's "fast shutdown": open connections are cut, as in a restart.
        _stop_group(self.process, signal.SIGINT if fast else signal.SIGTERM, 30)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def conninfo(self, database: str | None = None) -> str:
        return (
            f"host=127.0.0.1 port={self.port} dbname={database or self.database} "
            f"user={self.user} password={self.password}"
        )

    def env(self, database: str | None = None) -> dict[str, str]:
        """The KOERIER_DB_* variables that point Koerier at this server."""
        return {
            "KOERIER_DB_HOST": "127.0.0.1",
            "KOERIER_DB_PORT": str(self.port),
            "KOERIER_DB_NAME": database or self.database,
            "KOERIER_DB_USER": self.user,
            "KOERIER_DB_PASSWORD": self.password,
        }

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class RabbitServer:
    """A RabbitMQ node in a temporary directory with its own node name and ports."""

    user = "koerier"
    password = "koerier-test"
    vhost = "koerier"

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="koerier-rabbit-"))
        self.process: subprocess.Popen[bytes] | None = None
        self._started = False
        self._choose_ports()

    def _choose_ports(self) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"koerier-test-{self.port}@localhost"
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"default_vhost = {self.vhost}\n"
            f"default_user = {self.user}\n"
            f"default_pass = {self.password}\n"
            "default_permissions.configure = .*\n"
            "default_permissions.read = .*\n"
            "default_permissions.write = .*\n"
            "loopback_users = none\n"
            "disk_free_limit.absolute = 50MB\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        (self.root / "enabled_plugins").write_text("[].\n")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.root),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.root / "rabbit.pid"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.root / "advanced.config"),
        )
        return env

    def start(self, timeout: float = 90.0) -> None:
        """Start the node; a first start that fails is tried on other ports (twice more)."""
        for attempt in range(3):
            try:
                self._start_once(timeout)
            except RuntimeError:
                # A restart must keep its ports (clients and queued messages rely on them).
                if self._started or attempt == 2:
                    raise
                self.kill()
                self._choose_ports()
                continue
            self._started = True
            return

    def _start_once(self, timeout: float) -> None:
        self.process = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")], env=self._env(),
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._accepts_amqp():
                return
            time.sleep(0.25)
        log = (self.root / "server.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"RabbitMQ did not start within {timeout} s:\n{log}")

    def _accepts_amqp(self) -> bool:
        import pika

        try:
            connection = pika.BlockingConnection(self.parameters(attempts=1))
        except Exception:
            return False
        connection.close()
        return True

    def parameters(self, attempts: int = 3):  # type: ignore[no-untyped-def]
        import pika

        return pika.ConnectionParameters(
            host="127.0.0.1", port=self.port, virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.user, self.password),
            connection_attempts=attempts, retry_delay=0.5, socket_timeout=2,
        )

    def stop(self) -> None:
        _stop_group(self.process, signal.SIGTERM, 60)
        self.process = None

    def kill(self) -> None:
        _stop_group(self.process, signal.SIGKILL, 10)
        self.process = None

    def env(self) -> dict[str, str]:
        """The KOERIER_BROKER_* variables that point Koerier at this node."""
        return {
            "KOERIER_BROKER_HOST": "127.0.0.1",
            "KOERIER_BROKER_PORT": str(self.port),
            "KOERIER_BROKER_VHOST": self.vhost,
            "KOERIER_BROKER_USER": self.user,
            "KOERIER_BROKER_PASSWORD": self.password,
        }

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
