//! The gossip driver: runs the pure [`Membership`] state machine over a UDP socket.
//!
//! One task owns the state machine, the socket and a min-heap of timers, so timers are
//! delivered in deadline order as foca requires. After every input it executes the
//! effects in order and publishes a [`ClusterView`] for the admin port and the link task.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use botclaw_config::HostPort;

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
        botclaw_core::rebalance::MoveTable::vouched(&self.loads)
    }
}

pub enum GossipCommand {
    /// Leave the cluster; the reply comes once the leave datagrams are sent.
    Leave(oneshot::Sender<()>),
    /// Announce this node without a role (draining); the reply says whether it had it.
    DropRole(String, oneshot::Sender<bool>),
    /// Spread this node's load summary.
    PublishLoad(LoadSummary),
    /// Found a cluster after all (see `Membership::found`).
    Found,
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

/// Where the seeds come from: names resolved again and again, and the members remembered
/// from the last run (written to `peers_dir` as members come and go).
#[derive(Debug, Clone, Default)]
pub struct Seeds {
    pub names: Vec<HostPort>,
    pub remembered: Vec<SocketAddr>,
    pub resolve_every: Duration,
    pub peers_dir: Option<PathBuf>,
    /// The names that failed at the last lookup, with why (warned of once per change).
    pub unresolved: Vec<String>,
}

impl Seeds {
    /// Resolves the names: the addresses they stand for now. Names that fail are counted
    /// every time and warned of when the set of them changes.
    pub async fn resolve_names(&mut self, metrics: &Metrics) -> Vec<SocketAddr> {
        let (addrs, failed) = crate::addrs::resolve_all(&self.names).await;
        let unresolved: Vec<String> =
            failed.iter().map(|(hp, why)| format!("{hp} ({why})")).collect();
        if !unresolved.is_empty() {
            metrics.cluster_warning("seed_unresolved");
            if unresolved != self.unresolved {
                tracing::warn!(seeds = ?unresolved, "seed names that do not resolve (yet): tried again every {:?}", self.resolve_every);
            }
        }
        self.unresolved = unresolved;
        metrics.seed_addresses.set(addrs.len() as i64);
        addrs
    }

    /// Every seed address: the names' `addrs` and the remembered members.
    pub fn with_remembered(&self, mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
        addrs.extend(&self.remembered);
        addrs
    }
}

/// Least time between two warnings of rejected datagrams.
const REJECT_WARNING_EVERY: Duration = Duration::from_secs(30);

/// Least time between two warnings of failed gossip sends.
const SEND_WARNING_EVERY: Duration = Duration::from_secs(10);

pub struct GossipDriver {
    membership: Membership,
    seeds: Seeds,
    /// The up members' gossip addresses last written to the peers file.
    remembered_written: Vec<SocketAddr>,
    /// Told when a namesake started earlier: this node must stop.
    name_taken: Option<oneshot::Sender<NodeId>>,
    send_warned_at: Option<Instant>,
    reject_warned_at: Option<Instant>,
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

    /// Resolves once a live member with this node's name started before it (this node
    /// must stop: names are unique).
    pub fn name_taken(&mut self) -> oneshot::Receiver<NodeId> {
        let (tx, rx) = oneshot::channel();
        self.name_taken = Some(tx);
        rx
    }

    pub fn new(
        membership: Membership,
        seeds: Seeds,
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
        let remembered_written = seeds.remembered.clone();
        let driver = GossipDriver {
            membership,
            seeds,
            remembered_written,
            name_taken: None,
            send_warned_at: None,
            reject_warned_at: None,
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
        let resolve_every = self.seeds.resolve_every.max(Duration::from_millis(100));
        let mut resolve = tokio::time::interval_at(Instant::now() + resolve_every, resolve_every);
        resolve.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let has_names = !self.seeds.names.is_empty();
        loop {
            let deadline = self.timers.next_deadline();
            tokio::select! {
                _ = resolve.tick(), if has_names => self.resolve_seeds().await,
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
                    Some(GossipCommand::Found) => self.membership.found(),
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

    /// Resolves the seed names again; the seeds are what they resolve to plus the members
    /// remembered from the last run.
    async fn resolve_seeds(&mut self) {
        let addrs = self.seeds.resolve_names(&self.metrics).await;
        self.membership.set_seeds(&self.seeds.with_remembered(addrs));
    }

    fn on_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        self.metrics.gossip_received.inc();
        self.clock();
        if let Err(e) = self.membership.handle_packet(datagram) {
            self.metrics.reject(e.label());
            // Junk from the network is routine (debug); a peer whose datagrams keep being
            // refused is a misconfiguration (another secret, two nodes advertising one
            // address, clocks apart): one warning per REJECT_WARNING_EVERY.
            let due = self.reject_warned_at.is_none_or(|at| at.elapsed() >= REJECT_WARNING_EVERY);
            if due {
                self.reject_warned_at = Some(Instant::now());
                tracing::warn!(%from, error = %e, len = datagram.len(), "gossip datagram rejected (one warning per {REJECT_WARNING_EVERY:?}; all counted in botclaw_gossip_packets_rejected)");
            } else {
                tracing::debug!(%from, error = %e, len = datagram.len(), "gossip datagram rejected");
            }
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
                        self.metrics.gossip_datagram_bytes.observe(packet.len() as f64);
                    }
                    Err(e) => {
                        self.metrics.gossip_send_errors.inc();
                        let due =
                            self.send_warned_at.is_none_or(|at| at.elapsed() >= SEND_WARNING_EVERY);
                        if due {
                            self.send_warned_at = Some(Instant::now());
                            self.metrics.cluster_warning("gossip_send_failed");
                            tracing::warn!(%to, error = %e, "gossip send failed (one warning per {SEND_WARNING_EVERY:?}; see botclaw_gossip_send_errors)");
                        }
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
                Effect::NameTaken { other, this_node_yields: true } => {
                    self.metrics.cluster_warning("name_taken");
                    tracing::error!(name = %other.name, other = %other.gossip, "another live member, started earlier, has this node's name: names must be unique (set --name or BOTCLAW_NAME); stopping");
                    if let Some(tx) = self.name_taken.take() {
                        let _ = tx.send(other);
                    }
                }
                Effect::NameTaken { other, this_node_yields: false } => {
                    self.metrics.cluster_warning("name_taken");
                    tracing::warn!(name = %other.name, other = %other.gossip, "a member started later claims this node's name; it should stop");
                }
                Effect::SeedsUnanswered { attempts, seeds } => {
                    self.metrics.cluster_warning("seeds_unanswered");
                    let names: Vec<String> =
                        self.seeds.names.iter().map(ToString::to_string).collect();
                    tracing::warn!(attempts, seeds = ?names, addresses = ?seeds, remembered = ?self.seeds.remembered, "no member answered: not joined, not ready (check the seeds, the secret, and that UDP reaches them)");
                }
            }
        }
        self.publish();
    }

    fn publish(&mut self) {
        let members = self.membership.members();
        self.remember(&members);
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

impl GossipDriver {
    /// Writes the up members' gossip addresses to the peers file when they changed (never
    /// an empty list: a node alone keeps what it knew).
    fn remember(&mut self, members: &[MemberView]) {
        let Some(dir) = &self.seeds.peers_dir else { return };
        let mut up: Vec<SocketAddr> = members
            .iter()
            .filter(|m| !m.is_self && m.state == MemberState::Up)
            .map(|m| m.id.gossip)
            .collect();
        up.sort();
        if up.is_empty() || up == self.remembered_written {
            return;
        }
        match crate::addrs::remember_peers(dir, &up) {
            Ok(()) => self.remembered_written = up,
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot remember the members"),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
