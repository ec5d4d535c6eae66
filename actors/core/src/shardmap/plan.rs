//! What the controller's leader proposes: the commands that bring the shard map in line
//! with the failure detector (deaths, restarts, joins), first owners for unassigned shards,
//! and moves toward the ring's placement over the map's active members, throttled.
//!
//! Pure functions of the map, the members the failure detector sees up and the ring; one
//! change per shard per round, each valid only at the epoch it was planned at, so a plan
//! made on a stale map changes nothing when applied. A learner's promotion is not planned
//! here: only the shard's owner knows when the learner holds everything it acknowledged,
//! and proposes [`ShardChange::Promote`] itself.

use std::collections::{BTreeMap, HashMap};

use super::{
    AssignRun, MapCommand, MemberIx, MemberState, ShardChange, ShardMap, MEMBERS_MAX, REPLICAS_MAX,
};
use crate::placement::{Placement, ShardId};

/// A member as the failure detector sees it: up, with this incarnation and capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpMember {
    pub name: String,
    pub incarnation: u64,
    pub capacity: u32,
    /// It serves conversations. A member that does not (it drained, or it lacks the role)
    /// owns nothing: a map member is drained (its shards move away; it stays a member until
    /// it leaves), another is not registered.
    pub serving: bool,
    /// Its controller's log holds every committed entry, or the leader sends it the log
    /// entry by entry (not probing it, not sending it a snapshot): its map keeps up with
    /// the others' ([`crate::controller::Controller::keeps_up`]). A node learns its shards
    /// from its own copy of the map: a shard streamed to a node still installing the map's
    /// snapshot was lost until the owner's catch-up patience ran out, so no learner is
    /// added on a member whose map is not current.
    pub map_current: bool,
}

impl UpMember {
    pub fn new(name: impl Into<String>, incarnation: u64, capacity: u32) -> UpMember {
        UpMember { name: name.into(), incarnation, capacity, serving: true, map_current: true }
    }
}

/// A fingerprint of the members up, as the planner reads them (the same on every run:
/// fixed hash keys). Load summaries change a node's view every second; this, rarely.
pub fn members_key(up: &[UpMember]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for m in up {
        (&m.name, m.incarnation, m.capacity, m.serving, m.map_current).hash(&mut h);
    }
    h.finish()
}

/// The membership commands that bring the map in line with the failure detector: `Dead` for
/// every live map member not up (or up as a newer incarnation, whose `Join` follows), `Drain`
/// for a live member that is up and not serving, `Join` for every up member serving the
/// map does not have live at that incarnation, unless it is new to a full map
/// ([`MEMBERS_MAX`]: the map would skip it, and a copy was proposed every round). Ordered
/// by name.
pub fn plan_membership(map: &ShardMap, up: &[UpMember]) -> Vec<MapCommand> {
    let up_by_name: BTreeMap<&str, &UpMember> = up.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut out = Vec::new();
    for m in map.members() {
        let live = !m.state.is_gone();
        let same = up_by_name.get(m.name.as_str()).is_some_and(|u| u.incarnation == m.incarnation);
        if live && !same {
            out.push(MapCommand::Dead { name: m.name.clone(), incarnation: m.incarnation });
        }
        let draining = up_by_name.get(m.name.as_str()).is_some_and(|u| !u.serving);
        if live && same && draining && m.state != MemberState::Draining {
            out.push(MapCommand::Drain { name: m.name.clone() });
        }
    }
    let full = map.members().len() >= MEMBERS_MAX;
    let room = |u: &UpMember| !full || map.member_ix(&u.name).is_some();
    for u in up_by_name.values().filter(|u| u.serving) {
        if !registered(map, u) && room(u) {
            out.push(MapCommand::Join {
                name: u.name.clone(),
                incarnation: u.incarnation,
                capacity: u.capacity,
            });
        }
    }
    out
}

/// The names of up members serving that the map cannot take: it holds [`MEMBERS_MAX`]
/// names (every name ever registered stays) and not theirs. They own nothing; the leader
/// reports them (`controller_members_unregistered`, a warning in its log).
pub fn unregistrable<'a>(map: &ShardMap, up: &'a [UpMember]) -> Vec<&'a str> {
    if map.members().len() < MEMBERS_MAX {
        return Vec::new();
    }
    (up.iter())
        .filter(|u| u.serving && map.member_ix(&u.name).is_none())
        .map(|u| u.name.as_str())
        .collect()
}

/// Whether the map has `u` at its incarnation (or a newer one), so that no `Join` is due
/// for it. A member that left at this incarnation is not registered again: the process
/// exited, the identity still seen is its gossip's last word.
fn registered(map: &ShardMap, u: &UpMember) -> bool {
    let known = map.member_ix(&u.name).and_then(|ix| map.member(ix));
    let current =
        known.is_some_and(|m| m.state != MemberState::Dead && m.incarnation == u.incarnation);
    let older = known.is_some_and(|m| u.incarnation < m.incarnation);
    current || older
}

/// First owners and replicas for at most `shards_max` unassigned shards: each gets its
/// wanted members (see [`Desired`]), as runs of consecutive shards with the same list.
/// `None` when nothing is unassigned or no active member is placed.
pub fn plan_assign(map: &ShardMap, desired: &Desired, shards_max: usize) -> Option<MapCommand> {
    if map.tally().unassigned() == 0 {
        return None;
    }
    let mut runs: Vec<AssignRun> = Vec::new();
    let mut planned = 0;
    for (s, e) in map.shards().enumerate() {
        if planned == shards_max {
            break;
        }
        if !e.is_unassigned() {
            continue;
        }
        let replicas = desired.of(s as ShardId);
        if replicas.is_empty() {
            continue;
        }
        planned += 1;
        match runs.last_mut() {
            Some(run) if run.start + run.len == s as ShardId && run.replicas == replicas => {
                run.len += 1
            }
            _ => runs.push(AssignRun { start: s as ShardId, len: 1, replicas: replicas.to_vec() }),
        }
    }
    (!runs.is_empty()).then_some(MapCommand::Assign(runs))
}

/// The map of a cluster that has run a while with `up` serving: every one a member at its
/// incarnation, every shard on the `r` members the ring wants (owner first), as the
/// planner's rounds leave an empty map once nothing is left to move. The simulator starts
/// an already formed cluster from it.
pub fn formed_map(
    shard_count: u32,
    up: &[UpMember],
    placement: &botclaw_config::PlacementConfig,
    r: usize,
) -> ShardMap {
    let mut map = ShardMap::new(shard_count);
    for cmd in plan_membership(&map, up) {
        map.apply(&cmd);
    }
    let ring = Placement::build(&map.active_members(), placement);
    if let Some(cmd) = plan_assign(&map, &Desired::build(&map, &ring, r), usize::MAX) {
        map.apply(&cmd);
    }
    map
}

/// The members the ring wants for every shard (owner first), active members only:
/// computed once per ring, so a planning round allocates nothing per shard. Load-driven
/// moves pin a few shards to another owner (see [`Desired::pin`]).
#[derive(Debug, Clone, Default)]
pub struct Desired {
    by_shard: Vec<super::Replicas>,
    pinned: BTreeMap<ShardId, super::Replicas>,
}

impl Desired {
    /// `ring` is built over the map's active members; `r` replicas per shard.
    pub fn build(map: &ShardMap, ring: &Placement, r: usize) -> Desired {
        // What `desired` finds for each name (its first slot, if active), found once: a
        // scan of the members per shard and replica made a 1000-member build quadratic.
        let mut first: HashMap<&str, MemberIx> = HashMap::new();
        for (i, m) in map.members().iter().enumerate() {
            let Ok(ix) = MemberIx::try_from(i) else { break };
            first.entry(m.name.as_str()).or_insert(ix);
        }
        first.retain(|_, ix| map.member(*ix).is_some_and(|m| m.state == MemberState::Active));
        let by_shard = (0..map.shard_count())
            .map(|s| {
                let wanted = ring.preference_list(s, r.clamp(1, REPLICAS_MAX));
                let ixs: Vec<MemberIx> =
                    wanted.into_iter().filter_map(|name| first.get(name).copied()).collect();
                super::Replicas::from_slice(&ixs).expect("at most REPLICAS_MAX wanted")
            })
            .collect();
        Desired { by_shard, pinned: BTreeMap::new() }
    }

    /// The wanted members of `shard`, owner first (empty if none is active).
    pub fn of(&self, shard: ShardId) -> &[MemberIx] {
        if let Some(p) = (!self.pinned.is_empty()).then(|| self.pinned.get(&shard)).flatten() {
            return p.as_slice();
        }
        self.by_shard.get(shard as usize).map_or(&[], |r| r.as_slice())
    }

    /// Replaces the pins: each shard of `pins` is wanted on the named member as owner
    /// (the rebalancer moved it off a hot node), then the ring's members, `r` in all.
    /// Pins to members that are not active, or to shards the map does not have, are
    /// ignored.
    pub fn pin<'a>(
        &mut self,
        map: &ShardMap,
        pins: impl IntoIterator<Item = (ShardId, &'a str)>,
        r: usize,
    ) {
        self.pinned.clear();
        for (shard, to) in pins {
            let Some(ix) = map.member_ix(to) else { continue };
            let active = map.member(ix).is_some_and(|m| m.state == MemberState::Active);
            let Some(ring) = self.by_shard.get(shard as usize).filter(|_| active) else {
                continue;
            };
            let rest = ring.as_slice().iter().copied().filter(|&m| m != ix);
            let wanted: Vec<MemberIx> =
                std::iter::once(ix).chain(rest).take(r.clamp(1, REPLICAS_MAX)).collect();
            let replicas = super::Replicas::from_slice(&wanted).expect("at most REPLICAS_MAX");
            self.pinned.insert(shard, replicas);
        }
    }
}

/// Limits of one planning round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    /// Replicas a shard should have (owner included).
    pub replication_factor: usize,
    /// Shards with a learner at once (each streams its data: the cost of a move).
    pub moves_in_flight_max: usize,
    /// Shard changes one round proposes.
    pub changes_per_round_max: usize,
    /// Unassigned shards one round assigns.
    pub assign_shards_max: usize,
    /// Rounds run this often while the map stands still...
    pub interval_ms: u64,
    /// ...and this soon after the last one once the map changed since (a move's next step
    /// follows its commit, not the next interval).
    pub after_change_ms: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            replication_factor: 2,
            moves_in_flight_max: 64,
            changes_per_round_max: 256,
            assign_shards_max: 1 << 16,
            interval_ms: 500,
            after_change_ms: 50,
        }
    }
}

impl PlanConfig {
    /// The planner of a node with these controller settings (the node and the simulator
    /// both plan by it).
    pub fn of(cfg: &botclaw_config::ControllerConfig, replication_factor: usize) -> PlanConfig {
        PlanConfig {
            replication_factor,
            moves_in_flight_max: cfg.moves_in_flight_max,
            changes_per_round_max: cfg.changes_per_round_max,
            interval_ms: cfg.plan_interval_ms,
            after_change_ms: cfg.plan_after_change_ms,
            ..PlanConfig::default()
        }
    }
}

/// One round on the leader: membership first (alone: the next round plans on the map it
/// makes), then first owners, then moves. `ring` is built by the caller over the map's
/// active members.
pub fn plan(
    map: &ShardMap,
    up: &[UpMember],
    ring: &Placement,
    cfg: &PlanConfig,
) -> Vec<MapCommand> {
    plan_with(map, up, &Desired::build(map, ring, cfg.replication_factor), cfg).commands
}

/// What a round proposes, and how many learners it held back for members whose map is not
/// current ([`UpMember::map_current`]): the plan is not done while any is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Planned {
    pub commands: Vec<MapCommand>,
    pub held: usize,
}

/// [`plan`] with the wanted members computed already (the leader keeps them per ring).
pub fn plan_with(map: &ShardMap, up: &[UpMember], desired: &Desired, cfg: &PlanConfig) -> Planned {
    let membership = plan_membership(map, up);
    if !membership.is_empty() {
        return Planned { commands: membership, held: 0 };
    }
    let mut commands = Vec::new();
    commands.extend(plan_assign(map, desired, cfg.assign_shards_max));
    let behind: Vec<MemberIx> =
        (up.iter()).filter(|u| !u.map_current).filter_map(|u| map.member_ix(&u.name)).collect();
    let (moves, held) = plan_moves(map, desired, cfg, &behind);
    if !moves.is_empty() {
        commands.push(MapCommand::Changes(moves));
    }
    Planned { commands, held }
}

/// The replicas the ring wants for `shard`: its preference list, active members only.
pub fn desired(map: &ShardMap, ring: &Placement, shard: ShardId, r: usize) -> Vec<MemberIx> {
    ring.preference_list(shard, r.clamp(1, REPLICAS_MAX))
        .into_iter()
        .filter_map(|name| map.member_ix(name))
        .filter(|&ix| map.member(ix).is_some_and(|m| m.state == MemberState::Active))
        .collect()
}

/// Moves toward the ring, one step per shard, at its current epoch:
/// 1. a learner the ring no longer wants (or that died) is removed, and a full ISR
///    (`REPLICAS_MAX`) of a shard missing a wanted member gives up an in-sync member the
///    ring does not want (not the owner): a promotion needs a free place, and moves planned
///    while the ring changed under them (members joining) can fill the ISR;
/// 2. a shard missing a wanted member gets it as a learner, while fewer than
///    `moves_in_flight_max` shards have one (its owner promotes it once it caught up),
///    unless that member's map is `behind` (counted: the second value returned);
/// 3. once every wanted member is in sync, the ring's first choice becomes the owner
///    (live handoff);
/// 4. then in-sync members the ring does not want are removed.
///
/// Unavailable shards wait for a member of their ISR; unassigned ones for `plan_assign`.
pub fn plan_moves(
    map: &ShardMap,
    desired: &Desired,
    cfg: &PlanConfig,
    behind: &[MemberIx],
) -> (Vec<ShardChange>, usize) {
    let mut in_flight = map.tally().learning as usize;
    let mut out = Vec::new();
    let mut held = 0;
    for (s, e) in map.shards().enumerate() {
        if out.len() >= cfg.changes_per_round_max {
            break;
        }
        let Some(owner) = e.owner else { continue };
        let shard = s as ShardId;
        let epoch = e.epoch;
        let want = desired.of(shard);
        if want.is_empty() {
            continue;
        }
        let active = |m: MemberIx| map.member(m).is_some_and(|m| m.state == MemberState::Active);
        if let Some(&l) = e.learners.as_slice().iter().find(|&&l| !want.contains(&l) || !active(l))
        {
            out.push(ShardChange::Remove { shard, epoch, member: l });
            continue;
        }
        let missing = want.iter().copied().find(|&m| !e.isr.contains(m));
        if missing.is_some() && e.isr.len() >= REPLICAS_MAX {
            let unwanted = e.isr.as_slice().iter().find(|&&m| m != owner && !want.contains(&m));
            if let Some(&extra) = unwanted {
                out.push(ShardChange::Remove { shard, epoch, member: extra });
                continue;
            }
        }
        match missing {
            Some(m) if !e.learners.contains(m) => {
                if behind.contains(&m) {
                    held += 1;
                } else if e.learners.is_empty() && in_flight < cfg.moves_in_flight_max {
                    out.push(ShardChange::AddLearner { shard, epoch, member: m });
                    in_flight += 1;
                }
            }
            Some(_) => {} // learning: the owner promotes it
            None if want[0] != owner => {
                out.push(ShardChange::SetOwner { shard, epoch, member: want[0] })
            }
            None => {
                if let Some(&extra) = e.isr.as_slice().iter().find(|m| !want.contains(m)) {
                    out.push(ShardChange::Remove { shard, epoch, member: extra });
                }
            }
        }
    }
    (out, held)
}

#[cfg(test)]
mod tests;
