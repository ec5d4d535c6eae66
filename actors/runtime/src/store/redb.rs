//! The durable store on redb: one file per node, `DATA/state.redb` (copy-on-write
//! B-trees). Layout and group commit are shared with the other engine: see
//! [`super::durable`].

use std::path::Path;
use std::sync::Arc;

use botclaw_core::conversation::{ConversationState, TurnRecord};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::durable::{
    decode_meta, err, plan, Engine, GroupTimes, Layout, Meta, Stopwatch, StoreLimits, Writer,
    OLD_LAYOUT,
};
use super::{
    load_shards_blocking, BoxFuture, LoadedShards, StateStore, StoreAnswer, StoreError, StoreOp,
    StoreTicket, Stored,
};
use crate::metrics::ConversationMetrics;

/// Rows keyed by shard first (see [`Layout`]).
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("shard_meta");
const TURNS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("shard_turns");
/// The meta table of the layout before rows were grouped by shard.
const OLD_META: &str = "conversation_meta";

/// The file a node's state lives in.
pub const STATE_FILE: &str = "state.redb";

pub struct RedbStore {
    db: Arc<Database>,
    layout: Layout,
    writer: Writer,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("path", &self.writer.path()).finish()
    }
}

impl RedbStore {
    /// Opens (or creates) `dir/state.redb`. A corrupt or truncated file is an error that
    /// names the file; nothing is silently reset.
    pub fn open(
        dir: &Path,
        limits: StoreLimits,
        metrics: ConversationMetrics,
    ) -> Result<RedbStore, StoreError> {
        let path = dir.join(STATE_FILE);
        let db = Database::create(&path).map_err(|e| err(&path, "cannot open state file", e))?;
        let old = {
            let txn = db.begin_read().map_err(|e| err(&path, "cannot read state file", e))?;
            let tables = txn.list_tables().map_err(|e| err(&path, "bad state file", e))?;
            let old = tables.into_iter().any(|t| t.name() == OLD_META);
            old
        };
        if old {
            return Err(err(&path, "refusing to start:", OLD_LAYOUT));
        }
        // Create the tables up front, so reads of a fresh store find them.
        let txn = db.begin_write().map_err(|e| err(&path, "cannot write state file", e))?;
        txn.open_table(META).map_err(|e| err(&path, "bad state file", e))?;
        txn.open_table(TURNS).map_err(|e| err(&path, "bad state file", e))?;
        txn.commit().map_err(|e| err(&path, "cannot write state file", e))?;
        let db = Arc::new(db);
        let layout = Layout { shard_count: limits.shard_count };
        let writer = Writer::start(RedbEngine { db: db.clone(), layout }, path, limits, metrics)?;
        Ok(RedbStore { db, layout, writer })
    }

    fn load_blocking(
        db: &Database,
        layout: Layout,
        path: &Path,
        conv: &str,
    ) -> Result<Option<Stored>, StoreError> {
        let txn = db.begin_read().map_err(|e| err(path, "cannot read", e))?;
        let meta_table = txn.open_table(META).map_err(|e| err(path, "cannot read", e))?;
        let key = layout.meta(conv);
        let Some(meta) = meta_table.get(key.as_slice()).map_err(|e| err(path, "cannot read", e))?
        else {
            return Ok(None);
        };
        let meta = decode_meta(conv, meta.value()).map_err(|e| err(path, "corrupt", e))?;
        let turns_table = txn.open_table(TURNS).map_err(|e| err(path, "cannot read", e))?;
        Self::turns_of(&turns_table, layout, path, conv, meta).map(Some)
    }

    fn turns_of(
        turns_table: &redb::ReadOnlyTable<&[u8], &[u8]>,
        layout: Layout,
        path: &Path,
        conv: &str,
        meta: Meta,
    ) -> Result<Stored, StoreError> {
        let (start, end) = (layout.turn(conv, 0), layout.turn(conv, u64::MAX));
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
        Ok(Stored { state, replica: meta.replica })
    }

    /// Every conversation of `shard`, by one range scan of its meta rows.
    fn shard_blocking(
        db: &Database,
        layout: Layout,
        path: &Path,
        shard: u32,
    ) -> Result<Vec<(String, Stored)>, StoreError> {
        let txn = db.begin_read().map_err(|e| err(path, "cannot read", e))?;
        let meta_table = txn.open_table(META).map_err(|e| err(path, "cannot read", e))?;
        let turns_table = txn.open_table(TURNS).map_err(|e| err(path, "cannot read", e))?;
        let start = Layout::shard_prefix(shard);
        let mut out = Vec::new();
        for row in meta_table.range(start.as_slice()..).map_err(|e| err(path, "cannot read", e))? {
            let (key, value) = row.map_err(|e| err(path, "cannot read", e))?;
            if !key.value().starts_with(&start) {
                break;
            }
            let conv = Layout::conv_of_meta(key.value()).map_err(|e| err(path, "corrupt", e))?;
            let meta = decode_meta(&conv, value.value()).map_err(|e| err(path, "corrupt", e))?;
            let stored = Self::turns_of(&turns_table, layout, path, &conv, meta)?;
            out.push((conv, stored));
        }
        Ok(out)
    }
}

struct RedbEngine {
    db: Arc<Database>,
    layout: Layout,
}

impl Engine for RedbEngine {
    fn commit_group(
        &mut self,
        ops: Vec<(String, StoreOp)>,
        turns_kept_max: usize,
    ) -> Result<(Vec<Result<StoreAnswer, String>>, GroupTimes), String> {
        let mut clock = Stopwatch::start();
        let mut results = Vec::with_capacity(ops.len());
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            let mut turns = txn.open_table(TURNS).map_err(|e| e.to_string())?;
            for (conv, op) in ops {
                let meta_key = self.layout.meta(&conv);
                let stored = match meta.get(meta_key.as_slice()).map_err(|e| e.to_string())? {
                    Some(bytes) => match decode_meta(&conv, bytes.value()) {
                        Ok(m) => Some(m),
                        Err(e) => {
                            results.push(Err(e));
                            continue;
                        }
                    },
                    None => None,
                };
                let p = match plan(stored, op, turns_kept_max) {
                    Ok(p) => p,
                    Err(e) => {
                        results.push(Err(e));
                        continue;
                    }
                };
                let storage = |e: redb::StorageError| e.to_string();
                if p.clear_turns {
                    let (start, end) =
                        (self.layout.turn(&conv, 0), self.layout.turn(&conv, u64::MAX));
                    turns
                        .retain_in(start.as_slice()..=end.as_slice(), |_, _| false)
                        .map_err(storage)?;
                }
                for (turn, record) in &p.put_turns {
                    turns
                        .insert(self.layout.turn(&conv, *turn).as_slice(), record.as_slice())
                        .map_err(storage)?;
                }
                if let Some(turn) = p.remove_turn {
                    turns.remove(self.layout.turn(&conv, turn).as_slice()).map_err(storage)?;
                }
                if !p.meta.is_empty() {
                    meta.insert(meta_key.as_slice(), p.meta.as_slice()).map_err(storage)?;
                }
                results.push(Ok(p.answer.expect("a plan always answers")));
            }
        }
        clock.applied();
        txn.commit().map_err(|e| e.to_string())?;
        Ok((results, clock.times()))
    }
}

impl StateStore for RedbStore {
    fn load<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            let (db, path, conv) =
                (self.db.clone(), self.writer.path().to_path_buf(), conv.to_string());
            let layout = self.layout;
            tokio::task::spawn_blocking(move || RedbStore::load_blocking(&db, layout, &path, &conv))
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
        let (db, path, layout) = (self.db.clone(), self.writer.path().to_path_buf(), self.layout);
        load_shards_blocking(shards, bytes_max, move |s| {
            RedbStore::shard_blocking(&db, layout, &path, s)
        })
    }
}
