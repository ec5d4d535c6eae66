//! Nodes on separate hosts (a network namespace each, see `botclaw_tests::hosts`), started
//! the way operators start them on real machines: default ports bound on every interface,
//! no `--name`, seeds by hostname, settings from the environment.

use std::time::{Duration, Instant};

use botclaw_client::{FailoverClient, FailoverOptions};
use botclaw_tests::hosts::{Hosts, ADMIN_PORT, CLIENT_PORT, GOSSIP_PORT};
use botclaw_tests::{by_map, checker::runtime, get_json, http_get, metric, poll, SECRET};

/// The hosts, or `None` (with the reason printed) where they cannot be made; in CI they
/// must be.
fn hosts(n: usize) -> Option<Hosts> {
    if !by_map() {
        eprintln!("skipped: deployment tests run by the map only");
        return None;
    }
    match Hosts::new(n) {
        Ok(h) => Some(h),
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: {why}");
            None
        }
        Err(why) => panic!("multi-host tests must run in CI: {why}"),
    }
}

/// The config file every node shares: the secret in a file, an admin token (the admin
/// port listens on every interface), the cluster CA (each node's certificate comes from
/// its environment, see [`tls_env`]).
fn common_config(h: &Hosts) -> String {
    let secret = h.write("secret", SECRET);
    let tls = h.dir.path().join("tls");
    let made = std::process::Command::new(botclaw_tests::botclaw_bin())
        .args(["tls", "init", "--dir"])
        .arg(&tls)
        .args(["--name", "h1", "--name", "h2", "--name", "h3", "--name", "box"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let text = format!(
        "secret_file = {secret:?}\n[admin]\ntokens = [\"admin-token\"]\n[tls]\nca_file = {:?}\n\
         [placement]\nshard_count = 1024\n",
        tls.join("ca.pem")
    );
    h.write("node.toml", &text).display().to_string()
}

/// A node's certificate, by the environment.
fn tls_env(h: &Hosts, name: &str) -> [(String, String); 2] {
    let file = |suffix: &str| {
        h.dir.path().join("tls").join(format!("{name}{suffix}")).display().to_string()
    };
    [
        ("BOTCLAW_TLS__CERT_FILE".to_string(), file(".pem")),
        ("BOTCLAW_TLS__KEY_FILE".to_string(), file("-key.pem")),
    ]
}

/// `botclaw node` arguments of a node as operators write them: every port on 0.0.0.0,
/// no name, no advertise address.
fn args<'a>(config: &'a str, data_dir: &'a str, seeds: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--config",
        config,
        "--data-dir",
        data_dir,
        "--client-addr",
        "0.0.0.0:7000",
        "--cluster-addr",
        "0.0.0.0:7001",
        "--gossip-addr",
        "0.0.0.0:7002",
        "--admin-addr",
        "0.0.0.0:7003",
    ];
    for s in seeds {
        a.extend(["--seed", s]);
    }
    a
}

const CONVERGE: Duration = Duration::from_secs(60);

/// Members node `i`'s admin port lists as up, with their advertised gossip addresses.
fn up_members(h: &Hosts, i: usize) -> Option<Vec<(String, String)>> {
    let status = get_json(h.addr(i, ADMIN_PORT), "/status")?;
    let mut up: Vec<(String, String)> = status["members"]
        .as_array()?
        .iter()
        .filter(|m| m["state"] == "up")
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("").to_string(),
                m["gossip_addr"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    up.sort();
    Some(up)
}

/// Host `i`'s incarnation as host h2 sees it.
fn incarnation(h: &Hosts, i: usize) -> Option<u64> {
    let status = get_json(h.addr(1, ADMIN_PORT), "/status")?;
    let name = format!("h{}", i + 1);
    status["members"].as_array()?.iter().find(|m| m["name"] == name)?["incarnation"].as_u64()
}

/// Waits until every host agrees on a settled map: every shard with its replicas, no move
/// in flight or planned.
fn placed(h: &Hosts) -> bool {
    poll(Duration::from_secs(180), || {
        let mut settled_by_leader = false;
        let versions: Option<Vec<u64>> = (0..3)
            .map(|i| {
                let s = get_json(h.addr(i, ADMIN_PORT), "/status")?;
                let c = &s["controller"];
                settled_by_leader |= c["plan_settled"] == true;
                let keys = [
                    "moves_in_flight",
                    "shards_unassigned",
                    "shards_unavailable",
                    "shards_under_replicated",
                ];
                keys.iter().all(|k| c[k] == 0).then(|| c["map_version"].as_u64()).flatten()
            })
            .collect();
        versions.filter(|v| settled_by_leader && v.windows(2).all(|w| w[0] == w[1]))
    })
    .is_some()
}

fn ready(h: &Hosts, i: usize) -> Option<(u16, String)> {
    http_get(h.addr(i, ADMIN_PORT), "/health/ready")
}

#[test]
fn defaults_on_three_hosts_form_one_cluster_that_survives_a_restart_and_a_pulled_cable() {
    let Some(mut h) = hosts(3) else { return };
    let config = common_config(&h);
    let dirs: Vec<String> =
        (1..=3).map(|i| h.data_dir(&format!("d{i}")).display().to_string()).collect();
    // h1 founds; h2 joins by a seed name; h3 takes its seeds (two names) and its log
    // format from the environment.
    let a1 = args(&config, &dirs[0], &[]);
    let a2 = args(&config, &dirs[1], &["h1:7002"]);
    let a3 = args(&config, &dirs[2], &[]);
    let env = |name: &str, extra: &[(&str, &str)]| {
        let mut env: Vec<(String, String)> = tls_env(&h, name).into();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    };
    let env3 = env("h3", &[("BOTCLAW_SEEDS", "h1:7002,h2:7002"), ("BOTCLAW_LOG_FORMAT", "json")]);
    let (env1, env2) = (env("h1", &[]), env("h2", &[]));
    let n1 = h.add(0, "h1", &a1, &env1);
    let n2 = h.add(1, "h2", &a2, &env2);
    let n3 = h.add(2, "h3", &a3, &env3);
    let started = Instant::now();
    for k in [n1, n2, n3] {
        h.start(k);
    }
    let expected: Vec<(String, String)> =
        (0..3).map(|i| (format!("h{}", i + 1), h.addr(i, GOSSIP_PORT).to_string())).collect();
    let converged = poll(CONVERGE, || {
        (0..3).all(|i| up_members(&h, i).as_ref() == Some(&expected)).then_some(())
    });
    assert!(
        converged.is_some(),
        "the hosts did not converge on {expected:?}; h1 sees {:?}",
        up_members(&h, 0)
    );
    let converged_after = started.elapsed();
    let all_ready = poll(CONVERGE, || {
        (0..3).all(|i| ready(&h, i).is_some_and(|(c, _)| c == 200)).then_some(())
    });
    assert!(
        all_ready.is_some(),
        "not every host is ready: {:?}",
        (0..3).map(|i| ready(&h, i)).collect::<Vec<_>>()
    );
    // h3 logged JSON lines.
    let json_lines = h.log(n3).lines().filter(|l| l.starts_with('{')).count();
    let joined = h.log(n3).lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .is_ok_and(|v| v["fields"]["message"] == "joined the cluster")
    });
    assert!(json_lines > 5 && joined, "h3's log is not JSON lines:\n{}", h.log(n3));

    // A client of h3 runs turns (most forwarded between hosts); the topology it learns
    // holds the hosts' real addresses.
    let rt = runtime();
    let convs: Vec<String> = (0..30).map(|k| format!("hosts-{k}")).collect();
    let opts = FailoverOptions { retry_for: Duration::from_secs(90), ..FailoverOptions::default() };
    let seeds = [h.addr(2, CLIENT_PORT), h.addr(0, CLIENT_PORT), h.addr(1, CLIENT_PORT)];
    let client = rt.block_on(FailoverClient::connect(&seeds, opts)).expect("client connects to h3");
    let say = |round: u32| {
        for conv in &convs {
            let id = format!("{conv}-{round}");
            let reply = rt.block_on(client.say(conv, &id, &format!("turn {round}"), Some("echo")));
            let reply = reply.unwrap_or_else(|e| panic!("{conv} round {round}: {e}"));
            assert_eq!(reply.turn, u64::from(round), "{conv}");
        }
    };
    say(1);
    let topology = rt.block_on(client.topology()).unwrap();
    let mut advertised: Vec<String> = topology.iter().map(|n| n.client_addr.clone()).collect();
    advertised.sort();
    let hosts_clients: Vec<String> = (0..3).map(|i| h.addr(i, CLIENT_PORT).to_string()).collect();
    assert_eq!(advertised, hosts_clients, "topology must advertise reachable client addresses");

    // h1, the founder, started without seeds, is killed and restarted with the same
    // command: it joins the members it remembers, nothing is lost, nothing is forked.
    let before = up_members(&h, 1).unwrap();
    let old = incarnation(&h, 0).unwrap();
    let restarted = Instant::now();
    h.kill9(n1);
    h.start(n1);
    let back = poll(CONVERGE, || {
        let fresh = incarnation(&h, 0).is_some_and(|i| i > old);
        (fresh && up_members(&h, 1) == Some(before.clone()) && ready(&h, 0)?.0 == 200).then_some(())
    });
    assert!(back.is_some(), "h1 did not rejoin after a restart with its first command");
    let back_after = restarted.elapsed();
    assert!(
        h.log(n1).contains("joining the members remembered from the last run"),
        "h1 did not say how it rejoined"
    );
    say(2);
    // h1 came back as a new member: its replicas are streamed back before another fault
    // (R = 2 tolerates one at a time).
    assert!(placed(&h), "the placement did not settle after h1's restart");

    // h3's cable is pulled: its client moves to another host and its turns go on there.
    let pulled = Instant::now();
    h.cable(2, false);
    say(3);
    let served_after = pulled.elapsed();
    let now_on = rt.block_on(client.node());
    assert_ne!(now_on, "h3", "the client stayed on the cut-off host");
    let down = poll(CONVERGE, || up_members(&h, 0).is_some_and(|m| m.len() == 2).then_some(()));
    assert!(down.is_some(), "h1 still sees h3 up after its cable was pulled");
    let down_after = pulled.elapsed();
    let plugged = Instant::now();
    h.cable(2, true);
    let rejoined = poll(CONVERGE, || {
        (up_members(&h, 0).as_ref() == Some(&expected) && ready(&h, 2)?.0 == 200).then_some(())
    });
    assert!(rejoined.is_some(), "h3 did not come back once its cable was plugged in");
    eprintln!(
        "converged {converged_after:?}; h1 back and ready {back_after:?} after its \
         restart; cable pulled: 30 turns served elsewhere after {served_after:?}, h3 down at \
         h1 after {down_after:?}; plugged: h3 up and ready after {:?}",
        plugged.elapsed()
    );
    say(4);
    // Every acknowledged turn is there, once.
    for conv in &convs {
        let turns = rt.block_on(client.history(conv, None)).expect("history");
        let numbers: Vec<u64> = turns.iter().map(|t| t.turn).collect();
        assert_eq!(numbers, [1, 2, 3, 4], "{conv}");
    }
}

#[test]
fn a_seeded_node_alone_says_why_and_a_taken_name_stops_the_later_node() {
    let Some(mut h) = hosts(2) else { return };
    let config = common_config(&h);
    let (d1, d2) = (h.data_dir("d1").display().to_string(), h.data_dir("d2").display().to_string());
    // Two machines that share a hostname, started with defaults: the same default name.
    let env: Vec<(String, String)> = tls_env(&h, "box").into();
    let first = h.add(1, "box", &args(&config, &d2, &["h1:7002", "nowhere.invalid:7002"]), &env);
    // It has no seed to derive its address from and "box" is no name in DNS: it is told.
    let mut second_args = args(&config, &d1, &[]);
    second_args.extend(["--advertise-host", "h1"]);
    let second = h.add(0, "box", &second_args, &env);
    h.start(first);
    // Alone with seeds nobody answers: not ready, and it says why.
    let why = poll(Duration::from_secs(30), || {
        let (code, body) = ready(&h, 1)?;
        let unanswered = http_get(h.addr(1, ADMIN_PORT), "/metrics")
            .map(|(_, m)| metric(&m, "botclaw_cluster_warnings_total{reason=\"seeds_unanswered\"}"))
            .unwrap_or(0.0);
        (code == 503 && body.contains("not joined") && unanswered >= 1.0).then_some(body)
    });
    assert!(why.is_some(), "a lone seeded node must be unready and say why: {:?}", ready(&h, 1));
    let log = h.log(first);
    assert!(log.contains("no member answered"), "the unanswered seeds were not logged:\n{log}");
    assert!(log.contains("nowhere.invalid"), "the unresolved seed name was not logged:\n{log}");

    // The second "box" founds on h1; the two meet; the one that started later stops.
    h.start(second);
    let exit = h.wait_exit(second, Duration::from_secs(60));
    assert_eq!(exit.and_then(|s| s.code()), Some(78), "the later namesake must stop (EX_CONFIG)");
    assert!(h.log(second).contains("names must be unique"), "{}", h.log(second));
    assert!(
        poll(Duration::from_secs(10), || h
            .log(first)
            .contains("claims this node's name")
            .then_some(()))
        .is_some(),
        "the earlier namesake did not warn"
    );
    assert!(
        h.nodes[first].child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the earlier node must keep running"
    );
}
