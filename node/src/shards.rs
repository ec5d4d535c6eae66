//! Routing and replication by the controller's map (`controller.authoritative`): the
//! shard replicator's links, and the loop that follows the applied map.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use botclaw_actors::router::{remote_router, RouterMessage};
use botclaw_actors::shards::{ShardLinks, ShardReplicator};
use botclaw_core::placement::Placement;
use botclaw_core::shardmap::MapCommand;
use botclaw_core::MemberState;
use tokio::sync::{mpsc, watch};

use crate::controller::{MapView, Wire};
use crate::gossip::ClusterView;
use crate::metrics::Metrics;
use crate::routing::{Dispatcher, PlacementView};

/// The shard replicator's view of the node: links to peers' routers, the controller's
/// inbox, and the read lease.
pub struct NodeShardLinks {
    pub me: String,
    pub controller: mpsc::Sender<Vec<u8>>,
    pub heard: Arc<AtomicBool>,
    pub metrics: Metrics,
}

impl ShardLinks for NodeShardLinks {
    fn send(&self, peer: &str, bytes: Vec<u8>) {
        match remote_router(peer).map(|r| r.cast(RouterMessage::Shards(bytes))) {
            Some(Ok(())) => {}
            // Lost: the owner drops a member that stops acknowledging; a learner's
            // catch-up starts over.
            _ => self.metrics.controller.drop("shard-batch-no-link"),
        }
    }

    fn propose(&self, command: MapCommand) {
        let wire = Wire::Propose { from: self.me.clone(), forwarded: false, command };
        if self.controller.try_send(wire.to_bytes()).is_err() {
            self.metrics.controller.drop("queue-full");
        }
    }

    fn controller_heard(&self) -> bool {
        self.heard.swap(false, Ordering::AcqRel)
    }
}

/// Follows the applied map: the replicator applies it first, then routing switches to
/// it, actors of conversations this node no longer owns close (their requests go to the
/// new owner), and held requests are routed again. Requests forwarded to members the
/// failure detector declared down fail at once.
pub async fn follow_map(
    mut map: watch::Receiver<Arc<MapView>>,
    mut gossip: watch::Receiver<ClusterView>,
    dispatcher: Arc<Dispatcher>,
    shards: ShardReplicator,
) {
    let me = dispatcher.me.clone();
    let ring: Arc<Placement> = dispatcher.view.load().placement.clone();
    let mut down: BTreeSet<String> = BTreeSet::new();
    dispatcher.serving.store(true, Ordering::Release);
    dispatcher.metrics.serving.set(1);
    loop {
        let view = map.borrow_and_update().clone();
        let current = dispatcher.view.load();
        if current.map.as_ref().is_none_or(|m| !Arc::ptr_eq(m, &view.map)) {
            shards.map_applied(view.map.clone()).await;
            let joined = view.map.member_ix(&me).is_some();
            let next = Arc::new(PlacementView::by_map(view.map.clone(), ring.clone(), joined));
            dispatcher.view.store(next.clone());
            let moved = dispatcher.host.relinquish(|conv| next.locate(conv).1 == Some(&*me));
            if moved > 0 {
                tracing::info!(moved, "conversations moved to other nodes");
            }
            dispatcher.release_held();
        }
        let now_down: BTreeSet<String> = gossip
            .borrow_and_update()
            .members
            .iter()
            .filter(|m| m.state == MemberState::Down)
            .map(|m| m.id.name.clone())
            .collect();
        for peer in now_down.difference(&down) {
            dispatcher.forwarder.fail_peer(peer);
        }
        down = now_down;
        tokio::select! {
            changed = map.changed() => if changed.is_err() { return },
            changed = gossip.changed() => if changed.is_err() { return },
        }
    }
}
