//! Multi-process membership: convergence, links, crash detection, restart, graceful leave,
//! wrong secret, junk datagrams.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use botclaw_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);

#[test]
fn three_nodes_converge_and_link() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    for node in &c.nodes {
        let (code, _) = http_get(node.ports.admin, "/health/ready").unwrap();
        assert_eq!(code, 200);
        let (code, body) = http_get(node.ports.admin, "/health/live").unwrap();
        assert_eq!((code, body.trim()), (200, "live"));
        let status = node.status().unwrap();
        assert_eq!(status["node"], node.name.as_str());
        assert_eq!(status["pid"].as_u64(), Some(u64::from(node.pid())));
        // A real cross-node call over each link: every peer answers with its link name.
        let pings = poll(Duration::from_secs(10), || {
            let pings = get_json(node.ports.admin, "/ping")?;
            let all_ok = c.nodes.iter().filter(|p| p.name != node.name).all(|p| {
                let want = p.status().map(|s| s["link_name"].clone());
                want.is_some() && pings[&p.name]["reply"] == want.unwrap()
            });
            all_ok.then_some(pings)
        });
        assert!(pings.is_some(), "{} could not ping its peers\n{}", node.name, c.logs());
        let metrics = node.metrics();
        assert_eq!(metric(&metrics, "botclaw_members{state=\"up\"}"), 3.0);
        assert!(metric(&metrics, "botclaw_gossip_packets_received_total") > 0.0);
        assert_eq!(metric(&metrics, "botclaw_cluster_sessions"), 2.0);
        // No false positives while nothing failed.
        assert_eq!(metric(&metrics, "botclaw_member_events_total{event=\"down\"}"), 0.0);
    }
}

#[test]
fn frozen_node_is_declared_down_and_rejoins_by_itself() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    c.nodes[2].signal(libc::SIGSTOP);
    c.wait_seen_as(&[0, 1], "n2", "down", Instant::now(), Duration::from_secs(10));
    // Links to the frozen node are dropped: a frozen peer's session would swallow calls.
    let unlinked = poll(Duration::from_secs(5), || {
        let status = c.nodes[0].status()?;
        let n2 = status["members"].as_array()?.iter().find(|m| m["name"] == "n2")?.clone();
        (n2["linked"] == false).then_some(())
    });
    assert!(unlinked.is_some(), "session to the frozen node kept open");
    c.nodes[2].signal(libc::SIGCONT);
    // Same process, same incarnation: it learns it was declared down and rejoins with a
    // higher bump, without an operator.
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let status = c.nodes[0].status().unwrap();
    let n2 =
        status["members"].as_array().unwrap().iter().find(|m| m["name"] == "n2").unwrap().clone();
    assert!(n2["bump"].as_u64().unwrap() >= 1, "{n2}");
}

#[test]
fn killed_node_is_declared_down_then_restart_rejoins() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let (_, old_incarnation) = c.nodes[0].member("n2").unwrap();

    let killed_at = Instant::now();
    c.nodes[2].kill9();
    let detected = c.wait_seen_as(&[0, 1], "n2", "down", killed_at, Duration::from_secs(10));
    eprintln!("kill -9 detected by both peers after {} ms", detected.as_millis());
    assert!(detected <= Duration::from_secs(3), "detection took {detected:?}");

    // Same addresses, new process: it comes back as a new incarnation and links again.
    c.nodes[2].start();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    for i in [0, 1] {
        let (state, incarnation) = c.nodes[i].member("n2").unwrap();
        assert_eq!(state, "up");
        assert!(incarnation > old_incarnation, "n{i} still sees the old incarnation");
    }
}

#[test]
fn sigterm_leaves_quickly_and_exits_zero() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let sent_at = Instant::now();
    c.nodes[1].signal(libc::SIGTERM);
    // By the controller's map SIGTERM is a controlled shutdown: the node waits until the
    // controller committed it draining, then its leave (the other in-sync members take its
    // shards over; nothing is copied): a few commits, not only gossip.
    let bound = Duration::from_secs(if by_map() { 20 } else { 5 });
    let seen = c.wait_seen_as(&[0, 2], "n1", "down", sent_at, bound);
    eprintln!("graceful leave seen by both peers after {} ms", seen.as_millis());
    let quick = Duration::from_secs(if by_map() { 10 } else { 1 });
    assert!(seen <= quick, "leave took {seen:?}");
    let status = c.nodes[1].wait_exit(Duration::from_secs(10)).expect("node did not exit");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn wrong_secret_never_appears() {
    let mut c = Cluster::new(2);
    c.start_all();
    c.wait_converged(&[0, 1], CONVERGE);
    let intruder = c.add_node("a-different-secret");
    c.nodes[intruder].seeds = vec![c.nodes[0].ports.gossip, c.nodes[1].ports.gossip];
    c.nodes[intruder].start();
    // Watch for a while: the intruder must never show up, and its datagrams are counted.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        for i in [0, 1] {
            assert_eq!(c.nodes[i].up_members(), vec!["n0", "n1"], "intruder appeared");
            assert!(c.nodes[i].member("n2").is_none());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rejected: f64 = [0, 1]
        .iter()
        .map(|&i| {
            metric(
                &c.nodes[i].metrics(),
                "botclaw_gossip_packets_rejected_total{reason=\"unknown_key\"}",
            )
        })
        .sum();
    assert!(rejected > 0.0, "no unknown_key rejections counted");
    let status = c.nodes[intruder].status().unwrap();
    assert_eq!(status["joined"], false);
    for i in [0, 1] {
        let down = metric(&c.nodes[i].metrics(), "botclaw_member_events_total{event=\"down\"}");
        assert_eq!(down, 0.0, "n{i} declared a healthy member down");
    }
    assert_eq!(c.nodes[intruder].up_members(), vec!["n2"]);
}

#[test]
fn junk_datagrams_are_rejected_and_counted() {
    // A fake seed socket captures a real, authenticated datagram from the node.
    let fake_seed = UdpSocket::bind("127.0.0.1:0").unwrap();
    fake_seed.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c = Cluster::new(1);
    c.nodes[0].seeds = vec![fake_seed.local_addr().unwrap()];
    c.start_all();
    let mut buf = [0u8; 2048];
    let (n, from) = fake_seed.recv_from(&mut buf).expect("no announce reached the fake seed");
    let genuine = buf[..n].to_vec();
    assert_eq!(from, c.nodes[0].ports.gossip);

    let target = c.nodes[0].ports.gossip;
    let junk: Vec<(Vec<u8>, &str)> = vec![
        (Vec::new(), "too_short"),
        (vec![1u8; 10], "too_short"),
        (vec![0xAB; 2000], "too_large"),
        (vec![9u8; 100], "bad_version"),
        // The HMAC-only format of earlier versions.
        (vec![1u8; 100], "bad_version"),
        (vec![2u8; 100], "unknown_key"),
        (genuine[..genuine.len() - 1].to_vec(), "bad_tag"),
        (genuine[..genuine.len() / 2].to_vec(), "bad_tag"),
        // Authentic, but the node's own announce: foca refuses data from itself.
        (genuine.clone(), "protocol"),
    ];
    let mut random = 0x9E37_79B9_7F4A_7C15u64;
    let mut datagrams: Vec<Vec<u8>> = (0..200)
        .map(|_| {
            let len = (random % 1300) as usize + 60; // over the header, under packet_bytes_max
            (0..len)
                .map(|_| {
                    random ^= random << 13;
                    random ^= random >> 7;
                    random ^= random << 17;
                    ((random & 0xFE) | 1) as u8 // odd, never 2: the version byte is always wrong
                })
                .collect()
        })
        .collect();
    let randoms = datagrams.len();
    datagrams.extend(junk.iter().map(|(bytes, _)| bytes.clone()));
    // Send in small batches and wait for each to be received: a burst could overflow the
    // socket buffer, and datagrams lost there are not the node's to count.
    let received = || metric(&c.nodes[0].metrics(), "botclaw_gossip_packets_received_total");
    let base = received();
    for (i, batch) in datagrams.chunks(10).enumerate() {
        for bytes in batch {
            fake_seed.send_to(bytes, target).unwrap();
        }
        let want = base + (i * 10 + batch.len()) as f64;
        let got = poll(Duration::from_secs(10), || (received() >= want).then_some(()));
        assert!(got.is_some(), "node stopped receiving after batch {i}");
    }
    let expect = |reason: &str| junk.iter().filter(|(_, r)| *r == reason).count() as f64;
    let counted = poll(Duration::from_secs(10), || {
        let m = c.nodes[0].metrics();
        let get = |r: &str| {
            metric(&m, &format!("botclaw_gossip_packets_rejected_total{{reason=\"{r}\"}}"))
        };
        let ok = get("too_short") == expect("too_short")
            && get("too_large") == expect("too_large")
            && get("bad_tag") >= expect("bad_tag")
            && get("unknown_key") >= expect("unknown_key")
            && get("protocol") >= expect("protocol")
            && get("bad_version") >= expect("bad_version") + randoms as f64;
        ok.then_some(())
    });
    assert!(counted.is_some(), "rejections not counted:\n{}", c.nodes[0].metrics());
    let (code, _) = http_get(c.nodes[0].ports.admin, "/health/live").unwrap();
    assert_eq!(code, 200, "node unhealthy after junk");
    assert!(c.nodes[0].child.as_mut().unwrap().try_wait().unwrap().is_none(), "node exited");
}
