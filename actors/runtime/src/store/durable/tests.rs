//! The durable stores, both engines: reopen keeps state and window, ordering rules,
//! group commit, durable promises and installs, and files that cannot be read.

use std::path::Path;
use std::sync::Arc;

use botclaw_core::conversation::{ConversationState, TurnCommit};
use botclaw_core::replication::{Epoch, Replica, Version};

use super::*;
use crate::store::fjall::{FjallStore, STATE_DIR};
use crate::store::redb::{RedbStore, STATE_FILE};
use crate::store::{StateStore, StoreAnswer, StoreOp};

#[derive(Debug, Clone, Copy)]
enum Kind {
    Redb,
    Fjall,
}

const KINDS: [Kind; 2] = [Kind::Redb, Kind::Fjall];

fn try_open(
    kind: Kind,
    dir: &Path,
    kept: usize,
    metrics: ConversationMetrics,
) -> Result<Arc<dyn StateStore>, StoreError> {
    Ok(match kind {
        Kind::Redb => Arc::new(RedbStore::open(dir, limits(kept), metrics)?),
        Kind::Fjall => Arc::new(FjallStore::open(dir, limits(kept), metrics)?),
    })
}

fn limits(turns_kept_max: usize) -> StoreLimits {
    StoreLimits {
        shard_count: 64,
        turns_kept_max,
        group_commit_max: 256,
        queue_max: 1024,
        meta_cache_bytes_max: 1 << 20,
    }
}

fn open(kind: Kind, dir: &Path, kept: usize) -> Arc<dyn StateStore> {
    try_open(kind, dir, kept, ConversationMetrics::default()).unwrap()
}

/// A turn written by the epoch-zero owner (no replication in play).
fn write(commit: TurnCommit) -> StoreOp {
    let base = Version { epoch: Epoch::ZERO, turn: commit.record.turn - 1 };
    StoreOp::Write { epoch: Epoch::ZERO, base, commit }
}

async fn load(store: &Arc<dyn StateStore>, conv: &str) -> Option<ConversationState> {
    store.load(conv).await.unwrap().map(|s| s.state)
}

fn commit(state: &ConversationState, id: &str) -> TurnCommit {
    state.next_commit(
        "echo",
        id.into(),
        format!("text {id}"),
        None,
        vec![format!("re {id}")],
        vec![7],
    )
}

#[tokio::test]
async fn commits_survive_reopen_and_keep_the_window() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let mut expected = ConversationState::default();
        {
            let store = open(kind, dir.path(), 4);
            assert!(load(&store, "c").await.is_none());
            for i in 0..10 {
                let c = commit(&expected, &format!("m{i}"));
                store.execute("c", write(c.clone())).await.unwrap();
                expected.apply(c, 4);
            }
        }
        let store = open(kind, dir.path(), 4);
        let loaded = load(&store, "c").await.unwrap();
        assert_eq!(loaded, expected);
        assert_eq!(loaded.turns.len(), 4, "{kind:?}");
        assert_eq!(loaded.turn, 10);
    }
}

#[tokio::test]
async fn a_write_that_skips_a_turn_is_refused_alone() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let store = open(kind, dir.path(), 8);
        let s = ConversationState::default();
        store.execute("a", write(commit(&s, "1"))).await.unwrap();
        let mut gap = commit(&s, "3");
        Arc::make_mut(&mut gap.record).turn = 3;
        let answer = store.execute("a", write(gap)).await.unwrap();
        assert!(
            matches!(answer, StoreAnswer::Behind { version } if version.turn == 1),
            "{answer:?}"
        );
        store.execute("b", write(commit(&s, "1"))).await.unwrap();
        assert_eq!(load(&store, "a").await.unwrap().turn, 1);
    }
}

#[tokio::test]
async fn concurrent_commits_share_groups() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let metrics = ConversationMetrics::default();
        let store = try_open(kind, dir.path(), 8, metrics.clone()).unwrap();
        let mut tasks = Vec::new();
        for k in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = ConversationState::default();
                for i in 0..5 {
                    let c = commit(&s, &format!("{i}"));
                    store.execute(&format!("conv-{k}"), write(c.clone())).await.unwrap();
                    s.apply(c, 8);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(metrics.store_commits.get(), 1000);
        assert!(
            metrics.store_groups.get() < 1000,
            "{kind:?}: no grouping: {} groups",
            metrics.store_groups.get()
        );
        assert_eq!(load(&store, "conv-199").await.unwrap().turn, 5);
    }
}

#[test]
fn corrupt_or_truncated_redb_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    std::fs::write(&path, vec![0xA5u8; 64 * 1024]).unwrap();
    let err = RedbStore::open(dir.path(), limits(8), ConversationMetrics::default()).unwrap_err();
    assert!(err.0.contains(&path.display().to_string()), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = open(Kind::Redb, dir.path(), 8);
        let mut s = ConversationState::default();
        for i in 0..50 {
            let c = commit(&s, &format!("{i}"));
            store.execute("c", write(c.clone())).await.unwrap();
            s.apply(c, 8);
        }
    });
    drop(rt);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 3).unwrap();
    let err = RedbStore::open(dir.path(), limits(8), ConversationMetrics::default()).unwrap_err();
    assert!(err.0.contains(&path.display().to_string()), "{err}");
}

#[tokio::test]
async fn fences_installs_and_stale_writes_survive_reopen() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let old = Epoch { term: 1, node: 1 };
        let new = Epoch { term: 2, node: 2 };
        let mut s = ConversationState::default();
        {
            let store = open(kind, dir.path(), 4);
            for i in 0..6 {
                let c = commit(&s, &format!("m{i}"));
                let base = Version { epoch: if i == 0 { Epoch::ZERO } else { old }, turn: s.turn };
                let answer = store
                    .execute("c", StoreOp::Write { epoch: old, base, commit: c.clone() })
                    .await;
                assert!(matches!(answer, Ok(StoreAnswer::Done { .. })), "{answer:?}");
                s.apply(c, 4);
            }
            let fenced = store.execute("c", StoreOp::Fence { epoch: new }).await.unwrap();
            assert!(matches!(fenced, StoreAnswer::Done { replica } if replica.promised == new));
        }
        let store = open(kind, dir.path(), 4);
        // The promise is durable: the old owner's next turn is refused after a restart.
        let c = commit(&s, "late");
        let base = Version { epoch: old, turn: 6 };
        let answer =
            store.execute("c", StoreOp::Write { epoch: old, base, commit: c }).await.unwrap();
        assert_eq!(answer, StoreAnswer::Stale { promised: new });
        // The new owner installs a shorter, different copy: it replaces the old one whole.
        let mut other = ConversationState::default();
        for i in 0..3 {
            let c = commit(&other, &format!("x{i}"));
            other.apply(c, 4);
        }
        let version = Version { epoch: new, turn: 3 };
        let installed = StoreOp::Install { epoch: new, state: other.clone(), version };
        store.execute("c", installed).await.unwrap();
        let loaded = store.load("c").await.unwrap().unwrap();
        assert_eq!(loaded.state, other);
        assert_eq!(loaded.replica.version, version);
        assert!(loaded.state.find("m5").is_none(), "{kind:?}: old turns are gone");
    }
}

/// Writes 50 turns of one conversation to a fresh fjall store in `dir` and closes it.
fn fjall_with_turns(dir: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = open(Kind::Fjall, dir, 8);
        let mut s = ConversationState::default();
        for i in 0..50 {
            let c = commit(&s, &format!("{i}"));
            store.execute("c", write(c.clone())).await.unwrap();
            s.apply(c, 8);
        }
    });
}

#[test]
fn unreadable_or_truncated_fjall_files_are_an_error_naming_the_directory() {
    let metrics = ConversationMetrics::default;
    let refused = |dir: &Path, what: &str| match try_open(Kind::Fjall, dir, 8, metrics()) {
        Err(err) => {
            let named = dir.join(STATE_DIR).display().to_string();
            assert!(err.0.contains(&named), "{what}: {err}");
            err.0
        }
        Ok(_) => panic!("{what} was accepted"),
    };
    // A junk file where fjall's format version belongs.
    let dir = tempfile::tempdir().unwrap();
    fjall_with_turns(dir.path());
    std::fs::write(dir.path().join(STATE_DIR).join("version"), [0xA5u8; 4]).unwrap();
    refused(dir.path(), "a junk version file");
    // A journal overwritten with junk: fjall alone would recover an empty store.
    let dir = tempfile::tempdir().unwrap();
    fjall_with_turns(dir.path());
    let journal = path_of_journal(&dir.path().join(STATE_DIR));
    let len = std::fs::metadata(&journal).unwrap().len();
    std::fs::write(&journal, vec![0x5Au8; len as usize]).unwrap();
    let message = refused(dir.path(), "a junk journal");
    assert!(message.contains("lost committed writes"), "{message}");
    // A journal cut short.
    let dir = tempfile::tempdir().unwrap();
    fjall_with_turns(dir.path());
    let journal = path_of_journal(&dir.path().join(STATE_DIR));
    let used = std::fs::read(&journal).unwrap().iter().rposition(|b| *b != 0).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&journal).unwrap();
    f.set_len(used as u64 / 2).unwrap();
    drop(f);
    refused(dir.path(), "a truncated journal");
    // The files themselves are left for the operator to inspect.
    assert!(journal.exists());
    // And an intact store reopens with everything.
    let dir = tempfile::tempdir().unwrap();
    fjall_with_turns(dir.path());
    let store = open(Kind::Fjall, dir.path(), 8);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(load(&store, "c")).unwrap().turn, 50);
}

fn path_of_journal(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "jnl"))
        .expect("a journal file")
}

#[tokio::test]
async fn pipelined_writes_and_an_install_of_one_conversation_share_a_group() {
    for kind in KINDS {
        let dir = tempfile::tempdir().unwrap();
        let store = open(kind, dir.path(), 4);
        let old = Epoch { term: 1, node: 1 };
        let new = Epoch { term: 2, node: 2 };
        let mut s = ConversationState::default();
        let mut tickets = Vec::new();
        // Six writes queued without waiting: each must see the one before it.
        for i in 0..6 {
            let c = commit(&s, &format!("m{i}"));
            let base = Version { epoch: if i == 0 { Epoch::ZERO } else { old }, turn: s.turn };
            let op = StoreOp::Write { epoch: old, base, commit: c.clone() };
            tickets.push(store.submit("c", op).await.unwrap());
            s.apply(c, 4);
        }
        // Then, in the same queue, a newer owner's copy and a write on top of it.
        let mut other = ConversationState::default();
        for i in 0..2 {
            let c = commit(&other, &format!("x{i}"));
            other.apply(c, 4);
        }
        let version = Version { epoch: new, turn: 2 };
        let op = StoreOp::Install { epoch: new, state: other.clone(), version };
        tickets.push(store.submit("c", op).await.unwrap());
        let c = commit(&other, "x2");
        let op = StoreOp::Write { epoch: new, base: version, commit: c.clone() };
        tickets.push(store.submit("c", op).await.unwrap());
        other.apply(c, 4);
        for t in tickets {
            assert!(matches!(t.await.unwrap(), StoreAnswer::Done { .. }), "{kind:?}");
        }
        let loaded = store.load("c").await.unwrap().unwrap();
        assert_eq!(loaded.state, other, "{kind:?}");
        assert_eq!(loaded.replica.version, Version { epoch: new, turn: 3 });
        drop(store);
        let reopened = open(kind, dir.path(), 4);
        assert_eq!(reopened.load("c").await.unwrap().unwrap().state, other, "{kind:?}");
    }
}

#[tokio::test]
async fn a_shard_loads_in_one_scan_with_exactly_its_conversations() {
    use botclaw_core::placement::shard_of;
    let memory: Arc<dyn StateStore> = Arc::new(crate::store::MemoryStore::new(8, 64));
    let dir = tempfile::tempdir().unwrap();
    let dirs = [dir.path().join("redb"), dir.path().join("fjall")];
    dirs.iter().for_each(|d| std::fs::create_dir_all(d).unwrap());
    let mut stores: Vec<Arc<dyn StateStore>> =
        KINDS.iter().zip(&dirs).map(|(k, d)| open(*k, d, 8)).collect();
    stores.push(memory);
    // 200 conversations over 64 shards: some shards hold several, with different turns.
    let convs: Vec<String> = (0..200).map(|i| format!("conv-{i}")).collect();
    let target = shard_of(&convs[0], 64);
    let mut expected: std::collections::BTreeMap<String, ConversationState> = Default::default();
    for store in &stores {
        for (i, conv) in convs.iter().enumerate() {
            let mut state = ConversationState::default();
            for t in 0..(1 + i % 3) {
                let c = commit(&state, &format!("{conv}-{t}"));
                store.execute(conv, write(c.clone())).await.unwrap();
                state.apply(c, 8);
            }
            if shard_of(conv, 64) == target {
                expected.insert(conv.clone(), state);
            }
        }
    }
    assert!(expected.len() >= 2, "the test needs a shard with several conversations");
    for store in &stores {
        let got: std::collections::BTreeMap<String, ConversationState> = store
            .load_shard(target)
            .await
            .unwrap()
            .into_iter()
            .map(|(conv, stored)| (conv, stored.state))
            .collect();
        assert_eq!(got, expected);
        // Every shard at once, in batches of at most ~1 KiB of rows: each batch is a
        // prefix of the shards asked for, each shard read once, with exactly its rows.
        let mut rest: Vec<u32> = (0..64).rev().collect();
        let (mut seen, mut batches) = (std::collections::BTreeMap::new(), 0);
        while !rest.is_empty() {
            let loaded = store.load_shards(rest.clone(), 1024).await.unwrap();
            assert!(!loaded.is_empty() && loaded.len() <= rest.len());
            let asked: Vec<u32> = rest.drain(..loaded.len()).collect();
            assert_eq!(loaded.iter().map(|(s, _)| *s).collect::<Vec<_>>(), asked);
            let bytes: Vec<usize> = loaded
                .into_iter()
                .map(|(shard, rows)| {
                    let rows = rows.unwrap();
                    let size = rows.iter().map(|(c, s)| crate::store::row_bytes(c, s)).sum();
                    for (conv, stored) in rows {
                        assert_eq!(shard_of(&conv, 64), shard);
                        assert!(seen.insert(conv, stored.state).is_none(), "a row twice");
                    }
                    size
                })
                .collect();
            // The bound: a batch stops at the first shard that reaches it.
            let before_last: usize = bytes[..bytes.len() - 1].iter().sum();
            assert!(before_last < 1024, "a batch went on past its bound: {bytes:?}");
            batches += 1;
        }
        assert_eq!(seen.len(), convs.len(), "every conversation streamed");
        assert!(batches > 1, "the bound never stopped a batch");
    }
}

#[test]
fn a_directory_of_the_per_conversation_layout_is_refused_with_a_clear_message() {
    // fjall: the old layout's `meta` keyspace.
    let dir = tempfile::tempdir().unwrap();
    {
        let db = ::fjall::Database::builder(dir.path().join(STATE_DIR)).open().unwrap();
        let meta = db.keyspace("meta", ::fjall::KeyspaceCreateOptions::default).unwrap();
        meta.insert("conv", b"x").unwrap();
        db.persist(::fjall::PersistMode::SyncAll).unwrap();
    }
    let e = try_open(Kind::Fjall, dir.path(), 8, ConversationMetrics::default()).err().unwrap();
    assert!(e.to_string().contains("layout before rows were grouped by shard"), "{e}");
    assert!(e.to_string().contains(STATE_DIR), "names the directory: {e}");
    // redb: the old layout's `conversation_meta` table.
    let dir = tempfile::tempdir().unwrap();
    {
        let db = ::redb::Database::create(dir.path().join(STATE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: ::redb::TableDefinition<&str, &[u8]> =
                ::redb::TableDefinition::new("conversation_meta");
            txn.open_table(def).unwrap().insert("conv", b"x".as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let e = try_open(Kind::Redb, dir.path(), 8, ConversationMetrics::default()).err().unwrap();
    assert!(e.to_string().contains("layout before rows were grouped by shard"), "{e}");
    assert!(e.to_string().contains(STATE_FILE), "names the file: {e}");
    // A store of the current layout reopens.
    let dir = tempfile::tempdir().unwrap();
    for kind in KINDS {
        drop(open(kind, dir.path(), 8));
        drop(open(kind, dir.path(), 8));
    }
}

/// An engine whose commits fail while `failing` is set (a full disk).
struct FlakyEngine {
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl Engine for FlakyEngine {
    fn commit_group(
        &mut self,
        ops: Vec<(String, StoreOp)>,
        _turns_kept_max: usize,
    ) -> Result<(Vec<Result<StoreAnswer, String>>, GroupTimes), String> {
        if self.failing.load(std::sync::atomic::Ordering::Acquire) {
            return Err("No space left on device (os error 28)".into());
        }
        let done = StoreAnswer::Done { replica: Default::default() };
        Ok((ops.iter().map(|_| Ok(done)).collect(), GroupTimes::default()))
    }
}

#[tokio::test]
async fn a_failed_commit_makes_the_store_unwritable_until_one_succeeds() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let engine = FlakyEngine { failing: failing.clone() };
    let metrics = ConversationMetrics::default();
    let writer = Writer::start(engine, "flaky".into(), limits(8), metrics.clone()).unwrap();
    let op = || StoreOp::Fence { epoch: Epoch::ZERO };
    assert!(writer.submit("c", op()).await.unwrap().await.is_ok());
    assert!(writer.writable());
    failing.store(true, std::sync::atomic::Ordering::Release);
    let e = writer.submit("c", op()).await.unwrap().await.unwrap_err();
    assert!(e.0.contains("No space left"), "{e}");
    assert!(!writer.writable(), "a failed commit must show");
    assert_eq!(metrics.store_commit_failures.get(), 1);
    // Space returns: the next commit succeeds and the store is writable again.
    failing.store(false, std::sync::atomic::Ordering::Release);
    assert!(writer.submit("c", op()).await.unwrap().await.is_ok());
    assert!(writer.writable());
}

/// Runs a seeded mix of ops over a few conversations, several submitted at once (so they
/// share groups): turns by the owner of the newest promise, chained within a group;
/// writes by older epochs; fences; writes that skip a turn; installs. Returns every
/// answer and what each conversation holds at the end.
async fn churn(store: &Arc<dyn StateStore>, seed: u64) -> (Vec<String>, Vec<String>) {
    let convs = ["a", "b", "c", "d", "e"];
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut next = move |n: u64| rng.random_range(0..n);
    let mut answers = Vec::new();
    for round in 0..120 {
        // What each conversation holds now, as the ops of this round build on it.
        let mut now = Vec::new();
        for conv in convs {
            let stored = store.load(conv).await.unwrap();
            now.push(stored.map(|s| (s.state, s.replica)).unwrap_or_default());
        }
        let mut tickets = Vec::new();
        for _ in 0..1 + next(8) {
            let i = next(convs.len() as u64) as usize;
            let (state, replica) = &mut now[i];
            let writer = replica.promised.max(replica.version.epoch);
            let op = match next(10) {
                0..=4 => {
                    let c = commit(state, &format!("r{round}-{}", state.turn));
                    let op =
                        StoreOp::Write { epoch: writer, base: replica.version, commit: c.clone() };
                    state.apply(c, 4);
                    replica.version = Version { epoch: writer, turn: state.turn };
                    replica.promised = writer;
                    op
                }
                5 => {
                    let older = Epoch { term: writer.term.saturating_sub(1), node: 0 };
                    let c = commit(state, "late");
                    StoreOp::Write { epoch: older, base: replica.version, commit: c }
                }
                6 => {
                    let epoch = Epoch { term: writer.term + 1, node: next(3) };
                    replica.promised = epoch;
                    StoreOp::Fence { epoch }
                }
                7 => {
                    let c = commit(state, "skip");
                    let base = Version { epoch: writer, turn: replica.version.turn + 1 };
                    StoreOp::Write { epoch: writer, base, commit: c }
                }
                _ => {
                    let epoch = Epoch { term: writer.term + 1, node: 1 };
                    let mut copy = state.clone();
                    let c = commit(&copy, &format!("i{round}"));
                    copy.apply(c, 4);
                    let version = Version { epoch, turn: copy.turn };
                    (*state, *replica) = (copy.clone(), Replica { version, promised: epoch });
                    StoreOp::Install { epoch, state: copy, version }
                }
            };
            tickets.push((convs[i], store.submit(convs[i], op).await.unwrap()));
        }
        for (conv, ticket) in tickets {
            answers.push(format!("{conv}: {:?}", ticket.await));
        }
    }
    let mut held = Vec::new();
    for conv in convs {
        let stored = store.load(conv).await.unwrap();
        held.push(format!("{:?}", stored.map(|s| (s.state, s.replica))));
    }
    (answers, held)
}

/// The fjall writer's cache of meta rows changes no answer and no stored byte: the same
/// ops in the same groups get the same answers, and leave the same state, with the cache
/// off, with one so small it evicts all the time, and with a large one.
#[tokio::test]
async fn the_fjall_meta_cache_changes_no_answer() {
    let mut runs = Vec::new();
    for cache in [0, 300, 1 << 20] {
        let dir = tempfile::tempdir().unwrap();
        let limits = StoreLimits { meta_cache_bytes_max: cache, ..limits(4) };
        let store: Arc<dyn StateStore> =
            Arc::new(FjallStore::open(dir.path(), limits, ConversationMetrics::default()).unwrap());
        runs.push(churn(&store, 7).await);
    }
    let answers = &runs[0].0;
    // The mix exercises every answer: done, refused as stale, refused as behind.
    for kind in ["Done", "Stale", "Behind"] {
        assert!(answers.iter().any(|a| a.contains(kind)), "no {kind} among {answers:#?}");
    }
    assert_eq!(runs[0], runs[1], "a cache that evicts all the time");
    assert_eq!(runs[0], runs[2], "a large cache");
}
