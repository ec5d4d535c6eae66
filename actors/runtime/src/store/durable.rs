//! What the durable stores share: the row layout, the plan of rows an op changes, and the
//! group-commit writer.
//!
//! Layout (both engines): a meta row per conversation (bot, bot state, version, promised
//! epoch) and one row per kept turn, keyed (shard, id length, id, turn) so a shard's rows
//! and a conversation's turns are each one contiguous, ordered range (see [`Layout`]). A write adds one turn row, drops the one that fell
//! out of the window and rewrites the small meta row, so its cost does not grow with
//! history.
//!
//! Group commit: ops go through a bounded queue to one writer thread, which takes
//! everything queued (up to `group_commit_max`) into one atomic write and one fsync, then
//! answers each op. Concurrent turns share the cost of durability; a lone turn waits for
//! its own fsync only. An op the replication rules refuse is answered alone; the rest of
//! its group still commits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use botclaw_core::replication::{Decision, Replica};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{BoxFuture, StoreAnswer, StoreError, StoreOp, StoreTicket};
use crate::metrics::ConversationMetrics;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub bot: String,
    pub bot_state: Vec<u8>,
    /// Version of the data (its turn is the last turn) and the epoch promised.
    pub replica: Replica,
}

/// Row keys, grouped by shard: every key starts with the conversation's shard (u32, big
/// endian), so one shard's meta rows, and its turn rows, are each one contiguous range (a
/// shard streams to a new replica in one scan). A turn key then holds the id's length, the
/// id and the turn, so a conversation's turns are one ordered range within its shard.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub shard_count: u32,
}

impl Layout {
    pub fn shard(&self, conv: &str) -> u32 {
        botclaw_core::placement::shard_of(conv, self.shard_count)
    }

    /// Key of a conversation's meta row.
    pub fn meta(&self, conv: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(conv.len() + 4);
        key.extend_from_slice(&self.shard(conv).to_be_bytes());
        key.extend_from_slice(conv.as_bytes());
        key
    }

    /// Key of one turn row.
    pub fn turn(&self, conv: &str, turn: u64) -> Vec<u8> {
        let mut key = Vec::with_capacity(conv.len() + 14);
        key.extend_from_slice(&self.shard(conv).to_be_bytes());
        key.extend_from_slice(&(conv.len() as u16).to_be_bytes());
        key.extend_from_slice(conv.as_bytes());
        key.extend_from_slice(&turn.to_be_bytes());
        key
    }

    /// The key prefix of every turn row of `conv`.
    pub fn turns_prefix(&self, conv: &str) -> Vec<u8> {
        let mut key = self.turn(conv, 0);
        key.truncate(key.len() - 8);
        key
    }

    /// The key prefix of every row of `shard` (meta and turn rows alike).
    pub fn shard_prefix(shard: u32) -> [u8; 4] {
        shard.to_be_bytes()
    }

    /// The conversation a meta key names.
    pub fn conv_of_meta(key: &[u8]) -> Result<String, String> {
        let id = key.get(4..).ok_or_else(|| format!("meta key of {} bytes", key.len()))?;
        String::from_utf8(id.to_vec()).map_err(|_| "meta key is not UTF-8".to_string())
    }
}

/// What a data directory written before rows were grouped by shard is told.
pub(crate) const OLD_LAYOUT: &str = "holds conversations in the layout before rows were grouped by shard \
     (botclaw before the placement controller), which this version cannot read; start this node \
     with an empty data directory (move this one away; upgrading a cluster in place is not supported)";

pub(crate) fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what} {}: {e}", path.display()))
}

/// The rows one op changes.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Remove every turn row of the conversation first (an install).
    pub clear_turns: bool,
    pub remove_turn: Option<u64>,
    pub put_turns: Vec<(u64, Vec<u8>)>,
    pub meta: Vec<u8>,
    pub answer: Option<StoreAnswer>,
    /// What the new meta row holds besides the bot state (set with `meta`).
    pub known: Option<Known>,
}

/// A meta row without its bot state: all a turn's write needs to know of the row it
/// replaces (its version, its promise, its bot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Known {
    pub replica: Replica,
    pub bot: String,
}

impl Known {
    /// Stands in for the stored row when planning a write, which never reads the stored
    /// bot state.
    pub fn as_meta(&self) -> Meta {
        Meta { bot: self.bot.clone(), bot_state: Vec::new(), replica: self.replica }
    }
}

/// Decides `op` against the stored meta row (`None`: never stored) and plans its rows.
/// `Err` refuses this op alone; `Ok(Plan { answer: Some(..), .. })` with no rows is an
/// answer without a write.
pub(crate) fn plan(
    stored: Option<Meta>,
    op: StoreOp,
    turns_kept_max: usize,
) -> Result<Plan, String> {
    let stored = stored.unwrap_or_default();
    let to = match stored.replica.decide(op.rule()) {
        Decision::Have => StoreAnswer::Done { replica: stored.replica },
        Decision::Stale { promised } => StoreAnswer::Stale { promised },
        Decision::Behind { version } => StoreAnswer::Behind { version },
        Decision::Apply { to } => {
            return apply_plan(stored, op, to, turns_kept_max);
        }
    };
    Ok(Plan { answer: Some(to), ..Plan::default() })
}

fn apply_plan(
    stored: Meta,
    op: StoreOp,
    to: Replica,
    turns_kept_max: usize,
) -> Result<Plan, String> {
    let kept = turns_kept_max as u64;
    let mut plan = Plan { answer: Some(StoreAnswer::Done { replica: to }), ..Plan::default() };
    let meta = match op {
        StoreOp::Fence { .. } => Meta { replica: to, ..stored },
        StoreOp::Write { commit, .. } => {
            let turn = commit.record.turn;
            if turn != stored.replica.version.turn + 1 {
                return Err(format!(
                    "write of turn {turn} does not follow stored turn {}",
                    stored.replica.version.turn
                ));
            }
            let record = postcard::to_allocvec(&*commit.record).expect("records encode");
            plan.put_turns.push((turn, record));
            if turn > kept {
                plan.remove_turn = Some(turn - kept);
            }
            let bot = if stored.bot.is_empty() { commit.bot } else { stored.bot };
            Meta { bot, bot_state: commit.bot_state, replica: to }
        }
        StoreOp::Install { state, .. } => {
            plan.clear_turns = true;
            for record in state.history(turns_kept_max) {
                let bytes = postcard::to_allocvec(&**record).expect("records encode");
                plan.put_turns.push((record.turn, bytes));
            }
            Meta { bot: state.bot, bot_state: state.bot_state, replica: to }
        }
    };
    plan.meta = postcard::to_allocvec(&meta).expect("meta encodes");
    plan.known = Some(Known { replica: meta.replica, bot: meta.bot });
    Ok(plan)
}

pub(crate) fn decode_meta(conv: &str, bytes: &[u8]) -> Result<Meta, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("stored meta of {conv:?} does not decode: {e}"))
}

/// One group commit, engine-specific: applies the ops in order as one atomic, durable
/// write. The outer error fails the whole group (nothing was written); an inner one
/// refuses that op alone.
pub(crate) trait Engine: Send + 'static {
    #[allow(clippy::type_complexity)]
    fn commit_group(
        &mut self,
        ops: Vec<(String, StoreOp)>,
        turns_kept_max: usize,
    ) -> Result<(Vec<Result<StoreAnswer, String>>, GroupTimes), String>;
}

/// Where a group's time went.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct GroupTimes {
    pub apply: Duration,
    pub sync: Duration,
}

struct Job {
    conv: String,
    op: StoreOp,
    done: oneshot::Sender<Result<StoreAnswer, StoreError>>,
}

/// The queue in front of an engine's writer thread.
pub(crate) struct Writer {
    path: PathBuf,
    /// `None` only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// False from a failed group commit (a full disk) until one succeeds.
    writable: Arc<AtomicBool>,
}

impl Drop for Writer {
    /// Closes the queue and waits for the writer to commit what was queued, so the files
    /// are closed (and can be reopened) when the store is gone.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Bounds of a durable store.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// The cluster's shard count (row keys start with the shard).
    pub shard_count: u32,
    /// Turns kept per conversation (history and retry window).
    pub turns_kept_max: usize,
    /// Most ops in one group commit (one fsync).
    pub group_commit_max: usize,
    /// Ops waiting for the writer; submitters wait when it is full.
    pub queue_max: usize,
    /// Bytes of the writer's cache of conversations' versions and bots (fjall), which
    /// spares a turn's write the read of its meta row. 0: every write reads it.
    pub meta_cache_bytes_max: usize,
}

impl Writer {
    pub fn start(
        mut engine: impl Engine,
        path: PathBuf,
        limits: StoreLimits,
        metrics: ConversationMetrics,
    ) -> Result<Writer, StoreError> {
        let (jobs, mut rx) = mpsc::channel::<Job>(limits.queue_max.max(1));
        let writer_path = path.clone();
        let writable = Arc::new(AtomicBool::new(true));
        let writable_now = writable.clone();
        let thread = std::thread::Builder::new()
            .name("botclaw-store".into())
            .spawn(move || {
                let group_max = limits.group_commit_max.max(1);
                let kept = limits.turns_kept_max.max(1);
                while let Some(first) = rx.blocking_recv() {
                    let mut group = vec![first];
                    while group.len() < group_max {
                        match rx.try_recv() {
                            Ok(job) => group.push(job),
                            Err(_) => break,
                        }
                    }
                    let (ops, dones): (Vec<_>, Vec<_>) =
                        group.into_iter().map(|j| ((j.conv, j.op), j.done)).unzip();
                    metrics.store_groups.inc();
                    match engine.commit_group(ops, kept) {
                        Ok((results, times)) => {
                            if !writable_now.swap(true, Ordering::AcqRel) {
                                tracing::info!(file = %writer_path.display(), "the store writes again");
                            }
                            metrics.store_apply_seconds.inc_by(times.apply.as_secs_f64());
                            metrics.store_sync_seconds.inc_by(times.sync.as_secs_f64());
                            for (done, result) in dones.into_iter().zip(results) {
                                if result.is_ok() {
                                    metrics.store_commits.inc();
                                }
                                let _ = done.send(result.map_err(StoreError));
                            }
                        }
                        Err(e) => {
                            writable_now.store(false, Ordering::Release);
                            metrics.store_commit_failures.inc();
                            tracing::error!(file = %writer_path.display(), error = %e, "group commit failed");
                            for done in dones {
                                let _ = done.send(Err(err(&writer_path, "cannot commit to", &e)));
                            }
                        }
                    }
                }
            })
            .map_err(|e| err(&path, "cannot start the writer of", e))?;
        Ok(Writer { path, jobs: Some(jobs), thread: Some(thread), writable })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// False from a failed group commit until one succeeds.
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    pub fn submit<'a>(
        &'a self,
        conv: &'a str,
        op: StoreOp,
    ) -> BoxFuture<'a, Result<StoreTicket, StoreError>> {
        Box::pin(async move {
            let (done, result) = oneshot::channel();
            let job = Job { conv: conv.to_string(), op, done };
            let jobs =
                self.jobs.as_ref().ok_or_else(|| StoreError("the store is closing".into()))?;
            jobs.send(job).await.map_err(|_| StoreError("the store writer stopped".into()))?;
            let ticket: StoreTicket = Box::pin(async move {
                result.await.map_err(|_| StoreError("the store writer stopped".into()))?
            });
            Ok(ticket)
        })
    }
}

/// Times a group: `apply` until `synced` is called, `sync` after.
pub(crate) struct Stopwatch {
    started: Instant,
    applied: Option<Instant>,
}

impl Stopwatch {
    pub fn start() -> Stopwatch {
        Stopwatch { started: Instant::now(), applied: None }
    }

    pub fn applied(&mut self) {
        self.applied = Some(Instant::now());
    }

    pub fn times(&self) -> GroupTimes {
        let applied = self.applied.unwrap_or_else(Instant::now);
        GroupTimes { apply: applied - self.started, sync: applied.elapsed() }
    }
}

#[cfg(test)]
mod tests;
