//! Where a conversation's requests go: the placement snapshot and the dispatcher.
//!
//! The placement is rebuilt (off the async threads) whenever the set of members serving
//! conversations changes, and swapped in atomically; requests read the current snapshot
//! without locks. The dispatcher runs a request locally if this node owns the
//! conversation, forwards it once to the owner otherwise, and answers `unavailable` when a
//! forwarded request arrives at a node that disagrees about the owner (membership in flux):
//! a request is processed by one node at most.

use std::collections::BTreeSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use botclaw_actors::envelope::{ConvOutcome, ConvRequest, Envelope, FailKind, Reply};
use botclaw_actors::forwarder::Forwarder;
use botclaw_actors::host::ConversationHost;
use botclaw_actors::router::Inbound;
use botclaw_config::PlacementConfig;
use botclaw_core::placement::{Placement, RingMember, ShardId};
use botclaw_core::MemberState;
use tokio::sync::watch;

use crate::gossip::ClusterView;
use crate::metrics::Metrics;

/// The role a node needs to own conversations.
pub const CONVERSATIONS_ROLE: &str = "conversations";

/// One consistent view of who owns what.
#[derive(Debug)]
pub struct PlacementView {
    pub placement: Placement,
    /// This node has joined the cluster (its view is worth acting on).
    pub joined: bool,
}

/// Members that own shards: up or suspect (SWIM treats a suspect as alive) and serving
/// conversations.
pub fn ring_members(view: &ClusterView) -> BTreeSet<RingMember> {
    view.members
        .iter()
        .filter(|m| m.state != MemberState::Down)
        .filter(|m| m.id.roles.iter().any(|r| r == CONVERSATIONS_ROLE))
        .map(|m| RingMember { name: m.id.name.clone(), capacity: m.id.capacity })
        .collect()
}

/// Keeps `out` in step with membership, and fails requests forwarded to members that went
/// down instead of letting them time out.
pub async fn maintain(
    mut view: watch::Receiver<ClusterView>,
    cfg: PlacementConfig,
    out: Arc<ArcSwap<PlacementView>>,
    forwarder: Arc<Forwarder>,
) {
    let mut current: Option<(BTreeSet<RingMember>, bool)> = None;
    let mut down = BTreeSet::new();
    loop {
        let (members, joined, now_down) = {
            let v = view.borrow_and_update();
            let now_down: BTreeSet<String> = v
                .members
                .iter()
                .filter(|m| m.state == MemberState::Down)
                .map(|m| m.id.name.clone())
                .collect();
            (ring_members(&v), v.joined, now_down)
        };
        for peer in now_down.difference(&down) {
            forwarder.fail_peer(peer);
        }
        down = now_down;
        if current.as_ref() != Some(&(members.clone(), joined)) {
            let list: Vec<RingMember> = members.iter().cloned().collect();
            let cfg = cfg.clone();
            let placement = tokio::task::spawn_blocking(move || Placement::build(&list, &cfg))
                .await
                .expect("placement build does not panic");
            tracing::info!(members = members.len(), joined, "placement updated");
            out.store(Arc::new(PlacementView { placement, joined }));
            current = Some((members, joined));
        }
        if view.changed().await.is_err() {
            return;
        }
    }
}

pub struct Dispatcher {
    pub host: ConversationHost,
    pub forwarder: Arc<Forwarder>,
    pub view: Arc<ArcSwap<PlacementView>>,
    pub me: Arc<str>,
    pub retry_after_ms: u64,
    pub metrics: Metrics,
}

impl Dispatcher {
    /// Shard and owner of a conversation as this node sees it now.
    pub fn locate(&self, conv: &str) -> (ShardId, Option<String>) {
        let view = self.view.load();
        let (shard, owner) = view.placement.locate(conv);
        (shard, owner.map(String::from))
    }

    fn unavailable(&self, reply: Reply, message: String) {
        reply.send(ConvOutcome::Failed {
            kind: FailKind::Unavailable,
            message,
            retry_after_ms: Some(self.retry_after_ms),
        });
    }

    /// Runs `request` where the conversation lives. `hops` is how many times it was
    /// forwarded already.
    pub fn submit(&self, conv: &str, request: ConvRequest, hops: u8, reply: Reply) {
        let view = self.view.load();
        if !view.joined {
            return self.unavailable(reply, "this node has not joined the cluster yet".into());
        }
        let (_, owner) = view.placement.locate(conv);
        match owner {
            None => self.unavailable(reply, "no node serves conversations".into()),
            Some(owner) if *owner == *self.me => self.host.dispatch(conv, request, reply),
            Some(owner) if hops == 0 => {
                self.metrics.forwards.inc();
                let envelope = Envelope { conv: conv.to_string(), request, hops: 1 };
                self.forwarder.forward(owner, envelope, reply);
            }
            Some(owner) => {
                self.metrics.forward_refusals.inc();
                self.unavailable(
                    reply,
                    format!("ownership in flux: this node thinks {owner} owns the conversation"),
                );
            }
        }
    }
}

impl Inbound for Dispatcher {
    fn handle(&self, envelope: Envelope, reply: Reply) {
        self.submit(&envelope.conv, envelope.request, envelope.hops, reply);
    }
}
