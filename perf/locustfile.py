"""The publisher: locust users that POST realistic notifications to Koerier.

``perf/run`` starts locust with this file and these variables:

- ``PERF_PROFILE`` (a name from ``perf.profiles``) and ``PERF_KNOBS`` (JSON overrides of the
  shape's knobs), which select the one load shape of the run;
- ``PERF_CLIENT_ID`` / ``PERF_SECRET``: the API client the JWTs are signed for;
- ``PERF_RUN_ID``: makes every ``resourceUrl`` of this run unique, so the sink can match a
  delivery to its publish; ``PERF_OUT``: where ``published.csv`` and the shape's files go.

A response is validated inside the request context: a 201 whose body is not the message we
sent is a failure, however fast it came.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
from locust import FastHttpUser, events, task

from perf import shapes
from perf.message import mismatch, notification

PROFILE = os.environ.get("PERF_PROFILE", "tier-50")
RUN_ID = os.environ.get("PERF_RUN_ID", str(int(time.time())))
OUT = Path(os.environ.get("PERF_OUT", "."))

# The one shape of this run; locust picks up every LoadTestShape class in this module.
RunShape = shapes.build(PROFILE, json.loads(os.environ.get("PERF_KNOBS", "{}")))


class TokenSource:
    """A ZGW JWT for the run's client, signed again before it gets old.

    Koerier (like the incumbent) rejects tokens older than an hour, so a long run must
    refresh them; ``max_age_s`` keeps a wide margin.
    """

    def __init__(self, client_id: str, secret: str, max_age_s: float = 600.0):
        self.client_id = client_id
        self.secret = secret
        self.max_age_s = max_age_s
        self.issued_at = 0.0
        self.header = ""
        self.refreshes = 0

    def authorization(self) -> str:
        now = time.time()
        if now - self.issued_at > self.max_age_s:
            claims = {
                "iss": self.client_id, "iat": int(now), "client_id": self.client_id,
                "user_id": "perf", "user_representation": "Koerier perf harness",
            }
            self.header = "Bearer " + jwt.encode(claims, self.secret, algorithm="HS256")
            self.issued_at = now
            self.refreshes += 1
        return self.header


TOKENS = TokenSource(
    os.environ.get("PERF_CLIENT_ID", "perf"), os.environ.get("PERF_SECRET", "perf-secret"),
    float(os.environ.get("PERF_TOKEN_MAX_AGE_S", "600")),
)
SEQUENCE = itertools.count()
# One row per publish: key, slot, sent_at, done_at, latency_ms, status, error.
PUBLISHED: list[tuple[str, float, float, float, float, int, str]] = []


class Publisher(FastHttpUser):
    """Sends one notification per slot handed out by the run's shape."""

    network_timeout = 10.0
    connection_timeout = 5.0

    def wait_time(self) -> float:
        shape = self.environment.shape_class
        self.slot = shape.next_slot()
        return max(0.0, self.slot - time.time())

    def on_start(self) -> None:
        # Take a slot before the first send, so a freshly spawned pool does not burst.
        self.slot = time.time()
        self.wait()

    @task
    def publish(self) -> None:
        shape = self.environment.shape_class
        sequence = next(SEQUENCE)
        key = f"{RUN_ID}-{sequence}"
        message = notification(key, sequence)
        headers = {
            "Authorization": TOKENS.authorization(),
            "Content-Type": "application/json",
        }

        sent_at = time.time()
        if sent_at - self.slot > 0.05:
            shape.late_sends += 1
        with self.client.post(
            "/api/v1/notificaties", data=json.dumps(message), headers=headers,
            name="POST /api/v1/notificaties", catch_response=True,
        ) as response:
            done_at = time.time()
            error = ""
            if response.status_code != 201:
                error = f"expected 201, but got {response.status_code}: {response.text[:200]}"
            else:
                try:
                    error = mismatch(message, response.json())
                except ValueError:
                    error = "expected a JSON body, but it did not parse"
            if error:
                response.failure(error)
            else:
                response.success()

        latency_ms = (done_at - sent_at) * 1000.0
        shape.meter.record(key, done_at, latency_ms, not error)
        PUBLISHED.append((key, self.slot, sent_at, done_at, latency_ms,
                          response.status_code or 0, error[:200]))


_written = False


@events.test_stop.add_listener
def write_publish_log(environment: Any, **_kwargs: Any) -> None:
    """Dump the publish log once, when the shape ends the run (or on quit)."""
    global _written
    if _written:
        return
    _written = True
    shape = environment.shape_class
    if shape is not None and shape.phases and shape.phases[-1]["end"] is None:
        shape.end_phases("stopped")
    (OUT / "raw").mkdir(parents=True, exist_ok=True)
    with open(OUT / "raw" / "published.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "slot", "sent_at", "done_at", "latency_ms", "status", "error"])
        writer.writerows(
            (key, f"{slot:.6f}", f"{sent:.6f}", f"{done:.6f}", f"{latency:.3f}", status, error)
            for key, slot, sent, done, latency, status, error in PUBLISHED
        )
    (OUT / "publisher.json").write_text(json.dumps({
        "published": len(PUBLISHED), "token_refreshes": TOKENS.refreshes,
    }))


@events.quitting.add_listener
def write_on_quit(environment: Any, **kwargs: Any) -> None:
    write_publish_log(environment)
