//! Bots as services: the reference Python bot service (`cluster-config/examples/services/`)
//! behind real nodes.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use botclaw_client::{FailoverClient, FailoverOptions};
use botclaw_tests::*;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(30);

/// The reference bot service, killed by pid when dropped.
struct Service {
    child: Child,
    port: u16,
}

impl Service {
    /// The reference bot service, or `None` (the test skipped) without `python3`.
    fn start() -> Option<Service> {
        Service::script("bot_service.py", &[])
    }

    /// The reference module service (weather, catalog), or `None` without `python3`.
    fn module(args: &[&str]) -> Option<Service> {
        Service::script("module_service.py", args)
    }

    fn script(name: &str, args: &[&str]) -> Option<Service> {
        if !have_tool("python3", &["--version"]) {
            return None;
        }
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../cluster-config/examples/services")
            .join(name);
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("python3 runs the reference bot service");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("listening on ").and_then(|p| p.parse().ok());
        let port = port.unwrap_or_else(|| panic!("{name} said {line:?}"));
        Some(Service { child, port })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/turn", self.port)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Switches the service's behaviour: ok, error, hang, slow.
    fn mode(&self, mode: &str) {
        let (code, _) = http_post(self.addr(), &format!("/mode/{mode}")).unwrap();
        assert_eq!(code, 200);
    }

    fn calls(&self) -> u64 {
        get_json(self.addr(), "/stats").unwrap()["calls"].as_u64().unwrap()
    }

    /// Calls a module service received for `key`.
    fn key_calls(&self, key: &str) -> u64 {
        get_json(self.addr(), "/stats").unwrap()["keys"][key].as_u64().unwrap_or(0)
    }

    fn kill(&mut self) {
        send_signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

fn bot_config(service: &Service, extra: &str) -> String {
    format!("[[bots]]\nname = \"support\"\nurls = [\"{}\"]\n{extra}", service.url())
}

#[test]
fn a_python_bot_service_keeps_its_dialogue_when_the_owner_is_killed() {
    let Some(service) = Service::start() else { return };
    let mut c = Cluster::new(3).with_config(&bot_config(&service, ""));
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    c.wait_placed(&[0, 1, 2], CONVERGE);
    if by_map() {
        // Turns are served by the map only with a majority of the controller's voters: a
        // young cluster may have two, and killing one of them would stop every turn.
        let three = poll(CONVERGE, || {
            let voters = |n: &TestNode| {
                n.status().and_then(|s| s["controller"]["voters"].as_array().map(Vec::len))
            };
            c.nodes.iter().all(|n| voters(n) == Some(3)).then_some(())
        });
        assert!(three.is_some(), "the controller never had three voters\n{}", c.logs());
    }
    let rt = runtime();
    let seeds: Vec<SocketAddr> = c.nodes.iter().map(|n| n.ports.client).collect();
    let client = rt.block_on(FailoverClient::connect(&seeds, FailoverOptions::default())).unwrap();
    let say = |id: &str, text: &str| {
        let reply = rt.block_on(client.say("svc-dialogue", id, text, Some("support"))).unwrap();
        (reply.messages.join(" "), reply.node)
    };
    assert!(say("m1", "hello").0.contains("What is your name"));
    assert!(say("m2", "I am Ada").0.contains("Nice to meet you, Ada"));
    let path = "/flags/set?name=support.beta&percent=100&bot=support";
    assert_eq!(http_post(c.nodes[0].ports.admin, path).unwrap().0, 202);
    let (ticket, owner) = say("m3", "the printer is broken");
    assert_eq!(ticket, "Ticket #1 for Ada: the printer is broken");
    // A retry of a turn already applied gets its answer, the service is not asked again.
    let calls = service.calls();
    assert_eq!(say("m3", "the printer is broken").0, ticket);
    assert_eq!(service.calls(), calls, "a retried id does not reach the service");
    // The owner dies; the state the service left lives on in the replicas.
    let victim = c.nodes.iter().position(|n| n.name == owner).unwrap();
    c.nodes[victim].kill9();
    let (next, new_owner) = say("m4", "and the screen flickers");
    assert_eq!(next, "Ticket #2 for Ada: and the screen flickers");
    assert_ne!(new_owner, owner);
    // Feature flags reach the service with each turn (set before the kill: a change needs
    // a majority of the controller's voters, and a young cluster may have only two).
    let mut asked = 0;
    let shown = poll(Duration::from_secs(10), || {
        asked += 1;
        let (text, _) = say(&format!("f{asked}"), "flags");
        text.contains("support.beta").then_some(text)
    });
    assert_eq!(shown.as_deref(), Some("flags: support.beta"));
}

/// One raw connection: `say` on the `support` bot, and the answer.
fn say_raw(stream: &mut (BufReader<TcpStream>, TcpStream), conv: &str, id: &str) -> Value {
    let line =
        serde_json::json!({"op": "say", "conv": conv, "id": id, "text": "hi", "bot": "support"});
    stream.1.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    stream.0.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn a_failing_or_hanging_bot_service_fails_turns_fast_and_its_breaker_recovers() {
    let Some(service) = Service::start() else { return };
    // The breaker stays open 4 s: long enough for the checks below on a busy machine.
    let extra =
        "timeout_ms = 600\nattempts_max = 1\nbreaker_failures = 3\nbreaker_open_ms = 4000\n";
    let mut c = Cluster::new(1).with_config(&bot_config(&service, extra));
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let s = TcpStream::connect(c.nodes[0].ports.client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut conn = (BufReader::new(s.try_clone().unwrap()), s);
    assert_eq!(say_raw(&mut conn, "svc-a", "1")["op"], "reply");

    // Errors: each turn fails at once with `unavailable` and a retry hint; three in a row
    // open the breaker, and then the service is not called at all.
    service.mode("error");
    for i in 0..3 {
        let t0 = Instant::now();
        let answer = say_raw(&mut conn, "svc-a", &format!("e{i}"));
        assert_eq!(answer["code"], "unavailable", "{answer}");
        assert!(answer["retry_after_ms"].is_u64(), "{answer}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
    let calls = service.calls();
    let answer = say_raw(&mut conn, "svc-a", "e3");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("breakers open"), "{answer}");
    assert_eq!(service.calls(), calls, "an open breaker does not call the service");
    let opened = metric(
        &c.nodes[0].metrics(),
        "botclaw_service_breakers_opened_total{kind=\"bot\",service=\"support\"}",
    );
    assert_eq!(opened, 1.0);

    // It recovers: after the open time a trial call closes the breaker.
    service.mode("ok");
    let recovered = poll(Duration::from_secs(20), || {
        let answer =
            say_raw(&mut conn, "svc-a", &format!("r{}", Instant::now().elapsed().as_nanos()));
        (answer["op"] == "reply").then_some(answer)
    });
    assert!(recovered.is_some(), "the breaker never closed");

    // A hanging service: the turn fails with `timeout` at the deadline, and the
    // conversation is untouched (the next turn continues from its state).
    service.mode("hang");
    let t0 = Instant::now();
    let answer = say_raw(&mut conn, "svc-a", "h1");
    assert_eq!(answer["code"], "timeout", "{answer}");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(5), "{took:?}");
    service.mode("ok");
    let answer = say_raw(&mut conn, "svc-a", "h1");
    assert_eq!(answer["op"], "reply", "the same id, retried, runs once the service answers");
    let history = {
        let line = serde_json::json!({"op": "history", "conv": "svc-a"});
        conn.1.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        conn.0.read_line(&mut answer).unwrap();
        serde_json::from_str::<Value>(&answer).unwrap()
    };
    let ids: Vec<&str> =
        history["turns"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids.first(), Some(&"1"));
    assert_eq!(ids.last(), Some(&"h1"));
    assert!(!ids.iter().any(|id| id.starts_with('e')), "failed turns applied nothing: {ids:?}");
}

/// A one-node cluster with `config`, a runtime and a client of it.
fn one_node(config: &str) -> (Cluster, tokio::runtime::Runtime, FailoverClient) {
    let mut c = Cluster::new(1).with_config(config);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let rt = runtime();
    let seeds = [c.nodes[0].ports.client];
    let client = rt.block_on(FailoverClient::connect(&seeds, FailoverOptions::default())).unwrap();
    (c, rt, client)
}

fn modules_config(services: &[&Service], extra: &str) -> String {
    let urls: Vec<String> =
        services.iter().map(|s| format!("\"http://127.0.0.1:{}/call\"", s.port)).collect();
    format!("[[modules]]\nname = \"weather\"\nurls = [{}]\n{extra}", urls.join(", "))
}

#[test]
fn three_module_instances_share_the_load_and_losing_one_loses_no_turn() {
    let (Some(a), Some(b), Some(mut dead)) =
        (Service::module(&[]), Service::module(&[]), Service::module(&[]))
    else {
        return;
    };
    // No max-age and no default TTL: every turn calls the module service.
    let extra = "health_path = \"/health\"\nhealth_interval_ms = 200\nattempts_max = 3\n";
    let (c, rt, client) = one_node(&modules_config(&[&a, &b, &dead], extra));
    // 16 conversations at once, so calls overlap and the balancing has choices to make.
    let run = |from: usize, to: usize| {
        rt.block_on(async {
            let turns = (from..to).map(|i| {
                let client = &client;
                async move {
                    let conv = format!("mod-{}", i % 16);
                    let text = format!("weather in City{i}");
                    let reply = client.say(&conv, &format!("w{i}"), &text, Some("weather")).await;
                    (i, reply)
                }
            });
            let mut failed = Vec::new();
            for (i, reply) in futures::future::join_all(turns).await {
                match reply {
                    Ok(r) if r.messages.join(" ").contains(&format!("City{i}:")) => {}
                    other => failed.push(format!("turn {i}: {other:?}")),
                }
            }
            failed
        })
    };
    let failed = run(0, 900);
    assert!(failed.is_empty(), "{failed:?}");
    let calls = [a.calls(), b.calls(), dead.calls()];
    let mean = calls.iter().sum::<u64>() as f64 / 3.0;
    assert!(mean >= 300.0, "every turn called a module instance: {calls:?}");
    for n in calls {
        let off = (n as f64 - mean).abs() / mean;
        assert!(off <= 0.2, "instances share the load within 20%: {calls:?}");
    }
    // One instance dies: no turn is lost (retried on another instance, then ejected).
    dead.kill();
    let before = [a.calls(), b.calls()];
    let failed = run(900, 1200);
    assert!(failed.is_empty(), "killing an instance lost turns: {failed:?}");
    let after = [a.calls(), b.calls()];
    assert!(after[0] + after[1] - before[0] - before[1] >= 300, "{before:?} {after:?}");
    let m = c.nodes[0].metrics();
    let down = "botclaw_service_instances_down{kind=\"module\",service=\"weather\"}";
    let shown = poll(Duration::from_secs(10), || {
        (metric(&c.nodes[0].metrics(), down) == 1.0).then_some(())
    });
    assert!(shown.is_some(), "health checks take the dead instance out\n{m}");
}

#[test]
fn the_module_cache_calls_a_service_once_per_max_age_and_coalesces() {
    let Some(module) = Service::module(&["--max-age", "3"]) else { return };
    let Some(bot) = Service::start() else { return };
    let config = format!("{}\n{}", modules_config(&[&module], ""), bot_config(&bot, ""));
    let (c, rt, client) = one_node(&config);
    let ask = |convs: std::ops::Range<usize>, city: &'static str, round: &str| {
        rt.block_on(async {
            let turns = convs.map(|i| {
                let client = &client;
                let id = format!("{round}-{i}");
                async move {
                    let text = format!("weather in {city}");
                    client.say(&format!("cache-{i}"), &id, &text, Some("weather")).await
                }
            });
            for reply in futures::future::join_all(turns).await {
                assert!(reply.unwrap().messages.join(" ").starts_with(city));
            }
        })
    };
    // 50 conversations ask at once: one call, the others wait for it or hit the cache.
    let t0 = Instant::now();
    ask(0..50, "Oslo", "a");
    // The call was made before this: its answer is stale 3 s from now at the latest.
    let asked = Instant::now();
    ask(50..100, "Oslo", "b");
    let within_age = t0.elapsed() < Duration::from_secs(3);
    if within_age {
        assert_eq!(module.key_calls("oslo"), 1, "one call per key within max-age");
    }
    let m = c.nodes[0].metrics();
    let label = "{kind=\"module\",service=\"weather\"}";
    let hits = metric(&m, &format!("botclaw_module_cache_hits_total{label}"));
    let coalesced = metric(&m, &format!("botclaw_module_cache_coalesced_total{label}"));
    let misses = metric(&m, &format!("botclaw_module_cache_misses_total{label}"));
    assert_eq!(hits + coalesced + misses, 100.0, "{m}");
    assert!(misses >= 1.0 && hits >= 1.0, "{m}");
    // After max-age, the next ask calls again, once.
    let calls = module.key_calls("oslo");
    std::thread::sleep(Duration::from_millis(3200).saturating_sub(asked.elapsed()));
    ask(100..120, "Oslo", "c");
    assert_eq!(module.key_calls("oslo"), calls + 1, "one more call after max-age");
    // A bot service reaches the module through a round of module calls, and the cache.
    let reply = rt.block_on(client.say("cache-bot", "1", "weather in Oslo", Some("support")));
    let text = reply.unwrap().messages.join(" ");
    assert!(text.starts_with("Oslo: ") && text.contains("says the weather module"), "{text}");
    assert_eq!(module.key_calls("oslo"), calls + 1, "the bot's call hit the cache");
    let reply = rt.block_on(client.say("cache-bot", "2", "weather in Lima", Some("support")));
    assert!(reply.unwrap().messages.join(" ").starts_with("Lima: "));
    assert_eq!(module.key_calls("lima"), 1);
}
