//! The cluster model that runs a [`Scenario`].
//!
//! What is real (the node's own code): membership (foca behind authenticated datagrams, in
//! [`SimNet`]), each node's placement view built from its own membership view
//! ([`Placement`] with the scenario's strategy), the routing rule of a request while
//! ownership changes hands ([`handoff::route`]), keep-majority ([`MajorityGuard`]), write
//! quorums ([`write_quorum`]), the rebalancer ([`Rebalancer`], [`MoveTable`]).
//!
//! What is modelled: clients (Poisson arrivals over Zipf-popular conversations, diurnal
//! curve, flash crowds; a failed or unanswered turn is retried through another node), a
//! node's turn service (workers and a FIFO queue, exponential service times per bot), and
//! a conversation's replicated state: each copy is a turn count on a node; an owner
//! acquires (fences its preference list with a new epoch, continues from the newest copy
//! it can reach), writes to the reachable copies and acknowledges at the write quorum. The
//! load the rebalancer sees is read from the nodes directly, one load period old, instead
//! of travelling in foca broadcasts.
//!
//! Checkers run throughout: an acquire that finds only copies older than what was
//! acknowledged counts the difference as turns lost; a write by a node that no longer
//! holds the conversation's epoch is fenced (and counted); the rebalancer never moves more
//! than `moves_per_round_max` shards per node and round. [`Report::failures`] lists what
//! broke an invariant.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use botclaw_config::PlacementConfig;
use botclaw_core::handoff::{self, Ask, HoldRules, Step};
use botclaw_core::placement::{shard_of, Placement, RingMember, ShardId};
use botclaw_core::rebalance::{self, MoveRecord, MoveTable, NodeLoad, Rebalancer, ShardLoad};
use botclaw_core::replication::{write_quorum, MajorityGuard};
use botclaw_core::{Effect, MemberState, NodeId};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp, Zipf};
use xxhash_rust::xxh3::xxh3_64;

use crate::net::{NetModel, SimNet};
use crate::report::{Report, Sample};
use crate::scenario::{FaultKind, Scenario, Start};
use crate::timeline::Timeline;

const SECRET: &[u8] = b"simulated-cluster-secret";
const CONVERSATIONS: &str = "conversations";
/// How often a held request is routed again (the node's `HOLD_TICK`).
const HOLD_TICK_US: u64 = 50_000;
/// How often nodes measure their load (the node's `LOAD_PERIOD`).
const LOAD_PERIOD_US: u64 = 1_000_000;
/// Placement builds kept for reuse (nodes with the same view share one).
const BUILDS_CACHED_MAX: usize = 64;
/// Nodes whose membership view the time series samples (evenly spaced), to keep sampling
/// cheap at thousands of nodes.
const SAMPLED_VIEWS_MAX: usize = 32;
/// Shards the ownership checker looks at every sample (evenly spread).
const CHECKED_SHARDS: u32 = 64;

type NodeIx = u16;
type TurnId = u64;

/// A simulated node: its process state and what the node's code would hold.
struct SimNode {
    name: String,
    addr: SocketAddr,
    incarnation: u64,
    /// Started and not crashed (it may be frozen: see `SimNet::is_running`).
    started: bool,
    /// Membership says this node joined the cluster (until then it runs no turns).
    joined: bool,
    draining: bool,
    view: Arc<Placement>,
    view_dirty: bool,
    /// Fingerprints of the live set and ring members the view was computed from.
    live: Fingerprint,
    ring: Fingerprint,
    guard: MajorityGuard,
    guard_checked_at: Option<u64>,
    serving: bool,
    busy: usize,
    queue: VecDeque<TurnId>,
    /// Turns in service or queued here (failed when the node crashes).
    here: BTreeSet<TurnId>,
    served_period: u64,
    shard_turns: BTreeMap<ShardId, u32>,
    load: f64,
    rebalancer: Rebalancer,
    was_overloaded: bool,
}

struct Turn {
    conv: u32,
    /// When the client first sent it, and when this attempt started.
    first_us: u64,
    attempt_us: u64,
    at: NodeIx,
    hops: u8,
    waited_us: u64,
    failed_once: bool,
    bot: usize,
}

#[derive(Default, Clone)]
struct Conv {
    holder: Option<NodeIx>,
    epoch: u64,
    /// (node, turns it holds)
    copies: Vec<(NodeIx, u64)>,
    acked: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Arrival { flash: Option<u16> },
    Route { turn: TurnId },
    Deliver { turn: TurnId, to: NodeIx },
    Done { turn: TurnId, node: NodeIx },
    Retry { turn: TurnId },
    Fault { index: u32 },
    Restart { node: NodeIx },
    LoadTick,
    Sample,
    GuardCheck { node: NodeIx },
}

pub struct World {
    sc: Scenario,
    seed: u64,
    net: SimNet,
    rng: StdRng,
    now_us: u64,
    events: Timeline<Event>,
    nodes: Vec<SimNode>,
    /// Started nodes, in index order (clients pick among them).
    up: Vec<NodeIx>,
    by_addr: BTreeMap<SocketAddr, NodeIx>,
    by_name: BTreeMap<String, NodeIx>,
    placement_cfg: PlacementConfig,
    empty: Arc<Placement>,
    /// Builds by ring fingerprint (a 64-bit sum of name hashes plus the count).
    builds: HashMap<Fingerprint, Arc<Placement>>,
    moves: MoveTable,
    records: Vec<MoveRecord>,
    convs: Vec<Conv>,
    shards: Vec<ShardId>,
    zipf: Option<Zipf<f64>>,
    flash_sets: Vec<Vec<u32>>,
    turns: BTreeMap<TurnId, Turn>,
    next_turn: TurnId,
    rules: HoldRules,
    service: Vec<(f64, Option<Exp<f64>>)>,
    // Results.
    latency: Histogram<u64>,
    period_latency: Histogram<u64>,
    samples: Vec<Sample>,
    acked_total: u64,
    acked_period: u64,
    failed_attempts: u64,
    turns_lost: u64,
    fenced_writes: u64,
    handoffs: u64,
    shards_moved: u64,
    /// Per conversation, (first send, answer) of each turn that failed at least once.
    unavailable: BTreeMap<u32, Vec<(u64, u64)>>,
    crashed_at: BTreeMap<NodeIx, u64>,
    detections: Vec<(u64, Option<u64>)>,
    false_downs: u64,
    failures: Vec<String>,
    sent_turns: u64,
    /// Shards that had two owners at the last sample, and samples with any.
    dual_owners: BTreeSet<ShardId>,
    dual_owner_samples: u64,
}

impl World {
    pub fn new(sc: Scenario, seed: u64) -> World {
        let model = NetModel {
            latency_ms_min: sc.network.latency_ms_min,
            latency_ms_max: sc.network.latency_ms_max,
            loss: sc.network.loss,
            duplicate: sc.network.duplicate,
        };
        let net = SimNet::with_model(sc.gossip.clone(), model, seed ^ 0x6e65_7477).without_trace();
        let placement_cfg = PlacementConfig {
            shard_count: sc.placement.shard_count,
            vnodes: sc.placement.vnodes,
            strategy: sc.placement.strategy,
            bound_epsilon_permille: sc.placement.bound_epsilon_permille,
        };
        let shards = (0..sc.workload.conversations)
            .map(|c| shard_of(&conv_name(c), placement_cfg.shard_count))
            .collect();
        let zipf = (sc.workload.zipf_s > 0.0).then(|| {
            Zipf::new(sc.workload.conversations as f64, sc.workload.zipf_s)
                .expect("zipf parameters")
        });
        let total_share: f64 = sc.service.bots.iter().map(|b| b.share).sum();
        let mut cumulative = 0.0;
        let service = sc
            .service
            .bots
            .iter()
            .map(|b| {
                cumulative += b.share / total_share;
                (
                    cumulative,
                    (b.mean_ms > 0.0).then(|| Exp::new(1.0 / (b.mean_ms * 1000.0)).expect("rate")),
                )
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let flash_sets = sc
            .workload
            .flash
            .iter()
            .map(|f| {
                (0..f.conversations)
                    .map(|_| rng.random_range(0..sc.workload.conversations) as u32)
                    .collect()
            })
            .collect();
        let empty = Arc::new(Placement::build(&[], &placement_cfg));
        let mut world = World {
            empty: empty.clone(),
            convs: vec![Conv::default(); sc.workload.conversations],
            seed,
            net,
            rng,
            now_us: 0,
            events: Timeline::default(),
            nodes: Vec::new(),
            up: Vec::new(),
            by_addr: BTreeMap::new(),
            by_name: BTreeMap::new(),
            builds: HashMap::new(),
            moves: MoveTable::default(),
            records: Vec::new(),
            shards,
            zipf,
            flash_sets,
            turns: BTreeMap::new(),
            next_turn: 0,
            rules: HoldRules::default(),
            service,
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram"),
            period_latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram"),
            samples: Vec::new(),
            acked_total: 0,
            acked_period: 0,
            failed_attempts: 0,
            turns_lost: 0,
            fenced_writes: 0,
            handoffs: 0,
            shards_moved: 0,
            unavailable: BTreeMap::new(),
            crashed_at: BTreeMap::new(),
            detections: Vec::new(),
            false_downs: 0,
            failures: Vec::new(),
            sent_turns: 0,
            dual_owners: BTreeSet::new(),
            dual_owner_samples: 0,
            placement_cfg,
            sc,
        };
        for _ in 0..world.sc.nodes {
            world.add_node();
        }
        if world.sc.start == Start::Formed {
            // Every node holds every other as up from the start (no joins, no MemberUp
            // notices): each has joined and its view is built from its full table.
            world.net.assume_formed();
            for node in &mut world.nodes {
                node.joined = true;
                node.view_dirty = true;
            }
        }
        for i in 0..world.sc.faults.len() {
            let at = (world.sc.faults[i].at_s * 1e6) as u64;
            world.schedule(at, Event::Fault { index: i as u32 });
        }
        let start = (world.sc.workload.start_s * 1e6) as u64;
        world.schedule(start, Event::Arrival { flash: None });
        for i in 0..world.sc.workload.flash.len() {
            let at = (world.sc.workload.flash[i].at_s * 1e6) as u64;
            world.schedule(at, Event::Arrival { flash: Some(i as u16) });
        }
        world.schedule(LOAD_PERIOD_US, Event::LoadTick);
        world.schedule(world.sc.sample_ms * 1000, Event::Sample);
        world
    }

    fn schedule(&mut self, at_us: u64, event: Event) {
        self.events.push(at_us, event);
    }

    fn addr_of(i: usize) -> SocketAddr {
        SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7002))
    }

    fn identity(&self, i: usize, incarnation: u64) -> NodeId {
        let addr = Self::addr_of(i);
        let at = |port: u16| SocketAddr::new(addr.ip(), port);
        NodeId {
            name: format!("n{i}"),
            gossip: addr,
            cluster: at(7001),
            client: at(7000),
            admin: at(7003),
            incarnation,
            bump: 0,
            roles: vec![CONVERSATIONS.into()],
            capacity: 100,
        }
    }

    /// Starts a new node, seeded with the first node (the others find it through it).
    fn add_node(&mut self) -> NodeIx {
        let i = self.nodes.len();
        let node = SimNode {
            name: format!("n{i}"),
            addr: Self::addr_of(i),
            incarnation: 0,
            started: false,
            joined: false,
            draining: false,
            view: self.empty.clone(),
            view_dirty: true,
            live: Fingerprint::default(),
            ring: Fingerprint::default(),
            guard_checked_at: None,
            guard: MajorityGuard::new(&format!("n{i}"), self.now_ms(), 5000),
            serving: true,
            busy: 0,
            queue: VecDeque::new(),
            here: BTreeSet::new(),
            served_period: 0,
            shard_turns: BTreeMap::new(),
            load: 0.0,
            rebalancer: Rebalancer::new(self.rebalance_cfg()),
            was_overloaded: false,
        };
        self.by_addr.insert(node.addr, i as NodeIx);
        self.by_name.insert(node.name.clone(), i as NodeIx);
        self.nodes.push(node);
        self.start(i as NodeIx);
        i as NodeIx
    }

    fn rebalance_cfg(&self) -> rebalance::RebalanceConfig {
        rebalance::RebalanceConfig::from(&self.sc.rebalance)
    }

    fn start(&mut self, n: NodeIx) {
        let i = usize::from(n);
        let incarnation = self.nodes[i].incarnation + 1;
        let seeds: Vec<SocketAddr> = if i == 0 {
            (1..self.nodes.len().min(4)).map(Self::addr_of).collect()
        } else {
            vec![Self::addr_of(0)]
        };
        let id = self.identity(i, incarnation);
        let rng_seed = self.seed.wrapping_mul(31).wrapping_add(i as u64 * 7919 + incarnation);
        self.net.start(id, &seeds, SECRET, rng_seed);
        let now = self.now_ms();
        let node = &mut self.nodes[i];
        node.incarnation = incarnation;
        node.started = true;
        node.joined = false;
        node.draining = false;
        node.view_dirty = true;
        node.live = Fingerprint::default();
        node.ring = Fingerprint::default();
        node.view = self.empty.clone();
        node.guard_checked_at = None;
        node.guard = MajorityGuard::new(&node.name, now, stable_after_ms());
        node.serving = true;
        self.crashed_at.remove(&n);
        if let Err(at) = self.up.binary_search(&n) {
            self.up.insert(at, n);
        }
    }

    fn now_ms(&self) -> u64 {
        self.now_us / 1000
    }

    /// Runs the scenario to its end and reports.
    pub fn run(mut self, mut progress: impl FnMut(f64)) -> Report {
        let end_us = self.sc.duration_s * 1_000_000;
        let mut next_progress = 0.0;
        while let Some((at, event)) = self.events.pop() {
            if at > end_us {
                break;
            }
            self.advance(at);
            self.handle(event);
            let done = at as f64 / end_us as f64;
            if done >= next_progress {
                progress(done);
                next_progress += 0.05;
            }
        }
        self.advance(end_us);
        progress(1.0);
        self.finish()
    }

    /// Moves simulated time to `at_us`: the network first, then what nodes noticed.
    fn advance(&mut self, at_us: u64) {
        self.now_us = at_us;
        self.net.run_until(at_us / 1000);
        for notice in self.net.take_notices() {
            let Some(&n) = self.by_addr.get(&notice.node) else { continue };
            self.nodes[usize::from(n)].view_dirty = true;
            match &notice.effect {
                Effect::MemberDown(id) => self.on_down(n, id, notice.at_ms),
                Effect::Joined | Effect::Rejoined(_) => self.nodes[usize::from(n)].joined = true,
                _ => {}
            }
        }
    }

    fn on_down(&mut self, observer: NodeIx, id: &NodeId, at_ms: u64) {
        let Some(&who) = self.by_addr.get(&id.gossip) else { return };
        let w = &self.nodes[usize::from(who)];
        if let Some(crashed) = self.crashed_at.get(&who) {
            // First and last detection of this crash.
            if let Some(d) = self.detections.iter_mut().rev().find(|d| d.0 == *crashed) {
                d.1 = Some(d.1.map_or(at_ms, |t: u64| t.max(at_ms)));
            }
            return;
        }
        let left = w.draining || id.incarnation < w.incarnation;
        let reachable = self.net.reachable(self.nodes[usize::from(observer)].addr, w.addr);
        if !left && self.net.is_running(w.addr) && reachable {
            self.false_downs += 1;
        }
    }

    /// The node's placement view, rebuilt if its membership changed (builds are shared
    /// between nodes that see the same members).
    fn view(&mut self, n: NodeIx) -> Arc<Placement> {
        let i = usize::from(n);
        if self.nodes[i].view_dirty {
            // Keep-majority moves its baseline only after membership was stable for a
            // while: look again then.
            let stable = stable_after_ms() * 1000;
            self.schedule(self.now_us + stable + 1000, Event::GuardCheck { node: n });
            return self.refresh(n);
        }
        self.nodes[i].view.clone()
    }

    /// Recomputes the node's placement view and keep-majority verdict from its membership.
    fn refresh(&mut self, n: NodeIx) -> Arc<Placement> {
        let i = usize::from(n);
        self.nodes[i].view_dirty = false;
        let Some(m) = self.net.membership(self.nodes[i].addr) else {
            return self.nodes[i].view.clone();
        };
        // Fingerprints of the live set and of the ring members (order-independent sums of
        // name hashes, with the counts), so that an unchanged view costs no copies.
        let (mut live, mut ring) = (Fingerprint::default(), Fingerprint::default());
        m.visit_members(|id, state| {
            if state == MemberState::Down {
                return;
            }
            let h = xxh3_64(id.name.as_bytes());
            live.add(h);
            if id.has_role(CONVERSATIONS) {
                ring.add(h ^ u64::from(id.capacity).rotate_left(32));
            }
        });
        let now = self.now_ms();
        let guard_due =
            self.nodes[i].guard_checked_at.is_none_or(|at| now >= at + stable_after_ms());
        if self.nodes[i].live != live {
            let mut names = BTreeSet::new();
            m.visit_members(|id, state| {
                if state != MemberState::Down {
                    names.insert(id.name.clone());
                }
            });
            let node = &mut self.nodes[i];
            node.serving = node.guard.observe(&names, now);
            node.live = live;
            node.guard_checked_at = Some(now);
        } else if guard_due {
            let node = &mut self.nodes[i];
            node.serving = node.guard.tick(now);
            node.guard_checked_at = Some(now);
        }
        if self.nodes[i].ring == ring {
            return self.nodes[i].view.clone();
        }
        if self.builds.len() > BUILDS_CACHED_MAX {
            // Builds are pure functions of the members: dropping them changes no result.
            self.builds.clear();
        }
        let view = match self.builds.get(&ring) {
            Some(view) => view.clone(),
            None => {
                let mut members = Vec::with_capacity(ring.count as usize);
                m.visit_members(|id, state| {
                    if state != MemberState::Down && id.has_role(CONVERSATIONS) {
                        members.push(RingMember { name: id.name.clone(), capacity: id.capacity });
                    }
                });
                // Derived from the node's current view: usually one member apart.
                let base = &self.nodes[i].view;
                let view = Arc::new(Placement::rebuild_from(base, &members, &self.placement_cfg));
                self.builds.insert(ring, view.clone());
                view
            }
        };
        self.nodes[i].ring = ring;
        self.nodes[i].view = view.clone();
        view
    }

    fn owner_in(&mut self, n: NodeIx, shard: ShardId) -> Option<NodeIx> {
        let view = self.view(n);
        let owner = self.moves.owner(&view, shard)?;
        self.by_name.get(owner).copied()
    }

    fn preference(&mut self, n: NodeIx, shard: ShardId) -> Vec<NodeIx> {
        let view = self.view(n);
        let list = self.moves.preference_list(&view, shard, self.sc.replication.factor);
        list.iter().filter_map(|name| self.by_name.get(*name).copied()).collect()
    }

    /// The members of `node`'s preference list for `shard` it can reach (itself
    /// included), if they make the write quorum.
    fn quorum(&mut self, node: NodeIx, shard: ShardId) -> Option<Vec<NodeIx>> {
        let pref = self.preference(node, shard);
        let reachable: Vec<NodeIx> =
            pref.iter().copied().filter(|&p| p == node || self.reaches(node, p)).collect();
        let quorum = write_quorum(self.sc.replication.write_quorum, pref.len());
        (reachable.contains(&node) && reachable.len() >= quorum).then_some(reachable)
    }

    fn latency_us(&mut self) -> u64 {
        let (lo, hi) = (self.sc.network.latency_ms_min, self.sc.network.latency_ms_max);
        1000 * if lo == hi { lo } else { self.rng.random_range(lo..=hi) }
    }

    /// `from` can hand something to `to` over the network right now.
    fn reaches(&self, from: NodeIx, to: NodeIx) -> bool {
        let (a, b) = (self.nodes[usize::from(from)].addr, self.nodes[usize::from(to)].addr);
        self.net.is_running(b) && self.net.reachable(a, b)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Arrival { flash } => self.arrival(flash),
            Event::Route { turn } => self.route(turn),
            Event::Deliver { turn, to } => {
                if let Some(t) = self.turns.get_mut(&turn) {
                    t.at = to;
                    self.route(turn);
                }
            }
            Event::Done { turn, node } => self.done(turn, node),
            Event::Retry { turn } => self.retry(turn),
            Event::Fault { index } => self.fault(index as usize),
            Event::Restart { node } => {
                if !self.nodes[usize::from(node)].started {
                    self.start(node);
                }
            }
            Event::LoadTick => self.load_tick(),
            Event::Sample => self.sample(),
            Event::GuardCheck { node } => {
                let i = usize::from(node);
                if self.nodes[i].started {
                    self.nodes[i].guard_checked_at = None;
                    let _ = self.refresh(node);
                }
            }
        }
    }

    fn rate(&self, t_s: f64) -> f64 {
        let w = &self.sc.workload;
        let diurnal = 1.0
            + w.diurnal_amplitude * (2.0 * std::f64::consts::PI * t_s / w.diurnal_period_s).sin();
        (w.turns_per_s * diurnal).max(0.0)
    }

    fn arrival(&mut self, flash: Option<u16>) {
        let t_s = self.now_us as f64 / 1e6;
        let (rate, conv) = match flash {
            None => {
                let conv = match &self.zipf {
                    Some(z) => z.sample(&mut self.rng) as usize - 1,
                    None => self.rng.random_range(0..self.sc.workload.conversations),
                };
                (self.rate(t_s), conv as u32)
            }
            Some(f) => {
                let spec = &self.sc.workload.flash[usize::from(f)];
                if t_s >= spec.at_s + spec.duration_s {
                    return;
                }
                let set = &self.flash_sets[usize::from(f)];
                (spec.turns_per_s, set[self.rng.random_range(0..set.len())])
            }
        };
        if rate > 0.0 {
            let gap = Exp::new(rate).expect("rate").sample(&mut self.rng);
            self.schedule(self.now_us + (gap * 1e6).max(1.0) as u64, Event::Arrival { flash });
        } else {
            self.schedule(self.now_us + 1_000_000, Event::Arrival { flash });
        }
        let u: f64 = self.rng.random();
        let bot = self.service.iter().position(|(c, _)| u <= *c).unwrap_or(0);
        let id = self.next_turn;
        self.next_turn += 1;
        self.sent_turns += 1;
        let turn = Turn {
            conv,
            first_us: self.now_us,
            attempt_us: self.now_us,
            at: 0,
            hops: 0,
            waited_us: 0,
            failed_once: false,
            bot,
        };
        self.turns.insert(id, turn);
        self.attempt(id);
    }

    /// A client sends (or resends) the turn to a node it can reach.
    fn attempt(&mut self, id: TurnId) {
        if self.up.is_empty() {
            return self.fail(id, self.sc.workload.retry_ms * 1000);
        }
        let gateway = self.up[self.rng.random_range(0..self.up.len())];
        let Some(t) = self.turns.get_mut(&id) else { return };
        t.attempt_us = self.now_us;
        t.at = gateway;
        t.hops = 0;
        t.waited_us = 0;
        if !self.net.is_running(self.nodes[usize::from(gateway)].addr) {
            // Frozen: the client hears nothing until its timeout.
            return self.fail(id, self.sc.workload.timeout_ms * 1000);
        }
        self.route(id);
    }

    /// The attempt failed; the client tries again after `after_us`.
    fn fail(&mut self, id: TurnId, after_us: u64) {
        self.failed_attempts += 1;
        if let Some(t) = self.turns.get_mut(&id) {
            t.failed_once = true;
        }
        self.schedule(self.now_us + after_us, Event::Retry { turn: id });
    }

    fn retry(&mut self, id: TurnId) {
        if self.turns.contains_key(&id) {
            self.attempt(id);
        }
    }

    fn route(&mut self, id: TurnId) {
        let Some(t) = self.turns.get(&id) else { return };
        let (at, hops, waited_us, conv) = (t.at, t.hops, t.waited_us, t.conv);
        let i = usize::from(at);
        if !self.net.is_running(self.nodes[i].addr) {
            return self.fail(id, self.sc.workload.timeout_ms * 1000);
        }
        let shard = self.shards[conv as usize];
        let owner = self.owner_in(at, shard);
        if !self.nodes[i].serving {
            return self.refuse(id);
        }
        let owner_name = owner.map(|o| self.nodes[usize::from(o)].name.clone());
        let mut waited_ms = waited_us / 1000;
        if self.nodes[i].draining {
            waited_ms = waited_ms.max(self.rules.grace_ms);
        }
        let ask = Ask {
            me: &self.nodes[i].name,
            joined: self.nodes[i].joined,
            owner: owner_name.as_deref(),
            hops,
            waited_ms,
            behind: false,
        };
        match handoff::route(ask, &self.rules) {
            Step::Local => self.serve(id, at, shard),
            Step::Forward(_) => {
                let to = owner.expect("forward has an owner");
                if !self.reaches(at, to) {
                    return self.fail(id, self.sc.workload.timeout_ms * 1000);
                }
                let t = self.turns.get_mut(&id).expect("turn");
                t.hops += 1;
                t.waited_us = 0;
                let lat = self.latency_us();
                self.schedule(self.now_us + lat, Event::Deliver { turn: id, to });
            }
            Step::Hold => {
                self.turns.get_mut(&id).expect("turn").waited_us += HOLD_TICK_US;
                self.schedule(self.now_us + HOLD_TICK_US, Event::Route { turn: id });
            }
            Step::Refuse(_) => self.refuse(id),
        }
    }

    /// `unavailable`: the answer travels back, the client retries.
    fn refuse(&mut self, id: TurnId) {
        let back = self.latency_us();
        self.fail(id, back + self.sc.workload.retry_ms * 1000);
    }

    /// The owner runs the turn: acquire if it does not hold the conversation yet, then
    /// queue for a worker.
    fn serve(&mut self, id: TurnId, node: NodeIx, shard: ShardId) {
        let conv = self.turns[&id].conv as usize;
        let mut delay = 0;
        if self.convs[conv].holder != Some(node) {
            let Some(reachable) = self.quorum(node, shard) else { return self.refuse(id) };
            let c = &mut self.convs[conv];
            let newest = c
                .copies
                .iter()
                .filter(|(n, _)| reachable.contains(n))
                .map(|(_, turns)| *turns)
                .max()
                .unwrap_or(0);
            if newest < c.acked {
                self.turns_lost += c.acked - newest;
                self.failures.push(format!(
                    "{:.3}s: conversation c{conv} acquired by n{node} from turn {newest}, \
                     but {} were acknowledged (previous holder {:?}, copies {:?}, reachable \
                     preference list {reachable:?})",
                    self.now_us as f64 / 1e6,
                    c.acked,
                    c.holder,
                    c.copies
                ));
                c.acked = newest;
            }
            if c.holder.is_some() {
                self.handoffs += 1;
            }
            c.holder = Some(node);
            c.epoch += 1;
            for &p in &reachable {
                set_copy(&mut c.copies, p, newest);
            }
            // Fence round trip to the replicas.
            delay = 2 * self.latency_us();
        }
        let n = &mut self.nodes[usize::from(node)];
        n.here.insert(id);
        *n.shard_turns.entry(shard).or_default() += 1;
        if n.busy < self.sc.service.workers_per_node {
            n.busy += 1;
            let service = self.service_time(id);
            self.schedule(self.now_us + delay + service, Event::Done { turn: id, node });
        } else {
            n.queue.push_back(id);
        }
    }

    fn service_time(&mut self, id: TurnId) -> u64 {
        let bot = self.turns[&id].bot;
        match self.service[bot].1 {
            Some(exp) => exp.sample(&mut self.rng) as u64,
            None => 0,
        }
    }

    fn done(&mut self, id: TurnId, node: NodeIx) {
        let i = usize::from(node);
        if !self.nodes[i].here.remove(&id) {
            return; // the node crashed meanwhile; the client timed out
        }
        // The worker takes the next queued turn.
        if let Some(next) = self.nodes[i].queue.pop_front() {
            let service = self.service_time(next);
            self.schedule(self.now_us + service, Event::Done { turn: next, node });
        } else {
            self.nodes[i].busy -= 1;
        }
        let Some(t) = self.turns.get(&id) else { return };
        let (conv, hops) = (t.conv as usize, t.hops);
        let shard = self.shards[conv];
        if self.convs[conv].holder != Some(node) {
            // Another node acquired the conversation meanwhile: this write is fenced.
            self.fenced_writes += 1;
            return self.refuse(id);
        }
        let Some(reachable) = self.quorum(node, shard) else { return self.refuse(id) };
        let c = &mut self.convs[conv];
        let turn_no = c.copies.iter().find(|(n, _)| *n == node).map_or(0, |x| x.1) + 1;
        for &p in &reachable {
            set_copy(&mut c.copies, p, turn_no);
        }
        c.acked = c.acked.max(turn_no);
        self.nodes[i].served_period += 1;
        // Replica round trip, then the answer's way back to the client.
        let back = 2 * self.latency_us() + self.latency_us() * u64::from(hops.min(1));
        let t = self.turns.remove(&id).expect("turn");
        let finished = self.now_us + back;
        let latency = finished - t.first_us;
        self.latency.saturating_record(latency.max(1));
        self.period_latency.saturating_record(latency.max(1));
        if t.failed_once {
            self.unavailable.entry(t.conv).or_default().push((t.first_us, finished));
        }
        self.acked_total += 1;
        self.acked_period += 1;
    }

    fn fault(&mut self, index: usize) {
        let fault = self.sc.faults[index].kind.clone();
        let node_list = |nodes: &Vec<usize>| -> Vec<NodeIx> {
            nodes.iter().filter(|&&n| n < self.nodes.len()).map(|&n| n as NodeIx).collect()
        };
        match fault {
            FaultKind::Crash { nodes } => {
                for n in node_list(&nodes) {
                    self.crash(n);
                }
            }
            FaultKind::Restart { nodes } => {
                for n in node_list(&nodes) {
                    if self.nodes[usize::from(n)].started {
                        self.crash(n);
                    }
                    self.start(n);
                }
            }
            FaultKind::Freeze { nodes } | FaultKind::Thaw { nodes } => {
                let frozen = matches!(self.sc.faults[index].kind, FaultKind::Freeze { .. });
                for n in node_list(&nodes) {
                    self.net.set_frozen(self.nodes[usize::from(n)].addr, frozen);
                }
            }
            FaultKind::Partition { nodes } => {
                let side: Vec<SocketAddr> =
                    node_list(&nodes).iter().map(|&n| self.nodes[usize::from(n)].addr).collect();
                self.net.partition(&[side]);
            }
            FaultKind::Heal => self.net.heal(),
            FaultKind::Join { count } => {
                for _ in 0..count {
                    self.add_node();
                }
            }
            FaultKind::Drain { nodes } => {
                for n in node_list(&nodes) {
                    self.drain(n);
                }
            }
            FaultKind::RollingRestart { every_s } => {
                let every = (every_s * 1e6) as u64;
                let running: Vec<NodeIx> = (0..self.nodes.len() as NodeIx)
                    .filter(|&n| self.nodes[usize::from(n)].started)
                    .collect();
                for (k, n) in running.into_iter().enumerate() {
                    let at = self.now_us + k as u64 * every;
                    let crash_at = at;
                    // A rolling restart drains each node (graceful), then starts it again.
                    self.sc.faults.push(crate::scenario::Fault {
                        at_s: crash_at as f64 / 1e6,
                        kind: FaultKind::Drain { nodes: vec![usize::from(n)] },
                    });
                    let idx = self.sc.faults.len() as u32 - 1;
                    self.schedule(crash_at, Event::Fault { index: idx });
                    // The drained node leaves a second after its drain starts.
                    self.schedule(at + (every / 2).max(1_500_000), Event::Restart { node: n });
                }
            }
            FaultKind::CrashLeader { down_s } => {
                self.crash(0);
                self.schedule(self.now_us + (down_s * 1e6) as u64, Event::Restart { node: 0 });
            }
            FaultKind::Churn { count, every_s, down_s } => {
                for k in 0..count {
                    let at = self.now_us + (k as f64 * every_s * 1e6) as u64;
                    let victim = self.rng.random_range(0..self.nodes.len()) as NodeIx;
                    self.sc.faults.push(crate::scenario::Fault {
                        at_s: at as f64 / 1e6,
                        kind: FaultKind::Crash { nodes: vec![usize::from(victim)] },
                    });
                    let idx = self.sc.faults.len() as u32 - 1;
                    self.schedule(at, Event::Fault { index: idx });
                    self.schedule(at + (down_s * 1e6) as u64, Event::Restart { node: victim });
                }
            }
        }
    }

    fn crash(&mut self, n: NodeIx) {
        let i = usize::from(n);
        if !self.nodes[i].started {
            return;
        }
        self.net.crash(self.nodes[i].addr);
        self.up.retain(|&u| u != n);
        let node = &mut self.nodes[i];
        node.started = false;
        node.busy = 0;
        node.queue.clear();
        let lost: Vec<TurnId> = std::mem::take(&mut node.here).into_iter().collect();
        let now_ms = self.now_ms();
        self.crashed_at.insert(n, now_ms);
        self.detections.push((now_ms, None));
        for id in lost {
            // Their clients time out and retry elsewhere.
            let remaining = self.turns.get(&id).map_or(0, |t| {
                (t.attempt_us + self.sc.workload.timeout_ms * 1000).saturating_sub(self.now_us)
            });
            self.fail(id, remaining);
        }
    }

    /// Graceful: drop the conversations role (every view rebuilds without it), then
    /// leave a moment later; queued turns finish or are handed on by routing.
    fn drain(&mut self, n: NodeIx) {
        let i = usize::from(n);
        if !self.nodes[i].started {
            return;
        }
        self.nodes[i].draining = true;
        let addr = self.nodes[i].addr;
        if let Some(m) = self.net.membership_mut(addr) {
            m.drop_role(CONVERSATIONS);
        }
        // Leave once its conversations moved (the node waits for that; about a second).
        self.sc.faults.push(crate::scenario::Fault {
            at_s: self.now_us as f64 / 1e6 + 1.0,
            kind: FaultKind::Crash { nodes: vec![i] },
        });
        let idx = self.sc.faults.len() as u32 - 1;
        self.schedule(self.now_us + 1_000_000, Event::Fault { index: idx });
    }

    /// Every node measures its load; every rebalancing interval each runs the rebalancer
    /// on the loads of the last period.
    fn load_tick(&mut self) {
        self.schedule(self.now_us + LOAD_PERIOD_US, Event::LoadTick);
        for node in &mut self.nodes {
            node.load = node.served_period as f64 * 1e6 / LOAD_PERIOD_US as f64;
            node.served_period = 0;
        }
        let rounds_every = (self.sc.rebalance.interval_ms * 1000 / LOAD_PERIOD_US).max(1);
        let round = self.now_us / LOAD_PERIOD_US;
        if !self.sc.rebalance.enabled || !round.is_multiple_of(rounds_every) {
            for node in &mut self.nodes {
                node.shard_turns.clear();
            }
            return;
        }
        let moved_in = self.moves.moved_in();
        let loads: Vec<NodeLoad> = self
            .nodes
            .iter()
            .filter(|n| n.started && !n.draining)
            .map(|n| NodeLoad {
                name: n.name.clone(),
                load: n.load,
                capacity: 100,
                moved_in: moved_in.get(n.name.as_str()).copied().unwrap_or(0),
            })
            .collect();
        let avg = rebalance::average(&loads);
        let min = f64::from(self.sc.rebalance.min_turns_per_s);
        for i in 0..self.nodes.len() {
            let shard_turns = std::mem::take(&mut self.nodes[i].shard_turns);
            if !self.nodes[i].started || self.nodes[i].draining {
                continue;
            }
            let cfg = self.rebalance_cfg();
            let node = &mut self.nodes[i];
            let overloaded = node.load / 100.0 > cfg.overload_ratio * avg;
            let decide =
                loads.len() >= 2 && avg * 100.0 >= min && overloaded && node.was_overloaded;
            node.was_overloaded = overloaded;
            if !decide {
                continue;
            }
            // The counts cover the last load period (cleared every tick, as the node does).
            let period_s = LOAD_PERIOD_US as f64 / 1e6;
            let mut hot: Vec<(ShardId, u32)> = shard_turns.into_iter().collect();
            hot.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            hot.truncate(cfg.shards_considered());
            let shards: Vec<ShardLoad> = hot
                .iter()
                .map(|&(shard, turns)| ShardLoad { shard, rate: f64::from(turns) / period_s })
                .collect();
            let name = node.name.clone();
            let moves = node.rebalancer.decide(&name, &loads, &shards);
            if moves.len() > cfg.moves_per_round_max {
                self.failures.push(format!("{name} moved {} shards in one round", moves.len()));
            }
            for m in moves {
                let record = self.moves.next_record(m.shard, &m.to, &name);
                self.records.retain(|r| r.shard != m.shard);
                self.records.push(record);
                self.shards_moved += 1;
            }
        }
        let live: BTreeSet<String> = self
            .nodes
            .iter()
            .filter(|n| n.started && !n.draining)
            .map(|n| n.name.clone())
            .collect();
        self.records.retain(|r| live.contains(&r.to));
        self.moves = MoveTable::merge(&self.records);
    }

    /// The ownership checker: among the running nodes of the majority side that serve,
    /// at most one may see itself as a shard's owner. Views disagree for a moment while
    /// membership news spreads; a shard with two owners in two samples in a row fails.
    fn check_owners(&mut self) {
        let running: Vec<NodeIx> = self.up.clone();
        let mut sides: BTreeMap<u32, usize> = BTreeMap::new();
        for &n in &running {
            *sides.entry(self.net.side(self.nodes[usize::from(n)].addr)).or_default() += 1;
        }
        let Some((&major, &size)) =
            sides.iter().max_by_key(|(side, count)| (**count, Reverse(**side)))
        else {
            return;
        };
        if size * 2 <= running.len() {
            return; // no majority side
        }
        let owners: Vec<NodeIx> = running
            .into_iter()
            .filter(|&n| {
                let node = &self.nodes[usize::from(n)];
                node.joined
                    && !node.draining
                    && self.net.is_running(node.addr)
                    && self.net.side(node.addr) == major
            })
            .collect();
        let step = (self.placement_cfg.shard_count / CHECKED_SHARDS).max(1);
        let mut dual = BTreeSet::new();
        for k in 0..CHECKED_SHARDS.min(self.placement_cfg.shard_count) {
            let shard = k * step;
            let mut claimed: Vec<NodeIx> = Vec::new();
            for &n in &owners {
                let _ = self.view(n);
                if self.nodes[usize::from(n)].serving && self.owner_in(n, shard) == Some(n) {
                    claimed.push(n);
                }
            }
            if claimed.len() > 1 {
                if self.dual_owners.contains(&shard) {
                    // What each claimant's view lacks of the others' (capped).
                    let seen = |n: NodeIx| -> BTreeSet<&str> {
                        self.nodes[usize::from(n)]
                            .view
                            .members()
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect()
                    };
                    let union: BTreeSet<&str> = claimed.iter().flat_map(|&n| seen(n)).collect();
                    let views: Vec<String> = claimed
                        .iter()
                        .map(|&n| {
                            let mine = seen(n);
                            let missing: Vec<&str> = union
                                .iter()
                                .filter(|m| !mine.contains(*m))
                                .take(8)
                                .copied()
                                .collect();
                            format!("n{n} sees {} members, not {missing:?}", mine.len())
                        })
                        .collect();
                    self.failures.push(format!(
                        "{:.3}s: shard {shard} owned by {claimed:?} for two samples in a row ({})",
                        self.now_us as f64 / 1e6,
                        views.join("; ")
                    ));
                }
                dual.insert(shard);
            }
        }
        if !dual.is_empty() {
            self.dual_owner_samples += 1;
        }
        self.dual_owners = dual;
    }

    fn sample(&mut self) {
        self.schedule(self.now_us + self.sc.sample_ms * 1000, Event::Sample);
        self.check_owners();
        let period_s = self.sc.sample_ms as f64 / 1000.0;
        let serving: Vec<&SimNode> =
            self.nodes.iter().filter(|n| n.started && !n.draining).collect();
        let loads: Vec<f64> = serving.iter().map(|n| n.load).collect();
        let avg = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
        let max = loads.iter().copied().fold(0.0, f64::max);
        let min = loads.iter().copied().fold(f64::MAX, f64::min).min(max);
        let step = serving.len().div_ceil(SAMPLED_VIEWS_MAX).max(1);
        let up_views: Vec<usize> = serving
            .iter()
            .step_by(step)
            .filter_map(|n| self.net.membership(n.addr))
            .map(|m| m.count(MemberState::Up))
            .collect();
        let at = |q: f64| {
            if self.period_latency.is_empty() {
                0.0
            } else {
                self.period_latency.value_at_quantile(q) as f64 / 1000.0
            }
        };
        self.samples.push(Sample {
            t_s: self.now_us as f64 / 1e6,
            turns_per_s: self.acked_period as f64 / period_s,
            load_max_over_avg: if avg > 0.0 { max / avg } else { 1.0 },
            load_min_over_avg: if avg > 0.0 { min / avg } else { 1.0 },
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            nodes_running: serving.len(),
            members_up_min: up_views.iter().copied().min().unwrap_or(0),
            members_up_max: up_views.iter().copied().max().unwrap_or(0),
            failed_attempts: self.failed_attempts,
            moved_shards: self.shards_moved,
        });
        self.acked_period = 0;
        self.period_latency.reset();
    }

    fn finish(self) -> Report {
        let q = |p: f64| {
            if self.latency.is_empty() {
                0.0
            } else {
                self.latency.value_at_quantile(p) as f64 / 1000.0
            }
        };
        let detection: Vec<f64> = self
            .detections
            .iter()
            .filter_map(|(crashed, seen)| seen.map(|s| (s - crashed) as f64 / 1000.0))
            .collect();
        // Wall-clock time during which some turn of the conversation was failing (turns in
        // flight at once count once).
        let unavailable: Vec<f64> = self
            .unavailable
            .into_values()
            .map(|mut spans| covered_us(&mut spans) as f64 / 1e6)
            .collect();
        Report {
            scenario: self.sc.name.clone(),
            seed: self.seed,
            simulated_s: self.sc.duration_s,
            nodes_final: self.nodes.iter().filter(|n| n.started).count(),
            turns_sent: self.sent_turns,
            turns_acknowledged: self.acked_total,
            turns_in_flight_at_end: self.turns.len() as u64,
            failed_attempts: self.failed_attempts,
            latency_ms_p50: q(0.5),
            latency_ms_p99: q(0.99),
            latency_ms_p999: q(0.999),
            load_max_over_avg_mean: mean(self.samples.iter().skip(2).map(|s| s.load_max_over_avg)),
            load_max_over_avg_max: self
                .samples
                .iter()
                .skip(2)
                .map(|s| s.load_max_over_avg)
                .fold(0.0, f64::max),
            shards_moved: self.shards_moved,
            handoffs: self.handoffs,
            fenced_writes: self.fenced_writes,
            detection_s: detection,
            false_down_declarations: self.false_downs,
            unavailable_conversations: unavailable.len() as u64,
            unavailable_s_total: unavailable.iter().fold(0.0, |a, b| a + b),
            unavailable_s_max: unavailable.iter().copied().fold(0.0, f64::max),
            turns_lost: self.turns_lost,
            dual_owner_samples: self.dual_owner_samples,
            datagrams_sent: self.net.sent,
            datagrams_dropped: self.net.dropped,
            failures: self.failures,
            samples: self.samples,
            markers: self.sc.markers(),
        }
    }
}

/// An order-independent fingerprint of a set of names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Fingerprint {
    sum: u64,
    count: u32,
}

impl Fingerprint {
    fn add(&mut self, h: u64) {
        self.sum = self.sum.wrapping_add(h);
        self.count += 1;
    }
}

/// Length of the union of `[start, end)` spans.
fn covered_us(spans: &mut [(u64, u64)]) -> u64 {
    spans.sort_unstable();
    let (mut total, mut reach) = (0, 0);
    for &(start, end) in spans.iter() {
        let from = start.max(reach);
        if end > from {
            total += end - from;
        }
        reach = reach.max(end);
    }
    total
}

fn set_copy(copies: &mut Vec<(NodeIx, u64)>, node: NodeIx, turns: u64) {
    match copies.iter_mut().find(|(n, _)| *n == node) {
        Some(c) => c.1 = turns,
        None => copies.push((node, turns)),
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Keep-majority's stability window (the node's default).
fn stable_after_ms() -> u64 {
    botclaw_config::ReplicationConfig::default().stable_after_ms
}

/// The id of conversation `c`.
pub fn conv_name(c: usize) -> String {
    format!("c{c}")
}

#[cfg(test)]
mod tests {
    use super::covered_us;

    #[test]
    fn overlapping_spans_count_once() {
        assert_eq!(covered_us(&mut []), 0);
        assert_eq!(covered_us(&mut [(5, 10)]), 5);
        // Nested, overlapping, touching and disjoint, in no particular order.
        assert_eq!(covered_us(&mut [(20, 30), (0, 10), (2, 4), (8, 12), (12, 15)]), 25);
    }
}
