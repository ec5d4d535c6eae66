//! The durable store: one redb file per node, `DATA/state.redb`.
//!
//! Layout: `conversation_meta` maps a conversation id to its bot, bot state and last turn
//! number; `conversation_turns` maps (id, turn) to a turn record, keeping the last
//! `turns_kept_max` turns. A commit adds one turn row and rewrites the small meta row, so
//! its cost does not grow with history.
//!
//! Group commit: commits go through a bounded queue to one writer thread, which takes
//! everything queued (up to `group_commit_max`) into one write transaction and one fsync,
//! then answers each commit. Concurrent turns share the cost of durability; a lone turn
//! waits for its own fsync only. A commit whose turn does not follow the stored one is
//! refused alone; the rest of its group still commits.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use botclaw_core::conversation::{ConversationState, TurnRecord};
use botclaw_core::replication::{Decision, Replica};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{BoxFuture, StateStore, StoreAnswer, StoreError, StoreOp, StoreTicket, Stored};
use crate::metrics::ConversationMetrics;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("conversation_meta");
const TURNS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("conversation_turns");

/// The file a node's state lives in.
pub const STATE_FILE: &str = "state.redb";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    bot: String,
    bot_state: Vec<u8>,
    /// Version of the data (its turn is the last turn) and the epoch promised.
    replica: Replica,
}

/// Key of one turn row: conversation id length (u16, big-endian), id, turn (u64, big-endian),
/// so a conversation's turns are one contiguous, ordered range.
fn turn_key(conv: &str, turn: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(conv.len() + 10);
    key.extend_from_slice(&(conv.len() as u16).to_be_bytes());
    key.extend_from_slice(conv.as_bytes());
    key.extend_from_slice(&turn.to_be_bytes());
    key
}

struct Job {
    conv: String,
    /// Taken when applied.
    op: Option<StoreOp>,
    done: oneshot::Sender<Result<StoreAnswer, StoreError>>,
}

pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
    /// `None` only while dropping.
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RedbStore {
    /// Closes the queue and waits for the writer to commit what was queued, so the file is
    /// closed (and can be reopened) when the store is gone.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("path", &self.path).finish()
    }
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what} {}: {e}", path.display()))
}

impl RedbStore {
    /// Opens (or creates) `dir/state.redb`. A corrupt or truncated file is an error that
    /// names the file; nothing is silently reset.
    pub fn open(
        dir: &Path,
        turns_kept_max: usize,
        group_commit_max: usize,
        queue_max: usize,
        metrics: ConversationMetrics,
    ) -> Result<RedbStore, StoreError> {
        let path = dir.join(STATE_FILE);
        let db = Database::create(&path).map_err(|e| err(&path, "cannot open state file", e))?;
        // Create the tables up front, so reads of a fresh store find them.
        let txn = db.begin_write().map_err(|e| err(&path, "cannot write state file", e))?;
        txn.open_table(META).map_err(|e| err(&path, "bad state file", e))?;
        txn.open_table(TURNS).map_err(|e| err(&path, "bad state file", e))?;
        txn.commit().map_err(|e| err(&path, "cannot write state file", e))?;
        let db = Arc::new(db);
        let (jobs, rx) = mpsc::channel(queue_max.max(1));
        let writer_db = db.clone();
        let writer_path = path.clone();
        let writer = std::thread::Builder::new()
            .name("botclaw-store".into())
            .spawn(move || {
                write_loop(
                    writer_db,
                    writer_path,
                    rx,
                    turns_kept_max.max(1),
                    group_commit_max.max(1),
                    metrics,
                )
            })
            .map_err(|e| err(&path, "cannot start the writer of", e))?;
        Ok(RedbStore { db, path, jobs: Some(jobs), writer: Some(writer) })
    }

    fn load_blocking(db: &Database, path: &Path, conv: &str) -> Result<Option<Stored>, StoreError> {
        let txn = db.begin_read().map_err(|e| err(path, "cannot read", e))?;
        let meta_table = txn.open_table(META).map_err(|e| err(path, "cannot read", e))?;
        let Some(meta) = meta_table.get(conv).map_err(|e| err(path, "cannot read", e))? else {
            return Ok(None);
        };
        let meta: Meta = postcard::from_bytes(meta.value())
            .map_err(|e| err(path, &format!("corrupt conversation {conv:?} in"), e))?;
        let turns_table = txn.open_table(TURNS).map_err(|e| err(path, "cannot read", e))?;
        let (start, end) = (turn_key(conv, 0), turn_key(conv, u64::MAX));
        let mut state = ConversationState::default();
        (state.bot, state.bot_state, state.turn) =
            (meta.bot, meta.bot_state, meta.replica.version.turn);
        for row in turns_table
            .range(start.as_slice()..=end.as_slice())
            .map_err(|e| err(path, "cannot read", e))?
        {
            let (_, value) = row.map_err(|e| err(path, "cannot read", e))?;
            let record: TurnRecord = postcard::from_bytes(value.value())
                .map_err(|e| err(path, &format!("corrupt turn of {conv:?} in"), e))?;
            state.turns.push_back(Arc::new(record));
        }
        state.reindex();
        Ok(Some(Stored { state, replica: meta.replica }))
    }
}

type Tables<'t> =
    (redb::Table<'t, &'static str, &'static [u8]>, redb::Table<'t, &'static [u8], &'static [u8]>);

/// Executes one op inside the group's write transaction. The outer error fails the whole
/// group (the file could not be written); the inner one fails this op alone.
fn apply(
    tables: &mut Tables<'_>,
    conv: &str,
    op: StoreOp,
    turns_kept_max: usize,
) -> Result<Result<StoreAnswer, String>, redb::StorageError> {
    let (meta, turns) = tables;
    let stored = match meta.get(conv)? {
        Some(bytes) => match postcard::from_bytes::<Meta>(bytes.value()) {
            Ok(m) => m,
            Err(e) => return Ok(Err(format!("stored meta of {conv:?} does not decode: {e}"))),
        },
        None => Meta::default(),
    };
    let to = match stored.replica.decide(op.rule()) {
        Decision::Have => return Ok(Ok(StoreAnswer::Done { replica: stored.replica })),
        Decision::Stale { promised } => return Ok(Ok(StoreAnswer::Stale { promised })),
        Decision::Behind { version } => return Ok(Ok(StoreAnswer::Behind { version })),
        Decision::Apply { to } => to,
    };
    let kept = turns_kept_max as u64;
    let row = match op {
        StoreOp::Fence { .. } => Meta { replica: to, ..stored },
        StoreOp::Write { commit, .. } => {
            let turn = commit.record.turn;
            if turn != stored.replica.version.turn + 1 {
                return Ok(Err(format!(
                    "write of turn {turn} does not follow stored turn {}",
                    stored.replica.version.turn
                )));
            }
            let record = postcard::to_allocvec(&*commit.record).expect("records encode");
            turns.insert(turn_key(conv, turn).as_slice(), record.as_slice())?;
            if turn > kept {
                turns.remove(turn_key(conv, turn - kept).as_slice())?;
            }
            let bot = if stored.bot.is_empty() { commit.bot } else { stored.bot };
            Meta { bot, bot_state: commit.bot_state, replica: to }
        }
        StoreOp::Install { state, .. } => {
            let (start, end) = (turn_key(conv, 0), turn_key(conv, u64::MAX));
            turns.retain_in(start.as_slice()..=end.as_slice(), |_, _| false)?;
            for record in state.history(turns_kept_max) {
                let bytes = postcard::to_allocvec(&**record).expect("records encode");
                turns.insert(turn_key(conv, record.turn).as_slice(), bytes.as_slice())?;
            }
            Meta { bot: state.bot, bot_state: state.bot_state, replica: to }
        }
    };
    let row = postcard::to_allocvec(&row).expect("meta encodes");
    meta.insert(conv, row.as_slice())?;
    Ok(Ok(StoreAnswer::Done { replica: to }))
}

fn write_loop(
    db: Arc<Database>,
    path: PathBuf,
    mut rx: mpsc::Receiver<Job>,
    turns_kept_max: usize,
    group_commit_max: usize,
    metrics: ConversationMetrics,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < group_commit_max {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let mut results: Vec<Result<StoreAnswer, StoreError>> = Vec::with_capacity(group.len());
        let outcome = (|| -> Result<(), redb::Error> {
            let started = std::time::Instant::now();
            let txn = db.begin_write()?;
            {
                let mut tables = (txn.open_table(META)?, txn.open_table(TURNS)?);
                for job in &mut group {
                    let op = job.op.take().expect("each op is applied once");
                    let r = apply(&mut tables, &job.conv, op, turns_kept_max)?;
                    results.push(r.map_err(StoreError));
                }
            }
            let applied = std::time::Instant::now();
            metrics.store_apply_seconds.inc_by((applied - started).as_secs_f64());
            txn.commit()?;
            metrics.store_sync_seconds.inc_by(applied.elapsed().as_secs_f64());
            Ok(())
        })();
        metrics.store_groups.inc();
        match outcome {
            Ok(()) => {
                for (job, result) in group.into_iter().zip(results) {
                    if result.is_ok() {
                        metrics.store_commits.inc();
                    }
                    let _ = job.done.send(result);
                }
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "group commit failed");
                for job in group {
                    let _ = job.done.send(Err(err(&path, "cannot commit to", &e)));
                }
            }
        }
    }
}

impl StateStore for RedbStore {
    fn load<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            let (db, path, conv) = (self.db.clone(), self.path.clone(), conv.to_string());
            tokio::task::spawn_blocking(move || RedbStore::load_blocking(&db, &path, &conv))
                .await
                .map_err(|e| StoreError(format!("state load task failed: {e}")))?
        })
    }

    fn submit<'a>(
        &'a self,
        conv: &'a str,
        op: StoreOp,
    ) -> BoxFuture<'a, Result<StoreTicket, StoreError>> {
        Box::pin(async move {
            let (done, result) = oneshot::channel();
            let job = Job { conv: conv.to_string(), op: Some(op), done };
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

#[cfg(test)]
mod tests;
