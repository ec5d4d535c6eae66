//! The controller leader's planning round, shared by the node and the simulator: the group
//! change the autopilot wants, then the map commands the planner proposes (membership from
//! the failure detector, first owners, moves toward the ring over the map's active members).

use super::autopilot::{Autopilot, GroupView};
use std::collections::BTreeSet;

use super::{controller_id, Controller, ControllerId, GroupChange};
use crate::placement::{Placement, RingMember, ShardId};
use crate::shardmap::plan::{members_key, plan_with, Desired, PlanConfig, UpMember};
use crate::shardmap::{MapCommand, ShardMap};
use botclaw_config::PlacementConfig;

/// What one round proposes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    pub group: Option<Vec<(ControllerId, GroupChange)>>,
    pub commands: Vec<MapCommand>,
}

/// The leader's planner: its autopilot memory and the ring over the map's active members
/// (rebuilt only when they change).
#[derive(Debug)]
pub struct LeaderPlanner {
    pilot: Autopilot,
    /// The ring over the map's active members and the members it wants per shard.
    ring: Option<(Vec<RingMember>, Placement, Desired)>,
    placement: PlacementConfig,
    pub plan: PlanConfig,
    voters_target: usize,
    replace_after_ms: u64,
    /// When the last round ran, and the map version it saw.
    last: Option<(u64, u64)>,
    /// The last round proposed nothing on this map version and these inputs (a hash of
    /// the members up and the pins): the next with the same proposes nothing either (the
    /// plan is a pure function of them), so it skips the scan of every shard.
    quiet: Option<(u64, u64)>,
    /// The failure detector's members changed since the last round.
    members_changed: bool,
    /// The last round held back moves to members whose map is not current.
    held: bool,
}

impl LeaderPlanner {
    pub fn new(
        placement: PlacementConfig,
        plan: PlanConfig,
        voters_target: usize,
        replace_after_ms: u64,
    ) -> LeaderPlanner {
        LeaderPlanner {
            pilot: Autopilot::default(),
            ring: None,
            placement,
            plan,
            voters_target,
            replace_after_ms,
            last: None,
            quiet: None,
            members_changed: false,
            held: false,
        }
    }

    /// The failure detector's members changed (one was declared down, came up or
    /// announced a new identity): the next round is due at once, so a crashed owner's
    /// shards get their new owners one commit after detection, not up to an interval later.
    pub fn members_changed(&mut self) {
        self.members_changed = true;
    }

    /// When the next round is due: `interval_ms` after the last one, `after_change_ms`
    /// after it if the map changed since or moves wait for a member's map, at once if the
    /// members did (and before the first).
    pub fn next_round_ms(&self, map_version: u64) -> u64 {
        match self.last {
            None => 0,
            Some((at, _)) if self.members_changed => at,
            Some((at, seen)) if seen != map_version || self.held => at + self.plan.after_change_ms,
            Some((at, _)) => at + self.plan.interval_ms,
        }
    }

    /// The last round ran on `map_version`, proposed nothing and held back nothing: the map
    /// is where the ring and the pins want it (no move is pending, not only none in
    /// flight).
    pub fn settled(&self, map_version: u64) -> bool {
        !self.held && self.quiet.is_some_and(|(v, _)| v == map_version)
    }

    pub fn due(&self, now_ms: u64, map_version: u64) -> bool {
        now_ms >= self.next_round_ms(map_version)
    }

    /// A due round this member skipped (it does not lead, or it has not joined): the next
    /// one is an interval away.
    pub fn skip(&mut self, now_ms: u64, map_version: u64) {
        self.last = Some((now_ms, map_version));
        self.members_changed = false;
    }

    /// The ring over `map`'s active members and the members it wants per shard (cached
    /// while the active members stay the same).
    pub fn ring(&mut self, map: &ShardMap) -> (&Placement, &Desired) {
        let active = map.active_members();
        if self.ring.as_ref().is_none_or(|(members, ..)| *members != active) {
            let placement = Placement::build(&active, &self.placement);
            let desired = Desired::build(map, &placement, self.plan.replication_factor);
            self.ring = Some((active, placement, desired));
        }
        let (_, ring, desired) = self.ring.as_ref().expect("built above");
        (ring, desired)
    }

    /// One round on the leader `c`, with `up` the members its failure detector sees and
    /// `pins` the load-driven moves in force (shard, wanted owner).
    pub fn round<'a>(
        &mut self,
        now_ms: u64,
        c: &Controller,
        up: &[UpMember],
        pins: impl IntoIterator<Item = (ShardId, &'a str)>,
    ) -> Round {
        let (voters, learners) = (c.voters(), c.learners());
        let group = GroupView { leader: c.id(), voters: &voters, learners: &learners };
        let (target, after) = (self.voters_target, self.replace_after_ms);
        let up_ids: BTreeSet<ControllerId> = up.iter().map(|m| controller_id(&m.name)).collect();
        let caught_up = |id| c.caught_up(id);
        let group = self.pilot.round(now_ms, c.map(), group, &up_ids, caught_up, target, after);
        let cfg = self.plan.clone();
        let pins: Vec<(ShardId, &str)> = pins.into_iter().collect();
        // Whether each member's map keeps up: no shard moves to a member whose map does not
        // (see `UpMember::map_current`).
        let up: Vec<UpMember> = (up.iter())
            .map(|u| UpMember { map_current: c.keeps_up(controller_id(&u.name)), ..u.clone() })
            .collect();
        let up = &up[..];
        let inputs = {
            use std::hash::{Hash, Hasher};
            // Fixed keys: the same inputs hash the same on every run.
            let mut h = std::hash::DefaultHasher::new();
            (members_key(up), &pins).hash(&mut h);
            h.finish()
        };
        let version = c.map().version;
        self.last = Some((now_ms, version));
        self.members_changed = false;
        if self.quiet == Some((version, inputs)) {
            return Round { group, commands: Vec::new() };
        }
        self.ring(c.map());
        let (_, _, desired) = self.ring.as_mut().expect("built above");
        desired.pin(c.map(), pins, cfg.replication_factor);
        let planned = plan_with(c.map(), up, desired, &cfg);
        self.held = planned.held > 0;
        self.quiet = planned.commands.is_empty().then_some((version, inputs));
        Round { group, commands: planned.commands }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_of_members_makes_the_next_round_due_at_once() {
        let plan = PlanConfig { interval_ms: 500, after_change_ms: 50, ..PlanConfig::default() };
        let mut p = LeaderPlanner::new(PlacementConfig::default(), plan, 3, 10_000);
        assert_eq!(p.next_round_ms(0), 0, "the first round is due at once");
        p.skip(1_000, 7);
        assert_eq!(p.next_round_ms(7), 1_500, "an interval after a round on a still map");
        assert_eq!(p.next_round_ms(8), 1_050, "soon after a round once the map changed");
        p.members_changed();
        assert_eq!(p.next_round_ms(7), 1_000, "at once after the members changed");
        assert!(p.due(1_000, 7));
        p.skip(1_010, 7);
        assert_eq!(p.next_round_ms(7), 1_510, "a round clears the change");
    }
}
