//! How a member leaves the map, step by step: a pure decision on the applied map that the
//! node's shutdown and the simulator both follow.
//!
//! Two ways out:
//! - **Restart** (SIGTERM; Kafka's controlled shutdown): no data moves. Once the controller
//!   committed the member as draining (it gets nothing new, and no round re-registers it),
//!   and every shard it holds in sync has another in-sync member, the member asks the
//!   controller to commit its `Leave`: one entry hands each shard it owned to a surviving
//!   in-sync member, which holds every acknowledged turn and serves at once. Shards where it
//!   is the only in-sync member are moved first (the planner moves a draining member's
//!   shards), so none becomes unavailable; the controller skips a `Leave` that would leave
//!   a shard without an in-sync member (two members leaving at once). Back with a new
//!   incarnation, it catches up as a learner.
//! - **Decommission** (an operator's drain): every shard it holds moves away first (copies
//!   streamed to the others), so the replication factor never drops.
//!
//! Either way, when no other active member is up to take its shards (the whole cluster
//! stops), or the controller has no leader it hears from (no majority left: nothing can be
//! committed), it keeps its copies and goes: the shards come back with it, and the others
//! treat its exit as a crash (survivors in sync take over; nothing acknowledged is lost).

use super::{MemberState, ShardMap};

/// Why the member leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveMode {
    /// It comes back (SIGTERM): hand ownership over, move only what has no other copy.
    Restart,
    /// It goes for good (an operator's drain): move every copy away.
    Decommission,
}

/// What the leaving member does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveStep {
    /// The controller has not committed what the next step needs.
    Wait,
    /// Ask the controller to commit [`MapCommand::Leave`](super::MapCommand::Leave) for this
    /// incarnation (repeat until applied: a proposal is lost when the leader changes, and
    /// skipped when a concurrent leave made this member the last copy of a shard).
    ProposeLeave,
    /// Nobody can take its shards: keep the copies, close the actors once their turns are
    /// durable.
    KeepCopies,
    /// It holds nothing the others need: close the actors and leave.
    Done,
}

/// The next step for member `me` (incarnation `incarnation`) leaving by `mode`, on `map`;
/// `others_up`: another active member of the map is up (the failure detector's word);
/// `controller_heard`: this member heard from the controller's leader recently.
pub fn leave_step(
    map: &ShardMap,
    me: &str,
    incarnation: u64,
    mode: LeaveMode,
    others_up: bool,
    controller_heard: bool,
) -> LeaveStep {
    let Some(ix) = map.member_ix(me) else { return LeaveStep::Done };
    let m = map.member(ix).expect("a member's slot exists");
    if m.incarnation != incarnation || m.state.is_gone() {
        // Never registered as this process, or already out of every ISR it is not the
        // last of.
        return LeaveStep::Done;
    }
    if map.held_by(ix) == 0 {
        return LeaveStep::Done;
    }
    if !others_up || !controller_heard {
        return LeaveStep::KeepCopies;
    }
    match (mode, m.state) {
        (_, MemberState::Active) => LeaveStep::Wait,
        (LeaveMode::Decommission, _) => LeaveStep::Wait,
        (LeaveMode::Restart, _) if map.sole_in_sync(ix) == 0 => LeaveStep::ProposeLeave,
        (LeaveMode::Restart, _) => LeaveStep::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shardmap::{AssignRun, MapCommand, ShardChange};

    fn map(replicas: &[&[u16]]) -> ShardMap {
        let mut map = ShardMap::new(replicas.len() as u32);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            map.apply(&MapCommand::Join {
                name: (*name).into(),
                incarnation: 7 + i as u64,
                capacity: 100,
            });
        }
        let runs = (replicas.iter().enumerate())
            .map(|(s, r)| AssignRun { start: s as u32, len: 1, replicas: r.to_vec() })
            .collect();
        map.apply(&MapCommand::Assign(runs));
        map
    }

    const R: LeaveMode = LeaveMode::Restart;
    const D: LeaveMode = LeaveMode::Decommission;

    #[test]
    fn a_restart_hands_ownership_over_once_draining_and_nothing_is_a_sole_copy() {
        // a owns shard 0 with b in sync, and is the only in-sync member of shard 1.
        let mut m = map(&[&[0, 1], &[0], &[1, 2]]);
        assert_eq!(leave_step(&m, "a", 7, R, true, true), LeaveStep::Wait, "not draining yet");
        m.apply(&MapCommand::Drain { name: "a".into() });
        assert_eq!(
            leave_step(&m, "a", 7, R, true, true),
            LeaveStep::Wait,
            "shard 1 has no other copy"
        );
        assert_eq!(leave_step(&m, "a", 7, R, false, true), LeaveStep::KeepCopies);
        assert_eq!(leave_step(&m, "a", 7, R, true, false), LeaveStep::KeepCopies, "no majority");
        // The planner moves shard 1: c learns it, then joins its ISR.
        let e = m.shard(1).unwrap().epoch;
        m.apply(&MapCommand::Changes(vec![ShardChange::AddLearner {
            shard: 1,
            epoch: e,
            member: 2,
        }]));
        assert_eq!(
            leave_step(&m, "a", 7, R, true, true),
            LeaveStep::Wait,
            "a learner is no copy yet"
        );
        m.apply(&MapCommand::Changes(vec![ShardChange::Promote {
            shard: 1,
            epoch: e + 1,
            member: 2,
            turn_version: 0,
        }]));
        assert_eq!(leave_step(&m, "a", 7, R, true, true), LeaveStep::ProposeLeave);
        // A decommission waits for every copy to move.
        assert_eq!(leave_step(&m, "a", 7, D, true, true), LeaveStep::Wait);
        let applied = m.apply(&MapCommand::Leave { name: "a".into(), incarnation: 7 });
        assert_eq!(applied.changed, vec![0, 1]);
        assert_eq!(m.owner(0), Some("b"), "the surviving in-sync member owns it at once");
        assert_eq!(m.owner(1), Some("c"));
        assert!(m.unavailable().next().is_none(), "no shard became unavailable");
        assert_eq!(leave_step(&m, "a", 7, R, true, true), LeaveStep::Done);
        // The process has exited: a leader still seeing its gossip identity does not
        // register it again; a new process does.
        let up = [crate::shardmap::UpMember::new("a", 7, 100)];
        assert!(crate::shardmap::plan_membership(&m, &up)
            .iter()
            .all(|c| !matches!(c, MapCommand::Join { name, .. } if name == "a")));
        let skipped =
            m.apply(&MapCommand::Join { name: "a".into(), incarnation: 7, capacity: 100 });
        assert_eq!(skipped.skipped.len(), 1, "{skipped:?}");
        m.apply(&MapCommand::Join { name: "a".into(), incarnation: 8, capacity: 100 });
        assert_eq!(m.member(0).unwrap().state, MemberState::Active);
    }

    #[test]
    fn two_members_leaving_at_once_never_leave_a_shard_without_a_copy() {
        // Shard 0 lives on a and b only.
        let mut m = map(&[&[0, 1], &[1, 2], &[2, 0]]);
        m.apply(&MapCommand::Drain { name: "a".into() });
        m.apply(&MapCommand::Drain { name: "b".into() });
        // Both decided on the same map that they may go; the log orders their leaves.
        assert_eq!(leave_step(&m, "a", 7, R, true, true), LeaveStep::ProposeLeave);
        assert_eq!(leave_step(&m, "b", 8, R, true, true), LeaveStep::ProposeLeave);
        assert!(m
            .apply(&MapCommand::Leave { name: "a".into(), incarnation: 7 })
            .skipped
            .is_empty());
        let second = m.apply(&MapCommand::Leave { name: "b".into(), incarnation: 8 });
        assert_eq!(second.skipped.len(), 1, "b is now shard 0's only copy: {second:?}");
        assert!(second.changed.is_empty());
        assert!(m.unavailable().next().is_none());
        assert_eq!(
            leave_step(&m, "b", 8, R, true, true),
            LeaveStep::Wait,
            "b waits for shard 0 to move"
        );
        // A crash, unlike a leave, is taken whatever it costs: the shard waits for b.
        m.apply(&MapCommand::Dead { name: "b".into(), incarnation: 8 });
        assert_eq!(m.unavailable().collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn only_this_incarnation_leaves_and_a_member_holding_nothing_is_done() {
        let mut m = map(&[&[1, 0], &[1, 2]]);
        m.apply(&MapCommand::Drain { name: "a".into() });
        assert_eq!(leave_step(&m, "a", 6, R, true, true), LeaveStep::Done, "another process");
        assert_eq!(leave_step(&m, "a", 7, R, true, true), LeaveStep::ProposeLeave);
        assert_eq!(leave_step(&m, "c", 9, R, true, true), LeaveStep::Wait, "c is active");
        assert_eq!(leave_step(&m, "nobody", 1, R, true, true), LeaveStep::Done);
        let m = map(&[&[1], &[1, 2]]);
        assert_eq!(leave_step(&m, "a", 7, D, false, true), LeaveStep::Done, "a holds nothing");
    }
}
