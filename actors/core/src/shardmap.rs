//! The shard map: the one authoritative answer to "who owns this shard, and who holds it in
//! sync", applied from the placement controller's log. A pure state machine: every node
//! applies the same committed commands in the same order and gets the same map.
//!
//! Per shard the map keeps an epoch, an owner, the in-sync replica set (ISR: the members
//! that hold every acknowledged turn durably; the owner is its first member) and learners
//! (members catching up before they may enter the ISR). The rules, each asserted on apply
//! and checked by [`ShardMap::check`]:
//! - the owner is always in the ISR;
//! - an entry changes only by a command, and every change raises the shard's epoch;
//! - a shard that was ever assigned never has an empty ISR again: when its last in-sync
//!   member dies the shard becomes *unavailable* (no owner, the ISR kept) instead of starting
//!   over somewhere else, until an ISR member returns or an operator forces it;
//! - a new owner comes from the ISR (a crash promotes a surviving ISR member, a handoff
//!   names one); only [`MapCommand::Force`] breaks that rule, loudly;
//! - a learner enters the ISR only by [`ShardChange::Promote`], which names the version it
//!   holds (the ownership protocol proposes it once the learner holds everything the owner
//!   acknowledged).
//!
//! Commands that race (two proposals read the same map) carry the epoch they were planned
//! at; a change whose epoch no longer matches is skipped, deterministically, on every node.
//! Member indices are stable: a member keeps its slot for life, a restart (same name, new
//! incarnation) reuses it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::flags::{Flag, Flags};
use crate::placement::ShardId;
use table::Table;
pub use table::Tally;

/// A member's slot in the map.
pub type MemberIx = u16;

/// Most members a map can hold (slots are never reused by another name). The simulator's
/// 5000-node runs had 904 nodes the map could not take at 4096.
pub const MEMBERS_MAX: usize = 16_384;
/// Most replicas (ISR or learners) a shard can have.
pub const REPLICAS_MAX: usize = 5;
/// Longest member name a command may carry.
pub const NAME_BYTES_MAX: usize = 64;

/// A member's lifecycle in the map (not foca's view: the controller's committed one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MemberState {
    /// Registered; may receive shards.
    Active,
    /// Leaving: gets no new shards, its shards move away.
    Draining,
    /// Gone (declared down): in no ISR it is not the last of. The same incarnation may
    /// join again (a node wrongly declared down rejoins under a new bump).
    Dead,
    /// Left by a controlled shutdown ([`MapCommand::Leave`]): gone as `Dead`, and this
    /// incarnation never joins again (a leader that still sees its old gossip identity
    /// must not re-register a process that has exited).
    Left,
}

impl MemberState {
    /// Dead or left: owns nothing, is in no ISR it is not the last of.
    pub fn is_gone(self) -> bool {
        matches!(self, MemberState::Dead | MemberState::Left)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapMember {
    pub name: String,
    /// The process incarnation the map knows; a newer one means the member restarted.
    pub incarnation: u64,
    pub state: MemberState,
    pub capacity: u32,
}

/// Up to [`REPLICAS_MAX`] member slots, in order, without allocating. Encoded as the
/// sequence of its members (a map snapshot holds two per shard). Slots past `len` are
/// always zero, so the derived equality compares the members only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replicas {
    len: u8,
    ix: [MemberIx; REPLICAS_MAX],
}

impl Replicas {
    pub fn from_slice(members: &[MemberIx]) -> Option<Replicas> {
        if members.len() > REPLICAS_MAX {
            return None;
        }
        let mut r = Replicas::default();
        for &m in members {
            if !r.push(m) {
                return None;
            }
        }
        Some(r)
    }

    pub fn as_slice(&self) -> &[MemberIx] {
        &self.ix[..usize::from(self.len)]
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, m: MemberIx) -> bool {
        self.as_slice().contains(&m)
    }

    /// Appends `m` unless present or full; false if it was not added.
    fn push(&mut self, m: MemberIx) -> bool {
        if self.contains(m) || self.len() == REPLICAS_MAX {
            return false;
        }
        self.ix[self.len()] = m;
        self.len += 1;
        true
    }

    fn remove(&mut self, m: MemberIx) -> bool {
        let Some(at) = self.as_slice().iter().position(|&x| x == m) else { return false };
        let len = self.len();
        self.ix.copy_within(at + 1..len, at);
        // Slots past the end stay zero: equal members, equal values (derived `Eq`).
        self.ix[len - 1] = 0;
        self.len -= 1;
        true
    }

    /// Moves `m` (present) to the front.
    fn put_first(&mut self, m: MemberIx) {
        if self.remove(m) {
            let len = self.len();
            self.ix.copy_within(0..len, 1);
            self.ix[0] = m;
            self.len += 1;
        }
    }
}

impl Serialize for Replicas {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Replicas {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let members = Vec::<MemberIx>::deserialize(d)?;
        Replicas::from_slice(&members)
            .filter(|r| r.len() == members.len())
            .ok_or_else(|| serde::de::Error::custom("more replicas than REPLICAS_MAX, or repeated"))
    }
}

/// One shard's entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Raised by every change of this entry.
    pub epoch: u64,
    /// The member that serves the shard; `None` while unassigned or unavailable.
    pub owner: Option<MemberIx>,
    /// In-sync replicas, owner first when there is one. Empty only while never assigned.
    pub isr: Replicas,
    /// Members catching up (not counted for acknowledgements).
    pub learners: Replicas,
}

impl ShardEntry {
    /// Never assigned: no turn of it was ever acknowledged, so a first owner loses nothing.
    pub fn is_unassigned(&self) -> bool {
        self.isr.is_empty()
    }

    /// Assigned, but every in-sync member is gone: it refuses turns rather than lose them.
    pub fn is_unavailable(&self) -> bool {
        !self.isr.is_empty() && self.owner.is_none()
    }
}

/// A change to one shard, valid only at the epoch it was planned at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ShardChange {
    /// `member` starts catching up (data streamed, new writes forwarded).
    AddLearner { shard: ShardId, epoch: u64, member: MemberIx },
    /// Learner `member` holds the owner's data up to `turn_version` and joins the ISR.
    Promote { shard: ShardId, epoch: u64, member: MemberIx, turn_version: u64 },
    /// ISR member `member` becomes the owner (live handoff).
    SetOwner { shard: ShardId, epoch: u64, member: MemberIx },
    /// `member` (not the owner; not the last ISR member) stops holding the shard.
    Remove { shard: ShardId, epoch: u64, member: MemberIx },
}

impl ShardChange {
    pub fn shard(&self) -> ShardId {
        match *self {
            ShardChange::AddLearner { shard, .. }
            | ShardChange::Promote { shard, .. }
            | ShardChange::SetOwner { shard, .. }
            | ShardChange::Remove { shard, .. } => shard,
        }
    }

    /// The shard's epoch it was planned at (it applies only there).
    pub fn epoch(&self) -> u64 {
        match *self {
            ShardChange::AddLearner { epoch, .. }
            | ShardChange::Promote { epoch, .. }
            | ShardChange::SetOwner { epoch, .. }
            | ShardChange::Remove { epoch, .. } => epoch,
        }
    }
}

/// A run of consecutive unassigned shards given one replica list (owner first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignRun {
    pub start: ShardId,
    pub len: u32,
    pub replicas: Vec<MemberIx>,
}

/// What the controller's log carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapCommand {
    /// A member registers, or re-registers after a restart (newer incarnation). A returning
    /// member becomes the owner again of the unavailable shards whose ISR it is in.
    Join { name: String, incarnation: u64, capacity: u32 },
    /// The member's incarnation `incarnation` is gone (failure detector, or it left).
    Dead { name: String, incarnation: u64 },
    /// The member drains: no new shards; the controller moves its shards away.
    Drain { name: String },
    /// First owners and replicas for unassigned shards (assigned ones are skipped).
    Assign(Vec<AssignRun>),
    /// Moves, one step each.
    Changes(Vec<ShardChange>),
    /// Operator override: an unavailable shard restarts on `member` from whatever that member
    /// holds (acknowledged turns its last ISR held may be lost).
    Force { shard: ShardId, member: MemberIx },
    /// Controlled shutdown: the member's incarnation `incarnation` leaves as `Dead` would
    /// (surviving in-sync members take over its shards at once), and is marked
    /// [`MemberState::Left`]. Skipped whole if it is the only in-sync member of a shard
    /// (that shard must move first) or not live at that incarnation.
    Leave { name: String, incarnation: u64 },
    /// Sets feature flag `name` (see [`crate::flags`]), or removes it with `None`.
    SetFlag { name: String, flag: Option<Flag> },
}

impl MapCommand {
    /// The command's kind, for counting; a batch of changes all of one kind is named by
    /// it (`promote`, `remove`, ...), a mixed one `changes`.
    pub fn kind(&self) -> &'static str {
        match self {
            MapCommand::Join { .. } => "join",
            MapCommand::Dead { .. } => "dead",
            MapCommand::Drain { .. } => "drain",
            MapCommand::Assign(_) => "assign",
            MapCommand::Force { .. } => "force",
            MapCommand::Leave { .. } => "leave",
            MapCommand::SetFlag { .. } => "set_flag",
            MapCommand::Changes(changes) => {
                let kind = |c: &ShardChange| match c {
                    ShardChange::AddLearner { .. } => "add_learner",
                    ShardChange::Promote { .. } => "promote",
                    ShardChange::SetOwner { .. } => "set_owner",
                    ShardChange::Remove { .. } => "remove",
                };
                match changes.split_first() {
                    Some((first, rest)) if rest.iter().all(|c| kind(c) == kind(first)) => {
                        kind(first)
                    }
                    _ => "changes",
                }
            }
        }
    }
}

/// What applying a command did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Shards whose entry changed, ascending.
    pub changed: Vec<ShardId>,
    /// Parts of the command that were not applied, and why (stale epochs, unknown members).
    pub skipped: Vec<String>,
}

/// The map: members and every shard's entry, plus how many commands built it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// Commands applied (the map's version; gossip spreads it so laggards fetch).
    pub version: u64,
    members: Vec<MapMember>,
    shards: Table,
    /// The cluster's feature flags (last: maps encoded before flags existed still decode,
    /// see [`ShardMap::decode`]).
    flags: Flags,
}

/// The map as encoded before it carried flags.
#[derive(Deserialize)]
struct ShardMapWithoutFlags {
    version: u64,
    members: Vec<MapMember>,
    shards: Table,
}

impl ShardMap {
    pub fn new(shard_count: u32) -> ShardMap {
        ShardMap {
            version: 0,
            members: Vec::new(),
            shards: Table::new(shard_count),
            flags: Flags::default(),
        }
    }

    /// A map from its encoding (postcard), also one written before maps carried flags
    /// (a controller log or snapshot from an earlier version).
    pub fn decode(bytes: &[u8]) -> Result<ShardMap, postcard::Error> {
        postcard::from_bytes::<ShardMap>(bytes).or_else(|e| {
            let old: ShardMapWithoutFlags = postcard::from_bytes(bytes).map_err(|_| e)?;
            Ok(ShardMap {
                version: old.version,
                members: old.members,
                shards: old.shards,
                flags: Flags::default(),
            })
        })
    }

    /// The cluster's feature flags.
    pub fn flags(&self) -> &Flags {
        &self.flags
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len()
    }

    pub fn members(&self) -> &[MapMember] {
        &self.members
    }

    pub fn member(&self, ix: MemberIx) -> Option<&MapMember> {
        self.members.get(usize::from(ix))
    }

    /// The members that may receive shards, as ring members (the planner's ring is built
    /// over them).
    pub fn active_members(&self) -> Vec<crate::placement::RingMember> {
        self.members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .map(|m| crate::placement::RingMember { name: m.name.clone(), capacity: m.capacity })
            .collect()
    }

    /// Whether the map counts `name` in at `incarnation`: a live member at that process's
    /// incarnation (a restarted process is not counted in until its `Join` is applied; its
    /// shards have no live owner in the meantime).
    pub fn counts_in(&self, name: &str, incarnation: u64) -> bool {
        self.members
            .iter()
            .any(|m| m.name == name && m.incarnation == incarnation && !m.state.is_gone())
    }

    pub fn member_ix(&self, name: &str) -> Option<MemberIx> {
        self.members.iter().position(|m| m.name == name).map(|i| i as MemberIx)
    }

    pub fn name(&self, ix: MemberIx) -> &str {
        self.members.get(usize::from(ix)).map_or("?", |m| m.name.as_str())
    }

    pub fn shard(&self, shard: ShardId) -> Option<&ShardEntry> {
        self.shards.get(shard)
    }

    /// Every shard's entry, in shard order.
    pub fn shards(&self) -> impl ExactSizeIterator<Item = &ShardEntry> + Clone + '_ {
        self.shards.iter()
    }

    /// Counts of entries by kind (moves in flight, unavailable, by ISR size), without a scan.
    pub fn tally(&self) -> &Tally {
        self.shards.tally()
    }

    /// The shards whose entry differs in `older`, ascending; `None` if `older` has another
    /// shard count. Cheap when `older` is an earlier version of this map: only the parts
    /// changed since are compared.
    pub fn changed_since(&self, older: &ShardMap) -> Option<Vec<ShardId>> {
        self.shards.changed_since(&older.shards)
    }

    /// Bytes of this map's shard table that `older` does not share: what keeping both
    /// costs over one (an earlier version shares every part a change did not touch).
    pub fn bytes_apart(&self, older: &ShardMap) -> usize {
        self.shards.bytes_apart(&older.shards)
    }

    /// The owner's name, if the shard has one.
    pub fn owner(&self, shard: ShardId) -> Option<&str> {
        self.shard(shard)?.owner.map(|o| self.name(o))
    }

    /// Shards `member` owns (kept as entries change: no scan).
    pub fn owned_by(&self, member: MemberIx) -> u32 {
        self.shards.owned(member)
    }

    /// Shards `member` holds a copy of, in sync or learning (kept: no scan).
    pub fn held_by(&self, member: MemberIx) -> u32 {
        self.shards.held(member)
    }

    /// The shards whose entry names `member` (owner, in sync or learning), ascending
    /// (kept: no scan).
    pub fn shards_of(&self, member: MemberIx) -> impl Iterator<Item = ShardId> + '_ {
        self.shards.named(member)
    }

    /// How many shards' entries name `member` (kept: no scan).
    pub fn shards_of_count(&self, member: MemberIx) -> u64 {
        self.shards.named_count(member)
    }

    /// Shards whose only in-sync member is `member` (a leaving member asks).
    pub fn sole_in_sync(&self, member: MemberIx) -> u32 {
        let sole = |s: &ShardId| self.shard(*s).is_some_and(|e| e.isr.as_slice() == [member]);
        self.shards_of(member).filter(sole).count() as u32
    }

    /// Shards per member as owner, for every member.
    pub fn owned_counts(&self) -> BTreeMap<&str, u32> {
        (0..self.members.len())
            .map(|ix| (self.members[ix].name.as_str(), self.owned_by(ix as MemberIx)))
            .collect()
    }

    /// Shards that are assigned but have no owner.
    pub fn unavailable(&self) -> impl Iterator<Item = ShardId> + '_ {
        // Stops after the last one (at once when the tally counts none).
        self.shards
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_unavailable())
            .map(|(s, _)| s as ShardId)
            .take(self.shards.tally().unavailable as usize)
    }

    /// Applies one committed command. Never panics on a command's content: what cannot be
    /// applied is skipped and reported (a stale plan, an unknown member).
    pub fn apply(&mut self, cmd: &MapCommand) -> Applied {
        self.version += 1;
        let mut out = Applied::default();
        match cmd {
            MapCommand::Join { name, incarnation, capacity } => {
                self.join(name, *incarnation, *capacity, &mut out)
            }
            MapCommand::Dead { name, incarnation } => {
                self.dead(name, *incarnation, MemberState::Dead, &mut out)
            }
            MapCommand::Leave { name, incarnation } => {
                match self.member_ix(name).map(|ix| self.sole_in_sync(ix)) {
                    Some(0) => self.dead(name, *incarnation, MemberState::Left, &mut out),
                    Some(n) => out
                        .skipped
                        .push(format!("leave {name}: the only in-sync member of {n} shards")),
                    None => out.skipped.push(format!("leave {name}: unknown member")),
                }
            }
            MapCommand::Drain { name } => match self.member_ix(name) {
                Some(ix) if self.members[usize::from(ix)].state == MemberState::Active => {
                    self.members[usize::from(ix)].state = MemberState::Draining
                }
                _ => out.skipped.push(format!("drain {name}: not an active member")),
            },
            MapCommand::Assign(runs) => self.assign(runs, &mut out),
            MapCommand::Changes(changes) => {
                for c in changes {
                    self.change(c, &mut out);
                }
            }
            MapCommand::Force { shard, member } => self.force(*shard, *member, &mut out),
            MapCommand::SetFlag { name, flag } => {
                if let Err(why) = self.flags.set(name, flag.clone()) {
                    out.skipped.push(why);
                }
            }
        }
        out.changed.sort_unstable();
        out.changed.dedup();
        for &s in &out.changed {
            let e = self.shards.get(s).expect("a changed shard exists");
            assert!(!e.isr.is_empty(), "shard {s}: a change left it without replicas");
            assert!(
                e.owner.is_none_or(|o| e.isr.as_slice().first() == Some(&o)),
                "shard {s}: owner outside its ISR"
            );
        }
        out
    }

    fn join(&mut self, name: &str, incarnation: u64, capacity: u32, out: &mut Applied) {
        if name.is_empty() || name.len() > NAME_BYTES_MAX {
            out.skipped.push(format!("join: a name of {} bytes", name.len()));
            return;
        }
        let ix = match self.member_ix(name) {
            Some(ix) => ix,
            None if self.members.len() < MEMBERS_MAX => {
                self.members.push(MapMember {
                    name: name.to_string(),
                    incarnation,
                    state: MemberState::Active,
                    capacity,
                });
                return;
            }
            None => {
                out.skipped.push(format!("join {name}: the map holds {MEMBERS_MAX} members"));
                return;
            }
        };
        let known = self.members[usize::from(ix)].incarnation;
        if incarnation < known {
            out.skipped.push(format!("join {name}: incarnation {incarnation} older than {known}"));
            return;
        }
        let state = self.members[usize::from(ix)].state;
        if incarnation == known && state == MemberState::Left {
            out.skipped.push(format!("join {name}: incarnation {incarnation} has left"));
            return;
        }
        if incarnation > known && !state.is_gone() {
            // Restarted before its death was committed: the old process is gone.
            self.dead(name, known, MemberState::Dead, out);
        }
        let m = &mut self.members[usize::from(ix)];
        m.incarnation = incarnation;
        m.state = MemberState::Active;
        m.capacity = capacity;
        // Its store kept what it acknowledged: where it was the last in-sync member, it is
        // the only one that can serve the shard without losing turns.
        let returning: Vec<ShardId> = self
            .unavailable()
            .filter(|&s| self.shards.get(s).is_some_and(|e| e.isr.contains(ix)))
            .collect();
        for s in returning {
            let mut e = *self.shards.get(s).expect("found above");
            e.isr.put_first(ix);
            e.owner = Some(ix);
            e.epoch += 1;
            self.shards.set(s, e);
            out.changed.push(s);
        }
    }

    /// Takes `name` out of every shard: out of learners; out of the ISR unless it is the
    /// last member; a surviving ISR member takes over where it owned, else the shard is
    /// unavailable. The member ends in state `gone` (dead or left).
    fn dead(&mut self, name: &str, incarnation: u64, gone: MemberState, out: &mut Applied) {
        let Some(ix) = self.member_ix(name) else {
            out.skipped.push(format!("dead {name}: unknown member"));
            return;
        };
        let m = &mut self.members[usize::from(ix)];
        if m.incarnation != incarnation || m.state.is_gone() {
            out.skipped.push(format!("dead {name}: incarnation {incarnation} is not live"));
            return;
        }
        m.state = gone;
        let holds = |e: &ShardEntry| e.isr.contains(ix) || e.learners.contains(ix);
        let held: Vec<ShardId> =
            self.shards_of(ix).filter(|&s| self.shard(s).is_some_and(holds)).collect();
        for s in held {
            let mut e = *self.shards.get(s).expect("found above");
            e.learners.remove(ix);
            if e.isr.contains(ix) {
                if e.isr.len() > 1 {
                    e.isr.remove(ix);
                    if e.owner.is_some() {
                        e.owner = Some(e.isr.as_slice()[0]);
                    }
                } else {
                    e.owner = None;
                }
            }
            e.epoch += 1;
            self.shards.set(s, e);
            out.changed.push(s);
        }
    }

    fn assign(&mut self, runs: &[AssignRun], out: &mut Applied) {
        for run in runs {
            let usable = !run.replicas.is_empty()
                && run
                    .replicas
                    .iter()
                    .all(|&m| self.member(m).is_some_and(|m| m.state == MemberState::Active));
            let replicas =
                Replicas::from_slice(&run.replicas).filter(|r| r.len() == run.replicas.len());
            let (Some(replicas), true) = (replicas, usable) else {
                out.skipped.push(format!("assign from shard {}: unusable replicas", run.start));
                continue;
            };
            let end = (u64::from(run.start) + u64::from(run.len)).min(u64::from(self.shards.len()));
            for s in u64::from(run.start)..end {
                let s = s as ShardId;
                let mut e = *self.shards.get(s).expect("below the shard count");
                if e.is_unassigned() {
                    e.isr = replicas;
                    e.owner = Some(replicas.as_slice()[0]);
                    e.epoch += 1;
                    self.shards.set(s, e);
                    out.changed.push(s);
                }
            }
        }
    }

    fn change(&mut self, c: &ShardChange, out: &mut Applied) {
        let shard = c.shard();
        let Some(e) = self.shards.get(shard).copied() else {
            out.skipped.push(format!("shard {shard} does not exist"));
            return;
        };
        let live = |m: MemberIx| self.member(m).is_some_and(|m| !m.state.is_gone());
        let mut next = e;
        let why = match *c {
            ShardChange::AddLearner { epoch, member, .. } => {
                if epoch != e.epoch {
                    Some("stale epoch")
                } else if self.member(member).is_none_or(|m| m.state != MemberState::Active) {
                    Some("not an active member")
                } else if e.is_unassigned() || e.isr.contains(member) || !next.learners.push(member)
                {
                    Some("already holds it, or no room")
                } else {
                    None
                }
            }
            ShardChange::Promote { epoch, member, .. } => {
                if epoch != e.epoch {
                    Some("stale epoch")
                } else if !live(member) || !e.learners.contains(member) || e.owner.is_none() {
                    Some("not a live learner of an owned shard")
                } else {
                    next.learners.remove(member);
                    next.isr.push(member).then_some(()).map_or(Some("the ISR is full"), |()| None)
                }
            }
            ShardChange::SetOwner { epoch, member, .. } => {
                if epoch != e.epoch {
                    Some("stale epoch")
                } else if !live(member) || !e.isr.contains(member) || e.owner.is_none() {
                    Some("not a live ISR member of an owned shard")
                } else {
                    next.isr.put_first(member);
                    next.owner = Some(member);
                    None
                }
            }
            ShardChange::Remove { epoch, member, .. } => {
                if epoch != e.epoch {
                    Some("stale epoch")
                } else if e.owner == Some(member) {
                    Some("the owner hands off before it is removed")
                } else if next.learners.remove(member) {
                    None
                } else if e.isr.contains(member) && e.isr.len() > 1 {
                    next.isr.remove(member);
                    None
                } else {
                    Some("not a removable replica")
                }
            }
        };
        match why {
            Some(why) => out.skipped.push(format!("{c:?}: {why}")),
            None => {
                next.epoch += 1;
                self.shards.set(shard, next);
                out.changed.push(shard);
            }
        }
    }

    fn force(&mut self, shard: ShardId, member: MemberIx, out: &mut Applied) {
        let active = self.member(member).is_some_and(|m| m.state == MemberState::Active);
        match self.shards.get(shard).copied() {
            Some(mut e) if e.is_unavailable() && active => {
                e.isr = Replicas::from_slice(&[member]).expect("one replica fits");
                e.learners = Replicas::default();
                e.owner = Some(member);
                e.epoch += 1;
                self.shards.set(shard, e);
                out.changed.push(shard);
            }
            _ => out
                .skipped
                .push(format!("force shard {shard}: not unavailable, or {member} is not active")),
        }
    }

    /// Checks the map's own invariants; the problems found, empty when all is well.
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.shards.tally_drifted() {
            problems.push(
                "the kept tally of entries or index of members' shards differs from a count"
                    .to_string(),
            );
        }
        for s in 0..self.shard_count() {
            self.check_entry(s, &mut problems);
        }
        problems
    }

    /// [`ShardMap::check`] of the entries of `shards` only (after a command: the others did
    /// not change, and a member's death or leave changes every entry it was in), without
    /// the recount of the tally.
    pub fn check_shards(&self, shards: &[ShardId]) -> Vec<String> {
        let mut problems = Vec::new();
        for &s in shards {
            self.check_entry(s, &mut problems);
        }
        problems
    }

    fn check_entry(&self, s: ShardId, problems: &mut Vec<String>) {
        let Some(e) = self.shards.get(s) else { return };
        if let Some(o) = e.owner {
            if e.isr.as_slice().first() != Some(&o) {
                problems.push(format!("shard {s}: owner {} is not first in its ISR", self.name(o)));
            }
        }
        for &m in e.isr.as_slice().iter().chain(e.learners.as_slice()) {
            if self.member(m).is_none() {
                problems.push(format!("shard {s}: replica slot {m} is no member"));
            }
            if e.isr.contains(m) && e.learners.contains(m) {
                problems.push(format!("shard {s}: {} is both in sync and learning", self.name(m)));
            }
        }
        if let Some(o) = e.owner.and_then(|o| self.member(o)) {
            if o.state.is_gone() {
                problems.push(format!("shard {s}: owned by dead member {}", o.name));
            }
        }
        if e.epoch == 0 && !e.is_unassigned() {
            problems.push(format!("shard {s}: assigned at epoch 0"));
        }
    }
}

/// Compares a map before and after one command: the transition rules that hold between two
/// consecutive maps (epochs only rise, a changed entry raised its epoch, a new owner came
/// from the ISR before, an assigned shard never loses its ISR). `forced` names the shards a
/// [`MapCommand::Force`] may move outside those rules. The problems found.
pub fn check_transition(
    before: &ShardMap,
    after: &ShardMap,
    forced: Option<ShardId>,
) -> Vec<String> {
    let mut problems = Vec::new();
    // Unchanged entries break no rule: only the changed ones are looked at.
    let changed: Vec<ShardId> = after
        .changed_since(before)
        .unwrap_or_else(|| (0..before.shard_count().min(after.shard_count())).collect());
    for s in changed {
        let (Some(b), Some(a)) = (before.shard(s), after.shard(s)) else { continue };
        let s = s as usize;
        if a.epoch < b.epoch {
            problems.push(format!("shard {s}: epoch fell {} -> {}", b.epoch, a.epoch));
        }
        if a != b && a.epoch == b.epoch {
            problems.push(format!("shard {s}: changed without raising its epoch"));
        }
        if !b.is_unassigned() && a.is_unassigned() {
            problems.push(format!("shard {s}: an assigned shard lost its whole ISR"));
        }
        if forced == Some(s as ShardId) || b.is_unassigned() {
            continue;
        }
        if let Some(o) = a.owner.filter(|o| Some(*o) != b.owner) {
            if !b.isr.contains(o) {
                problems.push(format!(
                    "shard {s}: new owner {} was not in sync (ISR was {:?})",
                    after.name(o),
                    b.isr.as_slice().iter().map(|&m| before.name(m)).collect::<Vec<_>>()
                ));
            }
        }
        for &m in a.isr.as_slice() {
            if !b.isr.contains(m) && !b.learners.contains(m) {
                problems
                    .push(format!("shard {s}: {} entered the ISR without learning", after.name(m)));
            }
        }
    }
    problems
}

pub mod leave;
pub mod plan;
mod table;

pub use leave::{leave_step, LeaveMode, LeaveStep};
pub use plan::{formed_map, plan_assign, plan_membership, unregistrable, Desired, UpMember};

#[cfg(test)]
mod tests;
