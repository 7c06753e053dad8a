"""Arranging a run through Koerier's own API: the kanaal, the abonnementen, and clean-up.

This goes through the public API (not the database) so that ``--target`` works against any
running Koerier, the appliance included. Creating an abonnement makes Koerier probe the
sink's callback, which is the first proof that the sink answers like a real subscriber.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import jwt

from perf.message import BRONORGANISATIE, KANAAL, KANAAL_FILTERS
from perf.sink import callback_auth, callback_url


class ApiError(RuntimeError):
    """Koerier answered an arranging call with something else than expected."""


class Api:
    """A tiny ZGW client: signs a fresh JWT per call, speaks JSON."""

    def __init__(self, base_url: str, client_id: str, secret: str):
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self.secret = secret

    def token(self) -> str:
        claims = {
            "iss": self.client_id, "iat": int(time.time()), "client_id": self.client_id,
            "user_id": "perf", "user_representation": "Koerier perf harness",
        }
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {self.token()}",
                     "Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")


def ensure_kanaal(api: Api) -> None:
    """Create the run's kanaal unless a kanaal of that name exists already."""
    status, body = api.call("GET", f"/api/v1/kanaal?naam={KANAAL}")
    if status == 200 and isinstance(body, list) and body:
        return
    status, body = api.call("POST", "/api/v1/kanaal", {
        "naam": KANAAL,
        "documentatieLink": "https://koerier.invalid/docs/zaken",
        "filters": KANAAL_FILTERS,
    })
    if status != 201:
        raise ApiError(f"creating kanaal {KANAAL!r}: expected 201, but got {status}: {body}")


def create_abonnementen(api: Api, sink_url: str, secret: str, subscribers: int,
                        decoys: int) -> list[str]:
    """``subscribers`` abonnementen that match every published notification, then ``decoys``
    that match none (they prove routing does not over-deliver). Returns their urls."""
    urls = []
    for index in range(subscribers + decoys):
        organisation = BRONORGANISATIE if index < subscribers else "999999990"
        status, body = api.call("POST", "/api/v1/abonnement", {
            "callbackUrl": callback_url(sink_url, index),
            "auth": callback_auth(secret, index),
            "kanalen": [{
                "naam": KANAAL,
                "filters": {"bronorganisatie": organisation, "vertrouwelijkheidaanduiding": "*"},
            }],
        })
        if status != 201:
            raise ApiError(f"creating abonnement {index}: expected 201, but got {status}: {body}")
        urls.append(str(body.get("url", "")))
    return urls


def delete_abonnementen(api: Api, urls: list[str]) -> int:
    """Remove the run's abonnementen (a targeted server must not keep dead subscribers)."""
    deleted = 0
    for url in urls:
        path = url[url.find("/api/v1/"):] if "/api/v1/" in url else ""
        if path:
            status, _ = api.call("DELETE", path)
            deleted += status == 204
    return deleted


def metrics_text(base_url: str) -> str:
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/metrics", timeout=10) as response:
            return response.read().decode(errors="replace")
    except OSError as error:
        return f"# /metrics unavailable: {error}\n"
