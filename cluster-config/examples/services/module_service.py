#!/usr/bin/env python3
"""A reference module service for botclaw (module payload version 1), standard library only.

Bots call modules through botclaw: `module(name, key, request)` from a built-in bot, or a
"calls" round from a bot service. botclaw POSTs each call that its node-wide cache cannot
answer to one instance of the module, balanced over the instances in `[[modules]] urls`:
    {"version": 1, "module": "weather", "key": "oslo", "request": {"city": "Oslo"}}
and takes any JSON answer. With --max-age N the answers say `Cache-Control: max-age=N`, and
botclaw answers the same key from its cache for N seconds (without it, the module's
`cache_ttl_ms` applies).

This one serves two modules, so one script stands in for two teams' services:
    weather  {"city": "Oslo"}    -> {"city": "Oslo", "celsius": 7, "condition": "rainy"}
    catalog  {"query": "a desk"} -> {"products": [{"sku", "name", "price_cents", "stock"}]}

    python3 module_service.py [--port 0] [--host 127.0.0.1] [--max-age N] [--latency-ms MS]

prints "listening on PORT" first. GET /health answers 200 (503 in mode "error");
GET /stats gives {"calls": N, "keys": {key: calls}}; POST /mode/MODE switches between
ok, error (answers 500) and hang (never answers), for tests.
"""

import argparse
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = {"mode": "ok"}
STATS = {"calls": 0, "keys": {}}
LOCK = threading.Lock()
ARGS = argparse.Namespace(max_age=None, latency_ms=0)

CATALOG = [
    ("KB-01", "keyboard", 4999, 12),
    ("MS-02", "mouse", 1999, 40),
    ("MN-03", "monitor", 18900, 3),
    ("DK-08", "desk", 24900, 2),
]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy"]


def weather(request):
    city = str(request.get("city", "")).strip()
    h = int.from_bytes(hashlib.sha256(city.lower().encode()).digest()[:8], "little")
    return {"city": city, "celsius": h % 40 - 5, "condition": CONDITIONS[(h >> 8) % 5]}


def catalog(request):
    query = str(request.get("query", "")).lower()
    return {
        "products": [
            {"sku": sku, "name": name, "price_cents": price, "stock": stock}
            for sku, name, price, stock in CATALOG
            if name in query
        ]
    }


MODULES = {"weather": weather, "catalog": catalog}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024

    def log_message(self, *args):
        pass

    def answer(self, status, body, max_age=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if max_age is not None:
            self.send_header("Cache-Control", f"max-age={max_age}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            ok = MODE["mode"] != "error"
            return self.answer(200 if ok else 503, {"healthy": ok})
        if self.path == "/stats":
            with LOCK:
                return self.answer(200, {"calls": STATS["calls"], "keys": dict(STATS["keys"])})
        self.answer(404, {"error": "POST module calls to any path"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path.startswith("/mode/"):
            MODE["mode"] = self.path[len("/mode/"):]
            return self.answer(200, {"mode": MODE["mode"]})
        mode = MODE["mode"]
        if mode == "hang":
            time.sleep(3600)
        if mode == "error":
            return self.answer(500, {"error": "failing on purpose"})
        try:
            call = json.loads(body)
            if call.get("version") != 1:
                return self.answer(400, {"error": f"payload version {call.get('version')}"})
            serve = MODULES.get(call["module"])
            if serve is None:
                return self.answer(404, {"error": f"no module {call['module']!r} here"})
            with LOCK:
                STATS["calls"] += 1
                key = str(call.get("key"))
                STATS["keys"][key] = STATS["keys"].get(key, 0) + 1
            if ARGS.latency_ms:
                time.sleep(ARGS.latency_ms / 1000)
            answer = serve(call.get("request") or {})
        except (ValueError, KeyError, TypeError) as e:
            return self.answer(400, {"error": str(e)})
        self.answer(200, answer, ARGS.max_age)


class Server(ThreadingHTTPServer):
    request_queue_size = 256


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--max-age", type=int, default=None)
    ap.add_argument("--latency-ms", type=int, default=0)
    args = ap.parse_args()
    ARGS.max_age, ARGS.latency_ms = args.max_age, args.latency_ms
    server = Server((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
