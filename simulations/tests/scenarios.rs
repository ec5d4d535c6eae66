//! The simulation harness end to end: shipped scenario files parse, a run is a pure
//! function of scenario and seed (byte-identical reports), faults show in the results, and
//! the checkers catch lost turns when the model really loses them.

use botclaw_sim::scenario::{FaultKind, Scenario};

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
    let dir = format!("{}/scenarios", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
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

/// The rebalancer on a flash crowd: shards move, and the busiest node's share falls.
#[test]
fn the_rebalancer_spreads_a_hot_spot() {
    let mut on = small("hot-spot", 60);
    on.workload.turns_per_s = 1500.0;
    let mut off = on.clone();
    off.rebalance.enabled = false;
    let with = botclaw_sim::run(on, 1, |_| {});
    let without = botclaw_sim::run(off, 1, |_| {});
    assert!(with.shards_moved > 0 && without.shards_moved == 0);
    let late = |r: &botclaw_sim::report::Report| {
        let tail: Vec<f64> =
            r.samples.iter().filter(|s| s.t_s > 45.0).map(|s| s.load_max_over_avg).collect();
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    assert!(
        late(&with) < late(&without),
        "with the rebalancer {:.3}, without {:.3}",
        late(&with),
        late(&without)
    );
}
