//! The placement controller on a node: executes the effects of the pure Raft member
//! (`botclaw_core::controller`) and runs the leader's planning round.
//!
//! One task owns the member. It ticks it every `controller.tick_ms`, steps the messages
//! peers send (through the router, as `RouterMessage::Controller`), and drains its ready
//! batches: messages out, the batch made durable (the controller log under the data
//! directory, fsynced; memory on an ephemeral node), then what must follow persistence.
//! The applied map is published on a watch channel with the group's status; on the leader,
//! every `controller.plan_interval_ms` (`plan_after_change_ms` after a round once the map
//! changed since), the autopilot and the planner propose.
//!
//! A node founds the group only on its first start (an empty log), and only if it is listed
//! in `controller.voters` (or, with no list, if it was started without seeds). Every other
//! node starts empty and observes: it fetches the committed log (or a snapshot) from the
//! leader, which it finds by asking the nodes gossip sees up; the leader takes observers in
//! as learners only to make them voters (`botclaw_core::controller::observe`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use botclaw_actors::controller_log::ControllerLog;
use botclaw_actors::router::{remote_router, RouterMessage};
use botclaw_config::{ControllerConfig, PlacementConfig};
use botclaw_core::controller::leader::{LeaderPlanner, Round};
use botclaw_core::controller::{
    controller_id, decode_message, encode_message, Controller, ControllerError, ControllerId,
    ControllerMessage, GroupChange, Persist, Restored,
};
use botclaw_core::shardmap::plan::{members_key, unregistrable, PlanConfig, UpMember};
use botclaw_core::shardmap::{MapCommand, MemberIx, ShardMap, MEMBERS_MAX};
use botclaw_core::MemberState;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::gossip::ClusterView;
use crate::metrics::ReasonLabel;

/// What crosses the link to a peer's controller.
#[derive(Debug, Serialize, Deserialize)]
pub enum Wire {
    /// A controller message: Raft's, or an observer's fetch and its answer
    /// (`botclaw_core::controller::encode_message`).
    Message(Vec<u8>),
    /// A map command for the leader, from `from`; a follower passes it on once.
    Propose { from: String, forwarded: bool, command: MapCommand },
}

impl Wire {
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("controller messages encode")
    }
}

/// The group as this node sees it (`/status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ControllerStatus {
    /// The leader's node name, when known.
    pub leader: Option<String>,
    pub is_leader: bool,
    pub term: u64,
    pub applied_index: u64,
    /// Commands applied to the map (its version).
    pub map_version: u64,
    pub voters: Vec<String>,
    /// Members about to become voters.
    pub learners: usize,
    /// On the leader: the nodes outside the group that fetch the map from it.
    #[serde(default)]
    pub observers: usize,
    /// This node in the group: `voter`, `learner` (about to become a voter) or
    /// `observer` (outside it: it fetches the map from the leader).
    #[serde(default)]
    pub role: String,
    /// Shards that have a learner (a move in progress).
    pub moves_in_flight: usize,
    /// Assigned shards with fewer in-sync members than the replication factor.
    pub shards_under_replicated: usize,
    /// Shards whose in-sync members are all gone: they refuse turns.
    pub shards_unavailable: usize,
    /// The first of them (at most [`UNAVAILABLE_LISTED_MAX`]), for `botclaw shard force`.
    #[serde(default)]
    pub unavailable: Vec<u32>,
    /// Shards never assigned (a new cluster before its first round).
    pub shards_unassigned: usize,
    /// Shards each live map member owns.
    #[serde(default)]
    pub owned: BTreeMap<String, u32>,
    /// On the leader: its last planning round on this map proposed nothing (no move is
    /// pending, not only none in flight). False elsewhere.
    #[serde(default)]
    pub plan_settled: bool,
    /// Names the map holds: every node ever registered, at most [`MEMBERS_MAX`].
    #[serde(default)]
    pub map_members: usize,
    /// On the leader: nodes up that the map cannot take, being full. They own nothing.
    #[serde(default)]
    pub members_unregistered: usize,
}

/// Unavailable shards `/status` lists by number.
pub const UNAVAILABLE_LISTED_MAX: usize = 32;

/// The applied map and the group's status, published after every change.
#[derive(Debug, Clone)]
pub struct MapView {
    pub map: Arc<ShardMap>,
    pub status: ControllerStatus,
}

/// The controller's metrics.
#[derive(Debug, Clone, Default)]
pub struct ControllerMetrics {
    pub is_leader: Gauge,
    pub term: Gauge,
    pub map_version: Gauge,
    pub entries_applied: Counter,
    pub messages_sent: Counter,
    pub messages_received: Counter,
    pub messages_dropped: Family<ReasonLabel, Counter>,
    pub proposals: Counter,
    pub moves_in_flight: Gauge,
    pub shards_under_replicated: Gauge,
    pub shards_unavailable: Gauge,
}

impl ControllerMetrics {
    pub fn drop(&self, reason: &str) {
        self.messages_dropped.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    }

    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("controller");
        r.register(
            "leader",
            "1 while this node leads the placement controller",
            self.is_leader.clone(),
        );
        r.register("term", "The controller's Raft term", self.term.clone());
        r.register("map_version", "Commands applied to the shard map", self.map_version.clone());
        r.register(
            "entries_applied",
            "Controller log entries applied",
            self.entries_applied.clone(),
        );
        r.register("messages_sent", "Raft messages sent to peers", self.messages_sent.clone());
        r.register(
            "messages_received",
            "Controller messages received from peers",
            self.messages_received.clone(),
        );
        r.register(
            "messages_dropped",
            "Controller messages dropped, by reason (Raft resends what matters)",
            self.messages_dropped.clone(),
        );
        r.register(
            "proposals",
            "Map commands this node proposed as leader",
            self.proposals.clone(),
        );
        r.register(
            "moves_in_flight",
            "Shards with a learner catching up",
            self.moves_in_flight.clone(),
        );
        r.register(
            "shards_under_replicated",
            "Assigned shards with fewer in-sync members than the replication factor",
            self.shards_under_replicated.clone(),
        );
        r.register(
            "shards_unavailable",
            "Shards whose in-sync members are all gone (they refuse turns)",
            self.shards_unavailable.clone(),
        );
    }
}

/// Where the controller's state is durable.
enum Disk {
    File(ControllerLog),
    /// An ephemeral node: lost when the process exits.
    Memory(Restored),
}

impl Disk {
    fn state(&self) -> &Restored {
        match self {
            Disk::File(log) => log.state(),
            Disk::Memory(r) => r,
        }
    }

    fn write(&mut self, batch: Persist) -> Result<()> {
        match self {
            Disk::File(log) => log.write(batch).context("writing the controller log"),
            Disk::Memory(r) => {
                r.write(batch);
                Ok(())
            }
        }
    }
}

fn is_empty(r: &Restored) -> bool {
    r.snapshot.is_none() && r.entries.is_empty() && r.hard_state.term == 0
}

/// What the controller task needs.
pub struct ControllerArgs {
    pub me: String,
    pub cfg: ControllerConfig,
    pub placement: PlacementConfig,
    pub replication_factor: usize,
    /// The log's directory; `None` keeps it in memory (ephemeral nodes).
    pub dir: Option<PathBuf>,
    /// Started without seeds (founds the group when no voters are listed).
    pub founder_by_default: bool,
    /// Largest message a link carries.
    pub frame_bytes_max: u64,
    pub gossip: watch::Receiver<ClusterView>,
    pub inbox: mpsc::Receiver<Vec<u8>>,
    pub metrics: ControllerMetrics,
    /// Marked whenever this node hears from the controller's leader (or leads it): the
    /// shard replicator's read lease, and whether the node serves in map mode.
    pub heard: Arc<ControllerContact>,
}

/// When this node last heard from the controller's leader (or led it).
#[derive(Debug)]
pub struct ControllerContact {
    base: Instant,
    /// Milliseconds after `base`, plus one (0: never).
    heard_ms: std::sync::atomic::AtomicU64,
}

impl Default for ControllerContact {
    fn default() -> Self {
        ControllerContact { base: Instant::now(), heard_ms: Default::default() }
    }
}

impl ControllerContact {
    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    pub fn heard(&self) {
        self.heard_ms.store(self.now_ms(), std::sync::atomic::Ordering::Release);
    }

    /// Whether it heard within the last `ms`.
    pub fn within(&self, ms: u64) -> bool {
        let at = self.heard_ms.load(std::sync::atomic::Ordering::Acquire);
        at > 0 && self.now_ms() - at < ms
    }
}

/// The running member.
pub struct ControllerTask {
    args: ControllerArgs,
    controller: Controller,
    disk: Disk,
    planner: LeaderPlanner,
    /// Node names by controller id (members, voters, gossip peers).
    names: HashMap<ControllerId, String>,
    out: watch::Sender<Arc<MapView>>,
    started: Instant,
    /// When the map was last published, and whether a change waits to be.
    published_at: Instant,
    dirty: bool,
    /// [`members_key`] of the members up when the view last changed.
    members_seen: u64,
    /// On the leader: nodes up that the full map cannot take ([`unregistrable`]).
    unregistered: usize,
}

/// Opens (or founds) this node's controller member; errors stop the node at start.
pub fn open(args: ControllerArgs) -> Result<(ControllerTask, watch::Receiver<Arc<MapView>>)> {
    let mut disk = match &args.dir {
        Some(dir) => Disk::File(ControllerLog::open(dir)?),
        None => Disk::Memory(Restored::default()),
    };
    let shard_count = args.placement.shard_count;
    let founders: Vec<String> = if !args.cfg.voters.is_empty() {
        args.cfg.voters.clone()
    } else if args.founder_by_default {
        vec![args.me.clone()]
    } else {
        Vec::new()
    };
    if is_empty(disk.state()) && founders.contains(&args.me) {
        let ids: Vec<ControllerId> = founders.iter().map(|n| controller_id(n)).collect();
        tracing::info!(voters = ?founders, "founding the placement controller");
        disk.write(Controller::founding_state(&ids, shard_count).as_persist())?;
    }
    let mut controller = Controller::restore(
        controller_id(&args.me),
        disk.state().clone(),
        shard_count,
        args.cfg.clone(),
        rand::random(),
    )
    .context("restoring the placement controller from its log")?;
    if controller.map().shard_count() != shard_count {
        bail!(
            "the controller log holds a map of {} shards but placement.shard_count is {shard_count}: \
             the shard count of a cluster cannot change",
            controller.map().shard_count()
        );
    }
    let plan = PlanConfig::of(&args.cfg, args.replication_factor);
    let planner = LeaderPlanner::new(
        args.placement.clone(),
        plan,
        args.cfg.voters_target,
        args.cfg.voter_replace_after_ms,
    );
    let mut names = HashMap::new();
    for name in founders.iter().chain(&args.cfg.voters).chain(std::iter::once(&args.me)) {
        names.insert(controller_id(name), name.clone());
    }
    controller.observe_peers(names.keys().copied().collect());
    let view = Arc::new(MapView {
        map: Arc::new(controller.map().clone()),
        status: ControllerStatus::default(),
    });
    let (out, rx) = watch::channel(view);
    let now = Instant::now();
    let mut task = ControllerTask {
        args,
        controller,
        disk,
        planner,
        names,
        out,
        started: now,
        published_at: now,
        dirty: false,
        members_seen: 0,
        unregistered: 0,
    };
    task.publish();
    Ok((task, rx))
}

/// Least time between two publications of the map under a stream of commits.
const PUBLISH_EVERY: Duration = Duration::from_millis(20);

/// Messages drained from the inbox per wake-up, at most (then the member ticks and plans).
const INBOX_BATCH_MAX: usize = 256;

impl ControllerTask {
    /// This member is the controller's only voter (a cluster of one, or what is left of
    /// one after the others left): alone, it may lead, so its node may found again.
    pub fn sole_voter(&self) -> bool {
        self.controller.voters() == [self.controller.id()]
    }

    /// Runs until the node stops (or the log cannot be written: a member that cannot
    /// persist must not go on).
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.args.cfg.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gossip_open = true;
        loop {
            let version = self.controller.map().version;
            let plan_at = self.started + Duration::from_millis(self.planner.next_round_ms(version));
            tokio::select! {
                _ = tick.tick() => {
                    // The leader's count of observers changes without the map.
                    let observers = self.controller.observers();
                    if self.dirty || self.out.borrow().status.observers != observers {
                        self.publish();
                    }
                    if self.controller.tick().is_err() {
                        // Changes gathered since the last tick: their owners send them again.
                        self.args.metrics.drop("proposal-refused");
                    }
                    if self.controller.is_leader() {
                        self.args.heard.heard();
                        self.hand_over_if_leaving();
                    }
                }
                _ = tokio::time::sleep_until(plan_at.into()) => self.plan_round(),
                changed = self.args.gossip.changed(), if gossip_open => {
                    gossip_open = changed.is_ok();
                    let up = self.up_members();
                    let key = members_key(&up);
                    if std::mem::replace(&mut self.members_seen, key) != key {
                        self.planner.members_changed();
                        let peers = up.iter().map(|m| controller_id(&m.name)).collect();
                        self.controller.observe_peers(peers);
                    }
                }
                bytes = self.args.inbox.recv() => {
                    let Some(bytes) = bytes else { return };
                    self.receive(bytes);
                    for _ in 0..INBOX_BATCH_MAX {
                        match self.args.inbox.try_recv() {
                            Ok(bytes) => self.receive(bytes),
                            Err(_) => break,
                        }
                    }
                }
            }
            if let Err(e) = self.drain() {
                tracing::error!(error = %format!("{e:#}"), "the placement controller stops: its log cannot be written");
                self.args.metrics.is_leader.set(0);
                return;
            }
        }
    }

    fn receive(&mut self, bytes: Vec<u8>) {
        self.args.metrics.messages_received.inc();
        match postcard::from_bytes::<Wire>(&bytes) {
            Ok(Wire::Message(raw)) => match decode_message(&raw) {
                Ok(m) if m.to() == self.controller.id() => {
                    if self.controller.leader() == Some(m.from()) {
                        self.args.heard.heard();
                    }
                    if let Err(e) = self.controller.step(m) {
                        tracing::debug!(error = %e, "controller message refused");
                        self.args.metrics.drop("refused");
                    }
                }
                Ok(_) => self.args.metrics.drop("misaddressed"),
                Err(_) => self.args.metrics.drop("undecodable"),
            },
            Ok(Wire::Propose { from, forwarded, command }) => {
                self.propose(&from, forwarded, command)
            }
            Err(_) => self.args.metrics.drop("undecodable"),
        }
    }

    /// A command from `from` (an operator's `shard force`, later owners' promotions): the
    /// leader proposes it, a follower passes it to the leader once.
    fn propose(&mut self, from: &str, forwarded: bool, command: MapCommand) {
        if self.controller.is_leader() {
            match self.controller.propose(&command) {
                Ok(()) => {
                    self.args.metrics.proposals.inc();
                }
                Err(ControllerError::Stale) => self.args.metrics.drop("proposal-stale"),
                Err(_) => self.args.metrics.drop("proposal-refused"),
            }
            return;
        }
        let leader = self.controller.leader().and_then(|id| self.names.get(&id).cloned());
        match leader.filter(|_| !forwarded) {
            Some(leader) => {
                let wire = Wire::Propose { from: from.to_string(), forwarded: true, command };
                self.send_to(&leader, wire.to_bytes());
            }
            None => self.args.metrics.drop("no-leader"),
        }
    }

    /// A leader whose own process leaves (the map has it draining or dead at this
    /// incarnation) hands leadership to a voter that stays, is up and holds the whole log:
    /// the group needs no election timeout to go on, and nodes keep hearing from a leader.
    fn hand_over_if_leaving(&mut self) {
        use botclaw_core::shardmap::MemberState as Map;
        let view = self.args.gossip.borrow();
        let map = self.controller.map();
        let me = map.member_ix(&self.args.me).and_then(|ix| map.member(ix));
        if me.is_none_or(|m| m.incarnation != view.me.incarnation || m.state == Map::Active) {
            return;
        }
        let stays = |name: &str| {
            let member = map.member_ix(name).and_then(|ix| map.member(ix));
            member.is_some_and(|m| m.state == Map::Active)
                && view
                    .members
                    .iter()
                    .any(|m| !m.is_self && m.id.name == name && m.state != MemberState::Down)
        };
        let to = (self.controller.voters().into_iter())
            .filter(|&id| id != self.controller.id() && self.controller.caught_up(id))
            .find(|id| self.names.get(id).is_some_and(|n| stays(n)));
        drop(view);
        if let Some(to) = to.filter(|&to| self.controller.transfer_leader(to)) {
            tracing::info!(to = ?self.names.get(&to), "leaving: handing the controller's leadership over");
        }
    }

    /// The members the failure detector sees up, with whether each serves conversations.
    fn up_members(&mut self) -> Vec<UpMember> {
        let view = self.args.gossip.borrow();
        let mut up = vec![UpMember {
            serving: view.me.has_role(botclaw_core::roles::CONVERSATIONS),
            ..UpMember::new(view.me.name.clone(), view.me.incarnation, view.me.capacity)
        }];
        for m in view.members.iter().filter(|m| !m.is_self && m.state != MemberState::Down) {
            self.names.insert(controller_id(&m.id.name), m.id.name.clone());
            up.push(UpMember {
                serving: m.id.has_role(botclaw_core::roles::CONVERSATIONS),
                ..UpMember::new(m.id.name.clone(), m.id.incarnation, m.id.capacity)
            });
        }
        up
    }

    /// The leader's round: the autopilot's group change, then the planner's commands. Runs
    /// on this thread, which the runtime gives up meanwhile (tens of ms at 262,144 shards).
    fn plan_round(&mut self) {
        let now = self.started.elapsed().as_millis() as u64;
        if !self.controller.is_leader() || !self.args.gossip.borrow().joined {
            self.planner.skip(now, self.controller.map().version);
            return;
        }
        let up = self.up_members();
        // Load-driven moves in force: decided by overloaded owners, vouched for by their
        // targets over gossip (see `rebalance`).
        let moves = self.args.gossip.borrow().moves();
        let pins = moves.iter().map(|r| (r.shard, r.to.as_str()));
        let (planner, c) = (&mut self.planner, &self.controller);
        let version = c.map().version;
        let was_settled = planner.settled(version);
        let Round { group, commands } =
            tokio::task::block_in_place(|| planner.round(now, c, &up, pins));
        let unregistered = unregistrable(c.map(), &up);
        if unregistered.len() != self.unregistered {
            self.unregistered = unregistered.len();
            self.dirty = true;
            if !unregistered.is_empty() {
                tracing::warn!(
                    nodes = ?unregistered,
                    limit = MEMBERS_MAX,
                    "the shard map holds every name it can: these nodes are up and own nothing"
                );
            }
        }
        if planner.settled(version) != was_settled {
            self.dirty = true;
        }
        if let Some(changes) = group {
            let named: Vec<(String, GroupChange)> = changes
                .iter()
                .map(|(id, c)| {
                    (self.names.get(id).cloned().unwrap_or_else(|| format!("#{id}")), *c)
                })
                .collect();
            match self.controller.change_members(&changes) {
                Ok(()) => tracing::info!(changes = ?named, "controller group change proposed"),
                Err(e) => tracing::debug!(error = %e, "controller group change not proposed"),
            }
        }
        for command in commands {
            if self.controller.propose(&command).is_ok() {
                self.args.metrics.proposals.inc();
            }
        }
    }

    /// Executes every ready batch: send, persist, send what follows, publish.
    fn drain(&mut self) -> Result<()> {
        let mut changed = false;
        while let Some(rd) = self.controller.ready() {
            for m in rd.messages {
                self.send(m);
            }
            if !rd.persist.is_empty() {
                let (disk, batch) = (&mut self.disk, rd.persist);
                tokio::task::block_in_place(|| disk.write(batch))?;
            }
            for m in rd.after_persist {
                self.send(m);
            }
            if let Some(leader) = rd.leader_changed {
                let name = leader.and_then(|id| self.names.get(&id).cloned());
                tracing::info!(leader = ?name, term = self.controller.term(), "placement controller leader changed");
                changed = true;
            }
            for a in &rd.applied {
                self.args.metrics.entries_applied.inc();
                if let Some(command) = &a.command {
                    if !a.applied.skipped.is_empty() {
                        tracing::debug!(index = a.index, skipped = ?a.applied.skipped, "map command partly skipped");
                    }
                    log_command(command, &a.applied);
                }
            }
            changed |= !rd.applied.is_empty() || rd.snapshot_installed;
        }
        // Every publication makes the replicator and routing look at what changed: under a
        // stream of commits (a join's moves) it happens at most every PUBLISH_EVERY, the
        // rest on the next tick.
        if changed {
            if self.published_at.elapsed() >= PUBLISH_EVERY {
                self.publish();
            } else {
                self.dirty = true;
            }
        }
        Ok(())
    }

    /// Learns the names of every node gossip knows (a peer's controller id is a hash of
    /// its name).
    fn learn_names(&mut self) {
        let view = self.args.gossip.borrow();
        for m in &view.members {
            self.names.entry(controller_id(&m.id.name)).or_insert_with(|| m.id.name.clone());
        }
    }

    fn send(&mut self, m: ControllerMessage) {
        if !self.names.contains_key(&m.to()) {
            self.learn_names();
        }
        let Some(name) = self.names.get(&m.to()).cloned() else {
            self.args.metrics.drop("unknown-peer");
            return;
        };
        let bytes = Wire::Message(encode_message(&m)).to_bytes();
        self.send_to(&name, bytes);
    }

    fn send_to(&self, peer: &str, bytes: Vec<u8>) {
        // Headroom for the link's own framing: a larger message would cut the link.
        if bytes.len() as u64 + 4096 > self.args.frame_bytes_max {
            tracing::error!(
                bytes = bytes.len(),
                frame_bytes_max = self.args.frame_bytes_max,
                "a controller message does not fit in a link frame (raise link.frame_bytes_max)"
            );
            self.args.metrics.drop("too-large");
            return;
        }
        match remote_router(peer) {
            Some(router) => match router.cast(RouterMessage::Controller(bytes)) {
                Ok(()) => {
                    self.args.metrics.messages_sent.inc();
                }
                Err(_) => self.args.metrics.drop("link-down"),
            },
            None => self.args.metrics.drop("no-link"),
        }
    }

    /// Publishes the applied map and the group's status.
    fn publish(&mut self) {
        self.dirty = false;
        self.published_at = Instant::now();
        self.learn_names();
        let c = &self.controller;
        let map = c.map();
        for m in map.members() {
            self.names.insert(controller_id(&m.name), m.name.clone());
        }
        let name =
            |id: ControllerId| self.names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
        let r = self.args.replication_factor;
        let mut status = ControllerStatus {
            leader: c.leader().map(name),
            is_leader: c.is_leader(),
            term: c.term(),
            applied_index: c.applied_index(),
            map_version: map.version,
            voters: c.voters().into_iter().map(name).collect(),
            learners: c.learners().len(),
            observers: c.observers(),
            role: c.role().to_string(),
            plan_settled: c.is_leader() && self.planner.settled(map.version),
            map_members: map.members().len(),
            members_unregistered: if c.is_leader() { self.unregistered } else { 0 },
            ..ControllerStatus::default()
        };
        status.voters.sort();
        status.unavailable = map.unavailable().take(UNAVAILABLE_LISTED_MAX).collect();
        let tally = map.tally();
        status.moves_in_flight = tally.learning as usize;
        status.shards_unassigned = tally.unassigned() as usize;
        status.shards_unavailable = tally.unavailable as usize;
        status.shards_under_replicated = tally.under_replicated(r) as usize;
        status.owned = (map.members().iter().enumerate())
            .filter(|(_, m)| !m.state.is_gone())
            .map(|(ix, m)| (m.name.clone(), map.owned_by(ix as MemberIx)))
            .collect();
        let m = &self.args.metrics;
        m.is_leader.set(i64::from(status.is_leader));
        m.term.set(status.term as i64);
        m.map_version.set(status.map_version as i64);
        m.moves_in_flight.set(status.moves_in_flight as i64);
        m.shards_under_replicated.set(status.shards_under_replicated as i64);
        m.shards_unavailable.set(status.shards_unavailable as i64);
        let view = MapView { map: Arc::new(map.clone()), status };
        self.out.send_replace(Arc::new(view));
    }
}

/// Membership and operator commands are logged; moves are counted, not logged one by one.
fn log_command(command: &MapCommand, applied: &botclaw_core::shardmap::Applied) {
    let changed = applied.changed.len();
    if !applied.skipped.is_empty() && changed == 0 {
        // A repeated leave, a death already known: logged above at debug level.
        return;
    }
    match command {
        MapCommand::Join { name, incarnation, .. } => {
            tracing::info!(%name, incarnation, shards = changed, "map: member joined")
        }
        MapCommand::Dead { name, incarnation } => {
            tracing::info!(%name, incarnation, shards = changed, "map: member dead")
        }
        MapCommand::Drain { name } => tracing::info!(%name, "map: member draining"),
        MapCommand::Leave { name, incarnation } => {
            tracing::info!(%name, incarnation, shards = changed, "map: member left (controlled shutdown)")
        }
        MapCommand::Force { shard, member } => {
            tracing::warn!(shard, member, "map: shard forced onto a member (operator override)")
        }
        MapCommand::Assign(_) => tracing::info!(shards = changed, "map: shards assigned"),
        MapCommand::Changes(_) => tracing::debug!(shards = changed, "map: shard changes"),
        MapCommand::SetFlag { name, flag: Some(f) } => {
            tracing::info!(%name, enabled = f.enabled, rollout_bp = f.rollout_bp, bot = ?f.bot, "map: flag set")
        }
        MapCommand::SetFlag { name, flag: None } => tracing::info!(%name, "map: flag removed"),
    }
}
