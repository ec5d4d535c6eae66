//! A deterministic network of [`Membership`] state machines.
//!
//! Events (datagrams and timers) are ordered by (time, sequence number), so ties resolve in
//! submission order and a run is a pure function of its inputs. A crashed node disappears
//! with its timers; a frozen node drops what it receives and handles its timers only after
//! it is thawed, like a SIGSTOPped process.
//!
//! The network is a [`NetModel`]: per-datagram latency drawn uniformly from a range (so
//! datagrams reorder), loss, duplication, and partitions (groups of nodes that cannot
//! reach each other), all drawn from one seeded generator.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rustc_hash::FxHashMap;

use botclaw_config::GossipConfig;
use botclaw_core::auth::Keyring;
use botclaw_core::identity::{IdInterner, SharedId};
use botclaw_core::membership::MembershipTimer;
use botclaw_core::{Effect, MemberView, Membership, NodeId};

use crate::timeline::Timeline;

/// How datagrams travel.
#[derive(Debug, Clone, PartialEq)]
pub struct NetModel {
    pub latency_ms_min: u64,
    pub latency_ms_max: u64,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a delivered datagram arrives twice.
    pub duplicate: f64,
}

impl NetModel {
    /// Every datagram takes exactly `latency_ms`; nothing is lost.
    pub fn fixed(latency_ms: u64) -> NetModel {
        NetModel {
            latency_ms_min: latency_ms,
            latency_ms_max: latency_ms,
            loss: 0.0,
            duplicate: 0.0,
        }
    }
}

/// A membership change one node noticed (what the real node logs and acts on).
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub at_ms: u64,
    pub node: SocketAddr,
    pub effect: Effect,
}

enum Event {
    Packet { from: SocketAddr, to: SocketAddr, data: Vec<u8> },
    Timer { node: SocketAddr, generation: u64, timer: MembershipTimer },
}

struct SimNode {
    membership: Membership,
    generation: u64,
    frozen: bool,
}

/// How far a frozen node's timers are pushed back each time they come due.
const FROZEN_RETRY_MS: u64 = 10;

pub struct SimNet {
    now_ms: u64,
    events: Timeline<Event>,
    /// Looked up by address per datagram and timer; iterated only in address order
    /// (`running`, `assume_formed`), so hash order reaches nothing.
    nodes: FxHashMap<SocketAddr, SimNode>,
    generations: u64,
    model: NetModel,
    rng: StdRng,
    /// Partition side of each node (absent: side 0); datagrams cross no sides.
    sides: BTreeMap<SocketAddr, u32>,
    /// One-way cuts: datagrams from the first address to the second are dropped.
    blocked: BTreeSet<(SocketAddr, SocketAddr)>,
    trace: Vec<String>,
    record_trace: bool,
    notices: Vec<Notice>,
    cfg: GossipConfig,
    /// Gossip keys by secret, derived once (the KDF is slow on purpose).
    keyrings: BTreeMap<Vec<u8>, Keyring>,
    /// A node's effects being executed (kept to reuse its allocation).
    effects: Vec<Effect>,
    /// Whether datagrams are encrypted as a node's are ([`SimNet::sealed`]); by default
    /// they keep the frame, key id and replay guard but not the cipher
    /// ([`Keyring::clear_for_simulation`]): this network forges nothing.
    sealed: bool,
    /// The identities every node's member table holds, one copy each (at 5,000 nodes,
    /// 25 million entries would otherwise each hold a ~300 B copy).
    ids: IdInterner,
    /// Datagrams sent, dropped (loss, partition, dead or frozen receiver), duplicated.
    pub sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
}

impl SimNet {
    /// A network where every datagram takes `latency_ms`.
    pub fn new(cfg: GossipConfig, latency_ms: u64) -> Self {
        SimNet::with_model(cfg, NetModel::fixed(latency_ms), 0)
    }

    /// A network of the given model; `seed` drives its randomness.
    pub fn with_model(cfg: GossipConfig, model: NetModel, seed: u64) -> Self {
        SimNet {
            now_ms: 0,
            events: Timeline::default(),
            nodes: FxHashMap::default(),
            generations: 0,
            model,
            rng: StdRng::seed_from_u64(seed),
            sides: BTreeMap::new(),
            blocked: BTreeSet::new(),
            trace: Vec::new(),
            record_trace: true,
            notices: Vec::new(),
            cfg,
            keyrings: BTreeMap::new(),
            effects: Vec::new(),
            sealed: false,
            ids: IdInterner::default(),
            sent: 0,
            dropped: 0,
            duplicated: 0,
        }
    }

    /// Encrypt and authenticate datagrams with the node's cipher (costlier; the runs are
    /// otherwise the same: `the_cipher_changes_nothing_a_run_does`).
    pub fn sealed(mut self) -> Self {
        self.sealed = true;
        self
    }

    /// Keep no text trace (large runs); notices are still collected.
    pub fn without_trace(mut self) -> Self {
        self.record_trace = false;
        self
    }

    /// Membership changes noticed since the last call, in order.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Splits the network: each listed group is its own side; unlisted nodes are side 0.
    pub fn partition(&mut self, groups: &[Vec<SocketAddr>]) {
        self.sides.clear();
        for (i, group) in groups.iter().enumerate() {
            for addr in group {
                self.sides.insert(*addr, i as u32 + 1);
            }
        }
    }

    /// Drops every datagram from `from` to `to` (not the other way) until [`SimNet::heal`].
    pub fn block(&mut self, from: SocketAddr, to: SocketAddr) {
        self.blocked.insert((from, to));
    }

    /// Heals every partition and one-way cut.
    pub fn heal(&mut self) {
        self.sides.clear();
        self.blocked.clear();
    }

    /// The partition side of `addr` (0 when there is no partition or it is unlisted).
    pub fn side(&self, addr: SocketAddr) -> u32 {
        self.sides.get(&addr).copied().unwrap_or(0)
    }

    /// `a` can send to `b` (same side of any partition, no one-way cut from `a` to `b`).
    pub fn reachable(&self, a: SocketAddr, b: SocketAddr) -> bool {
        self.sides.get(&a).copied().unwrap_or(0) == self.sides.get(&b).copied().unwrap_or(0)
            && !self.blocked.contains(&(a, b))
    }

    /// The node at `addr` runs (started, not crashed) and is not frozen.
    pub fn is_running(&self, addr: SocketAddr) -> bool {
        self.nodes.get(&addr).is_some_and(|n| !n.frozen)
    }

    /// Addresses of started (not crashed) nodes.
    pub fn running(&self) -> BTreeSet<SocketAddr> {
        self.nodes.keys().copied().collect()
    }

    fn latency(&mut self) -> u64 {
        let (lo, hi) =
            (self.model.latency_ms_min, self.model.latency_ms_max.max(self.model.latency_ms_min));
        if lo == hi {
            lo
        } else {
            self.rng.random_range(lo..=hi)
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Membership notifications in the order they happened: `"{ms} {node} {effect:?}"`.
    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    fn push(&mut self, at: u64, event: Event) {
        self.events.push(at, event);
    }

    /// Starts a node (replacing any process at the same address, as a restart does).
    pub fn start(&mut self, id: NodeId, seeds: &[SocketAddr], secret: &[u8], rng_seed: u64) {
        let addr = id.gossip;
        let keys = self
            .keyrings
            .entry(secret.to_vec())
            .or_insert_with(|| {
                if self.sealed {
                    Keyring::from_secrets(secret, &[])
                } else {
                    Keyring::clear_for_simulation(secret)
                }
            })
            .clone();
        let mut membership =
            Membership::with_interner(id, seeds, keys, &self.cfg, rng_seed, self.ids.clone());
        membership.set_clock(self.now_ms);
        membership.start();
        self.generations += 1;
        let node = SimNode { membership, generation: self.generations, frozen: false };
        self.nodes.insert(addr, node);
        self.drain(addr);
    }

    /// Every running node takes every other as up, as once a cluster's gossip has
    /// settled ([`Membership::assume_members`]): the start of an already formed cluster.
    pub fn assume_formed(&mut self) {
        let addrs: Vec<SocketAddr> = self.running().into_iter().collect();
        let ids: Vec<SharedId> = (addrs.iter().map(|a| &self.nodes[a]))
            .map(|n| self.ids.intern(SharedId::new(n.membership.identity().clone())))
            .collect();
        for addr in addrs {
            let node = self.nodes.get_mut(&addr).expect("listed above");
            node.membership.set_clock(self.now_ms);
            let others = ids.iter().filter(|id| id.gossip != addr).cloned();
            node.membership.assume_members(others).expect("alive members of other addresses");
            self.drain(addr);
        }
    }

    /// The process at `addr` dies without a word.
    pub fn crash(&mut self, addr: SocketAddr) {
        self.nodes.remove(&addr);
    }

    /// Stops (or resumes) the process at `addr`: it neither receives nor acts meanwhile.
    pub fn set_frozen(&mut self, addr: SocketAddr, frozen: bool) {
        if let Some(node) = self.nodes.get_mut(&addr) {
            node.frozen = frozen;
        }
    }

    /// The node at `addr` leaves gracefully, then its process exits.
    pub fn leave(&mut self, addr: SocketAddr) {
        if let Some(node) = self.nodes.get_mut(&addr) {
            node.membership.set_clock(self.now_ms);
            node.membership.leave();
            self.drain(addr);
        }
        self.nodes.remove(&addr);
    }

    /// The node at `addr` announces itself again without `role` (a draining node).
    pub fn drop_role(&mut self, addr: SocketAddr, role: &str) -> bool {
        let now_ms = self.now_ms;
        let dropped = self.nodes.get_mut(&addr).is_some_and(|node| {
            node.membership.set_clock(now_ms);
            node.membership.drop_role(role)
        });
        self.drain(addr);
        dropped
    }

    pub fn membership(&self, addr: SocketAddr) -> Option<&Membership> {
        self.nodes.get(&addr).map(|n| &n.membership)
    }

    /// Mutable access, to feed a node inputs directly.
    pub fn membership_mut(&mut self, addr: SocketAddr) -> Option<&mut Membership> {
        self.nodes.get_mut(&addr).map(|n| &mut n.membership)
    }

    /// What the node at `observer` believes about the member at gossip address `of`.
    pub fn view(&self, observer: SocketAddr, of: SocketAddr) -> Option<MemberView> {
        self.membership(observer)?.members().into_iter().find(|v| v.id.gossip == of)
    }

    fn drain(&mut self, at: SocketAddr) {
        // The node is looked up once: executing an effect feeds nothing back to it.
        let Some(node) = self.nodes.get_mut(&at) else { return };
        let generation = node.generation;
        let mut effects = std::mem::take(&mut self.effects);
        effects.extend(std::iter::from_fn(|| node.membership.poll_effect()));
        for effect in effects.drain(..) {
            match effect {
                Effect::Send { to, packet } => {
                    self.sent += 1;
                    if self.model.loss > 0.0 && self.rng.random_bool(self.model.loss) {
                        self.dropped += 1;
                        continue;
                    }
                    let duplicate =
                        self.model.duplicate > 0.0 && self.rng.random_bool(self.model.duplicate);
                    if duplicate {
                        self.duplicated += 1;
                        let t = self.now_ms + self.latency();
                        self.push(t, Event::Packet { from: at, to, data: packet.clone() });
                    }
                    let t = self.now_ms + self.latency();
                    self.push(t, Event::Packet { from: at, to, data: packet });
                }
                Effect::Schedule { after, timer } => {
                    let t = self.now_ms + after.as_millis() as u64;
                    self.push(t, Event::Timer { node: at, generation, timer });
                }
                other => {
                    if self.record_trace {
                        self.trace.push(format!("{} {at} {other:?}", self.now_ms));
                    }
                    self.notices.push(Notice { at_ms: self.now_ms, node: at, effect: other });
                }
            }
        }
        self.effects = effects;
    }

    /// Processes every event due up to `until_ms`, then sets the clock to it.
    pub fn run_until(&mut self, until_ms: u64) {
        while let Some((t, event)) = self.events.pop_due(until_ms) {
            self.now_ms = t;
            match event {
                Event::Packet { from, to, data } => {
                    if !self.reachable(from, to) {
                        self.dropped += 1;
                        continue;
                    }
                    let Some(node) = self.nodes.get_mut(&to) else {
                        self.dropped += 1;
                        continue;
                    };
                    if node.frozen {
                        self.dropped += 1;
                        continue;
                    }
                    // Rejected datagrams leave state unchanged; the real node counts them.
                    node.membership.set_clock(self.now_ms);
                    let _ = node.membership.handle_packet(&data);
                    self.drain(to);
                }
                Event::Timer { node, generation, timer } => {
                    let Some(n) = self.nodes.get_mut(&node) else { continue };
                    if n.generation != generation {
                        continue;
                    }
                    if n.frozen {
                        let t = self.now_ms + FROZEN_RETRY_MS;
                        self.push(t, Event::Timer { node, generation, timer });
                        continue;
                    }
                    // Stale timers are reported by foca and ignored, as the node does.
                    n.membership.set_clock(self.now_ms);
                    let _ = n.membership.handle_timer(timer);
                    self.drain(node);
                }
            }
        }
        self.now_ms = self.now_ms.max(until_ms);
    }

    /// Runs in 10 ms steps until `pred` holds or `limit_ms` is reached; returns the time.
    pub fn run_until_pred(&mut self, limit_ms: u64, pred: impl Fn(&SimNet) -> bool) -> Option<u64> {
        while self.now_ms < limit_ms {
            let next = self.now_ms + 10;
            self.run_until(next);
            if pred(self) {
                return Some(self.now_ms);
            }
        }
        None
    }
}
