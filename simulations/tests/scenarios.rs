//! The simulation harness end to end: shipped scenario files parse, a run is a pure
//! function of scenario and seed (byte-identical reports), faults show in the results, and
//! the checkers catch lost turns when the model really loses them.

use botclaw_sim::scenario::{FaultKind, Scenario, Start};

fn shipped(name: &str) -> Scenario {
    let path = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A shipped scenario, shortened and scaled down for a test.
fn small(name: &str, duration_s: u64) -> Scenario {
    let mut s = shipped(name);
    s.duration_s = duration_s;
    s.workload.turns_per_s = s.workload.turns_per_s.min(800.0);
    s
}

#[test]
fn every_shipped_scenario_parses() {
    let names = shipped_names();
    for name in &names {
        shipped(name);
    }
    for want in [
        "steady",
        "node-crash",
        "rolling-restart",
        "scale-out",
        "hot-spot",
        "minority-partition",
        "packet-loss",
        "churn-1000",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
}

/// The determinism check: the same scenario and seed give byte-identical reports; another
/// seed gives another run.
#[test]
fn same_seed_same_bytes() {
    let mut s = small("packet-loss", 30);
    s.faults[0].at_s = 15.0;
    let a = botclaw_sim::run(s.clone(), 7, |_| {});
    let b = botclaw_sim::run(s.clone(), 7, |_| {});
    assert_eq!(a.to_json(), b.to_json());
    assert_eq!(a.to_csv(), b.to_csv());
    assert_eq!(a.plots(), b.plots());
    assert!(a.turns_acknowledged > 10_000, "{}", a.to_json());
    let c = botclaw_sim::run(s, 8, |_| {});
    assert_ne!(a.to_json(), c.to_json());
}

/// A crash is detected by every node within a few seconds (the node's gossip defaults),
/// clients ride through it by retrying, and with two copies nothing acknowledged is lost.
#[test]
fn a_crash_is_detected_and_loses_nothing_with_two_copies() {
    let mut s = small("node-crash", 35);
    s.rebalance.enabled = false;
    s.faults.retain(|f| matches!(f.kind, FaultKind::Crash { .. }));
    let r = botclaw_sim::run(s, 1, |_| {});
    assert_eq!(r.detection_s.len(), 1, "{}", r.to_json());
    let took = r.detection_s[0];
    assert!((0.5..6.0).contains(&took), "detected after {took} s");
    assert_eq!(r.false_down_declarations, 0);
    assert_eq!(r.turns_lost, 0, "{:?}", r.failures);
    assert!(r.failures.is_empty());
    assert!(r.failed_attempts > 0, "nobody noticed the crash: {}", r.to_json());
    assert!(r.unavailable_conversations > 0);
    // Wall-clock unavailability: about detection plus a retry, however many turns were
    // waiting at once.
    assert!(r.unavailable_s_max < took + 5.0, "{} s unavailable", r.unavailable_s_max);
    assert_eq!(r.nodes_final, 9);
}

/// With one copy per conversation, the crash of its owner leaves the next owner nothing to
/// continue from: the checker reports the lost turns and names them.
#[test]
fn the_checker_catches_turns_lost_with_one_copy() {
    let mut s = small("node-crash", 35);
    s.rebalance.enabled = false;
    s.replication.factor = 1;
    s.replication.write_quorum = 1;
    s.faults.retain(|f| matches!(f.kind, FaultKind::Crash { .. }));
    let r = botclaw_sim::run(s, 1, |_| {});
    assert!(r.turns_lost > 0, "{}", r.to_json());
    assert!(r.failures[0].contains("were acknowledged"), "{}", r.failures[0]);
}

/// `hot-spot` for 60 s at 1500 turns/s, with the rebalancer on and off.
fn hot_spot_on_off() -> (Scenario, Scenario) {
    let mut on = small("hot-spot", 60);
    on.workload.turns_per_s = 1500.0;
    let mut off = on.clone();
    off.rebalance.enabled = false;
    (on, off)
}

/// The mean of the busiest node's share over the samples after 45 s: (time, share).
fn late_balance(samples: impl Iterator<Item = (f64, f64)>) -> f64 {
    let tail: Vec<f64> = samples.filter(|(t, _)| *t > 45.0).map(|(_, b)| b).collect();
    tail.iter().sum::<f64>() / tail.len() as f64
}

/// The rebalancer on a flash crowd: shards move, and the busiest node's share falls.
#[test]
fn the_rebalancer_spreads_a_hot_spot() {
    let (on, off) = hot_spot_on_off();
    let with = botclaw_sim::run(on, 1, |_| {});
    let without = botclaw_sim::run(off, 1, |_| {});
    assert!(with.shards_moved > 0 && without.shards_moved == 0);
    let late = |r: &botclaw_sim::report::Report| {
        late_balance(r.samples.iter().map(|s| (s.t_s, s.load_max_over_avg)))
    };
    assert!(
        late(&with) < late(&without),
        "with the rebalancer {:.3}, without {:.3}",
        late(&with),
        late(&without)
    );
}

/// The same on the controller's map: every node runs the node's load loop (load gossip,
/// the rebalancer's rules), the leader's planner pins the moves its gossip shows, and the
/// flash crowd's conversations land on their shards by name. Shards move, the busiest
/// owner's share falls, nothing is lost.
#[test]
fn by_the_map_the_rebalancer_spreads_a_hot_spot() {
    let (on, off) = hot_spot_on_off();
    let with = botclaw_sim::by_map::run(on, 1, |_| {});
    let without = botclaw_sim::by_map::run(off, 1, |_| {});
    for r in [&with, &without] {
        assert!(r.failures.is_empty() && r.writes_lost == 0, "{}", r.to_json());
    }
    assert!(
        with.load_moves > 0 && without.load_moves == 0,
        "{} {}",
        with.load_moves,
        without.load_moves
    );
    assert!(with.owner_changes > without.owner_changes, "the moves never reached the map");
    let late = |r: &botclaw_sim::by_map::MapReport| {
        late_balance(r.samples.iter().map(|s| (s.t_s, s.load_max_over_avg)))
    };
    eprintln!("by the map, late max/avg: with {:.3}, without {:.3}", late(&with), late(&without));
    assert!(
        late(&with) < late(&without),
        "with the rebalancer {:.3}, without {:.3}",
        late(&with),
        late(&without)
    );
}

/// Every shipped scenario file, by name.
fn shipped_names() -> Vec<String> {
    let dir = format!("{}/scenarios", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `name` run by the controller's map with `seeds`: the checkers stay clean (nothing
/// acknowledged lost, every read saw what was acknowledged before it, logs agree, the
/// map's rules hold after every entry) and the cluster served. churn-1000 is scaled down
/// to 40 nodes for a test (`botclaw sim` runs it whole).
fn clean_by_map(name: &str, seeds: std::ops::Range<u64>) {
    let mut s = shipped(name);
    if s.nodes > 100 {
        s.nodes = 40;
        s.duration_s = 150;
        s.placement.shard_count = 4096;
        s.workload.start_s = 10.0;
        s.workload.turns_per_s = 2000.0;
        for f in &mut s.faults {
            f.at_s = 20.0;
            f.kind = FaultKind::Churn { count: 12, every_s: 5.0, down_s: 20.0 };
        }
    }
    for seed in seeds {
        let r = botclaw_sim::by_map::run(s.clone(), seed, |_| {});
        assert!(r.failures.is_empty(), "{name} seed {seed}: {:#?}", r.failures);
        assert_eq!(r.writes_lost, 0, "{name} seed {seed}");
        assert!(
            r.writes_acknowledged > r.writes_submitted * 8 / 10,
            "{name} seed {seed}: too little served: {}",
            r.to_json()
        );
        eprintln!(
            "{name} seed {seed}: {} of {} acknowledged, {:.0} shard-s unavailable",
            r.writes_acknowledged, r.writes_submitted, r.unavailable_shard_s
        );
    }
}

#[test]
fn every_shipped_scenario_file_is_covered_by_the_map_runs() {
    let covered = [
        "churn-1000",
        "churn-5000",
        "double-crash",
        "flapping-partition",
        "freeze",
        "hot-spot",
        "joins-at-once",
        "leader-crash-mid-join",
        "minority-partition",
        "node-crash",
        "packet-loss",
        "rolling-restart",
        "scale-out",
        "steady",
    ];
    assert_eq!(shipped_names(), covered, "add the new scenario to a by-map test below");
}

#[test]
fn by_the_map_crashes_and_partitions_lose_nothing() {
    for name in ["node-crash", "double-crash", "minority-partition", "flapping-partition"] {
        clean_by_map(name, 1..3);
    }
}

#[test]
fn by_the_map_joins_and_restarts_lose_nothing() {
    for name in ["scale-out", "joins-at-once", "rolling-restart", "leader-crash-mid-join"] {
        clean_by_map(name, 1..3);
    }
}

#[test]
fn by_the_map_freezes_loss_churn_and_load_lose_nothing() {
    for name in ["freeze", "packet-loss", "churn-1000", "churn-5000", "steady", "hot-spot"] {
        clean_by_map(name, 1..3);
    }
}

/// A formed start (`start = "formed"`): from the first sample every node's failure
/// detector sees every node up, and the map needs nothing from the leader's planner (no
/// member to register, no shard to assign or move: the entries are Raft's alone), and
/// clients are served from the start of the workload. The same cluster started together
/// registers each node and moves shards onto it.
#[test]
fn a_formed_cluster_starts_with_every_member_known_and_nothing_to_move() {
    let mut s = shipped("steady");
    s.nodes = 30;
    s.duration_s = 20;
    s.placement.shard_count = 1024;
    s.workload.start_s = 3.0;
    s.faults.clear();
    s.start = Start::Formed;
    let formed = botclaw_sim::by_map::run(s.clone(), 1, |_| {});
    assert!(formed.failures.is_empty(), "{:#?}", formed.failures);
    let first = &formed.samples[0];
    assert_eq!((first.members_up_min, first.members_up_max), (30, 30), "{first:?}");
    let kinds: Vec<&str> = formed.entries_by_kind.keys().copied().collect();
    assert_eq!(kinds, ["raft"], "{:?}", formed.entries_by_kind);
    assert!(formed.samples.iter().all(|x| x.moves_in_flight == 0 && x.unavailable_shards == 0));
    assert!(
        formed.requests_unrouted * 100 < formed.writes_submitted,
        "{} of {} unrouted",
        formed.requests_unrouted,
        formed.writes_submitted
    );
    s.start = Start::Together;
    let together = botclaw_sim::by_map::run(s, 1, |_| {});
    assert!(together.entries_by_kind.get("join").copied().unwrap_or(0) >= 30);
}

/// The ring model starts a formed cluster too: every node holds every other as up at the
/// first sample (joining through one seed, they do not yet), and it serves and loses
/// nothing.
#[test]
fn by_the_ring_a_formed_cluster_knows_every_member_at_once() {
    let mut s = small("steady", 15);
    s.nodes = 30;
    s.sample_ms = 20;
    s.faults.clear();
    s.start = Start::Formed;
    let formed = botclaw_sim::run(s.clone(), 1, |_| {});
    assert!(formed.failures.is_empty(), "{:#?}", formed.failures);
    let first = &formed.samples[0];
    assert_eq!((first.members_up_min, first.members_up_max), (30, 30), "{first:?}");
    assert!(formed.turns_acknowledged > 1_000 && formed.turns_lost == 0, "{}", formed.to_json());
    s.start = Start::Together;
    let together = botclaw_sim::run(s, 1, |_| {});
    let first = &together.samples[0];
    assert!(first.members_up_min < 30, "joining through one seed takes a while: {first:?}");
}

/// Both copies of some shards die: those shards are unavailable (never restarted from
/// nothing) until the nodes return; by the ring the same faults lose turns.
#[test]
fn by_the_map_a_double_crash_is_unavailable_not_lost_where_the_ring_loses() {
    let s = shipped("double-crash");
    let r = botclaw_sim::by_map::run(s.clone(), 1, |_| {});
    assert!(r.failures.is_empty(), "{:#?}", r.failures);
    assert!(r.unavailable_shard_s > 0.0, "no shard lived on exactly the two dead nodes");
    assert_eq!(r.unavailable_shards_end, 0, "the shards came back with their nodes");
    let ring = botclaw_sim::run(s, 1, |_| {});
    assert!(ring.turns_lost > 0 || !ring.failures.is_empty(), "{}", ring.to_json());
}
