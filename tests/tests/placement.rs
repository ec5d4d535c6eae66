//! Multi-process: the placement controller on real nodes. Every node applies the same map;
//! the leader assigns every shard, follows deaths and restarts, and keeps three voters; the
//! operator surface (`/status`, `/placement`, `botclaw placement`, `botclaw shard force`)
//! reads and steers it.

use std::process::Command;
use std::time::Duration;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use botclaw_tests::checker::{assert_consistent, pause, run_load_on, runtime, start_load_with};
use botclaw_tests::*;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_secs(30);

fn controller(node: &TestNode) -> Option<Value> {
    node.status().map(|s| s["controller"].clone())
}

/// Waits until every running node of `which` reports the same leader and map version,
/// with `check` true on that status; returns the leader's status.
fn wait_agreed(c: &Cluster, which: &[usize], what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let agreed = poll(SETTLE, || {
        let all: Vec<Value> =
            which.iter().map(|&i| controller(&c.nodes[i])).collect::<Option<_>>()?;
        let first = &all[0];
        let same = all
            .iter()
            .all(|s| s["leader"] == first["leader"] && s["map_version"] == first["map_version"]);
        (same && first["leader"].is_string() && check(first)).then(|| first.clone())
    });
    agreed.unwrap_or_else(|| {
        let now: Vec<Option<Value>> = which.iter().map(|&i| controller(&c.nodes[i])).collect();
        panic!("{what}: the nodes did not agree: {now:#?}\n{}", c.logs())
    })
}

fn names(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn node_index(c: &Cluster, name: &str) -> usize {
    c.nodes.iter().position(|n| n.name == name).expect("a node of this cluster")
}

#[test]
fn the_controller_assigns_every_shard_follows_deaths_and_outlives_its_leader() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    // n0 (started without seeds) founds the group; the leader makes n1 and n2 voters and
    // assigns every shard.
    let status = wait_agreed(&c, &[0, 1, 2], "start", |s| {
        s["shards_unassigned"] == 0 && names(&s["voters"]).len() == 3
    });
    assert_eq!(names(&status["voters"]), ["n0", "n1", "n2"]);
    assert_eq!(status["shards_unavailable"], 0);
    assert_eq!(status["shards_under_replicated"], 0, "{status:#}");

    // Every node answers the same placement for a conversation, from the map.
    let placements: Vec<Value> = c
        .nodes
        .iter()
        .map(|n| get_json(n.ports.admin, "/placement?conv=alice").expect("placement"))
        .collect();
    for p in &placements {
        for key in ["shard", "epoch", "owner", "isr", "map_version"] {
            assert_eq!(p[key], placements[0][key], "{key}: {placements:#?}");
        }
    }
    let p = &placements[0];
    assert_eq!(p["state"], "served");
    assert_eq!(names(&p["isr"]).len(), 2, "R = 2: {p:#}");
    assert!(names(&p["isr"]).contains(&p["owner"].as_str().unwrap().to_string()));
    assert_eq!(names(&p["desired"]), names(&p["isr"]), "{p:#}");
    let (code, _) = http_get(c.nodes[0].ports.admin, "/placement").unwrap();
    assert_eq!(code, 400, "conv is required");

    // The CLI prints the same.
    let out = Command::new(botclaw_bin())
        .args(["placement", "--admin", &c.nodes[1].ports.admin.to_string(), "--conv", "alice"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("shard {}", p["shard"])), "{text}");
    assert!(text.contains(&format!("owner {}", p["owner"].as_str().unwrap())), "{text}");
    assert!(text.contains("% around the ring), conversation hash 0x"), "{text}");
    // No turn has run in it: the owner has no live actor for it.
    assert!(text.contains("recent turns: none live on n"), "{text}");

    // The leader is killed: another takes over, the map marks it dead, and no shard is
    // owned by it or left without an owner (each had a second in-sync member).
    let leader = status["leader"].as_str().unwrap().to_string();
    let l = node_index(&c, &leader);
    let before = status["map_version"].as_u64().unwrap();
    c.nodes[l].kill9();
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let status = wait_agreed(&c, &rest, "leader killed", |s| {
        s["leader"] != leader.as_str() && s["map_version"].as_u64() > Some(before)
    });
    assert_eq!(status["shards_unavailable"], 0, "{status:#}");
    let owner_now = poll(SETTLE, || {
        let p = get_json(c.nodes[rest[0]].ports.admin, "/placement?conv=alice")?;
        (p["owner"] != leader.as_str() && p["owner"].is_string()).then_some(p)
    });
    assert!(owner_now.is_some(), "alice still owned by the dead leader\n{}", c.logs());
    let metrics = c.nodes[rest[0]].metrics();
    assert!(metric(&metrics, "botclaw_controller_map_version") > before as f64);
    // The map holds the three names (the dead one's too) of the 16,384 it can; none is
    // left out.
    assert_eq!(metric(&metrics, "botclaw_controller_map_members"), 3.0);
    assert_eq!(metric(&metrics, "botclaw_controller_map_members_max"), 16_384.0);
    assert_eq!(metric(&metrics, "botclaw_controller_members_unregistered"), 0.0);
    assert_eq!(status["map_members"], 3, "{status:#}");

    // Restarted with its original command (n0 had no seeds: it must not found a new
    // group), it comes back from its log, rejoins the map and agrees with the others.
    c.nodes[l].start();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let status = wait_agreed(&c, &[0, 1, 2], "restarted", |_| true);
    assert!(status["term"].as_u64() > Some(1), "{status:#}");
    if l != 0 {
        c.nodes[0].kill9();
        c.nodes[0].start();
        c.wait_converged(&[0, 1, 2], CONVERGE);
        wait_agreed(&c, &[0, 1, 2], "n0 restarted", |_| true);
    }
    let log = tail(&c.nodes[0].log, 1 << 20);
    let foundings = log.matches("founding the placement controller").count();
    assert_eq!(foundings, 1, "n0 founded the group again on restart:\n{log}");
}

#[test]
fn shards_whose_copies_all_died_stay_unavailable_until_an_operator_forces_them() {
    let mut c = Cluster::new(4);
    c.start_all();
    c.wait_converged(&[0, 1, 2, 3], CONVERGE);
    let status = wait_agreed(&c, &[0, 1, 2, 3], "start", |s| {
        s["shards_unassigned"] == 0 && names(&s["voters"]).len() == 3
    });
    // n0 founded; two of the learners that caught up first became voters. The controller
    // keeps a majority if the non-voter and a voter that does not lead die.
    let voters = names(&status["voters"]);
    assert!(voters.contains(&"n0".to_string()), "{voters:?}");
    let leader = status["leader"].as_str().unwrap().to_string();
    let non_voter = (0..4).find(|&i| !voters.contains(&c.nodes[i].name)).unwrap();
    let victim =
        (0..4).find(|&i| voters.contains(&c.nodes[i].name) && c.nodes[i].name != leader).unwrap();
    let survivors: Vec<usize> = (0..4).filter(|&i| i != non_voter && i != victim).collect();
    let (killed, to) = (
        [c.nodes[non_voter].name.clone(), c.nodes[victim].name.clone()],
        c.nodes[survivors[1]].name.clone(),
    );
    let admin = c.nodes[survivors[0]].ports.admin;
    let p = get_json(admin, "/placement?conv=bob").unwrap();
    let shard = p["shard"].as_u64().unwrap();
    // Forcing a shard that is served is refused: there is nothing to recover.
    let (code, body) = http_post(admin, &format!("/shard/force?shard={shard}&to=n1")).unwrap();
    assert_eq!(code, 409, "{body}");
    let (code, body) = http_post(admin, "/shard/force?shard=999999999&to=n1").unwrap();
    assert_eq!(code, 400, "{body}");
    // The CLI asks for confirmation before it sends anything.
    let out = Command::new(botclaw_bin())
        .args(["shard", "force", "--admin", &admin.to_string(), "--shard", "1", "--to", "n1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes-lose-turns"));

    // Two nodes die: the shards only they held are unavailable (never restarted empty); the
    // controller keeps two of its three voters and goes on.
    c.nodes[non_voter].kill9();
    c.nodes[victim].kill9();
    let status = wait_agreed(&c, &survivors, "two killed", |s| {
        s["shards_unavailable"].as_u64() > Some(0) && s["leader"].is_string()
    });
    let shard = status["unavailable"][0].as_u64().expect("an unavailable shard listed");
    let p = get_json(admin, &format!("/placement?shard={shard}")).unwrap();
    assert_eq!(p["state"], "unavailable", "{p:#}");
    assert!(p["owner"].is_null(), "{p:#}");
    // The last in-sync member is remembered (the shard waits for it), and it is dead.
    let isr = names(&p["isr"]);
    assert!(!isr.is_empty() && isr.iter().all(|n| killed.contains(n)), "{p:#}");

    // The operator forces it onto a survivor (with the confirmation): it is served there.
    let out = Command::new(botclaw_bin())
        .args(["shard", "force", "--admin", &admin.to_string(), "--shard", &shard.to_string()])
        .args(["--to", &to, "--yes-lose-turns"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let forced = poll(SETTLE, || {
        let p = get_json(c.nodes[survivors[1]].ports.admin, &format!("/placement?shard={shard}"))?;
        (p["owner"] == to.as_str()).then_some(p)
    });
    assert!(forced.is_some(), "shard {shard} not forced onto {to}\n{}", c.logs());
    assert!(c.logs().contains("AUDIT operator forces"), "no audit line");
}

/// Routing and replication by the controller's map.
const BY_THE_MAP: &str = "[controller]\nauthoritative = true\n";

/// Three nodes with `config` (routing by the map), started, converged and placed.
fn placed_by_the_map(config: &str) -> Cluster {
    let mut c = Cluster::new(3).with_config(config);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    c.wait_placed(&[0, 1, 2], Duration::from_secs(60));
    c
}

#[test]
fn by_the_map_a_node_killed_under_load_loses_no_acknowledged_turn() {
    let mut c = Cluster::new(3).with_config(BY_THE_MAP);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let rt = runtime();
    let seeds: Vec<_> = c.nodes.iter().map(|n| n.ports.client).collect();
    let convs: Vec<String> = (0..90).map(|k| format!("map-{k}")).collect();
    let load = start_load_with(&rt, seeds.clone(), convs, 12, 64, Duration::ZERO);
    pause(&rt, Duration::from_secs(2));
    // n2 owns about a third of the shards and holds a copy of two thirds.
    c.nodes[2].kill9();
    pause(&rt, Duration::from_secs(5));
    let report = load.finish_at_least(&rt, 200);
    assert!(report.acked() >= 200, "too little load went through: {}", report.acked());
    // Its shards were owned again by their surviving in-sync member: none is unavailable
    // and none is owned by n2 (R is restored later, a learner at a time).
    let status = wait_agreed(&c, &[0, 1], "killed", |s| s["shards_under_replicated"] != 0);
    assert_eq!(status["shards_unavailable"], 0, "{status:#}");
    for k in 0..90 {
        let p = get_json(c.nodes[0].ports.admin, &format!("/placement?conv=map-{k}")).unwrap();
        assert_ne!(p["owner"], "n2", "{p:#}");
    }
    // The killed node returns (a learner again) and everything is still there.
    c.nodes[2].start();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    assert_consistent(&c, &rt, &[seeds[2], seeds[0], seeds[1]], &report);
}

/// Two nodes join a loaded three-node cluster at the same moment: the controller's log
/// orders their registrations and moves, and nothing acknowledged is lost, duplicated or
/// renumbered.
#[test]
fn by_the_map_two_nodes_joining_at_once_under_load_lose_nothing() {
    let mut c = placed_by_the_map(BY_THE_MAP);
    let rt = runtime();
    let seeds: Vec<_> = c.nodes.iter().map(|n| n.ports.client).collect();
    let convs: Vec<String> = (0..90).map(|k| format!("joins-{k}")).collect();
    let load = start_load_with(&rt, seeds.clone(), convs, 12, 64, Duration::ZERO);
    pause(&rt, Duration::from_secs(2));
    for _ in 0..2 {
        let i = c.add_node(SECRET);
        c.nodes[i].config = Some(BY_THE_MAP.into());
        c.nodes[i].start();
    }
    c.wait_converged(&[0, 1, 2, 3, 4], CONVERGE);
    c.wait_placed(&[0, 1, 2, 3, 4], Duration::from_secs(120));
    let report = load.finish_at_least(&rt, 200);
    let status = controller(&c.nodes[0]).unwrap();
    for joiner in ["n3", "n4"] {
        assert!(status["owned"][joiner].as_u64().unwrap_or(0) > 0, "{joiner}: {status:#}");
    }
    assert!(report.acked() >= 200, "too little load went through: {}", report.acked());
    assert_consistent(&c, &rt, &seeds, &report);
}

/// Conversations left idle while nodes join one after the other keep every turn: their
/// shards' data moves with them, and the next turn continues the count.
#[test]
fn by_the_map_sequential_joins_keep_idle_conversations() {
    let mut c = placed_by_the_map(BY_THE_MAP);
    let rt = runtime();
    let seeds: Vec<_> = c.nodes.iter().map(|n| n.ports.client).collect();
    let convs: Vec<String> = (0..60).map(|k| format!("idle-{k}")).collect();
    // Three turns each, then nothing while two nodes join, one after the other.
    let load = |seeds: Vec<_>, turns| {
        let stop = Arc::new(AtomicBool::new(false));
        rt.block_on(run_load_on(seeds, convs.clone(), 6, turns, Duration::ZERO, stop))
    };
    let mut report = load(seeds, 1..=3);
    assert_eq!(report.acked(), 60 * 3);
    for _ in 0..2 {
        let i = c.add_node(SECRET);
        c.nodes[i].config = Some(BY_THE_MAP.into());
        c.nodes[i].start();
        let all: Vec<usize> = (0..c.nodes.len()).collect();
        c.wait_converged(&all, CONVERGE);
        c.wait_placed(&all, Duration::from_secs(120));
    }
    // Every conversation goes on at turn 4, through every gateway.
    let seeds: Vec<_> = c.nodes.iter().map(|n| n.ports.client).collect();
    report.merge(load(seeds.clone(), 4..=5));
    assert_eq!(report.acked(), 60 * 5, "a conversation restarted or lost a turn");
    assert_consistent(&c, &rt, &seeds, &report);
}

/// The node leading the placement controller is killed under load: the others elect a
/// leader and go on (a node serves only while it hears one), nothing acknowledged is lost.
#[test]
fn by_the_map_the_controller_leader_killed_under_load_loses_nothing() {
    let mut c = placed_by_the_map(BY_THE_MAP);
    let rt = runtime();
    let seeds: Vec<_> = c.nodes.iter().map(|n| n.ports.client).collect();
    let convs: Vec<String> = (0..90).map(|k| format!("leader-{k}")).collect();
    let load = start_load_with(&rt, seeds.clone(), convs, 12, 64, Duration::ZERO);
    pause(&rt, Duration::from_secs(2));
    let leader = controller(&c.nodes[0]).unwrap()["leader"].as_str().unwrap().to_string();
    let l = node_index(&c, &leader);
    c.nodes[l].kill9();
    let rest: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let status = wait_agreed(&c, &rest, "new leader", |s| s["leader"] != leader.as_str());
    assert_eq!(status["shards_unavailable"], 0, "{status:#}");
    pause(&rt, Duration::from_secs(3));
    let report = load.finish_at_least(&rt, 200);
    assert!(report.acked() >= 200, "too little load went through: {}", report.acked());
    c.nodes[l].start();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let mut order = seeds.clone();
    order.rotate_left(l + 1);
    assert_consistent(&c, &rt, &order, &report);
}

/// One node's gossip is cut off and healed again and again under load (its links, and so
/// the controller's messages, stay up: the others declare it dead while it still hears the
/// leader): it never serves on a map it has not caught up with, and nothing acknowledged
/// is lost.
#[test]
fn by_the_map_a_flapping_isolation_loses_nothing() {
    let c = placed_by_the_map(&format!("{BY_THE_MAP}[fault]\ninjection = true\n"));
    let rt = runtime();
    let seeds: Vec<_> = c.nodes.iter().map(|n| n.ports.client).collect();
    let convs: Vec<String> = (0..90).map(|k| format!("flap-{k}")).collect();
    let load = start_load_with(&rt, seeds.clone(), convs, 12, 64, Duration::ZERO);
    pause(&rt, Duration::from_secs(1));
    // Cut off long enough to be declared down (about 1.7 s), healed briefly, three times.
    let since = std::time::Instant::now();
    for (on, ms) in [(true, 3000), (false, 1500), (true, 3000), (false, 1500), (true, 3000)] {
        let (code, _) =
            http_post(c.nodes[2].ports.admin, &format!("/fault/isolate?on={on}")).unwrap();
        assert_eq!(code, 200);
        pause(&rt, Duration::from_millis(ms));
    }
    c.wait_seen_as(&[0, 1], "n2", "down", since, Duration::from_secs(1));
    let (code, _) = http_post(c.nodes[2].ports.admin, "/fault/isolate?on=false").unwrap();
    assert_eq!(code, 200);
    c.wait_converged(&[0, 1, 2], CONVERGE);
    pause(&rt, Duration::from_secs(2));
    let report = load.finish_at_least(&rt, 200);
    assert!(report.acked() >= 200, "too little load went through: {}", report.acked());
    assert_consistent(&c, &rt, &seeds, &report);
}
