//! Keeps the controller group in shape, as the leader's decision. The group holds the
//! voters and the learners about to become voters; every other node follows the map as an
//! observer ([`super::observe`]). It keeps `voters_target` voters, promoting caught-up
//! learners while there are fewer and replacing a voter the map has declared dead for
//! `replace_after_ms` (Consul's autopilot, etcd's learner promotion); a learner is an
//! observer taken in for that (an active member of the map the failure detector sees up,
//! caught-up ones first), and leaves when it is gone or no longer wanted. One change per
//! round: raft-rs takes one configuration change at a time.

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
    /// sees up; `caught_up` says whether a node's map holds the leader's committed log.
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
        // Voters dead long enough to replace (never the leader: it is running this).
        self.dead_since_ms.retain(|id, _| group.voters.contains(id) && dead(id));
        for id in group.voters.iter().filter(|id| dead(id) && **id != group.leader) {
            self.dead_since_ms.entry(*id).or_insert(now_ms);
        }
        // Gone learners leave first.
        let live = |id: &ControllerId| !dead(id) && (state.contains_key(id) || up.contains(id));
        let gone: Vec<(ControllerId, GroupChange)> = (group.learners.iter())
            .filter(|id| !live(id))
            .map(|id| (*id, GroupChange::Remove))
            .collect();
        if !gone.is_empty() {
            return Some(gone);
        }
        let active = |id: &ControllerId| matches!(state.get(id), Some((MemberState::Active, _)));
        let mut candidates: Vec<(&str, ControllerId)> = group
            .learners
            .iter()
            .filter(|id| active(id) && caught_up(**id))
            .map(|id| (state[id].1, *id))
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
                return Some(vec![(gone, GroupChange::Remove), (new, GroupChange::AddVoter)])
            }
            (Some(gone), None) if group.voters.len() > voters_target => {
                return Some(vec![(gone, GroupChange::Remove)])
            }
            (None, Some(_)) if grow > 0 && candidates.len() >= step => {
                let promote = candidates[..step].iter().map(|(_, id)| (*id, GroupChange::AddVoter));
                return Some(promote.collect());
            }
            _ => {}
        }
        // Learners wanted: one while a voter is dead (caught up by the time its grace
        // runs out), else as many as the next growth step.
        let wanted = match (self.dead_since_ms.is_empty(), grow) {
            (false, _) => 1,
            (true, 0) => 0,
            (true, _) => step,
        };
        if wanted == 0 && !group.learners.is_empty() {
            // No voter wanted: the learners go back to observing.
            return Some(group.learners.iter().map(|id| (*id, GroupChange::Remove)).collect());
        }
        if group.learners.len() >= wanted {
            return None;
        }
        // Observers taken in as learners: active members that are up, caught-up ones first.
        let in_group = |id: &ControllerId| group.voters.contains(id) || group.learners.contains(id);
        let mut observers: Vec<(bool, &str, ControllerId)> = (state.iter())
            .filter(|(id, _)| active(id) && up.contains(id) && !in_group(id))
            .map(|(id, (_, name))| (!caught_up(*id), *name, *id))
            .collect();
        observers.sort_unstable();
        let take = wanted - group.learners.len();
        let added: Vec<(ControllerId, GroupChange)> = (observers.iter().take(take))
            .map(|(_, _, id)| (*id, GroupChange::AddLearner))
            .collect();
        (!added.is_empty()).then_some(added)
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
    fn gone_learners_leave_and_up_active_observers_become_learners_caught_up_first() {
        use MemberState::*;
        let map = map_of(&[
            ("a", Active),
            ("b", Active),
            ("c", Draining),
            ("d", Dead),
            ("e", Active),
            ("f", Active),
        ]);
        let up = BTreeSet::from([id("b"), id("c"), id("e"), id("f")]);
        let caught_up = |i: ControllerId| i == id("f");
        let mut pilot = Autopilot::default();
        let voters = [id("a")];
        let group = GroupView { leader: id("a"), voters: &voters, learners: &[id("d")] };
        assert_eq!(
            pilot.round(0, &map, group, &up, caught_up, 3, 1000),
            Some(vec![(id("d"), GroupChange::Remove)]),
            "a dead learner leaves first"
        );
        // Two wanted (one voter, three the target): the caught-up one first, then by name;
        // never a draining member, nor one the failure detector does not see up.
        let group = GroupView { leader: id("a"), voters: &voters, learners: &[] };
        assert_eq!(
            pilot.round(0, &map, group, &up, caught_up, 3, 1000),
            Some(vec![(id("f"), GroupChange::AddLearner), (id("b"), GroupChange::AddLearner)])
        );
        let group = GroupView { leader: id("a"), voters: &voters, learners: &[id("b")] };
        assert_eq!(
            pilot.round(0, &map, group, &up, caught_up, 3, 1000),
            Some(vec![(id("f"), GroupChange::AddLearner)])
        );
        assert_eq!(pilot.round(0, &map, group, &none(), caught_up, 3, 1000), None, "none up");
        // At the target, learners go back to observing.
        let voters = [id("a"), id("b"), id("f")];
        let group = GroupView { leader: id("a"), voters: &voters, learners: &[id("e")] };
        assert_eq!(
            pilot.round(0, &map, group, &up, caught_up, 3, 1000),
            Some(vec![(id("e"), GroupChange::Remove)])
        );
        let group = GroupView { leader: id("a"), voters: &voters, learners: &[] };
        assert_eq!(pilot.round(0, &map, group, &up, caught_up, 3, 1000), None);
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
        assert_eq!(
            pilot.round(0, &map, group, &none(), |_| true, 3, 1000),
            Some(vec![(id("d"), GroupChange::Remove), (id("e"), GroupChange::Remove)]),
            "at the target, learners are no longer wanted"
        );
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
        // Back (a new incarnation joined): the clock starts over, and the learner kept for
        // the replacement is no longer wanted.
        let back = map_of(&[("a", Active), ("b", Active), ("c", Active), ("d", Active)]);
        assert_eq!(
            pilot.round(1200, &back, group, &none(), |_| true, 3, 1000),
            Some(vec![(id("d"), GroupChange::Remove)])
        );
        assert_eq!(pilot.round(1300, &map, group, &none(), |_| true, 3, 1000), None);
        // Dead with no learner: an up observer is taken in at once, to be caught up when
        // the grace runs out.
        let group = GroupView { leader: id("a"), voters: &voters, learners: &[] };
        let up = BTreeSet::from([id("c"), id("d")]);
        assert_eq!(
            pilot.round(1400, &map, group, &up, |_| true, 3, 1000),
            Some(vec![(id("d"), GroupChange::AddLearner)])
        );
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
