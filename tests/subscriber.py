"""A real HTTP subscriber for the delivery tests: loopback servers that record every request.

One :class:`Subscriber` runs any number of listening ports (each its own callback host) on
an aiohttp server loop in a background thread, so both plain and async tests can use it.
Each port can be told to answer 2xx, answer 500, hang, or refuse connections (its socket
closed), and to come back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

from tests.harness import free_port

MODES = ("ok", "error", "hang", "refuse")


@dataclass(frozen=True)
class Received:
    port_index: int
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)


class Subscriber:
    """``ports`` loopback HTTP servers; ``url(i, path)`` is a callback URL on server ``i``."""

    def __init__(self, ports: int = 1, status: int = 204, require_auth: str | None = None,
                 delay: float = 0.0, keep_alive: bool = True):
        self.ports = [free_port() for _ in range(ports)]
        self.status = status
        self.require_auth = require_auth
        # Seconds every answer waits, as a slow but working subscriber would.
        self.delay = delay
        self.keep_alive = keep_alive
        self.modes = ["ok"] * ports
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._sites: list[web.TCPSite | None] = [None] * ports
        self._release = asyncio.Event()

    # Control, from the test's thread.

    def start(self) -> Subscriber:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def url(self, index: int = 0, path: str = "/callback") -> str:
        return f"http://127.0.0.1:{self.ports[index]}{path}"

    def set_mode(self, mode: str, index: int | None = None) -> None:
        """Switch one port (or all) to ``ok``, ``error``, ``hang`` or ``refuse``."""
        assert mode in MODES, mode
        for position in range(len(self.ports)) if index is None else [index]:
            before, self.modes[position] = self.modes[position], mode
            if mode == "refuse" and before != "refuse":
                self._call(self._close_site(position))
            elif mode != "refuse" and before == "refuse":
                self._call(self._open_site(position))

    def requests(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [item for item in self.received if path is None or item.path == path]

    def count_by_notification(self) -> Counter[str]:
        return Counter(item.headers.get("Koerier-Notification-Id", "") for item in self.requests())

    def wait_for(self, count: int, timeout: float, path: str | None = None) -> list[Received]:
        """Wait until at least ``count`` requests (to ``path``) arrived; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.requests(path)
            if len(got) >= count:
                return got
            time.sleep(0.02)
        raise AssertionError(f"expected {count} requests within {timeout} s, got "
                             f"{len(self.requests(path))}")

    # The server, on its own loop.

    def _call(self, coroutine: object) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(15)  # type: ignore[arg-type]

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        for position in range(len(self.ports)):
            await self._open_site(position)

    async def _open_site(self, position: int) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, "127.0.0.1", self.ports[position], reuse_address=True,
                           backlog=1024)
        await site.start()
        self._sites[position] = site

    async def _close_site(self, position: int) -> None:
        site = self._sites[position]
        self._sites[position] = None
        if site is not None:
            await site.stop()

    async def _stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
        position = self.ports.index(port) if port in self.ports else 0
        mode = self.modes[position]
        if mode == "refuse" and request.transport is not None:
            # A kept-alive connection outlives the closed socket: cut it as a crash would.
            request.transport.abort()
            raise web.HTTPServiceUnavailable()
        body = await request.read()
        with self._lock:
            self.received.append(Received(position, request.path, dict(request.headers), body))
        if mode == "hang":
            await self._release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {} if self.keep_alive else {"Connection": "close"}
        if mode == "error":
            return web.Response(status=500, text="subscriber is broken", headers=headers)
        if self.require_auth is not None and request.headers.get("Authorization") != \
                self.require_auth:
            return web.Response(status=403, headers=headers)
        return web.Response(status=self.status, headers=headers)
