use std::sync::Arc;

use botclaw_core::conversation::ConversationState;

use super::*;

fn open(dir: &Path, kept: usize) -> RedbStore {
    RedbStore::open(dir, kept, 64, 128, ConversationMetrics::default()).unwrap()
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
        assert!(store.load("c").await.unwrap().is_none());
        for i in 0..10 {
            let c = commit(&expected, &format!("m{i}"));
            store.commit("c", c.clone()).await.unwrap();
            expected.apply(c, 4);
        }
    }
    let store = open(dir.path(), 4);
    let loaded = store.load("c").await.unwrap().unwrap();
    assert_eq!(loaded, expected);
    assert_eq!(loaded.turns.len(), 4);
    assert_eq!(loaded.turn, 10);
}

#[tokio::test]
async fn out_of_order_commit_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 8);
    let s = ConversationState::default();
    store.commit("a", commit(&s, "1")).await.unwrap();
    let err = store.commit("a", commit(&s, "1")).await.unwrap_err();
    assert!(err.0.contains("out of order"), "{err}");
    store.commit("b", commit(&s, "1")).await.unwrap();
    assert_eq!(store.load("a").await.unwrap().unwrap().turn, 1);
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
                store.commit(&format!("conv-{k}"), c.clone()).await.unwrap();
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
    assert_eq!(store.load("conv-199").await.unwrap().unwrap().turn, 5);
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
            store.commit("c", c.clone()).await.unwrap();
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
