"""Running the API: sockets, processes, the event loop, and a clean shutdown.

``koerier serve`` binds its sockets first, then forks the worker processes (when asked for
more than one); each process builds its own event loop, database pool and application in
:func:`run_api`, because none of those survive a fork.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import tornado.httpserver
import tornado.netutil
import tornado.process

from koerier import db, logs, metrics, relay
from koerier.api.app import make_app
from koerier.config import Settings

log = logs.get("koerier.api.server")

SHUTDOWN_GRACE_SECONDS = 10.0


async def run_api(settings: Settings, sockets: list[socket.socket]) -> None:
    """Serve the API on ``sockets`` in this process until SIGTERM or SIGINT.

    This is the place where per-process resources that need the running loop are made:
    the database pool and, on the delivery side, the broker publisher handed to
    :func:`make_app`.
    """
    await db.open_pool(settings)
    publisher = relay.api_publisher(settings)
    publisher.start()
    app = make_app(settings, publisher=publisher, extra_handlers=[
        (r"/metrics", metrics.MetricsHandler, {"publisher": publisher}),
    ])
    server = tornado.httpserver.HTTPServer(
        app,
        xheaders=False,
        # Bodies up to four times the limit are read and answered with a 413 problem;
        # beyond that Tornado drops the connection without reading the body.
        max_body_size=settings.max_body_bytes * 4,
        idle_connection_timeout=75,
        body_timeout=30,
    )
    server.add_sockets(sockets)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("api_started", pid=os.getpid(),
             addresses=[str(sock.getsockname()[:2]) for sock in sockets])

    await stopping.wait()

    log.info("api_stopping", pid=os.getpid())
    server.stop()
    try:
        await asyncio.wait_for(server.close_all_connections(), SHUTDOWN_GRACE_SECONDS)
    except TimeoutError:
        log.warning("api_connections_left_open", pid=os.getpid())
    await publisher.close()
    await db.close_pool()


def serve(settings: Settings, address: str, port: int, processes: int) -> None:
    """Bind, fork ``processes`` copies (0: one per CPU), and serve until stopped.

    With several processes the parent only watches its children and restarts one that
    dies; a stop signal must reach the whole process group (systemd and Ctrl-C do that).
    """
    sockets = tornado.netutil.bind_sockets(port, address or None, reuse_port=False)
    if processes != 1:
        tornado.process.fork_processes(processes, max_restarts=100)
    asyncio.run(run_api(settings, sockets))
