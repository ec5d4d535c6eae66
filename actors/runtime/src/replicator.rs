//! Replicated conversation state: how an owner takes a conversation, writes its turns to
//! its preference list, and how a replica serves peers' ops.
//!
//! The rules (epochs, versions, what a replica accepts) are pure and live in
//! [`botclaw_core::replication`]; this module moves ops between stores.
//!
//! - [`Replicator::acquire`]: a conversation's new actor fences the conversation on every
//!   node of its preference list with a fresh epoch, needs the write quorum of them to
//!   promise, continues from the newest copy among them, and installs that copy on those
//!   that lag. A refused fence (someone promised a newer epoch) retries with a higher one,
//!   a few times.
//! - [`Replicator::submit`]: a turn is queued on the local store and sent to every replica
//!   at once (per-peer queues keep a conversation's writes in order); its ticket resolves
//!   when the local store and `write_quorum - 1` replicas hold it. A replica that lagged
//!   answers `Behind` and gets the owner's durable copy installed instead.
//! - [`Replicator::serve`]: a peer's op, applied to the local store in arrival order.
//!
//! Any refusal ends the actor's ownership: its waiting replies fail with `unavailable`
//! (the client retries with the same id), and the next request starts a new actor that
//! acquires afresh, finding the turns that did reach a quorum.

use std::sync::Arc;

use botclaw_core::conversation::{ConversationState, TurnCommit};
use botclaw_core::replication::{newest, write_quorum, Epoch, Version};
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::envelope::FailKind;
use crate::metrics::ConversationMetrics;
use crate::store::{BoxFuture, StateStore, StoreAnswer, StoreError, StoreOp, StoreTicket, Stored};

/// How many times an owner raises its epoch when fences are refused.
const ACQUIRE_ATTEMPTS: usize = 3;
/// Too few replicas answered (a link to a node that just joined is still coming up, a
/// peer is slow): acquire tries again this often, for this long, before it gives up.
/// Requests wait in the conversation's mailbox meanwhile.
const ACQUIRE_RETRY_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
const ACQUIRE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// A conversation's placement as this node sees it now.
#[derive(Debug, Clone)]
pub struct Route {
    /// Owner first, then replicas; live nodes only.
    pub list: Vec<Arc<str>>,
    /// Whether this node may run turns (it sees a majority; see `MajorityGuard`).
    pub serving: bool,
}

/// What a replica answers a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaAnswer {
    pub answer: StoreAnswer,
    /// After a successful fence: the replica's copy, for the new owner to choose from.
    pub stored: Option<Stored>,
}

/// What the replicator needs from the cluster.
pub trait Peers: Send + Sync + 'static {
    fn me(&self) -> &str;
    fn route(&self, conv: &str) -> Route;
    /// Queues `op` for `peer` now (so ops sent in order arrive in order); the future
    /// resolves with the peer's answer.
    fn send(
        &self,
        peer: &str,
        conv: &str,
        op: StoreOp,
    ) -> BoxFuture<'static, Result<ReplicaAnswer, String>>;
}

/// A node with no peers: every conversation is local, R = 1.
#[derive(Debug)]
pub struct Alone(pub Arc<str>);

impl Peers for Alone {
    fn me(&self) -> &str {
        &self.0
    }

    fn route(&self, _conv: &str) -> Route {
        Route { list: vec![self.0.clone()], serving: true }
    }

    fn send(
        &self,
        peer: &str,
        _conv: &str,
        _op: StoreOp,
    ) -> BoxFuture<'static, Result<ReplicaAnswer, String>> {
        let peer = peer.to_string();
        Box::pin(async move { Err(format!("no peer {peer} on a lone node")) })
    }
}

/// Why a conversation cannot go on here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: FailKind,
    pub message: String,
    /// Another node owns the conversation now: requests go there instead of failing.
    pub moved: bool,
}

impl Refusal {
    pub fn unavailable(message: impl Into<String>) -> Refusal {
        Refusal { kind: FailKind::Unavailable, message: message.into(), moved: false }
    }

    /// This node no longer owns the conversation (its placement says so).
    pub fn moved(message: impl Into<String>) -> Refusal {
        Refusal { moved: true, ..Refusal::unavailable(message) }
    }

    /// A store that failed a write committed nothing: retrying (same id) is safe.
    fn store(e: StoreError) -> Refusal {
        Refusal::unavailable(e.to_string())
    }

    /// A conversation the store could not load. While the store cannot write (a failed
    /// commit: it refuses until the node restarts, which it leaves for, see
    /// `store.unwritable_exit_ms`) a retry is served elsewhere soon: `unavailable`. Anything
    /// else (a damaged row) is not cured by retrying: `internal`.
    pub(crate) fn store_load(e: StoreError, store: &dyn StateStore) -> Refusal {
        let kind = if store.writable() { FailKind::Internal } else { FailKind::Unavailable };
        Refusal { kind, message: e.to_string(), moved: false }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// How one acquire attempt failed.
enum Attempt {
    /// Fewer replicas answered than the quorum needs: worth trying again shortly.
    TooFew(Refusal),
    Refused(Refusal),
}

/// A conversation this node now owns.
#[derive(Debug)]
pub struct Owned {
    pub state: ConversationState,
    pub version: Version,
    pub epoch: Epoch,
    /// The turn up to which the copy is known to be held as the mode requires (answers
    /// from the copy may be given up to it): all of it when acquire installed it on the
    /// write quorum, none of it when it is only the local copy (it may hold a previous
    /// owner's write that nobody acknowledged and another in-sync member lacks; see
    /// [`Replication::confirm`]).
    pub durable_turn: u64,
}

/// Resolves when a turn is held by the write quorum (or can no longer be).
pub type ReplicaTicket = BoxFuture<'static, Result<(), Refusal>>;

/// Told once how an accepted turn ended: replicated as the mode requires, or why not. If
/// it is dropped untold (whoever held it stopped), it is told the replicator is gone.
pub struct Notify(Option<Tell>);

type Tell = Box<dyn FnOnce(Result<(), Refusal>) + Send>;

impl Notify {
    pub fn new(f: impl FnOnce(Result<(), Refusal>) + Send + 'static) -> Notify {
        Notify(Some(Box::new(f)))
    }

    pub fn tell(mut self, result: Result<(), Refusal>) {
        if let Some(f) = self.0.take() {
            f(result);
        }
    }

    /// For a turn that was refused (its submitter has the refusal): nothing to tell.
    pub fn dismiss(mut self) {
        self.0 = None;
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(Refusal::unavailable("the replicator stopped before the turn was replicated")));
        }
    }
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notify")
    }
}

/// How a conversation actor owns and writes its conversation: by its node's view
/// ([`Replicator`]) or by the controller's map ([`crate::shards::ShardReplicator`]).
pub trait Replication: Send + Sync + 'static {
    /// Takes ownership of `conv`: its state, version and the epoch its writes carry.
    fn acquire<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<Owned, Refusal>>;
    /// Queues one turn: `Ok` once accepted, and `notify` is told once it is replicated as
    /// the mode requires (or why not). A refused turn is not told.
    fn submit<'a>(
        &'a self,
        conv: &'a str,
        epoch: Epoch,
        base: Version,
        commit: TurnCommit,
        notify: Notify,
    ) -> BoxFuture<'a, Result<(), Refusal>>;
    /// Resolves when this node may answer a read of `conv` (its lease holds).
    fn read<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<(), Refusal>>;
    /// Submits the acquired copy (`state` at `version`) to be held as the mode requires, as
    /// a turn is, before anything is answered from it or built on it: `Ok` once accepted,
    /// and `notify` is told once it is held (or why not).
    fn confirm<'a>(
        &'a self,
        conv: &'a str,
        epoch: Epoch,
        version: Version,
        state: ConversationState,
        notify: Notify,
    ) -> BoxFuture<'a, Result<(), Refusal>>;
}

impl Replication for Replicator {
    fn acquire<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<Owned, Refusal>> {
        Box::pin(Replicator::acquire(self, conv))
    }

    fn submit<'a>(
        &'a self,
        conv: &'a str,
        epoch: Epoch,
        base: Version,
        commit: TurnCommit,
        notify: Notify,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            match Replicator::submit(self, conv, epoch, base, commit).await {
                Ok(ticket) => {
                    // The ticket drives the replication to peers: a task of its own.
                    tokio::spawn(async move { notify.tell(ticket.await) });
                    Ok(())
                }
                Err(refusal) => {
                    notify.dismiss();
                    Err(refusal)
                }
            }
        })
    }

    /// Keep-majority guards reads here: a node that serves turns serves reads.
    fn read<'a>(&'a self, _conv: &'a str) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Acquire installed the copy on the write quorum before it returned: held already.
    fn confirm<'a>(
        &'a self,
        _conv: &'a str,
        _epoch: Epoch,
        _version: Version,
        _state: ConversationState,
        notify: Notify,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        notify.tell(Ok(()));
        Box::pin(std::future::ready(Ok(())))
    }
}

type Done = Box<dyn FnOnce(Result<ReplicaAnswer, StoreError>) + Send>;

struct Incoming {
    conv: String,
    op: StoreOp,
    done: Done,
}

pub struct Replicator {
    pub store: Arc<dyn StateStore>,
    peers: Arc<dyn Peers>,
    write_quorum: usize,
    incoming: mpsc::Sender<Incoming>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator").field("write_quorum", &self.write_quorum).finish()
    }
}

impl Replicator {
    /// `queue_max` bounds peers' ops waiting to be queued on the local store.
    pub fn start(
        store: Arc<dyn StateStore>,
        peers: Arc<dyn Peers>,
        write_quorum: usize,
        queue_max: usize,
        metrics: ConversationMetrics,
    ) -> Arc<Replicator> {
        let (incoming, rx) = mpsc::channel(queue_max.max(1));
        tokio::spawn(apply_incoming(store.clone(), rx, metrics));
        Arc::new(Replicator { store, peers, write_quorum, incoming })
    }

    pub fn me(&self) -> &str {
        self.peers.me()
    }

    /// A replica's side: applies a peer's op to the local store, in arrival order.
    pub fn serve(
        &self,
        conv: String,
        op: StoreOp,
        done: impl FnOnce(Result<ReplicaAnswer, StoreError>) + Send + 'static,
    ) {
        if let Err(mpsc::error::TrySendError::Full(i) | mpsc::error::TrySendError::Closed(i)) =
            self.incoming.try_send(Incoming { conv, op, done: Box::new(done) })
        {
            // The owner sees a failed write; the client retries.
            (i.done)(Err(StoreError("replica queue full".into())));
        }
    }

    /// Takes ownership of `conv`: fence, pick the newest copy, bring laggards up to it.
    pub async fn acquire(&self, conv: &str) -> Result<Owned, Refusal> {
        let started = std::time::Instant::now();
        loop {
            match self.try_acquire(conv).await {
                Err(Attempt::TooFew(_)) if started.elapsed() < ACQUIRE_PATIENCE => {
                    tokio::time::sleep(ACQUIRE_RETRY_EVERY).await;
                }
                Err(Attempt::TooFew(refusal) | Attempt::Refused(refusal)) => return Err(refusal),
                Ok(owned) => return Ok(owned),
            }
        }
    }

    async fn try_acquire(&self, conv: &str) -> Result<Owned, Attempt> {
        let me = self.peers.me().to_string();
        let route = self.route_as_owner(conv).map_err(Attempt::Refused)?;
        let quorum = write_quorum(self.write_quorum, route.list.len());
        let local = self
            .store
            .load(conv)
            .await
            .map_err(|e| Attempt::Refused(Refusal::store_load(e, &*self.store)))?
            .unwrap_or_default();
        let mut highest = local.replica.promised.max(local.replica.version.epoch);
        for _ in 0..ACQUIRE_ATTEMPTS {
            let epoch = Epoch::after(highest, &me);
            let mut copies: Vec<(Arc<str>, Stored)> = Vec::new();
            let mut refused_by: Option<Epoch> = None;
            let mut failures = Vec::new();
            let mut fences: FuturesUnordered<_> = route
                .list
                .iter()
                .map(|node| {
                    let node = node.clone();
                    let fence = self.fence(&node, conv, epoch);
                    async move { (node, fence.await) }
                })
                .collect();
            while let Some((node, result)) = fences.next().await {
                match result {
                    Ok(Ok(stored)) => copies.push((node, stored)),
                    Ok(Err(promised)) => refused_by = refused_by.max(Some(promised)),
                    Err(e) => failures.push(format!("{node}: {e}")),
                }
            }
            // The local copy first, so that ties keep it and nothing moves needlessly.
            copies.sort_by_key(|(node, _)| **node != *me);
            let local_fenced = copies.first().is_some_and(|(node, _)| **node == *me);
            if local_fenced && copies.len() >= quorum {
                return self.settle(conv, epoch, copies, quorum).await.map_err(Attempt::Refused);
            }
            match refused_by {
                Some(promised) => highest = highest.max(promised),
                None => {
                    return Err(Attempt::TooFew(Refusal::unavailable(format!(
                        "only {} of the {quorum} replicas needed answered: {}",
                        copies.len(),
                        failures.join("; ")
                    ))))
                }
            }
        }
        Err(Attempt::Refused(Refusal::unavailable("another node keeps claiming this conversation")))
    }

    /// Continues from the newest copy and installs it where it is missing.
    async fn settle(
        &self,
        conv: &str,
        epoch: Epoch,
        copies: Vec<(Arc<str>, Stored)>,
        quorum: usize,
    ) -> Result<Owned, Refusal> {
        let pick = newest(copies.iter().map(|(_, s)| &s.replica.version)).expect("not empty");
        let best = copies[pick].1.clone();
        let version = best.replica.version;
        let mut holding = 0;
        let mut installs = FuturesUnordered::new();
        for (node, stored) in &copies {
            if stored.replica.version == version {
                holding += 1;
                continue;
            }
            let op = StoreOp::Install { epoch, state: best.state.clone(), version };
            let node = node.clone();
            let sent = self.op_on(&node, conv, op);
            installs.push(async move { (node, sent.await) });
        }
        let mut local_ok = copies[0].1.replica.version == version;
        let mut failures = Vec::new();
        while let Some((node, answer)) = installs.next().await {
            match answer {
                Ok(StoreAnswer::Done { .. }) => {
                    holding += 1;
                    local_ok |= *node == *self.peers.me();
                }
                Ok(other) => failures.push(format!("{node}: {other:?}")),
                Err(e) => failures.push(format!("{node}: {e}")),
            }
        }
        if !local_ok || holding < quorum {
            return Err(Refusal::unavailable(format!(
                "could not copy the newest state to a quorum: {}",
                failures.join("; ")
            )));
        }
        let mut state = best.state;
        state.reindex();
        Ok(Owned { durable_turn: state.turn, state, version, epoch })
    }

    /// Queues one turn of an owned conversation; see the module docs.
    pub async fn submit(
        &self,
        conv: &str,
        epoch: Epoch,
        base: Version,
        commit: TurnCommit,
    ) -> Result<ReplicaTicket, Refusal> {
        let route = self.route_as_owner(conv)?;
        let quorum = write_quorum(self.write_quorum, route.list.len());
        let turn = commit.record.turn;
        let op = StoreOp::Write { epoch, base, commit };
        let local = self.store.submit(conv, op.clone()).await.map_err(Refusal::store)?;
        let remotes: FuturesUnordered<_> = route.list[1..]
            .iter()
            .map(|peer| {
                let peer = peer.clone();
                let sent = self.peers.send(&peer, conv, op.clone());
                async move { (peer, sent.await) }
            })
            .collect();
        let (store, peers, conv) = (self.store.clone(), self.peers.clone(), conv.to_string());
        let target = Version { epoch, turn };
        Ok(Box::pin(async move {
            match local.await.map_err(Refusal::store)? {
                StoreAnswer::Done { .. } => {}
                StoreAnswer::Stale { promised } => {
                    return Err(Refusal::unavailable(format!(
                        "ownership moved: epoch {promised} is newer than {epoch}"
                    )))
                }
                StoreAnswer::Behind { version } => {
                    return Err(Refusal::store(StoreError(format!(
                        "local copy at turn {} does not take turn {turn}",
                        version.turn
                    ))))
                }
            }
            replicate(store, peers, conv, remotes, quorum - 1, target).await
        }))
    }

    fn route_as_owner(&self, conv: &str) -> Result<Route, Refusal> {
        let route = self.peers.route(conv);
        if !route.serving {
            return Err(Refusal::unavailable(
                "this node sees less than a majority of the cluster and serves no turns",
            ));
        }
        match route.list.first() {
            Some(owner) if **owner == *self.peers.me() => Ok(route),
            Some(owner) => Err(Refusal::moved(format!("ownership moved to {owner}"))),
            None => Err(Refusal::unavailable("no node serves conversations")),
        }
    }

    /// Fences `conv` on `node`: its copy, or the newer epoch it promised.
    fn fence(
        &self,
        node: &str,
        conv: &str,
        epoch: Epoch,
    ) -> BoxFuture<'static, Result<Result<Stored, Epoch>, String>> {
        let op = StoreOp::Fence { epoch };
        if node == self.peers.me() {
            let (store, conv) = (self.store.clone(), conv.to_string());
            return Box::pin(async move {
                match store.execute(&conv, op).await.map_err(|e| e.to_string())? {
                    StoreAnswer::Done { .. } => Ok(Ok(store
                        .load(&conv)
                        .await
                        .map_err(|e| e.to_string())?
                        .unwrap_or_default())),
                    StoreAnswer::Stale { promised } => Ok(Err(promised)),
                    other => Err(format!("unexpected answer to a fence: {other:?}")),
                }
            });
        }
        let sent = self.peers.send(node, conv, op);
        Box::pin(async move {
            let answer = sent.await?;
            match (answer.answer, answer.stored) {
                (StoreAnswer::Done { .. }, Some(stored)) => Ok(Ok(stored)),
                (StoreAnswer::Stale { promised }, _) => Ok(Err(promised)),
                (other, _) => Err(format!("unexpected answer to a fence: {other:?}")),
            }
        })
    }

    /// Runs `op` on `node`'s store (this node's or a peer's).
    fn op_on(
        &self,
        node: &str,
        conv: &str,
        op: StoreOp,
    ) -> BoxFuture<'static, Result<StoreAnswer, String>> {
        if node == self.peers.me() {
            let (store, conv) = (self.store.clone(), conv.to_string());
            return Box::pin(
                async move { store.execute(&conv, op).await.map_err(|e| e.to_string()) },
            );
        }
        let sent = self.peers.send(node, conv, op);
        Box::pin(async move { sent.await.map(|a| a.answer) })
    }
}

/// Waits until `needed` replicas hold `target`, installing the owner's durable copy on a
/// replica that answers `Behind`.
async fn replicate(
    store: Arc<dyn StateStore>,
    peers: Arc<dyn Peers>,
    conv: String,
    mut remotes: FuturesUnordered<
        impl std::future::Future<Output = (Arc<str>, Result<ReplicaAnswer, String>)>,
    >,
    needed: usize,
    target: Version,
) -> Result<(), Refusal> {
    let mut held = 0;
    let mut failures = Vec::new();
    while held < needed {
        let Some((peer, answer)) = remotes.next().await else {
            return Err(Refusal::unavailable(format!(
                "turn {} reached {held} of the {needed} replicas needed: {}",
                target.turn,
                failures.join("; ")
            )));
        };
        let answer = match answer.map(|a| a.answer) {
            Ok(StoreAnswer::Behind { .. }) => {
                install_copy(&store, &peers, &peer, &conv, target).await
            }
            other => other,
        };
        match answer {
            Ok(StoreAnswer::Done { replica }) if replica.version >= target => held += 1,
            Ok(StoreAnswer::Stale { promised }) => {
                return Err(Refusal::unavailable(format!(
                    "ownership moved: {peer} promised epoch {promised}, newer than {}",
                    target.epoch
                )))
            }
            Ok(other) => failures.push(format!("{peer}: {other:?}")),
            Err(e) => failures.push(format!("{peer}: {e}")),
        }
    }
    Ok(())
}

/// Sends the owner's durable copy (at `target` or later) to a replica that lags.
async fn install_copy(
    store: &Arc<dyn StateStore>,
    peers: &Arc<dyn Peers>,
    peer: &str,
    conv: &str,
    target: Version,
) -> Result<StoreAnswer, String> {
    let stored = store.load(conv).await.map_err(|e| e.to_string())?.unwrap_or_default();
    if stored.replica.version.epoch != target.epoch || stored.replica.version < target {
        return Err(format!("the local copy moved on to {:?}", stored.replica.version));
    }
    let op = StoreOp::Install {
        epoch: target.epoch,
        state: stored.state,
        version: stored.replica.version,
    };
    peers.send(peer, conv, op).await.map(|a| a.answer)
}

/// Queues peers' ops on the local store one by one (keeping their arrival order); a second
/// task answers each when it is durable (tickets resolve in submission order).
async fn apply_incoming(
    store: Arc<dyn StateStore>,
    mut rx: mpsc::Receiver<Incoming>,
    metrics: ConversationMetrics,
) {
    let (queued, mut tickets) = mpsc::unbounded_channel::<(String, bool, StoreTicket, Done)>();
    let (answer_store, answer_metrics) = (store.clone(), metrics.clone());
    tokio::spawn(async move {
        let metrics = answer_metrics;
        while let Some((conv, fence, ticket, done)) = tickets.recv().await {
            let result = match ticket.await {
                Ok(answer @ StoreAnswer::Stale { .. }) => {
                    metrics.replica_stale.inc();
                    Ok(ReplicaAnswer { answer, stored: None })
                }
                Ok(answer @ StoreAnswer::Done { .. }) if fence => {
                    answer_store.load(&conv).await.map(|stored| ReplicaAnswer { answer, stored })
                }
                Ok(answer) => Ok(ReplicaAnswer { answer, stored: None }),
                Err(e) => Err(e),
            };
            done(result);
        }
    });
    while let Some(Incoming { conv, op, done }) = rx.recv().await {
        metrics.replica_ops.inc();
        let fence = matches!(op, StoreOp::Fence { .. });
        match store.submit(&conv, op).await {
            Ok(ticket) => {
                if queued.send((conv, fence, ticket, done)).is_err() {
                    return;
                }
            }
            Err(e) => done(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests;
