//! Replication by the controller's shard map: the effects of the pure ownership machine
//! ([`botclaw_core::ownership`]) executed against the local store and the links.
//!
//! One task owns the machine. Conversation actors ask it to [`ShardReplicator::acquire`]
//! a conversation (granted while the applied map names this node the shard's owner; the
//! state is the local copy, which holds every acknowledged turn because this node is in the
//! shard's in-sync set, and may hold a previous owner's write that nobody acknowledged:
//! nothing is answered from it before its `Replication::confirm` made every in-sync member
//! hold it too), to [`ShardReplicator::submit`] a turn (acknowledged once this
//! node's store and every in-sync member hold it) and to [`ShardReplicator::read`] (answered
//! once every earlier write is acknowledged, and only within the controller lease). Peers'
//! messages arrive as [`PeerBatch`]es; a learner receives the shard's rows as a stream of
//! chunks, installs them, then reports. The machine's outputs are executed in order:
//! persist (the store's queue keeps their order), send (one batch per peer per round),
//! release or fail a waiting caller, stream a shard, propose to the controller.
//!
//! Writes a learner receives before the stream that precedes them (they do not follow its
//! stored copy yet) are parked and applied again once the stream is installed; a write
//! that still does not apply is not acknowledged, and the owner drops the member after its
//! patience (the planner brings it back to catch up afresh).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use botclaw_core::conversation::{ConversationState, TurnCommit};
use botclaw_core::ownership::{Effect, Failure, Msg, Ownership, OwnershipConfig, Seq};
use botclaw_core::placement::{shard_of, ShardId};
use botclaw_core::replication::{Epoch, Version};
use botclaw_core::shardmap::{MapCommand, MemberIx, ShardMap};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::envelope::FailKind;
use crate::metrics::ConversationMetrics;
use crate::replicator::{Notify, Owned, Refusal};
use crate::store::{row_bytes, BoxFuture, StateStore, StoreAnswer, StoreOp, Stored};

/// What the machine replicates: one store op of one conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub conv: String,
    pub op: StoreOp,
}

/// One message between drivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    Own(Msg<Payload>),
    /// Part of a shard's rows for a learner; the `last` part ends catch-up `attempt`.
    Stream {
        shard: ShardId,
        attempt: Seq,
        convs: Vec<(String, Stored)>,
        last: bool,
    },
}

/// What crosses a link: messages from `from`, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerBatch {
    pub from: String,
    pub msgs: Vec<PeerMsg>,
}

impl PeerBatch {
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("peer batches encode")
    }
}

/// Encodes messages from one sender into [`PeerBatch`]es of at most `max` bytes (a
/// message larger than that alone in its batch), each message encoded once: the bytes are
/// those of `PeerBatch::to_bytes` (postcard: the sender's name, then the count and the
/// messages), without first measuring each message with a separate pass.
struct BatchWriter {
    /// The encoded sender name, the start of every batch.
    head: Vec<u8>,
    body: Vec<u8>,
    count: usize,
    max: usize,
}

impl BatchWriter {
    fn new(from: &str, max: usize) -> BatchWriter {
        let head = postcard::to_allocvec(from).expect("names encode");
        BatchWriter { head, body: Vec::new(), count: 0, max }
    }

    /// Adds `msg`; returns the batch it closed, if adding it went over the bound.
    fn push(&mut self, msg: &PeerMsg) -> Option<Vec<u8>> {
        let start = self.body.len();
        self.body =
            postcard::to_extend(msg, std::mem::take(&mut self.body)).expect("peer messages encode");
        let mut closed = None;
        if self.count > 0 && self.head.len() + self.body.len() > self.max {
            let rest = self.body.split_off(start);
            closed = self.finish();
            self.body = rest;
        }
        self.count += 1;
        closed
    }

    /// The batch of the messages pushed since the last one, if any.
    fn finish(&mut self) -> Option<Vec<u8>> {
        if self.count == 0 {
            return None;
        }
        let mut out = Vec::with_capacity(self.head.len() + 10 + self.body.len());
        out.extend_from_slice(&self.head);
        let mut out = postcard::to_extend(&self.count, out).expect("counts encode");
        out.extend_from_slice(&self.body);
        self.body.clear();
        self.count = 0;
        Some(out)
    }
}

/// What the driver needs from the node.
pub trait ShardLinks: Send + Sync + 'static {
    /// Sends one encoded [`PeerBatch`] to `peer` (a batch that cannot be delivered is lost;
    /// the protocol recovers).
    fn send(&self, peer: &str, bytes: Vec<u8>);
    /// A command for the controller's leader.
    fn propose(&self, command: MapCommand);
    /// Whether this node heard from the controller's leader (or leads it) lately: asked
    /// every tick, it renews the read lease. Judged by the clock, not by calls: ticks that
    /// queued up behind a busy round arrive in a burst, and a flag taken by the first would
    /// let the lease run out within the burst.
    fn controller_heard(&self) -> bool;
}

impl crate::replicator::Replication for ShardReplicator {
    fn acquire<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<Owned, Refusal>> {
        Box::pin(ShardReplicator::acquire(self, conv))
    }

    fn submit<'a>(
        &'a self,
        conv: &'a str,
        epoch: Epoch,
        base: Version,
        commit: TurnCommit,
        notify: Notify,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(ShardReplicator::submit_then(self, conv, epoch, base, commit, notify))
    }

    fn read<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<(), Refusal>> {
        ShardReplicator::read(self, conv)
    }

    fn confirm<'a>(
        &'a self,
        conv: &'a str,
        epoch: Epoch,
        version: Version,
        state: ConversationState,
        notify: Notify,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        // The copy as a write: a member that lacks part of it (a previous owner's write that
        // reached this node and not that member) installs it, one that holds it promises
        // this owner's epoch; `notify` is told once every in-sync member holds it.
        let op = StoreOp::Install { epoch, state, version };
        Box::pin(self.submit_op(conv, op, notify))
    }
}

/// Limits of the driver.
#[derive(Debug, Clone)]
pub struct ShardLimits {
    pub shard_count: u32,
    /// Requests and peers' batches waiting for the driver.
    pub inbox_max: usize,
    /// Bytes of one batch or stream chunk (well under the link's frame limit).
    pub batch_bytes_max: usize,
    /// Writes a learner keeps aside until its stream is installed.
    pub parked_max: usize,
    pub tick: Duration,
    pub machine: OwnershipConfig,
}

enum Input {
    Map(Arc<ShardMap>),
    Acquire {
        shard: ShardId,
        done: oneshot::Sender<Result<u64, Failure>>,
    },
    Submit {
        shard: ShardId,
        payload: Payload,
        accepted: oneshot::Sender<Result<(), Failure>>,
        done: Notify,
    },
    Read {
        shard: ShardId,
        done: oneshot::Sender<Result<(), Failure>>,
    },
    Persisted {
        shard: ShardId,
        epoch: u64,
        seq: Seq,
        ok: bool,
    },
    ReplicaPersisted {
        shard: ShardId,
        epoch: u64,
        seq: Seq,
        from: MemberIx,
        payload: Payload,
        answer: Option<StoreAnswer>,
    },
    Peer(Vec<u8>),
    Installed {
        shard: ShardId,
        attempt: Seq,
        owner: MemberIx,
        ok: bool,
    },
    Tick,
}

/// A handle on the driver.
#[derive(Clone)]
pub struct ShardReplicator {
    inbox: mpsc::Sender<Input>,
    store: Arc<dyn StateStore>,
    shard_count: u32,
    node_hash: u64,
}

impl std::fmt::Debug for ShardReplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReplicator").finish()
    }
}

fn refusal(why: Failure) -> Refusal {
    match why {
        Failure::NotOwner => Refusal::moved("this node does not own the conversation's shard"),
        Failure::Unavailable => Refusal::unavailable(
            "every in-sync copy of this conversation's shard is gone; it is served again when one returns",
        ),
        Failure::Busy => Refusal {
            kind: FailKind::Busy,
            message: "too many turns waiting on this shard".into(),
            moved: false,
        },
        Failure::Fenced => Refusal::unavailable(
            "this node has not heard from the placement controller within its lease",
        ),
        // Nothing was committed: a retry (same id) is safe, and is served elsewhere once this
        // node leaves (see `store.unwritable_exit_ms`).
        Failure::Store => Refusal::unavailable("the local store refused the write"),
    }
}

fn gone() -> Refusal {
    Refusal::unavailable("the shard replicator stopped")
}

impl ShardReplicator {
    /// Starts the driver of node `me` (incarnation `incarnation`).
    pub fn start(
        me: &str,
        incarnation: u64,
        store: Arc<dyn StateStore>,
        links: Arc<dyn ShardLinks>,
        limits: ShardLimits,
        metrics: ConversationMetrics,
    ) -> ShardReplicator {
        let (inbox, rx) = mpsc::channel(limits.inbox_max.max(1));
        let handle = ShardReplicator {
            inbox: inbox.clone(),
            store: store.clone(),
            shard_count: limits.shard_count,
            node_hash: xxhash_rust::xxh3::xxh3_64(me.as_bytes()),
        };
        let driver = Driver {
            me: me.to_string(),
            incarnation,
            store,
            links,
            limits,
            machine: None,
            map: Arc::new(ShardMap::new(0)),
            waiting: HashMap::new(),
            outbound: BTreeMap::new(),
            parked: BTreeMap::new(),
            parked_len: 0,
            streams: Arc::new(tokio::sync::Semaphore::new(STREAMS_MAX)),
            streams_due: BTreeMap::new(),
            pending: FuturesUnordered::new(),
            metrics,
        };
        let every = driver.limits.tick;
        tokio::spawn(driver.run(rx));
        let tick = handle.inbox.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            loop {
                interval.tick().await;
                if tick.send(Input::Tick).await.is_err() {
                    return;
                }
            }
        });
        handle
    }

    /// The map this node applied (call after every change, in order). Requests asked
    /// after this returns are decided by it.
    pub async fn map_applied(&self, map: Arc<ShardMap>) {
        let _ = self.inbox.send(Input::Map(map)).await;
    }

    /// A batch from a peer's driver.
    pub fn peer(&self, bytes: Vec<u8>) -> Result<(), Vec<u8>> {
        self.inbox.try_send(Input::Peer(bytes)).map_err(|e| match e.into_inner() {
            Input::Peer(b) => b,
            _ => unreachable!("sent a peer batch"),
        })
    }

    fn shard(&self, conv: &str) -> ShardId {
        shard_of(conv, self.shard_count)
    }

    /// Takes a conversation this node owns by the map: its local copy, and the epoch its
    /// writes carry.
    pub async fn acquire(&self, conv: &str) -> Result<Owned, Refusal> {
        let (done, rx) = oneshot::channel();
        let shard = self.shard(conv);
        self.inbox.send(Input::Acquire { shard, done }).await.map_err(|_| gone())?;
        let entry_epoch = rx.await.map_err(|_| gone())?.map_err(refusal)?;
        let stored = self
            .store
            .load(conv)
            .await
            .map_err(|e| Refusal::store_load(e, &*self.store))?
            .unwrap_or_default();
        let mut state = stored.state;
        state.reindex();
        let epoch = Epoch { term: entry_epoch, node: self.node_hash };
        // Never below what the store promised (an older owner of a higher term cannot
        // exist: shard epochs only grow, but a copy installed from elsewhere may carry one).
        let epoch = epoch.max(stored.replica.promised);
        // Nothing of the copy counts as held yet: see `Replication::confirm`.
        Ok(Owned { state, version: stored.replica.version, epoch, durable_turn: 0 })
    }

    /// Submits one turn; `Ok` once the owner accepted it, and `done` is told once every
    /// in-sync member holds it (or why not), by the driver itself: no task per turn.
    pub async fn submit_then(
        &self,
        conv: &str,
        epoch: Epoch,
        base: Version,
        commit: TurnCommit,
        done: Notify,
    ) -> Result<(), Refusal> {
        self.submit_op(conv, StoreOp::Write { epoch, base, commit }, done).await
    }

    /// Submits one store op of `conv` as a write of its shard (a turn, or a copy).
    async fn submit_op(&self, conv: &str, op: StoreOp, done: Notify) -> Result<(), Refusal> {
        let (accepted, accepted_rx) = oneshot::channel();
        let payload = Payload { conv: conv.to_string(), op };
        let shard = self.shard(conv);
        self.inbox
            .send(Input::Submit { shard, payload, accepted, done })
            .await
            .map_err(|_| gone())?;
        accepted_rx.await.map_err(|_| gone())?.map_err(refusal)
    }

    /// Resolves once every write submitted before on this conversation's shard is
    /// acknowledged (so a read sees them), while this node owns it within its lease.
    pub fn read<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            let (done, rx) = oneshot::channel();
            let shard = self.shard(conv);
            self.inbox.send(Input::Read { shard, done }).await.map_err(|_| gone())?;
            rx.await.map_err(|_| gone())?.map_err(refusal)
        })
    }
}

/// Shards streamed to learners at once by one node.
const STREAMS_MAX: usize = 8;
/// Shards one stream task reads and sends, one after the other.
const STREAM_SHARDS_MAX: usize = 256;
/// What a stream message costs beyond its rows (for the batch's byte bound).
const STREAM_MSG_BYTES: usize = 32;

/// Inputs handled in one round before its messages go out.
const ROUND_INPUTS_MAX: usize = 1024;

struct Parked {
    epoch: u64,
    seq: Seq,
    from: MemberIx,
    payload: Payload,
}

struct Driver {
    me: String,
    incarnation: u64,
    store: Arc<dyn StateStore>,
    links: Arc<dyn ShardLinks>,
    limits: ShardLimits,
    machine: Option<Ownership<Payload>>,
    map: Arc<ShardMap>,
    waiting: HashMap<Seq, Waiting>,
    /// Messages per peer, sent together at the end of a round.
    outbound: BTreeMap<MemberIx, Vec<PeerMsg>>,
    /// Writes a learner could not apply yet, per shard, oldest first.
    parked: BTreeMap<ShardId, VecDeque<Parked>>,
    parked_len: usize,
    /// Streams being read and sent at once (a join moves thousands of shards).
    streams: Arc<tokio::sync::Semaphore>,
    /// Shards to stream, per learner, started together at the end of the round.
    streams_due: BTreeMap<MemberIx, Vec<(ShardId, Seq)>>,
    /// Store tickets being waited for, each resolving to the input it reports (polled by
    /// the driver's loop: no task per write). Bounded by the store's queue: a submit waits
    /// while `store.queue_max` ops are queued, and a ticket resolves once its group commits.
    pending: FuturesUnordered<BoxFuture<'static, Input>>,
    metrics: ConversationMetrics,
}

enum Waiting {
    Write(Notify),
    Read(oneshot::Sender<Result<(), Failure>>),
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>) {
        loop {
            let input = tokio::select! {
                Some(input) = self.pending.next(), if !self.pending.is_empty() => input,
                input = rx.recv() => match input {
                    Some(input) => input,
                    None => return,
                },
            };
            self.handle(input).await;
            // What is already queued or durable joins this round (one batch per peer).
            for _ in 0..ROUND_INPUTS_MAX {
                if let Ok(input) = rx.try_recv() {
                    self.handle(input).await;
                } else if let Some(Some(input)) = self.pending.next().now_or_never() {
                    self.handle(input).await;
                } else {
                    break;
                }
            }
            self.flush();
        }
    }

    async fn handle(&mut self, input: Input) {
        match input {
            Input::Map(map) => self.map_applied(map),
            Input::Acquire { shard, done } => {
                let owns = self.machine.as_ref().is_some_and(|m| m.owns(shard));
                let entry = self.map.shard(shard).copied().unwrap_or_default();
                let answer = if owns {
                    Ok(entry.epoch)
                } else if entry.is_unavailable() {
                    Err(Failure::Unavailable)
                } else {
                    Err(Failure::NotOwner)
                };
                let _ = done.send(answer);
            }
            Input::Submit { shard, payload, accepted, done } => {
                let result = match self.machine.as_mut() {
                    Some(m) => m.submit(shard, payload),
                    None => Err(Failure::NotOwner),
                };
                match result {
                    Ok(seq) => {
                        self.waiting.insert(seq, Waiting::Write(done));
                        let _ = accepted.send(Ok(()));
                    }
                    Err(why) => {
                        done.dismiss();
                        let _ = accepted.send(Err(why));
                    }
                }
            }
            Input::Read { shard, done } => {
                let result = match self.machine.as_mut() {
                    Some(m) => m.read(shard),
                    None => Err(Failure::NotOwner),
                };
                match result {
                    Ok(seq) => drop(self.waiting.insert(seq, Waiting::Read(done))),
                    Err(why) => drop(done.send(Err(why))),
                }
            }
            Input::Persisted { shard, epoch, seq, ok } => {
                if let Some(m) = self.machine.as_mut() {
                    if ok {
                        m.persisted(shard, epoch, seq);
                    } else {
                        m.persist_failed(shard, epoch, seq);
                    }
                }
            }
            Input::ReplicaPersisted { shard, epoch, seq, from, payload, answer } => match answer {
                Some(StoreAnswer::Done { .. }) => {
                    if let Some(m) = self.machine.as_mut() {
                        m.replica_persisted(shard, epoch, seq, from, &self.map);
                    }
                }
                Some(StoreAnswer::Behind { .. }) => {
                    self.park(shard, Parked { epoch, seq, from, payload })
                }
                // Stale (a newer owner wrote here) or a store error: not acknowledged.
                _ => {}
            },
            Input::Peer(bytes) => self.peer(bytes).await,
            Input::Installed { shard, attempt, owner, ok } => {
                self.installed(shard, attempt, owner, ok).await
            }
            Input::Tick => {
                let heard = self.links.controller_heard();
                if let Some(m) = self.machine.as_mut() {
                    if heard {
                        m.controller_heard();
                    }
                    m.tick();
                }
            }
        }
        self.execute().await;
    }

    fn park(&mut self, shard: ShardId, p: Parked) {
        if self.parked_len >= self.limits.parked_max {
            // The oldest parked write of the fullest shard goes (not acknowledged: the
            // owner drops this member after its patience and it catches up afresh).
            let fullest = self.parked.iter().max_by_key(|(_, q)| q.len()).map(|(s, _)| *s);
            if let Some(q) = fullest.and_then(|s| self.parked.get_mut(&s)) {
                q.pop_front();
                self.parked_len -= 1;
                self.metrics.shard_dropped("parked-full", 1);
            }
        }
        self.parked.entry(shard).or_default().push_back(p);
        self.parked_len += 1;
    }

    /// The map changed: the machine learns which shards' entries did.
    fn map_applied(&mut self, map: Arc<ShardMap>) {
        if self.machine.is_none() {
            if let Some(ix) = map.member_ix(&self.me) {
                self.machine =
                    Some(Ownership::new(ix, self.incarnation, self.limits.machine.clone()));
                self.map = Arc::new(ShardMap::new(0));
            }
        }
        let Some(m) = self.machine.as_mut() else {
            self.map = map;
            return;
        };
        match map.changed_since(&self.map).filter(|_| self.map.members() == map.members()) {
            Some(changed) => m.map_applied(&map, &changed),
            None => m.map_replaced(&map),
        }
        self.map = map;
    }

    async fn peer(&mut self, bytes: Vec<u8>) {
        let Ok(batch) = postcard::from_bytes::<PeerBatch>(&bytes) else {
            tracing::warn!(len = bytes.len(), "undecodable shard batch from a peer");
            self.metrics.shard_dropped("undecodable", 1);
            return;
        };
        let Some(from) = self.map.member_ix(&batch.from) else {
            // A member this node's map does not have yet (its map lags the sender's).
            tracing::debug!(from = %batch.from, "shard batch from a member not in this map");
            self.metrics.shard_dropped("unknown-sender", batch.msgs.len() as u64);
            return;
        };
        for msg in batch.msgs {
            match msg {
                PeerMsg::Own(msg) => {
                    match self.machine.as_mut() {
                        Some(m) => m.receive(from, msg, &self.map),
                        None => self.metrics.shard_dropped("not-a-member", 1),
                    }
                    self.execute().await;
                }
                PeerMsg::Stream { shard, attempt, convs, last } => {
                    self.install(shard, attempt, from, convs, last).await;
                }
            }
        }
    }

    /// Installs one chunk of a shard's rows; after the last, reports the catch-up.
    async fn install(
        &mut self,
        shard: ShardId,
        attempt: Seq,
        owner: MemberIx,
        convs: Vec<(String, Stored)>,
        last: bool,
    ) {
        let mut tickets = Vec::with_capacity(convs.len());
        for (conv, stored) in convs {
            let epoch = stored.replica.promised.max(stored.replica.version.epoch);
            let op =
                StoreOp::Install { epoch, state: stored.state, version: stored.replica.version };
            match self.store.submit(&conv, op).await {
                Ok(ticket) => tickets.push(ticket),
                Err(e) => tracing::warn!(error = %e, "installing a streamed conversation failed"),
            }
        }
        if !last {
            return;
        }
        if tickets.is_empty() {
            // Nothing to wait for (most shards of a move hold no conversation).
            return self.installed(shard, attempt, owner, true).await;
        }
        self.pending.push(Box::pin(async move {
            let mut ok = true;
            for t in tickets {
                ok &= matches!(t.await, Ok(StoreAnswer::Done { .. }));
            }
            Input::Installed { shard, attempt, owner, ok }
        }));
    }

    /// A streamed shard is installed (durable) here: the owner hears of it, and writes that
    /// arrived before the stream apply now.
    async fn installed(&mut self, shard: ShardId, attempt: Seq, owner: MemberIx, ok: bool) {
        if ok {
            match self.machine.as_mut() {
                Some(m) => m.stream_installed(shard, attempt, owner),
                None => self.metrics.shard_dropped("not-a-member", 1),
            }
        }
        for p in self.parked.remove(&shard).unwrap_or_default() {
            self.parked_len -= 1;
            self.persist_replica(shard, p.epoch, p.seq, p.from, p.payload).await;
        }
    }

    async fn persist_replica(
        &mut self,
        shard: ShardId,
        epoch: u64,
        seq: Seq,
        from: MemberIx,
        payload: Payload,
    ) {
        let ticket = self.store.submit(&payload.conv, payload.op.clone()).await;
        self.pending.push(Box::pin(async move {
            let answer = match ticket {
                Ok(t) => t.await.ok(),
                Err(_) => None,
            };
            Input::ReplicaPersisted { shard, epoch, seq, from, payload, answer }
        }));
    }

    /// Executes what the machine asked for.
    async fn execute(&mut self) {
        while let Some(effect) = self.machine.as_mut().and_then(|m| m.poll()) {
            match effect {
                Effect::Persist { shard, epoch, seq, payload } => {
                    let ticket = self.store.submit(&payload.conv, payload.op).await;
                    self.pending.push(Box::pin(async move {
                        let ok = match ticket {
                            Ok(t) => matches!(t.await, Ok(StoreAnswer::Done { .. })),
                            Err(_) => false,
                        };
                        Input::Persisted { shard, epoch, seq, ok }
                    }));
                }
                Effect::PersistReplica { shard, epoch, seq, from, payload } => {
                    self.persist_replica(shard, epoch, seq, from, payload).await;
                }
                Effect::Send { to, msg } => {
                    self.outbound.entry(to).or_default().push(PeerMsg::Own(msg))
                }
                Effect::Release { seq, .. } | Effect::ReadReady { seq, .. } => {
                    match self.waiting.remove(&seq) {
                        Some(Waiting::Write(w)) => w.tell(Ok(())),
                        Some(Waiting::Read(r)) => {
                            let _ = r.send(Ok(()));
                        }
                        None => {}
                    }
                }
                Effect::Fail { seq, why, .. } => match self.waiting.remove(&seq) {
                    Some(Waiting::Write(w)) => w.tell(Err(refusal(why))),
                    Some(Waiting::Read(r)) => {
                        let _ = r.send(Err(why));
                    }
                    None => {}
                },
                Effect::Stream { shard, attempt, to } => {
                    self.streams_due.entry(to).or_default().push((shard, attempt))
                }
                // The machine batches its shard changes per tick.
                Effect::Propose(command) => self.links.propose(command),
            }
        }
    }

    /// Streams shards' stored rows to learner `to`: one task per [`STREAM_SHARDS_MAX`]
    /// shards (at most [`STREAMS_MAX`] at once), reading them in one blocking task per
    /// batch of bounded bytes and sending their rows in batches of bounded bytes (many
    /// empty shards in one batch).
    fn stream(&self, to: MemberIx, shards: Vec<(ShardId, Seq)>) {
        let Some(peer) = self.map.member(to).map(|m| m.name.clone()) else { return };
        for group in shards.chunks(STREAM_SHARDS_MAX) {
            let (store, links, me) = (self.store.clone(), self.links.clone(), self.me.clone());
            let (max, streams, group) =
                (self.limits.batch_bytes_max, self.streams.clone(), group.to_vec());
            let peer = peer.clone();
            tokio::spawn(async move {
                let Ok(_permit) = streams.acquire_owned().await else { return };
                let mut batch = PeerBatch { from: me, msgs: Vec::new() };
                let mut bytes = 0;
                let send = |batch: &mut PeerBatch| {
                    if !batch.msgs.is_empty() {
                        links.send(&peer, batch.to_bytes());
                        batch.msgs.clear();
                    }
                };
                let mut rest = &group[..];
                while !rest.is_empty() {
                    let ids = rest.iter().map(|&(shard, _)| shard).collect();
                    let loaded = match store.load_shards(ids, max).await {
                        Ok(loaded) if !loaded.is_empty() => loaded,
                        Ok(_) => break,
                        Err(e) => {
                            // Not sent: the learner's catch-up starts over after its patience.
                            tracing::warn!(error = %e, "cannot read shards to stream them");
                            break;
                        }
                    };
                    let read = loaded.len();
                    for ((shard, rows), &(_, attempt)) in loaded.into_iter().zip(rest) {
                        let convs = match rows {
                            Ok(convs) => convs,
                            Err(e) => {
                                tracing::warn!(shard, error = %e, "cannot read a shard to stream it");
                                continue;
                            }
                        };
                        let mut chunk: Vec<(String, Stored)> = Vec::new();
                        for (conv, stored) in convs {
                            let size = row_bytes(&conv, &stored);
                            // Full: what is gathered goes (this shard's rows so far as a
                            // chunk that is not its last); a lone row larger than `max`
                            // goes alone.
                            if bytes + size > max && (!chunk.is_empty() || !batch.msgs.is_empty()) {
                                if !chunk.is_empty() {
                                    let convs = std::mem::take(&mut chunk);
                                    let msg =
                                        PeerMsg::Stream { shard, attempt, convs, last: false };
                                    batch.msgs.push(msg);
                                }
                                send(&mut batch);
                                bytes = 0;
                            }
                            bytes += size;
                            chunk.push((conv, stored));
                        }
                        batch.msgs.push(PeerMsg::Stream {
                            shard,
                            attempt,
                            convs: chunk,
                            last: true,
                        });
                        bytes += STREAM_MSG_BYTES;
                        if bytes > max {
                            send(&mut batch);
                            bytes = 0;
                        }
                    }
                    rest = &rest[read.min(rest.len())..];
                }
                send(&mut batch);
            });
        }
    }

    /// Sends each peer its messages of this round, in batches of bounded bytes, and the
    /// round's shard changes to the controller.
    fn flush(&mut self) {
        for (to, shards) in std::mem::take(&mut self.streams_due) {
            self.stream(to, shards);
        }
        for (to, msgs) in std::mem::take(&mut self.outbound) {
            let Some(peer) = self.map.member(to).map(|m| m.name.clone()) else { continue };
            let mut batches = BatchWriter::new(&self.me, self.limits.batch_bytes_max);
            for msg in &msgs {
                if let Some(bytes) = batches.push(msg) {
                    self.links.send(&peer, bytes);
                }
            }
            if let Some(bytes) = batches.finish() {
                self.links.send(&peer, bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests;
