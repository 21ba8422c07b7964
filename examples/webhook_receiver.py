"""Receive iopnet's webhooks and check that iopnet sent them (docs/events.md, Webhooks).

Every delivery is a POST of one event envelope (JSON) with
  X-Iopnet-Timestamp: unix seconds when it was sent
  X-Iopnet-Signature: hex HMAC-SHA256(secret, "<timestamp>.<raw body>")
A request whose signature does not match, or whose timestamp is more than TOLERANCE
seconds away from now (a captured request sent again), is answered 401 and ignored.
Answer 2xx quickly: a 5xx or a timeout is retried; the same delivery always carries the
same Idempotency-Key, and the envelope's event_id identifies the event.

    WEBHOOK_SECRET=... python examples/webhook_receiver.py --port 8080
Stdlib only; put it behind your HTTPS front (iopnet posts to https URLs only)."""

import argparse
import hashlib
import hmac
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE = 300  # seconds


def verified(secret: bytes, timestamp: str | None, signature: str | None, body: bytes, now: float) -> bool:
    if not timestamp or not signature or not timestamp.isdigit():
        return False
    if abs(now - int(timestamp)) > TOLERANCE:
        return False
    expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)  # constant time


class Receiver(BaseHTTPRequestHandler):
    secret = b""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))  # the raw bytes, as signed
        timestamp, signature = self.headers.get("X-Iopnet-Timestamp"), self.headers.get("X-Iopnet-Signature")
        if not verified(self.secret, timestamp, signature, body, time.time()):
            print("rejected", self.headers.get("Idempotency-Key"), flush=True)
            self.send_response(401)
            self.end_headers()
            return
        envelope = json.loads(body)
        # Your work goes here; skip an event_id you have handled already (deliveries are at least once).
        print("accepted", envelope["event_id"], envelope["event_type"], envelope["site_id"], flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # no access log on stderr
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    Receiver.secret = os.environ["WEBHOOK_SECRET"].encode()  # the secret you gave POST /subscriptions
    server = ThreadingHTTPServer((args.host, args.port), Receiver)
    print(f"listening on http://{args.host}:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
