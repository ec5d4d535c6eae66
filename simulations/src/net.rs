//! A deterministic network of [`Membership`] state machines.
//!
//! Events (datagrams and timers) are ordered by (time, sequence number), so ties resolve in
//! submission order and a run is a pure function of its inputs. A crashed node disappears
//! with its timers; a frozen node drops what it receives and handles its timers only after
//! it is thawed, like a SIGSTOPped process.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;

use botclaw_config::GossipConfig;
use botclaw_core::membership::MembershipTimer;
use botclaw_core::{Effect, MemberView, Membership, NodeId};

enum Event {
    Packet { to: SocketAddr, data: Vec<u8> },
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
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    nodes: BTreeMap<SocketAddr, SimNode>,
    generations: u64,
    latency_ms: u64,
    trace: Vec<String>,
    cfg: GossipConfig,
}

impl SimNet {
    /// A network where every datagram takes `latency_ms`.
    pub fn new(cfg: GossipConfig, latency_ms: u64) -> Self {
        SimNet {
            now_ms: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes: BTreeMap::new(),
            generations: 0,
            latency_ms,
            trace: Vec::new(),
            cfg,
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
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, event);
    }

    /// Starts a node (replacing any process at the same address, as a restart does).
    pub fn start(&mut self, id: NodeId, seeds: &[SocketAddr], secret: &[u8], rng_seed: u64) {
        let addr = id.gossip;
        let mut membership = Membership::new(id, seeds, secret, &self.cfg, rng_seed);
        membership.start();
        self.generations += 1;
        let node = SimNode { membership, generation: self.generations, frozen: false };
        self.nodes.insert(addr, node);
        self.drain(addr);
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
            node.membership.leave();
            self.drain(addr);
        }
        self.nodes.remove(&addr);
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
        loop {
            let Some(node) = self.nodes.get_mut(&at) else { return };
            let generation = node.generation;
            let Some(effect) = node.membership.poll_effect() else { return };
            match effect {
                Effect::Send { to, packet } => {
                    let t = self.now_ms + self.latency_ms;
                    self.push(t, Event::Packet { to, data: packet });
                }
                Effect::Schedule { after, timer } => {
                    let t = self.now_ms + after.as_millis() as u64;
                    self.push(t, Event::Timer { node: at, generation, timer });
                }
                other => self.trace.push(format!("{} {at} {other:?}", self.now_ms)),
            }
        }
    }

    /// Processes every event due up to `until_ms`, then sets the clock to it.
    pub fn run_until(&mut self, until_ms: u64) {
        while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
            if t > until_ms {
                break;
            }
            self.queue.pop();
            self.now_ms = t;
            let Some(event) = self.events.remove(&seq) else { continue };
            match event {
                Event::Packet { to, data } => {
                    let Some(node) = self.nodes.get_mut(&to) else { continue };
                    if node.frozen {
                        continue;
                    }
                    // Rejected datagrams leave state unchanged; the real node counts them.
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
