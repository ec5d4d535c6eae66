//! The conversation actor against a store whose durability the test controls: replies wait
//! for durability, retries of a pending turn too, and a refused commit fails what waits and
//! restarts the conversation from the store.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use botclaw_config::{BackendConfig, ConversationConfig};
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::replicator::{Alone, Replicator};
use crate::store::{
    BoxFuture, LoadedShards, MemoryStore, StateStore, StoreError, StoreOp, StoreTicket, Stored,
};

/// Applies ops to a memory store at once, but resolves the tickets of turn writes only when
/// the test says so (in order), with the outcome the test chooses.
struct GatedStore {
    inner: MemoryStore,
    gates: Mutex<Vec<oneshot::Sender<Result<(), StoreError>>>>,
}

impl GatedStore {
    fn release(&self, outcome: Result<(), StoreError>) -> bool {
        let mut gates = self.gates.lock().unwrap();
        if gates.is_empty() {
            return false;
        }
        let _ = gates.remove(0).send(outcome);
        true
    }
}

impl StateStore for GatedStore {
    fn load<'a>(&'a self, conv: &'a str) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        self.inner.load(conv)
    }

    fn submit<'a>(
        &'a self,
        conv: &'a str,
        op: StoreOp,
    ) -> BoxFuture<'a, Result<StoreTicket, StoreError>> {
        Box::pin(async move {
            if !matches!(op, StoreOp::Write { .. }) {
                return self.inner.submit(conv, op).await;
            }
            let (tx, rx) = oneshot::channel();
            self.gates.lock().unwrap().push(tx);
            let applied = self.inner.execute(conv, op).await;
            let ticket: StoreTicket = Box::pin(async move {
                let answer = applied?;
                rx.await.map_err(|_| StoreError("gate dropped".into()))??;
                Ok(answer)
            });
            Ok(ticket)
        })
    }

    fn load_shards(
        &self,
        shards: Vec<u32>,
        bytes_max: usize,
    ) -> BoxFuture<'_, Result<LoadedShards, StoreError>> {
        self.inner.load_shards(shards, bytes_max)
    }
}

async fn host(store: Arc<GatedStore>) -> ConversationHost {
    let metrics = ConversationMetrics::default();
    let backends = Backends::new(&BackendConfig::default(), metrics.clone());
    let cfg = ConversationConfig::default();
    let replicator = Replicator::start(store, Arc::new(Alone("n".into())), 1, 64, metrics.clone());
    let bots = crate::bots::builtin(true);
    ConversationHost::start("n".into(), &cfg, replicator, 100, bots, backends, metrics)
        .await
        .unwrap()
}

fn say(host: &ConversationHost, id: &str, out: &mpsc::UnboundedSender<(String, ConvOutcome)>) {
    let (out, tag) = (out.clone(), id.to_string());
    let request = ConvRequest::Say { id: id.into(), text: format!("t{id}"), bot: None, user: None };
    host.dispatch("c", request, Reply::new(move |o| drop(out.send((tag, o)))));
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, ConvOutcome)>) -> (String, ConvOutcome) {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("no answer").unwrap()
}

async fn silent(rx: &mut mpsc::UnboundedReceiver<(String, ConvOutcome)>) {
    assert!(
        tokio::time::timeout(Duration::from_millis(150), rx.recv()).await.is_err(),
        "answered early"
    );
}

fn turn_of(o: &ConvOutcome) -> u64 {
    match o {
        ConvOutcome::Reply { turn, .. } => *turn,
        other => panic!("not a reply: {other:?}"),
    }
}

#[tokio::test]
async fn replies_wait_for_durability_and_retries_too() {
    let store = Arc::new(GatedStore { inner: MemoryStore::new(64, 1024), gates: Mutex::default() });
    let host = host(store.clone()).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    say(&host, "1", &tx);
    say(&host, "2", &tx);
    say(&host, "1", &tx); // a retry of turn 1 while it is not durable
    silent(&mut rx).await;
    // Both turns ran (the second did not wait for the first's durability)...
    let pending = tokio::time::timeout(Duration::from_secs(5), async {
        while store.gates.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(pending.is_ok(), "the second turn waited for the first commit");
    // ...and turn 1 becoming durable releases its reply and the retry's, not turn 2's.
    assert!(store.release(Ok(())));
    let a = next(&mut rx).await;
    let b = next(&mut rx).await;
    assert_eq!((a.0.as_str(), turn_of(&a.1)), ("1", 1));
    assert_eq!((b.0.as_str(), turn_of(&b.1)), ("1", 1));
    silent(&mut rx).await;
    assert!(store.release(Ok(())));
    let c = next(&mut rx).await;
    assert_eq!((c.0.as_str(), turn_of(&c.1)), ("2", 2));
}

#[tokio::test]
async fn a_refused_commit_fails_what_waits_and_restarts_from_the_store() {
    let store = Arc::new(GatedStore { inner: MemoryStore::new(64, 1024), gates: Mutex::default() });
    let host = host(store.clone()).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    say(&host, "1", &tx);
    while !store.release(Ok(())) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(turn_of(&next(&mut rx).await.1), 1);
    say(&host, "2", &tx);
    while !store.release(Err(StoreError("disk on fire".into()))) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match next(&mut rx).await.1 {
        // Nothing was acknowledged: retryable, with the same id.
        ConvOutcome::Failed { kind: FailKind::Unavailable, message, .. } => {
            assert!(message.contains("disk on fire"), "{message}")
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    // The memory store did apply turn 2 before the ticket failed; the restarted
    // conversation reloads what the store holds and continues from there.
    say(&host, "3", &tx);
    while !store.release(Ok(())) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(turn_of(&next(&mut rx).await.1), 3);
}

/// Ownership moves while turn 1 waits for durability: turn 1 is still answered (it is
/// durable before the actor lets go), requests that arrive meanwhile run nowhere here and
/// are passed on, in order, to the node's routing; none is answered `unavailable`.
#[tokio::test]
async fn a_relinquished_conversation_finishes_its_turn_and_passes_the_rest_on() {
    let store = Arc::new(GatedStore { inner: MemoryStore::new(64, 1024), gates: Mutex::default() });
    let host = host(store.clone()).await;
    let passed = Arc::new(Mutex::new(Vec::new()));
    let sink = passed.clone();
    let redirect: Redirect = Box::new(move |conv, request, reply| {
        if let ConvRequest::Say { id, .. } = request {
            sink.lock().unwrap().push((conv.to_string(), id));
        }
        reply.send(ConvOutcome::failed(FailKind::Busy, "passed on"));
    });
    assert!(host.shared().redirect.set(redirect).is_ok());
    let (tx, mut rx) = mpsc::unbounded_channel();
    say(&host, "1", &tx);
    while store.gates.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(host.relinquish(|_| false), 1);
    say(&host, "2", &tx);
    say(&host, "3", &tx);
    silent(&mut rx).await;
    assert!(passed.lock().unwrap().is_empty(), "passed on before turn 1 was durable");
    assert!(store.release(Ok(())));
    let first = next(&mut rx).await;
    assert_eq!((first.0.as_str(), turn_of(&first.1)), ("1", 1));
    for want in ["2", "3"] {
        let (id, outcome) = next(&mut rx).await;
        assert_eq!(id, want);
        assert!(matches!(outcome, ConvOutcome::Failed { kind: FailKind::Busy, .. }), "{outcome:?}");
    }
    let passed = passed.lock().unwrap().clone();
    assert_eq!(
        passed,
        vec![("c".to_string(), "2".to_string()), ("c".to_string(), "3".to_string())]
    );
    // Nothing of turns 2 and 3 ran here.
    assert!(store.gates.lock().unwrap().is_empty());
    assert_eq!(host.active(), 0);
}
