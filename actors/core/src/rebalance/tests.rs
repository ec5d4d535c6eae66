use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proptest::prelude::*;
use serde::Deserialize;

use super::*;
use crate::load::LoadSummary;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    description: String,
    me: String,
    #[serde(default)]
    config: RebalanceConfig,
    nodes: Vec<NodeLoad>,
    #[serde(default)]
    shards: Vec<ShardLoad>,
    #[serde(default)]
    expect: Vec<Move>,
}

/// Every file in `cases/` is a table of loads and the moves expected from it.
#[test]
fn decisions_match_the_case_tables() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/rebalance/cases");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 4, "cases missing in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let case: Case =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let got = decide(&case.config, &case.me, &case.nodes, &case.shards, |_| false);
        assert_eq!(got, case.expect, "{}: {}", file.display(), case.description);
    }
}

fn node(name: &str, load: f64) -> NodeLoad {
    NodeLoad { name: name.into(), load, capacity: 100, moved_in: 0 }
}

#[test]
fn a_moved_shard_cools_down() {
    let mut r = Rebalancer::new(RebalanceConfig { cooldown_rounds: 3, ..Default::default() });
    let nodes = [node("a", 500.0), node("b", 100.0)];
    let mine = [ShardLoad { shard: 1, rate: 50.0 }];
    assert_eq!(r.decide("a", &nodes, &mine).len(), 1);
    // Still overloaded (the loads did not change): the shard may not move again yet.
    assert!(r.decide("a", &nodes, &mine).is_empty());
    assert!(r.decide("a", &nodes, &mine).is_empty());
    assert_eq!(r.decide("a", &nodes, &mine).len(), 1, "cooldown over after 3 rounds");
}

#[test]
fn a_placement_change_holds_decisions_for_the_cooldown() {
    let mut r = Rebalancer::new(RebalanceConfig { cooldown_rounds: 3, ..Default::default() });
    let nodes = [node("a", 500.0), node("b", 0.0)];
    let mine = [ShardLoad { shard: 1, rate: 50.0 }];
    r.hold();
    assert!(r.decide("a", &nodes, &mine).is_empty());
    assert!(r.decide("a", &nodes, &mine).is_empty());
    assert_eq!(r.decide("a", &nodes, &mine).len(), 1, "held for 3 rounds from the change");
}

#[test]
fn a_node_waits_for_its_moves_to_show_before_moving_again() {
    let cfg = RebalanceConfig { cooldown_rounds: 3, moves_per_round_max: 1, ..Default::default() };
    let mut r = Rebalancer::new(cfg);
    // The loads do not reflect the first move yet (they lag): no second move until the
    // cooldown is over, although another shard could go.
    let nodes = [node("a", 500.0), node("b", 100.0)];
    let mine = [ShardLoad { shard: 1, rate: 50.0 }, ShardLoad { shard: 2, rate: 40.0 }];
    assert_eq!(r.decide("a", &nodes, &mine), vec![Move { shard: 1, to: "b".into() }]);
    assert!(r.decide("a", &nodes, &mine).is_empty());
    assert!(r.decide("a", &nodes, &mine).is_empty());
    assert_eq!(r.decide("a", &nodes, &mine), vec![Move { shard: 1, to: "b".into() }]);
}

/// Three nodes, 300 shards with skewed rates, every node deciding every round and moves
/// applied at once: the imbalance falls under the trigger, the moves stop, nothing moves
/// back and forth.
#[test]
fn constant_load_converges_without_oscillation() {
    let names = ["a", "b", "c"];
    let mut owner: BTreeMap<ShardId, usize> = BTreeMap::new();
    let mut rate: BTreeMap<ShardId, f64> = BTreeMap::new();
    for s in 0..300u32 {
        // Node a starts with the hot half of the traffic.
        owner.insert(s, if s < 60 { 0 } else { (s % 3) as usize });
        rate.insert(s, if s < 60 { 20.0 + f64::from(s % 7) } else { 3.0 });
    }
    let mut rebalancers: Vec<Rebalancer> =
        (0..3).map(|_| Rebalancer::new(RebalanceConfig::default())).collect();
    let loads = |owner: &BTreeMap<ShardId, usize>| -> Vec<NodeLoad> {
        (0..3)
            .map(|i| {
                node(names[i], owner.iter().filter(|(_, o)| **o == i).map(|(s, _)| rate[s]).sum())
            })
            .collect()
    };
    let before = imbalance(&loads(&owner));
    assert!(before > 1.5, "the scenario starts skewed: {before}");
    let mut history: BTreeMap<ShardId, Vec<usize>> = BTreeMap::new();
    let mut quiet_rounds = 0;
    for _round in 0..100 {
        let nodes = loads(&owner);
        let mut all = Vec::new();
        for (i, r) in rebalancers.iter_mut().enumerate() {
            let mine: Vec<ShardLoad> = owner
                .iter()
                .filter(|(_, o)| **o == i)
                .map(|(s, _)| ShardLoad { shard: *s, rate: rate[s] })
                .collect();
            all.extend(r.decide(names[i], &nodes, &mine));
        }
        let shards: BTreeSet<ShardId> = all.iter().map(|m| m.shard).collect();
        assert_eq!(shards.len(), all.len(), "one decision per shard");
        if all.is_empty() {
            quiet_rounds += 1;
        }
        for m in all {
            let to = names.iter().position(|n| *n == m.to).unwrap();
            owner.insert(m.shard, to);
            history.entry(m.shard).or_default().push(to);
        }
    }
    let after = imbalance(&loads(&owner));
    assert!(after <= 1.15, "imbalance {before:.2} -> {after:.2}");
    assert!(quiet_rounds >= 90, "moves did not stop: {quiet_rounds} quiet rounds of 100");
    assert!(history.values().all(|h| h.len() == 1), "a shard moved twice: {history:?}");
}

/// Nodes `n0..` with the given (load, moved_in) and shards `0..` with the given rates.
fn inputs(loads: &[(f64, usize)], rates: &[f64]) -> (Vec<NodeLoad>, Vec<ShardLoad>) {
    let nodes = loads
        .iter()
        .enumerate()
        .map(|(i, (l, moved_in))| NodeLoad { moved_in: *moved_in, ..node(&format!("n{i}"), *l) })
        .collect();
    let mine =
        rates.iter().enumerate().map(|(i, r)| ShardLoad { shard: i as u32, rate: *r }).collect();
    (nodes, mine)
}

proptest! {
    #[test]
    fn decisions_respect_the_bounds(
        loads in proptest::collection::vec((0.0f64..1000.0, 0usize..30), 2..8),
        rates in proptest::collection::vec(0.0f64..200.0, 0..40),
    ) {
        let cfg = RebalanceConfig { moves_per_target_max: 24, ..Default::default() };
        let (nodes, mine) = inputs(&loads, &rates);
        let moves = decide(&cfg, "n0", &nodes, &mine, |_| false);
        let avg = average(&nodes);
        if nodes[0].load <= cfg.overload_ratio * avg * 100.0 {
            prop_assert!(moves.is_empty(), "a node that is not overloaded moved shards");
        }
        prop_assert!(moves.len() <= cfg.moves_per_round_max);
        let moved: f64 = moves.iter().map(|m| rates[m.shard as usize]).sum();
        prop_assert!(moved <= (nodes[0].load - cfg.target_ratio * avg * 100.0).max(0.0) + 1e-9);
        for n in &nodes[1..] {
            let got: f64 = moves.iter().filter(|m| m.to == n.name).map(|m| rates[m.shard as usize]).sum();
            if got > 0.0 {
                prop_assert!(n.load + got <= cfg.target_ratio * avg * 100.0 + 1e-9, "receiver pushed over the target");
            }
            let count = moves.iter().filter(|m| m.to == n.name).count();
            prop_assert!(n.moved_in + count <= cfg.moves_per_target_max.max(n.moved_in), "receiver given more moved shards than it can vouch for");
        }
    }
}

#[test]
fn move_tables_merge_to_the_newest_record_whatever_the_order() {
    let a = MoveRecord { shard: 1, to: "b".into(), version: (1, 5) };
    let b = MoveRecord { shard: 1, to: "c".into(), version: (2, 1) };
    let c = MoveRecord { shard: 2, to: "a".into(), version: (1, 1) };
    let one = MoveTable::merge([&a, &b, &c]);
    let other = MoveTable::merge([&c, &b, &a]);
    assert_eq!(one, other);
    assert_eq!(one.target(1), Some("c"));
    assert_eq!(one.target(2), Some("a"));
    assert_eq!(one.target(3), None);
    let next = one.next_record(1, "a", "c");
    assert!(next.version > b.version);
    let mut pruned = one.clone();
    pruned.retain_targets(|n| n != "c");
    assert_eq!((pruned.target(1), pruned.len()), (None, 1));
}

proptest! {
    /// Every overloaded node decides in the same round from the same loads: together their
    /// moves never push a receiver over the target, nor give it more moved shards than it
    /// can vouch for.
    #[test]
    fn overloaded_nodes_deciding_at_once_do_not_overfill_a_receiver(
        loads in proptest::collection::vec((0.0f64..1000.0, 0usize..30), 2..8),
        rates in proptest::collection::vec(0.0f64..200.0, 0..40),
    ) {
        let cfg = RebalanceConfig { moves_per_target_max: 24, ..Default::default() };
        let (nodes, mine) = inputs(&loads, &rates);
        let avg = average(&nodes);
        let mut got: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for giver in &nodes {
            for m in decide(&cfg, &giver.name, &nodes, &mine, |_| false) {
                let e = got.entry(m.to).or_default();
                e.0 += rates[m.shard as usize];
                e.1 += 1;
            }
        }
        for n in &nodes {
            let Some((load, count)) = got.get(&n.name) else { continue };
            prop_assert!(n.load + load <= cfg.target_ratio * avg * 100.0 + 1e-6, "{} pushed over the target", n.name);
            prop_assert!(n.moved_in + count <= cfg.moves_per_target_max.max(n.moved_in));
        }
    }
}

/// The case the join test met: three nodes equally overloaded and a newcomer with no load
/// yet. Each fills a third of the newcomer's room and of the moved shards it can vouch
/// for (each alone would have moved 12 shards: 36 in all, over the newcomer's 24).
#[test]
fn three_hot_nodes_share_one_cold_newcomer() {
    let cfg = RebalanceConfig::default();
    let nodes = [node("a", 300.0), node("b", 300.0), node("c", 300.0), node("d", 0.0)];
    let mine: Vec<ShardLoad> = (0..40).map(|i| ShardLoad { shard: i, rate: 5.0 }).collect();
    let each: Vec<usize> =
        ["a", "b", "c"].iter().map(|me| decide(&cfg, me, &nodes, &mine, |_| false).len()).collect();
    assert_eq!(cfg.moves_per_target_max, 24);
    assert_eq!(each, vec![8, 8, 8]);
    // A lone hot node is bounded by its excess and moves_per_round_max only.
    let alone = decide(&cfg, "a", &[node("a", 300.0), node("d", 0.0)], &mine, |_| false);
    assert_eq!(alone.len(), 16);
}

/// A load loop over one node `a` that carries most of a three-node cluster's load; each
/// period gives the same loads. Returns the moves decided per period.
fn run_rounds(
    rounds: &mut LoadRounds,
    periods: std::ops::Range<u64>,
    nodes: impl Fn(u64) -> Vec<NodeLoad>,
    moving: impl Fn(u64) -> bool,
) -> Vec<(u64, Vec<MoveRecord>)> {
    let hot: Vec<(ShardId, f32)> = (0..16).map(|s| (s, 100.0 - s as f32)).collect();
    let loads = BTreeMap::new();
    let table = MoveTable::default();
    periods
        .map(|k| {
            let nodes = nodes(k);
            let d = rounds.period(Period {
                now_ms: k * LOAD_PERIOD_MS,
                turns_per_s: nodes[0].load as f32,
                hot: &hot,
                nodes: &nodes,
                moving: moving(k),
                loads: &loads,
                moves: &table,
                active: 0,
                inflight: 0,
                modules: &[],
            });
            (k, d.moves)
        })
        .collect()
}

fn rounds_config() -> botclaw_config::RebalanceConfig {
    botclaw_config::RebalanceConfig {
        interval_ms: 2000,
        cooldown_rounds: 3,
        min_turns_per_s: 10,
        ..Default::default()
    }
}

fn skewed(_: u64) -> Vec<NodeLoad> {
    vec![node("a", 900.0), node("b", 100.0), node("c", 100.0)]
}

#[test]
fn the_load_loop_decides_at_rounds_only_after_two_overloaded_rounds() {
    let mut rounds = LoadRounds::new("a", 1, &rounds_config());
    let decided: Vec<u64> = run_rounds(&mut rounds, 1..40, skewed, |_| false)
        .into_iter()
        .filter(|(_, m)| !m.is_empty())
        .map(|(k, _)| k)
        .collect();
    // Rounds every 2nd period. The first round (period 2) sees the members for the first
    // time, a placement change: it holds for the cooldown, that round and the next two;
    // the fourth decides (period 8). After moves, the rebalancer waits its cooldown (3
    // rounds) and decides again.
    assert_eq!(decided.first(), Some(&8), "decided at periods {decided:?}");
    assert!(decided.iter().all(|k| k % 2 == 0), "decided off a round: {decided:?}");
    assert!(
        decided.windows(2).all(|w| w[1] - w[0] >= 6),
        "decided again within the cooldown: {decided:?}"
    );
    // Off: nothing, ever.
    let off = botclaw_config::RebalanceConfig { enabled: false, ..rounds_config() };
    let mut rounds = LoadRounds::new("a", 1, &off);
    assert!(run_rounds(&mut rounds, 1..40, skewed, |_| false).iter().all(|(_, m)| m.is_empty()));
    // Overloaded at every other round only: never two rounds in a row, never a decision.
    let alternating = |k: u64| {
        if (k / 2) % 2 == 1 {
            skewed(k)
        } else {
            vec![node("a", 100.0), node("b", 100.0), node("c", 100.0)]
        }
    };
    let mut rounds = LoadRounds::new("a", 1, &rounds_config());
    assert!(run_rounds(&mut rounds, 1..40, alternating, |_| false)
        .iter()
        .all(|(_, m)| m.is_empty()));
    // A quiet cluster (under min_turns_per_s on average): nothing, ever.
    let quiet = botclaw_config::RebalanceConfig { min_turns_per_s: 1000, ..rounds_config() };
    let mut rounds = LoadRounds::new("a", 1, &quiet);
    assert!(run_rounds(&mut rounds, 1..40, skewed, |_| false).iter().all(|(_, m)| m.is_empty()));
}

#[test]
fn the_load_loop_holds_while_the_placement_changes() {
    // Shards moving until period 20, then a member joins at 30: no decision while moving,
    // nor in the rounds the last hold covers (the rounds at 18 and 20; at 30 and 32).
    let mut rounds = LoadRounds::new("a", 1, &rounds_config());
    let nodes = |k: u64| {
        let mut n = skewed(k);
        if k >= 30 {
            n.push(node("d", 0.0));
        }
        n
    };
    let decided: Vec<u64> = run_rounds(&mut rounds, 1..60, nodes, |k| k < 20)
        .into_iter()
        .filter(|(_, m)| !m.is_empty())
        .map(|(k, _)| k)
        .collect();
    assert_eq!(decided.first(), Some(&22), "decided while moving: {decided:?}");
    assert!(decided.iter().all(|&k| !(30..34).contains(&k)), "decided after a join: {decided:?}");
    assert!(decided.iter().any(|&k| k >= 34), "never decided after the join: {decided:?}");
}

#[test]
fn the_load_loop_vouches_for_its_moves_until_their_target_does() {
    let mut rounds = LoadRounds::new("a", 7, &rounds_config());
    let decided = run_rounds(&mut rounds, 1..9, skewed, |_| false);
    let fresh: Vec<MoveRecord> = decided.into_iter().flat_map(|(_, m)| m).collect();
    assert!(!fresh.is_empty(), "no move decided");
    let nodes = skewed(0);
    let hot = [(1, 5.0)];
    let period = |rounds: &mut LoadRounds, k: u64, loads: &BTreeMap<String, LoadSummary>| {
        rounds.period(Period {
            now_ms: k * LOAD_PERIOD_MS,
            turns_per_s: 900.0,
            hot: &hot,
            nodes: &nodes,
            moving: false,
            loads,
            moves: &MoveTable::default(),
            active: 3,
            inflight: 1,
            modules: &[],
        })
    };
    // Not yet adopted: vouched for, in the summary, with this node's identity.
    let d = period(&mut rounds, 9, &BTreeMap::new());
    assert_eq!(d.summary.moves, fresh);
    assert_eq!((d.summary.node.as_str(), d.summary.incarnation, d.summary.seq), ("a", 7, 9));
    assert_eq!((d.summary.active, d.summary.inflight, d.summary.hot.clone()), (3, 1, hot.to_vec()));
    // Its target vouches for the first: this node stops; the rest it keeps.
    let target = fresh[0].to.clone();
    let mut loads = BTreeMap::new();
    loads.insert(
        target.clone(),
        LoadSummary {
            node: target,
            incarnation: 1,
            seq: 1,
            turns_per_s: 0.0,
            active: 0,
            inflight: 0,
            hot: vec![],
            moves: vec![fresh[0].clone()],
            modules: vec![],
        },
    );
    let d = period(&mut rounds, 10, &loads);
    assert_eq!(d.summary.moves, fresh[1..].to_vec());
    // Nobody adopts the rest: dropped after DECIDED_MOVES_KEPT_MS.
    let late = DECIDED_MOVES_KEPT_MS / LOAD_PERIOD_MS + 9;
    let d = period(&mut rounds, late, &BTreeMap::new());
    assert!(d.summary.moves.is_empty(), "still vouched for: {:?}", d.summary.moves);
    // As a target, it vouches for the moves in force that name it, and only those.
    let to_me = MoveRecord { shard: 9, to: "a".into(), version: (1, 1) };
    let to_b = MoveRecord { shard: 10, to: "b".into(), version: (1, 1) };
    let d = rounds.period(Period {
        now_ms: (late + 1) * LOAD_PERIOD_MS,
        turns_per_s: 900.0,
        hot: &hot,
        nodes: &nodes,
        moving: false,
        loads: &BTreeMap::new(),
        moves: &MoveTable::merge([&to_me, &to_b]),
        active: 0,
        inflight: 0,
        modules: &[],
    });
    assert_eq!(d.summary.moves, vec![to_me]);
}
