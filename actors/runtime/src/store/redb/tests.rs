use std::sync::Arc;

use botclaw_core::conversation::{ConversationState, TurnCommit};
use botclaw_core::replication::{Epoch, Version};

use super::*;

fn open(dir: &Path, kept: usize) -> RedbStore {
    RedbStore::open(dir, kept, 64, 128, ConversationMetrics::default()).unwrap()
}

/// A turn written by the epoch-zero owner (no replication in play).
fn write(commit: TurnCommit) -> StoreOp {
    let base = Version { epoch: Epoch::ZERO, turn: commit.record.turn - 1 };
    StoreOp::Write { epoch: Epoch::ZERO, base, commit }
}

async fn load(store: &RedbStore, conv: &str) -> Option<ConversationState> {
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
    let dir = tempfile::tempdir().unwrap();
    let mut expected = ConversationState::default();
    {
        let store = open(dir.path(), 4);
        assert!(load(&store, "c").await.is_none());
        for i in 0..10 {
            let c = commit(&expected, &format!("m{i}"));
            store.execute("c", write(c.clone())).await.unwrap();
            expected.apply(c, 4);
        }
    }
    let store = open(dir.path(), 4);
    let loaded = load(&store, "c").await.unwrap();
    assert_eq!(loaded, expected);
    assert_eq!(loaded.turns.len(), 4);
    assert_eq!(loaded.turn, 10);
}

#[tokio::test]
async fn a_write_that_skips_a_turn_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 8);
    let s = ConversationState::default();
    store.execute("a", write(commit(&s, "1"))).await.unwrap();
    let mut gap = commit(&s, "3");
    Arc::make_mut(&mut gap.record).turn = 3;
    let answer = store.execute("a", write(gap)).await.unwrap();
    assert!(matches!(answer, StoreAnswer::Behind { version } if version.turn == 1), "{answer:?}");
    store.execute("b", write(commit(&s, "1"))).await.unwrap();
    assert_eq!(load(&store, "a").await.unwrap().turn, 1);
}

#[tokio::test]
async fn concurrent_commits_share_groups() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = ConversationMetrics::default();
    let store = Arc::new(RedbStore::open(dir.path(), 8, 256, 1024, metrics.clone()).unwrap());
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
        "no grouping: {} groups",
        metrics.store_groups.get()
    );
    assert_eq!(load(&store, "conv-199").await.unwrap().turn, 5);
}

#[test]
fn corrupt_or_truncated_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    std::fs::write(&path, vec![0xA5u8; 64 * 1024]).unwrap();
    let err = RedbStore::open(dir.path(), 8, 8, 8, ConversationMetrics::default()).unwrap_err();
    assert!(err.0.contains(&path.display().to_string()), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = open(dir.path(), 8);
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
    let err = RedbStore::open(dir.path(), 8, 8, 8, ConversationMetrics::default()).unwrap_err();
    assert!(err.0.contains(&path.display().to_string()), "{err}");
}

#[tokio::test]
async fn fences_installs_and_stale_writes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let old = Epoch { term: 1, node: 1 };
    let new = Epoch { term: 2, node: 2 };
    let mut s = ConversationState::default();
    {
        let store = open(dir.path(), 4);
        for i in 0..6 {
            let c = commit(&s, &format!("m{i}"));
            let base = Version { epoch: if i == 0 { Epoch::ZERO } else { old }, turn: s.turn };
            let answer =
                store.execute("c", StoreOp::Write { epoch: old, base, commit: c.clone() }).await;
            assert!(matches!(answer, Ok(StoreAnswer::Done { .. })), "{answer:?}");
            s.apply(c, 4);
        }
        let fenced = store.execute("c", StoreOp::Fence { epoch: new }).await.unwrap();
        assert!(matches!(fenced, StoreAnswer::Done { replica } if replica.promised == new));
    }
    let store = open(dir.path(), 4);
    // The promise is durable: the old owner's next turn is refused after a restart.
    let c = commit(&s, "late");
    let base = Version { epoch: old, turn: 6 };
    let answer = store.execute("c", StoreOp::Write { epoch: old, base, commit: c }).await.unwrap();
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
    assert!(loaded.state.find("m5").is_none(), "old turns are gone");
}
