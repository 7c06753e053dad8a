"""A tiny notification subscriber for `make run`: prints every notification it receives.

It behaves as a subscriber must: it answers 204 to requests that carry its own
Authorization value and 403 to any other, which is what Koerier's subscription probe checks.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(expected_auth: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.headers.get("Authorization") != expected_auth:
                self.send_response(403)
                self.end_headers()
                return
            self.send_response(204)
            self.end_headers()
            try:
                message = json.loads(body)
            except ValueError:
                message = body.decode(errors="replace")
            notification_id = self.headers.get("Koerier-Notification-Id")
            what = f"notification {notification_id}" if notification_id else "subscription probe"
            print(f"[demo subscriber] received {what}: "
                  f"{json.dumps(message, ensure_ascii=False)}", flush=True)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the print above is the useful line

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--auth", default="Bearer demo-subscriber-token")
    arguments = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", arguments.port), make_handler(arguments.auth))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
