//! Where conversation state lives between turns, across passivation, and on replicas.
//!
//! A store holds, per conversation, its data ([`ConversationState`]) and the replication
//! bookkeeping ([`Replica`]: the version of the data and the highest epoch promised). It
//! executes [`StoreOp`]s under the rules of [`botclaw_core::replication`]: the owner's own
//! turns and a peer's replicated turns go through the same door, so a store refuses a
//! stale owner's write whether it is local or remote.
//!
//! [`MemoryStore`] keeps state in memory (tests, `--ephemeral` nodes); [`redb::RedbStore`]
//! keeps it in a crash-safe file under the data directory, with group commit.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use botclaw_core::conversation::{ConversationState, TurnCommit};
use botclaw_core::replication::{Decision, Epoch, Op, Replica, Version};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3Builder;

pub(crate) mod durable;
pub use durable::StoreLimits;
pub mod fjall;
pub mod redb;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

/// A conversation as a store holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub state: ConversationState,
    pub replica: Replica,
}

/// What a store is asked to do with one conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreOp {
    /// Promise to refuse writes older than `epoch` (a new owner starts with this).
    Fence { epoch: Epoch },
    /// Append one turn, written by the owner of `epoch`, to the data at version `base`.
    Write { epoch: Epoch, base: Version, commit: TurnCommit },
    /// Replace the data with the owner's copy (a replica that lagged or diverged).
    Install { epoch: Epoch, state: ConversationState, version: Version },
}

impl StoreOp {
    pub fn rule(&self) -> Op {
        match self {
            StoreOp::Fence { epoch } => Op::Fence { epoch: *epoch },
            StoreOp::Write { epoch, base, .. } => Op::Write { epoch: *epoch, base: *base },
            StoreOp::Install { epoch, version, .. } => {
                Op::Install { epoch: *epoch, version: *version }
            }
        }
    }
}

/// How a store answered an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreAnswer {
    /// Done (or already held); the conversation is now at `replica`.
    Done { replica: Replica },
    /// Refused: a newer epoch was promised.
    Stale { promised: Epoch },
    /// Refused: the write does not follow the stored version.
    Behind { version: Version },
}

/// Resolves when a submitted op is durable (or failed).
pub type StoreTicket = BoxFuture<'static, Result<StoreAnswer, StoreError>>;

/// The conversations a store holds in one shard, with their data.
pub type ShardRows = Vec<(String, Stored)>;

/// Shards as [`StateStore::load_shards`] read them: each with its rows, or why it could not
/// be read.
pub type LoadedShards = Vec<(u32, Result<ShardRows, StoreError>)>;

/// What one row costs in a stream to a peer (its encoded size), the unit of every byte
/// bound on streamed rows.
pub fn row_bytes(conv: &str, stored: &Stored) -> usize {
    postcard::experimental::serialized_size(stored).unwrap_or(0) + conv.len()
}

/// Reads `shards` in order with `load` until the rows read reach `bytes_max` (at least one
/// shard is read): the loop of every engine's [`StateStore::load_shards`].
fn load_shards_with(
    shards: &[u32],
    bytes_max: usize,
    mut load: impl FnMut(u32) -> Result<ShardRows, StoreError>,
) -> LoadedShards {
    let mut out = Vec::new();
    let mut bytes = 0;
    for &shard in shards {
        let rows = load(shard);
        if let Ok(rows) = &rows {
            bytes += rows.iter().map(|(conv, stored)| row_bytes(conv, stored)).sum::<usize>();
        }
        out.push((shard, rows));
        if bytes >= bytes_max {
            break;
        }
    }
    out
}

/// [`load_shards_with`] a durable engine's blocking `load`, in one blocking task.
fn load_shards_blocking(
    shards: Vec<u32>,
    bytes_max: usize,
    load: impl FnMut(u32) -> Result<ShardRows, StoreError> + Send + 'static,
) -> BoxFuture<'static, Result<LoadedShards, StoreError>> {
    Box::pin(async move {
        tokio::task::spawn_blocking(move || load_shards_with(&shards, bytes_max, load))
            .await
            .map_err(|e| StoreError(format!("shard load task failed: {e}")))
    })
}

pub trait StateStore: Send + Sync + 'static {
    /// A conversation as stored, if the store ever heard of it.
    fn load<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StoreError>>;

    /// Queues one op and returns once it is queued (ops on one conversation run in the
    /// order submitted); the ticket resolves when its effect is as durable as the store
    /// makes it. A conversation may submit its next turn before the last one's ticket
    /// resolved: that is how it keeps working while its last turn is made durable.
    fn submit<'a>(
        &'a self,
        conv: &'a str,
        op: StoreOp,
    ) -> BoxFuture<'a, Result<StoreTicket, StoreError>>;

    /// Every conversation of each of `shards` this store holds, in the order asked, to
    /// stream them to a new replica: one scan per shard (rows are grouped by shard), all in
    /// one blocking task (a move streams tens of thousands of mostly empty shards). Stops
    /// after the shard at which the rows read reach `bytes_max` (at least one is read): the
    /// caller asks again for the rest. A shard that cannot be read carries its error.
    fn load_shards(
        &self,
        shards: Vec<u32>,
        bytes_max: usize,
    ) -> BoxFuture<'_, Result<LoadedShards, StoreError>>;

    /// False from a failed commit (a full disk, an I/O error) until one succeeds again:
    /// the node reports not ready meanwhile (nothing acknowledged is lost: a turn whose
    /// commit failed is not acknowledged).
    fn writable(&self) -> bool {
        true
    }

    /// Every conversation of `shard` this store holds.
    fn load_shard(&self, shard: u32) -> BoxFuture<'_, Result<ShardRows, StoreError>> {
        Box::pin(async move {
            match self.load_shards(vec![shard], usize::MAX).await?.pop() {
                Some((_, rows)) => rows,
                None => Ok(Vec::new()),
            }
        })
    }

    /// Submits and waits for durability.
    fn execute<'a>(
        &'a self,
        conv: &'a str,
        op: StoreOp,
    ) -> BoxFuture<'a, Result<StoreAnswer, StoreError>> {
        Box::pin(async move { self.submit(conv, op).await?.await })
    }
}

/// Applies `op` to `stored` under the replication rules. Shared by every store.
pub fn apply_op(
    stored: &mut Stored,
    op: StoreOp,
    turns_kept_max: usize,
) -> Result<StoreAnswer, StoreError> {
    match stored.replica.decide(op.rule()) {
        Decision::Have => Ok(StoreAnswer::Done { replica: stored.replica }),
        Decision::Stale { promised } => Ok(StoreAnswer::Stale { promised }),
        Decision::Behind { version } => Ok(StoreAnswer::Behind { version }),
        Decision::Apply { to } => {
            match op {
                StoreOp::Fence { .. } => {}
                StoreOp::Write { commit, .. } => {
                    let turn = commit.record.turn;
                    if !stored.state.apply(commit, turns_kept_max) {
                        return Err(StoreError(format!(
                            "write of turn {turn} does not follow stored turn {}",
                            stored.state.turn
                        )));
                    }
                }
                StoreOp::Install { mut state, .. } => {
                    while state.turns.len() > turns_kept_max.max(1) {
                        state.turns.pop_front();
                    }
                    state.reindex();
                    stored.state = state;
                }
            }
            stored.replica = to;
            Ok(StoreAnswer::Done { replica: to })
        }
    }
}

/// Keeps every conversation in memory: for tests and `--ephemeral` nodes.
#[derive(Debug)]
pub struct MemoryStore {
    conversations: DashMap<String, Stored, Xxh3Builder>,
    turns_kept_max: usize,
    shard_count: u32,
}

impl MemoryStore {
    pub fn new(turns_kept_max: usize, shard_count: u32) -> Self {
        let hasher = Xxh3Builder::new().with_seed(crate::host::random_seed());
        MemoryStore { conversations: DashMap::with_hasher(hasher), turns_kept_max, shard_count }
    }

    fn apply(&self, conv: &str, op: StoreOp) -> Result<StoreAnswer, StoreError> {
        let mut stored = match self.conversations.get_mut(conv) {
            Some(stored) => stored,
            None => self.conversations.entry(conv.to_string()).or_default(),
        };
        apply_op(&mut stored, op, self.turns_kept_max)
    }
}

impl StateStore for MemoryStore {
    fn load<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move { Ok(self.conversations.get(conv).map(|s| s.clone())) })
    }

    fn submit<'a>(
        &'a self,
        conv: &'a str,
        op: StoreOp,
    ) -> BoxFuture<'a, Result<StoreTicket, StoreError>> {
        Box::pin(async move {
            let ticket: StoreTicket = Box::pin(std::future::ready(self.apply(conv, op)));
            Ok(ticket)
        })
    }

    /// One scan of every conversation for all of `shards` (memory has no shard order;
    /// tests and ephemeral nodes), then the same byte bound as the durable engines.
    fn load_shards(
        &self,
        shards: Vec<u32>,
        bytes_max: usize,
    ) -> BoxFuture<'_, Result<LoadedShards, StoreError>> {
        let mut by_shard: HashMap<u32, ShardRows> =
            shards.iter().map(|&s| (s, Vec::new())).collect();
        for e in self.conversations.iter() {
            let shard = botclaw_core::placement::shard_of(e.key(), self.shard_count);
            if let Some(rows) = by_shard.get_mut(&shard) {
                rows.push((e.key().clone(), e.value().clone()));
            }
        }
        let out = load_shards_with(&shards, bytes_max, |shard| {
            let mut rows = by_shard.remove(&shard).unwrap_or_default();
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(rows)
        });
        Box::pin(std::future::ready(Ok(out)))
    }
}
