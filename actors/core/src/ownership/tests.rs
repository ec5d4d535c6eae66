//! Ownership machines of several nodes, a controller map they apply at different times, and
//! a seeded scheduler that interleaves writes, message deliveries, store completions, map
//! changes (crashes, restarts, joins and the moves the planner makes) in any order. After
//! every step a checker asserts the replication invariant: every acknowledged write is
//! durable on every in-sync member of its shard in the controller's latest map.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;
use crate::placement::Placement;
use crate::shardmap::plan::{plan, PlanConfig, UpMember};
use crate::shardmap::ShardChange;

const SHARDS: u32 = 8;

/// A write: (shard, unique number).
type W = (ShardId, u64);

struct Node {
    name: String,
    incarnation: u64,
    /// `None` while crashed.
    machine: Option<Ownership<W>>,
    /// The map version this node applied.
    applied: u64,
    /// Durable writes per shard (kept across crashes).
    store: BTreeMap<ShardId, BTreeSet<W>>,
    /// Store operations queued, completed in order.
    queue: VecDeque<Effect<W>>,
    /// Cut off: its messages are lost both ways (the controller may declare it dead).
    isolated: bool,
}

struct World {
    rng: StdRng,
    nodes: Vec<Node>,
    /// The controller's map and every version of it (nodes apply them in order).
    maps: Vec<ShardMap>,
    /// Per (from, to): messages in flight, in order.
    links: BTreeMap<(MemberIx, MemberIx), VecDeque<Msg<W>>>,
    next_write: u64,
    /// Writes submitted and where: (node, seq) -> write.
    submitted: BTreeMap<(usize, Seq), W>,
    acked: BTreeSet<W>,
    plan_cfg: PlanConfig,
    /// Test hook: the controller promotes learners itself without waiting for the owner
    /// (a planted bug the checker must catch).
    promote_early: bool,
    /// Crashes, restarts and cuts among the random steps.
    faults: bool,
    steps: usize,
}

impl World {
    fn new(seed: u64, names: &[&str]) -> World {
        World::with_replicas(seed, names, 2)
    }

    fn with_replicas(seed: u64, names: &[&str], replication_factor: usize) -> World {
        let mut w = World {
            rng: StdRng::seed_from_u64(seed),
            nodes: Vec::new(),
            maps: vec![ShardMap::new(SHARDS)],
            links: BTreeMap::new(),
            next_write: 0,
            submitted: BTreeMap::new(),
            acked: BTreeSet::new(),
            plan_cfg: PlanConfig {
                moves_in_flight_max: 2,
                replication_factor,
                ..Default::default()
            },
            promote_early: false,
            faults: true,
            steps: 0,
        };
        for n in names {
            w.add_node(n);
        }
        for _ in 0..4 {
            w.controller_round();
        }
        w.catch_up_all();
        w
    }

    fn map(&self) -> &ShardMap {
        self.maps.last().unwrap()
    }

    fn add_node(&mut self, name: &str) {
        self.nodes.push(Node {
            name: name.into(),
            incarnation: 1,
            machine: None,
            applied: 0,
            store: BTreeMap::new(),
            queue: VecDeque::new(),
            isolated: false,
        });
        let i = self.nodes.len() - 1;
        self.start(i);
    }

    /// Starts node `i`'s process (first start or restart: a new incarnation).
    fn start(&mut self, i: usize) {
        let ix = i as MemberIx;
        let n = &mut self.nodes[i];
        n.incarnation += 1;
        n.machine = Some(Ownership::new(ix, n.incarnation, OwnershipConfig::default()));
        n.applied = 0;
        n.queue.clear();
        self.links.retain(|(f, t), _| *f != ix && *t != ix);
    }

    fn crash(&mut self, i: usize) {
        self.nodes[i].machine = None;
        self.nodes[i].queue.clear();
    }

    /// The failure detector's view: processes running and not cut off.
    fn up(&self) -> Vec<UpMember> {
        self.nodes
            .iter()
            .filter(|n| n.machine.is_some() && !n.isolated)
            .map(|n| UpMember::new(n.name.clone(), n.incarnation, 100))
            .collect()
    }

    fn commit(&mut self, cmd: &MapCommand) {
        let mut next = self.map().clone();
        next.apply(cmd);
        let problems = next.check();
        assert!(problems.is_empty(), "{problems:?}");
        self.maps.push(next);
    }

    fn controller_round(&mut self) {
        let map = self.map();
        let active = map.active_members();
        let cfg = botclaw_config::PlacementConfig {
            shard_count: SHARDS,
            vnodes: 16,
            ..Default::default()
        };
        let ring = Placement::build(&active, &cfg);
        let cmds = plan(map, &self.up(), &ring, &self.plan_cfg);
        for cmd in cmds {
            self.commit(&cmd);
        }
        if self.promote_early {
            let map = self.map();
            let early: Vec<ShardChange> = (0..SHARDS)
                .filter_map(|s| {
                    let e = map.shard(s)?;
                    let l = *e.learners.as_slice().first()?;
                    Some(ShardChange::Promote {
                        shard: s,
                        epoch: e.epoch,
                        member: l,
                        turn_version: 0,
                    })
                })
                .collect();
            if !early.is_empty() {
                self.commit(&MapCommand::Changes(early));
            }
        }
    }

    /// Node `i` applies the next map version it has not applied.
    fn apply_next_map(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let Some(m) = n.machine.as_mut() else { return };
        if n.isolated || n.applied + 1 >= self.maps.len() as u64 {
            return;
        }
        n.applied += 1;
        let (before, map) = (&self.maps[n.applied as usize - 1], &self.maps[n.applied as usize]);
        // As the node's shard driver does: the changed entries, all when the members changed.
        match map.changed_since(before).filter(|_| before.members() == map.members()) {
            Some(changed) => m.map_applied(map, &changed),
            None => m.map_replaced(map),
        }
        self.drain(i);
    }

    fn catch_up_all(&mut self) {
        for i in 0..self.nodes.len() {
            while self.nodes[i].machine.is_some()
                && !self.nodes[i].isolated
                && self.nodes[i].applied + 1 < self.maps.len() as u64
            {
                self.apply_next_map(i);
            }
        }
    }

    /// Moves node `i`'s effects to where they go.
    fn drain(&mut self, i: usize) {
        let ix = i as MemberIx;
        while let Some(effect) = self.nodes[i].machine.as_mut().and_then(|m| m.poll()) {
            match effect {
                Effect::Send { to, msg } => {
                    self.links.entry((ix, to)).or_default().push_back(msg);
                }
                Effect::Release { seq, .. } => {
                    let w = self.submitted[&(i, seq)];
                    self.acked.insert(w);
                }
                // This scheduler asks no reads (the simulator's checker covers them).
                Effect::Fail { .. } | Effect::ReadReady { .. } => {}
                Effect::Propose(cmd) => {
                    if !self.nodes[i].isolated {
                        self.commit(&cmd);
                    }
                }
                // The machine promises every earlier write is durable: the scan runs now.
                Effect::Stream { shard, attempt, to } => self.stream(i, shard, attempt, to),
                e @ (Effect::Persist { .. } | Effect::PersistReplica { .. }) => {
                    self.nodes[i].queue.push_back(e)
                }
            }
        }
    }

    /// Node `i`'s store completes its oldest operation.
    fn complete_store(&mut self, i: usize) {
        let Some(op) = self.nodes[i].queue.pop_front() else { return };
        match op {
            Effect::Persist { shard, epoch, seq, payload } => {
                self.nodes[i].store.entry(shard).or_default().insert(payload);
                self.nodes[i].machine.as_mut().unwrap().persisted(shard, epoch, seq);
            }
            Effect::PersistReplica { shard, epoch, seq, from, payload } => {
                self.nodes[i].store.entry(shard).or_default().insert(payload);
                let map = &self.maps[self.nodes[i].applied as usize];
                let m = self.nodes[i].machine.as_mut().unwrap();
                m.replica_persisted(shard, epoch, seq, from, map);
            }
            _ => unreachable!(),
        }
        self.drain(i);
    }

    /// Learner `to` installs a copy of what node `i` holds of `shard` now.
    fn stream(&mut self, i: usize, shard: ShardId, attempt: Seq, to: MemberIx) {
        let copy = self.nodes[i].store.get(&shard).cloned().unwrap_or_default();
        let to = usize::from(to);
        if self.nodes[to].machine.is_some() && !self.nodes[to].isolated && !self.nodes[i].isolated {
            self.nodes[to].store.entry(shard).or_default().extend(copy);
            let owner = i as MemberIx;
            self.nodes[to].machine.as_mut().unwrap().stream_installed(shard, attempt, owner);
            self.drain(to);
        }
    }

    fn deliver(&mut self, from: MemberIx, to: MemberIx) {
        let Some(msg) = self.links.get_mut(&(from, to)).and_then(|q| q.pop_front()) else { return };
        let (f, t) = (usize::from(from), usize::from(to));
        if self.nodes[f].isolated || self.nodes[t].isolated {
            return;
        }
        let map = &self.maps[self.nodes[t].applied as usize];
        let Some(m) = self.nodes[t].machine.as_mut() else { return };
        m.receive(from, msg, map);
        self.drain(t);
    }

    fn submit(&mut self) {
        let shard = self.rng.random_range(0..SHARDS);
        // Gateways route by the maps they applied, some of them stale: the write goes to a
        // random node that believes it owns the shard.
        let owners: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].machine.as_ref().is_some_and(|m| m.owns(shard)))
            .collect();
        if owners.is_empty() {
            return;
        }
        let i = owners[self.rng.random_range(0..owners.len())];
        let w = (shard, self.next_write);
        self.next_write += 1;
        let Some(m) = self.nodes[i].machine.as_mut() else { return };
        if let Ok(seq) = m.submit(shard, w) {
            self.submitted.insert((i, seq), w);
        }
        self.drain(i);
    }

    /// The invariant, against the controller's latest map.
    fn check(&self) -> Vec<String> {
        let map = self.map();
        let mut problems = Vec::new();
        for &(shard, n) in &self.acked {
            let e = map.shard(shard).unwrap();
            for &m in e.isr.as_slice() {
                let holds = self.nodes[usize::from(m)]
                    .store
                    .get(&shard)
                    .is_some_and(|s| s.contains(&(shard, n)));
                if !holds {
                    problems.push(format!(
                        "write {n} of shard {shard} was acknowledged but in-sync member {} lacks it (step {})",
                        self.nodes[usize::from(m)].name,
                        self.steps
                    ));
                }
            }
        }
        problems
    }

    fn step(&mut self) {
        self.steps += 1;
        let nodes = self.nodes.len();
        match self.rng.random_range(0..100) {
            0..30 => self.submit(),
            30..60 => {
                let links: Vec<(MemberIx, MemberIx)> =
                    self.links.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
                if !links.is_empty() {
                    let (f, t) = links[self.rng.random_range(0..links.len())];
                    self.deliver(f, t);
                }
            }
            60..80 => {
                let i = self.rng.random_range(0..nodes);
                self.complete_store(i);
            }
            80..90 => {
                let i = self.rng.random_range(0..nodes);
                self.apply_next_map(i);
            }
            90..96 => self.controller_round(),
            96..98 => {
                let i = self.rng.random_range(0..nodes);
                let ticks = self.nodes[i].machine.as_mut().map(|m| m.tick());
                if ticks.is_some() {
                    self.drain(i);
                }
            }
            _ if self.faults => self.fault(),
            _ => {}
        }
    }

    /// A crash, a restart, a cut or a heal, keeping at least two nodes running.
    fn fault(&mut self) {
        let i = self.rng.random_range(0..self.nodes.len());
        let running = self.nodes.iter().filter(|n| n.machine.is_some() && !n.isolated).count();
        let n = &self.nodes[i];
        match (n.machine.is_some(), n.isolated) {
            (true, false) if running > 2 => {
                if self.rng.random_range(0..2) == 0 {
                    self.crash(i)
                } else {
                    self.nodes[i].isolated = true
                }
            }
            (true, true) => self.nodes[i].isolated = false,
            (false, _) => self.start(i),
            _ => {}
        }
    }

    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            self.step();
            let problems = self.check();
            assert!(problems.is_empty(), "{}", problems.join("\n"));
        }
    }

    /// Heals everything and lets the cluster settle; then every owner serves.
    fn settle(&mut self) {
        for i in 0..self.nodes.len() {
            self.nodes[i].isolated = false;
            if self.nodes[i].machine.is_none() {
                self.start(i);
            }
        }
        for _ in 0..200 {
            self.controller_round();
            self.catch_up_all();
            for i in 0..self.nodes.len() {
                while !self.nodes[i].queue.is_empty() {
                    self.complete_store(i);
                }
                if let Some(m) = self.nodes[i].machine.as_mut() {
                    m.tick();
                }
                self.drain(i);
            }
            let links: Vec<_> = self.links.keys().copied().collect();
            for (f, t) in links {
                while self.links.get(&(f, t)).is_some_and(|q| !q.is_empty()) {
                    self.deliver(f, t);
                }
            }
        }
        let problems = self.check();
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}

#[test]
fn writes_are_acknowledged_once_every_in_sync_member_holds_them() {
    let mut w = World::new(1, &["a", "b", "c"]);
    w.faults = false;
    w.run(2000);
    assert!(w.acked.len() > 100, "only {} writes acknowledged", w.acked.len());
}

#[test]
fn a_crash_leaves_every_acknowledged_write_with_the_new_owner() {
    let mut w = World::new(2, &["a", "b", "c"]);
    w.faults = false;
    w.run(800);
    let owner = usize::from(w.map().shard(0).unwrap().owner.unwrap());
    let acked_before: Vec<W> = w.acked.iter().copied().filter(|(s, _)| *s == 0).collect();
    w.crash(owner);
    w.controller_round();
    let new = usize::from(w.map().shard(0).unwrap().owner.expect("an in-sync survivor owns"));
    assert_ne!(new, owner);
    for write in &acked_before {
        assert!(w.nodes[new].store[&0].contains(write), "{write:?} lost");
    }
    w.run(1000);
}

#[test]
fn a_joining_node_learns_is_promoted_and_takes_shards_without_losing_writes() {
    let mut w = World::new(3, &["a", "b", "c"]);
    w.run(300);
    w.add_node("d");
    w.run(3000);
    w.settle();
    let owned = w.map().owned_counts()["d"];
    assert!(owned >= 1, "d owns nothing after settling: {:?}", w.map().owned_counts());
}

/// Many seeds of random interleavings with crashes, restarts, cuts and joins.
#[test]
fn random_schedules_never_lose_an_acknowledged_write() {
    for seed in 0..60 {
        let r = 2 + (seed % 2) as usize;
        let mut w = World::with_replicas(100 + seed, &["a", "b", "c", "d"], r);
        w.run(1500);
        if seed % 4 == 0 {
            w.add_node("e");
        }
        w.run(1500);
        w.settle();
        // After healing, every shard has an owner again and takes writes.
        assert_eq!(w.map().unavailable().count(), 0, "seed {}", 100 + seed);
    }
}

/// The checker must be able to fail: a controller that promotes a learner before its owner
/// says it caught up puts a member without every acknowledged write into the ISR.
#[test]
fn the_checker_catches_a_learner_promoted_before_it_caught_up() {
    let mut caught = 0;
    for seed in 0..20 {
        let mut w = World::new(500 + seed, &["a", "b", "c"]);
        w.promote_early = true;
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            w.run(200);
            w.add_node("d");
            w.run(2000)
        }));
        caught += usize::from(failed.is_err());
    }
    assert!(caught >= 10, "the checker caught early promotion in only {caught} of 20 runs");
}

/// A one-shard map of `members` (a, b, ...), shard 0 on [a, b].
fn one_shard(members: &[&str]) -> ShardMap {
    let mut map = ShardMap::new(1);
    for n in members {
        map.apply(&MapCommand::Join { name: n.to_string(), incarnation: 1, capacity: 100 });
    }
    let run = crate::shardmap::AssignRun { start: 0, len: 1, replicas: vec![0, 1] };
    map.apply(&MapCommand::Assign(vec![run]));
    map
}

/// Member a as the owner of shard 0 of `map`.
fn owner_of(map: &ShardMap, cfg: OwnershipConfig) -> Ownership<W> {
    let mut o = Ownership::new(0, 1, cfg);
    o.map_applied(map, &[0]);
    o
}

/// An owner of shard 0 with member 1 in sync.
fn owner() -> Ownership<W> {
    owner_of(&one_shard(&["a", "b"]), OwnershipConfig::default())
}

/// The catch-up attempt of the stream to member 2 among the pending effects.
fn stream_to_c(o: &mut Ownership<W>) -> Option<Seq> {
    effects(o).into_iter().find_map(|e| match e {
        Effect::Stream { attempt, to: 2, .. } => Some(attempt),
        _ => None,
    })
}

fn effects(o: &mut Ownership<W>) -> Vec<Effect<W>> {
    std::iter::from_fn(|| o.poll()).collect()
}

#[test]
fn a_read_waits_for_the_writes_asked_before_it() {
    let mut o = owner();
    o.controller_heard();
    let w = o.submit(0, (0, 1)).unwrap();
    let r = o.read(0).unwrap();
    let later = o.submit(0, (0, 2)).unwrap();
    let out = effects(&mut o);
    assert!(!out.iter().any(|e| matches!(e, Effect::ReadReady { .. })));
    let confirm = Msg::Confirm { shard: 0, epoch: 1, seq: r };
    assert!(out.contains(&Effect::Send { to: 1, msg: confirm }), "b is asked: {out:?}");
    o.receive(1, Msg::Confirmed { shard: 0, epoch: 1, seq: r }, &one_shard(&["a", "b"]));
    assert!(!effects(&mut o).iter().any(|e| matches!(e, Effect::ReadReady { .. })));
    o.persisted(0, 1, w);
    o.receive(1, Msg::Ack { shard: 0, epoch: 1, seq: w }, &one_shard(&["a", "b"]));
    let out = effects(&mut o);
    assert!(out.contains(&Effect::Release { shard: 0, seq: w }));
    // Ready although a later write is still pending: it does not wait for what came after.
    assert!(out.contains(&Effect::ReadReady { shard: 0, seq: r }), "{out:?}");
    assert!(!out.contains(&Effect::Release { shard: 0, seq: later }));
}

/// A handoff the old owner has not applied yet: its read asks the new owner, which
/// refuses, so the old owner cannot serve a read that misses what the new owner
/// acknowledged. A lost confirmation is asked for again.
#[test]
fn a_deposed_owner_whose_map_lags_serves_no_read() {
    let map = one_shard(&["a", "b"]);
    let mut a = owner_of(&map, OwnershipConfig::default());
    a.controller_heard();
    let mut b: Ownership<W> = Ownership::new(1, 1, OwnershipConfig::default());
    b.map_applied(&map, &[0]);
    let mut handed = map.clone();
    let e = handed.shard(0).unwrap().epoch;
    handed.apply(&MapCommand::Changes(vec![ShardChange::SetOwner {
        shard: 0,
        epoch: e,
        member: 1,
    }]));
    b.map_applied(&handed, &[0]);
    assert!(b.owns(0));
    // b acknowledges a write (a is still in sync: it holds it too, but a's map is old).
    let r = a.read(0).unwrap();
    let asked = effects(&mut a);
    let confirm = asked
        .into_iter()
        .find_map(|e| match e {
            Effect::Send { to: 1, msg } => Some(msg),
            _ => None,
        })
        .expect("a asks b");
    b.receive(0, confirm, &handed);
    let answer = effects(&mut b)
        .into_iter()
        .find_map(|e| match e {
            Effect::Send { to: 0, msg } => Some(msg),
            _ => None,
        })
        .expect("b answers");
    assert!(matches!(answer, Msg::Refuse { .. }), "{answer:?}");
    a.receive(1, answer, &map);
    let out = effects(&mut a);
    assert!(out.contains(&Effect::Fail { shard: 0, seq: r, why: Failure::NotOwner }), "{out:?}");
    assert!(!a.owns(0), "a stops serving until its map catches up");
    // On an owner that still owns, a lost confirmation is asked again after a while.
    let mut o = owner();
    o.controller_heard();
    let r = o.read(0).unwrap();
    effects(&mut o);
    for _ in 0..OwnershipConfig::default().propose_every_ticks {
        o.tick();
        o.controller_heard();
    }
    let again = Effect::Send { to: 1, msg: Msg::Confirm { shard: 0, epoch: 1, seq: r } };
    assert!(effects(&mut o).contains(&again));
    o.receive(1, Msg::Confirmed { shard: 0, epoch: 1, seq: r }, &one_shard(&["a", "b"]));
    assert!(effects(&mut o).contains(&Effect::ReadReady { shard: 0, seq: r }));
}

#[test]
fn reads_are_fenced_once_the_controller_lease_runs_out() {
    let mut o = owner();
    assert_eq!(o.read(0), Err(Failure::Fenced), "never heard from the controller");
    o.controller_heard();
    let _w = o.submit(0, (0, 1)).unwrap();
    let r = o.read(0).unwrap();
    for _ in 0..OwnershipConfig::default().read_lease_ticks {
        o.tick();
    }
    let out = effects(&mut o);
    assert!(out.contains(&Effect::Fail { shard: 0, seq: r, why: Failure::Fenced }), "{out:?}");
    assert_eq!(o.read(0), Err(Failure::Fenced));
    o.controller_heard();
    assert!(o.read(0).is_ok());
    assert_eq!(o.read(1), Err(Failure::NotOwner));
}

#[test]
fn a_stalled_catch_up_starts_over_with_a_fresh_stream() {
    let mut map = one_shard(&["a", "b", "c"]);
    let learn = ShardChange::AddLearner { shard: 0, epoch: 1, member: 2 };
    map.apply(&MapCommand::Changes(vec![learn]));
    let mut o = owner_of(&map, OwnershipConfig::default());
    let first = stream_to_c(&mut o).expect("a stream to the learner");
    // The learner never reports (its report, or the stream, was lost).
    for _ in 0..OwnershipConfig::default().catch_up_patience_ticks {
        o.tick();
    }
    let second = stream_to_c(&mut o).expect("a fresh stream after the patience ran out");
    // A late report of the first attempt does not count; the second one does.
    // (Proposals go at the next tick, all of the machine's together.)
    o.receive(2, Msg::Streamed { shard: 0, attempt: first }, &map);
    o.tick();
    assert!(!effects(&mut o).iter().any(|e| matches!(e, Effect::Propose(_))));
    o.receive(2, Msg::Streamed { shard: 0, attempt: second }, &map);
    o.tick();
    assert!(
        effects(&mut o).iter().any(|e| matches!(e, Effect::Propose(_))),
        "caught up: promotion proposed"
    );
}

#[test]
fn writes_and_reads_waiting_on_a_shard_are_bounded() {
    let cfg = OwnershipConfig { pending_per_shard_max: 3, ..Default::default() };
    let mut o = owner_of(&one_shard(&["a", "b"]), cfg);
    o.controller_heard();
    o.submit(0, (0, 1)).unwrap();
    o.read(0).unwrap();
    o.submit(0, (0, 2)).unwrap();
    assert_eq!(o.submit(0, (0, 3)), Err(Failure::Busy));
    assert_eq!(o.read(0), Err(Failure::Busy));
}

#[test]
fn a_member_that_never_acknowledges_is_dropped_after_the_patience_and_writes_release() {
    let cfg =
        OwnershipConfig { ack_patience_ticks: 5, propose_every_ticks: 3, ..Default::default() };
    let mut map = one_shard(&["a", "b"]);
    let mut o = owner_of(&map, cfg.clone());
    let w = o.submit(0, (0, 1)).unwrap();
    o.persisted(0, 1, w);
    // b's copy (or its acknowledgement) is lost: nothing is released, nothing proposed yet.
    let proposals = |out: &[Effect<W>]| -> Vec<MapCommand> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Propose(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    };
    for _ in 0..4 {
        o.tick();
    }
    let out = effects(&mut o);
    assert!(!out.iter().any(|e| matches!(e, Effect::Release { .. })));
    assert!(proposals(&out).is_empty(), "{out:?}");
    o.tick();
    let remove = MapCommand::Changes(vec![ShardChange::Remove { shard: 0, epoch: 1, member: 1 }]);
    assert_eq!(proposals(&effects(&mut o)), vec![remove.clone()]);
    // Not again at once; again after propose_every_ticks while still stalled.
    o.tick();
    assert!(proposals(&effects(&mut o)).is_empty());
    o.tick();
    o.tick();
    assert_eq!(proposals(&effects(&mut o)), vec![remove.clone()]);
    // The controller commits it: the write is durable on every in-sync member left.
    let applied = map.apply(&remove);
    assert_eq!(applied.changed, vec![0]);
    o.map_applied(&map, &applied.changed);
    assert_eq!(effects(&mut o), vec![Effect::Release { shard: 0, seq: w }]);
    // A member that acknowledges in time is never proposed for removal.
    let mut o = owner_of(&one_shard(&["a", "b"]), cfg);
    for k in 0..20 {
        let w = o.submit(0, (0, k)).unwrap();
        o.persisted(0, 1, w);
        o.receive(1, Msg::Ack { shard: 0, epoch: 1, seq: w }, &one_shard(&["a", "b"]));
        o.tick();
    }
    assert!(proposals(&effects(&mut o)).is_empty());
}

#[test]
fn a_round_of_changes_goes_as_few_bounded_proposals() {
    let change = |shard| ShardChange::Promote {
        shard,
        epoch: u64::MAX,
        member: MemberIx::MAX,
        turn_version: u64::MAX,
    };
    let changes: Vec<ShardChange> = (0..PROPOSAL_CHANGES_MAX as u32 + 1).map(change).collect();
    let commands: Vec<MapCommand> = proposals(&changes).collect();
    let sizes: Vec<usize> = commands
        .iter()
        .map(|c| match c {
            MapCommand::Changes(c) => c.len(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sizes, [PROPOSAL_CHANGES_MAX, 1]);
    let back: Vec<ShardChange> = commands
        .into_iter()
        .flat_map(|c| match c {
            MapCommand::Changes(c) => c,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(back, changes, "in order, none lost");
    assert_eq!(proposals(&[]).count(), 0);
    // The largest proposal fits in one append message of the controller's default size.
    let largest =
        postcard::to_stdvec(&MapCommand::Changes(changes[..PROPOSAL_CHANGES_MAX].to_vec()))
            .unwrap()
            .len() as u64;
    let limit = botclaw_config::ControllerConfig::default().message_bytes_max;
    assert!(largest < limit / 4, "{largest} bytes against {limit}");
}

#[test]
fn learners_caught_up_in_one_tick_are_promoted_by_one_proposal() {
    const SHARDS: u32 = 3;
    let mut map = ShardMap::new(SHARDS);
    for n in ["a", "b", "c"] {
        map.apply(&MapCommand::Join { name: n.to_string(), incarnation: 1, capacity: 100 });
    }
    let run = crate::shardmap::AssignRun { start: 0, len: SHARDS, replicas: vec![0, 1] };
    map.apply(&MapCommand::Assign(vec![run]));
    let learn = |shard| ShardChange::AddLearner { shard, epoch: 1, member: 2 };
    map.apply(&MapCommand::Changes((0..SHARDS).map(learn).collect()));
    let mut o: Ownership<W> = Ownership::new(0, 1, OwnershipConfig::default());
    o.map_replaced(&map);
    let streams: Vec<(ShardId, Seq)> = effects(&mut o)
        .into_iter()
        .filter_map(|e| match e {
            Effect::Stream { shard, attempt, to: 2 } => Some((shard, attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(streams.len(), SHARDS as usize);
    for (shard, attempt) in streams {
        o.receive(2, Msg::Streamed { shard, attempt }, &map);
    }
    let proposed = |out: Vec<Effect<W>>| -> Vec<MapCommand> {
        out.into_iter()
            .filter_map(|e| match e {
                Effect::Propose(c) => Some(c),
                _ => None,
            })
            .collect()
    };
    assert_eq!(proposed(effects(&mut o)), [], "nothing before the tick");
    o.tick();
    let commands = proposed(effects(&mut o));
    let [MapCommand::Changes(changes)] = &commands[..] else { panic!("{commands:?}") };
    let promoted: Vec<ShardId> = changes
        .iter()
        .map(|c| match c {
            ShardChange::Promote { shard, epoch: 2, member: 2, .. } => *shard,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(promoted, [0, 1, 2]);
}

/// A random command for `map`: moves of random shards at their epochs (some of them
/// skipped, as the map skips a stale or invalid one; up to 256 in one command, as a
/// planner's round), a force, or a member's death or its return at a new incarnation
/// (`incarnations` holds each member's).
fn random_command(rng: &mut StdRng, map: &ShardMap, incarnations: &mut [u64]) -> MapCommand {
    let members = incarnations.len() as MemberIx;
    let member = rng.random_range(0..members);
    let shard = rng.random_range(0..map.shard_count());
    match rng.random_range(0..100) {
        0..=2 => {
            let name = map.name(member).to_string();
            let incarnation = incarnations[usize::from(member)];
            if rng.random_bool(0.5) {
                MapCommand::Dead { name, incarnation }
            } else {
                incarnations[usize::from(member)] += 1;
                MapCommand::Join { name, incarnation: incarnation + 1, capacity: 100 }
            }
        }
        3..=4 => MapCommand::Force { shard, member },
        _ => {
            let n = if rng.random_bool(0.5) { rng.random_range(1..=256) } else { 1 };
            MapCommand::Changes((0..n).map(|_| random_change(rng, map, members)).collect())
        }
    }
}

/// A move of a random shard of `map` at its epoch.
fn random_change(rng: &mut StdRng, map: &ShardMap, members: MemberIx) -> ShardChange {
    let shard = rng.random_range(0..map.shard_count());
    let e = *map.shard(shard).unwrap();
    let epoch = e.epoch;
    let member = rng.random_range(0..members);
    let roll = rng.random_range(0..100);
    let mut pick = |r: &crate::shardmap::Replicas| {
        let s = r.as_slice();
        (!s.is_empty()).then(|| s[rng.random_range(0..s.len())])
    };
    match roll {
        0..=34 => ShardChange::AddLearner { shard, epoch, member },
        35..=59 => match pick(&e.learners) {
            Some(member) => ShardChange::Promote { shard, epoch, member, turn_version: 0 },
            None => ShardChange::AddLearner { shard, epoch, member },
        },
        60..=74 => ShardChange::SetOwner { shard, epoch, member: pick(&e.isr).unwrap_or(member) },
        _ => {
            let member = pick(&e.learners).or_else(|| pick(&e.isr)).unwrap_or(member);
            ShardChange::Remove { shard, epoch, member }
        }
    }
}

/// Every node runs two machines: one reads only the changed shards it owns, follows or is
/// named in (`map_applied`, `map_replaced`), the other every changed shard, as the machine
/// did before (the reference). Random moves, forces, deaths and returns at a new
/// incarnation (where the old process's machines see a map that no longer counts them in,
/// then restart), applied a few commands at a time, sometimes as a whole new map (a
/// snapshot); writes wait on owned shards, so giving a shard up fails them. Both machines
/// give the same effects in the same order and own and follow the same shards.
#[test]
fn a_node_reading_only_its_shards_of_a_change_acts_as_one_reading_every_shard() {
    const SHARDS: u32 = 512;
    const NODES: usize = 16;
    let all: Vec<ShardId> = (0..SHARDS).collect();
    let owned = |o: &Ownership<W>| all.iter().filter(|&&s| o.owns(s)).count();
    let mut fewer_read = 0;
    for seed in 0..4 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut map = ShardMap::new(SHARDS);
        let mut incarnations = [1u64; NODES];
        for i in 0..NODES {
            let name = format!("n{i}");
            map.apply(&MapCommand::Join { name, incarnation: 1, capacity: 100 });
        }
        let nodes = NODES as MemberIx;
        let runs = (0..SHARDS / 16)
            .map(|r| {
                let first = rng.random_range(0..nodes);
                let mut replicas = vec![first, (first + 1) % nodes];
                if r % 2 == 0 {
                    replicas.push((first + 3) % nodes);
                }
                crate::shardmap::AssignRun { start: r * 16, len: 16, replicas }
            })
            .collect();
        map.apply(&MapCommand::Assign(runs));
        let start = |i: usize, incarnation: u64, map: &ShardMap| {
            let ix = i as MemberIx;
            let mut fast: Ownership<W> = Ownership::new(ix, incarnation, Default::default());
            let mut reference: Ownership<W> = Ownership::new(ix, incarnation, Default::default());
            fast.map_replaced(map);
            reference.map_applied_scanning(map, &all);
            assert_eq!(effects(&mut fast), effects(&mut reference));
            (fast, reference, incarnation)
        };
        let mut nodes: Vec<_> = (0..NODES).map(|i| start(i, 1, &map)).collect();
        let mut next_write = 0;
        for step in 0..300 {
            for (fast, reference, _) in &mut nodes {
                for _ in 0..4 {
                    let shard = rng.random_range(0..SHARDS);
                    next_write += 1;
                    let w = (shard, next_write);
                    assert_eq!(fast.submit(shard, w), reference.submit(shard, w));
                }
            }
            let before = map.clone();
            let mut changed = BTreeSet::new();
            for _ in 0..rng.random_range(1..=4) {
                let cmd = random_command(&mut rng, &map, &mut incarnations);
                changed.extend(map.apply(&cmd).changed);
            }
            assert_eq!(map.check(), Vec::<String>::new());
            let changed: Vec<ShardId> = changed.into_iter().collect();
            let whole = before.members() != map.members() || rng.random_bool(0.1);
            for (i, (fast, reference, _)) in nodes.iter_mut().enumerate() {
                if whole {
                    fast.map_replaced(&map);
                    reference.map_applied_scanning(&map, &all);
                } else {
                    let mine = owned(fast) + fast.followed().len();
                    let mine = mine + map.shards_of_count(i as MemberIx) as usize;
                    fewer_read += usize::from(mine < changed.len());
                    fast.map_applied(&map, &changed);
                    reference.map_applied_scanning(&map, &changed);
                }
                let at = format!("seed {seed}, step {step}, node {i}");
                assert_eq!(effects(fast), effects(reference), "{at}");
                assert_eq!(fast.followed(), reference.followed(), "{at}");
                assert!(all.iter().all(|&s| fast.owns(s) == reference.owns(s)), "{at}");
            }
            // A process the map moved past (a return at a new incarnation) restarts.
            for (i, node) in nodes.iter_mut().enumerate() {
                if node.2 != incarnations[i] {
                    *node = start(i, incarnations[i], &map);
                }
            }
        }
    }
    assert!(fewer_read > 1000, "changes large enough to read fewer shards: {fewer_read}");
}

/// An owner whose shard's ISR is full holds a caught-up learner's promotion (the map would
/// skip it: an entry that changes nothing, proposed again and again) and proposes it once
/// the controller made room.
#[test]
fn a_promotion_waits_for_room_in_the_isr() {
    let mut map = ShardMap::new(1);
    for n in ["a", "b", "c", "d", "e", "f"] {
        map.apply(&MapCommand::Join { name: n.to_string(), incarnation: 1, capacity: 100 });
    }
    let full: Vec<MemberIx> = (0..crate::shardmap::REPLICAS_MAX as MemberIx).collect();
    let run = crate::shardmap::AssignRun { start: 0, len: 1, replicas: full };
    map.apply(&MapCommand::Assign(vec![run]));
    let applied = map.apply(&MapCommand::Changes(vec![ShardChange::AddLearner {
        shard: 0,
        epoch: 1,
        member: 5,
    }]));
    assert_eq!(applied.changed, [0]);
    let cfg = OwnershipConfig { propose_every_ticks: 2, ..Default::default() };
    let mut o: Ownership<W> = Ownership::new(0, 1, cfg);
    o.map_replaced(&map);
    let attempt = effects(&mut o)
        .into_iter()
        .find_map(|e| match e {
            Effect::Stream { attempt, to: 5, .. } => Some(attempt),
            _ => None,
        })
        .expect("the learner is streamed to");
    o.receive(5, Msg::Streamed { shard: 0, attempt }, &map);
    let promotions = |out: Vec<Effect<W>>| -> Vec<ShardChange> {
        out.into_iter()
            .filter_map(|e| match e {
                Effect::Propose(MapCommand::Changes(c)) => Some(c),
                _ => None,
            })
            .flatten()
            .filter(|c| matches!(c, ShardChange::Promote { .. }))
            .collect()
    };
    for _ in 0..6 {
        o.tick();
        assert_eq!(promotions(effects(&mut o)), [], "no promotion into a full ISR");
    }
    // The controller removes an in-sync member: the promotion goes, at the new epoch.
    let remove = ShardChange::Remove { shard: 0, epoch: 2, member: 4 };
    let applied = map.apply(&MapCommand::Changes(vec![remove]));
    o.map_applied(&map, &applied.changed);
    let mut proposed = Vec::new();
    for _ in 0..2 {
        o.tick();
        proposed.extend(promotions(effects(&mut o)));
    }
    assert!(
        matches!(proposed[..], [ShardChange::Promote { epoch: 3, member: 5, .. }]),
        "{proposed:?}"
    );
}

/// A follower that becomes the owner while a write of the old owner is still being
/// persisted does not acknowledge it to the old owner: it may have streamed its copy to a
/// learner without that write already, and the old owner would count the write durable on
/// an in-sync member that promoted the learner without it (the simulator found this).
#[test]
fn a_write_persisted_after_its_follower_became_owner_is_refused() {
    use crate::shardmap::AssignRun;
    let mut map = ShardMap::new(1);
    for name in ["a", "b"] {
        map.apply(&MapCommand::Join { name: name.into(), incarnation: 1, capacity: 100 });
    }
    map.apply(&MapCommand::Assign(vec![AssignRun { start: 0, len: 1, replicas: vec![0, 1] }]));
    let mut b: Ownership<W> = Ownership::new(1, 1, OwnershipConfig::default());
    b.map_replaced(&map);
    while b.poll().is_some() {}
    b.receive(0, Msg::Replicate { shard: 0, epoch: 1, seq: 5, payload: (0, 5) }, &map);
    assert!(matches!(b.poll(), Some(Effect::PersistReplica { seq: 5, .. })));
    // a leaves before b's store completes: b owns the shard.
    map.apply(&MapCommand::Leave { name: "a".into(), incarnation: 1 });
    assert_eq!(map.shard(0).unwrap().owner, Some(1));
    b.map_replaced(&map);
    while b.poll().is_some() {}
    b.replica_persisted(0, 1, 5, 0, &map);
    let sent = b.poll();
    assert!(
        matches!(sent, Some(Effect::Send { to: 0, msg: Msg::Refuse { shard: 0, epoch: 1, .. } })),
        "{sent:?}"
    );
    // Still a follower of the same owner, it acknowledges as before.
    let mut c: Ownership<W> = Ownership::new(1, 1, OwnershipConfig::default());
    let mut map = ShardMap::new(1);
    for name in ["a", "b"] {
        map.apply(&MapCommand::Join { name: name.into(), incarnation: 1, capacity: 100 });
    }
    map.apply(&MapCommand::Assign(vec![AssignRun { start: 0, len: 1, replicas: vec![0, 1] }]));
    c.map_replaced(&map);
    while c.poll().is_some() {}
    c.replica_persisted(0, 1, 5, 0, &map);
    assert!(matches!(c.poll(), Some(Effect::Send { to: 0, msg: Msg::Ack { seq: 5, .. } })));
}

/// An owner that learns it was deposed (a member refuses it with a newer epoch) or a member
/// the map leaves out of a shard refuses writes and reads of an older epoch: the older
/// owner, cut off and healed with its old map, would count its acknowledgement for writes
/// the new in-sync members lack (the simulator found this: `flapping-partition`, seed 1,
/// once the failure detector's random choices changed).
#[test]
fn an_owner_deposed_or_a_member_left_out_refuses_an_older_owner() {
    use crate::shardmap::AssignRun;
    let two = |replicas: Vec<MemberIx>| {
        let mut map = ShardMap::new(1);
        for name in ["a", "b", "c"] {
            map.apply(&MapCommand::Join { name: name.into(), incarnation: 1, capacity: 100 });
        }
        map.apply(&MapCommand::Assign(vec![AssignRun { start: 0, len: 1, replicas }]));
        map
    };
    // b owns at epoch 1; c refuses it with epoch 2: b gives the shard up, and then refuses
    // a's write of epoch 1 (a owned before, by a map b never applied).
    let map = two(vec![1, 0]);
    let mut b: Ownership<W> = Ownership::new(1, 1, OwnershipConfig::default());
    b.map_replaced(&map);
    while b.poll().is_some() {}
    assert!(b.owns(0));
    b.receive(2, Msg::Refuse { shard: 0, epoch: 1, known_epoch: 2 }, &map);
    assert!(!b.owns(0));
    while b.poll().is_some() {}
    b.receive(0, Msg::Replicate { shard: 0, epoch: 1, seq: 9, payload: (0, 9) }, &map);
    let sent = b.poll();
    assert!(
        matches!(sent, Some(Effect::Send { to: 0, msg: Msg::Refuse { known_epoch: 2, .. } })),
        "{sent:?}"
    );
    b.receive(0, Msg::Confirm { shard: 0, epoch: 1, seq: 10 }, &map);
    assert!(matches!(b.poll(), Some(Effect::Send { msg: Msg::Refuse { .. }, .. })));
    // b's map catches up (a owns at epoch 2, then b is left out at 3): the record of the
    // refusal goes, and the map's entry refuses a's older writes instead.
    let mut map = map;
    let set_owner = ShardChange::SetOwner { shard: 0, epoch: 1, member: 0 };
    map.apply(&MapCommand::Changes(vec![set_owner]));
    map.apply(&MapCommand::Changes(vec![ShardChange::Remove { shard: 0, epoch: 2, member: 1 }]));
    assert_eq!(map.shard(0).map(|e| (e.epoch, e.owner)), Some((3, Some(0))));
    b.map_applied(&map, &[0]);
    assert_eq!(b.deposed_count(), 0, "the map reached the refused epoch");
    while b.poll().is_some() {}
    for from in [0, 2] {
        b.receive(from, Msg::Replicate { shard: 0, epoch: 2, seq: 11, payload: (0, 11) }, &map);
        let sent = b.poll();
        let refused =
            matches!(sent, Some(Effect::Send { msg: Msg::Refuse { known_epoch: 3, .. }, .. }));
        assert_eq!(refused, from != 0, "only the map's owner may write an older epoch: {sent:?}");
    }
    // A member the map never named in the shard refuses a former owner's older epoch too.
    let mut map = two(vec![0, 1]);
    let mut c: Ownership<W> = Ownership::new(2, 1, OwnershipConfig::default());
    c.map_replaced(&map);
    let set_owner = ShardChange::SetOwner { shard: 0, epoch: 1, member: 1 };
    map.apply(&MapCommand::Changes(vec![set_owner]));
    c.map_applied(&map, &[0]);
    while c.poll().is_some() {}
    c.receive(0, Msg::Replicate { shard: 0, epoch: 1, seq: 12, payload: (0, 12) }, &map);
    assert!(matches!(
        c.poll(),
        Some(Effect::Send { to: 0, msg: Msg::Refuse { known_epoch: 2, .. } })
    ));
    // c follows a at epoch 1; the map then leaves c out (a still owns, epoch 2): a's writes
    // of epoch 1 are still taken (a may not have applied it yet); once b owns (epoch 3),
    // a's of epoch 1 or 2 are refused, and a newer owner's are taken.
    let mut map = two(vec![0, 1, 2]);
    let mut c: Ownership<W> = Ownership::new(2, 1, OwnershipConfig::default());
    c.map_replaced(&map);
    while c.poll().is_some() {}
    let remove = |map: &ShardMap, member| ShardChange::Remove {
        shard: 0,
        epoch: map.shard(0).unwrap().epoch,
        member,
    };
    map.apply(&MapCommand::Changes(vec![remove(&map, 2)]));
    assert!(!map.shard(0).unwrap().isr.contains(2));
    c.map_applied(&map, &[0]);
    while c.poll().is_some() {}
    c.receive(0, Msg::Replicate { shard: 0, epoch: 1, seq: 3, payload: (0, 3) }, &map);
    assert!(matches!(c.poll(), Some(Effect::PersistReplica { seq: 3, .. })));
    map.apply(&MapCommand::Dead { name: "a".into(), incarnation: 1 });
    let e = *map.shard(0).unwrap();
    assert_eq!(e.owner, Some(1), "{e:?}");
    c.map_applied(&map, &[0]);
    while c.poll().is_some() {}
    for epoch in [1, 2] {
        c.receive(0, Msg::Replicate { shard: 0, epoch, seq: 5, payload: (0, 5) }, &map);
        assert!(matches!(c.poll(), Some(Effect::Send { to: 0, msg: Msg::Refuse { .. } })));
    }
    c.receive(1, Msg::Replicate { shard: 0, epoch: e.epoch + 1, seq: 4, payload: (0, 4) }, &map);
    assert!(matches!(c.poll(), Some(Effect::PersistReplica { seq: 4, .. })));
}
