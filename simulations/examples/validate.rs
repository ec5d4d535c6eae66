//! Validation against published results (README, "Simulation: validation"):
//! - SWIM (Das, Gupta, Motivala 2002): time to first detection of a crashed member versus
//!   group size (expected e/(e-1) protocol periods), and dissemination time versus log N;
//! - consistent hashing with V virtual nodes (shard-count std dev about 1/sqrt(V)),
//!   bounded loads (max/avg <= 1 + epsilon), and movement on join/leave (about 1/N).
//!
//! `cargo run --release -p botclaw-sim --example validate [trials] [swim|rings] [sizes]`
//! prints markdown tables (`sizes`: SWIM group sizes, default `8,16,32,64,128`).

use std::net::SocketAddr;

use botclaw_config::{GossipConfig, PlacementConfig, PlacementStrategy};
use botclaw_core::placement::{Placement, RingMember};
use botclaw_core::{Effect, MemberState, NodeId};
use botclaw_sim::net::{NetModel, SimNet};

const SECRET: &[u8] = b"validation-secret";

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 7002))
}

fn id(i: usize) -> NodeId {
    NodeId {
        name: format!("n{i}"),
        gossip: addr(i),
        cluster: SocketAddr::new(addr(i).ip(), 7001),
        client: SocketAddr::new(addr(i).ip(), 7000),
        admin: SocketAddr::new(addr(i).ip(), 7003),
        incarnation: 1,
        bump: 0,
        roles: vec!["conversations".into()],
        capacity: 100,
    }
}

/// One crash in a converged group of `n`: (first detection, all detected), in ms after
/// the crash; "all detected" is 60 000 when some node still had not declared it down then.
fn detection(n: usize, seed: u64, cfg: &GossipConfig) -> Option<(u64, u64)> {
    let mut net = SimNet::with_model(cfg.clone(), NetModel::fixed(1), seed).without_trace();
    for i in 0..n {
        let seeds = if i == 0 { vec![] } else { vec![addr(0)] };
        net.start(id(i), &seeds, SECRET, seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
    }
    // Converged: every node sees all n up (checked every 100 ms, counting without copies).
    let mut converged = None;
    while converged.is_none() && net.now_ms() < 300_000 {
        net.run_until(net.now_ms() + 100);
        let all_up =
            (0..n).all(|i| net.membership(addr(i)).is_some_and(|m| m.count(MemberState::Up) == n));
        converged = all_up.then_some(net.now_ms());
    }
    let converged = converged?;
    // Crash at a point spread over a protocol period.
    net.run_until(converged + 5_000 + seed % cfg.probe_period_ms);
    let victim = 1 + (seed as usize % (n - 1));
    let crashed_at = net.now_ms();
    net.crash(addr(victim));
    net.take_notices();
    let (mut first, mut seen) = (None, 0);
    while net.now_ms() < crashed_at + 60_000 && seen < n - 1 {
        net.run_until(net.now_ms() + 10);
        for notice in net.take_notices() {
            if matches!(&notice.effect, Effect::MemberDown(who) if who.gossip == addr(victim)) {
                first.get_or_insert(notice.at_ms - crashed_at);
                seen += 1;
            }
        }
    }
    Some((first?, net.now_ms() - crashed_at))
}

fn swim(trials: u64, sizes: &[usize]) {
    let cfg = GossipConfig::default();
    let e = std::f64::consts::E;
    println!(
        "SWIM: probe period {} ms, suspicion {} ms, {trials} crashes per size",
        cfg.probe_period_ms, cfg.suspect_to_down_ms
    );
    println!();
    println!("| nodes | first detection, periods (mean) | paper: e/(e-1) | all nodes know, s (mean) | all nodes know, s (max) | log2 N |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for &n in sizes {
        let runs: Vec<(u64, u64)> = (0..trials).filter_map(|t| detection(n, 1 + t, &cfg)).collect();
        let periods: f64 = runs
            .iter()
            .map(|(first, _)| {
                first.saturating_sub(cfg.suspect_to_down_ms) as f64 / cfg.probe_period_ms as f64
            })
            .sum::<f64>()
            / runs.len() as f64;
        let all: f64 =
            runs.iter().map(|(_, all)| *all as f64 / 1000.0).sum::<f64>() / runs.len() as f64;
        let slowest = runs.iter().map(|(_, all)| *all).max().unwrap_or(0) as f64 / 1000.0;
        println!(
            "| {n} | {periods:.2} | {:.2} | {all:.2} | {slowest:.2} | {:.1} |",
            e / (e - 1.0),
            (n as f64).log2()
        );
    }
    println!();
}

fn members(n: usize, salt: u64) -> Vec<RingMember> {
    (0..n).map(|i| RingMember { name: format!("node-{salt}-{i}"), capacity: 100 }).collect()
}

fn cfg(strategy: PlacementStrategy, vnodes: u32, epsilon_permille: u32) -> PlacementConfig {
    PlacementConfig {
        shard_count: 65_536,
        vnodes,
        strategy,
        bound_epsilon_permille: epsilon_permille,
    }
}

fn std_dev_ratio(p: &Placement) -> f64 {
    let counts: Vec<f64> = p.shard_counts().values().map(|&c| f64::from(c)).collect();
    let mean = counts.iter().sum::<f64>() / counts.len() as f64;
    let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / counts.len() as f64;
    var.sqrt() / mean
}

/// Cluster sizes of the placement tables.
const RING_SIZES: [usize; 3] = [10, 100, 1000];

fn rings(trials: u64) {
    println!("Ring with V virtual nodes per node (65536 shards, {trials} random memberships):");
    println!();
    println!("| V | nodes | shard-count std dev / mean | 1/sqrt(V) | max/avg |");
    println!("| --- | --- | --- | --- | --- |");
    for v in [10u32, 100, 1000] {
        for n in RING_SIZES {
            let (mut sd, mut max) = (0.0, 0.0);
            for t in 0..trials {
                let p = Placement::build(&members(n, t), &cfg(PlacementStrategy::Ring, v, 250));
                sd += std_dev_ratio(&p);
                max += p.imbalance();
            }
            let k = trials as f64;
            println!(
                "| {v} | {n} | {:.3} | {:.3} | {:.3} |",
                sd / k,
                1.0 / f64::from(v).sqrt(),
                max / k
            );
        }
    }
    println!();
    println!("Bounded loads (V = 100), max/avg against 1 + epsilon:");
    println!();
    println!("| epsilon | nodes | max/avg (worst of {trials}) | bound |");
    println!("| --- | --- | --- | --- |");
    for eps in [100u32, 250, 500] {
        for n in RING_SIZES {
            let worst = (0..trials)
                .map(|t| {
                    Placement::build(&members(n, t), &cfg(PlacementStrategy::Bounded, 100, eps))
                        .imbalance()
                })
                .fold(0.0, f64::max);
            println!(
                "| {:.2} | {n} | {worst:.3} | {:.2} |",
                f64::from(eps) / 1000.0,
                1.0 + f64::from(eps) / 1000.0
            );
        }
    }
    println!();
    println!(
        "Shards moved by one join and one leave, as a multiple of 1/N (V = 100, mean of {trials}):"
    );
    println!();
    println!("| strategy | nodes | join | leave |");
    println!("| --- | --- | --- | --- |");
    for (name, strategy) in [
        ("ring", PlacementStrategy::Ring),
        ("bounded (eps 0.25)", PlacementStrategy::Bounded),
        ("rendezvous", PlacementStrategy::Rendezvous),
    ] {
        for n in RING_SIZES {
            let (mut join, mut leave) = (0.0, 0.0);
            for t in 0..trials {
                let c = cfg(strategy, 100, 250);
                let all = members(n + 1, t);
                let before = Placement::build(&all[..n], &c);
                let after = Placement::build(&all, &c);
                join += after.moved_shards(&before).len() as f64 / (65_536.0 / (n + 1) as f64);
                let fewer: Vec<RingMember> = all[..n].iter().skip(1).cloned().collect();
                let left = Placement::build(&fewer, &c);
                leave += left.moved_shards(&before).len() as f64 / (65_536.0 / n as f64);
            }
            let k = trials as f64;
            println!("| {name} | {n} | {:.2} | {:.2} |", join / k, leave / k);
        }
    }
    println!();
}

fn main() {
    let trials: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let only = std::env::args().nth(2);
    // Group sizes for the SWIM table, e.g. `8,64,256`.
    let sizes: Vec<usize> = std::env::args()
        .nth(3)
        .map(|a| a.split(',').filter_map(|n| n.trim().parse().ok()).filter(|n| *n >= 2).collect())
        .unwrap_or_else(|| vec![8, 16, 32, 64, 128]);
    if only.as_deref() != Some("rings") {
        swim(trials, &sizes);
    }
    if only.as_deref() != Some("swim") {
        rings(trials);
    }
}
