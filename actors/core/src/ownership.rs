//! Ownership and replication of shards by in-sync replica sets, as a pure state machine.
//!
//! One [`Ownership`] per node drives every shard the node holds, by the shard map it has
//! applied (see [`crate::shardmap`]): as owner it writes a turn locally and to every other
//! in-sync member and learner, and acknowledges the turn once its own store and every
//! in-sync member hold it durably; as a follower it persists what the shard's owner sends,
//! then acknowledges. Inputs are method calls (the applied map, a write to submit, peers'
//! messages, "persisted", a tick); outputs are [`Effect`]s drained with
//! [`Ownership::poll`]: what to persist, what to send, what to release or fail, what to
//! propose to the controller. The node and the simulator execute the same effects.
//!
//! Rules (each checked by the tests):
//! - a write is acknowledged only when the owner's store and every in-sync member hold it
//!   (no consensus round per turn); a member leaves the in-sync set only by a map change;
//! - a node serves a shard only while the map it applied names it owner: a node that
//!   learns from the map, or from a follower's refusal, that it no longer owns fails what is
//!   pending (the client retries with the same id; the retry window makes that safe);
//! - a follower refuses writes of an epoch older than the one it knows unless they come
//!   from the owner it knows (an owner keeps owning across epochs that only change the
//!   in-sync set); so does a node its map leaves out of the shard, or whose write a member
//!   refused as owner (its acknowledgement would count for writes the newer in-sync
//!   members lack);
//! - a learner is first sent the shard's data (streamed once every earlier write is
//!   durable at the owner), then every new write; once it holds both, the owner counts it
//!   for every further acknowledgement and proposes its promotion, so a promoted member
//!   holds every acknowledged turn.
//!
//! - a read is served by the owner once every write submitted before it is acknowledged
//!   (so it sees them), once every other in-sync member and learner confirmed that it
//!   still follows this owner at this epoch (a new owner is always one of them, and
//!   refuses: an owner whose map lags after a handoff or a leave cannot serve a read that
//!   misses what the new owner acknowledged), and only while the owner heard from the
//!   controller within its lease, shorter than failure detection: an owner cut off from
//!   the controller stops reading before a new owner can be appointed.
//!
//! The payload `P` of a write is opaque here (the node's store op, the simulator's turn).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::placement::ShardId;
use crate::shardmap::{MapCommand, MemberIx, ShardChange, ShardMap, REPLICAS_MAX};

/// A write's number within one owner epoch of one shard.
pub type Seq = u64;

/// Messages between members about a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg<P> {
    /// The owner's write `seq` of `epoch`.
    Replicate { shard: ShardId, epoch: u64, seq: Seq, payload: P },
    /// A follower holds write `seq` durably.
    Ack { shard: ShardId, epoch: u64, seq: Seq },
    /// A follower refused a write: it knows `known_epoch`, in which the sender does not own.
    Refuse { shard: ShardId, epoch: u64, known_epoch: u64 },
    /// A learner installed the streamed data of the shard, sent for catch-up `attempt`.
    Streamed { shard: ShardId, attempt: Seq },
    /// The owner asks before serving read `seq`: do you still follow me at `epoch`? A
    /// member that knows a newer ownership answers [`Msg::Refuse`].
    Confirm { shard: ShardId, epoch: u64, seq: Seq },
    /// Yes: the member follows the sender at `epoch` (or knows no newer map).
    Confirmed { shard: ShardId, epoch: u64, seq: Seq },
}

/// Why a submitted write was not acknowledged. Its outcome is unknown: it may be durable on
/// some members, and the next owner may hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// This node does not own the shard (now, or any more).
    NotOwner,
    /// The shard has no owner: every in-sync member is gone.
    Unavailable,
    /// The write queue of the shard is full.
    Busy,
    /// A read on an owner that has not heard from the controller within its lease: a new
    /// owner may exist that this node does not know of.
    Fenced,
    /// The local store failed or refused the write.
    Store,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect<P> {
    /// Write `payload` to the local store; then call [`Ownership::persisted`].
    Persist {
        shard: ShardId,
        epoch: u64,
        seq: Seq,
        payload: P,
    },
    /// A follower's copy: write it to the local store; then call
    /// [`Ownership::replica_persisted`].
    PersistReplica {
        shard: ShardId,
        epoch: u64,
        seq: Seq,
        from: MemberIx,
        payload: P,
    },
    Send {
        to: MemberIx,
        msg: Msg<P>,
    },
    /// Write `seq` is durable on every in-sync member: answer the client.
    Release {
        shard: ShardId,
        seq: Seq,
    },
    /// Write `seq` will not be acknowledged here.
    Fail {
        shard: ShardId,
        seq: Seq,
        why: Failure,
    },
    /// Send the shard's stored data to learner `to` (every earlier write is durable here);
    /// the learner calls [`Ownership::stream_installed`] when it holds it.
    Stream {
        shard: ShardId,
        /// Names this catch-up attempt; the learner's `Streamed` echoes it.
        attempt: Seq,
        to: MemberIx,
    },
    /// Read `seq` may be served from the local store now: it holds every write of the
    /// shard acknowledged before the read was asked.
    ReadReady {
        shard: ShardId,
        seq: Seq,
    },
    /// Propose to the controller.
    Propose(MapCommand),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OwnershipConfig {
    /// Writes and reads of one shard waiting (for acknowledgement, for earlier writes);
    /// more are refused as busy.
    pub pending_per_shard_max: usize,
    /// Ticks between two proposals of the same promotion.
    pub propose_every_ticks: u64,
    /// Ticks a learner may take to catch up before its catch-up starts over.
    pub catch_up_patience_ticks: u64,
    /// Ticks an owner serves reads after it last heard from the controller. Must be
    /// shorter than the failure detector can declare it down (before which no new owner
    /// can be appointed), so a cut-off owner stops reading before a new one writes.
    pub read_lease_ticks: u64,
    /// Ticks a write may wait for one member's acknowledgement (a lost message, a stalled
    /// or partitioned member that the failure detector still sees up) before the owner
    /// proposes to drop that member from the shard (Kafka's ISR shrink); the planner later
    /// brings it back as a learner, which catches up afresh.
    pub ack_patience_ticks: u64,
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        OwnershipConfig {
            pending_per_shard_max: 4096,
            propose_every_ticks: 10,
            catch_up_patience_ticks: 50,
            read_lease_ticks: 10,
            ack_patience_ticks: 30,
        }
    }
}

#[derive(Debug, Clone)]
struct Pending {
    /// The owner epoch it was written under (acknowledgements name it).
    epoch: u64,
    local: bool,
    waiting: BTreeSet<MemberIx>,
    /// The tick it was submitted (see `ack_patience_ticks`).
    since: u64,
}

#[derive(Debug, Clone, Default)]
struct Learner {
    /// Writes from this one on are forwarded to it.
    from_seq: Seq,
    stream_sent: bool,
    streamed: bool,
    /// The tick this catch-up attempt started (a stalled one starts over).
    started_at: u64,
    /// Forwarded writes it has not acknowledged.
    unacked: BTreeSet<Seq>,
    /// Caught up: counted for acknowledgements, promotion proposed at this tick.
    proposed_at: Option<u64>,
}

impl Learner {
    /// A catch-up attempt starting now: it takes a fresh number, which names the attempt
    /// (a late report of an earlier one does not count) and after which every write is
    /// forwarded to the learner.
    fn start(next: &mut Seq, now: u64) -> Learner {
        let attempt = *next;
        *next += 1;
        Learner { from_seq: attempt, started_at: now, ..Default::default() }
    }
}

#[derive(Debug, Clone)]
struct Owned {
    epoch: u64,
    /// In-sync members other than this node.
    isr: BTreeSet<MemberIx>,
    learners: BTreeMap<MemberIx, Learner>,
    pending: BTreeMap<Seq, Pending>,
    /// Reads waiting for the writes submitted before them and for their confirmations.
    reads: BTreeMap<Seq, Read>,
    /// Members whose removal this owner proposed, and when (re-proposed every
    /// `propose_every_ticks` while they hold writes up).
    shrinking: BTreeMap<MemberIx, u64>,
}

impl Owned {
    /// Whether the shard's ISR (the others and this owner) takes a promotion: the map
    /// skips one into a full ISR, and the controller's planner makes room first.
    fn isr_has_room(&self) -> bool {
        self.isr.len() + 1 < REPLICAS_MAX
    }
}

#[derive(Debug, Clone)]
struct Read {
    /// Members that have not confirmed this owner yet.
    waiting: BTreeSet<MemberIx>,
    /// The tick it was asked or last asked again (a lost confirmation is asked again).
    asked_at: u64,
}

#[derive(Debug, Clone, Copy)]
struct Followed {
    epoch: u64,
    owner: Option<MemberIx>,
}

/// One node's side of every shard it holds.
#[derive(Debug)]
pub struct Ownership<P> {
    me: MemberIx,
    /// This process's incarnation: it holds shards only once the map knows it.
    incarnation: u64,
    cfg: OwnershipConfig,
    /// Write numbers are unique for the life of the process (across shards and epochs).
    next: Seq,
    /// Keyed access only (never iterated, so the hash order cannot leak into effects): a
    /// node owns tens of thousands of shards, and a hash lookup per write and
    /// acknowledgement costs less than a walk down a B-tree of that size.
    owned: FxHashMap<ShardId, Owned>,
    /// Owned shards with writes or reads waiting or learners catching up: the only ones a
    /// tick looks at (a node owns tens of thousands of shards, most of them idle).
    attention: BTreeSet<ShardId>,
    /// Keyed access only, as `owned`.
    followed: FxHashMap<ShardId, Followed>,
    /// Shards this node gave up because a member refused it as owner, with the epoch that
    /// member knew, until this node's map reaches that epoch (or holds it in the shard):
    /// writes and reads of an older epoch are refused, as the map's own entry makes them
    /// refused for any shard the map leaves this node out of (see `refusal`). At most one
    /// entry per shard, and only for shards this node owned.
    deposed: FxHashMap<ShardId, u64>,
    /// The version of the map applied last (the map `receive` and `replica_persisted`
    /// are passed).
    applied: u64,
    ticks: u64,
    /// The tick this node last heard from the controller (see `read_lease_ticks`).
    heard_at: Option<u64>,
    /// Shard changes to propose at the next tick (one entry for all of them, not one each).
    proposing: Vec<ShardChange>,
    out: VecDeque<Effect<P>>,
}

impl<P: Clone> Ownership<P> {
    pub fn new(me: MemberIx, incarnation: u64, cfg: OwnershipConfig) -> Ownership<P> {
        Ownership {
            me,
            incarnation,
            cfg,
            next: 0,
            owned: FxHashMap::default(),
            attention: BTreeSet::new(),
            followed: FxHashMap::default(),
            deposed: FxHashMap::default(),
            applied: 0,
            ticks: 0,
            heard_at: None,
            proposing: Vec::new(),
            out: VecDeque::new(),
        }
    }

    pub fn me(&self) -> MemberIx {
        self.me
    }

    /// Whether this node owns `shard` by the map it applied.
    pub fn owns(&self, shard: ShardId) -> bool {
        self.owned.contains_key(&shard)
    }

    /// The next effect to execute.
    pub fn poll(&mut self) -> Option<Effect<P>> {
        self.out.pop_front()
    }

    /// The map changed at `changed` shards (ascending). A restarted process holds nothing
    /// until the map has its new incarnation (the old one's shards passed to others, or
    /// wait for it as their last in-sync member).
    ///
    /// Only the changed shards this node owns, follows or the map names it in are read: a
    /// change to any other leaves it as it is. A snapshot or an assignment changes every
    /// shard; a node of a thousand holds about 200 of 65,536.
    pub fn map_applied(&mut self, map: &ShardMap, changed: &[ShardId]) {
        debug_assert!(changed.is_sorted(), "changed shards come ascending");
        let known = self.knows_me(map);
        self.applied = map.version;
        let mine = self.owned.len() + self.followed.len();
        let mine = mine + if known { map.shards_of_count(self.me) as usize } else { 0 };
        if mine < changed.len() {
            let relevant = self.relevant(map, known);
            let relevant = relevant.into_iter().filter(|s| changed.binary_search(s).is_ok());
            self.apply_shards(map, known, relevant);
        } else {
            self.apply_shards(map, known, changed.iter().copied());
        }
    }

    /// The map replaced the one applied before (a restart, a snapshot): any shard may have
    /// changed.
    pub fn map_replaced(&mut self, map: &ShardMap) {
        let known = self.knows_me(map);
        self.applied = map.version;
        let relevant = self.relevant(map, known);
        self.apply_shards(map, known, relevant);
    }

    /// Whether `map` counts this process in (its incarnation, live).
    fn knows_me(&self, map: &ShardMap) -> bool {
        map.member(self.me).is_some_and(|m| m.incarnation == self.incarnation && !m.state.is_gone())
    }

    /// The shards a change can matter to, ascending: the ones this node owns, follows or
    /// was deposed from, and the ones `map` names it in (none if the map does not count it
    /// in).
    fn relevant(&self, map: &ShardMap, known: bool) -> Vec<ShardId> {
        let named = map.shards_of(self.me).filter(|_| known);
        let held = self.owned.keys().chain(self.followed.keys()).chain(self.deposed.keys());
        let mut all: Vec<ShardId> = held.copied().chain(named).collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Applies `map`'s entries of `shards` (ascending: effects come in shard order).
    fn apply_shards(
        &mut self,
        map: &ShardMap,
        known: bool,
        shards: impl IntoIterator<Item = ShardId>,
    ) {
        for shard in shards {
            let Some(mut e) = map.shard(shard).copied() else { continue };
            let epoch = e.epoch;
            if !known {
                e = crate::shardmap::ShardEntry::default();
            }
            if e.owner == Some(self.me) {
                self.followed.remove(&shard);
                self.deposed.remove(&shard);
                self.own(shard, &e);
            } else {
                self.give_up(
                    shard,
                    if e.is_unavailable() { Failure::Unavailable } else { Failure::NotOwner },
                );
                let holds = e.isr.contains(self.me) || e.learners.contains(self.me);
                if holds {
                    let followed = self.followed.get(&shard).map_or(0, |f| f.epoch);
                    if e.epoch >= followed {
                        self.followed.insert(shard, Followed { epoch: e.epoch, owner: e.owner });
                    }
                    self.deposed.remove(&shard);
                } else {
                    // The map's entry fences older epochs from now on (see `refusal`).
                    self.followed.remove(&shard);
                    if self.deposed.get(&shard).is_some_and(|&d| d <= epoch) {
                        self.deposed.remove(&shard);
                    }
                }
            }
        }
    }

    /// Reads every changed shard, as [`Ownership::map_applied`] did before it read only the
    /// relevant ones: the reference its tests compare it with.
    #[cfg(test)]
    pub(crate) fn map_applied_scanning(&mut self, map: &ShardMap, changed: &[ShardId]) {
        let known = self.knows_me(map);
        self.apply_shards(map, known, changed.iter().copied());
    }

    /// The shards this node follows: (shard, epoch, owner), ascending.
    #[cfg(test)]
    pub(crate) fn followed(&self) -> Vec<(ShardId, u64, Option<MemberIx>)> {
        let mut all: Vec<_> = self.followed.iter().map(|(s, f)| (*s, f.epoch, f.owner)).collect();
        all.sort_unstable();
        all
    }

    /// How many shards this node keeps a refusal's epoch for (see `deposed`).
    #[cfg(test)]
    pub(crate) fn deposed_count(&self) -> usize {
        self.deposed.len()
    }

    /// Takes or keeps ownership of `shard` at entry `e`.
    fn own(&mut self, shard: ShardId, e: &crate::shardmap::ShardEntry) {
        let isr: BTreeSet<MemberIx> =
            e.isr.as_slice().iter().copied().filter(|&m| m != self.me).collect();
        let next = &mut self.next;
        let o = self.owned.entry(shard).or_insert_with(|| Owned {
            epoch: e.epoch,
            isr: BTreeSet::new(),
            learners: BTreeMap::new(),
            pending: BTreeMap::new(),
            reads: BTreeMap::new(),
            shrinking: BTreeMap::new(),
        });
        o.epoch = e.epoch;
        o.learners.retain(|m, _| e.learners.contains(*m));
        let now = self.ticks;
        for &l in e.learners.as_slice() {
            o.learners.entry(l).or_insert_with(|| Learner::start(next, now));
        }
        // A member that left the in-sync set is not waited for; one that entered it was a
        // caught-up learner, already waited for, and so is a caught-up learner whose
        // promotion is not applied yet.
        let counted: BTreeSet<MemberIx> = o
            .learners
            .iter()
            .filter(|(_, l)| l.proposed_at.is_some())
            .map(|(m, _)| *m)
            .chain(isr.iter().copied())
            .collect();
        for p in o.pending.values_mut() {
            p.waiting.retain(|m| counted.contains(m));
        }
        // A map in which this node still owns at a newer epoch vouches up to its version:
        // members that left the shard need not confirm.
        for r in o.reads.values_mut() {
            r.waiting.retain(|m| isr.contains(m) || e.learners.contains(*m));
        }
        o.isr = isr;
        if !o.learners.is_empty() || !o.pending.is_empty() || !o.reads.is_empty() {
            self.attention.insert(shard);
        }
        self.settle(shard);
    }

    /// This node no longer owns `shard`: what waits fails.
    fn give_up(&mut self, shard: ShardId, why: Failure) {
        if let Some(o) = self.owned.remove(&shard) {
            for seq in o.pending.keys().chain(o.reads.keys()) {
                self.out.push_back(Effect::Fail { shard, seq: *seq, why });
            }
        }
    }

    /// Submits a write of an owned shard; its sequence number, which a later
    /// [`Effect::Release`] or [`Effect::Fail`] names.
    pub fn submit(&mut self, shard: ShardId, payload: P) -> Result<Seq, Failure> {
        let max = self.cfg.pending_per_shard_max;
        let Some(o) = self.owned.get_mut(&shard) else { return Err(Failure::NotOwner) };
        if o.pending.len() + o.reads.len() >= max {
            return Err(Failure::Busy);
        }
        let seq = self.next;
        self.next += 1;
        let caught_up = o.learners.iter().filter(|(_, l)| l.proposed_at.is_some()).map(|(m, _)| *m);
        let waiting: BTreeSet<MemberIx> = o.isr.iter().copied().chain(caught_up).collect();
        o.pending.insert(seq, Pending { epoch: o.epoch, local: false, waiting, since: self.ticks });
        self.attention.insert(shard);
        let epoch = o.epoch;
        self.out.push_back(Effect::Persist { shard, epoch, seq, payload: payload.clone() });
        for &to in &o.isr {
            self.out.push_back(Effect::Send {
                to,
                msg: Msg::Replicate { shard, epoch, seq, payload: payload.clone() },
            });
        }
        for (&to, l) in o.learners.iter_mut() {
            l.unacked.insert(seq);
            self.out.push_back(Effect::Send {
                to,
                msg: Msg::Replicate { shard, epoch, seq, payload: payload.clone() },
            });
        }
        Ok(seq)
    }

    /// The controller's leader was heard from (or this node leads it): reads may be served
    /// for `read_lease_ticks` more ticks.
    pub fn controller_heard(&mut self) {
        self.heard_at = Some(self.ticks);
    }

    fn lease_valid(&self) -> bool {
        self.heard_at.is_some_and(|at| self.ticks - at < self.cfg.read_lease_ticks)
    }

    /// Asks to read an owned shard; a later [`Effect::ReadReady`] (once every write
    /// submitted before is acknowledged) or [`Effect::Fail`] names the returned number.
    /// Refused outright on a node whose controller lease ran out.
    pub fn read(&mut self, shard: ShardId) -> Result<Seq, Failure> {
        let Some(o) = self.owned.get(&shard) else { return Err(Failure::NotOwner) };
        if o.pending.len() + o.reads.len() >= self.cfg.pending_per_shard_max {
            return Err(Failure::Busy);
        }
        if !self.lease_valid() {
            return Err(Failure::Fenced);
        }
        let seq = self.next;
        self.next += 1;
        let o = self.owned.get_mut(&shard).expect("checked");
        let waiting: BTreeSet<MemberIx> = o.isr.iter().chain(o.learners.keys()).copied().collect();
        let epoch = o.epoch;
        for &to in &waiting {
            self.out.push_back(Effect::Send { to, msg: Msg::Confirm { shard, epoch, seq } });
        }
        o.reads.insert(seq, Read { waiting, asked_at: self.ticks });
        self.attention.insert(shard);
        self.settle(shard);
        Ok(seq)
    }

    /// The local store holds write `seq` of `epoch`.
    pub fn persisted(&mut self, shard: ShardId, epoch: u64, seq: Seq) {
        let Some(o) = self.owned.get_mut(&shard) else { return };
        if let Some(p) = o.pending.get_mut(&seq).filter(|p| p.epoch == epoch) {
            p.local = true;
        }
        self.settle(shard);
    }

    /// The local store failed or refused write `seq`: it will not be acknowledged here.
    pub fn persist_failed(&mut self, shard: ShardId, epoch: u64, seq: Seq) {
        let Some(o) = self.owned.get_mut(&shard) else { return };
        if o.pending.get(&seq).is_some_and(|p| p.epoch == epoch) {
            o.pending.remove(&seq);
            self.out.push_back(Effect::Fail { shard, seq, why: Failure::Store });
        }
        self.settle(shard);
    }

    /// A follower's store holds the owner's write: acknowledge it to `from`.
    /// `map` is the map this machine applied last.
    pub fn replica_persisted(
        &mut self,
        shard: ShardId,
        epoch: u64,
        seq: Seq,
        from: MemberIx,
        map: &ShardMap,
    ) {
        // Ownership may have moved while the write was persisted: a node that owns the
        // shard now (it may have streamed its copy to a learner without this write
        // already) or follows a newer owner does not vouch for it to the old one.
        let msg = match self.refusal(shard, epoch, from, map) {
            Some(known_epoch) => Msg::Refuse { shard, epoch, known_epoch },
            None => Msg::Ack { shard, epoch, seq },
        };
        self.out.push_back(Effect::Send { to: from, msg });
    }

    /// The epoch this node knows, if it refuses `from`'s write (or read) of `epoch`: it
    /// owns the shard itself; or it follows a newer epoch whose owner is another; or its
    /// map (`map`, the one applied last) is at a newer epoch of the shard, leaves this
    /// node out of it and names another owner; or a member refused this node as owner at
    /// a newer epoch. A write of an older epoch then comes from an owner that is no longer
    /// one, and this node's acknowledgement would count for writes the newer in-sync
    /// members lack.
    fn refusal(&self, shard: ShardId, epoch: u64, from: MemberIx, map: &ShardMap) -> Option<u64> {
        debug_assert_eq!(map.version, self.applied, "the map applied last");
        if let Some(o) = self.owned.get(&shard) {
            return Some(o.epoch);
        }
        let older_than =
            |f: Followed| (epoch < f.epoch && f.owner != Some(from)).then_some(f.epoch);
        let followed = self.followed.get(&shard).copied();
        let left_out = map.shard(shard).copied().filter(|e| {
            !self.knows_me(map) || !(e.isr.contains(self.me) || e.learners.contains(self.me))
        });
        let left_out = left_out.map(|e| Followed { epoch: e.epoch, owner: e.owner });
        let deposed = self.deposed.get(&shard).map(|&epoch| Followed { epoch, owner: None });
        [followed, left_out, deposed].into_iter().flatten().filter_map(older_than).max()
    }

    /// This learner installed the streamed data of `shard`: tell the owner.
    pub fn stream_installed(&mut self, shard: ShardId, attempt: Seq, owner: MemberIx) {
        self.out.push_back(Effect::Send { to: owner, msg: Msg::Streamed { shard, attempt } });
    }

    /// A message from member `from`; `map` is the map this machine applied last.
    pub fn receive(&mut self, from: MemberIx, msg: Msg<P>, map: &ShardMap) {
        match msg {
            Msg::Replicate { shard, epoch, seq, payload } => {
                if let Some(known_epoch) = self.refusal(shard, epoch, from, map) {
                    self.out.push_back(Effect::Send {
                        to: from,
                        msg: Msg::Refuse { shard, epoch, known_epoch },
                    });
                    return;
                }
                let known = self.followed.get(&shard).map_or(0, |f| f.epoch);
                if epoch > known {
                    // The sender owns by a map this node has not applied yet.
                    self.followed.insert(shard, Followed { epoch, owner: Some(from) });
                }
                self.out.push_back(Effect::PersistReplica { shard, epoch, seq, from, payload });
            }
            Msg::Ack { shard, epoch, seq } => {
                let Some(o) = self.owned.get_mut(&shard) else { return };
                let Some(p) = o.pending.get_mut(&seq).filter(|p| p.epoch == epoch) else {
                    // Already released, or about another ownership: a learner's
                    // acknowledgement still counts for its catch-up.
                    if let Some(l) = o.learners.get_mut(&from) {
                        l.unacked.remove(&seq);
                    }
                    self.settle(shard);
                    return;
                };
                p.waiting.remove(&from);
                if let Some(l) = o.learners.get_mut(&from) {
                    l.unacked.remove(&seq);
                }
                self.settle(shard);
            }
            Msg::Refuse { shard, known_epoch, .. } => {
                // A follower applied a map in which this node does not own at this epoch:
                // serve nothing more until the map catches up.
                if self.owned.get(&shard).is_some_and(|o| known_epoch > o.epoch) {
                    self.give_up(shard, Failure::NotOwner);
                    // Nor accept writes of an epoch before it (an older owner's).
                    let d = self.deposed.entry(shard).or_insert(known_epoch);
                    *d = known_epoch.max(*d);
                }
            }
            Msg::Streamed { shard, attempt } => {
                let Some(o) = self.owned.get_mut(&shard) else { return };
                if let Some(l) = o.learners.get_mut(&from) {
                    l.streamed |= l.stream_sent && attempt == l.from_seq;
                }
                self.settle(shard);
            }
            Msg::Confirm { shard, epoch, seq } => {
                // The same test as a write's.
                let msg = match self.refusal(shard, epoch, from, map) {
                    Some(known_epoch) => Msg::Refuse { shard, epoch, known_epoch },
                    None => Msg::Confirmed { shard, epoch, seq },
                };
                self.out.push_back(Effect::Send { to: from, msg });
            }
            Msg::Confirmed { shard, seq, .. } => {
                // Any epoch of this ownership will do: the member did not know another
                // owner when it answered, after the read was asked (a new owner is among
                // the members asked, and acknowledges nothing before it owns).
                let Some(o) = self.owned.get_mut(&shard) else { return };
                if let Some(r) = o.reads.get_mut(&seq) {
                    r.waiting.remove(&from);
                }
                self.settle(shard);
            }
        }
    }

    /// Time passed: proposals that were lost are made again.
    pub fn tick(&mut self) {
        self.ticks += 1;
        // Only shards with something waiting or catching up; quiet ones leave the set.
        let owned = &self.owned;
        self.attention.retain(|s| {
            owned.get(s).is_some_and(|o| {
                !o.pending.is_empty() || !o.reads.is_empty() || !o.learners.is_empty()
            })
        });
        let shards: Vec<ShardId> = self.attention.iter().copied().collect();
        let every = self.cfg.propose_every_ticks.max(1);
        let now = self.ticks;
        let lease = self.lease_valid();
        for &shard in &shards {
            let o = self.owned.get_mut(&shard).expect("attention holds owned shards");
            if !lease {
                for seq in std::mem::take(&mut o.reads).into_keys() {
                    self.out.push_back(Effect::Fail { shard, seq, why: Failure::Fenced });
                }
            }
            // A confirmation lost on the way is asked for again (the epoch may have
            // risen meanwhile: the reply must name the current one).
            for (&seq, r) in o.reads.iter_mut().filter(|(_, r)| now - r.asked_at >= every) {
                r.asked_at = now;
                for &to in &r.waiting {
                    let msg = Msg::Confirm { shard, epoch: o.epoch, seq };
                    self.out.push_back(Effect::Send { to, msg });
                }
            }
        }
        let next = &mut self.next;
        let patience = self.cfg.catch_up_patience_ticks.max(1);
        let ack_patience = self.cfg.ack_patience_ticks.max(1);
        let again = &mut self.proposing;
        let mut restarted = Vec::new();
        for &shard in &shards {
            let o = self.owned.get_mut(&shard).expect("attention holds owned shards");
            for l in o.learners.values_mut() {
                // A catch-up that stalled (a lost stream or write, a learner that was not
                // ready for them) starts over with a fresh stream.
                if l.proposed_at.is_none() && now - l.started_at >= patience {
                    *l = Learner::start(next, now);
                    restarted.push(shard);
                }
            }
            let room = o.isr_has_room();
            for (&m, l) in &mut o.learners {
                if room && l.proposed_at.is_some_and(|at| now - at >= every) {
                    l.proposed_at = Some(now);
                    again.push(promote(shard, o.epoch, m, *next));
                }
            }
            // A member that holds a write up past the patience is dropped from the shard.
            let stalled: BTreeSet<MemberIx> = o
                .pending
                .values()
                .filter(|p| now - p.since >= ack_patience)
                .flat_map(|p| p.waiting.iter().copied())
                .collect();
            o.shrinking.retain(|m, _| stalled.contains(m));
            for m in stalled {
                let due = o.shrinking.get(&m).is_none_or(|at| now - at >= every);
                if due {
                    o.shrinking.insert(m, now);
                    again.push(ShardChange::Remove { shard, epoch: o.epoch, member: m });
                }
            }
        }
        for shard in restarted {
            self.settle(shard);
        }
        // The tick's changes, and those since the last tick, go as few log entries.
        let proposing = std::mem::take(&mut self.proposing);
        self.out.extend(proposals(&proposing).map(Effect::Propose));
    }

    /// Releases what is acknowledged, starts streams whose earlier writes are durable, and
    /// counts learners that caught up.
    fn settle(&mut self, shard: ShardId) {
        let (now, next) = (self.ticks, self.next);
        let Some(o) = self.owned.get_mut(&shard) else { return };
        let done: Vec<Seq> = o
            .pending
            .iter()
            .filter(|(_, p)| p.local && p.waiting.is_empty())
            .map(|(s, _)| *s)
            .collect();
        for seq in done {
            o.pending.remove(&seq);
            self.out.push_back(Effect::Release { shard, seq });
        }
        let oldest_pending = o.pending.keys().next().copied();
        let ready: Vec<Seq> = o
            .reads
            .iter()
            .filter(|(r, read)| read.waiting.is_empty() && oldest_pending.is_none_or(|p| p > **r))
            .map(|(r, _)| *r)
            .collect();
        for seq in ready {
            o.reads.remove(&seq);
            self.out.push_back(Effect::ReadReady { shard, seq });
        }
        let oldest_local_pending = o.pending.iter().find(|(_, p)| !p.local).map(|(s, _)| *s);
        let room = o.isr_has_room();
        for (&to, l) in o.learners.iter_mut() {
            if !l.stream_sent && oldest_local_pending.is_none_or(|s| s >= l.from_seq) {
                l.stream_sent = true;
                self.out.push_back(Effect::Stream { shard, attempt: l.from_seq, to });
            }
            if l.streamed && l.unacked.is_empty() && l.proposed_at.is_none() {
                // From now on every write waits for it too: promoted or not, it will hold
                // every write acknowledged from here.
                l.proposed_at = Some(now);
                if room {
                    self.proposing.push(promote(shard, o.epoch, to, next));
                }
            }
        }
    }
}

/// Shard changes in one proposal (one controller log entry).
pub const PROPOSAL_CHANGES_MAX: usize = 4096;

/// Shard changes as few proposals of at most [`PROPOSAL_CHANGES_MAX`] changes: one log
/// entry for many shards, not one each.
fn proposals(changes: &[ShardChange]) -> impl Iterator<Item = MapCommand> + '_ {
    changes.chunks(PROPOSAL_CHANGES_MAX).map(|c| MapCommand::Changes(c.to_vec()))
}

fn promote(shard: ShardId, epoch: u64, member: MemberIx, next: Seq) -> ShardChange {
    ShardChange::Promote { shard, epoch, member, turn_version: next }
}

#[cfg(test)]
mod tests;
