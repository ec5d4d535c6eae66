//! Two replicators over an in-process network whose routes the test sets: quorum writes,
//! failover to the replica, fencing of a stale owner, and the stale owner catching up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use botclaw_core::conversation::ConversationState;

use tokio::sync::oneshot;

use super::*;
use crate::store::MemoryStore;

/// The network: each node's replicator, and each node's view of the conversation's route.
#[derive(Default)]
struct Net {
    nodes: Mutex<HashMap<String, Arc<Replicator>>>,
    routes: Mutex<HashMap<String, Vec<&'static str>>>,
}

struct NetPeers {
    me: Arc<str>,
    net: Arc<Net>,
}

impl Peers for NetPeers {
    fn me(&self) -> &str {
        &self.me
    }

    fn route(&self, _conv: &str) -> Route {
        let routes = self.net.routes.lock().unwrap();
        let list = routes[&*self.me].iter().map(|n| Arc::from(*n)).collect();
        Route { list, serving: true }
    }

    fn send(
        &self,
        peer: &str,
        conv: &str,
        op: StoreOp,
    ) -> BoxFuture<'static, Result<ReplicaAnswer, String>> {
        let target = self.net.nodes.lock().unwrap().get(peer).cloned();
        let (tx, rx) = oneshot::channel();
        match target {
            Some(r) => r.serve(conv.to_string(), op, move |a| drop(tx.send(a))),
            None => drop(tx),
        }
        Box::pin(async move {
            match rx.await {
                Ok(answer) => answer.map_err(|e| e.to_string()),
                Err(_) => Err("unreachable".into()),
            }
        })
    }
}

fn node(net: &Arc<Net>, name: &'static str, route: Vec<&'static str>) -> Arc<Replicator> {
    let peers = NetPeers { me: Arc::from(name), net: net.clone() };
    let store = Arc::new(MemoryStore::new(64, 1024));
    let r = Replicator::start(store, Arc::new(peers), 2, 64, ConversationMetrics::default());
    net.nodes.lock().unwrap().insert(name.into(), r.clone());
    net.routes.lock().unwrap().insert(name.into(), route);
    r
}

fn set_route(net: &Net, name: &str, route: Vec<&'static str>) {
    net.routes.lock().unwrap().insert(name.into(), route);
}

/// Runs one turn of the echo kind on an owned conversation.
async fn turn(r: &Replicator, owned: &mut Owned, id: &str) -> Result<(), Refusal> {
    let commit =
        owned.state.next_commit("echo", id.into(), id.into(), None, vec![id.into()], vec![]);
    let ticket = r.submit("c", owned.epoch, owned.version, commit.clone()).await?;
    owned.state.apply(commit, 64);
    owned.version = Version { epoch: owned.epoch, turn: owned.state.turn };
    ticket.await
}

async fn stored(r: &Replicator) -> Stored {
    r.store.load("c").await.unwrap().unwrap_or_default()
}

fn ids(state: &ConversationState) -> Vec<String> {
    state.turns.iter().map(|t| t.id.clone()).collect()
}

#[tokio::test]
async fn writes_reach_the_replica_and_failover_continues_from_it() {
    let net = Arc::new(Net::default());
    let a = node(&net, "a", vec!["a", "b"]);
    let b = node(&net, "b", vec!["a", "b"]);
    let mut owned = a.acquire("c").await.unwrap();
    turn(&a, &mut owned, "1").await.unwrap();
    turn(&a, &mut owned, "2").await.unwrap();
    // Acknowledged means on both.
    assert_eq!(ids(&stored(&b).await.state), vec!["1", "2"]);
    // b does not own the conversation while a does.
    assert!(b.acquire("c").await.is_err());
    // a dies; b takes over from its copy and goes on with turn 3.
    net.nodes.lock().unwrap().remove("a");
    set_route(&net, "b", vec!["b"]);
    let mut taken = b.acquire("c").await.unwrap();
    assert!(taken.epoch > owned.epoch);
    assert_eq!(ids(&taken.state), vec!["1", "2"]);
    turn(&b, &mut taken, "3").await.unwrap();
    assert_eq!(stored(&b).await.replica.version, Version { epoch: taken.epoch, turn: 3 });
}

#[tokio::test]
async fn a_stale_owner_is_fenced_and_catches_up_without_overwriting() {
    let net = Arc::new(Net::default());
    let a = node(&net, "a", vec!["a", "b"]);
    let b = node(&net, "b", vec!["a", "b"]);
    let mut old = a.acquire("c").await.unwrap();
    turn(&a, &mut old, "1").await.unwrap();
    // a freezes; b thinks a is down and owns the conversation alone.
    set_route(&net, "b", vec!["b"]);
    let mut new = b.acquire("c").await.unwrap();
    turn(&b, &mut new, "2-by-b").await.unwrap();
    // a resumes and still believes it owns the conversation: its turn is refused by b.
    let refused = turn(&a, &mut old, "2-by-a").await.unwrap_err();
    assert_eq!(refused.kind, FailKind::Unavailable);
    assert!(refused.message.contains("ownership moved"), "{refused}");
    // a's own copy took the refused turn (nobody acknowledged it): it diverges, for now.
    assert_eq!(ids(&stored(&a).await.state), vec!["1", "2-by-a"]);
    assert_eq!(ids(&stored(&b).await.state), vec!["1", "2-by-b"]);
    // a rejoins and owns the conversation again: it fences both with a newer epoch, takes
    // b's copy (newer epoch beats its own higher-or-equal turn) and installs it on itself.
    set_route(&net, "b", vec!["a", "b"]);
    let mut back = a.acquire("c").await.unwrap();
    assert!(back.epoch > new.epoch);
    assert_eq!(ids(&back.state), vec!["1", "2-by-b"]);
    assert_eq!(ids(&stored(&a).await.state), vec!["1", "2-by-b"]);
    turn(&a, &mut back, "3").await.unwrap();
    assert_eq!(ids(&stored(&b).await.state), vec!["1", "2-by-b", "3"]);
    // And b's now-stale actor can no longer write anywhere.
    set_route(&net, "b", vec!["b"]);
    assert!(turn(&b, &mut new, "late").await.is_err());
}

#[tokio::test]
async fn a_replica_that_missed_turns_gets_a_copy_installed() {
    let net = Arc::new(Net::default());
    let a = node(&net, "a", vec!["a"]);
    let b = node(&net, "b", vec!["b", "a"]);
    let mut owned = a.acquire("c").await.unwrap();
    for i in 0..5 {
        turn(&a, &mut owned, &format!("{i}")).await.unwrap();
    }
    assert_eq!(stored(&b).await.state.turn, 0, "b was not on the list");
    // b joins the list: the next write finds it behind and installs the whole copy.
    set_route(&net, "a", vec!["a", "b"]);
    turn(&a, &mut owned, "5").await.unwrap();
    let on_b = stored(&b).await;
    assert_eq!(ids(&on_b.state), vec!["0", "1", "2", "3", "4", "5"]);
    assert_eq!(on_b.replica.version, owned.version);
}

#[tokio::test]
async fn no_quorum_no_ownership_and_no_acknowledgement() {
    let net = Arc::new(Net::default());
    let a = node(&net, "a", vec!["a", "ghost"]);
    let refused = a.acquire("c").await.unwrap_err();
    assert!(refused.message.contains("replicas needed"), "{refused}");
    set_route(&net, "a", vec!["a"]);
    let mut owned = a.acquire("c").await.unwrap();
    set_route(&net, "a", vec!["a", "ghost"]);
    let refused = turn(&a, &mut owned, "1").await.unwrap_err();
    assert!(refused.message.contains("reached 0 of the 1 replicas needed"), "{refused}");
}
