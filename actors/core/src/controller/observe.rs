//! Observers: every node outside the Raft group follows the map by fetching the committed
//! log from the leader (KRaft's brokers fetch the metadata log the same way), instead of
//! being a raft-rs learner. A learner is tracked by every member (its progress, ~140 B, on
//! each: at 5,000 nodes 16.6 M progress entries) and every one of them applies each group
//! change, which copies and checks the whole configuration (raft-rs's `Changer`): a group
//! change cost each node time linear in the cluster. An observer costs one entry on the
//! leader, and the group holds only its voters and the few learners about to become voters.
//!
//! The protocol, all in this machine (the driver only carries [`ControllerMessage`]s):
//! - An observer sends [`ControllerMessage::Fetch`] with its applied index every heartbeat
//!   (`heartbeat_ticks`), and again at once after an answer that carried entries, to the
//!   leader it was told of; while it knows none, each fetch goes to the next of its peers
//!   (the driver's list, then the map's members), which answer with their leader.
//! - The leader answers with what it applied after that index: a snapshot of the map when
//!   its log no longer holds the next entry, else entries (at most `message_bytes_max`). A
//!   fetch with nothing to send waits (is parked) until the leader applies more or its next
//!   heartbeat, so new entries reach observers as they apply, and every observer hears from
//!   the leader each heartbeat (nodes' leases count on it). The leader keeps each
//!   observer's applied index (at most `observers_max`): its planner moves shards only to
//!   members whose map keeps up, and promotes only caught-up nodes.
//! - Only applied (committed) entries are sent, in order, so an observer's map is always a
//!   prefix of the group's history, whichever leader or term it heard from.
//! - A node the group adds as a learner is still an observer until Raft's snapshot makes it
//!   a member; entries at or below its applied index are then already in its map, and only
//!   the group's own entries among them are applied, to Raft. A member removed from the
//!   group observes from its applied index.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use raft::eraftpb::{Entry, Snapshot};
use raft::{GetEntriesContext, Storage};

use super::{
    controller_id, AppliedEntry, Controller, ControllerError, ControllerId, ControllerMessage,
};
use crate::shardmap::ShardMap;

/// An observer's side: whom it fetches from.
#[derive(Debug)]
pub(super) struct Observing {
    /// Nodes to ask while no leader is known (the driver's; the map's members follow).
    peers: Arc<[ControllerId]>,
    next_peer: usize,
    /// The term of the leader it follows (a hint from an older term is ignored).
    leader_term: u64,
    /// A leader it stopped following for its silence, in its term: others' word for it
    /// in that term is not taken again (they may not know yet), only its own or a newer
    /// leader's.
    forgotten: Option<(ControllerId, u64)>,
    /// The voters as the log it applied names them: asked first while no leader is known.
    voters: BTreeSet<ControllerId>,
    /// Ticks since the leader it follows last answered.
    silent_ticks: usize,
    /// Ticks since the last fetch.
    since_fetch: usize,
}

impl Observing {
    pub(super) fn new(seed: u64) -> Observing {
        Observing {
            peers: Arc::from(Vec::new()),
            // Observers started together ask different peers first.
            next_peer: seed as usize,
            leader_term: 0,
            forgotten: None,
            voters: BTreeSet::new(),
            silent_ticks: 0,
            since_fetch: 0,
        }
    }
}

/// The leader's side: the observers that fetch from it.
#[derive(Debug, Default)]
pub(super) struct Watchers {
    /// Each observer's applied index, and the tick it last fetched at.
    by_id: BTreeMap<ControllerId, (u64, u64)>,
    /// Observers whose fetch waits for entries.
    parked: BTreeSet<ControllerId>,
}

impl Watchers {
    pub(super) fn applied(&self, id: ControllerId) -> Option<u64> {
        self.by_id.get(&id).map(|(applied, _)| *applied)
    }

    pub(super) fn clear(&mut self) {
        if !self.by_id.is_empty() {
            *self = Watchers::default();
        }
    }
}

/// What observing and serving observers produced since the last ready.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub(super) messages: Vec<ControllerMessage>,
    pub(super) applied: Vec<AppliedEntry>,
    pub(super) snapshot_installed: bool,
    pub(super) leader_changed: Option<Option<ControllerId>>,
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.applied.is_empty()
            && !self.snapshot_installed
            && self.leader_changed.is_none()
    }
}

impl Controller {
    /// Whether this node is outside the group (not a voter or learner in its own view of
    /// the configuration): it follows the map by fetching it.
    pub fn is_observer(&self) -> bool {
        self.raw.raft.prs().get(self.id()).is_none()
    }

    /// Nodes an observer asks for the leader while it knows none (the driver's view of
    /// the cluster; the map's members are asked after them).
    pub fn observe_peers(&mut self, peers: Arc<[ControllerId]>) {
        self.observing.peers = peers;
    }

    /// This node in the group: `voter`, `learner` or `observer`.
    pub fn role(&self) -> &'static str {
        match self.raw.raft.prs().conf().voters().contains(self.id()) {
            true => "voter",
            false if self.is_observer() => "observer",
            false => "learner",
        }
    }

    /// The voters as the log this observer fetched names them, ascending.
    pub(super) fn observed_voters(&self) -> Vec<ControllerId> {
        self.observing.voters.iter().copied().collect()
    }

    /// Observers the leader keeps track of.
    pub fn observers(&self) -> usize {
        self.watchers.by_id.len()
    }

    /// An observer's tick: a fetch every heartbeat; a leader silent for three heartbeats
    /// (it answers every fetch by the next one) is forgotten, and peers are asked in turn.
    pub(super) fn observe_tick(&mut self) {
        let heartbeat = self.cfg.heartbeat_ticks.max(1);
        let o = &mut self.observing;
        o.silent_ticks += 1;
        o.since_fetch += 1;
        if o.silent_ticks > 3 * heartbeat {
            if let Some(leader) = self.leader {
                o.forgotten = Some((leader, o.leader_term));
                self.set_observed_leader(None);
            }
        }
        if self.observing.since_fetch >= self.cfg.heartbeat_ticks.max(1) {
            self.fetch();
        }
    }

    /// Sends a fetch to the leader; while none is known, to every voter it knows of and
    /// the next of its peers (one of them answers as leader once one is elected).
    fn fetch(&mut self) {
        let me = self.id();
        let to: Vec<ControllerId> = match self.leader {
            Some(leader) if leader != me => vec![leader],
            _ => {
                // The voters its log named, and those of its own configuration (a member
                // removed from the group knows them from there).
                let conf = self.raw.raft.prs().conf().voters().ids();
                let mut to: Vec<ControllerId> = conf.iter().collect();
                to.extend(&self.observing.voters);
                to.retain(|id| *id != me);
                to.extend(self.next_peer());
                to.sort_unstable();
                to.dedup();
                to
            }
        };
        self.observing.since_fetch = 0;
        let applied = self.applied_index();
        for to in to {
            self.pending.messages.push(ControllerMessage::Fetch { from: me, to, applied });
        }
    }

    /// The next peer to ask: the driver's, then the map's members that are not gone.
    fn next_peer(&mut self) -> Option<ControllerId> {
        let me = self.id();
        let map = &self.raw.store().map;
        let o = &mut self.observing;
        let total = o.peers.len() + map.members().len();
        for _ in 0..total {
            let k = o.next_peer % total;
            o.next_peer = o.next_peer.wrapping_add(1);
            let id = match o.peers.get(k) {
                Some(id) => Some(*id),
                None => {
                    let m = &map.members()[k - o.peers.len()];
                    (!m.state.is_gone()).then(|| controller_id(&m.name))
                }
            };
            if let Some(id) = id.filter(|id| *id != me) {
                return Some(id);
            }
        }
        None
    }

    fn set_observed_leader(&mut self, leader: Option<ControllerId>) {
        self.observing.silent_ticks = 0;
        if self.leader != leader {
            self.leader = leader;
            self.pending.leader_changed = Some(leader);
        }
    }

    /// A fetch from observer `from`, whose map is at `applied`: the leader answers with
    /// what it applied since (or parks the fetch until it applies more); anyone else
    /// answers with the leader it knows.
    pub(super) fn serve_fetch(&mut self, from: ControllerId, applied: u64) {
        if !self.is_leader() {
            self.answer(from, None);
            return;
        }
        let leader_applied = self.applied_index();
        let w = &mut self.watchers;
        let tracked = w.by_id.contains_key(&from) || w.by_id.len() < self.cfg.observers_max;
        if tracked {
            w.by_id.insert(from, (applied, self.ticks));
        }
        if tracked && applied >= leader_applied {
            w.parked.insert(from);
        } else {
            w.parked.remove(&from);
            self.answer(from, Some(applied));
        }
    }

    /// Answers observer `to`: the leader it knows and, when `applied` is given (this node
    /// leads), what this node applied after it.
    fn answer(&mut self, to: ControllerId, applied: Option<u64>) {
        let (mut snapshot, mut entries) = (None, Vec::new());
        let store = self.raw.store();
        match applied {
            Some(applied) if applied < store.applied => {
                let first = store.log.first_index().unwrap_or(1);
                if applied + 1 < first {
                    snapshot = store.snapshot_of(store.applied, &store.map).ok();
                } else {
                    let (max, context) =
                        (self.cfg.message_bytes_max, GetEntriesContext::empty(false));
                    entries = (store.log.entries(applied + 1, store.applied + 1, max, context))
                        .unwrap_or_default();
                }
            }
            _ => {}
        }
        // An observer names the leader it follows, in that leader's term.
        let term = match self.is_observer() {
            true => self.observing.leader_term,
            false => self.term(),
        };
        let (from, leader) = (self.id(), self.leader);
        let answer = ControllerMessage::Fetched { from, to, leader, term, snapshot, entries };
        self.pending.messages.push(answer);
    }

    /// The leader applied more: every parked fetch is answered.
    pub(super) fn answer_parked(&mut self) {
        if !self.is_leader() {
            return;
        }
        for id in std::mem::take(&mut self.watchers.parked) {
            let applied = self.watchers.applied(id);
            self.answer(id, applied);
        }
    }

    /// The leader's tick: parked fetches are answered each heartbeat (observers hear from
    /// it); observers silent for ten election timeouts, or taken into the group, are
    /// forgotten.
    pub(super) fn watchers_tick(&mut self) {
        let heartbeat = self.cfg.heartbeat_ticks.max(1) as u64;
        if self.ticks.is_multiple_of(heartbeat) {
            self.answer_parked();
        }
        let forget = 10 * self.cfg.election_ticks.max(1) as u64;
        if self.ticks.is_multiple_of(forget) {
            let now = self.ticks;
            let (w, prs) = (&mut self.watchers, self.raw.raft.prs());
            w.by_id.retain(|id, (_, heard)| now - *heard < forget && prs.get(*id).is_none());
            w.parked.retain(|id| w.by_id.contains_key(id));
        }
    }

    /// Whether observer `id` receives entries as they apply (the leader's view): it fetched
    /// within an election timeout, and the log still holds its next entry.
    pub(super) fn observer_keeps_up(&self, id: ControllerId) -> bool {
        let Some(&(applied, heard)) = self.watchers.by_id.get(&id) else { return false };
        let first = self.raw.store().log.first_index().unwrap_or(1);
        self.ticks - heard <= self.cfg.election_ticks as u64 && applied + 1 >= first
    }

    /// The voters an applied configuration entry names (added as voters, or no longer).
    fn observe_conf_change(&mut self, entry: &Entry) {
        use raft::eraftpb::ConfChangeType;
        let Some(cc) = super::conf_change(entry) else { return };
        for c in &cc.changes {
            let (kind, id) = (c.get_change_type(), c.node_id);
            if kind == ConfChangeType::AddNode {
                self.observing.voters.insert(id);
            } else {
                self.observing.voters.remove(&id);
            }
        }
    }

    /// An answer to this observer's fetch.
    pub(super) fn fetched(
        &mut self,
        from: ControllerId,
        leader: Option<ControllerId>,
        term: u64,
        snapshot: Option<Snapshot>,
        entries: Vec<Entry>,
    ) -> Result<(), ControllerError> {
        if !self.is_observer() {
            return Ok(());
        }
        if self.leader == Some(from) {
            self.observing.silent_ticks = 0;
        }
        let o = &mut self.observing;
        let stale = |l: ControllerId| o.forgotten.is_some_and(|(f, t)| f == l && term <= t);
        match leader {
            // Named by itself, or by another unless it is the one forgotten.
            Some(l) if term >= o.leader_term && (l == from || !stale(l)) => {
                o.leader_term = term;
                o.forgotten = None;
                self.set_observed_leader(Some(l));
            }
            // The leader itself saying it no longer leads.
            None if self.leader == Some(from) && term >= o.leader_term => {
                o.leader_term = term;
                self.set_observed_leader(None);
            }
            _ => {}
        }
        if self.leader != Some(from) {
            // Entries only from the leader it follows (others send none).
            return Ok(());
        }
        let mut got = false;
        if let Some(s) = snapshot.filter(|s| s.get_metadata().index > self.applied_index()) {
            let map = match &self.raw.store().shared {
                Some(shared) => shared.decode(&s.data),
                None => ShardMap::decode(&s.data),
            }
            .map_err(ControllerError::Snapshot)?;
            let cs = s.get_metadata().get_conf_state();
            let voters = cs.get_voters().iter().chain(cs.get_voters_outgoing());
            self.observing.voters = voters.copied().collect();
            let store = self.raw.mut_store();
            store.applied = s.get_metadata().index;
            store.map = Arc::new(map);
            *store.encoded.borrow_mut() = Some((store.applied, s.data.clone()));
            self.pending.snapshot_installed = true;
            got = true;
        }
        for entry in entries {
            if entry.index <= self.applied_index() {
                continue;
            }
            if entry.index != self.applied_index() + 1 {
                break;
            }
            self.observe_conf_change(&entry);
            let applied = self.apply_to_map(&entry);
            self.pending.applied.push(applied);
            got = true;
        }
        if got {
            // More may wait: fetch again at once (an empty answer waits for new entries).
            self.fetch();
        }
        Ok(())
    }
}
