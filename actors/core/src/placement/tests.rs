use proptest::prelude::*;

use super::*;
use botclaw_config::PlacementStrategy;

fn cfg() -> PlacementConfig {
    PlacementConfig::default()
}

fn members(names: &[String]) -> Vec<RingMember> {
    names.iter().map(|n| RingMember { name: n.clone(), capacity: 100 }).collect()
}

#[test]
fn hash_vectors_are_pinned() {
    // These values must never change: every node and every release must agree on them.
    let vectors = [
        // The empty input is XXH3-64's published test vector.
        ("", 0x2d06800538d394c2u64),
        ("c-42", 0x736c09c6d08cde8c),
        ("conversation/🦀", 0x2dee315775644c12),
    ];
    for (input, want) in vectors {
        assert_eq!(conv_hash(input), want, "conv_hash({input:?}) = {:#x}", conv_hash(input));
    }
}

#[test]
fn vnode_positions_hash_name_hash_k() {
    let long = "n".repeat(200);
    for name in ["", "n0", "node-with-a-long-name", long.as_str()] {
        for k in [0, 1, 9, 10, 99, 100, 12_345, u32::MAX] {
            let want = xxh3_64(format!("{name}#{k}").as_bytes());
            assert_eq!(vnode_position(name, k), want, "{name}#{k}");
        }
    }
}

#[test]
fn shard_vectors_are_pinned() {
    let vectors = [("c-42", 262_144, 56_972u32), ("c-43", 262_144, 197_439), ("c-42", 7, 3)];
    for (conv, count, want) in vectors {
        assert_eq!(shard_of(conv, count), want, "shard_of({conv:?}, {count})");
    }
}

#[test]
fn single_node_owns_everything() {
    let p = Placement::build(&members(&["a".into()]), &cfg());
    assert_eq!(p.shard_counts()["a"], cfg().shard_count);
    assert_eq!(p.locate("anything").1, Some("a"));
}

#[test]
fn empty_membership_owns_nothing() {
    let p = Placement::build(&[], &cfg());
    assert_eq!(p.owner(0), None);
    assert!(p.preference_list(0, 2).is_empty());
}

#[test]
fn capacity_weights_shares() {
    let ms = vec![
        RingMember { name: "big".into(), capacity: 200 },
        RingMember { name: "small".into(), capacity: 100 },
    ];
    let p = Placement::build(&ms, &cfg());
    let c = p.shard_counts();
    let ratio = f64::from(c["big"]) / f64::from(c["small"]);
    assert!((1.8..2.2).contains(&ratio), "ratio {ratio}");
}

#[test]
fn preference_list_is_distinct_and_starts_with_owner() {
    let names: Vec<String> = (0..5).map(|i| format!("n{i}")).collect();
    let p = Placement::build(&members(&names), &cfg());
    for shard in [0, 1, 777, cfg().shard_count - 1] {
        let list = p.preference_list(shard, 3);
        assert_eq!(list.len(), 3);
        assert_eq!(Some(list[0]), p.owner(shard));
        let mut dedup = list.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), 3);
    }
    assert_eq!(p.preference_list(0, 9).len(), 5);
}

fn names_strategy() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::btree_set("[a-z][a-z0-9-]{0,15}", 1..=64)
        .prop_map(|s| s.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn same_members_same_owners_in_any_order(mut names in names_strategy(), seed in any::<u64>()) {
        let a = Placement::build(&members(&names), &cfg());
        // A deterministic shuffle: the input order must not matter.
        let len = names.len();
        for i in (1..len).rev() {
            names.swap(i, (seed.rotate_left(i as u32) % (i as u64 + 1)) as usize);
        }
        let b = Placement::build(&members(&names), &cfg());
        prop_assert!(a.moved_shards(&b).is_empty());
    }

    #[test]
    fn a_rebuild_from_any_base_equals_a_fresh_build(
        before in names_strategy(),
        after in names_strategy(),
        keep in proptest::collection::vec(any::<bool>(), 64),
        heavy in any::<usize>(),
        strategy in prop_oneof![
            Just(PlacementStrategy::Ring),
            Just(PlacementStrategy::Bounded),
            Just(PlacementStrategy::Rendezvous),
        ],
    ) {
        // `after` = some of `before`'s members plus others, one of them with a changed
        // capacity.
        let mut next: Vec<RingMember> =
            members(&before).into_iter().zip(&keep).filter(|(_, k)| **k).map(|(m, _)| m).collect();
        next.extend(members(&after));
        if !next.is_empty() {
            let i = heavy % next.len();
            next[i].capacity = 250;
        }
        let cfg = PlacementConfig { strategy, shard_count: 1024, ..cfg() };
        let base = Placement::build(&members(&before), &cfg);
        prop_assert_eq!(Placement::rebuild_from(&base, &next, &cfg), Placement::build(&next, &cfg));
        // A base with other ring points per node is not reused.
        let other = Placement::build(&members(&before), &PlacementConfig { vnodes: cfg.vnodes + 7, ..cfg.clone() });
        prop_assert_eq!(Placement::rebuild_from(&other, &next, &cfg), Placement::build(&next, &cfg));
        let empty = Placement::build(&[], &cfg);
        prop_assert_eq!(Placement::rebuild_from(&empty, &next, &cfg), Placement::build(&next, &cfg));
        prop_assert_eq!(Placement::rebuild_from(&base, &[], &cfg), Placement::build(&[], &cfg));
    }

    #[test]
    fn join_moves_only_to_the_new_node_and_about_one_nth(names in names_strategy()) {
        prop_assume!(names.len() >= 2);
        let (joiner, before) = names.split_last().unwrap();
        let old = Placement::build(&members(before), &cfg());
        let new = Placement::build(&members(&names), &cfg());
        let moved = old.moved_shards(&new);
        for &s in &moved {
            prop_assert_eq!(new.owner(s), Some(joiner.as_str()));
        }
        let n = names.len() as f64;
        let bound = 1.2 * f64::from(cfg().shard_count) / n;
        prop_assert!(moved.len() as f64 <= bound, "{} moved, bound {bound}", moved.len());
    }

    #[test]
    fn leave_moves_only_the_leavers_shards(names in names_strategy()) {
        prop_assume!(names.len() >= 2);
        let old = Placement::build(&members(&names), &cfg());
        let leaver = &names[names.len() / 2];
        let rest: Vec<String> = names.iter().filter(|n| *n != leaver).cloned().collect();
        let new = Placement::build(&members(&rest), &cfg());
        let moved = old.moved_shards(&new);
        for &s in &moved {
            prop_assert_eq!(old.owner(s), Some(leaver.as_str()));
        }
        let bound = 1.2 * f64::from(cfg().shard_count) / names.len() as f64;
        prop_assert!(moved.len() as f64 <= bound, "{} moved, bound {bound}", moved.len());
    }

    #[test]
    fn most_loaded_node_within_ten_percent(names in names_strategy()) {
        let p = Placement::build(&members(&names), &cfg());
        let imbalance = p.imbalance();
        prop_assert!(imbalance <= 1.10, "{} nodes: max/avg {imbalance:.3}", names.len());
    }
}

fn with(strategy: PlacementStrategy) -> PlacementConfig {
    PlacementConfig { shard_count: 16_384, vnodes: 100, strategy, bound_epsilon_permille: 100 }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Bounded loads: nobody above (1 + epsilon) of its fair share, even with few points.
    #[test]
    fn bounded_loads_stay_under_one_plus_epsilon(names in names_strategy()) {
        let p = Placement::build(&members(&names), &with(PlacementStrategy::Bounded));
        let bound = 1.1 + f64::from(names.len() as u32) / 16_384.0; // the cap rounds up
        prop_assert!(p.imbalance() <= bound, "{} nodes: {}", names.len(), p.imbalance());
        let list = p.preference_list(7, 3);
        prop_assert_eq!(list.first().copied(), p.owner(7));
        prop_assert_eq!(list.len(), names.len().min(3));
    }

    /// Rendezvous: a join moves shards only to the joiner, about 1/N of them.
    #[test]
    fn rendezvous_join_moves_only_to_the_new_node(names in names_strategy()) {
        prop_assume!(names.len() >= 2);
        let cfg = with(PlacementStrategy::Rendezvous);
        let (joiner, before) = names.split_last().unwrap();
        let old = Placement::build(&members(before), &cfg);
        let new = Placement::build(&members(&names), &cfg);
        let moved = old.moved_shards(&new);
        for &s in &moved {
            prop_assert_eq!(new.owner(s), Some(joiner.as_str()));
        }
        let expected = 16_384.0 / names.len() as f64;
        prop_assert!((moved.len() as f64) < 1.3 * expected + 30.0, "{} moved of ~{expected}", moved.len());
        let list = new.preference_list(11, 2);
        prop_assert_eq!(list.first().copied(), new.owner(11));
    }
}

#[test]
fn rendezvous_weights_by_capacity() {
    let m = vec![
        RingMember { name: "big".into(), capacity: 300 },
        RingMember { name: "small".into(), capacity: 100 },
    ];
    let p = Placement::build(&m, &with(PlacementStrategy::Rendezvous));
    let big = p.shard_counts()["big"];
    let share = f64::from(big) / 16_384.0;
    assert!((0.72..0.78).contains(&share), "big owns {share}");
}
