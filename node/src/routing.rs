//! Where a conversation's requests go: the placement snapshot and the dispatcher.
//!
//! The placement is rebuilt (off the async threads) whenever the set of members serving
//! conversations changes, and swapped in atomically; requests read the current snapshot
//! without locks. The dispatcher runs a request locally if this node owns the
//! conversation, and forwards it to the owner otherwise. A forwarded request that arrives
//! at a node which disagrees about the owner (ownership changing hands) is held there, in
//! order per conversation, until the node's placement changes or a grace period passes:
//! see `botclaw_core::handoff` for the rule and [`Holding`] for the queue. A request runs
//! on one node at most.
//!
//! Keep-majority: `maintain` also feeds membership to a [`MajorityGuard`]; while this node
//! sees less than a majority of the last stable membership, `serving` is false and the
//! node runs no turns (it answers `unavailable`), so a minority partition cannot diverge.
//! Replica ops from peers are served regardless: only majority nodes send them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use botclaw_actors::envelope::{ConvOutcome, ConvRequest, Envelope, FailKind, Reply};
use botclaw_actors::forwarder::Forwarder;
use botclaw_actors::host::ConversationHost;
use botclaw_actors::replicator::{Peers, ReplicaAnswer, Replicator, Route};
use botclaw_actors::router::{remote_router, Inbound};
use botclaw_actors::store::{BoxFuture, StoreOp};
use botclaw_config::{HandoffConfig, PlacementConfig, ReplicationConfig};
use botclaw_core::handoff::{self, Ask, Held, HoldQueue, HoldRules, Step};
use botclaw_core::placement::{shard_of, Placement, RingMember, ShardId};
use botclaw_core::rebalance::MoveTable;
use botclaw_core::replication::MajorityGuard;
use botclaw_core::shardmap::ShardMap;
use botclaw_core::MemberState;
use tokio::sync::{oneshot, watch};

use crate::gossip::ClusterView;
use crate::metrics::Metrics;
use crate::modules::NodeModules;

/// The role a node needs to own conversations.
pub const CONVERSATIONS_ROLE: &str = botclaw_core::roles::CONVERSATIONS;

/// One consistent view of who owns what: the ring, then the load-driven moves.
#[derive(Debug)]
pub struct PlacementView {
    pub placement: Arc<Placement>,
    /// Shards moved off their ring owner by the rebalancer (targets are ring members).
    pub moves: MoveTable,
    /// This node has joined the cluster (its view is worth acting on).
    pub joined: bool,
    /// The controller's map, when it is authoritative (`controller.authoritative`): owners
    /// come from it, not from the ring.
    pub map: Option<Arc<ShardMap>>,
}

impl PlacementView {
    pub fn new(placement: Placement, joined: bool) -> PlacementView {
        PlacementView {
            placement: Arc::new(placement),
            moves: MoveTable::default(),
            joined,
            map: None,
        }
    }

    /// Routing by the controller's map (`ring` is an empty ring, kept for `/status`);
    /// `moves` are the load-driven moves in force (the controller plans them; a target
    /// vouches for the ones it received, as by the ring).
    pub fn by_map(
        map: Arc<ShardMap>,
        ring: Arc<Placement>,
        moves: MoveTable,
        joined: bool,
    ) -> PlacementView {
        PlacementView { placement: ring, moves, joined, map: Some(map) }
    }

    /// Shard and owner of a conversation: by the controller's map when it is
    /// authoritative; else the move target if the shard moved, else the ring owner.
    pub fn locate(&self, conv: &str) -> (ShardId, Option<&str>) {
        if let Some(map) = &self.map {
            let shard = shard_of(conv, map.shard_count());
            return (shard, map.owner(shard));
        }
        let shard = shard_of(conv, self.placement.shard_count());
        (shard, self.moves.owner(&self.placement, shard))
    }

    /// The owner, then the ring's next distinct nodes: `n` nodes at most.
    pub fn preference_list(&self, shard: ShardId, n: usize) -> Vec<&str> {
        self.moves.preference_list(&self.placement, shard, n)
    }
}

/// Members that own shards: up or suspect (SWIM treats a suspect as alive) and serving
/// conversations.
pub fn ring_members(view: &ClusterView) -> BTreeSet<RingMember> {
    view.members
        .iter()
        .filter(|m| m.state != MemberState::Down)
        .filter(|m| m.id.has_role(CONVERSATIONS_ROLE))
        .map(|m| RingMember { name: m.id.name.clone(), capacity: m.id.capacity })
        .collect()
}

/// How often the majority guard is re-evaluated without membership changes (the baseline
/// moves only after membership was stable for a while).
const GUARD_TICK: Duration = Duration::from_millis(200);

/// What `maintain` keeps up to date: the dispatcher's placement, keep-majority verdict,
/// held requests and actors, and the baseline `/status` shows.
pub struct Maintained {
    pub dispatcher: Arc<Dispatcher>,
    /// The keep-majority baseline, for `/status`.
    pub baseline: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Keeps the placement and the keep-majority verdict in step with membership, fails
/// requests forwarded to members that went down instead of letting them time out, and
/// tells actors of conversations that moved away to close.
pub async fn maintain(
    mut view: watch::Receiver<ClusterView>,
    cfg: PlacementConfig,
    replication: ReplicationConfig,
    out: Maintained,
) {
    let started = Instant::now();
    let me = view.borrow().me.name.clone();
    let mut guard = MajorityGuard::new(&me, 0, replication.stable_after_ms);
    let mut current: Option<(BTreeSet<RingMember>, bool)> = None;
    let mut ring: Option<Arc<Placement>> = None;
    let mut down = BTreeSet::new();
    let mut tick = tokio::time::interval(GUARD_TICK);
    let mut me_as_seen = None;
    loop {
        let (members, joined, now_down, live, identity, mut moves) = {
            let v = view.borrow_and_update();
            let moves = v.moves();
            let identity = (v.me.incarnation, v.me.bump);
            let names = |pred: &dyn Fn(MemberState) -> bool| -> BTreeSet<String> {
                v.members.iter().filter(|m| pred(m.state)).map(|m| m.id.name.clone()).collect()
            };
            let now_down = names(&|s| s == MemberState::Down);
            let mut live = names(&|s| s != MemberState::Down);
            live.insert(me.clone());
            (ring_members(&v), v.joined, now_down, live, identity, moves)
        };
        // Declared down by the others and rejoined (a freeze, a partition): whatever this
        // node's actors hold may have been taken over meanwhile. They close; the next
        // request acquires afresh from the replicas.
        if me_as_seen.replace(identity).is_some_and(|before| before != identity) {
            let n = out.dispatcher.host.relinquish(|_| false);
            tracing::warn!(
                closing = n,
                "this node rejoined the cluster: its conversations re-acquire"
            );
        }
        for peer in now_down.difference(&down) {
            out.dispatcher.forwarder.fail_peer(peer);
        }
        down = now_down;
        let serving = guard.observe(&live, started.elapsed().as_millis() as u64);
        if out.dispatcher.serving.swap(serving, Ordering::AcqRel) != serving {
            if serving {
                tracing::info!(live = live.len(), "a majority is reachable: serving turns");
            } else {
                let n = out.dispatcher.host.relinquish(|_| false);
                tracing::warn!(live = live.len(), baseline = ?guard.baseline(), closing = n, "less than a majority is reachable: serving no turns");
            }
        }
        {
            let mut baseline = out.baseline.lock().expect("baseline lock");
            if baseline.len() != guard.baseline().len()
                || baseline.iter().zip(guard.baseline()).any(|(a, b)| a != b)
            {
                *baseline = guard.baseline().iter().cloned().collect();
            }
        }
        out.dispatcher.metrics.serving.set(i64::from(serving));
        if current.as_ref() != Some(&(members.clone(), joined)) || ring.is_none() {
            let list: Vec<RingMember> = members.iter().cloned().collect();
            let cfg = cfg.clone();
            let base = ring.clone();
            let placement = tokio::task::spawn_blocking(move || match base {
                Some(base) => Placement::rebuild_from(&base, &list, &cfg),
                None => Placement::build(&list, &cfg),
            })
            .await
            .expect("placement build does not panic");
            tracing::info!(members = members.len(), joined, "placement updated");
            ring = Some(Arc::new(placement));
            current = Some((members.clone(), joined));
        }
        moves.retain_targets(|n| members.iter().any(|m| m.name == n));
        let before = out.dispatcher.view.load();
        let ring_now = ring.clone().expect("built above");
        if !Arc::ptr_eq(&before.placement, &ring_now)
            || before.moves != moves
            || before.joined != joined
        {
            if before.moves != moves {
                tracing::info!(moved_shards = moves.len(), "load-driven moves updated");
            }
            let next = Arc::new(PlacementView { placement: ring_now, moves, joined, map: None });
            // The new placement first: what the relinquishing actors pass on is routed by it.
            out.dispatcher.view.store(next.clone());
            let moved =
                out.dispatcher.host.relinquish(|conv| next.locate(conv).1 == Some(me.as_str()));
            if moved > 0 {
                tracing::info!(moved, "conversations moved to other nodes");
            }
            out.dispatcher.release_held();
        }
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// The cluster as the replicator sees it: preference lists from the placement snapshot,
/// the keep-majority verdict, and peers' stores through the forwarder.
pub struct NodePeers {
    pub me: Arc<str>,
    pub view: Arc<ArcSwap<PlacementView>>,
    pub serving: Arc<AtomicBool>,
    pub forwarder: Arc<Forwarder>,
    pub factor: usize,
}

impl Peers for NodePeers {
    fn me(&self) -> &str {
        &self.me
    }

    fn route(&self, conv: &str) -> Route {
        let view = self.view.load();
        let (shard, _) = view.locate(conv);
        let list = view
            .preference_list(shard, self.factor)
            .into_iter()
            .map(|n| if n == &*self.me { self.me.clone() } else { Arc::from(n) })
            .collect();
        Route { list, serving: view.joined && self.serving.load(Ordering::Acquire) }
    }

    fn send(
        &self,
        peer: &str,
        conv: &str,
        op: StoreOp,
    ) -> BoxFuture<'static, Result<ReplicaAnswer, String>> {
        let (tx, rx) = oneshot::channel();
        let envelope =
            Envelope { conv: conv.to_string(), request: ConvRequest::Replica(op), hops: 1 };
        let reply = Reply::new(move |o| drop(tx.send(o)));
        // A member that just came up may be in the placement before this node's link to
        // it: its ops wait for the link (bounded) instead of failing the turn.
        let waiting = if remote_router(peer).is_some() {
            self.forwarder.forward(peer, envelope, reply);
            None
        } else {
            Some((self.forwarder.clone(), Arc::<str>::from(peer), envelope, reply))
        };
        Box::pin(async move {
            if let Some((forwarder, peer, envelope, reply)) = waiting {
                let deadline = Instant::now() + LINK_PATIENCE;
                while remote_router(&peer).is_none() && Instant::now() < deadline {
                    tokio::time::sleep(HOLD_TICK).await;
                }
                forwarder.forward(&peer, envelope, reply);
            }
            match rx.await {
                Ok(ConvOutcome::Replica(answer)) => Ok(answer),
                Ok(ConvOutcome::Failed { message, .. }) => Err(message),
                Ok(other) => Err(format!("unexpected answer to a replica op: {other:?}")),
                Err(_) => Err("the forwarder dropped the request".into()),
            }
        })
    }
}

/// One turn counter per shard (a fixed array: bounded, and counting takes no lock).
#[derive(Debug)]
pub struct ShardCounters(Box<[AtomicU32]>);

impl ShardCounters {
    pub fn new(shard_count: u32) -> ShardCounters {
        ShardCounters((0..shard_count).map(|_| AtomicU32::new(0)).collect())
    }

    pub fn count(&self, shard: ShardId) {
        if let Some(c) = self.0.get(shard as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The `n` highest counts, highest first (ties by shard), resetting every counter.
    pub fn take_top(&self, n: usize) -> Vec<(ShardId, u32)> {
        let mut top: Vec<(ShardId, u32)> = Vec::with_capacity(n + 1);
        for (shard, c) in self.0.iter().enumerate() {
            let turns = c.swap(0, Ordering::Relaxed);
            if turns == 0 || (top.len() == n && top.last().is_some_and(|t| t.1 >= turns)) {
                continue;
            }
            top.push((shard as ShardId, turns));
            top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            top.truncate(n);
        }
        top
    }
}

/// Requests held on this node while ownership changes hands (see
/// `botclaw_core::handoff`).
pub struct Holding {
    rules: HoldRules,
    queue: Mutex<HoldQueue<(ConvRequest, Reply)>>,
    /// Requests held, plus one while they are being routed again: zero means a new
    /// request cannot be behind a held one, and routing takes no lock.
    busy: AtomicUsize,
    started: Instant,
}

impl Holding {
    pub fn new(cfg: &HandoffConfig) -> Holding {
        let rules = HoldRules {
            grace_ms: cfg.hold_grace_ms,
            timeout_ms: cfg.hold_timeout_ms,
            hops_max: cfg.hops_max,
            held_max: cfg.held_requests_max,
        };
        Holding {
            rules,
            queue: Mutex::new(HoldQueue::new(rules.held_max)),
            busy: AtomicUsize::new(0),
            started: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// How often held requests are routed again without a placement change.
pub const HOLD_TICK: Duration = Duration::from_millis(50);

/// How long a replica op waits for the link to a member that just came up.
const LINK_PATIENCE: Duration = Duration::from_secs(2);

pub struct Dispatcher {
    pub host: ConversationHost,
    /// Turns run here per shard since the last load summary: one counter per shard, so
    /// counting a turn takes no lock.
    pub shard_turns: ShardCounters,
    pub replicator: Arc<Replicator>,
    /// Keep-majority verdict (see `maintain`).
    pub serving: Arc<AtomicBool>,
    pub forwarder: Arc<Forwarder>,
    pub view: Arc<ArcSwap<PlacementView>>,
    pub me: Arc<str>,
    pub retry_after_ms: u64,
    /// The bound on all work in flight here (client, forwarded, replica, module).
    pub admission: Arc<crate::admission::Admission>,
    pub metrics: Metrics,
    pub holding: Holding,
    pub modules: Arc<NodeModules>,
    /// This node is draining: it owns nothing, so it trusts its own view at once.
    pub draining: AtomicBool,
    /// The placement controller's inbox (bounded: a full one drops, Raft resends).
    pub controller: tokio::sync::mpsc::Sender<Vec<u8>>,
    /// The shard replicator, when the controller's map is authoritative.
    pub shards: std::sync::OnceLock<botclaw_actors::shards::ShardReplicator>,
}

impl Dispatcher {
    /// The `n` shards with the most turns since the last call, as turns/s over `period`,
    /// hottest first; the counts start again.
    pub fn take_hot_shards(&self, n: usize, period: Duration) -> Vec<(ShardId, f32)> {
        let secs = period.as_secs_f32().max(0.001);
        self.shard_turns
            .take_top(n)
            .into_iter()
            .map(|(s, turns)| (s, turns as f32 / secs))
            .collect()
    }

    /// Shard and owner of a conversation as this node sees it now.
    pub fn locate(&self, conv: &str) -> (ShardId, Option<String>) {
        let view = self.view.load();
        let (shard, owner) = view.locate(conv);
        (shard, owner.map(String::from))
    }

    fn unavailable(&self, reply: Reply, message: String) {
        reply.send(ConvOutcome::Failed {
            kind: FailKind::Unavailable,
            message,
            retry_after_ms: Some(self.retry_after_ms),
        });
    }

    /// Runs `request` where the conversation lives. `hops` is how many times it was
    /// forwarded already.
    pub fn submit(&self, conv: &str, request: ConvRequest, hops: u8, reply: Reply) {
        if self.holding.busy.load(Ordering::Acquire) == 0 {
            if let Some(held) = self.place(conv, request, hops, 0, false, reply) {
                self.hold(held);
            }
            return;
        }
        // Some requests are held: this one may have to wait behind its conversation's.
        let mut queue = self.holding.queue.lock().expect("hold lock");
        let behind = queue.holds(conv);
        if let Some(held) = self.place(conv, request, hops, 0, behind, reply) {
            self.push_held(&mut queue, held);
        }
    }

    /// A request a closing conversation actor passes on: ownership moved, this node's
    /// placement knows where to.
    pub fn redirect(&self, conv: &str, request: ConvRequest, reply: Reply) {
        self.metrics.redirects.inc();
        self.submit(conv, request, 0, reply);
    }

    /// Routes every held request again, in order (after a placement change, and every
    /// [`HOLD_TICK`]).
    pub fn release_held(&self) {
        if self.holding.busy.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut queue = self.holding.queue.lock().expect("hold lock");
        let held = queue.take_all();
        self.holding.busy.store(held.len() + 1, Ordering::Release);
        let now = self.holding.now_ms();
        for h in held {
            let behind = queue.holds(&h.conv);
            let waited = now.saturating_sub(h.since_ms);
            let (request, reply) = h.item;
            if let Some(again) = self.place(&h.conv, request, h.hops, waited, behind, reply) {
                // Room is certain: nothing else was pushed while the lock was held.
                let _ = queue.push(Held { item: again.item, since_ms: h.since_ms, ..again });
            }
        }
        self.holding.busy.store(queue.len(), Ordering::Release);
        self.metrics.held_now.set(queue.len() as i64);
    }

    /// Requests held here now.
    pub fn held(&self) -> usize {
        self.holding.queue.lock().expect("hold lock").len()
    }

    fn hold(&self, held: Held<(ConvRequest, Reply)>) {
        let mut queue = self.holding.queue.lock().expect("hold lock");
        self.push_held(&mut queue, held);
    }

    fn push_held(
        &self,
        queue: &mut HoldQueue<(ConvRequest, Reply)>,
        held: Held<(ConvRequest, Reply)>,
    ) {
        self.metrics.held_requests.inc();
        if let Err(refused) = queue.push(held) {
            let (_, reply) = refused.item;
            reply.send(ConvOutcome::Failed {
                kind: FailKind::Busy,
                message: "too many requests held while ownership changes hands".into(),
                retry_after_ms: Some(self.retry_after_ms),
            });
        }
        self.holding.busy.store(queue.len(), Ordering::Release);
        self.metrics.held_now.set(queue.len() as i64);
    }

    /// Decides and acts on one request (see `botclaw_core::handoff::route`); gives it back
    /// when it is to be held.
    fn place(
        &self,
        conv: &str,
        request: ConvRequest,
        hops: u8,
        waited_ms: u64,
        behind: bool,
        reply: Reply,
    ) -> Option<Held<(ConvRequest, Reply)>> {
        let view = self.view.load();
        if !self.serving.load(Ordering::Acquire) {
            self.metrics.minority_refusals.inc();
            let why = if view.map.is_some() {
                "this node is cut off from the placement controller's majority; try another node"
            } else {
                "this node sees less than a majority of the cluster; try another node"
            };
            self.unavailable(reply, why.into());
            return None;
        }
        let (shard, owner) = view.locate(conv);
        let rules = &self.holding.rules;
        let waited_ms = if self.draining.load(Ordering::Acquire) {
            waited_ms.max(rules.grace_ms)
        } else {
            waited_ms
        };
        let ask = Ask { me: &self.me, joined: view.joined, owner, hops, waited_ms, behind };
        let step = match handoff::route(ask, rules) {
            Step::Forward(owner) if remote_router(owner).is_none() => {
                handoff::unreachable(waited_ms, rules)
            }
            step => step,
        };
        match step {
            Step::Local => {
                if matches!(request, ConvRequest::Say { .. }) {
                    self.shard_turns.count(shard);
                }
                self.host.dispatch(conv, request, reply);
            }
            Step::Forward(owner) => {
                self.metrics.forwards.inc();
                let envelope = Envelope { conv: conv.to_string(), request, hops: hops + 1 };
                self.forwarder.forward(owner, envelope, reply);
            }
            Step::Hold => {
                let since_ms = self.holding.now_ms();
                return Some(Held {
                    conv: conv.to_string(),
                    hops,
                    since_ms,
                    item: (request, reply),
                });
            }
            Step::Refuse(why) => {
                self.metrics.forward_refusals.inc();
                self.unavailable(reply, why.to_string());
            }
        }
        None
    }
}

/// Routes held requests again every [`HOLD_TICK`] (placement changes release them at once,
/// from `maintain`).
pub async fn release_held_loop(dispatcher: Arc<Dispatcher>) {
    let mut tick = tokio::time::interval(HOLD_TICK);
    loop {
        tick.tick().await;
        dispatcher.release_held();
    }
}

impl Inbound for Dispatcher {
    fn handle(&self, envelope: Envelope, reply: Reply) {
        use crate::admission::Work;
        let kind = match &envelope.request {
            ConvRequest::Replica(_) => Work::Replica,
            ConvRequest::Module(_) => Work::Module,
            _ => Work::Forwarded,
        };
        // Work from peers counts against the same bound as this node's own clients.
        use botclaw_actors::forwarder::Weight;
        let Some(permit) = self.admission.admit(kind, envelope.weight()) else {
            return reply.send(ConvOutcome::Failed {
                kind: FailKind::Busy,
                message: format!("{} is at its in-flight limit", self.me),
                retry_after_ms: Some(self.retry_after_ms),
            });
        };
        let reply = Reply::new(move |outcome| {
            drop(permit);
            reply.send(outcome)
        });
        match envelope.request {
            ConvRequest::Replica(op) => self.replicator.serve(envelope.conv, op, move |r| {
                reply.send(match r {
                    Ok(answer) => ConvOutcome::Replica(answer),
                    Err(e) => ConvOutcome::failed(FailKind::Internal, e.to_string()),
                })
            }),
            ConvRequest::Module(request) => self.modules.serve(request, reply),
            request => self.submit(&envelope.conv, request, envelope.hops, reply),
        }
    }

    fn controller(&self, bytes: Vec<u8>) {
        if self.controller.try_send(bytes).is_err() {
            self.metrics.controller.drop("queue-full");
        }
    }

    fn shards(&self, bytes: Vec<u8>) {
        match self.shards.get() {
            Some(shards) if shards.peer(bytes).is_ok() => {}
            _ => self.metrics.controller.drop("shard-batch-dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_counters_give_the_hottest_and_start_again() {
        let c = ShardCounters::new(100);
        for (shard, turns) in [(7, 5), (3, 9), (50, 1), (99, 5)] {
            for _ in 0..turns {
                c.count(shard);
            }
        }
        c.count(1000); // out of range: ignored
        assert_eq!(c.take_top(3), vec![(3, 9), (7, 5), (99, 5)]);
        assert!(c.take_top(3).is_empty());
    }
}
