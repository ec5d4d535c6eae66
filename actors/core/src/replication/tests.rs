use super::*;

fn e(term: u64, node: u64) -> Epoch {
    Epoch { term, node }
}

fn v(epoch: Epoch, turn: u64) -> Version {
    Version { epoch, turn }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn epochs_order_by_term_then_node_and_always_rise() {
    assert!(e(2, 0) > e(1, u64::MAX));
    assert!(e(1, 2) > e(1, 1));
    let next = Epoch::after(e(7, 3), "n1");
    assert_eq!(next.term, 8);
    assert_ne!(Epoch::after(e(7, 3), "n1"), Epoch::after(e(7, 3), "n2"));
}

#[test]
fn a_fence_is_promised_once_and_older_epochs_are_refused() {
    let r = Replica { version: v(e(1, 1), 5), promised: e(1, 1) };
    let Decision::Apply { to } = r.decide(Op::Fence { epoch: e(2, 9) }) else { panic!() };
    assert_eq!(to.promised, e(2, 9));
    assert_eq!(to.version, r.version, "a fence does not touch the data");
    assert_eq!(to.decide(Op::Fence { epoch: e(2, 9) }), Decision::Stale { promised: e(2, 9) });
    assert_eq!(to.decide(Op::Fence { epoch: e(2, 1) }), Decision::Stale { promised: e(2, 9) });
}

#[test]
fn a_stale_owner_cannot_write_after_a_newer_fence() {
    let old = e(1, 1);
    let r = Replica { version: v(old, 5), promised: e(2, 2) };
    assert_eq!(
        r.decide(Op::Write { epoch: old, base: v(old, 5) }),
        Decision::Stale { promised: e(2, 2) }
    );
    assert_eq!(
        r.decide(Op::Install { epoch: old, version: v(old, 9) }),
        Decision::Stale { promised: e(2, 2) }
    );
    // The new owner writes on the same base.
    let Decision::Apply { to } = r.decide(Op::Write { epoch: e(2, 2), base: v(old, 5) }) else {
        panic!()
    };
    assert_eq!(to.version, v(e(2, 2), 6));
}

#[test]
fn writes_follow_their_base_and_repeat_harmlessly() {
    let ep = e(3, 1);
    let r = Replica { version: v(ep, 4), promised: ep };
    let Decision::Apply { to } = r.decide(Op::Write { epoch: ep, base: v(ep, 4) }) else {
        panic!()
    };
    assert_eq!(to.version, v(ep, 5));
    assert_eq!(to.decide(Op::Write { epoch: ep, base: v(ep, 4) }), Decision::Have);
    assert_eq!(to.decide(Op::Write { epoch: ep, base: v(ep, 3) }), Decision::Have);
    assert_eq!(
        to.decide(Op::Write { epoch: ep, base: v(ep, 7) }),
        Decision::Behind { version: v(ep, 5) },
        "a gap is never papered over"
    );
    // Same turn number, different writer: a divergent copy must be replaced, not extended.
    let diverged = Replica { version: v(e(2, 5), 4), promised: e(2, 5) };
    assert_eq!(
        diverged.decide(Op::Write { epoch: ep, base: v(e(2, 1), 4) }),
        Decision::Behind { version: v(e(2, 5), 4) }
    );
    // A replica that never saw the owner's fence (it joined the list later) takes its write.
    let fresh = Replica::default();
    assert!(matches!(
        fresh.decide(Op::Write { epoch: ep, base: Version::default() }),
        Decision::Apply { .. }
    ));
}

#[test]
fn installs_replace_older_data_but_never_go_back_within_an_epoch() {
    let ep = e(4, 1);
    let stale_turns = Replica { version: v(e(3, 2), 9), promised: e(3, 2) };
    let Decision::Apply { to } =
        stale_turns.decide(Op::Install { epoch: ep, version: v(e(3, 1), 7) })
    else {
        panic!()
    };
    assert_eq!(to, Replica { version: v(e(3, 1), 7), promised: ep });
    let ahead = Replica { version: v(ep, 8), promised: ep };
    assert_eq!(ahead.decide(Op::Install { epoch: ep, version: v(ep, 6) }), Decision::Have);
    assert_eq!(ahead.decide(Op::Install { epoch: ep, version: v(ep, 8) }), Decision::Have);
    // The same data from a newer owner: only the promise rises.
    let newer = e(5, 3);
    assert_eq!(
        ahead.decide(Op::Install { epoch: newer, version: v(ep, 8) }),
        Decision::Apply { to: Replica { version: v(ep, 8), promised: newer } }
    );
    // Further within the writer's epoch: kept as it is.
    assert_eq!(ahead.decide(Op::Install { epoch: newer, version: v(ep, 6) }), Decision::Have);
    // Written by the sender itself after the copy it sends (a learner that took a new
    // owner's copy and next turn before the owner's stream of an older read): kept.
    let own_next = Replica { version: v(newer, 9), promised: newer };
    assert_eq!(own_next.decide(Op::Install { epoch: newer, version: v(ep, 8) }), Decision::Have);
}

#[test]
fn newest_prefers_epoch_over_turn_and_the_first_of_equals() {
    let answers = [v(e(1, 1), 9), v(e(2, 1), 3), v(e(2, 1), 3), v(e(1, 9), 20)];
    assert_eq!(newest(&answers), Some(1));
    assert_eq!(newest(&[]), None);
}

#[test]
fn write_quorum_is_bounded_by_the_live_list() {
    assert_eq!(write_quorum(2, 2), 2);
    assert_eq!(write_quorum(2, 1), 1);
    assert_eq!(write_quorum(3, 2), 2);
    assert_eq!(write_quorum(0, 3), 1);
}

#[test]
fn majority_of_three_survives_one_crash_then_a_second_by_lowest_name() {
    let mut g = MajorityGuard::new("a", 0, 1000);
    assert!(g.observe(&set(&["a", "b", "c"]), 0));
    assert!(g.observe(&set(&["a", "b", "c"]), 1000));
    assert_eq!(g.baseline(), &set(&["a", "b", "c"]));
    // c crashes: 2 of 3.
    assert!(g.observe(&set(&["a", "b"]), 2000));
    assert!(g.observe(&set(&["a", "b"]), 3000));
    assert_eq!(g.baseline(), &set(&["a", "b"]));
    // b crashes too: an exact half; a is the lowest name of the baseline.
    assert!(g.observe(&set(&["a"]), 4000));
    let mut other = MajorityGuard::new("b", 0, 1000);
    other.observe(&set(&["a", "b"]), 0);
    other.observe(&set(&["a", "b"]), 1000);
    assert!(!other.observe(&set(&["b"]), 2000), "b alone is the half without the lowest name");
}

#[test]
fn a_minority_never_promotes_itself_and_heals_with_the_majority() {
    let mut c = MajorityGuard::new("c", 0, 1000);
    c.observe(&set(&["a", "b", "c"]), 0);
    c.observe(&set(&["a", "b", "c"]), 1000);
    for t in (2000..60_000).step_by(500) {
        assert!(!c.observe(&set(&["c"]), t), "cut off at {t}");
    }
    assert_eq!(c.baseline(), &set(&["a", "b", "c"]));
    assert!(c.observe(&set(&["a", "b", "c"]), 61_000));
}

#[test]
fn joiners_grow_the_baseline_once_stable() {
    let mut g = MajorityGuard::new("a", 0, 1000);
    assert!(g.observe(&set(&["a"]), 0));
    assert!(g.observe(&set(&["a", "b", "c", "d", "e"]), 10));
    assert_eq!(g.baseline(), &set(&["a"]), "not stable yet");
    g.observe(&set(&["a", "b", "c", "d", "e"]), 1010);
    assert_eq!(g.baseline().len(), 5);
    // Losing three of five at once is a minority.
    assert!(!g.observe(&set(&["a", "b"]), 2000));
}

#[test]
fn a_tick_is_observing_the_same_members_again() {
    let mut observed = MajorityGuard::new("a", 0, 1000);
    let mut ticked = observed.clone();
    let steps: [(&[&str], u64); 8] = [
        (&["a", "b", "c"], 0),
        (&["a", "b", "c"], 1500),
        (&["a", "b"], 2000),
        (&["a", "b"], 3500),
        (&["b"], 3600),
        (&["b"], 5000),
        (&["a"], 6000),
        (&["a"], 7500),
    ];
    let mut last: Option<&[&str]> = None;
    for (live, t) in steps {
        let expected = observed.observe(&set(live), t);
        let got = if last == Some(live) { ticked.tick(t) } else { ticked.observe(&set(live), t) };
        assert_eq!(got, expected, "at {t}");
        assert_eq!(ticked.baseline(), observed.baseline(), "at {t}");
        last = Some(live);
    }
    // Ticks promote a stable membership ({a,b} of {a,b,c}; then {a}, the lowest-named half of
    // {a,b}) and never a minority ({b} alone).
    assert_eq!(ticked.baseline(), &set(&["a"]));
}
