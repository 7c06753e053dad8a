"""A live ``koerier serve`` process, API clients with tokens, and subscriber servers.

The API tests talk HTTP to a real Koerier process on a free loopback port, backed by the
session's throwaway PostgreSQL. Subscribers are real HTTP servers on loopback threads whose
behaviour is chosen by the path of the callback URL.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

from koerier.auth import make_token
from tests.harness import KOERIER, free_port, wait_for_port

# Client ids with fixed secrets and scopes, the same in every test, so the server's
# short-lived client cache can never hold a stale version of one of them.
CLIENTS: dict[str, tuple[list[str], bool]] = {
    "publisher": (["notificaties.publiceren"], False),
    "consumer": (["notificaties.consumeren"], False),
    "other-consumer": (["notificaties.consumeren"], False),
    "admin": ([], True),
    "no-scopes": ([], False),
}


def secret_of(client_id: str) -> str:
    return f"secret-of-{client_id}-0123456789abcdef0123456789"


def insert_clients(conn: psycopg.Connection) -> None:
    for client_id, (scopes, all_scopes) in CLIENTS.items():
        conn.execute(
            "INSERT INTO api_client (client_id, secret, scopes, all_scopes)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (client_id) DO NOTHING",
            (client_id, secret_of(client_id), scopes, all_scopes),
        )


def bearer(client_id: str, issued_at: int | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(client_id, secret_of(client_id), issued_at)}"}


class ApiServer:
    """``koerier serve`` in its own process group, logging JSON lines to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, processes: int = 1):
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.processes = processes
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(KOERIER), "serve", "--port", str(self.port),
             "--processes", str(self.processes)],
            env={**os.environ, **self.env},
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def wait_for_events(self, timeout: float = 5.0, **fields: Any) -> list[dict[str, Any]]:
        """The logged events with these field values; waits for the first to be written,
        because a line may land just after the response that it records."""
        deadline = time.monotonic() + timeout
        while True:
            found = [event for event in self.log_events()
                     if all(event.get(key) == value for key, value in fields.items())]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Api:
    """requests against the live server, as one of the CLIENTS."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.session = requests.Session()

    def request(self, method: str, path: str, client: str | None = "admin",
                **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if client is not None and "Authorization" not in headers:
            headers.update(bearer(client))
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        return self.session.request(method, url, headers=headers, timeout=30, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)


@dataclass
class Received:
    path: str
    authorization: str | None
    body: bytes


@dataclass
class Subscriber:
    """A loopback HTTP server; the first path segment of a callback picks its behaviour.

    ``/good``: 204 with ``SUBSCRIBER_AUTH``, 403 without; ``/open``: 200 to anyone;
    ``/error``: 500; ``/slow``: answers after ``slow_seconds``; ``/redirect``: 302 to
    ``/good``; ``/wrong-auth``: 403 always.
    """

    port: int
    slow_seconds: float = 3.0
    received: list[Received] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def callback(self, behaviour: str = "good", tag: str = "") -> str:
        return f"{self.url}/{behaviour}{'/' + tag if tag else ''}"

    def requests_to(self, prefix: str) -> list[Received]:
        return [item for item in self.received if item.path.startswith(prefix)]


SUBSCRIBER_AUTH = "Bearer subscriber-token"


def start_subscriber() -> tuple[Subscriber, http.server.ThreadingHTTPServer]:
    subscriber = Subscriber(port=free_port())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            auth = self.headers.get("Authorization")
            subscriber.received.append(Received(self.path, auth, body))
            behaviour = self.path.strip("/").split("/")[0]
            if behaviour == "good":
                self._answer(204 if auth == SUBSCRIBER_AUTH else 403)
            elif behaviour == "open":
                self._answer(200)
            elif behaviour == "error":
                self._answer(500)
            elif behaviour == "slow":
                time.sleep(subscriber.slow_seconds)
                self._answer(204)
            elif behaviour == "redirect":
                self._answer(302, {"Location": f"{subscriber.url}/good"})
            else:
                self._answer(403)

        def _answer(self, status: int, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the probe gave up waiting, as it should

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", subscriber.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return subscriber, server
