//! Input validation of the membership state machine. Protocol behaviour over a network
//! (convergence, crash, leave, rejoin, determinism) is tested in `simulations/tests`.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::*;

/// The test secret's keys, derived once.
fn keys() -> Keyring {
    static KEYS: std::sync::OnceLock<Keyring> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| Keyring::from_secrets(b"test-cluster-secret", &[])).clone()
}

fn node_id(port: u16) -> NodeId {
    NodeId { name: format!("n{port}"), ..NodeId::seed(SocketAddr::from(([127, 0, 0, 1], port))) }
}

#[test]
fn garbage_is_rejected_without_state_change() {
    let mut m = Membership::new(node_id(1), &[], keys(), &GossipConfig::default(), 1);
    m.start();
    while m.poll_effect().is_some() {}
    let before = m.members();
    assert!(matches!(m.handle_packet(&[]), Err(PacketError::Auth(AuthError::TooShort))));
    assert!(matches!(m.handle_packet(&[0u8; 5000]), Err(PacketError::Auth(AuthError::TooLarge))));
    let unknown = m.handle_packet(&[crate::auth::PACKET_VERSION; 100]);
    assert!(matches!(unknown, Err(PacketError::Auth(AuthError::UnknownKey))));
    // Authentic but not a foca message: rejected by foca's decoder.
    let auth = PacketAuth::new(keys(), 1400, ReplayGuard::new(1000, 16));
    let sealed = auth.seal(b"\xff\xff\xff\xff", 0, [7; 24]);
    assert!(matches!(m.handle_packet(&sealed), Err(PacketError::Protocol(_))));
    assert_eq!(m.members(), before);
    assert_eq!(m.poll_effect(), None, "a rejected datagram produced output");
}

#[test]
fn founder_is_joined_and_seeker_is_not() {
    let mut founder = Membership::new(node_id(1), &[], keys(), &GossipConfig::default(), 1);
    founder.start();
    assert!(founder.is_joined());
    let seed = SocketAddr::from(([127, 0, 0, 1], 1));
    let mut seeker = Membership::new(node_id(2), &[seed], keys(), &GossipConfig::default(), 2);
    seeker.start();
    assert!(!seeker.is_joined());
    let first = seeker.poll_effect();
    assert!(matches!(first, Some(Effect::Send { to, .. }) if to == seed), "{first:?}");
}

#[test]
fn own_address_is_not_a_seed() {
    let me = SocketAddr::from(([127, 0, 0, 1], 1));
    let mut m = Membership::new(node_id(1), &[me], keys(), &GossipConfig::default(), 1);
    m.start();
    assert!(m.is_joined(), "a node whose only seed is itself founds the cluster");
}

#[test]
fn largest_identities_fit_the_smallest_packet() {
    use botclaw_config::{NAME_BYTES_MAX, PACKET_BYTES_MIN, ROLES_MAX, ROLE_BYTES_MAX};
    let v6 =
        |port| SocketAddr::new("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(), port);
    let big = |port: u16| NodeId {
        name: format!("{port:0>width$}", width = NAME_BYTES_MAX),
        gossip: v6(port),
        cluster: v6(port - 1),
        client: v6(port - 2),
        admin: v6(port - 3),
        incarnation: u64::MAX,
        bump: u16::MAX - 1,
        roles: vec!["r".repeat(ROLE_BYTES_MAX); ROLES_MAX],
        capacity: u32::MAX,
    };
    let cfg = GossipConfig { packet_bytes_max: PACKET_BYTES_MIN, ..GossipConfig::default() };
    let mut a = Membership::new(big(60000), &[v6(50000)], keys(), &cfg, 1);
    let mut b = Membership::new(big(50000), &[], keys(), &cfg, 2);
    a.start();
    b.start();
    // Shuttle datagrams between the two (timers ignored): announce, feed, gossip. Every
    // header carries two maximal identities; encoding panics if they do not fit.
    fn shuttle(from: &mut Membership, to: &mut Membership) {
        while let Some(effect) = from.poll_effect() {
            if let Effect::Send { packet, .. } = effect {
                assert!(packet.len() <= PACKET_BYTES_MIN);
                to.handle_packet(&packet).unwrap();
            }
        }
    }
    for _ in 0..4 {
        shuttle(&mut a, &mut b);
        shuttle(&mut b, &mut a);
    }
    assert_eq!(a.active_members(), 1);
    assert_eq!(b.active_members(), 1);
}

#[test]
fn a_founder_alone_stops_catching_up() {
    let mut m = Membership::new(node_id(1), &[], keys(), &GossipConfig::default(), 1);
    m.start();
    let mut rounds = 0;
    loop {
        let mut catch_up = false;
        while let Some(effect) = m.poll_effect() {
            catch_up |= matches!(effect, Effect::Schedule { timer: MembershipTimer::CatchUp, .. });
        }
        if !catch_up {
            break;
        }
        rounds += 1;
        assert!(rounds <= CATCH_UP_QUIET_ROUNDS, "still catching up after {rounds} rounds");
        m.handle_timer(MembershipTimer::CatchUp).unwrap();
    }
    assert_eq!(rounds, CATCH_UP_QUIET_ROUNDS);
}

mod fuzz {
    use super::*;
    use crate::fuzz::{cases, mutate};
    use proptest::prelude::*;

    /// Authentic datagrams a seeker sends its seed (announces), opened to their payloads.
    fn valid_payloads() -> Vec<Vec<u8>> {
        let seed = SocketAddr::from(([127, 0, 0, 1], 1));
        let mut seeker = Membership::new(node_id(2), &[seed], keys(), &GossipConfig::default(), 2);
        seeker.set_clock(1_000);
        seeker.start();
        let mut opener = PacketAuth::new(keys(), 1400, ReplayGuard::new(60_000, 1024));
        let mut out = Vec::new();
        while let Some(effect) = seeker.poll_effect() {
            if let Effect::Send { packet, .. } = effect {
                out.push(opener.open(&packet, 1_000).unwrap());
            }
        }
        assert!(!out.is_empty());
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Damaged foca messages that pass authentication (a peer holding the secret, or a
        /// bug) never panic the membership machine.
        #[test]
        fn authentic_damaged_foca_messages_never_panic(seed in any::<u64>(), pick in any::<usize>()) {
            let payloads = valid_payloads();
            let payload = mutate(&payloads[pick % payloads.len()], seed);
            let mut m = Membership::new(node_id(1), &[], keys(), &GossipConfig::default(), 1);
            m.set_clock(1_000);
            m.start();
            let sealer = PacketAuth::new(keys(), 1400, ReplayGuard::new(60_000, 16));
            let mut nonce = [0u8; 24];
            nonce[..8].copy_from_slice(&seed.to_le_bytes());
            if payload.len() <= sealer.payload_bytes_max() {
                let _ = m.handle_packet(&sealer.seal(&payload, 1_000, nonce));
            }
            while m.poll_effect().is_some() {}
        }

        #[test]
        fn authentic_arbitrary_bytes_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let mut m = Membership::new(node_id(1), &[], keys(), &GossipConfig::default(), 1);
            m.set_clock(1_000);
            m.start();
            let sealer = PacketAuth::new(keys(), 1400, ReplayGuard::new(60_000, 16));
            let _ = m.handle_packet(&sealer.seal(&payload, 1_000, [3; 24]));
            while m.poll_effect().is_some() {}
        }
    }
}

/// Delivers every datagram `from` wants to send to `to` (timers ignored); returns the
/// other effects.
fn deliver(from: &mut Membership, to: &mut Membership) -> Vec<Effect> {
    let mut rest = Vec::new();
    while let Some(effect) = from.poll_effect() {
        match effect {
            Effect::Send { to: addr, packet } if addr == to.identity().gossip => {
                let _ = to.handle_packet(&packet);
            }
            Effect::Send { .. } | Effect::Schedule { .. } => {}
            other => rest.push(other),
        }
    }
    rest
}

#[test]
fn a_namesake_is_reported_and_the_later_process_yields() {
    let (first_addr, second_addr) =
        (SocketAddr::from(([10, 0, 0, 1], 7002)), SocketAddr::from(([10, 0, 0, 2], 7002)));
    let id = |gossip, incarnation| NodeId {
        name: "botclaw".into(),
        incarnation,
        ..NodeId::seed(gossip)
    };
    let cfg = GossipConfig::default();
    let mut first = Membership::new(id(first_addr, 100), &[], keys(), &cfg, 1);
    let mut second = Membership::new(id(second_addr, 200), &[first_addr], keys(), &cfg, 2);
    first.start();
    second.start();
    let (mut seen_first, mut seen_second) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        seen_second.extend(deliver(&mut second, &mut first));
        seen_first.extend(deliver(&mut first, &mut second));
    }
    let taken = |effects: &[Effect]| {
        effects.iter().find_map(|e| match e {
            Effect::NameTaken { other, this_node_yields } => {
                Some((other.gossip, *this_node_yields))
            }
            _ => None,
        })
    };
    assert_eq!(taken(&seen_second), Some((first_addr, true)), "the later process yields");
    assert_eq!(taken(&seen_first), Some((second_addr, false)), "the earlier one only warns");
}

#[test]
fn a_node_told_not_to_found_waits_for_seeds_and_says_so() {
    let cfg = GossipConfig::default();
    let mut m = Membership::new(node_id(1), &[], keys(), &cfg, 1).founding(false);
    m.start();
    assert!(!m.is_joined(), "a node with existing state or unresolved seeds must not found");
    let mut reports = Vec::new();
    for _ in 0..SEEDS_UNANSWERED_EVERY * 2 {
        m.handle_timer(MembershipTimer::Reannounce).unwrap();
        while let Some(e) = m.poll_effect() {
            if let Effect::SeedsUnanswered { attempts, seeds } = e {
                reports.push((attempts, seeds.len()));
            }
        }
    }
    assert_eq!(reports, [(SEEDS_UNANSWERED_EVERY, 0), (SEEDS_UNANSWERED_EVERY * 2, 0)]);
    // Told it may serve alone after all, it founds (once) and stops reporting.
    m.found();
    m.found();
    let joined: Vec<Effect> =
        std::iter::from_fn(|| m.poll_effect()).filter(|e| *e == Effect::Joined).collect();
    assert_eq!(joined.len(), 1);
    assert!(m.is_joined());
    for _ in 0..SEEDS_UNANSWERED_EVERY {
        m.handle_timer(MembershipTimer::Reannounce).unwrap();
    }
    let silent =
        std::iter::from_fn(|| m.poll_effect()).any(|e| matches!(e, Effect::SeedsUnanswered { .. }));
    assert!(!silent, "a founder alone has nothing to report");
    // Seeds resolved later are announced to at the next re-announce.
    let seed = SocketAddr::from(([127, 0, 0, 1], 9));
    m.set_seeds(&[seed, node_id(1).gossip]);
    assert_eq!(m.seeds(), [seed], "its own address is never a seed");
    m.handle_timer(MembershipTimer::Reannounce).unwrap();
    let sent: Vec<SocketAddr> = std::iter::from_fn(|| m.poll_effect())
        .filter_map(|e| match e {
            Effect::Send { to, .. } => Some(to),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [seed]);
}

#[test]
fn machines_sharing_an_interner_hold_one_copy_of_each_identity() {
    let cfg = GossipConfig::default();
    let ids = IdInterner::default();
    let seed = SocketAddr::from(([127, 0, 0, 1], 1));
    let mut a = Membership::with_interner(node_id(1), &[], keys(), &cfg, 1, ids.clone());
    let mut b = Membership::with_interner(node_id(2), &[seed], keys(), &cfg, 2, ids.clone());
    let mut c = Membership::with_interner(node_id(3), &[seed], keys(), &cfg, 3, ids.clone());
    for m in [&mut a, &mut b, &mut c] {
        m.start();
    }

    let mut nodes = [a, b, c];
    // Rounds: every datagram delivered, then every timer asked for fired (time is not
    // modelled; only who learns whom matters here).
    for _ in 0..10 {
        let mut timers = Vec::new();
        for i in 0..nodes.len() {
            while let Some(effect) = nodes[i].poll_effect() {
                match effect {
                    Effect::Send { to, packet } => {
                        if let Some(m) = nodes.iter_mut().find(|m| m.identity().gossip == to) {
                            let _ = m.handle_packet(&packet);
                        }
                    }
                    Effect::Schedule { timer, .. } => timers.push((i, timer)),
                    _ => {}
                }
            }
        }
        for (i, timer) in timers {
            let _ = nodes[i].handle_timer(timer);
        }
    }
    let [a, b, c] = nodes;
    // Where each machine keeps identity `port` (its own or a member's): a pointer into it.
    let held = |m: &Membership, port: u16| {
        let mut at = None;
        m.visit_members(|id, _| {
            if id.gossip.port() == port {
                at = Some(id as *const NodeId);
            }
        });
        at.unwrap_or_else(|| panic!("{} does not know n{port}", m.identity().name))
    };
    // A node's own identity may have been renewed (time is not modelled: suspicion runs
    // out at once), a copy of its own: the others' copies are compared.
    for port in 1..=3 {
        let others = [&a, &b, &c].into_iter().filter(|m| m.identity().gossip.port() != port);
        let copies: BTreeSet<_> = others.map(|m| held(m, port)).collect();
        assert_eq!(copies.len(), 1, "n{port} is held {} times", copies.len());
    }
}

#[test]
fn an_interner_shares_equal_identities_and_sweeps_what_nobody_holds() {
    let ids = IdInterner::default();
    let first = ids.intern(SharedId::new(node_id(1)));
    let again = ids.intern(SharedId::new(node_id(1)));
    assert!(std::ptr::eq(&*first, &*again));
    assert!(!std::ptr::eq(&*first, &*ids.intern(SharedId::new(node_id(2)))));
    // On the wire it is the identity itself.
    assert_eq!(postcard::to_allocvec(&first).unwrap(), postcard::to_allocvec(&node_id(1)).unwrap());
    let back: SharedId = postcard::from_bytes(&postcard::to_allocvec(&first).unwrap()).unwrap();
    assert_eq!(back, first);
    // Identities seen once and dropped (a churning cluster's) do not pile up.
    for port in 0..20_000u16 {
        drop(ids.intern(SharedId::new(node_id(port))));
        assert!(ids.len() <= 2 * IdInterner::SWEEP_MIN + 2, "{} held at {port}", ids.len());
    }
    assert!(std::ptr::eq(&*first, &*ids.intern(SharedId::new(node_id(1)))), "a held one stays");
}
