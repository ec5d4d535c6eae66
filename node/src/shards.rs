//! Routing and replication by the controller's map (`controller.authoritative`): the
//! shard replicator's links, and the loop that follows the applied map.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use botclaw_actors::router::{remote_router, RouterMessage};
use botclaw_actors::shards::{ShardLinks, ShardReplicator};
use botclaw_core::placement::Placement;
use botclaw_core::rebalance::MoveTable;
use botclaw_core::shardmap::{MapCommand, MemberState as MapState};
use botclaw_core::MemberState;
use tokio::sync::{mpsc, watch};

use crate::controller::{ControllerContact, MapView, Wire};
use crate::gossip::ClusterView;
use crate::metrics::Metrics;
use crate::routing::{Dispatcher, PlacementView};

/// How often the node checks that it still hears from the controller.
const CONTACT_CHECK: Duration = Duration::from_millis(100);

/// The shard replicator's view of the node: links to peers' routers, the controller's
/// inbox, and the read lease.
pub struct NodeShardLinks {
    pub me: String,
    pub controller: mpsc::Sender<Vec<u8>>,
    pub heard: Arc<ControllerContact>,
    /// Heard within this renews the read lease (half of it: the machine's own count of
    /// ticks adds the rest).
    pub heard_within: Duration,
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
        self.heard.within(self.heard_within.as_millis() as u64)
    }
}

/// How the node follows the controller.
pub struct Follow {
    pub map: watch::Receiver<Arc<MapView>>,
    pub gossip: watch::Receiver<ClusterView>,
    pub dispatcher: Arc<Dispatcher>,
    pub shards: ShardReplicator,
    pub contact: Arc<ControllerContact>,
    /// The node serves while it heard from the controller's leader within this.
    pub serve_lease: Duration,
}

/// Follows the applied map: the replicator applies it first, then routing switches to
/// it, actors of conversations this node no longer owns close (their requests go to the
/// new owner), and held requests are routed again. Requests forwarded to members the
/// failure detector declared down fail at once. The node serves only while it hears from
/// the controller's leader: cut off from the controller's majority, it refuses turns
/// (`unavailable`, try another node) instead of holding them until they time out.
pub async fn follow_map(f: Follow) {
    let Follow { mut map, mut gossip, dispatcher, shards, contact, serve_lease } = f;
    let me = dispatcher.me.clone();
    let ring: Arc<Placement> = dispatcher.view.load().placement.clone();
    let mut down: BTreeSet<String> = BTreeSet::new();
    let mut check = tokio::time::interval(CONTACT_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut moves = MoveTable::default();
    loop {
        let serving = contact.within(serve_lease.as_millis() as u64);
        if dispatcher.serving.swap(serving, Ordering::AcqRel) != serving {
            if serving {
                tracing::info!("the placement controller is reachable: serving turns");
            } else {
                tracing::warn!(lease = ?serve_lease, "no word from the placement controller's leader: serving no turns");
            }
            dispatcher.metrics.serving.set(i64::from(serving));
        }
        let view = map.borrow_and_update().clone();
        let current = dispatcher.view.load();
        let now_moves = {
            let mut m = gossip.borrow().moves();
            let active = |name: &str| {
                let ix = view.map.member_ix(name);
                ix.and_then(|ix| view.map.member(ix)).is_some_and(|m| m.state == MapState::Active)
            };
            m.retain_targets(active);
            m
        };
        let map_changed = current.map.as_ref().is_none_or(|m| !Arc::ptr_eq(m, &view.map));
        if now_moves != moves {
            tracing::info!(moved_shards = now_moves.len(), "load-driven moves updated");
            moves = now_moves;
        }
        if map_changed {
            shards.map_applied(view.map.clone()).await;
        }
        if map_changed || current.moves != moves {
            // A map to route by (a gateway without the conversations role is never a
            // member of it; it forwards everything).
            let joined = !view.map.members().is_empty();
            let next = Arc::new(PlacementView::by_map(
                view.map.clone(),
                ring.clone(),
                moves.clone(),
                joined,
            ));
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
            _ = check.tick() => {}
        }
    }
}
