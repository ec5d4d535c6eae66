//! The link task: keeps ractor_cluster sessions in step with gossip membership.
//!
//! ractor_cluster has no liveness detection and no reconnection, so foca decides: every
//! `reconcile_interval_ms`, and whenever membership changes, the pure
//! [`LinkPlanner`] compares up members with open sessions and this task dials or drops.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use botclaw_core::links::{LinkAction, LinkPeer, LinkPlanner};
use botclaw_core::MemberState;
use ractor::ActorRef;
use ractor_cluster::node::{NodeServerMessage, NodeServerSessionInformation};
use ractor_cluster::NodeId as SessionId;
use tokio::sync::watch;

use crate::gossip::ClusterView;

/// Least time between two warnings of failed dials to one peer.
const DIAL_WARNING_EVERY: Duration = Duration::from_secs(30);
use crate::metrics::Metrics;

/// Open sessions by peer link name (sessions still authenticating have no name yet).
/// ractor_cluster names a peer `{node_name}@{hostname}`; our node name is the link name.
pub async fn sessions(
    server: &ActorRef<NodeServerMessage>,
) -> Option<HashMap<String, NodeServerSessionInformation>> {
    let all: HashMap<SessionId, NodeServerSessionInformation> =
        ractor::call_t!(server, NodeServerMessage::GetSessions, 1000).ok()?;
    Some(
        all.into_values()
            .filter_map(|s| {
                let name = s.peer_name.as_ref()?.name.rsplit_once('@')?.0.to_string();
                Some((name, s))
            })
            .collect(),
    )
}

pub async fn run(
    server: ActorRef<NodeServerMessage>,
    mut view: watch::Receiver<ClusterView>,
    metrics: Metrics,
    tls: Option<std::sync::Arc<crate::tls::NodeTls>>,
    interval: Duration,
    dial_timeout: Duration,
) {
    let me = view.borrow().me.cluster;
    let ticks = (dial_timeout.as_millis() / interval.as_millis().max(1)).max(1) as u32;
    let mut planner = LinkPlanner::new(me, ticks);
    // When a failed dial to each peer was last warned of (one warning per peer per
    // DIAL_WARNING_EVERY; every failure is counted).
    let warned: std::sync::Arc<std::sync::Mutex<HashMap<String, tokio::time::Instant>>> =
        Default::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = view.changed() => if changed.is_err() { return },
        }
        let (up, down) = {
            let v = view.borrow();
            let up: Vec<LinkPeer> = v
                .up_peers()
                .map(|id| LinkPeer { link_name: id.link_name(), cluster: id.cluster })
                .collect();
            let down: BTreeSet<String> = v
                .members
                .iter()
                .filter(|m| m.state == MemberState::Down)
                .map(|m| m.id.link_name())
                .collect();
            (up, down)
        };
        let Some(open) = sessions(&server).await else {
            continue;
        };
        metrics.cluster_sessions.set(open.len() as i64);
        let names: BTreeSet<String> = open.keys().cloned().collect();
        for action in planner.plan(&up, &down, &names) {
            match action {
                LinkAction::Dial(peer) => {
                    metrics.link_dials.inc();
                    let (server, tls) = (server.clone(), tls.clone());
                    let (warned, metrics) = (warned.clone(), metrics.clone());
                    tokio::spawn(async move {
                        let dial = crate::tls::dial(&server, peer.cluster, tls.as_deref());
                        let error = match tokio::time::timeout(dial_timeout, dial).await {
                            Ok(Ok(())) => {
                                tracing::info!(peer = %peer.link_name, addr = %peer.cluster, "link dialed");
                                return;
                            }
                            Ok(Err(e)) => e.to_string(),
                            Err(_) => format!("no session within {dial_timeout:?}"),
                        };
                        metrics.cluster_warning("link_dial_failed");
                        let now = tokio::time::Instant::now();
                        let due = {
                            let mut w = warned.lock().expect("warned lock");
                            w.retain(|_, at| now.duration_since(*at) < DIAL_WARNING_EVERY);
                            w.insert(peer.link_name.clone(), now).is_none()
                        };
                        if due {
                            tracing::warn!(peer = %peer.link_name, addr = %peer.cluster, %error, "cannot link to a member: turns it owns cannot be forwarded (its advertised cluster address, a firewall or TLS; one warning per peer per {DIAL_WARNING_EVERY:?})");
                        }
                    });
                }
                LinkAction::Drop(name) => {
                    if let Some(session) = open.get(&name) {
                        metrics.link_drops.inc();
                        tracing::info!(peer = %name, "dropping link to a peer that is not up");
                        session.actor.stop(Some("peer is not an up member".into()));
                    }
                }
            }
        }
    }
}
