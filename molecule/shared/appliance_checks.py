"""Checks shared by the appliance scenarios: HTTPS through the published port, the
end-to-end notification run, and the journal of a failed unit.

The CI host reaches a test host only through ports published on 127.0.0.1; the
subscriber of the end-to-end run lives inside the app host, on its loopback.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import ssl
import time
import uuid

SUBSCRIBER_PORT = 9999
SUBSCRIBER_AUTH = "Bearer e2e-subscriber-secret"
RECEIVED_FILE = "/root/e2e-received.jsonl"

# A tiny subscriber: 204 for a request with the right Authorization header (the
# abonnement's auth), 403 without it, as the subscription probe demands.
SUBSCRIBER = f"""
import http.server, json
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Authorization") != {SUBSCRIBER_AUTH!r}:
            self.send_response(403); self.end_headers(); return
        with open({RECEIVED_FILE!r}, "ab") as received:
            received.write(body.replace(b"\\n", b" ") + b"\\n")
        self.send_response(204); self.end_headers()
http.server.ThreadingHTTPServer(("127.0.0.1", {SUBSCRIBER_PORT}), Handler).serve_forever()
"""


def journal(host, unit: str, lines: int = 60) -> str:
    """The end of a unit's journal, for the message of a failed check."""
    return host.run(f"journalctl --no-pager -n {lines} -u {unit}").stdout


def assert_unit_active(host, unit: str) -> None:
    state = host.run(f"systemctl is-active {unit}").stdout.strip()
    assert state == "active", f"{unit} is {state}; its journal:\n{journal(host, unit)}"


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:port while presenting (SNI) and checking the public name."""

    def __init__(self, domain: str, port: int, context: ssl.SSLContext, timeout: float = 15):
        super().__init__(domain, port, context=context, timeout=timeout)
        self._loopback_port = port

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self._loopback_port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def request(domain, port, context, method, path, body=None, headers=None):
    """One HTTPS request through nginx; returns (status, headers, parsed or raw body)."""
    connection = PinnedHTTPSConnection(domain, port, context)
    payload = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    all_headers = {"Accept": "application/json", "Content-Type": "application/json"}
    all_headers.update(headers or {})
    try:
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw
    return response.status, response.headers, parsed


def start_subscriber(host) -> None:
    host.run("systemctl stop e2e-subscriber.service 2>/dev/null; rm -f " + RECEIVED_FILE)
    host.check_output(f"cat > /root/e2e-subscriber.py <<'EOF'\n{SUBSCRIBER}\nEOF")
    host.check_output(
        "systemd-run --unit=e2e-subscriber --collect python3 /root/e2e-subscriber.py"
    )
    for _ in range(50):
        if host.socket(f"tcp://127.0.0.1:{SUBSCRIBER_PORT}").is_listening:
            return
        time.sleep(0.1)
    raise AssertionError("the test subscriber did not start:\n" + journal(host, "e2e-subscriber"))


def publish_and_receive(host, domain, port, context, timeout_s: float = 60) -> dict:
    """Create a client, kanaal and abonnement, publish, and wait for the delivery."""
    client_id = "e2e-" + uuid.uuid4().hex[:8]
    host.check_output(f"koerier client add {client_id} --all")
    token = host.check_output(f"koerier token {client_id}").strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {token}"}
    kanaal = "e2e-" + uuid.uuid4().hex[:8]

    status, _, body = request(domain, port, context, "POST", "/api/v1/kanaal",
                              {"naam": kanaal, "documentatieLink": "https://example.nl/doc",
                               "filters": ["bronorganisatie"]}, auth)
    assert status == 201, (status, body)

    start_subscriber(host)
    status, _, body = request(
        domain, port, context, "POST", "/api/v1/abonnement",
        {"callbackUrl": f"http://127.0.0.1:{SUBSCRIBER_PORT}/callback",
         "auth": SUBSCRIBER_AUTH,
         "kanalen": [{"naam": kanaal, "filters": {"bronorganisatie": "123456782"}}]},
        auth)
    assert status == 201, (status, body, journal(host, "koerier-api-1"))

    hoofd_object = f"https://zaken.example.nl/api/v1/zaken/{uuid.uuid4()}"
    notification = {
        "kanaal": kanaal,
        "hoofdObject": hoofd_object,
        "resource": "zaak",
        "resourceUrl": hoofd_object,
        "actie": "create",
        "aanmaakdatum": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "kenmerken": {"bronorganisatie": "123456782"},
    }
    status, _, body = request(domain, port, context, "POST", "/api/v1/notificaties",
                              notification, auth)
    assert status in (200, 201), (status, body)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        received = host.run(f"cat {RECEIVED_FILE} 2>/dev/null").stdout
        for line in received.splitlines():
            message = json.loads(line)
            if message.get("hoofdObject") == hoofd_object:
                return message
        time.sleep(0.5)
    raise AssertionError(
        "the subscriber did not receive the notification within "
        f"{timeout_s:.0f} s; worker journal:\n{journal(host, 'koerier-worker-1')}"
    )
