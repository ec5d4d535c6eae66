//! The alert rules and the Grafana dashboard in `cluster-config/`, against a real
//! Prometheus (Debian's `prometheus`) scraping a cluster that `botclaw up --prometheus`
//! launched: the rules pass `promtool check rules` and load healthy, every dashboard query
//! returns data, every alert expression evaluates and what it compares with its threshold
//! returns data, and a killed node fires its alert.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use botclaw_client::{FailoverClient, FailoverOptions};
use botclaw_tests::*;
use serde_json::Value;

/// Kills every process it holds by pid when dropped.
struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for child in &mut self.0 {
            send_signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// An alert expression's measured side: the expression without its threshold (and
/// without an `or absent(...)` fallback).
fn measured(expr: &str) -> &str {
    let expr = expr.split(" or ").next().unwrap_or(expr);
    for op in [" == ", " != ", " >= ", " <= ", " > ", " < "] {
        if let Some((side, threshold)) = expr.rsplit_once(op) {
            if threshold.trim().parse::<f64>().is_ok() {
                return side;
            }
        }
    }
    expr
}

/// Prometheus's instant query API (ureq encodes the query).
fn query(prom: SocketAddr, q: &str) -> Option<Value> {
    let mut resp =
        ureq::get(&format!("http://{prom}/api/v1/query")).query("query", q).call().ok()?;
    serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()
}

#[test]
fn prometheus_scrapes_the_cluster_and_the_node_down_alert_fires() {
    if !have_tool("prometheus", &["--version"]) || !have_tool("promtool", &["--version"]) {
        eprintln!("skipped: no prometheus/promtool (CI installs Debian's prometheus)");
        return;
    }
    let rules = repo("cluster-config/prometheus/botclaw-alerts.yml");
    let out = Command::new("promtool").arg("check").arg("rules").arg(&rules).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    let dir = tempfile::tempdir().unwrap();
    let base = free_port_block(30);
    let mut up = Command::new(botclaw_bin())
        .args(["up", "--nodes", "3", "--ephemeral", "--plaintext", "--prometheus"])
        .args(["--log-format", "json"])
        .args(["--base-port", &base.to_string(), "--data-dir"])
        .arg(dir.path())
        .env_remove("BOTCLAW_SECRET")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(up.stdout.take().unwrap());
    let mut reaper = Reaper(vec![up]);
    let mut said = Vec::new();
    let mut lines = stdout.lines().map_while(Result::ok);
    for line in lines.by_ref() {
        let done = line.contains("stop:");
        said.push(line);
        if done {
            break;
        }
    }
    // Keep reading, so `up` can still write (a closed pipe would kill it).
    std::thread::spawn(move || lines.for_each(drop));
    let config = dir.path().join("prometheus/prometheus.yml");
    assert!(said.iter().any(|l| l.contains("prometheus --config.file=")), "{said:#?}");
    assert!(config.exists(), "up --prometheus wrote no config: {said:#?}");
    // `--log-format json` reached the nodes: every line of their logs is a JSON object.
    let log = std::fs::read_to_string(dir.path().join("node-0/node.log")).unwrap();
    assert!(log.lines().count() > 2, "{log}");
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    let admin = |i: u16| SocketAddr::from(([127, 0, 0, 1], base + 10 * i + 3));
    let client = |i: u16| SocketAddr::from(([127, 0, 0, 1], base + 10 * i));

    let prom = SocketAddr::from(([127, 0, 0, 1], free_port_block(1)));
    let prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address={prom}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    reaper.0.push(prometheus);
    let ready = poll(Duration::from_secs(30), || http_get(prom, "/-/ready").filter(|r| r.0 == 200));
    assert!(ready.is_some(), "prometheus never got ready");

    // Load through every node (echo and weather turns), until the test ends.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let seeds = vec![client(0), client(1), client(2)];
        std::thread::spawn(move || {
            runtime().block_on(async {
                let Ok(c) = FailoverClient::connect(&seeds, FailoverOptions::default()).await
                else {
                    return;
                };
                for i in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let (bot, text) =
                        if i % 4 == 0 { ("weather", "weather in Oslo") } else { ("echo", "hi") };
                    let conv = format!("prom-{}-{bot}", i % 30);
                    let _ = c.say(&conv, &format!("m{i}"), text, Some(bot)).await;
                }
            })
        })
    };

    // Every node is scraped.
    let scraped = poll(Duration::from_secs(60), || {
        let v = query(prom, "up{job=\"botclaw\"} == 1")?;
        (v["data"]["result"].as_array()?.len() == 3).then_some(())
    });
    assert!(scraped.is_some(), "prometheus does not scrape the three nodes");

    // Every dashboard query returns data.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("cluster-config/grafana/botclaw-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut empty = Vec::new();
    for expr in &exprs {
        let data = poll(Duration::from_secs(60), || {
            let v = query(prom, expr)?;
            (v["status"] == "success" && !v["data"]["result"].as_array()?.is_empty()).then_some(())
        });
        if data.is_none() {
            empty.push(expr.clone());
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data: {empty:#?}");

    // The rules loaded healthy, and every alert expression evaluates.
    let rules = get_json(prom, "/api/v1/rules").expect("rules");
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    assert_eq!(loaded.len(), 10, "{rules}");
    for rule in &loaded {
        assert_eq!(rule["health"], "ok", "{rule}");
        let expr = rule["query"].as_str().unwrap();
        let v = query(prom, expr).expect("query answers");
        assert_eq!(v["status"], "success", "{}: {v}", rule["name"]);
        // A healthy cluster fires none of them, so what each compares with its threshold
        // must return data (a misspelt metric or label would return nothing).
        let side = measured(expr);
        assert_ne!(side, expr, "{}: no threshold found in {expr}", rule["name"]);
        let data = poll(Duration::from_secs(60), || {
            let v = query(prom, side)?;
            (!v["data"]["result"].as_array()?.is_empty()).then_some(())
        });
        assert!(data.is_some(), "{}: {side} returns no data", rule["name"]);
    }

    // A node dies: its alert fires.
    let victim = admin(2);
    let pid = get_json(victim, "/status").unwrap()["pid"].as_u64().unwrap() as u32;
    send_signal(pid, libc::SIGKILL);
    let fired = poll(Duration::from_secs(90), || {
        let alerts = get_json(prom, "/api/v1/alerts")?;
        alerts["data"]["alerts"].as_array()?.iter().find_map(|a| {
            (a["labels"]["alertname"] == "BotclawNodeDown"
                && a["labels"]["instance"] == victim.to_string()
                && a["state"] == "firing")
                .then_some(())
        })
    });
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    assert!(fired.is_some(), "BotclawNodeDown never fired for {victim}");
    // No other node's alert fired.
    let alerts = get_json(prom, "/api/v1/alerts").unwrap();
    for a in alerts["data"]["alerts"].as_array().unwrap() {
        if a["labels"]["alertname"] == "BotclawNodeDown" {
            assert_eq!(a["labels"]["instance"], victim.to_string(), "{a}");
        }
    }
    // up stops its nodes (and is reaped with Prometheus).
    send_signal(reaper.0[0].id(), libc::SIGTERM);
    let _ = poll(Duration::from_secs(20), || reaper.0[0].try_wait().ok().flatten());
}
