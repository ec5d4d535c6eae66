//! Batched cross-node requests and answers, carried by the router actors.
//!
//! A forwarded request used to be one ractor_cluster RPC: a frame and a write each way,
//! per turn. Here each node keeps, per peer, one outbound queue of requests and one of
//! answers; a task per queue sends whatever has accumulated as one `RouterMessage`
//! (bounded in items and bytes), so under load one frame carries many turns, and a lone
//! request still leaves at once. One queue per peer keeps requests in order.
//!
//! Requests wait in `pending` (by a node-local id) for their answer; they are answered
//! `timeout` after `timeout`, and `unavailable` at once when the peer is declared down
//! or has no link: in both cases the outcome is unknown and a client may retry with the
//! same id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::envelope::{ConvOutcome, Envelope, FailKind, Reply};
use crate::router::{remote_router, RouterMessage};

/// Most items in one batch.
pub const BATCH_ITEMS_MAX: usize = 512;
/// Batches stop growing past this many (estimated) bytes; well under the link frame limit.
pub const BATCH_BYTES_MAX: usize = 1 << 20;
/// How often pending requests are checked for their deadline.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// A batch as it crosses the link: who sent it, and the items in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct Batch<T> {
    pub from: String,
    pub items: Vec<(u64, T)>,
}

impl<T: Serialize + DeserializeOwned> Batch<T> {
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("batches always encode")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// Rough encoded size of an item, to bound batches in bytes.
pub trait Weight {
    fn weight(&self) -> usize;
}

impl Weight for Envelope {
    fn weight(&self) -> usize {
        64 + self.conv.len() + self.request.weight()
    }
}

impl Weight for crate::envelope::ConvRequest {
    fn weight(&self) -> usize {
        match self {
            crate::envelope::ConvRequest::Say { id, text, bot, user } => {
                id.len()
                    + text.len()
                    + bot.as_ref().map_or(0, String::len)
                    + user.as_ref().map_or(0, String::len)
            }
            crate::envelope::ConvRequest::History { .. } => 8,
            crate::envelope::ConvRequest::Replica(op) => op_weight(op),
            crate::envelope::ConvRequest::Module(request) => request.weight(),
        }
    }
}

impl Weight for ConvOutcome {
    fn weight(&self) -> usize {
        64 + match self {
            ConvOutcome::Reply { messages, .. } => messages.iter().map(String::len).sum(),
            ConvOutcome::History { turns, .. } => turns.iter().map(record_weight).sum(),
            ConvOutcome::Failed { message, .. } => message.len(),
            ConvOutcome::Replica(answer) => {
                answer.stored.as_ref().map_or(0, |s| state_weight(&s.state))
            }
            ConvOutcome::Module(answer) => answer.weight(),
        }
    }
}

fn state_weight(state: &botclaw_core::conversation::ConversationState) -> usize {
    64 + state.bot_state.len() + state.turns.iter().map(|t| record_weight(t)).sum::<usize>()
}

fn record_weight(t: &botclaw_core::conversation::TurnRecord) -> usize {
    32 + t.id.len() + t.text.len() + t.messages.iter().map(String::len).sum::<usize>()
}

fn op_weight(op: &crate::store::StoreOp) -> usize {
    match op {
        crate::store::StoreOp::Fence { .. } => 32,
        crate::store::StoreOp::Write { commit, .. } => {
            64 + commit.bot_state.len() + record_weight(&commit.record)
        }
        crate::store::StoreOp::Install { state, .. } => state_weight(state),
    }
}

type Item<T> = (u64, T);
/// What to do with items of a batch that could not be sent.
type Undeliverable<T> = Arc<dyn Fn(&str, Vec<Item<T>>) + Send + Sync>;

/// One outbound queue per peer, each drained by its own task into batches.
struct Pipes<T> {
    me: Arc<str>,
    queues: Mutex<HashMap<Arc<str>, mpsc::UnboundedSender<Item<T>>>>,
    wrap: fn(Vec<u8>) -> RouterMessage,
    on_undeliverable: Undeliverable<T>,
}

impl<T: Serialize + DeserializeOwned + Weight + Send + 'static> Pipes<T> {
    fn send(&self, peer: &str, id: u64, item: T) {
        let mut queues = self.queues.lock().expect("pipes lock");
        let tx = queues.entry(Arc::from(peer)).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(drain(
                Arc::from(peer),
                self.me.clone(),
                rx,
                self.wrap,
                self.on_undeliverable.clone(),
            ));
            tx
        });
        if let Err(mpsc::error::SendError((id, item))) = tx.send((id, item)) {
            queues.remove(peer);
            drop(queues);
            (self.on_undeliverable)(peer, vec![(id, item)]);
        }
    }
}

async fn drain<T: Serialize + DeserializeOwned + Weight>(
    peer: Arc<str>,
    me: Arc<str>,
    mut rx: mpsc::UnboundedReceiver<Item<T>>,
    wrap: fn(Vec<u8>) -> RouterMessage,
    on_undeliverable: Undeliverable<T>,
) {
    while let Some(first) = rx.recv().await {
        let mut bytes = first.1.weight();
        let mut items = vec![first];
        while items.len() < BATCH_ITEMS_MAX && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(item) => {
                    bytes += item.1.weight();
                    items.push(item);
                }
                Err(_) => break,
            }
        }
        let Some(router) = remote_router(&peer) else {
            on_undeliverable(&peer, items);
            continue;
        };
        let batch = Batch { from: me.to_string(), items };
        if let Err(e) = router.cast(wrap(batch.to_bytes())) {
            tracing::debug!(%peer, error = %e, "batch not sent");
            on_undeliverable(&peer, batch.items);
        }
    }
}

struct Pending {
    peer: Arc<str>,
    reply: Reply,
    deadline: Instant,
}

/// Forwarded requests of this node (as a gateway) and answers it owes peers (as an owner).
pub struct Forwarder {
    next_id: AtomicU64,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    requests: Pipes<Envelope>,
    answers: Pipes<ConvOutcome>,
    timeout: Duration,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").field("pending", &self.pending_len()).finish()
    }
}

fn unavailable(message: String) -> ConvOutcome {
    ConvOutcome::Failed { kind: FailKind::Unavailable, message, retry_after_ms: Some(100) }
}

impl Forwarder {
    /// `me` is this node's name (peers address answers to it); `timeout` bounds how long a
    /// forwarded request waits for its answer.
    pub fn start(me: &str, timeout: Duration) -> Arc<Forwarder> {
        let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::default();
        let failed = pending.clone();
        let requests = Pipes {
            me: Arc::from(me),
            queues: Mutex::default(),
            wrap: RouterMessage::Requests,
            on_undeliverable: Arc::new(move |peer: &str, items: Vec<Item<Envelope>>| {
                let mut p = failed.lock().expect("pending lock");
                let replies: Vec<Reply> =
                    items.iter().filter_map(|(id, _)| p.remove(id)).map(|e| e.reply).collect();
                drop(p);
                for reply in replies {
                    reply.send(unavailable(format!("no link to {peer}")));
                }
            }),
        };
        let answers = Pipes {
            me: Arc::from(me),
            queues: Mutex::default(),
            wrap: RouterMessage::Outcomes,
            // The gateway times the request out; nothing else can be done.
            on_undeliverable: Arc::new(|peer: &str, items: Vec<Item<ConvOutcome>>| {
                tracing::debug!(%peer, n = items.len(), "answers for an unreachable gateway dropped");
            }),
        };
        let forwarder =
            Arc::new(Forwarder { next_id: AtomicU64::new(1), pending, requests, answers, timeout });
        tokio::spawn(sweep(Arc::downgrade(&forwarder)));
        forwarder
    }

    pub fn pending_len(&self) -> usize {
        self.pending.lock().expect("pending lock").len()
    }

    /// Sends `envelope` to `peer`'s router; its answer goes to `reply`.
    pub fn forward(&self, peer: &str, envelope: Envelope, reply: Reply) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry =
            Pending { peer: Arc::from(peer), reply, deadline: Instant::now() + self.timeout };
        self.pending.lock().expect("pending lock").insert(id, entry);
        self.requests.send(peer, id, envelope);
    }

    /// A `Reply` that sends an outcome back to the gateway `from` as answer `id`.
    pub fn answer_to(self: &Arc<Self>, from: &str, id: u64) -> Reply {
        let me = self.clone();
        let from: Arc<str> = Arc::from(from);
        Reply::new(move |outcome| me.answers.send(&from, id, outcome))
    }

    /// Answers arrived from a peer.
    pub fn deliver(&self, batch: Batch<ConvOutcome>) {
        let mut replies = Vec::with_capacity(batch.items.len());
        {
            let mut p = self.pending.lock().expect("pending lock");
            for (id, outcome) in batch.items {
                if let Some(entry) = p.remove(&id) {
                    replies.push((entry.reply, outcome));
                }
            }
        }
        for (reply, outcome) in replies {
            reply.send(outcome);
        }
    }

    /// `peer` was declared down: its pending requests get `unavailable` now.
    pub fn fail_peer(&self, peer: &str) {
        let failed: Vec<Reply> = {
            let mut p = self.pending.lock().expect("pending lock");
            let ids: Vec<u64> =
                p.iter().filter(|(_, e)| &*e.peer == peer).map(|(id, _)| *id).collect();
            ids.into_iter().filter_map(|id| p.remove(&id)).map(|e| e.reply).collect()
        };
        for reply in failed {
            reply.send(unavailable(format!("{peer} went down before it answered")));
        }
    }

    fn expire(&self, now: Instant) {
        let expired: Vec<Reply> = {
            let mut p = self.pending.lock().expect("pending lock");
            let ids: Vec<u64> =
                p.iter().filter(|(_, e)| e.deadline <= now).map(|(id, _)| *id).collect();
            ids.into_iter().filter_map(|id| p.remove(&id)).map(|e| e.reply).collect()
        };
        for reply in expired {
            reply.send(ConvOutcome::failed(FailKind::Timeout, "the owner did not answer in time"));
        }
    }
}

async fn sweep(forwarder: std::sync::Weak<Forwarder>) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        let Some(f) = forwarder.upgrade() else { return };
        f.expire(Instant::now());
    }
}
