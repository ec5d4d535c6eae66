use proptest::prelude::*;

use super::*;
use crate::placement::{Placement, RingMember};

fn join(name: &str, incarnation: u64) -> MapCommand {
    MapCommand::Join { name: name.into(), incarnation, capacity: 100 }
}

fn dead(name: &str, incarnation: u64) -> MapCommand {
    MapCommand::Dead { name: name.into(), incarnation }
}

/// Applies `cmd`, asserting both checkers stay clean; returns what it did.
fn apply(map: &mut ShardMap, cmd: &MapCommand) -> Applied {
    let before = map.clone();
    let forced = match cmd {
        MapCommand::Force { shard, .. } => Some(*shard),
        _ => None,
    };
    let applied = map.apply(cmd);
    assert_eq!(map.check(), Vec::<String>::new(), "after {cmd:?}");
    assert_eq!(check_transition(&before, map, forced), Vec::<String>::new(), "after {cmd:?}");
    assert_eq!(map.changed_since(&before), Some(applied.changed.clone()), "after {cmd:?}");
    applied
}

fn names(map: &ShardMap, r: Replicas) -> Vec<&str> {
    r.as_slice().iter().map(|&m| map.name(m)).collect()
}

/// Three members a, b, c; shard 0 on [a, b], shard 1 on [b, c], shard 2 on [c, a].
fn three() -> ShardMap {
    let mut map = ShardMap::new(4);
    for n in ["a", "b", "c"] {
        apply(&mut map, &join(n, 1));
    }
    let run = |start, replicas: Vec<MemberIx>| AssignRun { start, len: 1, replicas };
    apply(
        &mut map,
        &MapCommand::Assign(vec![run(0, vec![0, 1]), run(1, vec![1, 2]), run(2, vec![2, 0])]),
    );
    map
}

#[test]
fn a_crash_promotes_a_surviving_in_sync_member_with_a_higher_epoch() {
    let mut map = three();
    let before = *map.shard(0).unwrap();
    let applied = apply(&mut map, &dead("a", 1));
    assert_eq!(applied.changed, vec![0, 2]);
    let s0 = map.shard(0).unwrap();
    assert_eq!(map.owner(0), Some("b"));
    assert_eq!(names(&map, s0.isr), ["b"]);
    assert!(s0.epoch > before.epoch);
    // Shard 2: a was in sync but not the owner; it only leaves the ISR.
    assert_eq!(map.owner(2), Some("c"));
    assert_eq!(names(&map, map.shard(2).unwrap().isr), ["c"]);
    // Shard 1 did not involve a.
    assert_eq!(map.shard(1).unwrap().epoch, 1);
}

#[test]
fn both_in_sync_members_gone_leaves_the_shard_unavailable_until_one_returns() {
    let mut map = three();
    apply(&mut map, &dead("a", 1));
    apply(&mut map, &dead("b", 1));
    let s0 = *map.shard(0).unwrap();
    assert!(s0.is_unavailable(), "{s0:?}");
    assert_eq!(names(&map, s0.isr), ["b"], "the last in-sync member is remembered");
    assert_eq!(map.unavailable().collect::<Vec<_>>(), vec![0]);
    // a returns: it missed turns b acknowledged alone, so it may not serve shard 0.
    apply(&mut map, &join("a", 2));
    assert!(map.shard(0).unwrap().is_unavailable());
    // b returns (restarted, same store): it holds every acknowledged turn.
    let applied = apply(&mut map, &join("b", 2));
    assert_eq!(applied.changed, vec![0]);
    assert_eq!(map.owner(0), Some("b"));
    assert!(map.shard(0).unwrap().epoch > s0.epoch);
}

#[test]
fn a_restarted_process_is_counted_in_once_its_join_is_applied() {
    let mut map = three();
    assert!(map.counts_in("a", 1));
    // A restarted process (readiness asks): its previous incarnation is what the map has.
    assert!(!map.counts_in("a", 2));
    assert!(!map.counts_in("d", 1), "never a member");
    apply(&mut map, &dead("a", 1));
    assert!(!map.counts_in("a", 1), "gone");
    apply(&mut map, &join("a", 2));
    assert!(map.counts_in("a", 2));
    assert!(!map.counts_in("a", 1));
}

#[test]
fn a_restart_before_its_death_was_committed_counts_as_a_death() {
    let mut map = three();
    apply(&mut map, &join("a", 5));
    assert_eq!(map.owner(0), Some("b"), "a's new process holds nothing in sync");
    assert_eq!(map.member(0).unwrap().state, MemberState::Active);
    assert_eq!(map.member(0).unwrap().incarnation, 5);
    // An old incarnation's late messages change nothing.
    let applied = apply(&mut map, &dead("a", 1));
    assert!(applied.changed.is_empty() && !applied.skipped.is_empty());
    let applied = apply(&mut map, &join("a", 1));
    assert!(applied.skipped[0].contains("older"), "{applied:?}");
}

#[test]
fn a_move_is_learn_promote_hand_off_remove() {
    let mut map = three();
    // One step at the shard's current epoch.
    let step = |map: &mut ShardMap, make: &dyn Fn(u64) -> ShardChange| {
        let epoch = map.shard(0).unwrap().epoch;
        apply(map, &MapCommand::Changes(vec![make(epoch)]))
    };
    let c = 2;
    step(&mut map, &|epoch| ShardChange::AddLearner { shard: 0, epoch, member: c });
    assert_eq!(names(&map, map.shard(0).unwrap().learners), ["c"]);
    step(&mut map, &|epoch| ShardChange::Promote { shard: 0, epoch, member: c, turn_version: 7 });
    assert_eq!(names(&map, map.shard(0).unwrap().isr), ["a", "b", "c"]);
    step(&mut map, &|epoch| ShardChange::SetOwner { shard: 0, epoch, member: c });
    assert_eq!(map.owner(0), Some("c"));
    assert_eq!(names(&map, map.shard(0).unwrap().isr), ["c", "a", "b"]);
    step(&mut map, &|epoch| ShardChange::Remove { shard: 0, epoch, member: 0 });
    assert_eq!(names(&map, map.shard(0).unwrap().isr), ["c", "b"]);
    assert_eq!(map.shard(0).unwrap().epoch, 5, "assign + four steps");
}

#[test]
fn stale_or_unsafe_changes_are_skipped_on_every_node_alike() {
    let mut map = three();
    let e0 = map.shard(0).unwrap().epoch;
    let cases = [
        (ShardChange::AddLearner { shard: 0, epoch: e0 + 1, member: 2 }, "stale"),
        (ShardChange::AddLearner { shard: 0, epoch: e0, member: 1 }, "already"),
        (ShardChange::Promote { shard: 0, epoch: e0, member: 2, turn_version: 0 }, "learner"),
        (ShardChange::SetOwner { shard: 0, epoch: e0, member: 2 }, "ISR member"),
        (ShardChange::Remove { shard: 0, epoch: e0, member: 0 }, "owner"),
        (ShardChange::Remove { shard: 0, epoch: e0, member: 2 }, "removable"),
        (ShardChange::AddLearner { shard: 3, epoch: 0, member: 2 }, "already"),
        (ShardChange::AddLearner { shard: 99, epoch: 0, member: 2 }, "exist"),
    ];
    for (change, why) in cases {
        let applied = apply(&mut map, &MapCommand::Changes(vec![change]));
        assert!(applied.changed.is_empty(), "{change:?} applied");
        assert!(applied.skipped[0].contains(why), "{change:?}: {:?}", applied.skipped);
    }
    // The last in-sync member of a shard is never removed.
    apply(&mut map, &dead("b", 1));
    let e0 = map.shard(0).unwrap().epoch;
    let applied = apply(
        &mut map,
        &MapCommand::Changes(vec![ShardChange::Remove { shard: 0, epoch: e0, member: 0 }]),
    );
    assert!(!applied.skipped.is_empty());
}

#[test]
fn force_restarts_an_unavailable_shard_only() {
    let mut map = three();
    let applied = apply(&mut map, &MapCommand::Force { shard: 0, member: 2 });
    assert!(applied.changed.is_empty(), "an available shard is not forced");
    apply(&mut map, &dead("a", 1));
    apply(&mut map, &dead("b", 1));
    apply(&mut map, &MapCommand::Force { shard: 0, member: 2 });
    assert_eq!(map.owner(0), Some("c"));
    assert_eq!(names(&map, map.shard(0).unwrap().isr), ["c"]);
}

#[test]
fn membership_plans_deaths_restarts_and_joins() {
    let map = three();
    let up = |n: &str, i| UpMember::new(n, i, 100);
    assert!(plan_membership(&map, &[up("a", 1), up("b", 1), up("c", 1)]).is_empty());
    let plan = plan_membership(&map, &[up("a", 2), up("c", 1), up("d", 1)]);
    assert_eq!(plan, vec![dead("a", 1), dead("b", 1), join("a", 2), join("d", 1)]);
    // An older incarnation still gossiped is not re-registered.
    let mut map = map;
    apply(&mut map, &join("a", 2));
    assert_eq!(plan_membership(&map, &[up("a", 1), up("b", 1), up("c", 1)]), vec![dead("a", 2)]);
}

/// A full map takes no new member: the planner proposes no `Join` the map would skip (one
/// was proposed every round), while a member it holds still comes back.
#[test]
fn a_full_map_is_proposed_no_new_member() {
    let mut map = ShardMap::new(8);
    let names: Vec<String> = (0..MEMBERS_MAX).map(|k| format!("m{k}")).collect();
    for name in &names {
        apply(&mut map, &join(name, 1));
    }
    assert!(apply(&mut map, &join("late", 1)).changed.is_empty());
    assert_eq!(map.members().len(), MEMBERS_MAX);
    let up = |n: &str, i| UpMember::new(n, i, 100);
    let mut all: Vec<UpMember> = names.iter().map(|n| up(n, 1)).collect();
    assert!(unregistrable(&map, &all).is_empty(), "every name is in the map");
    all.push(up("late", 1));
    assert!(plan_membership(&map, &all).is_empty(), "a join the full map would skip");
    assert_eq!(unregistrable(&map, &all), ["late"], "reported instead");
    all.push(UpMember { serving: false, ..up("idle", 1) });
    assert_eq!(unregistrable(&map, &all), ["late"], "a node not serving wants no shards");
    all[0] = up("m0", 2);
    assert_eq!(plan_membership(&map, &all), vec![dead("m0", 1), join("m0", 2)]);
}

#[test]
fn assignment_follows_the_ring_in_runs_and_skips_assigned_shards() {
    let cfg =
        botclaw_config::PlacementConfig { shard_count: 1024, vnodes: 64, ..Default::default() };
    let mut map = ShardMap::new(cfg.shard_count);
    let members: Vec<RingMember> =
        ["a", "b", "c"].iter().map(|n| RingMember { name: n.to_string(), capacity: 100 }).collect();
    for m in &members {
        apply(&mut map, &join(&m.name, 1));
    }
    let placement = Placement::build(&members, &cfg);
    let Some(MapCommand::Assign(runs)) =
        plan_assign(&map, &Desired::build(&map, &placement, 2), 300)
    else {
        panic!()
    };
    assert_eq!(runs.iter().map(|r| r.len).sum::<u32>(), 300, "bounded by shards_max");
    assert!(runs.len() < 300, "consecutive shards share runs: {}", runs.len());
    apply(&mut map, &MapCommand::Assign(runs));
    let cmd = plan_assign(&map, &Desired::build(&map, &placement, 2), usize::MAX).unwrap();
    let applied = apply(&mut map, &cmd);
    assert_eq!(applied.changed.len(), 1024 - 300);
    assert!(plan_assign(&map, &Desired::build(&map, &placement, 2), usize::MAX).is_none());
    for s in 0..1024 {
        let want = placement.preference_list(s, 2);
        assert_eq!(names(&map, map.shard(s).unwrap().isr), want, "shard {s}");
    }
}

/// The transition checker must be able to fail: a crash handled the old way (the ring's
/// next node takes over, whatever it holds) is caught.
#[test]
fn the_transition_checker_catches_a_view_based_takeover() {
    let mut map = three();
    apply(&mut map, &dead("a", 1));
    let before = map.clone();
    // Shard 0's ISR is [b]; b dies too. View-based acquire would give it to c, the next node
    // on the ring, which never held it.
    map.apply(&dead("b", 1));
    let e = *map.shard(0).unwrap();
    map.shards.set(
        0,
        ShardEntry {
            epoch: e.epoch,
            owner: Some(2),
            isr: Replicas::from_slice(&[2]).unwrap(),
            learners: e.learners,
        },
    );
    let problems = check_transition(&before, &map, None);
    assert!(problems.iter().any(|p| p.contains("new owner c was not in sync")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("without learning")), "{problems:?}");
    // And the map checker catches an owner outside its ISR.
    let e = ShardEntry { owner: Some(0), ..*map.shard(1).unwrap() };
    map.shards.set(1, e);
    assert!(map.check().iter().any(|p| p.contains("not first in its ISR")));
}

fn arb_command(members: u16, shards: u32) -> impl Strategy<Value = MapCommand> {
    let name = (0..members).prop_map(|i| format!("n{i}"));
    let member = 0..members + 1;
    let shard = 0..shards + 1;
    let epoch = 0u64..6;
    prop_oneof![
        (name.clone(), 1u64..4).prop_map(|(n, i)| join(&n, i)),
        (name.clone(), 1u64..4).prop_map(|(n, i)| dead(&n, i)),
        name.prop_map(|n| MapCommand::Drain { name: n }),
        (shard.clone(), 1u32..4, proptest::collection::vec(member.clone(), 0..4)).prop_map(
            |(start, len, replicas)| MapCommand::Assign(vec![AssignRun { start, len, replicas }])
        ),
        proptest::collection::vec(
            (0u8..4, shard.clone(), epoch, member.clone()).prop_map(|(k, shard, epoch, member)| {
                match k {
                    0 => ShardChange::AddLearner { shard, epoch, member },
                    1 => ShardChange::Promote { shard, epoch, member, turn_version: 0 },
                    2 => ShardChange::SetOwner { shard, epoch, member },
                    _ => ShardChange::Remove { shard, epoch, member },
                }
            }),
            1..4
        )
        .prop_map(MapCommand::Changes),
        (shard, member).prop_map(|(shard, member)| MapCommand::Force { shard, member }),
        ("[a-c]{1,2}", proptest::option::of(0u32..12_000)).prop_map(|(name, bp)| {
            let flag =
                bp.map(|rollout_bp| crate::flags::Flag { enabled: true, rollout_bp, bot: None });
            MapCommand::SetFlag { name, flag }
        }),
    ]
}

/// A table of several chunks: a copy shares them, a change copies only its own, the diff
/// finds exactly the changed entries, the tally follows, and the encoding is the flat one.
#[test]
fn a_large_map_shares_unchanged_parts_between_versions() {
    let shards = 5000;
    let mut map = ShardMap::new(shards);
    for n in ["a", "b", "c"] {
        apply(&mut map, &join(n, 1));
    }
    let runs = (0..shards)
        .step_by(500)
        .map(|start| AssignRun { start, len: 500, replicas: vec![(start / 500 % 3) as u16] })
        .collect();
    assert_eq!(apply(&mut map, &MapCommand::Assign(runs)).changed.len(), shards as usize);
    assert_eq!(map.tally().under_replicated(2), shards);
    let copy = map.clone();
    assert_eq!(map.changed_since(&copy), Some(vec![]));
    let change = |shard, member| ShardChange::AddLearner { shard, epoch: 1, member };
    let cmd = MapCommand::Changes(vec![change(7, 1), change(4099, 0), change(4999, 1)]);
    assert_eq!(apply(&mut map, &cmd).changed, vec![7, 4099, 4999]);
    assert_eq!(map.tally().learning, 3);
    // a owns shards 0..500, 1500..2000, ...; it learns 4099 (owned by c): held 2001.
    assert_eq!((map.owned_by(0), map.held_by(0)), (2000, 2001));
    assert_eq!((map.owned_by(1), map.held_by(1)), (1500, 1502));
    assert_eq!(copy.tally().learning, 0, "the copy did not change");
    assert_eq!(copy.shard(7).unwrap().learners.len(), 0);
    // The dead member's shards (every third run) become unavailable, the tally says so.
    apply(&mut map, &dead("a", 1));
    assert_eq!(map.tally().unavailable, 2000);
    assert_eq!(map.unavailable().count(), 2000);
    let flat: Vec<ShardEntry> = map.shards().copied().collect();
    let bytes = postcard::to_stdvec(&map).unwrap();
    let flat_bytes =
        postcard::to_stdvec(&(map.version, map.members(), &flat, map.flags())).unwrap();
    assert_eq!(bytes, flat_bytes, "encoded as a flat table");
    let back: ShardMap = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, map);
    // A map encoded before maps carried flags (an earlier version's snapshot) decodes.
    let before_flags = postcard::to_stdvec(&(map.version, map.members(), &flat)).unwrap();
    assert!(postcard::from_bytes::<ShardMap>(&before_flags).is_err());
    assert_eq!(ShardMap::decode(&before_flags).unwrap(), map);
    assert!(ShardMap::decode(&before_flags[..before_flags.len() - 1]).is_err());
    assert_eq!(back.tally(), map.tally());
    assert_eq!(back.check(), Vec::<String>::new());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Any sequence of commands, however stale or nonsensical, keeps the map's invariants
    /// and the transition rules, and two maps applying it agree.
    #[test]
    fn any_command_sequence_keeps_the_invariants(cmds in proptest::collection::vec(arb_command(5, 6), 1..60)) {
        let mut map = ShardMap::new(6);
        let mut twin = ShardMap::new(6);
        for cmd in &cmds {
            apply(&mut map, cmd);
            twin.apply(cmd);
        }
        prop_assert_eq!(map, twin);
    }
}

#[test]
fn flags_are_set_changed_and_removed_through_the_log() {
    use crate::flags::Flag;
    let mut map = three();
    let flag = Flag { enabled: true, rollout_bp: 3000, bot: Some("shop".into()) };
    let set = MapCommand::SetFlag { name: "returns-label".into(), flag: Some(flag.clone()) };
    assert!(map.apply(&set).skipped.is_empty());
    assert_eq!(map.flags().get("returns-label"), Some(&flag));
    let bad = MapCommand::SetFlag { name: "Bad Name".into(), flag: Some(flag.clone()) };
    assert_eq!(map.apply(&bad).skipped.len(), 1, "a bad name is skipped, not applied");
    let back = ShardMap::decode(&postcard::to_stdvec(&map).unwrap()).unwrap();
    assert_eq!(back.flags(), map.flags(), "flags travel in snapshots");
    map.apply(&MapCommand::SetFlag { name: "returns-label".into(), flag: None });
    assert!(map.flags().is_empty());
}

#[test]
fn a_map_round_trips_and_a_bad_replica_list_is_refused() {
    let map = three();
    let bytes = postcard::to_stdvec(&map).unwrap();
    assert_eq!(postcard::from_bytes::<ShardMap>(&bytes).unwrap(), map);
    let too_many = postcard::to_stdvec(&vec![1u16; REPLICAS_MAX + 1]).unwrap();
    assert!(postcard::from_bytes::<Replicas>(&too_many).is_err());
    let repeated = postcard::to_stdvec(&vec![1u16, 1]).unwrap();
    assert!(postcard::from_bytes::<Replicas>(&repeated).is_err());
}

#[test]
fn a_command_is_counted_by_its_kind() {
    let promote = ShardChange::Promote { shard: 0, epoch: 1, member: 1, turn_version: 0 };
    let remove = ShardChange::Remove { shard: 1, epoch: 1, member: 2 };
    assert_eq!(join("a", 1).kind(), "join");
    assert_eq!(dead("a", 1).kind(), "dead");
    assert_eq!(MapCommand::Changes(vec![promote, promote]).kind(), "promote");
    assert_eq!(MapCommand::Changes(vec![remove]).kind(), "remove");
    assert_eq!(MapCommand::Changes(vec![promote, remove]).kind(), "changes");
    assert_eq!(MapCommand::Changes(Vec::new()).kind(), "changes");
}

/// Replicas equal by their members are equal values however they were built, and a map
/// equals its own encoding decoded (equality is what lets copies share encodings and
/// applied entries).
#[test]
fn replicas_and_maps_equal_by_content_whatever_their_history() {
    let mut r = Replicas::from_slice(&[3, 7, 9]).unwrap();
    assert!(r.remove(9));
    assert_eq!(r, Replicas::from_slice(&[3, 7]).unwrap());
    r.put_first(7);
    assert_eq!(r, Replicas::from_slice(&[7, 3]).unwrap());
    assert!(r.remove(7) && r.remove(3));
    assert_eq!(r, Replicas::default());

    let mut map = ShardMap::new(4);
    for n in ["a", "b", "c"] {
        map.apply(&MapCommand::Join { name: n.into(), incarnation: 1, capacity: 1 });
    }
    map.apply(&MapCommand::Assign(vec![AssignRun { start: 0, len: 4, replicas: vec![0, 1] }]));
    let learn = |shard| ShardChange::AddLearner { shard, epoch: 1, member: 2 };
    map.apply(&MapCommand::Changes((0..4).map(learn).collect()));
    let drop = |shard| ShardChange::Remove { shard, epoch: 2, member: 2 };
    map.apply(&MapCommand::Changes((0..2).map(drop).collect()));
    map.apply(&MapCommand::Dead { name: "b".into(), incarnation: 1 });
    let decoded = ShardMap::decode(&postcard::to_stdvec(&map).unwrap()).unwrap();
    assert_eq!(decoded, map);
}
