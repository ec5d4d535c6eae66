//! Failover benchmark on real processes (a benchmark, not a test): the same scenarios by
//! the controller's map (the default) and by the ring (`[controller] authoritative = false`),
//! 3 nodes on fjall, every node a gateway.
//!
//! Per run and mode:
//! - throughput: `botclaw bench` (20 connections, pipeline 8, 2000 conversations) and
//!   single-connection latency (1 connection, pipeline 1);
//! - kill -9 of a node that is not the controller's leader under a load of 90
//!   conversations: the longest wait of any conversation between two acknowledged turns,
//!   against the failure detector's time to declare the node down;
//! - kill -9 of the controller's leader, the same;
//! - a 4th node joining under load: the time until the map settled (every shard moved,
//!   full replica sets; by the map only) and the longest wait of a conversation.
//!
//! Every run checks the histories afterwards (nothing acknowledged lost, duplicated or
//! renumbered) and reports problems. Prints one line per run and the medians and maxima.
//!
//! ```text
//! cargo build --release -p botclaw
//! BOTCLAW_BIN=target/release/botclaw cargo run --release -p botclaw-tests \
//!     --example failover_bench -- 5
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use botclaw_tests::checker::{check, pause, runtime, start_load};
use botclaw_tests::*;

const BY_RING: &str = "[controller]\nauthoritative = false\n";

#[derive(Debug, Default)]
struct Run {
    turns_per_s: f64,
    p50_1conn_us: f64,
    kill_detect_ms: f64,
    kill_gap_ms: f64,
    leader_detect_ms: f64,
    leader_gap_ms: f64,
    join_settle_ms: Option<f64>,
    join_gap_ms: f64,
    problems: usize,
}

fn bench(c: &Cluster, connections: &str, pipeline: &str, turns: &str) -> serde_json::Value {
    let mut cmd = Command::new(botclaw_bin());
    cmd.args(["bench", "--json", "--connections", connections, "--pipeline", pipeline]);
    cmd.args(["--conversations", "2000", "--turns", turns, "--prefix", &format!("b{pipeline}")]);
    for n in &c.nodes {
        cmd.args(["--connect", &n.ports.client.to_string()]);
    }
    let out = cmd.output().expect("running botclaw bench");
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("bench prints JSON")
}

fn cluster(config: Option<&str>) -> Cluster {
    let mut c = Cluster::new(3);
    if let Some(config) = config {
        c = c.with_config(config);
    }
    c.start_all();
    c.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    if config.is_some() {
        c.wait_placed(&[0, 1, 2], Duration::from_secs(60));
    }
    c
}

/// The controller's leader, once node 0 knows it.
fn leader(c: &Cluster) -> Option<usize> {
    poll(Duration::from_secs(30), || {
        let name = c.nodes[0].status()?["controller"]["leader"].as_str()?.to_string();
        c.nodes.iter().position(|n| n.name == name)
    })
}

/// Kills `victim` under load; (detection ms, longest gap ms, history problems).
fn kill_under_load(c: &mut Cluster, victim: usize, prefix: &str) -> (f64, f64, usize) {
    let rt = runtime();
    let live: Vec<usize> = (0..c.nodes.len()).filter(|&i| i != victim).collect();
    let clients: Vec<_> = c.nodes.iter().map(|n| n.ports.client).collect();
    let convs = (0..90).map(|k| format!("{prefix}-{k}")).collect();
    let load = start_load(&rt, clients.clone(), convs);
    pause(&rt, Duration::from_secs(2));
    let killed = Instant::now();
    let name = c.nodes[victim].name.clone();
    c.nodes[victim].kill9();
    let detect = c.wait_seen_as(&live, &name, "down", killed, Duration::from_secs(15));
    pause(&rt, Duration::from_secs(5));
    let report = load.finish(&rt);
    let seeds: Vec<_> = live.iter().map(|&i| c.nodes[i].ports.client).collect();
    let problems = rt.block_on(check(&seeds, &report));
    for p in &problems {
        eprintln!("PROBLEM: {p}");
    }
    (detect.as_secs_f64() * 1e3, report.longest_gap().0.as_secs_f64() * 1e3, problems.len())
}

fn one_run(config: Option<&str>, run: usize) -> Run {
    let by_map = config.is_none();
    let mut r = Run::default();
    {
        let c = cluster(config);
        r.turns_per_s = bench(&c, "20", "8", "100000")["cluster"]["turns_per_s"].as_f64().unwrap();
        r.p50_1conn_us =
            bench(&c, "1", "1", "5000")["cluster"]["latency_us"]["p50"].as_f64().unwrap();
    }
    {
        let mut c = cluster(config);
        let l = leader(&c).unwrap_or(0);
        let victim = (l + 1) % 3;
        let (d, g, p) = kill_under_load(&mut c, victim, &format!("kill{run}"));
        (r.kill_detect_ms, r.kill_gap_ms, r.problems) = (d, g, r.problems + p);
    }
    {
        let mut c = cluster(config);
        let l = leader(&c).expect("a controller leader");
        let (d, g, p) = kill_under_load(&mut c, l, &format!("leader{run}"));
        (r.leader_detect_ms, r.leader_gap_ms, r.problems) = (d, g, r.problems + p);
    }
    {
        let mut c = cluster(config);
        let rt = runtime();
        let clients: Vec<_> = c.nodes.iter().map(|n| n.ports.client).collect();
        let convs = (0..90).map(|k| format!("join{run}-{k}")).collect();
        let load = start_load(&rt, clients.clone(), convs);
        pause(&rt, Duration::from_secs(2));
        let i = c.add_node(SECRET);
        c.nodes[i].config = config.map(String::from);
        let started = Instant::now();
        c.nodes[i].start();
        c.wait_converged(&[0, 1, 2, 3], Duration::from_secs(60));
        if by_map {
            c.wait_placed(&[0, 1, 2, 3], Duration::from_secs(300));
            r.join_settle_ms = Some(started.elapsed().as_secs_f64() * 1e3);
        } else {
            pause(&rt, Duration::from_secs(5));
        }
        let report = load.finish(&rt);
        r.join_gap_ms = report.longest_gap().0.as_secs_f64() * 1e3;
        let problems = rt.block_on(check(&clients, &report));
        for p in &problems {
            eprintln!("PROBLEM: {p}");
        }
        r.problems += problems.len();
    }
    r
}

fn median_max(values: &[f64]) -> String {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => "-".into(),
        n => format!("{:.0} / {:.0}", v[n / 2], v[n - 1]),
    }
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let mut all: Vec<(&str, Vec<Run>)> = vec![("ring", Vec::new()), ("map", Vec::new())];
    for run in 0..runs {
        // Alternate the modes so both see the same machine conditions.
        for (mode, results) in &mut all {
            let config = (*mode == "ring").then_some(BY_RING);
            let r = one_run(config, run);
            println!("{mode} run {run}: {r:?}");
            results.push(r);
        }
    }
    println!("\nmedian / max over {runs} runs (ms unless noted)");
    println!("| measure | by the ring | by the map |");
    println!("| --- | --- | --- |");
    type Field = fn(&Run) -> Option<f64>;
    let rows: [(&str, Field); 8] = [
        ("turns/s (20 connections, pipeline 8)", |r| Some(r.turns_per_s)),
        ("p50 of 1 connection, us", |r| Some(r.p50_1conn_us)),
        ("kill -9: declared down", |r| Some(r.kill_detect_ms)),
        ("kill -9: longest wait of a conversation", |r| Some(r.kill_gap_ms)),
        ("leader kill -9: declared down", |r| Some(r.leader_detect_ms)),
        ("leader kill -9: longest wait", |r| Some(r.leader_gap_ms)),
        ("join: map settled", |r| r.join_settle_ms),
        ("join: longest wait", |r| Some(r.join_gap_ms)),
    ];
    for (name, f) in rows {
        let cells: Vec<String> = all
            .iter()
            .map(|(_, rs)| median_max(&rs.iter().filter_map(f).collect::<Vec<_>>()))
            .collect();
        println!("| {name} | {} | {} |", cells[0], cells[1]);
    }
    let problems: usize = all.iter().flat_map(|(_, rs)| rs).map(|r| r.problems).sum();
    println!("\nhistory problems: {problems}");
}
