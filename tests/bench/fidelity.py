#!/usr/bin/env python3
"""How far the simulator is from the real cluster: one scenario, run both ways, side by side.

The scenario: N nodes (default 5) in memory, a steady load, and the last node killed with
SIGKILL. Measured the same way on both sides:
- detection: from the kill until every surviving node's failure detector declares it down
  (real: each survivor's `/status`, polled every 20 ms);
- reassignment: from the kill until the controller's committed map names it owner of no
  shard (real: the leader's `/status` `controller.owned`);
- turn latency p50 and p99 (real: `botclaw bench`, 4 connections, pipeline 1, before the
  kill; simulated: every acknowledged write of the same scenario without the crash, at
  the real run's turn rate);
- join: once the map is at rest after the kill (real: the survivors' leader says no move in
  flight and its plan settled; simulated: JOIN_AFTER_S after the kill), a new node starts
  and joins; from its start until the leader's map names it owner of a shard, and until it
  is settled: owner of shards with no move in flight and the leader's plan settled (real:
  the leader's `/status` `controller.owned`, `moves_in_flight`, `plan_settled`).
- skew: on a fresh cluster whose nodes rebalance every second (`[rebalance]` below, on
  both sides), a load over Zipf-popular conversations (`bench --skew`, the same
  conversation names in the simulator, so the same shards on the same owners); the
  busiest member's turns/s over the average at the start (2-6 s in) and over the last
  10 s, the load-driven moves decided, and when the last one was (real: every node's
  `/status` members' loads, as gossip brings them, and `botclaw_shards_moved_total`,
  polled every 0.5 s; simulated: the owners' acknowledged writes per second and the
  load loops' decisions).
The simulator runs `botclaw sim --model map` (the same membership, controller, planner,
ownership and load-loop code) on a scenario this script writes, with the node's placement settings
(shard count, virtual nodes: `botclaw node --check-config`); several seeds, several real
runs, medians and ranges. Prints a Markdown table.

Standard library only. Every process it starts is killed by pid, also on failure.

    python3 tests/bench/fidelity.py [--bin target/release/botclaw] [--nodes 5] [--runs 3]
        [--seeds 5] [--skew-s 40] [--json OUT.json]
"""

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import side_by_side as sbs  # noqa: E402  (the cluster helpers: start, status, stop_all)

KILL_AT_S = 10
# The simulated join, after the kill (the real one waits for the map to be at rest).
JOIN_AFTER_S = 10
# The skewed load: Zipf exponent, conversations, and the rebalancer's settings on both
# sides (a round every second, so that it settles within the run; the node's default is
# every 5 s with a 6-round cooldown).
SKEW_ZIPF = 1.2
SKEW_CONVERSATIONS = 500
REBALANCE = "[rebalance]\ninterval_ms = 1000\ncooldown_rounds = 2\nmin_turns_per_s = 5\n"
# The simulated load starts once the cluster formed (the real one once it is ready).
SKEW_START_S = 10


def member_state(admin, name):
    for m in sbs.status(admin)["members"]:
        if m["name"] == name:
            return m["state"]
    return None


def leader_status(admins):
    """The controller part of the leader's `/status` (None: no leader answered)."""
    for a in admins:
        try:
            c = sbs.status(a).get("controller") or {}
        except Exception:
            continue
        if c.get("is_leader"):
            return c
    return None


def owned_by(admins, name):
    """Shards the committed map names `name` owner of, as the controller's leader says."""
    c = leader_status(admins)
    return None if c is None else (c.get("owned") or {}).get(name, 0)


def at_rest(c):
    return c is not None and c.get("moves_in_flight") == 0 and bool(c.get("plan_settled"))


def join_run(args, work, seed, admins):
    """Once the map is at rest, starts node n{nodes} and times its way in."""
    sbs.wait_for("the map at rest after the kill", lambda: at_rest(leader_status(admins)), 120)
    name = f"n{args.nodes}"
    started = time.monotonic()
    _, admin, _ = sbs.start_node(args.bin, args.nodes, False, work, seed)
    admins = admins + [admin]
    owning = settled = None
    while time.monotonic() - started < 120 and settled is None:
        c = leader_status(admins)
        now = time.monotonic() - started
        if c is not None and (c.get("owned") or {}).get(name, 0) > 0:
            owning = owning if owning is not None else now
            if at_rest(c):
                settled = now
        time.sleep(0.02)
    return owning, settled


def member_loads(admin):
    """Each up member's turns/s as gossip brought them to this node (None: one missing)."""
    loads = {}
    for m in sbs.status(admin)["members"]:
        if m["state"] != "up":
            continue
        rate = (m.get("load") or {}).get("turns_per_s")
        if rate is None:
            return None
        loads[m["name"]] = rate
    return loads


def shards_moved(admins):
    """Load-driven moves decided so far, over every node's `/metrics`."""
    total = 0.0
    for a in admins:
        with urllib.request.urlopen(f"http://127.0.0.1:{a}/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("botclaw_shards_moved_total"):
                    total += float(line.split()[-1])
    return total


def imbalance(rates):
    avg = sum(rates) / len(rates)
    return max(rates) / avg if avg > 0 else None


def skew_run(args, work):
    """A fresh cluster under a skewed load for `--skew-s`: how unbalanced, how many moves,
    when the last, how balanced at the end."""
    clients, admins, _ = sbs.start_cluster(args.bin, args.nodes, False, work, REBALANCE)
    cmd = [args.bin, "bench", "--connections", "4", "--pipeline", "1",
           "--conversations", str(SKEW_CONVERSATIONS), "--skew", str(SKEW_ZIPF),
           "--turns", "1000000000", "--prefix", "fidskew"]
    for c in clients:
        cmd += ["--connect", f"127.0.0.1:{c}"]
    sbs.start(cmd, os.path.join(work, "bench.log"))
    started = time.monotonic()
    polls, last_move, moved = [], None, shards_moved(admins)
    first = moved
    while (now := time.monotonic() - started) < args.skew_s:
        try:
            loads = member_loads(admins[0])
            m = shards_moved(admins)
        except Exception:
            time.sleep(0.5)
            continue
        if loads and len(loads) == args.nodes and imbalance(list(loads.values())):
            polls.append((now, imbalance(list(loads.values())), sum(loads.values())))
        if m != moved:
            moved, last_move = m, now
        time.sleep(0.5)
    sbs.stop_all()
    early = [i for t, i, _ in polls if 2 <= t < 6]
    late = [i for t, i, _ in polls if t >= args.skew_s - 10]
    return {
        "skew_imbalance_start": statistics.median(early) if early else None,
        "skew_imbalance_end": statistics.mean(late) if late else None,
        "skew_moves": moved - first,
        "skew_last_move_s": last_move,
        "skew_turns_per_s": statistics.median(r for t, _, r in polls if t >= 2) if polls else 0,
    }


def real_run(args, work):
    try:
        clients, admins, seed = sbs.start_cluster(args.bin, args.nodes, False, work)
    except SystemExit:
        # Say what each node was waiting for, and keep its log.
        for i in range(args.nodes):
            log = os.path.join(work, f"n{i}", "node.log")
            kept = os.path.join(tempfile.gettempdir(), f"fidelity-n{i}.log")
            if os.path.exists(log):
                shutil.copy(log, kept)
                print(f"n{i}: log kept in {kept}", file=sys.stderr)
        raise
    victim = f"n{args.nodes - 1}"
    survivors = admins[:-1]
    # Steady-state latency and rate, before the kill.
    cmd = [args.bin, "bench", "--json", "--connections", "4", "--pipeline", "1",
           "--conversations", "500", "--turns", str(args.turns), "--prefix", "fid"]
    for c in clients:
        cmd += ["--connect", f"127.0.0.1:{c}"]
    load = json.loads(subprocess.run(cmd, capture_output=True, check=True, timeout=600).stdout)
    lat = load["cluster"]["latency_us"]
    before = owned_by(admins, victim)
    pid = sbs.PROCS[-1].pid
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    detected = reassigned = None
    while time.monotonic() - killed < 60 and (detected is None or reassigned is None):
        now = time.monotonic() - killed
        if detected is None:
            try:
                if all(member_state(a, victim) == "down" for a in survivors):
                    detected = now
            except Exception:
                pass
        if reassigned is None and owned_by(survivors, victim) == 0:
            reassigned = now
        time.sleep(0.02)
    owning, settled = join_run(args, work, seed, survivors)
    sbs.stop_all()
    return {
        "detected_s": detected,
        "reassigned_s": reassigned,
        "join_owning_s": owning,
        "join_settled_s": settled,
        "owned_before": before,
        "p50_ms": lat["p50"] / 1000.0,
        "p99_ms": lat["p99"] / 1000.0,
        "turns_per_s": load["cluster"]["turns_per_s"],
    }


def node_placement(bin_):
    """The `[placement]` section a node runs with by default (the simulator's own defaults
    are smaller, for speed)."""
    env = dict(os.environ, BOTCLAW_SECRET="side-by-side-secret")
    out = subprocess.run([bin_, "node", "--check-config", "--name", "n0"], env=env,
                         capture_output=True, check=True, timeout=60, text=True).stdout
    p = tomllib.loads(out)["placement"]
    return f"[placement]\nshard_count = {p['shard_count']}\nvnodes = {p['vnodes']}\n"


def simulate(args, work, name, turns_per_s, crash, skew=False):
    """Runs a scenario (with the crash, the skewed load, or neither) for every seed; their
    summaries and sample series."""
    scenario = os.path.join(work, f"{name}.toml")
    duration = SKEW_START_S + args.skew_s if skew else KILL_AT_S + JOIN_AFTER_S + 30
    with open(scenario, "w") as f:
        f.write(
            f'name = "{name}"\nnodes = {args.nodes}\nduration_s = {duration}\n'
            f"seed = 1\nsample_ms = 1000\n{node_placement(args.bin)}"
        )
        if skew:
            f.write(
                f"{REBALANCE}[workload]\nstart_s = {SKEW_START_S}\n"
                f"conversations = {SKEW_CONVERSATIONS}\nzipf_s = {SKEW_ZIPF}\n"
                f'prefix = "fidskew"\nturns_per_s = {max(1, round(turns_per_s))}\n'
            )
        else:
            f.write(f"[workload]\nconversations = 500\nturns_per_s = {max(1, round(turns_per_s))}\n")
        if crash:
            f.write(f'[[faults]]\nat_s = {KILL_AT_S}\nkind = "crash"\nnodes = [{args.nodes - 1}]\n')
            f.write(f'[[faults]]\nat_s = {KILL_AT_S + JOIN_AFTER_S}\nkind = "join"\ncount = 1\n')
    out = os.path.join(work, "sim")
    subprocess.run([args.bin, "sim", "--scenario", scenario, "--seeds", str(args.seeds),
                    "--quiet", "--out", out], check=True, capture_output=True, timeout=1800)
    summaries = []
    for seed in range(1, args.seeds + 1):
        d = os.path.join(out, f"{name}-map-seed{seed}")
        with open(os.path.join(d, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(d, "series.csv")) as f:
            summary["series"] = list(csv.DictReader(f))
        summaries.append(summary)
    return summaries


def sim_runs(args, work, turns_per_s, skew_turns_per_s):
    """Per seed: the crash's times from a run with it, the latencies from one without (the
    real latencies are measured before the kill), the skew's from a run with it."""
    crashed = simulate(args, work, "fidelity-crash", turns_per_s, True)
    steady = simulate(args, work, "fidelity-steady", turns_per_s, False)
    skewed = simulate(args, work, "fidelity-skew", skew_turns_per_s, False, skew=True)
    runs = []
    for c, s, k in zip(crashed, steady, skewed):
        early = [float(r["load_max_over_avg"]) for r in k["series"]
                 if SKEW_START_S + 2 < float(r["t_s"]) <= SKEW_START_S + 6]
        last = k["load_moves_last_s"]
        crash = c["crashes"][0] if c["crashes"] else {}
        join = c["joins"][0] if c["joins"] else {}
        runs.append({
            "detected_s": crash.get("detected_s"),
            "reassigned_s": crash.get("reassigned_s"),
            "join_owning_s": join.get("owning_s"),
            "join_settled_s": join.get("settled_s"),
            "p50_ms": s["latency_ms_p50"],
            "p99_ms": s["latency_ms_p99"],
            "skew_imbalance_start": statistics.median(early) if early else None,
            "skew_imbalance_end": k["load_max_over_avg_end"],
            "skew_moves": k["load_moves"],
            "skew_last_move_s": None if last is None else last - SKEW_START_S,
        })
    return runs


def values(runs, key):
    """Every run's figure, or None if a run never got one (a join that never settled)."""
    found = [r[key] for r in runs if r.get(key) is not None]
    return found if found and len(found) == len(runs) else None


def med(runs, key):
    found = values(runs, key)
    return None if found is None else statistics.median(found)


def cell(runs, key, unit):
    """The median, and the range over the runs when there are several."""
    found = values(runs, key)
    if found is None:
        return "never"
    text = fmt(statistics.median(found), unit)
    if len(found) > 1:
        text += f" ({fmt(min(found), unit)} to {fmt(max(found), unit)})"
    return text


def fmt(x, unit):
    if x is None:
        return "never"
    if unit == "s":
        return f"{x:.3f} s"
    if unit == "x":
        return f"{x:.2f}x"
    if unit == "moves":
        return f"{x:.0f} moves"
    return f"{x:.2f} {unit}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/botclaw")
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3, help="real runs")
    ap.add_argument("--seeds", type=int, default=5, help="simulated seeds")
    ap.add_argument("--turns", type=int, default=20_000, help="turns of the latency load")
    ap.add_argument("--skew-s", type=int, default=40, help="seconds of the skewed load")
    ap.add_argument("--json", help="also write every run to this file")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="botclaw-fidelity-")
    try:
        real = [real_run(args, os.path.join(work, f"real{i}")) for i in range(args.runs)]
        for i, r in enumerate(real):
            r.update(skew_run(args, os.path.join(work, f"skew{i}")))
        rate = statistics.median(r["turns_per_s"] for r in real)
        skew_rate = statistics.median(r["skew_turns_per_s"] for r in real)
        sim = sim_runs(args, work, rate, skew_rate)
    finally:
        sbs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(f"`python3 tests/bench/fidelity.py --nodes {args.nodes} --runs {args.runs} --seeds "
          f"{args.seeds}`: {args.nodes} nodes in memory, the last killed with SIGKILL; real: "
          f"{args.runs} runs, simulated (`--model map`, {rate:,.0f} turns/s as measured): "
          f"{args.seeds} seeds; medians (least to most). Skew: Zipf {SKEW_ZIPF} over {SKEW_CONVERSATIONS} "
          f"conversations, {skew_rate:,.0f} turns/s, {args.skew_s} s\n")
    print("| measure | simulated | real | simulated / real |")
    print("|---|---|---|---|")
    for key, what, unit in [
        ("detected_s", "kill to every survivor declaring it down", "s"),
        ("reassigned_s", "kill to the map naming it owner of no shard", "s"),
        ("join_owning_s", "a new node's start to the map naming it owner of a shard", "s"),
        ("join_settled_s", "a new node's start to its moves done and the plan settled", "s"),
        ("p50_ms", "turn latency p50", "ms"),
        ("p99_ms", "turn latency p99", "ms"),
        ("skew_imbalance_start", "skewed load: busiest member over the average, 2-6 s in", "x"),
        ("skew_imbalance_end", "skewed load: busiest member over the average, last 10 s", "x"),
        ("skew_moves", "skewed load: load-driven moves decided", "moves"),
        ("skew_last_move_s", "skewed load: its start to the last move decided", "s"),
    ]:
        s, r = med(sim, key), med(real, key)
        ratio = f"{s / r:.2f}x" if s is not None and r else "-"
        print(f"| {what} | {cell(sim, key, unit)} | {cell(real, key, unit)} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"real": real, "simulated": sim, "turns_per_s": rate}, f, indent=1)


if __name__ == "__main__":
    main()
