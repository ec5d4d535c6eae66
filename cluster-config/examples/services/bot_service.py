#!/usr/bin/env python3
"""A reference bot service for botclaw (payload version 1), standard library only.

botclaw POSTs each turn as one JSON object:
    {"version": 1, "bot": "support", "conv": "c-1", "turn": 3, "id": "m-3",
     "user": "u-7" or null, "text": "...", "state": <what this service last returned, or null>,
     "flags": ["feature-flag", ...]}
and keeps the "state" this service answers durable and replicated with the conversation:
    {"messages": ["..."], "state": {...}}
so the service keeps nothing itself and any instance can take any turn. `id` is the turn's
idempotency key: after a failed call botclaw may send the same turn again.

The dialogue ("support"): asks the user's name, then opens a numbered ticket per message,
remembering the name and the tickets in the state. "flags" answers the flags it was sent.
"weather in <city>" asks botclaw's `weather` module (a module service or the built-in
one) through a round of module calls: the answer {"calls": [{"module", "key", "request"}]}
makes botclaw call them (cached, balanced) and POST the turn again with
"results": [{"module", "key", "answer"} or {"module", "key", "error"}].

    python3 bot_service.py [--port 0] [--mode ok|error|hang|slow]

prints "listening on PORT" first. For tests, modes ok, error (answers 500),
hang (never answers) or slow (answers after 1.5 s) as POST /mode/MODE; GET /stats gives
{"calls": N} (turn calls received); GET /health answers 200 (503 in mode "error").
"""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = {"mode": "ok"}
STATS = {"calls": 0}
LOCK = threading.Lock()


def turn(req):
    state = req.get("state") or {}
    text = req["text"].strip()
    if text.lower() == "flags":
        return ["flags: " + (", ".join(req.get("flags") or []) or "(none)")], state
    if text.lower().startswith("weather in "):
        city = text[len("weather in "):].strip(" ?!.")
        results = req.get("results")
        if not results:
            call = {"module": "weather", "key": city.lower(), "request": {"city": city}}
            return {"calls": [call]}, state
        r = results[0]
        if "error" in r:
            return [f"No forecast for {city} now ({r['error']})"], state
        f = r["answer"]
        return [f"{f['city']}: {f['condition']} and {f['celsius']}°C, says the weather module"], state
    if not state:
        return ["Hi, this is support. What is your name?"], {"step": "name", "tickets": []}
    if state.get("step") == "name":
        name = text.split()[-1] if text else "friend"
        state = {"step": "help", "name": name, "tickets": []}
        return [f"Nice to meet you, {name}. How can I help?"], state
    tickets = state.get("tickets", []) + [text]
    state = dict(state, tickets=tickets)
    return [f"Ticket #{len(tickets)} for {state.get('name', 'you')}: {text}"], state


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per answer, sent at once: headers and body written apart, with Nagle's
    # algorithm on, wait for the caller's delayed ACK (40 ms a turn).
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            ok = MODE["mode"] != "error"
            return self.answer(200 if ok else 503, {"healthy": ok})
        if self.path == "/stats":
            with LOCK:
                return self.answer(200, dict(STATS))
        self.answer(404, {"error": "POST turns to any path"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path.startswith("/mode/"):
            MODE["mode"] = self.path[len("/mode/"):]
            return self.answer(200, {"mode": MODE["mode"]})
        with LOCK:
            STATS["calls"] += 1
        mode = MODE["mode"]
        if mode == "hang":
            time.sleep(3600)
        if mode == "error":
            return self.answer(500, {"error": "failing on purpose"})
        if mode == "slow":
            time.sleep(1.5)
        try:
            req = json.loads(body)
            if req.get("version") != 1:
                return self.answer(400, {"error": f"payload version {req.get('version')}"})
            messages, state = turn(req)
        except (ValueError, KeyError, TypeError) as e:
            return self.answer(400, {"error": str(e)})
        if isinstance(messages, dict):
            # A round of module calls: botclaw calls them and asks again with results.
            return self.answer(200, dict(messages, state=state))
        self.answer(200, {"messages": messages, "state": state})


class Server(ThreadingHTTPServer):
    # The default backlog (5) drops connections when botclaw opens many at once.
    request_queue_size = 256


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mode", default="ok", choices=["ok", "error", "hang", "slow"])
    args = ap.parse_args()
    MODE["mode"] = args.mode
    server = Server(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
