//! The planner driven to convergence the way the controller's leader drives it: plan, apply,
//! and (standing in for the owners) promote every learner at once. Every applied command is
//! checked against the map's invariants and the transition rules.

use super::*;
use crate::shardmap::check_transition;

const SHARDS: u32 = 256;

fn up(name: &str, incarnation: u64) -> UpMember {
    UpMember::new(name, incarnation, 100)
}

fn ring_of(map: &ShardMap) -> Placement {
    let cfg =
        botclaw_config::PlacementConfig { shard_count: SHARDS, vnodes: 64, ..Default::default() };
    Placement::build(&map.active_members(), &cfg)
}

fn apply(map: &mut ShardMap, cmd: &MapCommand) {
    let before = map.clone();
    map.apply(cmd);
    assert_eq!(map.check(), Vec::<String>::new(), "after {cmd:?}");
    assert_eq!(check_transition(&before, map, None), Vec::<String>::new(), "after {cmd:?}");
}

/// Owners promote every learner (as if each caught up at once).
fn promote_all(map: &mut ShardMap) {
    let changes: Vec<ShardChange> = (0..map.shard_count())
        .filter_map(|s| {
            let e = map.shard(s)?;
            let l = *e.learners.as_slice().first()?;
            e.owner.is_some().then_some(ShardChange::Promote {
                shard: s,
                epoch: e.epoch,
                member: l,
                turn_version: 0,
            })
        })
        .collect();
    if !changes.is_empty() {
        apply(map, &MapCommand::Changes(changes));
    }
}

/// Rounds until the planner has nothing left to do; panics after `rounds_max`.
fn converge(map: &mut ShardMap, live: &[UpMember], cfg: &PlanConfig, rounds_max: usize) -> usize {
    for round in 0..rounds_max {
        let ring = ring_of(map);
        let cmds = plan(map, live, &ring, cfg);
        let learning = map.shards().any(|e| !e.learners.is_empty());
        if cmds.is_empty() && !learning {
            return round;
        }
        for cmd in &cmds {
            apply(map, cmd);
        }
        let in_flight = map.shards().filter(|e| !e.learners.is_empty()).count();
        assert!(in_flight <= cfg.moves_in_flight_max, "{in_flight} moves in flight");
        promote_all(map);
    }
    panic!("not converged after {rounds_max} rounds");
}

/// Every assigned shard holds exactly the ring's replicas, owner first.
fn assert_on_ring(map: &ShardMap, r: usize) {
    let ring = ring_of(map);
    for s in 0..SHARDS {
        let e = map.shard(s).unwrap();
        if e.is_unavailable() {
            continue;
        }
        let want = desired(map, &ring, s, r);
        assert_eq!(e.isr.as_slice(), &want[..], "shard {s}");
        assert!(e.learners.is_empty());
    }
}

/// Rounds with `pins` on top of the ring (2 replicas) until the planner has nothing left
/// to do, every learner promoted as in `converge`; panics after 20. `check` sees each
/// round's wanted replicas.
fn settle_pinned(
    map: &mut ShardMap,
    live: &[UpMember],
    cfg: &PlanConfig,
    pins: &[(ShardId, &str)],
    check: impl Fn(&ShardMap, &Desired),
) {
    for _ in 0..20 {
        let mut desired = Desired::build(map, &ring_of(map), 2);
        desired.pin(map, pins.iter().copied(), 2);
        check(map, &desired);
        let cmds = plan_with(map, live, &desired, cfg).commands;
        if cmds.is_empty() && map.shards().all(|e| e.learners.is_empty()) {
            return;
        }
        for cmd in &cmds {
            apply(map, cmd);
        }
        promote_all(map);
    }
    let pinned: Vec<_> = pins.iter().map(|(s, _)| map.shard(*s)).collect();
    panic!("the pins never settled: {pinned:?}");
}

fn started(names: &[&str], cfg: &PlanConfig) -> (ShardMap, Vec<UpMember>) {
    let mut map = ShardMap::new(SHARDS);
    let live: Vec<UpMember> = names.iter().map(|n| up(n, 1)).collect();
    converge(&mut map, &live, cfg, 10);
    (map, live)
}

#[test]
fn a_new_cluster_registers_its_members_and_assigns_every_shard_on_the_ring() {
    let cfg = PlanConfig::default();
    let (map, _) = started(&["a", "b", "c"], &cfg);
    assert!(map.shards().all(|e| !e.is_unassigned()));
    assert_on_ring(&map, 2);
}

/// The formed map is the map the planner's rounds leave an empty one in with the same
/// members up: the planner has nothing to do on it, and it passes the map's checks.
#[test]
fn a_formed_map_is_where_the_planner_converges() {
    let cfg = PlanConfig::default();
    let names: Vec<String> = (0..12).map(|i| format!("n{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (converged, live) = started(&names, &cfg);
    let placement =
        botclaw_config::PlacementConfig { shard_count: SHARDS, vnodes: 64, ..Default::default() };
    let formed = formed_map(SHARDS, &live, &placement, cfg.replication_factor);
    assert_eq!(formed.check(), Vec::<String>::new());
    assert!(plan(&formed, &live, &ring_of(&formed), &cfg).is_empty());
    assert_on_ring(&formed, cfg.replication_factor);
    for s in 0..SHARDS {
        let (f, c) = (formed.shard(s).unwrap(), converged.shard(s).unwrap());
        assert_eq!((f.owner, f.isr), (c.owner, c.isr), "shard {s}");
    }
}

#[test]
fn a_joining_member_takes_its_share_through_learners_throttled() {
    let cfg = PlanConfig { moves_in_flight_max: 8, ..Default::default() };
    let (mut map, mut live) = started(&["a", "b", "c"], &cfg);
    live.push(up("d", 1));
    let rounds = converge(&mut map, &live, &cfg, 200);
    assert!(rounds > 4, "throttled moves took only {rounds} rounds");
    assert_on_ring(&map, 2);
    let owned = map.owned_counts()["d"];
    assert!((40..=90).contains(&owned), "d owns {owned} of {SHARDS}");
}

#[test]
fn two_members_joining_at_once_are_ordered_by_the_log() {
    let cfg = PlanConfig::default();
    let (mut map, mut live) = started(&["a", "b", "c"], &cfg);
    live.extend([up("d", 1), up("e", 1)]);
    converge(&mut map, &live, &cfg, 100);
    assert_on_ring(&map, 2);
}

#[test]
fn a_crash_moves_ownership_to_a_survivor_at_once_and_restores_the_replicas() {
    let cfg = PlanConfig::default();
    let (mut map, mut live) = started(&["a", "b", "c"], &cfg);
    let owned_by_c: Vec<ShardId> = (0..SHARDS).filter(|&s| map.owner(s) == Some("c")).collect();
    live.retain(|m| m.name != "c");
    let ring = ring_of(&map);
    let first = plan(&map, &live, &ring, &cfg);
    assert_eq!(first, vec![MapCommand::Dead { name: "c".into(), incarnation: 1 }]);
    apply(&mut map, &first[0]);
    for &s in &owned_by_c {
        let owner = map.owner(s);
        assert!(owner == Some("a") || owner == Some("b"), "shard {s} owned by {owner:?}");
    }
    converge(&mut map, &live, &cfg, 50);
    assert_on_ring(&map, 2);
    assert!(map.shards().all(|e| e.isr.len() == 2));
}

#[test]
fn a_drained_member_ends_up_holding_nothing() {
    let cfg = PlanConfig::default();
    let (mut map, live) = started(&["a", "b", "c"], &cfg);
    apply(&mut map, &MapCommand::Drain { name: "b".into() });
    converge(&mut map, &live, &cfg, 50);
    let b = map.member_ix("b").unwrap();
    assert!(map.shards().all(|e| !e.isr.contains(b) && !e.learners.contains(b)));
    assert_on_ring(&map, 2);
}

#[test]
fn a_member_the_failure_detector_sees_draining_is_drained_not_declared_dead() {
    let cfg = PlanConfig::default();
    let (mut map, mut live) = started(&["a", "b", "c"], &cfg);
    live[1].serving = false;
    let ring = ring_of(&map);
    assert_eq!(plan(&map, &live, &ring, &cfg), vec![MapCommand::Drain { name: "b".into() }]);
    converge(&mut map, &live, &cfg, 50);
    let b = map.member_ix("b").unwrap();
    assert_eq!(map.member(b).unwrap().state, MemberState::Draining, "still a member, draining");
    assert!(map.shards().all(|e| !e.isr.contains(b) && !e.learners.contains(b)));
    // A draining node the map never knew is not registered.
    let mut d = up("d", 1);
    d.serving = false;
    live.push(d);
    assert!(plan_membership(&map, &live).is_empty());
}

#[test]
fn shards_whose_in_sync_members_all_died_stay_unavailable_and_untouched() {
    let cfg = PlanConfig::default();
    let (mut map, mut live) = started(&["a", "b", "c"], &cfg);
    live.retain(|m| m.name == "a");
    converge(&mut map, &live, &cfg, 50);
    let lost: Vec<ShardId> = map.unavailable().collect();
    assert!(!lost.is_empty(), "with R=2 some shards lived on b and c only");
    for &s in &lost {
        let isr = map.shard(s).unwrap().isr;
        assert!(!isr.contains(map.member_ix("a").unwrap()), "shard {s}");
    }
    // b and c died in that order (one command each): shards on both were left to c alone,
    // so c is their last in-sync member. b returning brings none of them back...
    live.push(up("b", 2));
    converge(&mut map, &live, &cfg, 50);
    assert_eq!(map.unavailable().collect::<Vec<_>>(), lost);
    // ...c returning (with its store) brings every one back, nothing restarted from empty.
    live.push(up("c", 2));
    converge(&mut map, &live, &cfg, 50);
    assert_eq!(map.unavailable().count(), 0);
    assert_on_ring(&map, 2);
}

#[test]
fn a_stale_plan_changes_nothing() {
    let cfg = PlanConfig::default();
    let (mut map, mut live) = started(&["a", "b", "c"], &cfg);
    live.push(up("d", 1));
    let join = plan(&map, &live, &ring_of(&map), &cfg).remove(0);
    apply(&mut map, &join);
    let ring = ring_of(&map);
    let moves = plan(&map, &live, &ring, &cfg);
    assert!(!moves.is_empty());
    for cmd in &moves {
        apply(&mut map, cmd);
    }
    let before = map.clone();
    // The same plan again: every change names an epoch the map has left.
    for cmd in &moves {
        let applied = map.apply(cmd);
        assert!(applied.changed.is_empty(), "{applied:?}");
    }
    assert!(map.shards().eq(before.shards()));
}

/// A load-driven pin makes the pinned member the shard's owner (through a learner, as any
/// move); pins to a member that is not active are ignored; without the pin the shard goes
/// back to the ring.
#[test]
fn a_pinned_shard_moves_to_its_pinned_owner_and_back_when_unpinned() {
    let cfg = PlanConfig::default();
    let (mut map, live) = started(&["a", "b", "c"], &cfg);
    let shard = 7;
    let ring_owner = map.owner(shard).unwrap().to_string();
    let to = ["a", "b", "c"].into_iter().find(|n| *n != ring_owner).unwrap();
    settle_pinned(&mut map, &live, &cfg, &[(shard, to), (shard + 1, "nobody")], |map, desired| {
        assert_eq!(desired.of(shard)[0], map.member_ix(to).unwrap());
        let unpinned = Desired::build(map, &ring_of(map), 2);
        assert_eq!(desired.of(shard + 1), unpinned.of(shard + 1));
    });
    assert_eq!(map.owner(shard), Some(to));
    assert_eq!(map.shard(shard).unwrap().isr.len(), 2);
    // Unpinned: back to the ring's placement.
    converge(&mut map, &live, &cfg, 20);
    assert_on_ring(&map, 2);
    assert_eq!(map.owner(shard), Some(ring_owner.as_str()));
}

/// `Desired::build` (names looked up once) wants what `desired` (a scan per name) wants,
/// for every shard, with a ring that names a draining member and one the map lacks.
#[test]
fn the_desired_table_agrees_with_desired_per_shard() {
    let cfg = PlanConfig::default();
    let (mut map, _) = started(&["a", "b", "c", "d", "e"], &cfg);
    apply(&mut map, &MapCommand::Drain { name: "b".into() });
    let mut names = map.active_members();
    for name in ["b", "ghost"] {
        names.push(crate::placement::RingMember { name: name.into(), capacity: 100 });
    }
    let pcfg =
        botclaw_config::PlacementConfig { shard_count: SHARDS, vnodes: 64, ..Default::default() };
    let ring = Placement::build(&names, &pcfg);
    for r in 1..=3 {
        let table = Desired::build(&map, &ring, r);
        let mut skipped = 0;
        for s in 0..SHARDS {
            let want = desired(&map, &ring, s, r);
            assert_eq!(table.of(s), &want[..], "shard {s}, r {r}");
            skipped += usize::from(want.len() < r);
        }
        assert!(skipped > 0, "the ring's draining and unknown members were never skipped");
    }
}

/// A shard whose ISR is full (moves planned while the ring changed under them, members
/// joining, left it at `REPLICAS_MAX`) and that misses a wanted member gives up an in-sync
/// member the ring does not want first: a learner added to a full ISR could never be
/// promoted, and the owner proposed its promotion forever (8,423 entries that changed
/// nothing in a simulated 1000-node, 900 s run).
#[test]
fn a_full_isr_makes_room_before_a_wanted_member_learns() {
    let cfg = PlanConfig::default();
    let names = ["a", "b", "c", "d", "e", "f", "g"];
    let (mut map, live) = started(&names, &cfg);
    let shard = 3;
    let ring = ring_of(&map);
    let want = Desired::build(&map, &ring, 2).of(shard).to_vec();
    let others: Vec<MemberIx> =
        (0..names.len() as MemberIx).filter(|m| !want.contains(m)).collect();
    // Three members the ring does not want join the ISR: it is full.
    for &m in &others[..3] {
        let epoch = map.shard(shard).unwrap().epoch;
        apply(
            &mut map,
            &MapCommand::Changes(vec![ShardChange::AddLearner { shard, epoch, member: m }]),
        );
        let promote = ShardChange::Promote { shard, epoch: epoch + 1, member: m, turn_version: 0 };
        apply(&mut map, &MapCommand::Changes(vec![promote]));
    }
    assert_eq!(map.shard(shard).unwrap().isr.len(), REPLICAS_MAX);
    // The shard is pinned to a member outside it.
    let to = map.name(others[3]).to_string();
    settle_pinned(&mut map, &live, &cfg, &[(shard, to.as_str())], |_, _| {});
    assert_eq!(map.owner(shard), Some(to.as_str()));
    assert_eq!(map.shard(shard).unwrap().isr.len(), 2);
}
