//! Hostile input against real processes: the admin port's guard.

use std::process::Command;
use std::time::Duration;

use botclaw_client::{Client, ClientOptions};
use botclaw_tests::*;

const CONVERGE: Duration = Duration::from_secs(30);

/// Mutating admin endpoints: never from a browser page (an `Origin` header), and with
/// `[admin] tokens` only with one of them; refusals are counted and change nothing. The
/// CLI sends `BOTCLAW_ADMIN_TOKEN`.
#[test]
fn the_admin_port_refuses_cross_origin_and_tokenless_changes() {
    let mut c = Cluster::new(1).with_config("[admin]\ntokens = [\"adm-0123456789\"]\n");
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let admin = c.nodes[0].ports.admin;
    let bearer = ("Authorization", "Bearer adm-0123456789");
    let cases: [(&[(&str, &str)], u16); 4] = [
        (&[], 401),
        (&[("Authorization", "Bearer adm-0123456788")], 401),
        (&[("Authorization", "adm-0123456789")], 401),
        (&[bearer, ("Origin", "http://evil.example")], 403),
    ];
    for (headers, code) in cases {
        let (got, body) = http_post_with(admin, "/drain", headers).expect("admin answers");
        assert_eq!(got, code, "{headers:?}: {body}");
    }
    // The console served by this port sends its own origin: let through (with the
    // token); another port's origin is another site.
    let own = format!("http://{admin}");
    let other = format!("http://127.0.0.1:{}", admin.port() ^ 1);
    let (got, body) = http_post_with(admin, "/drain", &[("Origin", &other), bearer]).unwrap();
    assert_eq!(got, 403, "{body}");
    let (got, body) = http_post_with(admin, "/drain", &[("Origin", &own)]).unwrap();
    assert_eq!(got, 401, "same origin still needs the token: {body}");
    let set = "/flags/set?name=console.check&percent=10";
    let (got, body) = http_post_with(admin, set, &[("Origin", &own), bearer]).unwrap();
    assert_eq!(got, 202, "{body}");
    // Nothing else changed: the node still serves, read-only endpoints stay open.
    assert_eq!(http_get(admin, "/health/ready").map(|(code, _)| code), Some(200));
    let metrics = c.nodes[0].metrics();
    assert_eq!(metric(&metrics, "botclaw_admin_requests_refused_total{reason=\"token\"}"), 4.0);
    assert_eq!(
        metric(&metrics, "botclaw_admin_requests_refused_total{reason=\"cross-origin\"}"),
        2.0
    );
    // The CLI with the token drains it.
    let out = Command::new(botclaw_bin())
        .args(["drain", "--admin", &admin.to_string(), "--wait-s", "60"])
        .env("BOTCLAW_ADMIN_TOKEN", "adm-0123456789")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = c.nodes[0].wait_exit(Duration::from_secs(30)).expect("drained node kept running");
    assert!(status.success(), "{status}");
}

/// Without tokens (loopback only) a browser page still cannot drain a node.
#[test]
fn without_tokens_a_cross_origin_post_is_refused() {
    let mut c = Cluster::new(1);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let admin = c.nodes[0].ports.admin;
    let (code, _) = http_post_with(admin, "/drain", &[("Origin", "null")]).unwrap();
    assert_eq!(code, 403);
    assert_eq!(http_get(admin, "/health/ready").map(|(code, _)| code), Some(200));
    // A wildcard admin bind without tokens does not start.
    let out = Command::new(botclaw_bin())
        .args(["node", "--admin-addr", "0.0.0.0:1", "--name", "x"])
        .env("BOTCLAW_SECRET", SECRET)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin_addr") && err.contains("admin.tokens"), "{err}");
}

/// Reads until the node closes the connection; how long that took (`None`: still open
/// after `within`).
fn closed_within(stream: &mut std::net::TcpStream, within: Duration) -> Option<Duration> {
    use std::io::Read;
    let started = std::time::Instant::now();
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 4096];
    while started.elapsed() < within {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// The admin port bounds its connections: past `connections_max` a new one is closed at
/// once and counted, one that sends no request is closed after `header_timeout_ms`, and
/// then the port answers again.
#[test]
fn the_admin_port_closes_silent_connections_and_bounds_how_many() {
    let config = "[admin]\nconnections_max = 4\nheader_timeout_ms = 3000\n";
    let mut c = Cluster::new(1).with_config(config);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let admin = c.nodes[0].ports.admin;
    // The harness's own idle keep-alive connections are closed by the timeout under test
    // first (a wait for that timeout, not for a condition the test could poll).
    std::thread::sleep(Duration::from_millis(3500));
    // Five silent connections: four take every slot, the one the port accepted last is
    // closed at once; the four when their time to send headers has passed, not before.
    let opened = std::time::Instant::now();
    let mut conns: Vec<std::net::TcpStream> =
        (0..5).map(|_| std::net::TcpStream::connect(admin).unwrap()).collect();
    let mut closed: Vec<Option<Duration>> = vec![None; conns.len()];
    while closed.contains(&None) && opened.elapsed() < Duration::from_secs(20) {
        for (conn, at) in conns.iter_mut().zip(closed.iter_mut()).filter(|(_, at)| at.is_none()) {
            if closed_within(conn, Duration::from_millis(10)).is_some() {
                *at = Some(opened.elapsed());
            }
        }
    }
    assert!(!closed.contains(&None), "a silent connection stays open: {closed:?}");
    let early = closed.iter().flatten().filter(|&&t| t < Duration::from_millis(1500)).count();
    assert_eq!(early, 1, "past connections_max of four, one is closed at once: {closed:?}");
    let late = closed.iter().flatten().filter(|&&t| t >= Duration::from_millis(2900)).count();
    assert_eq!(late, 4, "the others after the header timeout, not before: {closed:?}");
    // The port answers again, and counted the refusal.
    let m = c.nodes[0].metrics();
    let counted = metric(&m, "botclaw_admin_connections_refused_total{reason=\"connections_max\"}");
    assert!(counted >= 1.0, "refusals counted: {counted}");
}

/// With client tokens, sockets that never say `hello` hold places of their own (not the
/// token holders'), are closed after `hello_timeout_ms`, and an idle authenticated
/// connection is closed after `idle_timeout_ms`; each close is counted.
#[test]
fn silent_and_idle_client_connections_are_closed_and_cannot_lock_out_token_holders() {
    use std::io::{BufRead, BufReader, Write};
    let config = "[frontend]\nclient_tokens = [\"tok-0123456789\"]\n\
                  unauthenticated_connections_max = 2\nhello_timeout_ms = 1000\n\
                  idle_timeout_ms = 3000\nconnections_max = 8\n";
    let mut c = Cluster::new(1).with_config(config);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let addr = c.nodes[0].ports.client;
    let connect = || std::net::TcpStream::connect(addr).unwrap();
    // The harness's own probes of the client port are gone.
    let quiet = poll(Duration::from_secs(10), || {
        (metric(&c.nodes[0].metrics(), "botclaw_client_connections") == 0.0).then_some(())
    });
    assert!(quiet.is_some(), "client connections still open before the test");
    // Two silent sockets fill the unauthenticated places: a third is closed at once.
    let (mut a, mut b, mut third) = (connect(), connect(), connect());
    let opened = std::time::Instant::now();
    let refused = closed_within(&mut third, Duration::from_secs(1));
    assert!(refused.is_some(), "a third anonymous socket was kept");
    // The silent ones go after the hello timeout.
    for s in [&mut a, &mut b] {
        closed_within(s, Duration::from_secs(10)).expect("silent socket kept open");
        let took = opened.elapsed();
        assert!(took >= Duration::from_millis(900), "closed too early: {took:?}");
    }
    // A token holder gets in, and is closed once idle.
    let mut s = connect();
    s.write_all(b"{\"op\":\"hello\",\"token\":\"tok-0123456789\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("welcome"), "{line}");
    assert!(closed_within(&mut s, Duration::from_secs(10)).is_some(), "idle connection kept");
    let m = c.nodes[0].metrics();
    assert_eq!(metric(&m, "botclaw_client_connections_timed_out_total{reason=\"hello\"}"), 2.0);
    assert_eq!(metric(&m, "botclaw_client_connections_timed_out_total{reason=\"idle\"}"), 1.0);
    assert!(metric(&m, "botclaw_client_connections_rejected_total") >= 1.0);
}

/// An address that keeps failing `hello` is refused for the rest of its window, whatever
/// it sends next (guessing tokens costs a window per few guesses).
#[test]
fn failed_hellos_from_one_address_are_rate_limited() {
    use std::io::{BufRead, BufReader, Write};
    let config = "[frontend]\nclient_tokens = [\"tok-0123456789\"]\nhello_failures_max = 3\n\
                  hello_failure_window_ms = 60000\n";
    let mut c = Cluster::new(1).with_config(config);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let addr = c.nodes[0].ports.client;
    let hello = |token: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let line = format!("{{\"op\":\"hello\",\"token\":\"{token}\"}}\n");
        let _ = s.write_all(line.as_bytes());
        let mut answer = String::new();
        let _ = BufReader::new(s).read_line(&mut answer);
        answer
    };
    for guess in ["tok-0000000000", "tok-1111111111", "tok-2222222222"] {
        assert!(hello(guess).contains("unauthorized"), "a wrong token was not refused");
    }
    // Blocked now: even the right token gets no answer, the connection is closed at once.
    assert_eq!(hello("tok-0123456789"), "");
    let m = c.nodes[0].metrics();
    assert!(metric(&m, "botclaw_client_connections_rejected_total") >= 1.0);
    assert!(metric(&m, "botclaw_errors_total{code=\"unauthorized\"}") >= 3.0);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Says `text` on `conv` with id `id` over a plain socket and returns the answer line.
fn say_line(
    s: &mut std::net::TcpStream,
    reader: &mut impl std::io::BufRead,
    conv: &str,
    id: &str,
    text: &str,
) -> String {
    use std::io::Write;
    let say = format!(
        "{{\"op\":\"say\",\"conv\":\"{conv}\",\"id\":\"{id}\",\"text\":\"{text}\",\"bot\":\"echo\"}}\n"
    );
    s.write_all(say.as_bytes()).unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

/// Bytes, not counts: a turn over `turn_bytes_max` (before or after the bot answers) is
/// refused `too_large` and leaves no trace; a client that asks for many large answers and
/// reads none holds at most its output buffer of the node's memory, is cut off after
/// `write_timeout_ms`, and the node keeps serving others.
#[test]
fn a_client_that_does_not_read_is_cut_off_and_bounded_in_memory() {
    use std::io::{BufRead, BufReader, Write};
    let mut c = Cluster::new(1).with_config("[frontend]\nwrite_timeout_ms = 2000\n");
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let addr = c.nodes[0].ports.client;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    // Over the 24 KiB turn limit as sent, and once the echo bot doubles it.
    let line = say_line(&mut s, &mut reader, "big", "huge", &"x".repeat(30_000));
    assert!(line.contains("\"too_large\""), "{}", &line[..line.len().min(300)]);
    let line = say_line(&mut s, &mut reader, "big", "doubled", &"x".repeat(13_000));
    assert!(line.contains("\"too_large\""), "{}", &line[..line.len().min(300)]);
    // A conversation at its limits: 64 kept turns of ~22 KB, about 1.4 MB.
    let text = "x".repeat(11_000);
    for i in 0..64 {
        let line = say_line(&mut s, &mut reader, "big", &i.to_string(), &text);
        assert!(line.contains(&format!("\"turn\":{}", i + 1)), "{}", &line[..line.len().min(300)]);
    }
    let metrics = c.nodes[0].metrics();
    assert_eq!(metric(&metrics, "botclaw_turns_too_large_total"), 2.0);
    // Another socket asks for 256 KB pages 2,000 times (500 MB of answers) and reads none.
    let pid = c.nodes[0].pid();
    let before = rss_kib(pid);
    let mut greedy = std::net::TcpStream::connect(addr).unwrap();
    greedy.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let ask = b"{\"op\":\"history\",\"conv\":\"big\",\"limit\":64}\n".repeat(2000);
    let _ = greedy.write_all(&ask);
    let mut peak = before;
    let cut = poll(Duration::from_secs(30), || {
        peak = peak.max(rss_kib(pid));
        let m = c.nodes[0].metrics();
        let n = metric(&m, "botclaw_client_connections_timed_out_total{reason=\"write\"}");
        (n >= 1.0).then_some(())
    });
    assert!(cut.is_some(), "the non-reading client was not cut off");
    // 8 MiB of output buffer, plus what the socket and allocator keep.
    let grew_mb = peak.saturating_sub(before) / 1024;
    eprintln!("rss before {before} KiB, peak {peak} KiB");
    assert!(grew_mb < 64, "the node grew by {grew_mb} MB for one non-reading client");
    let m = c.nodes[0].metrics();
    assert!(metric(&m, "botclaw_client_output_buffer_full_total") >= 1.0);
    // The first client is still served, and the conversation kept every acknowledged turn.
    let line = say_line(&mut s, &mut reader, "small", "1", "hi");
    assert!(line.contains("\"reply\""), "{line}");
    s.write_all(b"{\"op\":\"history\",\"conv\":\"big\",\"limit\":64}\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let page: serde_json::Value = serde_json::from_str(&line).unwrap();
    let turns = page["turns"].as_array().unwrap();
    assert!(turns.len() >= 10 && page["more"] == true, "one page of many: {}", turns.len());
    assert_eq!(turns.last().unwrap()["turn"], 64);
}

/// A conversation at its byte limits stays readable through every node, page by page, and
/// keeps working after its owner drains away; the links between nodes are never dropped
/// (every message fits a frame by construction).
#[test]
fn a_conversation_at_its_limits_moves_and_is_read_through_every_node() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let rt = runtime();
    let addrs: Vec<_> = c.nodes.iter().map(|n| n.ports.client).collect();
    let connect =
        |i: usize| rt.block_on(Client::connect(addrs[i], ClientOptions::default())).unwrap();
    let text = "y".repeat(11_000);
    let first = connect(0);
    for i in 0..70 {
        let r = rt.block_on(first.say("large", &format!("m{i}"), &text, Some("echo"))).unwrap();
        assert_eq!(r.turn, i + 1);
    }
    // Every node pages through the 64 kept turns (turns 7..=70).
    let read_all = |client: &Client| {
        let mut turns = Vec::new();
        let mut before = None;
        loop {
            let (page, more) = rt.block_on(client.history_page("large", Some(64), before)).unwrap();
            assert!(!page.is_empty());
            before = Some(page[0].turn);
            turns.splice(0..0, page.into_iter().map(|t| t.turn));
            if !more {
                return turns;
            }
        }
    };
    let want: Vec<u64> = (7..=70).collect();
    for i in 0..3 {
        assert_eq!(read_all(&connect(i)), want, "through n{i}");
        let m = c.nodes[i].metrics();
        assert_eq!(metric(&m, "botclaw_link_drops_total"), 0.0, "n{i} dropped a link");
    }
    // The owner drains; a surviving node takes the conversation over.
    let owner = get_json(c.nodes[0].ports.admin, "/placement?conv=large").unwrap();
    let owner = owner["routed_owner"].as_str().unwrap().to_string();
    let o = c.nodes.iter().position(|n| n.name == owner).unwrap();
    let out = std::process::Command::new(botclaw_bin())
        .args(["drain", "--admin", &c.nodes[o].ports.admin.to_string(), "--wait-s", "90"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.nodes[o].wait_exit(Duration::from_secs(30)).expect("drained node kept running");
    let survivor = (0..3).find(|&i| i != o).unwrap();
    let client = connect(survivor);
    let r = poll(Duration::from_secs(30), || {
        rt.block_on(client.say("large", "m70", &text, Some("echo"))).ok()
    });
    assert_eq!(r.expect("the moved conversation never answered").turn, 71);
    let want: Vec<u64> = (8..=71).collect();
    for i in (0..3).filter(|&i| i != o) {
        assert_eq!(read_all(&connect(i)), want, "through n{i} after the move");
        // Only the link to the node that left.
        let m = c.nodes[i].metrics();
        assert!(metric(&m, "botclaw_link_drops_total") <= 1.0, "n{i} dropped links");
    }
}

/// Memory, not only counts: past `active_bytes_max` new conversations are answered `busy`
/// (counted) while the active ones keep working; idle ones are passivated early, and new
/// conversations are accepted again.
#[test]
fn the_conversation_memory_budget_refuses_new_conversations_then_recovers() {
    use std::io::{BufRead, BufReader, Write};
    // About 200 actors' worth.
    let mut c = Cluster::new(1).with_config("[conversations]\nactive_bytes_max = 4194304\n");
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let mut s = std::net::TcpStream::connect(c.nodes[0].ports.client).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut batch = String::new();
    for k in 0..1000 {
        batch.push_str(&format!(
            "{{\"op\":\"say\",\"conv\":\"budget-{k}\",\"id\":\"1\",\"text\":\"hi\"}}\n"
        ));
    }
    s.write_all(batch.as_bytes()).unwrap();
    let (mut replies, mut busy) = (0, 0);
    for _ in 0..1000 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.contains("\"reply\"") {
            replies += 1;
        } else if line.contains("\"busy\"") {
            busy += 1;
        } else {
            panic!("unexpected answer {line}");
        }
    }
    eprintln!("{replies} replies, {busy} busy");
    assert!(busy > 0 && (100..1000).contains(&replies), "{replies} replies, {busy} busy");
    let m = c.nodes[0].metrics();
    assert_eq!(metric(&m, "botclaw_activations_refused_total"), busy as f64);
    assert!(metric(&m, "botclaw_active_conversations_bytes") <= 4_194_304.0 + 64_000.0);
    // An active conversation keeps working; after a second idle, new ones get in again.
    let line = say_line(&mut s, &mut reader, "budget-0", "2", "again");
    assert!(line.contains("\"turn\":2"), "{line}");
    let admitted = poll(Duration::from_secs(20), || {
        let line = say_line(&mut s, &mut reader, "budget-new", "1", "hi");
        line.contains("\"reply\"").then_some(())
    });
    assert!(admitted.is_some(), "no new conversation admitted after passivation");
    assert!(metric(&c.nodes[0].metrics(), "botclaw_passivations_total") > 0.0);
}

/// Sum of a metric over every running node of `c`.
fn metric_sum(c: &Cluster, sample: &str) -> f64 {
    c.nodes.iter().filter(|n| n.child.is_some()).map(|n| metric(&n.metrics(), sample)).sum()
}

/// Mutual TLS between nodes: turns cross the links; silent sockets on the cluster port are
/// limited and timed out; bytes that are not TLS are refused; a node whose certificate is
/// from another CA never links (though it knows the secret), and the cluster keeps serving.
#[test]
fn tls_links_carry_turns_and_keep_strangers_out() {
    use std::io::Write;
    let tls = "handshake_timeout_ms = 1000\nunauthenticated_connections_max = 8\n";
    let mut c = Cluster::new(3).with_tls(tls);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let rt = runtime();
    let say_everywhere = |c: &Cluster, round: &str| {
        for (i, node) in c.nodes.iter().enumerate().filter(|(_, n)| n.child.is_some()).take(3) {
            let client = rt.block_on(Client::connect(node.ports.client, ClientOptions::default()));
            let client = client.unwrap();
            for k in 0..20 {
                let conv = format!("tls-{k}");
                let r = rt.block_on(client.say(&conv, &format!("{round}-{i}"), "hi", Some("echo")));
                assert!(r.is_ok(), "{conv} through n{i}: {r:?}");
            }
        }
    };
    say_everywhere(&c, "a");
    assert!(metric_sum(&c, "botclaw_forwards_total") > 0.0, "no turn crossed a link");
    // 20 silent sockets: 8 may start a handshake, the rest are closed at once; the 8 are
    // closed after handshake_timeout_ms.
    let cluster0 = c.nodes[0].ports.cluster;
    let silent: Vec<std::net::TcpStream> =
        (0..20).map(|_| std::net::TcpStream::connect(cluster0).unwrap()).collect();
    let refused = |reason: &str| {
        metric(
            &c.nodes[0].metrics(),
            &format!("botclaw_cluster_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    let limited = poll(Duration::from_secs(20), || {
        (refused("handshakes_full") >= 12.0 && refused("handshake_timeout") >= 8.0).then_some(())
    });
    assert!(
        limited.is_some(),
        "full {}, timed out {}",
        refused("handshakes_full"),
        refused("handshake_timeout")
    );
    drop(silent);
    // Bytes that are not TLS (ractor_cluster's plain handshake, junk) are refused.
    let before = refused("handshake");
    let mut plain = std::net::TcpStream::connect(cluster0).unwrap();
    let _ = plain.write_all(&[0, 0, 0, 0, 0, 0, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    let junk = poll(Duration::from_secs(10), || (refused("handshake") > before).then_some(()));
    assert!(junk.is_some(), "plain bytes on the TLS cluster port were not refused");
    // A node with the secret but a certificate of another CA.
    let rogue_dir = c.dir.path().join("rogue-tls");
    let out = std::process::Command::new(botclaw_bin())
        .args(["tls", "init", "--dir"])
        .arg(&rogue_dir)
        .args(["--name", "n3"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let r = c.add_node(SECRET);
    let d = rogue_dir.display();
    c.nodes[r].config = Some(format!(
        "[tls]\nca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/n3.pem\"\nkey_file = \"{d}/n3-key.pem\"\n"
    ));
    c.nodes[r].start();
    let handshakes_before =
        metric_sum(&c, "botclaw_cluster_connections_refused_total{reason=\"handshake\"}");
    // It gossips (it has the secret), so the others see it; its links never form.
    let refused_rogue = poll(Duration::from_secs(30), || {
        let n = metric_sum(&c, "botclaw_cluster_connections_refused_total{reason=\"handshake\"}");
        (n >= handshakes_before + 2.0).then_some(())
    });
    assert!(refused_rogue.is_some(), "the rogue node's links were never refused\n{}", c.logs());
    for i in 0..3 {
        let status = c.nodes[i].status().unwrap();
        let rogue =
            status["members"].as_array().unwrap().iter().find(|m| m["name"] == "n3").cloned();
        if let Some(m) = rogue {
            assert_ne!(m["linked"], true, "n{i} linked to a node of another CA");
        }
    }
    // By the map the rogue never joins it (it cannot reach the controller), so every
    // conversation is still served. By the ring (the older mode) owners come from the
    // gossip view, where the rogue is up: its share answers `unavailable` ("no link to the
    // owner"); one more reason the map is the default.
    if by_map() {
        say_everywhere(&c, "b");
    }
}

/// Gossip is sealed: a datagram captured on the wire and sent again is refused as a replay,
/// a tampered one fails its tag, one under an unknown key is refused, each counted; the
/// cluster is unaffected.
#[test]
fn replayed_tampered_and_foreign_gossip_is_refused() {
    let mut c = Cluster::new(2);
    // n1 also lists a "seed" that only records what n1 sends it: a captured datagram.
    let tap = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    tap.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.nodes[1].seeds.push(tap.local_addr().unwrap());
    let n0 = c.nodes[0].ports.gossip;
    c.start_all();
    let mut buf = [0u8; 2048];
    let (len, _) = tap.recv_from(&mut buf).expect("n1 never announced to the tap");
    let captured = buf[..len].to_vec();
    c.wait_converged(&[0, 1], CONVERGE);
    let rejected = |reason: &str| {
        metric(
            &c.nodes[0].metrics(),
            &format!("botclaw_gossip_packets_rejected_total{{reason=\"{reason}\"}}"),
        )
    };
    // Authentic (it opens; foca refuses an announce addressed to another node), then the
    // same bytes again: a replay.
    tap.send_to(&captured, n0).unwrap();
    tap.send_to(&captured, n0).unwrap();
    let mut tampered = captured.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    tap.send_to(&tampered, n0).unwrap();
    let mut foreign = captured.clone();
    foreign[1] ^= 0xff;
    tap.send_to(&foreign, n0).unwrap();
    let seen = poll(Duration::from_secs(10), || {
        (rejected("replayed") >= 1.0
            && rejected("bad_tag") >= 1.0
            && rejected("unknown_key") >= 1.0)
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "replayed {}, bad_tag {}, unknown_key {}",
        rejected("replayed"),
        rejected("bad_tag"),
        rejected("unknown_key")
    );
    c.wait_converged(&[0, 1], CONVERGE);
}

/// `[tls] client_port = true`: a client that trusts the cluster CA talks TLS to the chat
/// port; a plain-text client gets no answer and is counted.
#[test]
fn the_client_port_speaks_tls_when_asked() {
    use std::io::{Read, Write};
    let mut c = Cluster::new(1).with_tls("client_port = true\n");
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let rt = runtime();
    let ca = c.dir.path().join("tls").join("ca.pem");
    let tls = botclaw_client::ClientTls::from_ca_file(&ca, "botclaw-node").unwrap();
    let opts = ClientOptions { tls: Some(tls), ..ClientOptions::default() };
    let client = rt.block_on(Client::connect(c.nodes[0].ports.client, opts)).unwrap();
    let r = rt.block_on(client.say("tls-chat", "1", "over tls", Some("echo"))).unwrap();
    assert_eq!(r.turn, 1);
    // Plain text: the node answers nothing readable and closes.
    let mut plain = std::net::TcpStream::connect(c.nodes[0].ports.client).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain.write_all(b"{\"op\":\"ping\"}\n").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("pong"), "plain text was served");
    let failed = poll(Duration::from_secs(10), || {
        let m = c.nodes[0].metrics();
        (metric(&m, "botclaw_client_connections_timed_out_total{reason=\"tls\"}") >= 1.0)
            .then_some(())
    });
    assert!(failed.is_some());
}

/// `[frontend.principals]`: a conversation belongs to the principal whose token created it.
/// Another principal using the same id gets a conversation of its own (it can neither read
/// nor continue the first); a principal's second token (a rotation) reaches its own.
#[test]
fn a_principal_sees_only_its_own_conversations() {
    let config = "[frontend.principals]\nweb = [\"tok-web-0001\", \"tok-web-0002\"]\n\
                  app = [\"tok-app-0001\"]\n";
    let mut c = Cluster::new(1).with_config(config);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let rt = runtime();
    let addr = c.nodes[0].ports.client;
    let as_token = |token: &str| {
        let opts = ClientOptions { token: Some(token.into()), ..ClientOptions::default() };
        rt.block_on(Client::connect(addr, opts)).unwrap()
    };
    let web = as_token("tok-web-0001");
    for (id, turn) in [("w1", 1), ("w2", 2)] {
        let r = rt.block_on(web.say("shared", id, "web's secret", Some("echo"))).unwrap();
        assert_eq!(r.turn, turn);
    }
    let app = as_token("tok-app-0001");
    let r = rt.block_on(app.say("shared", "a1", "app's turn", Some("echo"))).unwrap();
    assert_eq!(r.turn, 1, "app continued web's conversation");
    let seen = rt.block_on(app.history("shared", None)).unwrap();
    assert_eq!(seen.len(), 1);
    assert!(seen.iter().all(|t| !t.text.contains("web")), "app read web's turns: {seen:?}");
    // A retry of web's id under app is a new turn of app's conversation, not web's reply.
    let r = rt.block_on(app.say("shared", "w1", "replayed id", None)).unwrap();
    assert_eq!(r.turn, 2);
    // web's other token (a rotation) reaches web's conversation.
    let web2 = as_token("tok-web-0002");
    let r = rt.block_on(web2.say("shared", "w3", "after rotation", None)).unwrap();
    assert_eq!(r.turn, 3);
    // An unknown token is refused.
    let opts = ClientOptions { token: Some("tok-web-0003".into()), ..ClientOptions::default() };
    assert!(rt.block_on(Client::connect(addr, opts)).is_err());
}
