//! The durable store on fjall (a log-structured merge tree): one directory per node,
//! `DATA/state.fjall`. A group commit appends the group's rows to fjall's journal and
//! fsyncs it once, so its cost follows the bytes written, not the pages touched (the redb
//! engine rewrites a B-tree page per scattered row). Layout and group commit are shared
//! with the redb engine: see [`super::durable`].
//!
//! A group is one fjall batch (one journal write; an install first commits what precedes
//! it, so that its scan of old turn rows sees them), and the group's single
//! `persist(SyncAll)` makes it durable before any op is answered.
//!
//! Lost writes are detected, not silently accepted: fjall recovers a journal up to its last
//! intact batch (right for a write torn by a crash, silent loss for a journal truncated
//! or overwritten later). So every group also stores its number, and after its fsync the
//! number is written to `DATA/state.fjall.durable` (overwritten in place at a fixed
//! width, not fsynced: it can only lag). On open, a store that recovers an older group
//! number than that file names refuses to start, naming the directory; so does a checksum
//! failure or a junk version file inside fjall.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use botclaw_core::conversation::{ConversationState, TurnRecord};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::durable::{
    decode_meta, err, plan, Engine, GroupTimes, Known, Layout, Meta, Stopwatch, StoreLimits,
    Writer, OLD_LAYOUT,
};
use super::{
    load_shards_blocking, BoxFuture, LoadedShards, StateStore, StoreAnswer, StoreError, StoreOp,
    StoreTicket, Stored,
};
use crate::metrics::ConversationMetrics;

/// The directory a node's state lives in.
pub const STATE_DIR: &str = "state.fjall";

/// The file holding the number of the last group known durable.
pub const DURABLE_FILE: &str = "state.fjall.durable";

/// Key (in the `store` keyspace) of the number of the last group committed.
const GROUPS_KEY: &str = "groups";

/// Keyspaces of the rows, keyed by shard first (see [`Layout`]).
const META: &str = "shard_meta";
const TURNS: &str = "shard_turns";
/// The meta keyspace of the layout before rows were grouped by shard.
const OLD_META: &str = "meta";

/// Block cache of the store.
const CACHE_BYTES: u64 = 16 << 20;

#[derive(Clone)]
struct Tables {
    layout: Layout,
    db: Database,
    meta: Keyspace,
    turns: Keyspace,
    /// Bookkeeping of the store itself (the group number).
    store: Keyspace,
    /// A group commit failed. Its rows may already be in the memtable (readable) without
    /// being durable, and fjall refuses further journal writes (`Poisoned`): from then on
    /// every read and write fails until the node restarts, whose recovery replays only
    /// what was made durable. Serving those rows would acknowledge turns a crash loses.
    failed: Arc<AtomicBool>,
}

/// The error of every read and write after a failed commit.
fn failed_error(path: &Path) -> StoreError {
    err(path, "refusing reads and writes of", "a commit failed (see the log): restart the node")
}

fn read_groups(store: &Keyspace) -> Result<u64, String> {
    match store.get(GROUPS_KEY).map_err(|e| e.to_string())? {
        None => Ok(0),
        Some(bytes) => <[u8; 8]>::try_from(&*bytes)
            .map(u64::from_be_bytes)
            .map_err(|_| format!("group number of {} bytes", bytes.len())),
    }
}

/// The group number the durable file names; `None` if there is none yet (or it is empty:
/// written but never synced before a crash).
fn read_durable_file(path: &Path) -> Result<Option<u64>, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| err(path, "junk in", format!("{e}: {:?}", text.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(path, "cannot read", e)),
    }
}

pub struct FjallStore {
    tables: Tables,
    writer: Writer,
}

impl std::fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallStore").field("path", &self.writer.path()).finish()
    }
}

impl FjallStore {
    /// Opens (or creates) `dir/state.fjall`. Files fjall cannot read are an error that
    /// names the directory; nothing is silently reset.
    pub fn open(
        dir: &Path,
        limits: StoreLimits,
        metrics: ConversationMetrics,
    ) -> Result<FjallStore, StoreError> {
        let path = dir.join(STATE_DIR);
        let db = Database::builder(&path)
            .manual_journal_persist(true)
            .worker_threads(1)
            .cache_size(CACHE_BYTES)
            .open()
            .map_err(|e| err(&path, "cannot open state directory", e))?;
        if db.keyspace_exists(OLD_META) {
            return Err(err(&path, "refusing to start:", OLD_LAYOUT));
        }
        let keyspace = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| err(&path, "bad state directory", e))
        };
        let tables = Tables {
            layout: Layout { shard_count: limits.shard_count },
            meta: keyspace(META)?,
            turns: keyspace(TURNS)?,
            store: keyspace("store")?,
            db: db.clone(),
            failed: Arc::new(AtomicBool::new(false)),
        };
        let groups = read_groups(&tables.store).map_err(|e| err(&path, "corrupt", e))?;
        let durable_file = dir.join(DURABLE_FILE);
        if let Some(durable) = read_durable_file(&durable_file)? {
            if durable > groups {
                return Err(err(
                    &path,
                    "lost committed writes in",
                    format!(
                        "it recovers group {groups}, but group {durable} was durable \
                         ({}); the journal was truncated or overwritten",
                        durable_file.display()
                    ),
                ));
            }
        }
        let known = (limits.meta_cache_bytes_max > 0).then(|| {
            let bytes = limits.meta_cache_bytes_max as u64;
            KnownCache::with_weighter((bytes / 128).max(1) as usize, bytes, KnownBytes)
        });
        let durable_file = DurableFile::open(durable_file)?;
        let engine = FjallEngine { tables: tables.clone(), groups, durable_file, known };
        let writer = Writer::start(engine, path, limits, metrics)?;
        Ok(FjallStore { tables, writer })
    }

    fn load_blocking(t: &Tables, path: &Path, conv: &str) -> Result<Option<Stored>, StoreError> {
        if t.failed.load(Ordering::Acquire) {
            return Err(failed_error(path));
        }
        let key = t.layout.meta(conv);
        let Some(meta) = t.meta.get(&key).map_err(|e| err(path, "cannot read", e))? else {
            return Ok(None);
        };
        let meta = decode_meta(conv, &meta).map_err(|e| err(path, "corrupt", e))?;
        Self::turns_blocking(t, path, conv, meta).map(Some)
    }

    fn turns_blocking(
        t: &Tables,
        path: &Path,
        conv: &str,
        meta: Meta,
    ) -> Result<Stored, StoreError> {
        let mut state = ConversationState::default();
        (state.bot, state.bot_state, state.turn) =
            (meta.bot, meta.bot_state, meta.replica.version.turn);
        for row in t.turns.prefix(t.layout.turns_prefix(conv)) {
            let value = row.value().map_err(|e| err(path, "cannot read", e))?;
            let record: TurnRecord = postcard::from_bytes(&value)
                .map_err(|e| err(path, &format!("corrupt turn of {conv:?} in"), e))?;
            state.turns.push_back(Arc::new(record));
        }
        state.reindex();
        Ok(Stored { state, replica: meta.replica })
    }

    /// Every conversation of `shard`, by one scan of its meta rows.
    fn shard_blocking(
        t: &Tables,
        path: &Path,
        shard: u32,
    ) -> Result<Vec<(String, Stored)>, StoreError> {
        if t.failed.load(Ordering::Acquire) {
            return Err(failed_error(path));
        }
        let mut out = Vec::new();
        for row in t.meta.prefix(Layout::shard_prefix(shard)) {
            let (key, value) = row.into_inner().map_err(|e| err(path, "cannot read", e))?;
            let conv = Layout::conv_of_meta(&key).map_err(|e| err(path, "corrupt", e))?;
            let meta = decode_meta(&conv, &value).map_err(|e| err(path, "corrupt", e))?;
            let stored = Self::turns_blocking(t, path, &conv, meta)?;
            out.push((conv, stored));
        }
        Ok(out)
    }
}

/// The writer's cache of meta rows without their bot state, by conversation.
type KnownCache = quick_cache::unsync::Cache<String, Known, KnownBytes>;

/// What an entry of [`KnownCache`] is charged: its strings and a fixed overhead.
#[derive(Clone)]
struct KnownBytes;

impl quick_cache::Weighter<String, Known> for KnownBytes {
    fn weight(&self, conv: &String, known: &Known) -> u64 {
        (conv.len() + known.bot.len() + 96) as u64
    }
}

struct FjallEngine {
    tables: Tables,
    /// Number of the last group committed.
    groups: u64,
    durable_file: DurableFile,
    /// Meta rows as this writer last wrote or read them (it is their only writer), so a
    /// turn's write does not read its meta row back from the tree; `None` when
    /// `meta_cache_bytes_max` is 0.
    known: Option<KnownCache>,
}

/// `state.fjall.durable`: the number of the last group known durable, overwritten in
/// place after each group's fsync (one `pwrite`, no new file and rename per group). The
/// number is written at a fixed width, so a write never leaves a longer old number's
/// digits behind.
struct DurableFile {
    path: std::path::PathBuf,
    file: std::fs::File,
}

impl DurableFile {
    fn open(path: std::path::PathBuf) -> Result<DurableFile, StoreError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| err(&path, "cannot open", e))?;
        Ok(DurableFile { path, file })
    }

    fn write(&self, group: u64) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        // 20 digits hold any u64.
        let line = format!("{group:020}\n");
        self.file
            .write_all_at(line.as_bytes(), 0)
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))
    }
}

/// The rows of one group, in one fjall batch: a single journal write.
struct GroupBatch<'t> {
    tables: &'t Tables,
    batch: fjall::OwnedWriteBatch,
    /// Meta rows written in this batch (not readable from fjall before it commits).
    metas: HashMap<String, Vec<u8>>,
    known: Option<&'t mut KnownCache>,
}

impl<'t> GroupBatch<'t> {
    fn new(tables: &'t Tables, known: Option<&'t mut KnownCache>) -> Self {
        GroupBatch { tables, batch: tables.db.batch(), metas: HashMap::new(), known }
    }

    /// Commits what is batched so far (not yet durable), so fjall's reads see it.
    fn flush(&mut self) -> Result<(), fjall::Error> {
        let batch = std::mem::replace(&mut self.batch, self.tables.db.batch());
        self.metas.clear();
        batch.commit()
    }

    /// The stored meta row `op` is decided against. A turn's write needs no bot state,
    /// so the cache answers it; other ops read the whole row.
    fn meta(
        &mut self,
        conv: &str,
        op: &StoreOp,
    ) -> Result<Option<Result<Meta, String>>, fjall::Error> {
        if let (StoreOp::Write { .. }, Some(known)) = (op, self.known.as_deref_mut()) {
            if let Some(k) = known.get(conv) {
                return Ok(Some(Ok(k.as_meta())));
            }
        }
        if let Some(bytes) = self.metas.get(conv) {
            return Ok(Some(decode_meta(conv, bytes)));
        }
        let key = self.tables.layout.meta(conv);
        let meta = self.tables.meta.get(key)?.map(|bytes| decode_meta(conv, &bytes));
        if let Some(Ok(m)) = &meta {
            self.remember(conv, Known { replica: m.replica, bot: m.bot.clone() });
        }
        Ok(meta)
    }

    /// Keeps what `conv`'s meta row now holds in the cache (in place when it is there).
    fn remember(&mut self, conv: &str, now: Known) {
        let Some(known) = self.known.as_deref_mut() else { return };
        match known.get_mut(conv) {
            Some(mut entry) => *entry = now,
            None => known.insert(conv.to_string(), now),
        }
    }

    /// Adds one op's rows to the batch.
    fn apply(
        &mut self,
        conv: &str,
        op: StoreOp,
        turns_kept_max: usize,
    ) -> Result<Result<StoreAnswer, String>, fjall::Error> {
        let stored = match self.meta(conv, &op)? {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => return Ok(Err(e)),
            None => None,
        };
        let p = match plan(stored, op, turns_kept_max) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        if !p.meta.is_empty() {
            let t = self.tables;
            if p.clear_turns {
                // The scan must see this group's earlier rows of the conversation.
                self.flush()?;
                for row in t.turns.prefix(t.layout.turns_prefix(conv)) {
                    self.batch.remove(&t.turns, row.key()?);
                }
            }
            for (turn, record) in p.put_turns {
                self.batch.insert(&t.turns, t.layout.turn(conv, turn), record);
            }
            if let Some(turn) = p.remove_turn {
                self.batch.remove(&t.turns, t.layout.turn(conv, turn));
            }
            self.batch.insert(&t.meta, t.layout.meta(conv), p.meta.as_slice());
            self.metas.insert(conv.to_string(), p.meta);
            if let Some(k) = p.known {
                self.remember(conv, k);
            }
        }
        Ok(Ok(p.answer.expect("a plan always answers")))
    }
}

impl Engine for FjallEngine {
    fn commit_group(
        &mut self,
        ops: Vec<(String, StoreOp)>,
        turns_kept_max: usize,
    ) -> Result<(Vec<Result<StoreAnswer, String>>, GroupTimes), String> {
        if self.tables.failed.load(Ordering::Acquire) {
            return Err("an earlier commit failed: restart the node".into());
        }
        let result = self.commit_group_once(ops, turns_kept_max);
        if result.is_err() {
            self.tables.failed.store(true, Ordering::Release);
            // It may hold rows that were never made durable.
            if let Some(known) = &mut self.known {
                known.clear();
            }
        }
        result
    }
}

impl FjallEngine {
    fn commit_group_once(
        &mut self,
        ops: Vec<(String, StoreOp)>,
        turns_kept_max: usize,
    ) -> Result<(Vec<Result<StoreAnswer, String>>, GroupTimes), String> {
        let mut clock = Stopwatch::start();
        let mut results = Vec::with_capacity(ops.len());
        let group = self.groups + 1;
        let mut batch = GroupBatch::new(&self.tables, self.known.as_mut());
        for (conv, op) in ops {
            results.push(batch.apply(&conv, op, turns_kept_max).map_err(|e| e.to_string())?);
        }
        batch.batch.insert(&self.tables.store, GROUPS_KEY, group.to_be_bytes());
        batch.flush().map_err(|e| e.to_string())?;
        clock.applied();
        self.tables.db.persist(PersistMode::SyncAll).map_err(|e| e.to_string())?;
        self.groups = group;
        // After the fsync, so the file never names a group that is not durable.
        self.durable_file.write(group)?;
        Ok((results, clock.times()))
    }
}

impl StateStore for FjallStore {
    fn load<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            let (t, path) = (self.tables.clone(), self.writer.path().to_path_buf());
            let conv = conv.to_string();
            tokio::task::spawn_blocking(move || FjallStore::load_blocking(&t, &path, &conv))
                .await
                .map_err(|e| StoreError(format!("state load task failed: {e}")))?
        })
    }

    fn submit<'a>(
        &'a self,
        conv: &'a str,
        op: StoreOp,
    ) -> BoxFuture<'a, Result<StoreTicket, StoreError>> {
        self.writer.submit(conv, op)
    }

    fn writable(&self) -> bool {
        self.writer.writable()
    }

    fn load_shards(
        &self,
        shards: Vec<u32>,
        bytes_max: usize,
    ) -> BoxFuture<'_, Result<LoadedShards, StoreError>> {
        let (t, path) = (self.tables.clone(), self.writer.path().to_path_buf());
        load_shards_blocking(shards, bytes_max, move |s| FjallStore::shard_blocking(&t, &path, s))
    }
}
