//! Keeps the controller group in shape, as the leader's decision: every live member of the
//! map, and every node the failure detector sees up (gateways that own no shard route by
//! the map too), receives the log as a learner; the others leave the group. It keeps
//! `voters_target` voters, promoting caught-up learners while there are fewer and replacing a
//! voter the map has declared dead for `replace_after_ms` (Consul's autopilot, etcd's learner
//! promotion). One change per round: raft-rs takes one configuration change at a time.

use std::collections::{BTreeMap, BTreeSet};

use super::{controller_id, ControllerId, GroupChange};
use crate::shardmap::{MemberState, ShardMap};

/// The group as the leader sees it now.
#[derive(Debug, Clone, Copy)]
pub struct GroupView<'a> {
    pub leader: ControllerId,
    pub voters: &'a [ControllerId],
    pub learners: &'a [ControllerId],
}

/// The leader's memory of voters it found dead (a new leader starts counting afresh).
#[derive(Debug, Default, Clone)]
pub struct Autopilot {
    dead_since_ms: BTreeMap<ControllerId, u64>,
}

impl Autopilot {
    /// The group change to propose now, if any. `up` are the nodes the failure detector
    /// sees up; `caught_up` says whether a learner's log matches the leader's committed log.
    #[allow(clippy::too_many_arguments)]
    pub fn round(
        &mut self,
        now_ms: u64,
        map: &ShardMap,
        group: GroupView<'_>,
        up: &BTreeSet<ControllerId>,
        caught_up: impl Fn(ControllerId) -> bool,
        voters_target: usize,
        replace_after_ms: u64,
    ) -> Option<Vec<(ControllerId, GroupChange)>> {
        let state: BTreeMap<ControllerId, (MemberState, &str)> = map
            .members()
            .iter()
            .map(|m| (controller_id(&m.name), (m.state, m.name.as_str())))
            .collect();
        let dead = |id: &ControllerId| state.get(id).is_some_and(|(s, _)| s.is_gone());
        let in_group: BTreeSet<ControllerId> =
            group.voters.iter().chain(group.learners).copied().collect();
        // Voters dead long enough to replace (never the leader: it is running this).
        self.dead_since_ms.retain(|id, _| group.voters.contains(id) && dead(id));
        for id in group.voters.iter().filter(|id| dead(id) && **id != group.leader) {
            self.dead_since_ms.entry(*id).or_insert(now_ms);
        }
        // Learners first: every live node receives the map, the others leave.
        let live: BTreeSet<ControllerId> = state
            .iter()
            .filter(|(_, (s, _))| !s.is_gone())
            .map(|(id, _)| *id)
            .chain(up.iter().copied())
            .collect();
        let mut changes: Vec<(ControllerId, GroupChange)> = live
            .iter()
            .filter(|id| !in_group.contains(id))
            .map(|id| (*id, GroupChange::AddLearner))
            .collect();
        changes.extend(
            group
                .learners
                .iter()
                .filter(|id| !live.contains(id))
                .map(|id| (*id, GroupChange::Remove)),
        );
        if !changes.is_empty() {
            return Some(changes);
        }
        let mut candidates: Vec<(&str, ControllerId)> = group
            .learners
            .iter()
            .filter_map(|id| match state.get(id) {
                Some((MemberState::Active, name)) if caught_up(*id) => Some((*name, *id)),
                _ => None,
            })
            .collect();
        candidates.sort_unstable();
        let candidate = candidates.first().map(|(_, id)| *id);
        // Grown by two from an odd count while the target allows: an even count tolerates
        // no more deaths than the odd count below it, and a group of two stops at either's
        // death (a young cluster's second voter killed stopped its controller for good).
        let grow = voters_target.saturating_sub(group.voters.len());
        let step = if group.voters.len() % 2 == 1 && grow >= 2 { 2 } else { 1 };
        let replace = self
            .dead_since_ms
            .iter()
            .filter(|(_, since)| now_ms.saturating_sub(**since) >= replace_after_ms)
            .map(|(id, _)| *id)
            .min();
        match (replace, candidate) {
            (Some(gone), Some(new)) => {
                Some(vec![(gone, GroupChange::Remove), (new, GroupChange::AddVoter)])
            }
            (Some(gone), None) if group.voters.len() > voters_target => {
                Some(vec![(gone, GroupChange::Remove)])
            }
            (None, Some(_)) if grow > 0 && candidates.len() >= step => Some(
                candidates[..step].iter().map(|(_, id)| (*id, GroupChange::AddVoter)).collect(),
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shardmap::MapCommand;

    fn map_of(members: &[(&str, MemberState)]) -> ShardMap {
        let mut map = ShardMap::new(8);
        for (name, state) in members {
            map.apply(&MapCommand::Join { name: (*name).into(), incarnation: 1, capacity: 100 });
            match state {
                MemberState::Dead => {
                    map.apply(&MapCommand::Dead { name: (*name).into(), incarnation: 1 });
                }
                MemberState::Draining => {
                    map.apply(&MapCommand::Drain { name: (*name).into() });
                }
                _ => {}
            }
        }
        map
    }

    fn none() -> BTreeSet<ControllerId> {
        BTreeSet::new()
    }

    fn id(name: &str) -> ControllerId {
        controller_id(name)
    }

    #[test]
    fn every_live_member_and_up_node_becomes_a_learner_and_dead_learners_leave() {
        use MemberState::*;
        let map = map_of(&[("a", Active), ("b", Active), ("c", Draining), ("d", Dead)]);
        let (voters, learners) = ([id("a")], [id("d")]);
        let group = GroupView { leader: id("a"), voters: &voters, learners: &learners };
        let mut pilot = Autopilot::default();
        let mut change =
            pilot.round(0, &map, group, &BTreeSet::from([id("e")]), |_| true, 3, 1000).unwrap();
        change.sort_unstable();
        let mut want = vec![
            (id("b"), GroupChange::AddLearner),
            (id("c"), GroupChange::AddLearner),
            (id("d"), GroupChange::Remove),
            (id("e"), GroupChange::AddLearner),
        ];
        want.sort_unstable();
        assert_eq!(change, want);
    }

    #[test]
    fn caught_up_active_learners_are_promoted_two_at_a_time_from_an_odd_count() {
        use MemberState::*;
        let names = ["a", "b", "c", "d", "e"];
        let map = map_of(&names.map(|n| (n, Active)));
        let mut pilot = Autopilot::default();
        let voters = [id("a")];
        let learners = [id("b"), id("c"), id("d"), id("e")];
        let group = GroupView { leader: id("a"), voters: &voters, learners: &learners };
        // Nobody caught up: nothing.
        assert_eq!(pilot.round(0, &map, group, &none(), |_| false, 3, 1000), None);
        // One caught up: not alone (two voters would stop at either's death).
        let ready = |i: ControllerId| i == id("c");
        assert_eq!(pilot.round(0, &map, group, &none(), ready, 3, 1000), None);
        // Two caught up: both at once, by name.
        let ready = |i: ControllerId| i == id("c") || i == id("e");
        assert_eq!(
            pilot.round(0, &map, group, &none(), ready, 3, 1000),
            Some(vec![(id("c"), GroupChange::AddVoter), (id("e"), GroupChange::AddVoter)])
        );
        // From an even count, one makes it odd.
        let voters = [id("a"), id("b")];
        let learners = [id("c"), id("d"), id("e")];
        let group = GroupView { leader: id("a"), voters: &voters, learners: &learners };
        assert_eq!(
            pilot.round(0, &map, group, &none(), |_| true, 3, 1000),
            Some(vec![(id("c"), GroupChange::AddVoter)])
        );
        // At the target: nothing more; below a target of 5 from 3, again two at once.
        let voters = [id("a"), id("b"), id("c")];
        let learners = [id("d"), id("e")];
        let group = GroupView { leader: id("a"), voters: &voters, learners: &learners };
        assert_eq!(pilot.round(0, &map, group, &none(), |_| true, 3, 1000), None);
        let ready = |i: ControllerId| i == id("d");
        assert_eq!(pilot.round(0, &map, group, &none(), ready, 5, 1000), None);
        assert_eq!(
            pilot.round(0, &map, group, &none(), |_| true, 5, 1000),
            Some(vec![(id("d"), GroupChange::AddVoter), (id("e"), GroupChange::AddVoter)])
        );
        // A target one above an odd count: the operator asked for it.
        assert_eq!(
            pilot.round(0, &map, group, &none(), ready, 4, 1000),
            Some(vec![(id("d"), GroupChange::AddVoter)])
        );
    }

    #[test]
    fn a_dead_voter_is_replaced_only_after_the_grace_and_only_by_a_caught_up_learner() {
        use MemberState::*;
        let map = map_of(&[("a", Active), ("b", Dead), ("c", Active), ("d", Active)]);
        let mut pilot = Autopilot::default();
        let voters = [id("a"), id("b"), id("c")];
        let learners = [id("d")];
        let group = GroupView { leader: id("a"), voters: &voters, learners: &learners };
        assert_eq!(
            pilot.round(100, &map, group, &none(), |_| true, 3, 1000),
            None,
            "not dead long enough"
        );
        assert_eq!(pilot.round(1099, &map, group, &none(), |_| true, 3, 1000), None);
        assert_eq!(
            pilot.round(1100, &map, group, &none(), |_| false, 3, 1000),
            None,
            "no replacement"
        );
        assert_eq!(
            pilot.round(1100, &map, group, &none(), |_| true, 3, 1000),
            Some(vec![(id("b"), GroupChange::Remove), (id("d"), GroupChange::AddVoter)])
        );
        // Back (a new incarnation joined): the clock starts over.
        let back = map_of(&[("a", Active), ("b", Active), ("c", Active), ("d", Active)]);
        assert_eq!(pilot.round(1200, &back, group, &none(), |_| true, 3, 1000), None);
        assert_eq!(pilot.round(1300, &map, group, &none(), |_| true, 3, 1000), None);
    }

    #[test]
    fn the_leader_never_removes_itself_and_a_surplus_dead_voter_just_leaves() {
        use MemberState::*;
        let map = map_of(&[("a", Dead), ("b", Dead), ("c", Active), ("d", Active)]);
        let voters = [id("a"), id("b"), id("c"), id("d")];
        let group = GroupView { leader: id("a"), voters: &voters, learners: &[] };
        let mut pilot = Autopilot::default();
        assert_eq!(pilot.round(0, &map, group, &none(), |_| true, 3, 10), None);
        assert_eq!(
            pilot.round(10, &map, group, &none(), |_| true, 3, 10),
            Some(vec![(id("b"), GroupChange::Remove)])
        );
    }
}
