#!/usr/bin/env python3
"""A receiver of Sec-EM's event notifications, as an orchestrator writes one.

Listens on --listen (HOST:PORT) for POSTs, checks each one's ASMN-Signature header
(t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>"> under the subscription's secret)
and its timestamp (within --tolerance seconds: an older one is a replay), drops an event
whose id it has seen (Sec-EM delivers at least once), and appends each new event as one
JSON line to --out. Answers 204 when the event is recorded, 401 when it does not verify.
Python's standard library only.
"""

import argparse
import hashlib
import hmac
import http.server
import json
import sys
import threading
import time


def verify(secret_hex, header, body, now, tolerance):
    parts = dict(p.strip().split("=", 1) for p in header.split(",") if "=" in p)
    t, v1 = parts.get("t", ""), parts.get("v1", "")
    if not t.isdigit() or abs(now - int(t)) > tolerance:
        return False
    mac = hmac.new(bytes.fromhex(secret_hex), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, v1)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--secret", required=True, help="the subscription's secret (hex)")
    p.add_argument("--out", required=True, help="events, one JSON line each")
    p.add_argument("--tolerance", type=int, default=300)
    a = p.parse_args(argv)
    host, port = a.listen.rsplit(":", 1)
    seen = set()
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            n = int(self.headers.get("content-length", "0"))
            if n > (1 << 20):
                self.send_response(413)
                self.end_headers()
                return
            body = self.rfile.read(n)
            if not verify(a.secret, self.headers.get("asmn-signature", ""), body, time.time(), a.tolerance):
                self.send_response(401)
                self.end_headers()
                return
            event = json.loads(body)
            with lock:
                if event["id"] not in seen:
                    seen.add(event["id"])
                    with open(a.out, "a") as f:
                        f.write(json.dumps(event) + "\n")
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
    print(f"asmn-events: listening on {a.listen}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
