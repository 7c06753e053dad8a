"""The subscriber sink: a real HTTP server that receives Koerier's deliveries during a run.

Each abonnement of a run gets its own callback path, ``/callbacks/<index>``, and its own
``Authorization`` value. The sink answers like a careful subscriber: 204 for a delivery with
the right credentials, 403 without them (Koerier's subscription probe checks both), and it
records for every delivery the notification key, the arrival time and Koerier's headers.

The key is the last path segment of the message's ``resourceUrl``: the load generator makes
it unique per published notification, which is how a delivery is matched to the publish that
caused it (the publisher never sees Koerier's notification uuid). Duplicates and losses are
counted later by ``perf.report`` from the dumped arrivals, never assumed.

Run it as ``python -m perf.sink --port P --subscribers N --secret S --out arrivals.csv``.
Control endpoints under ``/_sink/`` let the runner watch progress and ask for the dump.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import signal
import time
from pathlib import Path

import orjson
from aiohttp import web

PROBE_KANAAL = "test"


def callback_auth(secret: str, index: int) -> str:
    """The ``Authorization`` value that abonnement ``index`` is registered with."""
    return f"Bearer perf-{secret}-{index}"


def callback_url(base_url: str, index: int) -> str:
    return f"{base_url.rstrip('/')}/callbacks/{index}"


class Sink:
    """Receives deliveries and keeps one arrival row per request, in memory, until dumped."""

    def __init__(self, subscribers: int, secret: str, out: Path | None):
        self.expected_auth = {
            str(index): callback_auth(secret, index).encode() for index in range(subscribers)
        }
        self.out = out
        # (subscriber, key, received_at, attempt, notification_id): one row per delivery.
        self.arrivals: list[tuple[str, str, float, str, str]] = []
        self.probes = 0
        self.rejected = 0
        self.malformed = 0

    async def on_delivery(self, request: web.Request) -> web.Response:
        received_at = time.time()
        subscriber = request.match_info["index"]
        expected = self.expected_auth.get(subscriber)
        given = request.headers.get("Authorization", "").encode()
        if expected is None or given != expected:
            # A subscriber that accepts anyone is what the probe must catch: refuse.
            self.rejected += 1
            return web.Response(status=403)

        body = await request.read()
        try:
            message = orjson.loads(body)
            kanaal = message["kanaal"]
            key = str(message["resourceUrl"]).rsplit("/", 1)[-1]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.malformed += 1
            return web.Response(status=400, text="expected a notification message")
        if kanaal == PROBE_KANAAL:
            self.probes += 1
            return web.Response(status=204)

        self.arrivals.append((
            subscriber, key, received_at,
            request.headers.get("Koerier-Delivery-Attempt", ""),
            request.headers.get("Koerier-Notification-Id", ""),
        ))
        return web.Response(status=204)

    async def on_stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            "arrivals": len(self.arrivals), "probes": self.probes,
            "rejected": self.rejected, "malformed": self.malformed,
        })

    async def on_arrivals(self, request: web.Request) -> web.Response:
        """Arrivals from index ``from`` on, as ``key received_at`` lines (the shapes poll it)."""
        start = int(request.query.get("from", "0"))
        rows = self.arrivals[start:]
        text = "".join(f"{key} {received_at:.6f}\n" for _, key, received_at, _, _ in rows)
        return web.Response(text=text, headers={"X-Next": str(start + len(rows))})

    async def on_dump(self, request: web.Request) -> web.Response:
        count = self.dump()
        return web.json_response({"written": count, "path": str(self.out)})

    def dump(self) -> int:
        if self.out is None:
            return 0
        rows = list(self.arrivals)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["subscriber", "key", "received_at", "attempt", "notification_id"])
            writer.writerows(
                (subscriber, key, f"{received_at:.6f}", attempt, notification_id)
                for subscriber, key, received_at, attempt, notification_id in rows
            )
        return len(rows)

    def application(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/callbacks/{index}", self.on_delivery)
        app.router.add_get("/_sink/stats", self.on_stats)
        app.router.add_get("/_sink/arrivals", self.on_arrivals)
        app.router.add_post("/_sink/dump", self.on_dump)
        return app


async def serve(sink: Sink, host: str, port: int) -> None:
    runner = web.AppRunner(sink.application(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    print(f"sink listening on http://{host}:{port}", flush=True)
    await stopped.wait()
    # Dump on the way out too, so a runner that was interrupted still leaves its evidence.
    sink.dump()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--subscribers", type=int, default=1,
                        help="callback paths /callbacks/0..N-1 that accept deliveries")
    parser.add_argument("--secret", required=True, help="run secret behind the auth values")
    parser.add_argument("--out", type=Path, help="where the arrivals CSV is written")
    args = parser.parse_args(argv)

    # Plain asyncio on purpose: the sink stays the same whatever else is installed, so runs
    # compare. It costs about 0.35 ms of CPU per delivery (the reports' sink row).
    sink = Sink(args.subscribers, args.secret, args.out)
    asyncio.run(serve(sink, args.host, args.port))


if __name__ == "__main__":
    main()
