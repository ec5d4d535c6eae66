//! The placement controller: a Raft group (raft-rs) whose log is the only writer of the
//! [`ShardMap`]. Sans-IO like everything in this crate: the driver ticks it, steps it with
//! peers' messages, proposes commands, and drains a [`ControllerReady`] batch (what to
//! persist, what to send now, what to send only after persisting), the way raft-rs's own
//! `RawNode`/`Ready` works. Every member of the group applies the same committed commands
//! to its copy of the map, so every copy is a prefix of the same history.
//!
//! Determinism: raft-rs draws its election timeout from `rand::thread_rng()` in
//! `[min_election_tick, max_election_tick)`; the controller sets `max = min + 1` and gives
//! each node its own `min` from the seed it is handed, so elections happen at the same ticks
//! in every run (the simulator depends on it).
//!
//! Durability: the log, the hard state and snapshots leave through [`Persist`]; a restarted
//! node hands them back to [`Controller::restore`]. Snapshots carry the map (postcard) at
//! the index they were taken; the log is compacted behind them, and a peer that fell behind
//! the first kept entry is sent the snapshot.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType,
    HardState, Message, Snapshot,
};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, RawNode, StateRole, Storage};
use serde::{Deserialize, Serialize};

use crate::ownership::PROPOSAL_CHANGES_MAX;
use crate::shardmap::{Applied, MapCommand, ShardChange, ShardMap};

/// raft-rs's message, entry and snapshot types, for drivers.
pub use raft::eraftpb as raft_message;

/// A controller node's id in the Raft group (non-zero).
pub type ControllerId = u64;

/// The Raft id of the member named `name`: stable across restarts (a voter keeps its log).
pub fn controller_id(name: &str) -> ControllerId {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes()).max(1)
}

/// The controller's settings (the node's `[controller]` section).
pub use botclaw_config::ControllerConfig;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("a snapshot's map does not decode: {0}")]
    Snapshot(postcard::Error),
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<ControllerId> },
    /// Every change of the command would be skipped: its epoch is behind the applied map,
    /// or the same change is already in the log and not yet applied (a re-sent proposal).
    #[error("every change is stale or already proposed")]
    Stale,
}

/// One change of the controller group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupChange {
    AddVoter,
    AddLearner,
    Remove,
}

/// What a driver writes durably before it sends [`ControllerReady::after_persist`], in
/// this order (see [`Restored::write`]): a snapshot received from the leader (it replaces
/// the whole log), entries to append (an entry replaces any kept entry at its index and
/// everything after it), the hard state, and a snapshot this member took to compact its
/// log (entries up to its index may then be dropped).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Persist {
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub compaction: Option<Snapshot>,
}

impl Persist {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.compaction.is_none()
    }

    /// One record for a disk log: postcard around raft-rs's own protobuf encodings.
    pub fn to_bytes(&self) -> Vec<u8> {
        let pb = protobuf_bytes;
        let record = PersistRecord {
            snapshot: self.snapshot.as_ref().map(|s| pb(s)),
            entries: self.entries.iter().map(|e| pb(e)).collect(),
            hard_state: self.hard_state.as_ref().map(|h| pb(h)),
            compaction: self.compaction.as_ref().map(|s| pb(s)),
        };
        postcard::to_stdvec(&record).expect("a record encodes")
    }

    /// A record read back; an error for bytes that are not one (corruption).
    pub fn from_bytes(bytes: &[u8]) -> Result<Persist, String> {
        use from_protobuf as pb;
        let r: PersistRecord = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
        Ok(Persist {
            snapshot: r.snapshot.as_deref().map(pb::<Snapshot>).transpose()?,
            entries: r.entries.iter().map(|e| pb::<Entry>(e)).collect::<Result<_, _>>()?,
            hard_state: r.hard_state.as_deref().map(pb::<HardState>).transpose()?,
            compaction: r.compaction.as_deref().map(pb::<Snapshot>).transpose()?,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct PersistRecord {
    snapshot: Option<Vec<u8>>,
    entries: Vec<Vec<u8>>,
    hard_state: Option<Vec<u8>>,
    compaction: Option<Vec<u8>>,
}

/// One committed entry, as applied to the map.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedEntry {
    pub index: u64,
    pub term: u64,
    /// The map command it carried (`None`: an empty or configuration entry, or one that did
    /// not decode, which every node skips alike).
    pub command: Option<MapCommand>,
    pub applied: Applied,
}

/// The outputs of one round, in the order the driver handles them.
#[derive(Debug, Default)]
pub struct ControllerReady {
    /// Send at once (a leader's appends go out while it persists).
    pub messages: Vec<ControllerMessage>,
    /// Write durably, then send `after_persist`.
    pub persist: Persist,
    pub after_persist: Vec<ControllerMessage>,
    /// Committed entries applied to the map this round, in log order.
    pub applied: Vec<AppliedEntry>,
    /// The leader changed to this (`None`: no leader known).
    pub leader_changed: Option<Option<ControllerId>>,
    /// A snapshot from the leader replaced the map (any shard may have changed).
    pub snapshot_installed: bool,
}

/// What a restarted node read back from its disk.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    pub hard_state: HardState,
}

impl Restored {
    /// Everything held, as one batch (what a disk rewrites when it compacts).
    pub fn as_persist(&self) -> Persist {
        Persist {
            snapshot: self.snapshot.clone(),
            entries: self.entries.clone(),
            hard_state: Some(self.hard_state.clone()),
            compaction: None,
        }
    }

    /// Applies a batch the way a disk must (an in-memory disk for tests, the simulator and
    /// ephemeral nodes): a received snapshot replaces the log, an entry replaces any entry at
    /// its index and everything after it, a hard state replaces the last one, a compaction
    /// snapshot replaces the entries it covers.
    pub fn write(&mut self, p: Persist) {
        if let Some(s) = p.snapshot {
            self.entries.clear();
            self.snapshot = Some(s);
        }
        // The entries are kept in index order, so both cuts are a search, not a scan.
        if let Some(first) = p.entries.first().map(|e| e.index) {
            let keep = self.entries.partition_point(|e| e.index < first);
            self.entries.truncate(keep);
            self.entries.extend(p.entries);
        }
        if let Some(hs) = p.hard_state {
            self.hard_state = hs;
        }
        if let Some(s) = p.compaction {
            let index = s.get_metadata().index;
            let covered = self.entries.partition_point(|e| e.index <= index);
            self.entries.drain(..covered);
            self.snapshot = Some(s);
        }
    }
}

/// raft-rs's in-memory log beside the map applied from it: a snapshot is the map at the
/// applied index, made when a peer needs one or the log is compacted.
struct ControllerStorage {
    log: MemStorage,
    /// Behind an `Arc` so members of one process can share it ([`SharedMaps`]); changed
    /// in place when no one else holds it.
    map: Arc<ShardMap>,
    /// The log index the map reflects (entries without a command count too).
    applied: u64,
    /// The map encoded at an applied index, kept until the map moves on: a compaction and
    /// the peers that need a snapshot at that index share one encoding (the map is the
    /// same, so are its bytes).
    encoded: RefCell<Option<(u64, Bytes)>>,
    shared: Option<Arc<SharedMaps>>,
    /// The map at the last applied index that is a multiple of `log_entries_max`, for the
    /// compaction at the end of the ready: every member compacts at the same indices, so
    /// members of one process share those snapshots' encodings ([`SharedMaps`]).
    compact_at: Option<(u64, Arc<ShardMap>)>,
}

impl ControllerStorage {
    fn new(log: MemStorage, map: ShardMap, applied: u64) -> ControllerStorage {
        let map = Arc::new(map);
        let encoded = RefCell::new(None);
        ControllerStorage { log, map, applied, encoded, shared: None, compact_at: None }
    }

    /// A snapshot of `map`, the map applied up to `applied`.
    fn snapshot_of(&self, applied: u64, map: &ShardMap) -> raft::Result<Snapshot> {
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = applied;
        meta.term = self.log.term(applied)?;
        meta.set_conf_state(self.log.initial_state()?.conf_state);
        let mut encoded = self.encoded.borrow_mut();
        snapshot.data = match &*encoded {
            Some((at, bytes)) if *at == applied => bytes.clone(),
            cached => {
                let hint = cached.as_ref().map_or(0, |(_, b)| b.len() + b.len() / 8);
                let bytes = match &self.shared {
                    Some(shared) => shared.encode(applied, meta.term, map, hint),
                    None => encode_map(map, hint),
                };
                *encoded = Some((applied, bytes.clone()));
                bytes
            }
        };
        Ok(snapshot)
    }
}

impl Storage for ControllerStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.log.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.log.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.log.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.log.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.log.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let applied = self.applied;
        if applied < request_index {
            return Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable));
        }
        self.snapshot_of(applied, &self.map)
    }
}

/// Maps shared by the controllers of one process ([`Controller::share_maps`]; the simulator
/// runs thousands).
/// - Snapshots: every member encodes the same map at a log index and term (Raft's log
///   matching), and the same bytes decode to the same map; so one encoding and one decoding
///   serve every member that needs them, and their maps and bytes share storage. An
///   encoding is reused only for an equal map (cheap: equal maps share their chunks), so a
///   member whose map diverged still sends its own.
/// - Applied entries: applying is a pure function of the map and the entry's bytes, so a
///   member whose map equals the one the first member applied an entry's same bytes to
///   takes that member's result (the map after it, shared) instead of applying them again.
///   Every member of a group applies every entry: this keeps one copy of the map, not one
///   per member, and applies each entry once. Only the last [`SHARED_APPLIES_MAX`] entries
///   are kept, and no more than [`SHARED_APPLIES_BYTES_MAX`] of map parts they alone hold;
///   a member further behind applies them itself.
#[derive(Default)]
pub struct SharedMaps {
    /// The last bytes decoded, and their map.
    decoded: Mutex<Option<(Bytes, ShardMap)>>,
    /// The last map encoded: its index and term, the map, its bytes.
    encoded: Mutex<Option<(u64, u64, ShardMap, Bytes)>>,
    /// Entries applied, by log index.
    applied: Mutex<Applies>,
}

/// Entries [`SharedMaps`] keeps applied...
pub const SHARED_APPLIES_MAX: usize = 1024;
/// ...and the bytes of the map parts each holds apart from the map before it, in all: one
/// entry of a few thousand changes touches every chunk of the table, and a thousand of
/// them held 1 GB more than a thousand small ones (1000 simulated nodes, 900 s).
pub const SHARED_APPLIES_BYTES_MAX: usize = 64 << 20;

#[derive(Default)]
struct Applies {
    by_index: BTreeMap<u64, SharedApply>,
    bytes: usize,
}

/// One entry as the first member applied it.
struct SharedApply {
    data: Bytes,
    before: Arc<ShardMap>,
    after: Arc<ShardMap>,
    command: MapCommand,
    applied: Applied,
    /// The entry's bytes and what `after` holds apart from `before`.
    bytes: usize,
}

impl SharedMaps {
    /// The map after the entry of `data` at `index`, its command and what applying it did,
    /// if it was applied to a map equal to `map`.
    fn applied(
        &self,
        index: u64,
        data: &Bytes,
        map: &Arc<ShardMap>,
    ) -> Option<(Arc<ShardMap>, MapCommand, Applied)> {
        let kept = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        let a = kept.by_index.get(&index)?;
        let same_bytes =
            a.data.as_ptr() == data.as_ptr() && a.data.len() == data.len() || a.data == *data;
        // Cheap when `map` was itself taken from here: the same allocation, or equal
        // chunks shared.
        let same = same_bytes && (Arc::ptr_eq(&a.before, map) || *a.before == **map);
        same.then(|| (a.after.clone(), a.command.clone(), a.applied.clone()))
    }

    fn record(&self, index: u64, a: SharedApply) {
        let mut kept = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.by_index.contains_key(&index) {
            return;
        }
        kept.bytes += a.bytes;
        kept.by_index.insert(index, a);
        while kept.by_index.len() > SHARED_APPLIES_MAX
            || kept.bytes > SHARED_APPLIES_BYTES_MAX && kept.by_index.len() > 1
        {
            let Some((_, oldest)) = kept.by_index.pop_first() else { break };
            kept.bytes -= oldest.bytes;
        }
    }

    fn decode(&self, data: &Bytes) -> Result<ShardMap, postcard::Error> {
        let mut last = self.decoded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((bytes, map)) = &*last {
            let same = bytes.len() == data.len()
                && (bytes.as_ptr() == data.as_ptr() || bytes[..] == data[..]);
            if same {
                return Ok(map.clone());
            }
        }
        let map = ShardMap::decode(data)?;
        *last = Some((data.clone(), map.clone()));
        Ok(map)
    }

    fn encode(&self, index: u64, term: u64, map: &ShardMap, hint: usize) -> Bytes {
        let mut last = self.encoded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((i, t, m, bytes)) = &*last {
            if (*i, *t) == (index, term) && m == map {
                return bytes.clone();
            }
        }
        let bytes = encode_map(map, hint);
        *last = Some((index, term, map.clone(), bytes.clone()));
        bytes
    }
}

/// `map` as snapshot bytes, into a buffer of `hint` bytes (not regrown a dozen times when
/// the hint is the last encoding's size).
fn encode_map(map: &ShardMap, hint: usize) -> Bytes {
    Bytes::from(postcard::to_extend(map, Vec::with_capacity(hint)).expect("a map encodes"))
}

/// A configuration entry's change, as raft-rs applies it (a one-change entry as a change
/// list of one); `None` for a normal entry or bytes that do not decode.
fn conf_change(entry: &Entry) -> Option<ConfChangeV2> {
    match entry.get_entry_type() {
        EntryType::EntryNormal => None,
        EntryType::EntryConfChange => {
            let mut cc = ConfChange::default();
            cc.merge_from_bytes(&entry.data).ok()?;
            // As raft-rs applies it (`ConfChangeI::into_v2`).
            let mut v2 = ConfChangeV2::default();
            v2.mut_changes().push(ConfChangeSingle {
                change_type: cc.change_type,
                node_id: cc.node_id,
                ..Default::default()
            });
            v2.context = cc.context;
            Some(v2)
        }
        EntryType::EntryConfChangeV2 => {
            let mut cc = ConfChangeV2::default();
            cc.merge_from_bytes(&entry.data).ok()?;
            Some(cc)
        }
    }
}

/// Shard changes this leader took and has not seen applied: gathered since its last tick
/// (appended then, as one entry), or appended, by the index of their entry. A copy of one
/// of them would be skipped when applied (the first raises the shard's epoch, or is skipped
/// itself), so it is not proposed. An appended record goes once the applied index reaches
/// its entry's, whether that entry was this one or another that replaced it under a later
/// leader (every new term appends an entry, so the index passes). Bounded: the gathered by
/// [`PROPOSAL_CHANGES_MAX`] (more go at once), the appended by the leader's uncommitted
/// bytes (`uncommitted_bytes_max`: raft-rs refuses proposals past them).
#[derive(Debug, Default)]
struct InFlight {
    by_index: BTreeMap<u64, Vec<ShardChange>>,
    gathered: Vec<ShardChange>,
    changes: BTreeSet<ShardChange>,
    /// Other commands appended and not yet applied (their bytes), by index: the planner
    /// proposes a member's `Join` every round until it is applied (5,000 simulated nodes
    /// joining: 19,571 copies left out). Up to `uncommitted_bytes_max` of them: a set to
    /// look them up by value, by index to free them when applied.
    commands: BTreeSet<Vec<u8>>,
    commands_by_index: BTreeMap<u64, Vec<u8>>,
}

impl InFlight {
    /// The change as the map applies it: a promotion's `turn_version` only informs, so
    /// promotions of one learner at one epoch are copies whatever version they name.
    fn key(c: &ShardChange) -> ShardChange {
        match *c {
            ShardChange::Promote { shard, epoch, member, .. } => {
                ShardChange::Promote { shard, epoch, member, turn_version: 0 }
            }
            other => other,
        }
    }

    fn contains(&self, c: &ShardChange) -> bool {
        self.changes.contains(&InFlight::key(c))
    }

    fn gather(&mut self, changes: Vec<ShardChange>) {
        self.changes.extend(changes.iter().map(InFlight::key));
        self.gathered.extend(changes);
    }

    /// The gathered changes, to append now.
    fn take_gathered(&mut self) -> Vec<ShardChange> {
        std::mem::take(&mut self.gathered)
    }

    /// `changes`, taken from the gathered, were not appended: no longer in flight.
    fn dropped(&mut self, changes: &[ShardChange]) {
        for c in changes {
            self.changes.remove(&InFlight::key(c));
        }
    }

    fn appended(&mut self, index: u64, changes: &[ShardChange]) {
        let keys = changes.iter().map(InFlight::key);
        self.changes.extend(keys.clone());
        self.by_index.entry(index).or_default().extend(keys);
    }

    fn command_appended(&mut self, index: u64, data: Vec<u8>) {
        self.commands.insert(data.clone());
        self.commands_by_index.insert(index, data);
    }

    /// Entries up to `index` are applied (the ones appended, or others that replaced them
    /// under a new leader): their changes are no longer in flight.
    fn applied(&mut self, index: u64) {
        if self.commands_by_index.first_key_value().is_some_and(|(&first, _)| first <= index) {
            let later = self.commands_by_index.split_off(&(index + 1));
            for data in std::mem::replace(&mut self.commands_by_index, later).into_values() {
                self.commands.remove(&data);
            }
        }
        if self.by_index.first_key_value().is_none_or(|(&first, _)| first > index) {
            return;
        }
        let later = self.by_index.split_off(&(index + 1));
        for c in std::mem::replace(&mut self.by_index, later).into_values().flatten() {
            self.changes.remove(&c);
        }
    }
}

/// One member of the placement controller group.
pub struct Controller {
    raw: RawNode<ControllerStorage>,
    cfg: ControllerConfig,
    leader: Option<ControllerId>,
    /// The hard state last handed out to persist.
    persisted_hs: HardState,
    /// The map of the last snapshot stepped (index, term, map), decoded when it was
    /// checked; dropped at the end of the next `ready`.
    received: Option<(u64, u64, ShardMap)>,
    /// Shard changes this member proposed as leader, not applied yet.
    in_flight: InFlight,
    /// Ticks since it started.
    ticks: u64,
    /// Outside the group: whom it fetches the log from ([`observe`]).
    observing: observe::Observing,
    /// As leader: the observers that fetch from it.
    watchers: observe::Watchers,
    /// What observing and serving observers produced for the next ready.
    pending: observe::Pending,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("id", &self.id())
            .field("leader", &self.leader)
            .field("map_version", &self.map().version)
            .finish()
    }
}

fn raft_config(id: ControllerId, cfg: &ControllerConfig, applied: u64, seed: u64) -> raft::Config {
    let election = cfg.election_ticks.max(cfg.heartbeat_ticks + 1).max(2);
    // Fixed per node: the simulator's runs must repeat exactly.
    let min = election + (seed % election as u64) as usize;
    raft::Config {
        id,
        election_tick: election,
        heartbeat_tick: cfg.heartbeat_ticks.max(1),
        min_election_tick: min,
        max_election_tick: min + 1,
        applied,
        max_size_per_msg: cfg.message_bytes_max,
        max_inflight_msgs: cfg.inflight_messages_max.max(1),
        max_uncommitted_size: cfg.uncommitted_bytes_max,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    }
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Controller {
    /// What a founding member writes to its disk before its first start: a snapshot at
    /// index 1 holding the first voters and an empty map (every founder writes the same).
    /// Members added later start empty and receive a snapshot from the leader, which tells
    /// them the configuration; replaying the log from nothing would not.
    pub fn founding_state(voters: &[ControllerId], shard_count: u32) -> Restored {
        Controller::founding_state_with(voters, &ShardMap::new(shard_count))
    }

    /// As [`Controller::founding_state`], the group founded on `map` (the simulator's
    /// already formed cluster).
    pub fn founding_state_with(voters: &[ControllerId], map: &ShardMap) -> Restored {
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.set_conf_state(ConfState::from((voters.to_vec(), vec![])));
        snapshot.data = postcard::to_stdvec(map).expect("a map encodes").into();
        let hard_state = HardState { term: 1, commit: 1, ..Default::default() };
        Restored { snapshot: Some(snapshot), entries: Vec::new(), hard_state }
    }

    /// A member started from what it persisted ([`Controller::founding_state`] the first
    /// time, [`Restored::default`] for a member added to a running group).
    pub fn restore(
        id: ControllerId,
        restored: Restored,
        shard_count: u32,
        cfg: ControllerConfig,
        seed: u64,
    ) -> Result<Controller, ControllerError> {
        let log = MemStorage::new();
        let mut map = ShardMap::new(shard_count);
        let mut applied = 0;
        if let Some(s) = restored.snapshot {
            map = postcard::from_bytes(&s.data).map_err(ControllerError::Snapshot)?;
            applied = s.get_metadata().index;
            log.wl().apply_snapshot(s)?;
        }
        log.wl().append(&restored.entries)?;
        log.wl().set_hardstate(restored.hard_state);
        Self::start(id, ControllerStorage::new(log, map, applied), cfg, seed)
    }

    fn start(
        id: ControllerId,
        storage: ControllerStorage,
        cfg: ControllerConfig,
        seed: u64,
    ) -> Result<Controller, ControllerError> {
        let applied = storage.applied;
        let persisted_hs = storage.log.rl().hard_state().clone();
        let raw = RawNode::new(&raft_config(id, &cfg, applied, seed), storage, &logger())?;
        Ok(Controller {
            raw,
            cfg,
            leader: None,
            persisted_hs,
            received: None,
            in_flight: InFlight::default(),
            ticks: 0,
            observing: observe::Observing::new(seed),
            watchers: observe::Watchers::default(),
            pending: observe::Pending::default(),
        })
    }

    /// raft-rs gives the progress of every group member it adds (by a configuration change
    /// or a snapshot's) an inflight buffer of `max_inflight_msgs`
    /// (`controller.inflight_messages_max`) slots, on every member, but only a leader sends
    /// appends (when every node was a learner, 512 B for each pair of nodes). A member that does
    /// not lead frees them (`ids`, or all); a leader's first append to a peer allocates its
    /// buffer again (raft-rs frees them all at every change of role).
    fn free_inflight_buffers(&mut self, ids: Option<&[u64]>) {
        if self.is_leader() {
            return;
        }
        match ids {
            None => self.raw.raft.maybe_free_inflight_buffers(),
            Some(ids) => {
                for &id in ids {
                    if let Some(pr) = self.raw.raft.mut_prs().get_mut(id) {
                        pr.ins.maybe_free_buffer();
                    }
                }
            }
        }
    }

    pub fn id(&self) -> ControllerId {
        self.raw.raft.id
    }

    /// The applied map.
    pub fn map(&self) -> &ShardMap {
        &self.raw.store().map
    }

    pub fn leader(&self) -> Option<ControllerId> {
        self.leader
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The index of the last entry applied to the map (by Raft, or fetched as an
    /// observer).
    pub fn applied_index(&self) -> u64 {
        self.raw.store().applied
    }

    /// The current voters, ascending (an observer's: as the log it fetched names them).
    pub fn voters(&self) -> Vec<ControllerId> {
        if self.is_observer() {
            return self.observed_voters();
        }
        let mut v: Vec<_> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        v.sort_unstable();
        v
    }

    /// One logical clock tick. A leader first appends the shard changes it gathered since
    /// the last one, as one entry; an error says they were dropped (raft-rs refused them, or
    /// this member no longer leads): their proposers propose them again.
    pub fn tick(&mut self) -> Result<(), ControllerError> {
        let appended = self.append_gathered();
        self.raw.tick();
        self.ticks += 1;
        if self.is_observer() {
            self.observe_tick();
        } else if self.is_leader() {
            self.watchers_tick();
        } else {
            self.watchers.clear();
        }
        appended
    }

    /// Appends the gathered shard changes (entries of at most [`PROPOSAL_CHANGES_MAX`]).
    fn append_gathered(&mut self) -> Result<(), ControllerError> {
        let gathered = self.in_flight.take_gathered();
        if gathered.is_empty() {
            return Ok(());
        }
        if !self.is_leader() {
            self.in_flight.dropped(&gathered);
            return Err(ControllerError::NotLeader { leader: self.leader });
        }
        for (k, part) in gathered.chunks(PROPOSAL_CHANGES_MAX).enumerate() {
            let cmd = MapCommand::Changes(part.to_vec());
            let data = postcard::to_stdvec(&cmd).expect("a command encodes");
            if let Err(e) = self.raw.propose(Vec::new(), data) {
                self.in_flight.dropped(&gathered[k * PROPOSAL_CHANGES_MAX..]);
                return Err(e.into());
            }
            self.in_flight.appended(self.raw.raft.raft_log.last_index(), part);
        }
        Ok(())
    }

    /// Snapshots this member takes and is sent are encoded and decoded, and entries
    /// applied, through `shared`, with the other members of this process that use it.
    pub fn share_maps(&mut self, shared: Arc<SharedMaps>) {
        self.raw.mut_store().shared = Some(shared);
    }

    /// A message from a peer.
    pub fn step(&mut self, msg: ControllerMessage) -> Result<(), ControllerError> {
        match msg {
            ControllerMessage::Raft(m) => self.step_raft(m),
            ControllerMessage::Fetch { from, applied, .. } => {
                self.serve_fetch(from, applied);
                Ok(())
            }
            ControllerMessage::Fetched { from, leader, term, snapshot, entries, .. } => {
                self.fetched(from, leader, term, snapshot, entries)
            }
        }
    }

    fn step_raft(&mut self, msg: Message) -> Result<(), ControllerError> {
        let snapshot = msg.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
        // A snapshot whose map does not decode (corruption, a peer of another version) is
        // refused before raft-rs accepts it: applying on from a wrong map would diverge.
        if snapshot {
            let snapshot = msg.get_snapshot();
            let map = match &self.raw.store().shared {
                Some(shared) => shared.decode(&snapshot.data),
                None => ShardMap::decode(&snapshot.data),
            }
            .map_err(ControllerError::Snapshot)?;
            // Kept for `install`, which then need not decode it again.
            let meta = snapshot.get_metadata();
            self.received = Some((meta.index, meta.term, map));
        }
        self.raw.step(msg)?;
        if snapshot {
            // A snapshot's configuration gave every member a new progress.
            self.free_inflight_buffers(None);
        }
        Ok(())
    }

    /// Proposes a map command (only the leader accepts proposals). Shard changes that
    /// would be skipped when applied are left out first: those whose epoch is behind the
    /// applied map (epochs only rise), and copies of changes already in the log (an owner
    /// re-sends until it sees its change applied); if none is left, nothing is proposed
    /// ([`ControllerError::Stale`]). The map becomes what it would have become. The changes
    /// left are gathered and appended at the next tick, as one entry with the others
    /// gathered by then (at most [`PROPOSAL_CHANGES_MAX`] go at once): while a thousand
    /// nodes join, each owner proposes its own promotions, and as entries of their own they
    /// were 17,155 of 18,587. Any other command is appended at once, after them, unless a
    /// copy of it is in the log and not applied yet (`Stale`).
    pub fn propose(&mut self, cmd: &MapCommand) -> Result<(), ControllerError> {
        if !self.is_leader() {
            return Err(ControllerError::NotLeader { leader: self.leader });
        }
        let MapCommand::Changes(changes) = cmd else {
            // Another command goes after the changes gathered before it, unless the same
            // command is in the log and not applied yet.
            let data = postcard::to_stdvec(cmd).expect("a command encodes");
            if self.in_flight.commands.contains(&data) {
                return Err(ControllerError::Stale);
            }
            self.append_gathered()?;
            self.raw.propose(Vec::new(), data.clone())?;
            self.in_flight.command_appended(self.raw.raft.raft_log.last_index(), data);
            return Ok(());
        };
        let map = &self.raw.store().map;
        let mut seen = BTreeSet::new();
        let keep: Vec<ShardChange> = changes
            .iter()
            .filter(|c| {
                let behind = map.shard(c.shard()).is_some_and(|e| c.epoch() < e.epoch);
                !behind && !self.in_flight.contains(c) && seen.insert(InFlight::key(c))
            })
            .copied()
            .collect();
        if keep.is_empty() {
            return Err(ControllerError::Stale);
        }
        // Gathered until the next tick: many owners' promotions go as one entry.
        self.in_flight.gather(keep);
        if self.in_flight.gathered.len() >= PROPOSAL_CHANGES_MAX {
            return self.append_gathered();
        }
        Ok(())
    }

    /// Proposes a change of the group: voters added or removed by joint consensus (the
    /// group leaves the joint configuration by itself once it is committed); learners
    /// (members that receive and apply the log without voting: every node that is not a
    /// voter) added or removed alike.
    pub fn change_members(
        &mut self,
        changes: &[(ControllerId, GroupChange)],
    ) -> Result<(), ControllerError> {
        if !self.is_leader() {
            return Err(ControllerError::NotLeader { leader: self.leader });
        }
        let mut cc = ConfChangeV2::default();
        cc.set_changes(
            changes
                .iter()
                .map(|&(id, change)| {
                    let mut c = ConfChangeSingle { node_id: id, ..Default::default() };
                    c.set_change_type(match change {
                        GroupChange::AddVoter => ConfChangeType::AddNode,
                        GroupChange::AddLearner => ConfChangeType::AddLearnerNode,
                        GroupChange::Remove => ConfChangeType::RemoveNode,
                    });
                    c
                })
                .collect(),
        );
        Ok(self.raw.propose_conf_change(Vec::new(), cc)?)
    }

    /// Hands leadership to voter `to` (a leaving leader): raft-rs brings its log up to date,
    /// then tells it to campaign at once; proposals wait meanwhile (at most an election
    /// timeout). Does nothing unless this member leads and no transfer is under way; true
    /// if it started one.
    pub fn transfer_leader(&mut self, to: ControllerId) -> bool {
        let start = self.is_leader() && self.raw.raft.lead_transferee.is_none() && to != self.id();
        if start {
            self.raw.transfer_leader(to);
        }
        start
    }

    /// Whether member `id`'s log holds everything committed (the leader's view; a
    /// learner so caught up can become a voter without stalling commits).
    pub fn caught_up(&self, id: ControllerId) -> bool {
        let committed = self.raw.raft.raft_log.committed;
        match self.raw.raft.prs().get(id) {
            Some(p) => p.matched >= committed,
            None => self.watchers.applied(id).is_some_and(|a| a >= committed),
        }
    }

    /// Whether member `id`'s map keeps up with the group's (the leader's view): its log
    /// holds every committed entry, or the leader sends it the log entry by entry (its
    /// progress is replicating: not probed for where its log ends, not being sent a
    /// snapshot), so it applies entries about when the others do.
    pub fn keeps_up(&self, id: ControllerId) -> bool {
        match self.raw.raft.prs().get(id) {
            None => self.caught_up(id) || self.observer_keeps_up(id),
            Some(p) => p.state == raft::ProgressState::Replicate || self.caught_up(id),
        }
    }

    /// The current learners, ascending.
    pub fn learners(&self) -> Vec<ControllerId> {
        let mut v = self.raw.raft.prs().conf().to_conf_state().learners;
        v.sort_unstable();
        v
    }

    /// Drains what this member must do now; `None` when there is nothing.
    pub fn ready(&mut self) -> Option<ControllerReady> {
        let applied = self.applied_index();
        let raft = self.raft_ready();
        if self.applied_index() > applied {
            // Observers waiting for entries get the ones just applied.
            self.answer_parked();
        }
        let pending = std::mem::take(&mut self.pending);
        if raft.is_none() && pending.is_empty() {
            return None;
        }
        let mut out = raft.unwrap_or_default();
        out.messages.splice(0..0, pending.messages);
        out.applied.splice(0..0, pending.applied);
        out.snapshot_installed |= pending.snapshot_installed;
        if out.leader_changed.is_none() {
            out.leader_changed = pending.leader_changed;
        }
        Some(out)
    }

    /// Raft's part of a ready.
    fn raft_ready(&mut self) -> Option<ControllerReady> {
        if !self.raw.has_ready() {
            self.received = None;
            return None;
        }
        let mut out = ControllerReady::default();
        let mut rd = self.raw.ready();
        out.messages = rd.take_messages().into_iter().map(ControllerMessage::Raft).collect();
        if !rd.snapshot().is_empty() {
            let snapshot = rd.snapshot().clone();
            out.snapshot_installed = self.install(snapshot.clone());
            out.persist.snapshot = Some(snapshot);
        }
        let committed = rd.take_committed_entries();
        self.apply_entries(committed, &mut out.applied);
        let entries = rd.take_entries();
        if !entries.is_empty() {
            self.raw.mut_store().log.wl().append(&entries).expect("entries follow the log");
            out.persist.entries = entries;
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().log.wl().set_hardstate(hs.clone());
        }
        let raft = ControllerMessage::Raft;
        out.after_persist = rd.take_persisted_messages().into_iter().map(raft).collect();
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().log.wl().mut_hard_state().set_commit(commit);
        }
        out.after_persist.extend(light.take_messages().into_iter().map(raft));
        let committed = light.take_committed_entries();
        self.apply_entries(committed, &mut out.applied);
        self.raw.advance_apply();
        let hs = self.raw.store().log.rl().hard_state().clone();
        if hs != self.persisted_hs {
            self.persisted_hs = hs.clone();
            out.persist.hard_state = Some(hs);
        }
        out.persist.compaction = self.maybe_compact();
        self.in_flight.applied(self.applied_index());
        self.received = None;
        // A member's leader is Raft's (an observer's is the one it fetches from; a node
        // just taken into the group may have known it first).
        if !self.is_observer() {
            let id = self.raw.raft.leader_id;
            let leader = (id != raft::INVALID_ID).then_some(id);
            if leader != self.leader {
                self.leader = leader;
                out.leader_changed = Some(leader);
            }
        }
        Some(out)
    }

    /// A snapshot from the leader replaces the map, unless the map is at its index or
    /// beyond (fetched as an observer before Raft's log reached it): Raft's log starts at
    /// the snapshot either way. Whether the map was replaced.
    fn install(&mut self, snapshot: Snapshot) -> bool {
        let meta = snapshot.get_metadata();
        if meta.index <= self.applied_index() {
            self.received = None;
            let store = self.raw.mut_store();
            store.log.wl().apply_snapshot(snapshot).expect("a newer snapshot");
            return false;
        }
        let map = match self.received.take() {
            // A snapshot at an index and term is the map applied to that index: the same
            // map whichever message carried it.
            Some((index, term, map)) if (index, term) == (meta.index, meta.term) => map,
            _ => match ShardMap::decode(&snapshot.data) {
                Ok(map) => map,
                // `step` let only decodable snapshots through.
                Err(e) => unreachable!("a snapshot that was checked does not decode: {e}"),
            },
        };
        let store = self.raw.mut_store();
        store.applied = meta.index;
        store.map = Arc::new(map);
        *store.encoded.borrow_mut() = Some((meta.index, snapshot.data.clone()));
        store.log.wl().apply_snapshot(snapshot).expect("a newer snapshot");
        true
    }

    fn apply_entries(&mut self, entries: Vec<Entry>, out: &mut Vec<AppliedEntry>) {
        for entry in entries {
            // Already in the map (fetched as an observer): only Raft's own entries are
            // left to apply, to Raft.
            let fetched = entry.index <= self.applied_index();
            if let Some(cc) = conf_change(&entry) {
                let changed = self.raw.apply_conf_change(&cc);
                let ids: Vec<u64> = cc.changes.iter().map(|c| c.node_id).collect();
                self.conf_changed(changed, &ids);
            }
            if fetched {
                continue;
            }
            out.push(self.apply_to_map(&entry));
            if entry.index % self.cfg.log_entries_max.max(1) == 0 {
                let store = self.raw.mut_store();
                store.compact_at = Some((entry.index, store.map.clone()));
            }
        }
    }

    /// The next entry applied to the map (a configuration entry changes only the index).
    fn apply_to_map(&mut self, entry: &Entry) -> AppliedEntry {
        let store = self.raw.mut_store();
        store.applied = entry.index;
        let mut applied = AppliedEntry {
            index: entry.index,
            term: entry.term,
            command: None,
            applied: Applied::default(),
        };
        if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
            return applied;
        }
        let shared = store.shared.as_ref();
        match shared.and_then(|s| s.applied(entry.index, &entry.data, &store.map)) {
            Some((after, command, result)) => {
                store.map = after;
                applied.applied = result;
                applied.command = Some(command);
            }
            None => match postcard::from_bytes::<MapCommand>(&entry.data) {
                Ok(cmd) => {
                    let before = shared.map(|_| store.map.clone());
                    applied.applied = Arc::make_mut(&mut store.map).apply(&cmd);
                    if let (Some(shared), Some(before)) = (&store.shared, before) {
                        let a = SharedApply {
                            bytes: entry.data.len() + store.map.bytes_apart(&before),
                            data: entry.data.clone(),
                            before,
                            after: store.map.clone(),
                            command: cmd.clone(),
                            applied: applied.applied.clone(),
                        };
                        shared.record(entry.index, a);
                    }
                    applied.command = Some(cmd);
                }
                Err(e) => applied.applied.skipped.push(format!("undecodable entry: {e}")),
            },
        }
        applied
    }

    fn conf_changed(&mut self, changed: raft::Result<ConfState>, ids: &[u64]) {
        // A change raft-rs refuses (e.g. leaving a joint state not entered) changes nothing,
        // on every member alike.
        if let Ok(cs) = changed {
            self.raw.mut_store().log.wl().set_conf_state(cs);
            self.free_inflight_buffers(Some(ids));
        }
    }

    /// Compacts the log behind a snapshot of the map at the last applied multiple of
    /// `log_entries_max`, if the log holds at least that many entries up to it (so it holds
    /// fewer than twice as many, plus a ready's); the snapshot to persist.
    fn maybe_compact(&mut self) -> Option<Snapshot> {
        let store = self.raw.mut_store();
        let (at, map) = store.compact_at.take()?;
        let first = store.log.first_index().ok()?;
        if at < first || at + 1 - first < self.cfg.log_entries_max {
            return None;
        }
        let snapshot = store.snapshot_of(at, &map).ok()?;
        store.log.wl().compact(at).expect("compacting behind the applied index");
        Some(snapshot)
    }
}

/// What controllers send each other: Raft's messages within the group, and an observer's
/// fetch of the committed log and its answer ([`observe`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ControllerMessage {
    Raft(Message),
    /// Observer `from` asks `to` for the committed log after index `applied`.
    Fetch {
        from: ControllerId,
        to: ControllerId,
        applied: u64,
    },
    /// `from`'s answer: who it takes to lead, in its term, and (from the leader) what it
    /// applied after the fetch's index: a snapshot when its log no longer holds the next
    /// entry, else entries in order.
    Fetched {
        from: ControllerId,
        to: ControllerId,
        leader: Option<ControllerId>,
        term: u64,
        snapshot: Option<Snapshot>,
        entries: Vec<Entry>,
    },
}

impl ControllerMessage {
    pub fn from(&self) -> ControllerId {
        match self {
            ControllerMessage::Raft(m) => m.from,
            ControllerMessage::Fetch { from, .. } | ControllerMessage::Fetched { from, .. } => {
                *from
            }
        }
    }

    pub fn to(&self) -> ControllerId {
        match self {
            ControllerMessage::Raft(m) => m.to,
            ControllerMessage::Fetch { to, .. } | ControllerMessage::Fetched { to, .. } => *to,
        }
    }
}

/// A controller message on the wire: postcard around raft-rs's own protobuf encodings.
#[derive(Serialize, Deserialize)]
enum WireMessage {
    Raft(Vec<u8>),
    Fetch {
        from: u64,
        to: u64,
        applied: u64,
    },
    Fetched {
        from: u64,
        to: u64,
        leader: Option<u64>,
        term: u64,
        snapshot: Option<Vec<u8>>,
        entries: Vec<Vec<u8>>,
    },
}

fn protobuf_bytes(m: &dyn protobuf::Message) -> Vec<u8> {
    m.write_to_bytes().expect("a raft type encodes")
}

fn from_protobuf<M: protobuf::Message + Default>(b: &[u8]) -> Result<M, String> {
    let mut m = M::default();
    m.merge_from_bytes(b).map_err(|e| e.to_string())?;
    Ok(m)
}

/// A controller message as bytes.
pub fn encode_message(m: &ControllerMessage) -> Vec<u8> {
    let wire = match m {
        ControllerMessage::Raft(m) => WireMessage::Raft(protobuf_bytes(m)),
        &ControllerMessage::Fetch { from, to, applied } => WireMessage::Fetch { from, to, applied },
        ControllerMessage::Fetched { from, to, leader, term, snapshot, entries } => {
            WireMessage::Fetched {
                from: *from,
                to: *to,
                leader: *leader,
                term: *term,
                snapshot: snapshot.as_ref().map(|s| protobuf_bytes(s)),
                entries: entries.iter().map(|e| protobuf_bytes(e)).collect(),
            }
        }
    };
    postcard::to_stdvec(&wire).expect("a controller message encodes")
}

/// Bytes from a peer as a controller message; an error for bytes that are not one.
pub fn decode_message(bytes: &[u8]) -> Result<ControllerMessage, String> {
    Ok(match postcard::from_bytes(bytes).map_err(|e| e.to_string())? {
        WireMessage::Raft(b) => ControllerMessage::Raft(from_protobuf(&b)?),
        WireMessage::Fetch { from, to, applied } => ControllerMessage::Fetch { from, to, applied },
        WireMessage::Fetched { from, to, leader, term, snapshot, entries } => {
            ControllerMessage::Fetched {
                from,
                to,
                leader,
                term,
                snapshot: snapshot.as_deref().map(from_protobuf).transpose()?,
                entries: entries.iter().map(|e| from_protobuf(e)).collect::<Result<_, _>>()?,
            }
        }
    })
}

pub mod autopilot;
pub mod leader;
pub mod observe;

#[cfg(test)]
mod tests;
