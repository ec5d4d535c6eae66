//! Membership driven through foca over a deterministic fake network: simulated time, a
//! fixed per-packet latency, crash, freeze and restart.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;

use super::*;

const SECRET: &[u8] = b"test-cluster-secret";

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16))
}

fn node_id(i: usize, incarnation: u64) -> NodeId {
    let a = addr(i);
    NodeId {
        name: format!("n{i}"),
        gossip: a,
        cluster: SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16)),
        client: SocketAddr::from(([127, 0, 0, 1], 30_000 + i as u16)),
        admin: SocketAddr::from(([127, 0, 0, 1], 40_000 + i as u16)),
        incarnation,
        bump: 0,
        roles: vec!["conversations".into()],
        capacity: 100,
    }
}

enum Event {
    Packet { to: SocketAddr, data: Vec<u8> },
    Timer { node: SocketAddr, generation: u64, timer: MembershipTimer },
}

struct SimNode {
    m: Membership,
    generation: u64,
    frozen: bool,
}

/// A deterministic network: events ordered by (time, sequence number).
struct Net {
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

impl Net {
    fn new() -> Self {
        Net {
            now_ms: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes: BTreeMap::new(),
            generations: 0,
            latency_ms: 1,
            trace: Vec::new(),
            cfg: GossipConfig::default(),
        }
    }

    fn push(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn start(&mut self, i: usize, incarnation: u64, seeds: &[usize], secret: &[u8]) {
        let seeds: Vec<SocketAddr> = seeds.iter().map(|s| addr(*s)).collect();
        let mut m = Membership::new(node_id(i, incarnation), &seeds, secret, &self.cfg, i as u64);
        m.start();
        self.generations += 1;
        self.nodes.insert(addr(i), SimNode { m, generation: self.generations, frozen: false });
        self.drain(addr(i));
    }

    fn drain(&mut self, at: SocketAddr) {
        loop {
            let Some(node) = self.nodes.get_mut(&at) else {
                return;
            };
            let generation = node.generation;
            let Some(effect) = node.m.poll_effect() else {
                return;
            };
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

    fn run_until(&mut self, until_ms: u64) {
        while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
            if t > until_ms {
                break;
            }
            self.queue.pop();
            self.now_ms = t;
            match self.events.remove(&seq).unwrap() {
                Event::Packet { to, data } => {
                    let Some(node) = self.nodes.get_mut(&to) else {
                        continue;
                    };
                    if node.frozen {
                        continue;
                    }
                    let _ = node.m.handle_packet(&data);
                    self.drain(to);
                }
                Event::Timer { node, generation, timer } => {
                    let Some(n) = self.nodes.get_mut(&node) else {
                        continue;
                    };
                    if n.generation != generation {
                        continue;
                    }
                    if n.frozen {
                        // A frozen process handles its timers late, when it resumes.
                        let t = self.now_ms + 10;
                        self.push(t, Event::Timer { node, generation, timer });
                        continue;
                    }
                    n.m.handle_timer(timer).unwrap();
                    self.drain(node);
                }
            }
        }
        self.now_ms = until_ms;
    }

    /// Runs until `pred` holds, checking every 10 ms of simulated time; returns the time.
    fn run_until_pred(&mut self, limit_ms: u64, pred: impl Fn(&Net) -> bool) -> Option<u64> {
        while self.now_ms < limit_ms {
            let next = self.now_ms + 10;
            self.run_until(next);
            if pred(self) {
                return Some(self.now_ms);
            }
        }
        None
    }

    /// What node `i` believes about node `j`.
    fn view(&self, i: usize, j: usize) -> Option<(MemberState, u64)> {
        let node = self.nodes.get(&addr(i))?;
        node.m
            .members()
            .into_iter()
            .find(|v| v.id.gossip == addr(j))
            .map(|v| (v.state, v.id.incarnation))
    }

    fn all_see(&self, of: &[usize], j: usize, state: MemberState) -> bool {
        of.iter().all(|&i| self.view(i, j).map(|v| v.0) == Some(state))
    }

    fn up_set(&self, i: usize) -> BTreeSet<String> {
        self.nodes[&addr(i)]
            .m
            .members()
            .into_iter()
            .filter(|v| v.state == MemberState::Up)
            .map(|v| v.id.name)
            .collect()
    }
}

fn cluster(n: usize) -> Net {
    let mut net = Net::new();
    net.start(0, 1, &[], SECRET);
    for i in 1..n {
        net.start(i, 1, &[0], SECRET);
    }
    let all: Vec<usize> = (0..n).collect();
    let t = net.run_until_pred(10_000, |net| all.iter().all(|&i| net.up_set(i).len() == n));
    assert!(t.is_some(), "cluster of {n} did not converge in 10 s");
    net
}

#[test]
fn converges() {
    let net = cluster(8);
    for i in 0..8 {
        assert!(net.nodes[&addr(i)].m.is_joined());
    }
}

#[test]
fn reannounces_until_seed_appears() {
    let mut net = Net::new();
    net.start(1, 1, &[0], SECRET);
    net.run_until(3_000);
    assert!(!net.nodes[&addr(1)].m.is_joined());
    net.start(0, 1, &[], SECRET);
    let t = net.run_until_pred(5_000, |net| net.up_set(1).len() == 2 && net.up_set(0).len() == 2);
    assert!(t.is_some(), "late seed never found");
}

#[test]
fn crashed_node_declared_down_within_bound() {
    let mut net = cluster(5);
    let crash_at = net.now_ms;
    net.nodes.remove(&addr(3));
    let others = [0, 1, 2, 4];
    let t = net
        .run_until_pred(crash_at + 10_000, |net| net.all_see(&others, 3, MemberState::Down))
        .expect("crash never detected");
    assert!(t - crash_at <= 3_000, "took {} ms", t - crash_at);
}

#[test]
fn leave_is_seen_quickly() {
    let mut net = cluster(5);
    let at = net.now_ms;
    net.nodes.get_mut(&addr(2)).unwrap().m.leave();
    net.drain(addr(2));
    net.run_until(at + 5);
    net.nodes.remove(&addr(2));
    let others = [0, 1, 3, 4];
    let t = net
        .run_until_pred(at + 5_000, |net| net.all_see(&others, 2, MemberState::Down))
        .expect("leave never seen");
    assert!(t - at <= 1_000, "took {} ms", t - at);
}

#[test]
fn restart_rejoins_as_new_incarnation() {
    let mut net = cluster(4);
    net.nodes.remove(&addr(1));
    let at = net.now_ms;
    net.start(1, 2, &[0], SECRET);
    let t = net.run_until_pred(at + 5_000, |net| {
        [0, 2, 3].iter().all(|&i| net.view(i, 1) == Some((MemberState::Up, 2)))
    });
    assert!(t.is_some(), "restarted node not seen as incarnation 2");
    assert_eq!(net.up_set(1).len(), 4);
}

#[test]
fn wrongly_declared_down_rejoins_by_itself() {
    let mut net = cluster(4);
    net.nodes.get_mut(&addr(2)).unwrap().frozen = true;
    let at = net.now_ms;
    net.run_until_pred(at + 10_000, |net| net.all_see(&[0, 1, 3], 2, MemberState::Down))
        .expect("frozen node never declared down");
    net.nodes.get_mut(&addr(2)).unwrap().frozen = false;
    let at = net.now_ms;
    let t = net.run_until_pred(at + 15_000, |net| net.all_see(&[0, 1, 3], 2, MemberState::Up));
    assert!(t.is_some(), "node declared down did not rejoin");
    assert!(net.nodes[&addr(2)].m.identity().bump >= 1);
    assert!(net.trace.iter().any(|l| l.contains("Rejoined")));
}

#[test]
fn wrong_secret_never_appears() {
    let mut net = cluster(3);
    net.start(7, 1, &[0, 1, 2], b"another-secret!!");
    net.run_until(net.now_ms + 5_000);
    for i in 0..3 {
        assert!(net.view(i, 7).is_none(), "node {i} knows the intruder");
    }
    assert!(!net.nodes[&addr(7)].m.is_joined());
}

#[test]
fn garbage_is_rejected_without_state_change() {
    let mut net = cluster(3);
    let before = net.nodes[&addr(0)].m.members();
    let m = &mut net.nodes.get_mut(&addr(0)).unwrap().m;
    assert!(matches!(m.handle_packet(&[]), Err(PacketError::Auth(AuthError::TooShort))));
    assert!(matches!(m.handle_packet(&[0u8; 5000]), Err(PacketError::Auth(AuthError::TooLarge))));
    assert!(matches!(m.handle_packet(&[1u8; 100]), Err(PacketError::Auth(AuthError::BadTag))));
    // Authentic but not a foca message: rejected by foca's decoder.
    let sealed = PacketAuth::new(SECRET, 1400).seal(b"\xff\xff\xff\xff");
    assert!(matches!(m.handle_packet(&sealed), Err(PacketError::Protocol(_))));
    assert_eq!(net.nodes[&addr(0)].m.members(), before);
}

#[test]
fn deterministic_for_a_fixed_seed() {
    let run = || {
        let mut net = cluster(6);
        net.nodes.remove(&addr(4));
        net.run_until(net.now_ms + 4_000);
        net.trace
    };
    let a = run();
    assert!(a.len() > 20);
    assert_eq!(a, run());
}
