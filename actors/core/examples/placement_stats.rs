//! Measures ring placement: shard imbalance (max/avg) and movement on join and leave, over
//! random memberships. Used for the figures in README.
//!
//! cargo run --release -p botclaw-core --example placement_stats -- [SHARDS] [VNODES] [TRIALS]

use botclaw_config::PlacementConfig;
use botclaw_core::placement::{Placement, RingMember};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn main() {
    let args: Vec<u32> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let defaults = PlacementConfig::default();
    let cfg = PlacementConfig {
        shard_count: args.first().copied().unwrap_or(defaults.shard_count),
        vnodes: args.get(1).copied().unwrap_or(defaults.vnodes),
        ..defaults.clone()
    };
    let trials = args.get(2).copied().unwrap_or(20);
    let mut rng = StdRng::seed_from_u64(42);
    println!("shard_count={} vnodes={} trials={trials} per size", cfg.shard_count, cfg.vnodes);
    println!(
        "{:>5} {:>9} {:>9} {:>12} {:>12}",
        "nodes", "imb.p50", "imb.max", "join.max*N", "leave.max*N"
    );
    let mut worst = 0.0f64;
    for n in [1usize, 2, 3, 4, 5, 8, 12, 16, 24, 32, 48, 64] {
        let mut imbalances = Vec::new();
        let (mut join_max, mut leave_max) = (0.0f64, 0.0f64);
        for _ in 0..trials {
            let names: Vec<RingMember> = (0..=n)
                .map(|_| RingMember {
                    name: format!("node-{:08x}", rng.random::<u32>()),
                    capacity: 100,
                })
                .collect();
            let before = Placement::build(&names[..n], &cfg);
            let after = Placement::build(&names, &cfg);
            imbalances.push(before.imbalance());
            let s = f64::from(cfg.shard_count);
            let join = after.moved_shards(&before).len() as f64 / s * (n + 1) as f64;
            join_max = join_max.max(join);
            if n >= 2 {
                let without: Vec<RingMember> = names[1..n].to_vec();
                let left = Placement::build(&without, &cfg);
                let leave = before.moved_shards(&left).len() as f64 / s * n as f64;
                leave_max = leave_max.max(leave);
            }
        }
        imbalances.sort_by(f64::total_cmp);
        let max = *imbalances.last().unwrap();
        worst = worst.max(max);
        println!(
            "{n:>5} {:>9.3} {max:>9.3} {join_max:>12.3} {leave_max:>12.3}",
            imbalances[imbalances.len() / 2]
        );
    }
    println!("worst max/avg: {worst:.3}");
}
