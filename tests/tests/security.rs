//! Hostile input against real processes: the admin port's guard.

use std::process::Command;
use std::time::Duration;

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
    // Nothing changed: the node still serves, read-only endpoints stay open.
    assert_eq!(http_get(admin, "/health/ready").map(|(code, _)| code), Some(200));
    let metrics = c.nodes[0].metrics();
    assert_eq!(metric(&metrics, "botclaw_admin_requests_refused_total{reason=\"token\"}"), 3.0);
    assert_eq!(
        metric(&metrics, "botclaw_admin_requests_refused_total{reason=\"cross-origin\"}"),
        1.0
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

/// A client that asks for large answers and never reads them is cut off once its answers
/// cannot be written for `write_timeout_ms`, and the node keeps serving others.
#[test]
fn a_client_that_does_not_read_is_cut_off() {
    use std::io::{BufRead, BufReader, Write};
    let mut c = Cluster::new(1).with_config("[frontend]\nwrite_timeout_ms = 500\n");
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let addr = c.nodes[0].ports.client;
    // A conversation of 20 turns of 50 KB: each history answer is about 2 MB (echoed).
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let text = "x".repeat(50_000);
    for i in 0..20 {
        let say = format!(
            "{{\"op\":\"say\",\"conv\":\"big\",\"id\":\"{i}\",\"text\":\"{text}\",\"bot\":\"echo\"}}\n"
        );
        s.write_all(say.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("\"reply\""), "{}", &line[..line.len().min(200)]);
    }
    // Another socket asks for it 50 times and reads nothing.
    let mut greedy = std::net::TcpStream::connect(addr).unwrap();
    for _ in 0..50 {
        if greedy.write_all(b"{\"op\":\"history\",\"conv\":\"big\"}\n").is_err() {
            break;
        }
    }
    let cut = poll(Duration::from_secs(30), || {
        let m = c.nodes[0].metrics();
        let n = metric(&m, "botclaw_client_connections_timed_out_total{reason=\"write\"}");
        (n >= 1.0).then_some(())
    });
    assert!(cut.is_some(), "the non-reading client was not cut off");
    // The first client is still served.
    s.write_all(b"{\"op\":\"say\",\"conv\":\"small\",\"id\":\"1\",\"text\":\"hi\"}\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"reply\""), "{line}");
}
