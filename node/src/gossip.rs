//! The gossip driver: runs the pure [`Membership`] state machine over a UDP socket.
//!
//! One task owns the state machine, the socket and a min-heap of timers, so timers are
//! delivered in deadline order as foca requires. After every input it executes the
//! effects in order and publishes a [`ClusterView`] for the admin port and the link task.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use botclaw_core::load::LoadSummary;
use botclaw_core::membership::MembershipTimer;
use botclaw_core::{Effect, MemberState, MemberView, Membership, NodeId};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::metrics::Metrics;

/// What the rest of the node knows about the cluster, refreshed after every gossip input.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    pub me: NodeId,
    pub joined: bool,
    pub members: Vec<MemberView>,
    /// The newest load summary of every node heard from, by name.
    pub loads: BTreeMap<String, LoadSummary>,
}

impl ClusterView {
    /// Up members other than this node.
    pub fn up_peers(&self) -> impl Iterator<Item = &NodeId> {
        self.members.iter().filter(|m| !m.is_self && m.state == MemberState::Up).map(|m| &m.id)
    }

    /// The load-driven moves in force: every summary's vouched-for moves, the newest
    /// version of each shard's.
    pub fn moves(&self) -> botclaw_core::rebalance::MoveTable {
        botclaw_core::rebalance::MoveTable::merge(self.loads.values().flat_map(|l| &l.moves))
    }
}

pub enum GossipCommand {
    /// Leave the cluster; the reply comes once the leave datagrams are sent.
    Leave(oneshot::Sender<()>),
    /// Announce this node without a role (draining); the reply says whether it had it.
    DropRole(String, oneshot::Sender<bool>),
    /// Spread this node's load summary.
    PublishLoad(LoadSummary),
}

/// Timers in deadline order; equal deadlines keep submission order.
#[derive(Default)]
struct TimerQueue {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    timers: BTreeMap<u64, MembershipTimer>,
    seq: u64,
}

impl TimerQueue {
    fn push(&mut self, at: Instant, timer: MembershipTimer) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq)));
        self.timers.insert(self.seq, timer);
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    fn pop_due(&mut self, now: Instant) -> Option<MembershipTimer> {
        let Reverse((at, seq)) = *self.heap.peek()?;
        if at > now {
            return None;
        }
        self.heap.pop();
        self.timers.remove(&seq)
    }
}

pub struct GossipDriver {
    membership: Membership,
    socket: Arc<UdpSocket>,
    timers: TimerQueue,
    view: watch::Sender<ClusterView>,
    metrics: Metrics,
    packet_bytes_max: usize,
    /// Fault injection: while set, every datagram to or from peers is dropped.
    isolated: Arc<AtomicBool>,
}

impl GossipDriver {
    /// The switch that cuts this node off from gossip (fault injection for tests).
    pub fn isolation(&self) -> Arc<AtomicBool> {
        self.isolated.clone()
    }

    pub fn new(
        membership: Membership,
        socket: UdpSocket,
        metrics: Metrics,
        packet_bytes_max: usize,
    ) -> (Self, watch::Receiver<ClusterView>) {
        let view = ClusterView {
            me: membership.identity().clone(),
            joined: membership.is_joined(),
            members: membership.members(),
            loads: membership.loads(),
        };
        let (tx, rx) = watch::channel(view);
        let driver = GossipDriver {
            membership,
            socket: Arc::new(socket),
            timers: TimerQueue::default(),
            view: tx,
            metrics,
            packet_bytes_max,
            isolated: Arc::default(),
        };
        (driver, rx)
    }

    /// Gives the membership machine the wall clock before an input (datagrams are stamped
    /// with it and judged against it for replays).
    fn clock(&mut self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.membership.set_clock(now);
    }

    pub async fn run(mut self, mut commands: mpsc::Receiver<GossipCommand>) {
        self.clock();
        self.membership.start();
        self.execute().await;
        // One byte more than the limit, so an oversized datagram is seen as such instead
        // of being silently truncated to a valid-looking length.
        let mut buf = vec![0u8; self.packet_bytes_max + 1];
        loop {
            let deadline = self.timers.next_deadline();
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok(_) if self.isolated.load(Ordering::Relaxed) => {}
                    Ok((n, from)) => self.on_datagram(&buf[..n], from),
                    // Linux reports ICMP errors from earlier sends on the socket; they say
                    // nothing about this read.
                    Err(e) => tracing::debug!(error = %e, "gossip recv error"),
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.clock();
                    let now = Instant::now();
                    while let Some(timer) = self.timers.pop_due(now) {
                        if let Err(e) = self.membership.handle_timer(timer) {
                            tracing::debug!(error = %e, "gossip timer error");
                        }
                    }
                }
                command = commands.recv() => match command {
                    Some(GossipCommand::Leave(done)) => {
                        self.clock();
                        self.membership.leave();
                        self.execute().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(GossipCommand::PublishLoad(summary)) => {
                        self.clock();
                        if let Err(e) = self.membership.publish_load(&summary) {
                            tracing::warn!(error = %e, "load summary not published");
                        }
                    }
                    Some(GossipCommand::DropRole(role, done)) => {
                        self.clock();
                        let dropped = self.membership.drop_role(&role);
                        let _ = done.send(dropped);
                    }
                    None => return,
                },
            }
            self.execute().await;
        }
    }

    fn on_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        self.metrics.gossip_received.inc();
        self.clock();
        if let Err(e) = self.membership.handle_packet(datagram) {
            self.metrics.reject(e.label());
            tracing::debug!(%from, error = %e, len = datagram.len(), "gossip datagram rejected");
        }
    }

    async fn execute(&mut self) {
        let now = Instant::now();
        while let Some(effect) = self.membership.poll_effect() {
            match effect {
                Effect::Send { .. } if self.isolated.load(Ordering::Relaxed) => {}
                Effect::Send { to, packet } => match self.socket.send_to(&packet, to).await {
                    Ok(_) => {
                        self.metrics.gossip_sent.inc();
                    }
                    Err(e) => {
                        self.metrics.gossip_send_errors.inc();
                        tracing::debug!(%to, error = %e, "gossip send failed");
                    }
                },
                Effect::Schedule { after, timer } => self.timers.push(now + after, timer),
                Effect::MemberUp(id) => {
                    self.metrics.member_event("up");
                    tracing::info!(member = %id.name, incarnation = id.incarnation, gossip = %id.gossip, "member up");
                }
                Effect::MemberDown(id) => {
                    self.metrics.member_event("down");
                    tracing::warn!(member = %id.name, incarnation = id.incarnation, "member down");
                }
                Effect::Joined => tracing::info!("joined the cluster"),
                Effect::Isolated => tracing::warn!("no other members are reachable"),
                Effect::Rejoined(id) => {
                    tracing::warn!(bump = id.bump, "declared down by the cluster; rejoined");
                }
                Effect::MemberChanged(id) => {
                    tracing::info!(member = %id.name, bump = id.bump, roles = ?id.roles, "member changed identity");
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let members = self.membership.members();
        let count = |s| members.iter().filter(|m| m.state == s).count();
        self.metrics.set_members(
            count(MemberState::Up),
            count(MemberState::Suspect),
            count(MemberState::Down),
        );
        self.metrics.gossip_updates_backlog.set(self.membership.updates_backlog() as i64);
        let next = ClusterView {
            me: self.membership.identity().clone(),
            joined: self.membership.is_joined(),
            members,
            loads: self.membership.loads(),
        };
        self.view.send_if_modified(|v| {
            let changed = *v != next;
            if changed {
                *v = next;
            }
            changed
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
