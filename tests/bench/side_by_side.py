#!/usr/bin/env python3
"""The side-by-side throughput table of README ("Performance"), in one go.

Runs the same `botclaw bench` load (C connections, pipeline D, K conversations, echo bot)
against: the minimal tokio echo server (`--baseline-echo`), Redis without persistence and
with `appendfsync always` (`--baseline-redis`, Debian's `redis-server`), 1 botclaw node in
memory, and 3 nodes (R=2) in memory and on fjall, each with every node a gateway and with
placement-aware connections (`--direct`); then one connection, pipeline 1, for p50
latencies. Prints a Markdown table, with each figure's ratio to the 1-node in-memory run.

Standard library only. Every process it starts is killed by pid, also on failure.

    python3 tests/bench/side_by_side.py [--bin target/release/botclaw] [--turns 300000]
        [--connections 50] [--pipeline 16] [--conversations 2000] [--json OUT.json]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, log, env=None):
    out = open(log, "ab")
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env=env, start_new_session=True)
    PROCS.append(p)
    return p


def stop_all():
    for p in PROCS:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p in PROCS:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    PROCS.clear()


def wait_for(what, check, timeout_s=60):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def status(admin):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=2) as r:
        return json.load(r)


def cluster_ready(admins, n):
    for a in admins:
        s = status(a)
        up = [m for m in s["members"] if m["state"] == "up"]
        c = s.get("controller") or {}
        if len(up) != n or not s["serving"]:
            return False
        if c.get("shards_unassigned", 1) or not c.get("leader"):
            return False
        # A young group may have two voters for a while: one killed then stops it.
        if len(c.get("voters") or []) < min(3, n):
            return False
        # A lone node cannot hold a second replica.
        if n > 1 and c.get("shards_under_replicated", 1):
            return False
    return any((status(a).get("controller") or {}).get("plan_settled") for a in admins)


def start_node(bin_, i, durable, work, seed, config=""):
    """Starts node n{i} (founding without a seed), with `config` appended to its file;
    returns (client, admin, gossip) ports."""
    ports = [free_port() for _ in range(4)]
    d = os.path.join(work, f"n{i}")
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "node.toml")
    with open(cfg, "w") as f:
        f.write("[store]\nephemeral = %s\n%s" % ("false" if durable else "true", config))
    cmd = [bin_, "node", "--config", cfg, "--name", f"n{i}",
           "--client-addr", f"127.0.0.1:{ports[0]}", "--cluster-addr", f"127.0.0.1:{ports[1]}",
           "--gossip-addr", f"127.0.0.1:{ports[2]}", "--admin-addr", f"127.0.0.1:{ports[3]}",
           "--data-dir", os.path.join(d, "data")]
    if seed:
        cmd += ["--seed", seed]
    env = dict(os.environ, BOTCLAW_SECRET="side-by-side-secret")
    env.setdefault("RUST_LOG", "warn")
    start(cmd, os.path.join(d, "node.log"), env)
    return ports[0], ports[3], f"127.0.0.1:{ports[2]}"


def start_cluster(bin_, n, durable, work, config=""):
    """Starts n nodes (node 0 founds, the others seed to it); returns (clients, admins,
    node 0's gossip address)."""
    clients, admins = [], []
    seed = None
    for i in range(n):
        client, admin, gossip = start_node(bin_, i, durable, work, seed, config)
        seed = seed or gossip
        clients.append(client)
        admins.append(admin)
    wait_for(f"{n} nodes to be ready", lambda: cluster_ready(admins, n), 120)
    return clients, admins, seed


def bench(bin_, args, clients, admins, extra):
    cmd = [bin_, "bench", "--json", "--connections", str(args.connections),
           "--pipeline", str(args.pipeline), "--conversations", str(args.conversations),
           "--turns", str(args.turns)] + extra
    for c in clients:
        cmd += ["--connect", f"127.0.0.1:{c}"]
    for a in admins:
        cmd += ["--admin", f"127.0.0.1:{a}"]
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=1800)
    return json.loads(out.stdout)


def latency(bin_, args, clients, extra, prefix):
    cmd = [bin_, "bench", "--json", "--connections", "1", "--pipeline", "1",
           "--conversations", str(args.conversations), "--turns", str(args.latency_turns),
           "--prefix", prefix] + extra
    for c in clients:
        cmd += ["--connect", f"127.0.0.1:{c}"]
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=600)
    return json.loads(out.stdout)


def p50(run, key="latency_us"):
    return (run.get(key) or {}).get("p50")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/botclaw")
    ap.add_argument("--turns", type=int, default=300_000)
    ap.add_argument("--latency-turns", type=int, default=5_000)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--pipeline", type=int, default=16)
    ap.add_argument("--conversations", type=int, default=2000)
    ap.add_argument("--redis-server", default=shutil.which("redis-server"))
    ap.add_argument("--json", help="also write every report to this file")
    args = ap.parse_args()
    if not args.redis_server:
        raise SystemExit("redis-server not found (apt-get install redis-server) or give --redis-server")
    rows = []  # (setup, throughput, cpu per 1000, p50 us, note)
    reports = {}
    work = tempfile.mkdtemp(prefix="botclaw-side-by-side-")
    try:
        # Redis, without persistence and with every write fsynced.
        for name, flags in [
            ("Redis, SET, no persistence", ["--save", "", "--appendonly", "no"]),
            ("Redis, SET, `appendfsync always`", ["--appendonly", "yes", "--appendfsync", "always"]),
        ]:
            port = free_port()
            d = os.path.join(work, f"redis-{port}")
            os.makedirs(d)
            start([args.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", d]
                  + flags, os.path.join(d, "log"))
            wait_for("redis", lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True)
            only = ["--baselines-only", "--baseline-redis", f"127.0.0.1:{port}"]
            r = bench(args.bin, args, [], [], only)
            lat = latency(args.bin, args, [], only, "lat")
            reports[name] = r
            red = r["baseline_redis"]
            rows.append((name, red["turns_per_s"], red.get("cpu_s_per_1000_turns"),
                         p50(lat["baseline_redis"]), ""))
            stop_all()
        # One node in memory, with the echo baseline of the same run.
        clients, admins, _ = start_cluster(args.bin, 1, False, os.path.join(work, "one"))
        r = bench(args.bin, args, clients, admins, ["--baseline-echo"])
        lat = latency(args.bin, args, clients, ["--baseline-echo"], "lat")
        reports["1 node"] = r
        b = r["baseline"]
        rows.insert(0, ("tokio echo server, same framing (`--baseline-echo`)", b["turns_per_s"],
                        b.get("cpu_s_per_1000_turns"), p50(lat["baseline"]), ""))
        one = r["cluster"]
        rows.append(("botclaw, 1 node, in memory", one["turns_per_s"],
                     one.get("cpu_s_per_1000_turns"), p50(lat["cluster"]), ""))
        stop_all()
        for durable, label in [(False, "in memory"), (True, "fjall")]:
            for direct in [False, True]:
                # A fresh cluster per run: fjall compacts the previous run's writes in the
                # background, which would land in the next run's CPU.
                where = os.path.join(work, f"{label}-{'direct' if direct else 'gateway'}")
                clients, admins, _ = start_cluster(args.bin, 3, durable, where)
                extra = ["--direct"] if direct else []
                prefix = f"{'d' if direct else 'g'}-"
                r = bench(args.bin, args, clients, admins, extra + ["--prefix", prefix + "t"])
                lat = latency(args.bin, args, clients, extra, prefix + "lat")
                name = f"botclaw, 3 nodes, {label}, R=2, " + (
                    "placement-aware (`--direct`)" if direct else "every node a gateway")
                reports[name] = r
                c = r["cluster"]
                fwd = p50(lat["cluster"], "forwarded_us")
                note = f"forwarded p50 {fwd} us" if fwd and not direct else ""
                rows.append((name, c["turns_per_s"], c.get("cpu_s_per_1000_turns"),
                             p50(lat["cluster"]), note))
                stop_all()
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    one = next(r for r in rows if r[0] == "botclaw, 1 node, in memory")
    print(f"`python3 tests/bench/side_by_side.py --turns {args.turns}`: {args.connections} "
          f"connections, pipeline {args.pipeline}, {args.conversations} conversations, echo "
          f"bot; p50 with 1 connection, pipeline 1; ratios against 1 node in memory\n")
    print("| setup | turns/s | vs 1 node | CPU s / 1000 turns | vs 1 node | 1-conn p50 us | note |")
    print("|---|---|---|---|---|---|---|")
    for name, tps, cpu, lat, note in rows:
        ratio = f"{tps / one[1]:.2f}x"
        cpu_s = f"{cpu:.4f}" if cpu is not None else "-"
        cpu_r = f"{cpu / one[2]:.2f}x" if cpu is not None and one[2] else "-"
        print(f"| {name} | {tps:,.0f} | {ratio} | {cpu_s} | {cpu_r} | {lat} | {note} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)


if __name__ == "__main__":
    main()
