//! The authoritative placement protocol on simulated time: every node runs the real
//! membership (foca, on [`SimNet`]) as its failure detector, the real placement controller
//! ([`Controller`], raft-rs: three voters, every other node an observer of its log), the real
//! planner on the leader, and the real [`Ownership`] machine over a simulated store. Only
//! the transport, the disks and the clients are modelled.
//!
//! Checkers run after every step: every acknowledged write is durable on every in-sync
//! member of its shard in the newest committed map; every node that applied a log index
//! applied the same entry there; the map's invariants hold after every entry and every
//! transition obeys the rules (`shardmap::check_transition`), replayed in log order.
//!
//! This is the protocol a node runs (by default); scenario files run on
//! it through [`crate::by_map`] (`botclaw sim --model map`), and on the ring-based model of
//! `world.rs` with `--model ring`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use botclaw_config::{GossipConfig, PlacementConfig};
use botclaw_core::controller::leader::{LeaderPlanner, Round};
use botclaw_core::controller::{
    controller_id, Controller, ControllerConfig, ControllerError, ControllerId, ControllerMessage,
    Restored, SharedMaps,
};
use botclaw_core::load::member_loads;
use botclaw_core::ownership::{Effect, Msg, Ownership, OwnershipConfig};
use botclaw_core::placement::ShardId;
use botclaw_core::rebalance::{LoadRounds, MoveTable, Period, LOAD_PERIOD_MS};
use botclaw_core::shardmap::plan::{formed_map, PlanConfig, UpMember};
use botclaw_core::shardmap::{
    check_transition, leave_step, LeaveMode, LeaveStep, MapCommand, MemberIx, ShardMap,
};
use botclaw_core::{MemberState as Gossip, NodeId};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rustc_hash::FxHashMap;

use crate::net::{NetModel, SimNet};
use crate::timeline::Timeline;
use crate::writes::Writes;

const SECRET: &[u8] = b"simulated-cluster-secret";
const STEP_MS: u64 = 5;
/// Every this many committed entries the checker looks at the whole map (and recounts its
/// tally); after the others, at the entries that changed.
const FULL_CHECK_EVERY: u64 = 256;
/// Messages a frozen node's buffers hold.
const HELD_MAX: usize = 100_000;

/// A write: (shard, unique number).
pub type Write = (ShardId, u64);

#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    pub nodes: usize,
    /// The group's founding voters (the first nodes); the leader then keeps
    /// `controller.voters_target`, as a node's does.
    pub voters: usize,
    pub shards: u32,
    pub plan: PlanConfig,
    pub controller: ControllerConfig,
    /// Controller and ownership ticks.
    pub tick_ms: u64,
    /// Writes submitted per simulated second (at random gateways).
    pub writes_per_s: u64,
    /// Latency of every message between nodes (gossip included), uniform.
    pub latency_ms: (u64, u64),
    /// Time a store takes to make a write durable, uniform.
    pub store_ms: (u64, u64),
    /// Of the client requests, the share that are reads, in percent.
    pub reads_percent: u32,
    /// Test hook: an unavailable shard is forced onto a live member, as view-based acquire
    /// did (the checker must report the loss).
    pub force_unavailable: bool,
    /// Test hook: an owner's store drops every n-th write it is asked to persist, and
    /// says it persisted it (0: none); the checkers must report the writes missing.
    pub drop_owner_writes_every: u64,
    pub ownership: OwnershipConfig,
    /// Ownership messages (writes, acknowledgements, streams, proposals) lost, in
    /// thousandths; Raft and gossip keep their own settings.
    pub own_loss_permille: u32,
    /// The failure detector's settings, and the datagrams its network loses and
    /// duplicates (probabilities).
    pub gossip: GossipConfig,
    pub gossip_loss: f64,
    pub gossip_duplicate: f64,
    /// Ring points per member of the planner's ring.
    pub vnodes: u32,
    /// The cluster starts formed ([`crate::scenario::Start::Formed`]): every node's
    /// failure detector knows the others and the founding map has every node, with its
    /// shards; else the nodes boot together and join through `n0`.
    pub formed: bool,
    /// The node's `[rebalance]` settings: every node runs its load loop ([`LoadRounds`]),
    /// publishes its load over gossip and decides load-driven moves, which the leader's
    /// planner pins. `None`: no load loop, no load gossip.
    pub rebalance: Option<botclaw_config::RebalanceConfig>,
}

impl Default for AuthorityConfig {
    fn default() -> Self {
        AuthorityConfig {
            nodes: 5,
            voters: 3,
            shards: 64,
            plan: PlanConfig { moves_in_flight_max: 8, interval_ms: 200, ..Default::default() },
            controller: ControllerConfig {
                election_ticks: 10,
                heartbeat_ticks: 2,
                ..Default::default()
            },
            tick_ms: 50,
            writes_per_s: 2000,
            latency_ms: (1, 4),
            store_ms: (1, 3),
            reads_percent: 10,
            force_unavailable: false,
            drop_owner_writes_every: 0,
            ownership: OwnershipConfig::default(),
            own_loss_permille: 0,
            gossip: GossipConfig::default(),
            gossip_loss: 0.0,
            gossip_duplicate: 0.0,
            vnodes: 64,
            formed: false,
            rebalance: None,
        }
    }
}

/// The leader proposes `cmd`; a proposal left out as stale is counted.
fn propose(c: &mut Controller, cmd: &MapCommand, report: &mut AuthorityReport) {
    let stale = matches!(c.propose(cmd), Err(ControllerError::Stale));
    report.proposals_stale += u64::from(stale);
}

/// What a run saw.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AuthorityReport {
    pub writes_submitted: u64,
    pub writes_acknowledged: u64,
    /// Refused by the owner's machine, or failed after it took them.
    pub writes_failed: u64,
    /// Requests (writes and reads) the gateway could not route: no owner in its map (not
    /// assigned yet, unavailable), or the owner down, frozen or unreachable.
    pub requests_unrouted: u64,
    pub reads_served: u64,
    /// Reads refused or failed (no owner, lease run out, ownership lost meanwhile).
    pub reads_failed: u64,
    /// Entries the controller committed, in all and by command kind (`raft`: the group's
    /// own entries).
    pub entries: u64,
    pub entries_by_kind: BTreeMap<&'static str, u64>,
    pub leader_changes: u64,
    /// Shards without an owner now.
    pub unavailable_shards: usize,
    /// Ownership messages the network lost (`own_loss_permille`).
    pub messages_lost: u64,
    /// Writes on running nodes neither acknowledged nor failed 5 s after they were
    /// submitted (a client would have timed out).
    pub writes_stuck: usize,
    /// Acknowledged writes an in-sync member lacked when checked (each counted once).
    pub writes_lost: u64,
    /// Learners added (shards copied to a new member) and owners changed, over the
    /// committed log.
    pub learners_added: u64,
    pub owner_changes: u64,
    /// Committed entries that changed nothing (every part skipped: a stale epoch, a
    /// proposal already applied), by command kind.
    pub entries_without_effect: BTreeMap<&'static str, u64>,
    /// Proposals the leader did not append: every change in them stale or already in its
    /// log ([`botclaw_core::controller::ControllerError::Stale`]).
    pub proposals_stale: u64,
    /// Ticks at which a leader dropped the changes it had gathered (raft-rs refused them,
    /// or it no longer led); their owners propose them again.
    pub proposals_dropped: u64,
    /// Load-driven moves the nodes' load loops decided, and when the last was decided
    /// (simulated ms).
    pub load_moves: u64,
    pub load_moves_last_ms: Option<u64>,
    /// Checker findings (empty: nothing lost, no divergence, no rule broken).
    pub problems: Vec<String>,
    /// Per crash: seconds until every running node's failure detector declared the node
    /// down, and until the committed map named it owner of no shard (`None`: not within
    /// the run, or it restarted first).
    pub crashes: Vec<CrashTimes>,
    /// Per node joined to the running cluster: seconds until the leader's map named it
    /// owner of a shard, and until it was settled: no shard moving and the leader's planner
    /// at rest at that map, with the node owning shards (what `/status` shows on a node:
    /// `controller.owned`, `moves_in_flight`, `plan_settled`).
    pub joins: Vec<JoinTimes>,
}

/// How long the cluster took to react to one crash (simulated seconds after it).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct CrashTimes {
    pub node: String,
    pub at_s: f64,
    pub detected_s: Option<f64>,
    pub reassigned_s: Option<f64>,
}

/// How long the cluster took to take one joining node in (simulated seconds after it
/// started).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct JoinTimes {
    pub node: String,
    pub at_s: f64,
    pub owning_s: Option<f64>,
    pub settled_s: Option<f64>,
}

/// A join being followed.
struct Join {
    node: usize,
    at_ms: u64,
    owning_ms: Option<u64>,
    settled_ms: Option<u64>,
}

/// A crash being followed: who saw it so far.
struct Crash {
    node: usize,
    at_ms: u64,
    seen_by: BTreeSet<usize>,
    detected_ms: Option<u64>,
    reassigned_ms: Option<u64>,
    /// It restarted: nothing more is recorded.
    over: bool,
}

struct Node {
    name: String,
    addr: SocketAddr,
    raft_id: ControllerId,
    incarnation: u64,
    running: bool,
    controller: Option<Controller>,
    /// What its controller wrote durably.
    disk: Restored,
    ownership: Option<Ownership<Write>>,
    /// Durable writes per shard (kept across crashes). Keyed access only.
    store: FxHashMap<ShardId, Writes>,
    /// Store operations in flight: (done at, effect).
    store_queue: VecDeque<(u64, Effect<Write>)>,
    /// Writes this node's machine numbered: seq -> write.
    seqs: BTreeMap<u64, Write>,
    /// When each write in `seqs` was submitted (ms).
    seq_at: BTreeMap<u64, u64>,
    /// When it last heard from the controller's leader (or led it).
    heard_ms: Option<u64>,
    /// SIGSTOP: it neither acts nor receives; what reaches it waits here, in order.
    frozen: bool,
    held: VecDeque<Wire>,
    /// Writes it acknowledged as owner (for the load balance).
    acked: u64,
    /// Its load loop (with `rebalance`), when its next period ends, and the writes it
    /// took as owner in this period, in all and by shard.
    load: Option<LoadRounds>,
    load_due_ms: u64,
    turns_period: u64,
    shard_turns: BTreeMap<ShardId, u32>,
    /// Leaving (SIGTERM or an operator's drain), and when it last proposed its leave.
    leaving: Option<(LeaveMode, Option<u64>)>,
}

enum Wire {
    Controller(Box<ControllerMessage>),
    Own {
        from: MemberIx,
        msg: Msg<Write>,
    },
    /// A learner installs a streamed copy, then reports to `owner`.
    Stream {
        shard: ShardId,
        attempt: u64,
        owner: MemberIx,
        copy: Writes,
    },
    /// A proposal for the controller's leader.
    Propose(MapCommand),
}

/// The cluster.
pub struct Authority {
    cfg: AuthorityConfig,
    /// Maps shared by every node's controller: snapshots encoded and decoded once, each
    /// entry applied once.
    maps: Arc<SharedMaps>,
    pub net: SimNet,
    rng: StdRng,
    now_ms: u64,
    nodes: Vec<Node>,
    /// Messages in flight: (receiving node, message), by arrival.
    in_flight: Timeline<(usize, Wire)>,
    next_write: u64,
    /// Acknowledged writes per shard. (Every hash map here is only looked up by key, never
    /// iterated: nothing a run reports depends on hash order.)
    acked: FxHashMap<ShardId, Writes>,
    acked_count: u64,
    /// Acknowledged since the last check (checked against the current in-sync members).
    acked_new: Vec<Write>,
    /// Members that joined a shard's in-sync set since the last check (all the shard's
    /// writes checked on them; the members that stayed held them already, and stores only
    /// grow).
    dirty: BTreeSet<(ShardId, MemberIx)>,
    /// Acknowledged writes per shard in the order they were acknowledged.
    ack_order: FxHashMap<ShardId, Vec<u64>>,
    /// Reads asked: (node, seq) -> (shard, how many of the shard's writes were acknowledged
    /// when the read was asked).
    reads: BTreeMap<(usize, u64), (ShardId, usize)>,
    /// Per (node, shard): how many of the shard's acknowledged writes, in order, a read
    /// there already found in the node's store. Stores only grow, so a read checks only
    /// the writes acknowledged since (a hot shard's reads checked every write it ever had:
    /// at 100 nodes under Zipf popularity, 44% of the run).
    reads_verified: FxHashMap<(usize, ShardId), usize>,
    /// Per log index: (term, command) as first applied.
    history: BTreeMap<u64, (u64, Option<MapCommand>)>,
    /// The committed map replayed entry by entry from `history`, and its index.
    replayed: ShardMap,
    replayed_index: u64,
    leader: Option<ControllerId>,
    report: AuthorityReport,
    last_tick: u64,
    /// The leader's planner and the node it runs on.
    planner: Option<(usize, LeaderPlanner)>,
    /// Client requests go to shards below this (all when `None`).
    active_shards: Option<ShardId>,
    /// Latencies of acknowledged writes not yet taken (µs).
    latencies_us: Vec<u64>,
    /// Acknowledged writes found missing on an in-sync member.
    lost_writes: BTreeSet<Write>,
    /// Node index by name and by controller id.
    by_name: BTreeMap<String, usize>,
    by_raft: BTreeMap<ControllerId, usize>,
    /// Every node's controller id: the peers an observer asks for the leader (a node's
    /// failure detector knows them all).
    raft_ids: Arc<[ControllerId]>,
    /// Node index by member index, for every member of the committed map (indices are
    /// stable, and every node's map is a prefix of the committed one).
    by_member: Vec<Option<usize>>,
    /// Requests owed to the rate (thousandths of a request).
    write_credit: u64,
    /// Which shards requests go to: uniform (`None`), or conversations by a Zipf law
    /// (the shard of each, by rank).
    popularity: Option<(Zipf<f64>, Vec<ShardId>)>,
    /// Flash crowds: (requests per second, the shards of their conversations, credit).
    flash: Vec<(u64, Arc<[ShardId]>, u64)>,
    /// Crashes, in order, with when the cluster noticed them.
    crashes: Vec<Crash>,
    /// Joins not yet settled, and settled ones, in order.
    joins: Vec<Join>,
    /// Node index by gossip address.
    by_addr: BTreeMap<SocketAddr, usize>,
}

/// Every simulated node's capacity (the node's default).
const NODE_CAPACITY: u32 = 100;

fn addr_of(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 7002))
}

impl Authority {
    pub fn new(cfg: AuthorityConfig, seed: u64) -> Authority {
        let gossip = cfg.gossip.clone();
        let (lo, hi) = cfg.latency_ms;
        let model = NetModel {
            latency_ms_min: lo,
            latency_ms_max: hi,
            loss: cfg.gossip_loss,
            duplicate: cfg.gossip_duplicate,
        };
        let mut a = Authority {
            maps: Arc::default(),
            net: SimNet::with_model(gossip, model, seed).without_trace(),
            rng: StdRng::seed_from_u64(seed ^ 0xa117),
            now_ms: 0,
            nodes: Vec::new(),
            in_flight: Timeline::default(),
            next_write: 0,
            acked: FxHashMap::default(),
            acked_count: 0,
            acked_new: Vec::new(),
            dirty: BTreeSet::new(),
            ack_order: FxHashMap::default(),
            reads: BTreeMap::new(),
            reads_verified: FxHashMap::default(),
            history: BTreeMap::new(),
            replayed: ShardMap::new(cfg.shards),
            replayed_index: 1,
            leader: None,
            report: AuthorityReport::default(),
            last_tick: 0,
            planner: None,
            active_shards: None,
            latencies_us: Vec::new(),
            lost_writes: BTreeSet::new(),
            by_name: BTreeMap::new(),
            by_member: Vec::new(),
            by_raft: BTreeMap::new(),
            raft_ids: Arc::from(Vec::new()),
            write_credit: 0,
            popularity: None,
            flash: Vec::new(),
            crashes: Vec::new(),
            joins: Vec::new(),
            by_addr: BTreeMap::new(),
            cfg,
        };
        let voters: Vec<ControllerId> =
            (0..a.cfg.voters.min(a.cfg.nodes)).map(|i| controller_id(&format!("n{i}"))).collect();
        a.raft_ids = (0..a.cfg.nodes).map(|i| controller_id(&format!("n{i}"))).collect();
        let founding = if a.cfg.formed {
            // Every node as it starts below: incarnation 1 (the first start at 0 ms).
            let up: Vec<UpMember> = (0..a.cfg.nodes)
                .map(|i| UpMember::new(format!("n{i}"), 1, NODE_CAPACITY))
                .collect();
            let r = a.cfg.plan.replication_factor;
            formed_map(a.cfg.shards, &up, &a.placement(), r)
        } else {
            ShardMap::new(a.cfg.shards)
        };
        a.replayed = founding.clone();
        let disk = Controller::founding_state_with(&voters, &founding);
        for i in 0..a.cfg.nodes {
            a.add_node(i, &voters, &disk);
        }
        a.index_members();
        if a.cfg.formed {
            a.net.assume_formed();
        }
        a
    }

    /// Maps the replayed map's new members to their nodes.
    fn index_members(&mut self) {
        for m in &self.replayed.members()[self.by_member.len()..] {
            self.by_member.push(self.by_name.get(&m.name).copied());
        }
    }

    /// The planner's ring settings.
    fn placement(&self) -> PlacementConfig {
        PlacementConfig {
            shard_count: self.cfg.shards,
            vnodes: self.cfg.vnodes,
            ..Default::default()
        }
    }

    /// `founding`: what a founding voter's disk holds before its first start.
    fn add_node(&mut self, i: usize, voters: &[ControllerId], founding: &Restored) {
        let name = format!("n{i}");
        self.by_name.insert(name.clone(), i);
        self.by_addr.insert(addr_of(i), i);
        let raft_id = controller_id(&name);
        self.by_raft.insert(raft_id, i);
        if i >= self.raft_ids.len() {
            // A node joining later: the others learn of it as their failure detectors do.
            self.raft_ids = self.raft_ids.iter().copied().chain([raft_id]).collect();
        }
        let voter = voters.contains(&raft_id);
        let disk = if voter { founding.clone() } else { Restored::default() };
        self.nodes.push(Node {
            name,
            addr: addr_of(i),
            raft_id,
            incarnation: 0,
            running: false,
            controller: None,
            disk,
            ownership: None,
            store: FxHashMap::default(),
            store_queue: VecDeque::new(),
            seqs: BTreeMap::new(),
            seq_at: BTreeMap::new(),
            leaving: None,
            heard_ms: None,
            frozen: false,
            held: VecDeque::new(),
            acked: 0,
            load: None,
            load_due_ms: 0,
            turns_period: 0,
            shard_turns: BTreeMap::new(),
        });
        self.start(i);
    }

    /// Adds a node to the running cluster (it joins through n0's gossip address).
    pub fn join(&mut self) -> usize {
        let i = self.nodes.len();
        self.add_node(i, &[], &Restored::default());
        self.joins.push(Join { node: i, at_ms: self.now_ms, owning_ms: None, settled_ms: None });
        i
    }

    /// Joins the leader's map names owner of shards, and those it took in with nothing
    /// moving and its planner at rest.
    fn joins_settled(&mut self) {
        let Some((l, planner)) = self.planner.as_ref() else { return };
        let Some(map) = self.nodes[*l].controller.as_ref().map(Controller::map) else { return };
        let at_rest = map.tally().learning == 0 && planner.settled(map.version);
        let now = self.now_ms;
        for j in self.joins.iter_mut().filter(|j| j.settled_ms.is_none()) {
            let owned = map.member_ix(&self.nodes[j.node].name).map_or(0, |m| map.owned_by(m));
            if owned == 0 {
                continue;
            }
            j.owning_ms.get_or_insert(now);
            if at_rest {
                j.settled_ms = Some(now);
            }
        }
    }

    /// Starts (or restarts) node `i`'s process: a new incarnation, its disk as it was.
    pub fn start(&mut self, i: usize) {
        for c in self.crashes.iter_mut().filter(|c| c.node == i) {
            c.over = true;
        }
        let n = &mut self.nodes[i];
        n.incarnation = self.now_ms + 1;
        n.running = true;
        n.store_queue.clear();
        n.seqs.clear();
        n.seq_at.clear();
        n.ownership = None;
        n.leaving = None;
        n.heard_ms = None;
        n.frozen = false;
        n.held.clear();
        n.load = self.cfg.rebalance.as_ref().map(|r| LoadRounds::new(&n.name, n.incarnation, r));
        n.load_due_ms = self.now_ms + LOAD_PERIOD_MS;
        n.turns_period = 0;
        n.shard_turns.clear();
        let restored = n.disk.clone();
        let seed = self.rng.random::<u64>();
        let mut controller = Controller::restore(
            n.raft_id,
            restored,
            self.cfg.shards,
            self.cfg.controller.clone(),
            seed,
        )
        .expect("a disk this run wrote");
        controller.share_maps(self.maps.clone());
        controller.observe_peers(self.raft_ids.clone());
        n.controller = Some(controller);
        let id = NodeId {
            name: n.name.clone(),
            gossip: n.addr,
            cluster: SocketAddr::new(n.addr.ip(), 7001),
            client: SocketAddr::new(n.addr.ip(), 7000),
            admin: SocketAddr::new(n.addr.ip(), 7003),
            incarnation: n.incarnation,
            bump: 0,
            roles: vec![botclaw_core::roles::CONVERSATIONS.into()],
            capacity: NODE_CAPACITY,
        };
        let seeds: Vec<SocketAddr> = if i == 0 { vec![addr_of(1)] } else { vec![addr_of(0)] };
        self.net.start(id, &seeds, SECRET, self.rng.random());
        self.attach_ownership(i);
    }

    /// The process dies; its disk and store stay.
    pub fn crash(&mut self, i: usize) {
        if self.nodes[i].running {
            self.crashes.push(Crash {
                node: i,
                at_ms: self.now_ms,
                seen_by: BTreeSet::new(),
                detected_ms: None,
                reassigned_ms: None,
                over: false,
            });
        }
        let n = &mut self.nodes[i];
        n.running = false;
        n.controller = None;
        n.ownership = None;
        n.store_queue.clear();
        n.frozen = false;
        n.held.clear();
        self.net.crash(n.addr);
    }

    /// SIGSTOP (`true`) or SIGCONT: a frozen process neither ticks, nor completes writes,
    /// nor reads what reaches it; on thaw it reads everything that arrived, in order, with
    /// the map and leases it had (the others may have moved on meanwhile).
    pub fn freeze(&mut self, i: usize, frozen: bool) {
        let n = &mut self.nodes[i];
        if !n.running || n.frozen == frozen {
            return;
        }
        n.frozen = frozen;
        self.net.set_frozen(n.addr, frozen);
        if !frozen {
            let held = std::mem::take(&mut self.nodes[i].held);
            for wire in held {
                self.deliver(i, wire);
            }
        }
    }

    /// `observer`'s failure detector declared `down` down: a crash is detected once every
    /// running node has.
    fn crash_seen(&mut self, observer: SocketAddr, down: SocketAddr) {
        let (Some(&o), Some(&d)) = (self.by_addr.get(&observer), self.by_addr.get(&down)) else {
            return;
        };
        let (now, nodes) = (self.now_ms, &self.nodes);
        let Some(c) = self.crashes.iter_mut().rev().find(|c| c.node == d && !c.over) else {
            return;
        };
        c.seen_by.insert(o);
        let mut running = (0..nodes.len()).filter(|&i| nodes[i].running);
        if c.detected_ms.is_none() && running.all(|i| c.seen_by.contains(&i)) {
            c.detected_ms = Some(now);
        }
    }

    /// Crashes whose node the committed map names owner of no shard any more.
    fn crashes_reassigned(&mut self) {
        let now = self.now_ms;
        for c in self.crashes.iter_mut().filter(|c| !c.over && c.reassigned_ms.is_none()) {
            let owned = (self.replayed.member_ix(&self.nodes[c.node].name))
                .map_or(0, |m| self.replayed.owned_by(m));
            if owned == 0 {
                c.reassigned_ms = Some(now);
            }
        }
    }

    /// Client requests per simulated second from now on.
    pub fn set_writes_per_s(&mut self, writes_per_s: u64) {
        self.cfg.writes_per_s = writes_per_s;
    }

    /// Requests go to conversations by a Zipf law of exponent `s` (rank k: conversation
    /// k, on `shards[k]`) instead of uniform random shards.
    pub fn set_popularity(&mut self, s: f64, shards: Vec<ShardId>) -> Result<(), String> {
        let zipf = Zipf::new(shards.len() as f64, s).map_err(|e| format!("zipf: {e}"))?;
        self.popularity = Some((zipf, shards));
        Ok(())
    }

    /// Flash crowds on top of the rate: (requests per second, the shards of their
    /// conversations, uniform among them). The list keeps its length from call to call.
    pub fn set_flash(&mut self, flash: &[(u64, Arc<[ShardId]>)]) {
        self.flash.resize_with(flash.len(), || (0, Arc::from(Vec::new()), 0));
        for (f, (rate, shards)) in self.flash.iter_mut().zip(flash) {
            f.0 = *rate;
            f.1 = shards.clone();
        }
    }

    /// Latencies of acknowledged writes (submit to acknowledgement, simulated µs) since the
    /// last call.
    pub fn take_latencies(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.latencies_us)
    }

    /// Writes each node acknowledged as owner, by node.
    pub fn acked_per_node(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.acked).collect()
    }

    /// Writes acknowledged so far (what [`Authority::report`] says, without its checks).
    pub fn writes_acknowledged(&self) -> u64 {
        self.acked_count
    }

    /// Nodes whose process runs (frozen ones included).
    pub fn running(&self) -> usize {
        self.nodes.iter().filter(|n| n.running).count()
    }

    /// Members node `i` sees up (itself included), or `None` if it is not running.
    pub fn members_up(&self, i: usize) -> Option<usize> {
        Some(self.net.membership(self.nodes[i].addr)?.members_not_down())
    }

    /// The process leaves as the node's shutdown does ([`leave_step`]): it gives up the
    /// conversations role over gossip, then follows the steps on the map it applied, and
    /// exits (leaving gossip) once it holds nothing the others need.
    pub fn leave(&mut self, i: usize, mode: LeaveMode) {
        let n = &mut self.nodes[i];
        if !n.running || n.leaving.is_some() {
            return;
        }
        n.leaving = Some((mode, None));
        self.net.drop_role(n.addr, botclaw_core::roles::CONVERSATIONS);
    }

    /// Whether node `i` is running and has not finished leaving.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].running
    }

    /// Every leaving node's next step.
    fn leave_steps(&mut self) {
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            let (Some((mode, proposed)), true) = (n.leaving, n.running) else { continue };
            let Some(map) = n.controller.as_ref().map(|c| c.map()) else { continue };
            let others = self.net.membership(n.addr).is_some_and(|m| {
                m.members().iter().any(|v| {
                    v.id.name != n.name
                        && v.state != Gossip::Down
                        && map
                            .member_ix(&v.id.name)
                            .and_then(|ix| map.member(ix))
                            .is_some_and(|x| x.state == botclaw_core::shardmap::MemberState::Active)
                })
            });
            let window = 2 * self.cfg.controller.election_ticks as u64 * self.cfg.tick_ms;
            let heard = n.heard_ms.is_some_and(|at| self.now_ms < at + window);
            match leave_step(map, &n.name, n.incarnation, mode, others, heard) {
                LeaveStep::Wait => {}
                LeaveStep::ProposeLeave => {
                    if proposed.is_some_and(|at| self.now_ms < at + 250) {
                        continue;
                    }
                    let leave =
                        MapCommand::Leave { name: n.name.clone(), incarnation: n.incarnation };
                    self.nodes[i].leaving = Some((mode, Some(self.now_ms)));
                    if let Some(l) = self.leader() {
                        self.send(i, l, Wire::Propose(leave));
                    }
                }
                LeaveStep::KeepCopies | LeaveStep::Done => {
                    let n = &mut self.nodes[i];
                    n.running = false;
                    n.controller = None;
                    n.ownership = None;
                    n.store_queue.clear();
                    self.net.leave(n.addr);
                }
            }
        }
    }

    /// Cuts `group` off from the rest (or heals with an empty group).
    pub fn isolate(&mut self, group: &[usize]) {
        if group.is_empty() {
            self.net.heal();
            return;
        }
        let inside: Vec<SocketAddr> = group.iter().map(|&i| self.nodes[i].addr).collect();
        let outside: Vec<SocketAddr> = (0..self.nodes.len())
            .filter(|i| !group.contains(i))
            .map(|i| self.nodes[i].addr)
            .collect();
        self.net.partition(&[inside, outside]);
    }

    /// Nothing `from` sends reaches `to` (one way) until [`Authority::isolate`] heals.
    pub fn block(&mut self, from: usize, to: usize) {
        let (f, t) = (self.nodes[from].addr, self.nodes[to].addr);
        self.net.block(f, t);
    }

    /// Client writes go only to shards below `n` (the others sit idle); `None`: all.
    pub fn write_only_below(&mut self, n: Option<ShardId>) {
        self.active_shards = n;
    }

    /// Shards node `i` believes it owns (by the map it applied).
    pub fn believed_owned(&self, i: usize) -> usize {
        let Some(o) = self.nodes[i].ownership.as_ref() else { return 0 };
        (0..self.cfg.shards).filter(|&s| o.owns(s)).count()
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The index of the node leading the controller, if one leads.
    pub fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|n| n.controller.as_ref().is_some_and(|c| c.is_leader()))
    }

    /// The newest committed map (replayed in log order).
    /// The controller's voters by node name, as the leader (or any running node) sees them.
    pub fn voters(&self) -> Vec<String> {
        let at = self.leader().or_else(|| self.nodes.iter().position(|n| n.controller.is_some()));
        let Some(c) = at.and_then(|i| self.nodes[i].controller.as_ref()) else { return Vec::new() };
        let mut names: Vec<String> = c
            .voters()
            .into_iter()
            .filter_map(|id| self.node_of(id).map(|i| self.nodes[i].name.clone()))
            .collect();
        names.sort();
        names
    }

    pub fn map(&self) -> &ShardMap {
        &self.replayed
    }

    pub fn report(&self) -> AuthorityReport {
        let mut r = self.report.clone();
        // The whole committed map as it stands (between full checks only changed entries
        // were looked at).
        for p in self.replayed.check() {
            let p = format!("at index {}: {p}", self.replayed_index);
            if !r.problems.contains(&p) {
                r.problems.push(p);
            }
        }
        r.writes_acknowledged = self.acked_count;
        r.unavailable_shards = self.replayed.unavailable().count();
        let after = |at: u64, t: Option<u64>| t.map(|t| t.saturating_sub(at) as f64 / 1000.0);
        r.crashes = (self.crashes.iter())
            .map(|c| CrashTimes {
                node: self.nodes[c.node].name.clone(),
                at_s: c.at_ms as f64 / 1000.0,
                detected_s: after(c.at_ms, c.detected_ms),
                reassigned_s: after(c.at_ms, c.reassigned_ms),
            })
            .collect();
        r.joins = (self.joins.iter())
            .map(|j| JoinTimes {
                node: self.nodes[j.node].name.clone(),
                at_s: j.at_ms as f64 / 1000.0,
                owning_s: after(j.at_ms, j.owning_ms),
                settled_s: after(j.at_ms, j.settled_ms),
            })
            .collect();
        let old = self.now_ms.saturating_sub(5_000);
        r.writes_stuck = (self.nodes.iter().filter(|n| n.running))
            .map(|n| n.seq_at.values().filter(|at| **at < old).count())
            .sum();
        r
    }

    /// Runs until `until_ms`, checking after every step.
    pub fn run_until(&mut self, until_ms: u64) {
        while self.now_ms < until_ms {
            self.step();
        }
    }

    fn step(&mut self) {
        let to = self.now_ms + STEP_MS;
        self.net.run_until(to);
        // The leader's failure detector changed its members: its planner plans at once,
        // as a node's does (`LeaderPlanner::members_changed`).
        for notice in self.net.take_notices() {
            use botclaw_core::membership::Effect as M;
            if let M::MemberDown(id) = &notice.effect {
                self.crash_seen(notice.node, id.gossip);
            }
            let Some((l, planner)) = self.planner.as_mut() else { continue };
            let members = matches!(
                notice.effect,
                M::MemberUp(_) | M::MemberDown(_) | M::MemberChanged(_) | M::Rejoined(_)
            );
            if members && self.nodes[*l].addr == notice.node {
                planner.members_changed();
            }
        }
        while let Some((at, (dest, wire))) = self.in_flight.pop_due(to) {
            self.now_ms = at;
            self.deliver(dest, wire);
        }
        self.now_ms = to;
        for i in 0..self.nodes.len() {
            if !self.nodes[i].frozen {
                self.complete_stores(i);
            }
        }
        if self.now_ms - self.last_tick >= self.cfg.tick_ms {
            self.last_tick = self.now_ms;
            for i in 0..self.nodes.len() {
                if self.nodes[i].frozen {
                    continue;
                }
                let report = &mut self.report;
                let leads = self.nodes[i].controller.as_mut().map(|c| {
                    report.proposals_dropped += u64::from(c.tick().is_err());
                    c.is_leader()
                });
                if leads == Some(true) {
                    self.nodes[i].heard_ms = Some(self.now_ms);
                }
                if let Some(o) = self.nodes[i].ownership.as_mut() {
                    if leads == Some(true) {
                        o.controller_heard();
                    }
                    o.tick();
                }
                self.drain(i);
            }
            self.leave_steps();
        }
        self.plan();
        self.joins_settled();
        self.write_credit += self.cfg.writes_per_s * STEP_MS;
        for _ in 0..self.write_credit / 1000 {
            self.submit(None);
        }
        self.write_credit %= 1000;
        for f in 0..self.flash.len() {
            self.flash[f].2 += self.flash[f].0 * STEP_MS;
            for _ in 0..self.flash[f].2 / 1000 {
                self.submit(Some(f));
            }
            self.flash[f].2 %= 1000;
        }
        self.load_periods();
        self.check();
    }

    fn send(&mut self, from: usize, to: usize, wire: Wire) {
        if !self.nodes[to].running
            || !self.net.reachable(self.nodes[from].addr, self.nodes[to].addr)
        {
            return;
        }
        let lossy = !matches!(wire, Wire::Controller(_));
        if lossy && self.rng.random_range(0..1000) < self.cfg.own_loss_permille {
            self.report.messages_lost += 1;
            return;
        }
        let (lo, hi) = self.cfg.latency_ms;
        let at = self.now_ms + self.rng.random_range(lo..=hi);
        self.in_flight.push(at, (to, wire));
    }

    fn node_of(&self, raft_id: ControllerId) -> Option<usize> {
        self.by_raft.get(&raft_id).copied()
    }

    fn deliver(&mut self, i: usize, wire: Wire) {
        if !self.nodes[i].running {
            return;
        }
        if self.nodes[i].frozen {
            // Bounded as a socket buffer would be: beyond it, the sender's messages are lost.
            if self.nodes[i].held.len() < HELD_MAX {
                self.nodes[i].held.push_back(wire);
            }
            return;
        }
        match wire {
            Wire::Controller(m) => {
                let from = m.from();
                if let Some(c) = self.nodes[i].controller.as_mut() {
                    let _ = c.step(*m);
                    if c.leader() == Some(from) {
                        self.nodes[i].heard_ms = Some(self.now_ms);
                        if let Some(o) = self.nodes[i].ownership.as_mut() {
                            o.controller_heard();
                        }
                    }
                }
            }
            Wire::Own { from, msg } => {
                let n = &mut self.nodes[i];
                if let (Some(o), Some(c)) = (n.ownership.as_mut(), n.controller.as_ref()) {
                    o.receive(from, msg, c.map());
                }
            }
            Wire::Stream { shard, attempt, owner, copy } => {
                self.nodes[i].store.entry(shard).or_default().extend(&copy);
                if let Some(o) = self.nodes[i].ownership.as_mut() {
                    o.stream_installed(shard, attempt, owner);
                }
            }
            Wire::Propose(cmd) => {
                if let Some(c) = self.nodes[i].controller.as_mut().filter(|c| c.is_leader()) {
                    propose(c, &cmd, &mut self.report);
                }
            }
        }
        self.drain(i);
    }

    /// The node's ownership machine exists once its applied map knows it.
    fn attach_ownership(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if n.ownership.is_some() || !n.running {
            return;
        }
        let Some(c) = n.controller.as_ref() else { return };
        let Some(ix) = c.map().member_ix(&n.name) else { return };
        let mut o = Ownership::new(ix, n.incarnation, self.cfg.ownership.clone());
        o.map_replaced(c.map());
        n.ownership = Some(o);
    }

    fn drain(&mut self, i: usize) {
        self.drain_controller(i);
        self.drain_ownership(i);
    }

    fn drain_controller(&mut self, i: usize) {
        loop {
            let Some(rd) = self.nodes[i].controller.as_mut().and_then(|c| c.ready()) else {
                return;
            };
            for m in rd.messages {
                self.send_raft(i, m);
            }
            self.nodes[i].disk.write(rd.persist);
            for m in rd.after_persist {
                self.send_raft(i, m);
            }
            if let Some(leader) = rd.leader_changed {
                if leader.is_some() && leader != self.leader {
                    self.report.leader_changes += 1;
                    self.leader = leader;
                }
            }
            let mut changed: Vec<ShardId> = Vec::new();
            for a in &rd.applied {
                changed.extend_from_slice(&a.applied.changed);
                self.record(i, a.index, a.term, a.command.clone());
            }
            changed.sort_unstable();
            changed.dedup();
            let all = rd.snapshot_installed;
            self.attach_ownership(i);
            let n = &mut self.nodes[i];
            if let (Some(o), Some(c)) = (n.ownership.as_mut(), n.controller.as_ref()) {
                // Also when no shard changed: the machine learns the map's version (and
                // whether it counts this process in).
                if all {
                    o.map_replaced(c.map());
                } else if !rd.applied.is_empty() {
                    o.map_applied(c.map(), &changed);
                }
            }
        }
    }

    fn send_raft(&mut self, from: usize, m: ControllerMessage) {
        if let Some(to) = self.node_of(m.to()) {
            self.send(from, to, Wire::Controller(Box::new(m)));
        }
    }

    /// Member index -> node, by the map's names (indices are stable).
    fn node_of_member(&self, ix: MemberIx) -> Option<usize> {
        self.by_member.get(usize::from(ix)).copied().flatten()
    }

    fn drain_ownership(&mut self, i: usize) {
        while let Some(effect) = self.nodes[i].ownership.as_mut().and_then(|o| o.poll()) {
            match effect {
                Effect::Send { to, msg } => {
                    let me = self.nodes[i].ownership.as_ref().map(|o| o.me()).unwrap_or_default();
                    if let Some(t) = self.node_of_member(to) {
                        self.send(i, t, Wire::Own { from: me, msg });
                    }
                }
                Effect::Release { seq, .. } => {
                    let at = self.nodes[i].seq_at.remove(&seq);
                    if let Some(w) = self.nodes[i].seqs.remove(&seq) {
                        if let Some(at) = at {
                            self.latencies_us.push((self.now_ms - at) * 1000);
                        }
                        self.nodes[i].acked += 1;
                        if self.acked.entry(w.0).or_default().insert(w.1) {
                            self.acked_count += 1;
                            self.acked_new.push(w);
                            self.ack_order.entry(w.0).or_default().push(w.1);
                        }
                    }
                }
                Effect::Fail { seq, .. } => {
                    if self.reads.remove(&(i, seq)).is_some() {
                        self.report.reads_failed += 1;
                    } else if self.nodes[i].seqs.remove(&seq).is_some() {
                        self.nodes[i].seq_at.remove(&seq);
                        self.report.writes_failed += 1;
                    }
                }
                Effect::ReadReady { shard, seq } => {
                    let Some((_, before)) = self.reads.remove(&(i, seq)) else { continue };
                    self.report.reads_served += 1;
                    // Answered after every write asked before it here (a connection answers
                    // in order: a `history` after a `say` must see that turn).
                    if let Some((s, w)) =
                        self.nodes[i].seqs.range(..seq).find(|(_, w)| w.0 == shard)
                    {
                        self.report.problems.push(format!(
                            "a read of shard {shard} on {} was ready before write {} (seq {s}) asked before it (t={} ms)",
                            self.nodes[i].name, w.1, self.now_ms
                        ));
                    }
                    let store = self.nodes[i].store.get(&shard);
                    let verified = self.reads_verified.get(&(i, shard)).map_or(0, |v| *v);
                    let from = verified.min(before);
                    let order = self.ack_order.get(&shard).map_or(&[][..], |v| &v[from..before]);
                    let missed = order.iter().find(|n| !store.is_some_and(|s| s.contains(**n)));
                    if missed.is_none() && before > verified {
                        self.reads_verified.insert((i, shard), before);
                    }
                    if let Some(n) = missed {
                        let epochs = (
                            self.nodes[i]
                                .controller
                                .as_ref()
                                .and_then(|c| c.map().shard(shard))
                                .map(|e| e.epoch),
                            self.replayed.shard(shard).map(|e| e.epoch),
                        );
                        self.report.problems.push(format!(
                            "a read of shard {shard} on {} missed write {n}, acknowledged before it (t={} ms; shard epoch applied there {:?}, committed {:?})",
                            self.nodes[i].name, self.now_ms, epochs.0, epochs.1
                        ));
                    }
                }
                Effect::Stream { shard, attempt, to } => {
                    // Every earlier write is durable here: the copy is taken now.
                    let copy = self.nodes[i].store.get(&shard).cloned().unwrap_or_default();
                    let owner =
                        self.nodes[i].ownership.as_ref().map(|o| o.me()).unwrap_or_default();
                    if let Some(t) = self.node_of_member(to) {
                        self.send(i, t, Wire::Stream { shard, attempt, owner, copy });
                    }
                }
                Effect::Propose(cmd) => {
                    if let Some(l) = self.leader() {
                        self.send(i, l, Wire::Propose(cmd));
                    }
                }
                e @ (Effect::Persist { .. } | Effect::PersistReplica { .. }) => {
                    let (lo, hi) = self.cfg.store_ms;
                    let done = self.now_ms + self.rng.random_range(lo..=hi);
                    self.nodes[i].store_queue.push_back((done, e));
                }
            }
        }
    }

    /// Completes the store operations that are due (in order).
    fn complete_stores(&mut self, i: usize) {
        while self.nodes[i].store_queue.front().is_some_and(|(done, _)| *done <= self.now_ms) {
            let (_, op) = self.nodes[i].store_queue.pop_front().expect("checked");
            let n = &mut self.nodes[i];
            match op {
                Effect::Persist { shard, epoch, seq, payload } => {
                    let every = self.cfg.drop_owner_writes_every;
                    if every == 0 || payload.1 % every != every - 1 {
                        n.store.entry(shard).or_default().insert(payload.1);
                    }
                    if let Some(o) = n.ownership.as_mut() {
                        o.persisted(shard, epoch, seq);
                    }
                }
                Effect::PersistReplica { shard, epoch, seq, from, payload } => {
                    n.store.entry(shard).or_default().insert(payload.1);
                    if let (Some(o), Some(c)) = (n.ownership.as_mut(), n.controller.as_ref()) {
                        o.replica_persisted(shard, epoch, seq, from, c.map());
                    }
                }
                _ => unreachable!("only store operations are queued"),
            }
            self.drain(i);
        }
    }

    /// The leader's round when its planner says one is due (the node's own planner): the
    /// group change its autopilot wants, then membership from its failure detector, first
    /// owners and moves.
    fn plan(&mut self) {
        let Some(l) = self.leader() else { return };
        if self.planner.as_ref().is_none_or(|(at, _)| *at != l) {
            // A new leader starts with a fresh planner, as a node's would.
            let p = LeaderPlanner::new(
                self.placement(),
                self.cfg.plan.clone(),
                self.cfg.controller.voters_target,
                self.cfg.controller.voter_replace_after_ms,
            );
            self.planner = Some((l, p));
        }
        let (_, planner) = self.planner.as_mut().expect("set above");
        let version = self.nodes[l].controller.as_ref().map_or(0, |c| c.map().version);
        if !planner.due(self.now_ms, version) {
            return;
        }
        let addr = self.nodes[l].addr;
        let Some(membership) = self.net.membership(addr) else { return };
        let up: Vec<UpMember> = membership
            .members()
            .into_iter()
            .filter(|m| m.state != Gossip::Down)
            .map(|m| UpMember {
                serving: m.id.has_role(botclaw_core::roles::CONVERSATIONS),
                ..UpMember::new(m.id.name.clone(), m.id.incarnation, m.id.capacity)
            })
            .collect();
        // Load-driven moves in force, as the leader's gossip shows them: the planner pins
        // them (the node's `plan_round`).
        let moves = match self.cfg.rebalance {
            Some(_) => membership.with_loads(MoveTable::vouched),
            None => MoveTable::default(),
        };
        let pins = moves.iter().map(|r| (r.shard, r.to.as_str()));
        let now = self.now_ms;
        let (_, planner) = self.planner.as_mut().expect("set above");
        let c = self.nodes[l].controller.as_mut().expect("the leader runs");
        let Round { group, mut commands } = planner.round(now, c, &up, pins);
        if self.cfg.force_unavailable {
            let map = c.map();
            let first = map.active_members().first().map(|m| m.name.clone()).unwrap_or_default();
            if let Some(member) = map.member_ix(&first) {
                commands.extend(map.unavailable().map(|shard| MapCommand::Force { shard, member }));
            }
        }
        let c = self.nodes[l].controller.as_mut().expect("the leader runs");
        if let Some(changes) = group {
            let _ = c.change_members(&changes);
        }
        for cmd in commands {
            propose(c, &cmd, &mut self.report);
        }
        self.drain(l);
    }

    /// Every running node whose load period ended runs its load loop: its turns and
    /// hottest shards of the period, the loads and moves its gossip shows, the members its
    /// map makes owners; then it publishes the summary over gossip, as a node does.
    fn load_periods(&mut self) {
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            if !n.running || n.frozen || n.load.is_none() || self.now_ms < n.load_due_ms {
                continue;
            }
            n.load_due_ms += LOAD_PERIOD_MS;
            let per_s = 1000.0 / LOAD_PERIOD_MS as f32;
            let turns_per_s = std::mem::take(&mut n.turns_period) as f32 * per_s;
            let shard_turns = std::mem::take(&mut n.shard_turns);
            let (Some(rounds), Some(c)) = (n.load.as_mut(), n.controller.as_ref()) else {
                continue;
            };
            let Some(membership) = self.net.membership(n.addr) else { continue };
            let mut hot: Vec<(ShardId, u32)> = shard_turns.into_iter().collect();
            hot.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            hot.truncate(rounds.config().shards_considered());
            let hot: Vec<(ShardId, f32)> =
                hot.into_iter().map(|(s, t)| (s, t as f32 * per_s)).collect();
            let map = c.map();
            let active = |name: &str| {
                map.member_ix(name)
                    .and_then(|ix| map.member(ix))
                    .is_some_and(|m| m.state == botclaw_core::shardmap::MemberState::Active)
            };
            let members: Vec<(String, u32)> = map
                .members()
                .iter()
                .filter(|m| m.state == botclaw_core::shardmap::MemberState::Active)
                .map(|m| (m.name.clone(), m.capacity))
                .collect();
            let now_ms = self.now_ms;
            let decided = membership.with_loads(|loads| {
                // Routing's table: the moves every summary vouches for, to active members.
                let mut moves = MoveTable::vouched(loads);
                moves.retain_targets(active);
                let nodes = member_loads(members, loads, &moves.moved_in(), &n.name, turns_per_s);
                rounds.period(Period {
                    now_ms,
                    turns_per_s,
                    hot: &hot,
                    nodes: &nodes,
                    moving: map.tally().learning > 0,
                    loads,
                    moves: &moves,
                    active: 0,
                    inflight: 0,
                    modules: &[],
                })
            });
            self.report.load_moves += decided.moves.len() as u64;
            if !decided.moves.is_empty() {
                self.report.load_moves_last_ms = Some(now_ms);
            }
            let addr = n.addr;
            if let Some(m) = self.net.membership_mut(addr) {
                // A summary is bounded (`LoadSummary::to_bytes`) and always encodes.
                let _ = m.publish_load(&decided.summary);
            }
        }
    }

    /// A client write at a random running gateway, routed by the gateway's map; to a
    /// random shard, a conversation drawn by popularity, or one of flash crowd `flash`'s.
    fn submit(&mut self, flash: Option<usize>) {
        // A few draws find a running gateway unless most nodes are down (then the client
        // finds none this time).
        let n = self.nodes.len();
        let Some(gateway) = (0..8)
            .map(|_| self.rng.random_range(0..n))
            .find(|&g| self.nodes[g].running && !self.nodes[g].frozen)
        else {
            return;
        };
        let shard = match (flash, &self.popularity) {
            (Some(f), _) => {
                let shards = &self.flash[f].1;
                let Some(&shard) = shards.get(self.rng.random_range(0..shards.len().max(1))) else {
                    return;
                };
                shard
            }
            (None, Some((zipf, shards))) => shards[zipf.sample(&mut self.rng) as usize - 1],
            (None, None) => {
                self.rng.random_range(0..self.active_shards.unwrap_or(self.cfg.shards).max(1))
            }
        };
        let read = self.rng.random_range(0..100) < self.cfg.reads_percent;
        if !read {
            self.report.writes_submitted += 1;
        }
        // Routed by the gateway's map to an owner that runs, can be reached and has its
        // ownership machine; else the client gets no answer this time.
        let owner =
            (self.nodes[gateway].controller.as_ref()).and_then(|c| c.map().shard(shard)?.owner);
        let routed = owner.and_then(|ix| self.node_of_member(ix)).filter(|&o| {
            self.nodes[o].running
                && !self.nodes[o].frozen
                && self.nodes[o].ownership.is_some()
                && self.net.reachable(self.nodes[gateway].addr, self.nodes[o].addr)
        });
        let Some(o) = routed else {
            self.report.requests_unrouted += 1;
            return;
        };
        let machine = self.nodes[o].ownership.as_mut().expect("routed to a machine");
        if read {
            let before = self.ack_order.get(&shard).map_or(0, Vec::len);
            match machine.read(shard) {
                Ok(seq) => {
                    self.reads.insert((o, seq), (shard, before));
                }
                Err(_) => self.report.reads_failed += 1,
            }
            self.drain(o);
            return;
        }
        let w = (shard, self.next_write);
        self.next_write += 1;
        match machine.submit(shard, w) {
            Ok(seq) => {
                let n = &mut self.nodes[o];
                n.seqs.insert(seq, w);
                n.seq_at.insert(seq, self.now_ms);
                n.turns_period += 1;
                *n.shard_turns.entry(shard).or_default() += 1;
            }
            Err(_) => self.report.writes_failed += 1,
        }
        self.drain(o);
    }

    fn record(&mut self, node: usize, index: u64, term: u64, command: Option<MapCommand>) {
        match self.history.get(&index) {
            None => {
                let kind = command.as_ref().map_or("raft", MapCommand::kind);
                *self.report.entries_by_kind.entry(kind).or_default() += 1;
                self.history.insert(index, (term, command));
                self.report.entries += 1;
            }
            Some(seen) if *seen != (term, command.clone()) => self.report.problems.push(format!(
                "{} applied {:?} at index {index} where another applied {seen:?} (t={} ms)",
                self.nodes[node].name,
                (term, command),
                self.now_ms
            )),
            Some(_) => {}
        }
        // Replay the committed log in order, checking every transition.
        while let Some((_, cmd)) = self.history.get(&(self.replayed_index + 1)).cloned() {
            self.replayed_index += 1;
            if let Some(cmd) = cmd {
                let before = self.replayed.clone();
                let applied = self.replayed.apply(&cmd);
                self.index_members();
                let changed = applied.changed.clone();
                for &shard in &applied.changed {
                    let Some(a) = self.replayed.shard(shard) else { continue };
                    let b = before.shard(shard);
                    let joined =
                        a.isr.as_slice().iter().filter(|m| b.is_none_or(|b| !b.isr.contains(**m)));
                    self.dirty.extend(joined.map(|&m| (shard, m)));
                    let Some(b) = b else { continue };
                    let new = a.learners.as_slice().iter().filter(|m| !b.learners.contains(**m));
                    self.report.learners_added += new.count() as u64;
                    if a.owner.is_some() && a.owner != b.owner && b.owner.is_some() {
                        self.report.owner_changes += 1;
                    }
                }
                if applied.changed.is_empty() && !applied.skipped.is_empty() {
                    *self.report.entries_without_effect.entry(cmd.kind()).or_default() += 1;
                }
                self.crashes_reassigned();
                let forced = match cmd {
                    MapCommand::Force { shard, .. } => Some(shard),
                    _ => None,
                };
                // The changed entries after every entry; the whole map, tally recount
                // included, every FULL_CHECK_EVERY entries.
                let mut problems = if self.replayed_index.is_multiple_of(FULL_CHECK_EVERY) {
                    self.replayed.check()
                } else {
                    self.replayed.check_shards(&changed)
                };
                problems.extend(check_transition(&before, &self.replayed, forced));
                for p in problems {
                    self.report.problems.push(format!("after index {}: {p}", self.replayed_index));
                }
            }
        }
    }

    /// Newly acknowledged writes against their shard's in-sync members, and every
    /// acknowledged write of a shard against the members that joined its in-sync set
    /// (stores only grow, so nothing else can break the invariant).
    fn check(&mut self) {
        let fresh = std::mem::take(&mut self.acked_new);
        let dirty = std::mem::take(&mut self.dirty);
        if self.report.problems.len() > 20 {
            return;
        }
        let mut lost = Vec::new();
        let lost_writes = &mut self.lost_writes;
        let (nodes, by_member) = (&self.nodes, &self.by_member);
        let mut check = |shard: ShardId, members: &[MemberIx], n: u64| {
            for &m in members {
                let holds = by_member
                    .get(usize::from(m))
                    .copied()
                    .flatten()
                    .is_some_and(|x| nodes[x].store.get(&shard).is_some_and(|s| s.contains(n)));
                if holds {
                    continue;
                }
                lost_writes.insert((shard, n));
                if lost.len() < 5 {
                    let name = self.replayed.name(m);
                    lost.push(format!(
                        "write {n} of shard {shard} was acknowledged but in-sync member {name} lacks it (t={} ms)",
                        self.now_ms
                    ));
                }
            }
        };
        for (shard, n) in fresh {
            if let Some(e) = self.replayed.shard(shard) {
                check(shard, e.isr.as_slice(), n);
            }
        }
        for (shard, m) in dirty {
            // Only members still in the set: one that joined and left again is not bound.
            if self.replayed.shard(shard).is_some_and(|e| e.isr.contains(m)) {
                for n in self.acked.get(&shard).into_iter().flat_map(Writes::iter) {
                    check(shard, &[m], n);
                }
            }
        }
        self.report.problems.extend(lost);
        self.report.writes_lost = self.lost_writes.len() as u64;
    }
}
