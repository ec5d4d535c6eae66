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
