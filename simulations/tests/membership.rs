//! The core's membership (foca behind authenticated packets) on a deterministic fake
//! network: convergence, late seeds, crash, leave, restart, false suspicion, wrong secret,
//! determinism.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use botclaw_config::GossipConfig;
use botclaw_core::load::LoadSummary;
use botclaw_core::{Effect, MemberState, NodeId};
use botclaw_sim::net::SimNet;

const SECRET: &[u8] = b"test-cluster-secret";

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16))
}

fn node_id(i: usize, incarnation: u64) -> NodeId {
    let at = |base: u16| SocketAddr::from(([127, 0, 0, 1], base + i as u16));
    NodeId {
        name: format!("n{i}"),
        gossip: addr(i),
        cluster: at(20_000),
        client: at(30_000),
        admin: at(40_000),
        incarnation,
        bump: 0,
        roles: vec!["conversations".into()],
        capacity: 100,
    }
}

fn start(net: &mut SimNet, i: usize, incarnation: u64, seeds: &[usize], secret: &[u8]) {
    let seeds: Vec<SocketAddr> = seeds.iter().map(|&s| addr(s)).collect();
    net.start(node_id(i, incarnation), &seeds, secret, i as u64 * 7919 + incarnation);
}

fn state(net: &SimNet, i: usize, j: usize) -> Option<(MemberState, u64)> {
    net.view(addr(i), addr(j)).map(|v| (v.state, v.id.incarnation))
}

fn all_see(net: &SimNet, of: &[usize], j: usize, want: MemberState) -> bool {
    of.iter().all(|&i| state(net, i, j).map(|s| s.0) == Some(want))
}

fn up_set(net: &SimNet, i: usize) -> BTreeSet<String> {
    net.membership(addr(i))
        .map(|m| m.members())
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.state == MemberState::Up)
        .map(|v| v.id.name)
        .collect()
}

/// Members node `i` counts as not down, and how many its list shows not down.
fn not_down(net: &SimNet, i: usize) -> (usize, usize) {
    let m = net.membership(addr(i)).expect("running");
    let listed = m.members().iter().filter(|v| v.state != MemberState::Down).count();
    (m.members_not_down(), listed)
}

fn cluster(n: usize) -> SimNet {
    cluster_on(SimNet::new(GossipConfig::default(), 1), n)
}

fn cluster_on(mut net: SimNet, n: usize) -> SimNet {
    start(&mut net, 0, 1, &[], SECRET);
    for i in 1..n {
        start(&mut net, i, 1, &[0], SECRET);
    }
    let t = net.run_until_pred(10_000, |net| (0..n).all(|i| up_set(net, i).len() == n));
    assert!(t.is_some(), "cluster of {n} did not converge in 10 s");
    net
}

#[test]
fn converges() {
    let net = cluster(8);
    for i in 0..8 {
        assert!(net.membership(addr(i)).unwrap().is_joined());
    }
}

/// A formed start: before any datagram travels, every node holds every other as up and is
/// joined, with no MemberUp notice and no update queued to spread; it then fails and
/// recovers as a cluster formed by gossip does (a crash is declared within the bound).
#[test]
fn a_formed_cluster_knows_everyone_before_a_datagram_travels() {
    let n = 40;
    let mut net = SimNet::new(GossipConfig::default(), 1);
    for i in 0..n {
        start(&mut net, i, 1, &[0], SECRET);
    }
    net.take_notices();
    net.assume_formed();
    assert_eq!(net.now_ms(), 0);
    for i in 0..n {
        let m = net.membership(addr(i)).unwrap();
        assert_eq!(up_set(&net, i).len(), n, "node {i}");
        assert!(m.is_joined(), "node {i}");
        assert_eq!(m.updates_backlog(), 0, "node {i}");
    }
    let notices = net.take_notices();
    assert!(!notices.iter().any(|x| matches!(x.effect, Effect::MemberUp(_))), "{notices:?}");
    net.run_until(2_000);
    let crash_at = net.now_ms();
    net.crash(addr(7));
    let others: Vec<usize> = (0..n).filter(|&i| i != 7).collect();
    let t = net
        .run_until_pred(crash_at + 10_000, |net| all_see(net, &others, 7, MemberState::Down))
        .expect("crash never detected");
    assert!(t - crash_at <= 3_000, "took {} ms", t - crash_at);
}

#[test]
fn reannounces_until_seed_appears() {
    let mut net = SimNet::new(GossipConfig::default(), 1);
    start(&mut net, 1, 1, &[0], SECRET);
    net.run_until(3_000);
    assert!(!net.membership(addr(1)).unwrap().is_joined());
    start(&mut net, 0, 1, &[], SECRET);
    let t = net.run_until_pred(5_000, |net| up_set(net, 1).len() == 2 && up_set(net, 0).len() == 2);
    assert!(t.is_some(), "late seed never found");
}

#[test]
fn crashed_node_declared_down_within_bound() {
    let mut net = cluster(5);
    let crash_at = net.now_ms();
    net.crash(addr(3));
    let others = [0, 1, 2, 4];
    let t = net
        .run_until_pred(crash_at + 10_000, |net| all_see(net, &others, 3, MemberState::Down))
        .expect("crash never detected");
    assert!(t - crash_at <= 3_000, "took {} ms", t - crash_at);
    for i in others {
        assert_eq!(not_down(&net, i), (4, 4), "node {i}: counted, listed");
    }
}

#[test]
fn leave_is_seen_quickly() {
    let mut net = cluster(5);
    let at = net.now_ms();
    net.leave(addr(2));
    let others = [0, 1, 3, 4];
    let t = net
        .run_until_pred(at + 5_000, |net| all_see(net, &others, 2, MemberState::Down))
        .expect("leave never seen");
    assert!(t - at <= 1_000, "took {} ms", t - at);
    assert_eq!(not_down(&net, 0), (4, 4));
}

#[test]
fn dropped_role_is_seen_by_all_and_the_node_stays_up() {
    let mut net = cluster(4);
    assert!(net.membership_mut(addr(2)).unwrap().drop_role("conversations"));
    assert!(!net.membership_mut(addr(2)).unwrap().drop_role("conversations"), "only once");
    let at = net.now_ms();
    let t = net.run_until_pred(at + 5_000, |net| {
        [0, 1, 3].iter().all(|&i| {
            net.view(addr(i), addr(2)).is_some_and(|v| {
                v.state == MemberState::Up && v.id.bump == 1 && v.id.roles.is_empty()
            })
        })
    });
    let t = t.expect("the new identity never reached everyone");
    assert!(t - at <= 2_000, "took {} ms", t - at);
    let at = net.now_ms();
    net.run_until(at + 10_000);
    assert!([0, 1, 3].iter().all(|&i| up_set(&net, i).len() == 4), "the node must stay a member");
}

fn summary(i: usize, seq: u64, turns_per_s: f32) -> LoadSummary {
    LoadSummary {
        node: format!("n{i}"),
        incarnation: 1,
        seq,
        turns_per_s,
        active: 10 * i as u32,
        inflight: 0,
        hot: vec![(i as u32, turns_per_s / 2.0)],
        moves: vec![],
        modules: vec![],
    }
}

#[test]
fn load_summaries_reach_every_node_and_newer_ones_replace_older() {
    let mut net = cluster(5);
    for i in 0..5 {
        net.membership_mut(addr(i))
            .unwrap()
            .publish_load(&summary(i, 1, 100.0 * i as f32))
            .unwrap();
    }
    let at = net.now_ms();
    let everywhere = |net: &SimNet, seq_of_2: u64| {
        (0..5).all(|i| {
            let loads = net.membership(addr(i)).unwrap().loads();
            loads.len() == 5 && loads["n2"].seq == seq_of_2
        })
    };
    let t = net.run_until_pred(at + 10_000, |net| everywhere(net, 1));
    let t = t.expect("load summaries did not reach everyone");
    assert!(t - at <= 3_000, "took {} ms", t - at);
    assert_eq!(net.membership(addr(4)).unwrap().loads()["n3"], summary(3, 1, 300.0));
    net.membership_mut(addr(2)).unwrap().publish_load(&summary(2, 2, 999.0)).unwrap();
    let at = net.now_ms();
    assert!(net.run_until_pred(at + 10_000, |net| everywhere(net, 2)).is_some());
    assert_eq!(net.membership(addr(0)).unwrap().loads()["n2"].turns_per_s, 999.0);
}

#[test]
fn restart_rejoins_as_new_incarnation() {
    let mut net = cluster(4);
    net.crash(addr(1));
    let at = net.now_ms();
    start(&mut net, 1, 2, &[0], SECRET);
    let t = net.run_until_pred(at + 5_000, |net| {
        [0, 2, 3].iter().all(|&i| state(net, i, 1) == Some((MemberState::Up, 2)))
    });
    assert!(t.is_some(), "restarted node not seen as incarnation 2");
    assert_eq!(up_set(&net, 1).len(), 4);
}

#[test]
fn wrongly_declared_down_rejoins_by_itself() {
    let mut net = cluster(4);
    net.set_frozen(addr(2), true);
    let at = net.now_ms();
    net.run_until_pred(at + 10_000, |net| all_see(net, &[0, 1, 3], 2, MemberState::Down))
        .expect("frozen node never declared down");
    net.set_frozen(addr(2), false);
    let at = net.now_ms();
    let t = net.run_until_pred(at + 15_000, |net| all_see(net, &[0, 1, 3], 2, MemberState::Up));
    assert!(t.is_some(), "node declared down did not rejoin");
    assert!(net.membership(addr(2)).unwrap().identity().bump >= 1);
    assert!(net.trace().iter().any(|l| l.contains("Rejoined")));
}

#[test]
fn wrong_secret_never_appears() {
    for sealed in [false, true] {
        let net = SimNet::new(GossipConfig::default(), 1);
        let mut net = cluster_on(if sealed { net.sealed() } else { net }, 3);
        start(&mut net, 7, 1, &[0, 1, 2], b"another-secret!!");
        net.run_until(net.now_ms() + 5_000);
        for i in 0..3 {
            assert!(state(&net, i, 7).is_none(), "node {i} knows the intruder (sealed: {sealed})");
        }
        assert!(!net.membership(addr(7)).unwrap().is_joined());
    }
}

/// The simulated network leaves datagrams unencrypted by default (it forges nothing);
/// with the node's cipher, a run with joins, a crash, a restart, a leave and an intruder
/// goes the same way, notice for notice.
#[test]
fn the_cipher_changes_nothing_a_run_does() {
    let run = |net: SimNet| {
        let mut net = cluster_on(net, 6);
        start(&mut net, 7, 1, &[0], b"another-secret!!");
        net.crash(addr(4));
        net.run_until(net.now_ms() + 4_000);
        start(&mut net, 4, 2, &[0], SECRET);
        net.leave(addr(5));
        net.run_until(net.now_ms() + 6_000);
        net.trace().to_vec()
    };
    let clear = run(SimNet::new(GossipConfig::default(), 1));
    assert!(clear.iter().any(|l| l.contains("MemberDown")), "the crash was noticed");
    assert_eq!(clear, run(SimNet::new(GossipConfig::default(), 1).sealed()));
}

#[test]
fn no_false_positives_in_a_healthy_cluster() {
    let mut net = cluster(10);
    net.run_until(net.now_ms() + 60_000);
    assert!(!net.trace().iter().any(|l| l.contains("MemberDown")), "healthy member declared down");
}

#[test]
fn deterministic_for_a_fixed_seed() {
    let run = || {
        let mut net = cluster(6);
        net.crash(addr(4));
        net.run_until(net.now_ms() + 4_000);
        net.trace().to_vec()
    };
    let a = run();
    assert!(a.len() > 20);
    assert_eq!(a, run());
}

#[test]
fn retransmissions_follow_the_cluster_size() {
    // 6 per decimal digit of (members + 1): 6 for up to 9 members, 12 from 10.
    let cfg =
        GossipConfig { transmissions_min: 2, transmissions_log_factor: 6, ..Default::default() };
    let tx = |net: &SimNet, i: usize| net.membership(addr(i)).unwrap().transmissions();
    let mut net = SimNet::new(cfg, 1);
    start(&mut net, 0, 1, &[], SECRET);
    assert_eq!(tx(&net, 0), 6, "alone");
    for i in 1..12 {
        start(&mut net, i, 1, &[0], SECRET);
    }
    let all = |net: &SimNet, want: u8, n: usize| (0..n).all(|i| tx(net, i) == want);
    assert!(net.run_until_pred(10_000, |net| all(net, 12, 12)).is_some(), "12 members: 12");
    for i in 9..12 {
        net.crash(addr(i));
    }
    let t = net.run_until_pred(30_000, |net| all(net, 6, 9));
    assert!(t.is_some(), "9 members left: back to 6");
}

#[test]
fn a_late_joiner_learns_a_large_cluster_quickly() {
    // One feed holds about 20 identities: a node joining 60 others through one seed used to
    // wait for periodic announces (one member every 5 s) to learn the rest.
    let n = 60;
    let mut net = cluster(n);
    let joined_at = net.now_ms();
    start(&mut net, n, 1, &[0], SECRET);
    let t = net.run_until_pred(joined_at + 20_000, |net| up_set(net, n).len() == n + 1);
    let took = t.map(|t| t - joined_at);
    println!("the late joiner knew all {} members after {took:?} ms", n + 1);
    assert!(took.is_some_and(|ms| ms <= 3_000), "took {took:?} ms");
}
