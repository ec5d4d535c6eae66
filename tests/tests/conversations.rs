//! Multi-process conversations: sharding, forwarding, exactly-once replies for retried
//! ids, bot failures contained, passivation, protocol robustness and backpressure.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use botclaw_client::protocol::{ErrorCode, Request};
use botclaw_client::{Client, ClientError, ClientOptions};
use botclaw_tests::*;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(20);

/// Fault injection on: the `chaos` bot is offered.
const DIAGNOSTIC: &str = "[fault]\ninjection = true\n";

async fn clients(c: &Cluster) -> Vec<Arc<Client>> {
    let mut out = Vec::new();
    for node in &c.nodes {
        let client = Client::connect(node.ports.client, ClientOptions::default()).await.unwrap();
        assert_eq!(client.node(), node.name);
        out.push(Arc::new(client));
    }
    out
}

/// Waits until every node's placement agrees on the owner of `conv` (the one it routes to)
/// and returns it.
fn agreed_owner(c: &Cluster, conv: &str) -> String {
    let owner = poll(Duration::from_secs(10), || {
        let owners: Vec<Value> = c
            .nodes
            .iter()
            .map(|n| {
                get_json(n.ports.admin, &format!("/placement?conv={conv}"))
                    .map(|v| v["routed_owner"].clone())
            })
            .collect::<Option<_>>()?;
        (owners.iter().all(|o| *o == owners[0]) && owners[0].is_string()).then(|| owners[0].clone())
    });
    owner.expect("nodes never agreed on an owner").as_str().unwrap().to_string()
}

#[test]
fn thousands_of_conversations_through_every_gateway() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    const CONVS: usize = 2000;
    const TURNS: u64 = 4;
    // Every node computes the same owner; remember it per conversation.
    let owners: Vec<String> = (0..CONVS).map(|k| agreed_owner(&c, &format!("conv-{k}"))).collect();
    let mut per_owner: HashMap<&str, usize> = HashMap::new();
    for o in &owners {
        *per_owner.entry(o.as_str()).or_default() += 1;
    }
    assert_eq!(per_owner.len(), 3, "every node owns some conversations: {per_owner:?}");

    let rt = runtime();
    let results = rt.block_on(async {
        let clients = clients(&c).await;
        let limit = Arc::new(tokio::sync::Semaphore::new(256));
        let mut tasks = Vec::new();
        for k in 0..CONVS {
            let clients = clients.clone();
            let limit = limit.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let conv = format!("conv-{k}");
                let mut seen = Vec::new();
                for t in 0..TURNS {
                    // Each turn through a different gateway.
                    let client = &clients[(k + t as usize) % clients.len()];
                    let text = format!("{conv} says {t}");
                    let reply =
                        client.say(&conv, &format!("m-{t}"), &text, Some("echo")).await.unwrap();
                    assert_eq!(reply.messages, vec![text]);
                    seen.push((reply.turn, reply.node));
                }
                seen
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (k, seen) in results.iter().enumerate() {
        let turns: Vec<u64> = seen.iter().map(|(t, _)| *t).collect();
        assert_eq!(turns, (1..=TURNS).collect::<Vec<_>>(), "conv-{k} turn numbers");
        for (_, node) in seen {
            assert_eq!(node, &owners[k], "conv-{k} ran on {node}, owner is {}", owners[k]);
        }
    }
    // Two of three turns of a conversation arrive at a node that does not own it.
    let forwards: f64 =
        c.nodes.iter().map(|n| metric(&n.metrics(), "botclaw_forwards_total")).sum();
    assert!(forwards >= (CONVS as f64) * 2.0, "forwards: {forwards}");
    let turns: f64 = c.nodes.iter().map(|n| metric(&n.metrics(), "botclaw_turns_total")).sum();
    assert_eq!(turns, (CONVS as u64 * TURNS) as f64);
}

#[test]
fn retried_id_is_applied_once_and_history_shows_it() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let rt = runtime();
    rt.block_on(async {
        let clients = clients(&c).await;
        let first = clients[0].say("retry-1", "m-1", "hello", None).await.unwrap();
        assert_eq!(first.turn, 1);
        // The same id again, through every gateway: the original reply, no new turn.
        for client in &clients {
            let again = client.say("retry-1", "m-1", "hello (resent)", None).await.unwrap();
            assert_eq!(again, first);
        }
        let second = clients[2].say("retry-1", "m-2", "next", None).await.unwrap();
        assert_eq!(second.turn, 2);
        let history = clients[1].history("retry-1", Some(10)).await.unwrap();
        let ids: Vec<&str> = history.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, vec!["m-1", "m-2"]);
        assert_eq!(history[0].text, "hello");
    });
    let dups: f64 =
        c.nodes.iter().map(|n| metric(&n.metrics(), "botclaw_turn_duplicates_total")).sum();
    assert_eq!(dups, 3.0);
}

#[test]
fn bot_panic_is_contained() {
    let mut c = Cluster::new(3).with_config(DIAGNOSTIC);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let owner = agreed_owner(&c, "chaos-1");
    let rt = runtime();
    rt.block_on(async {
        let clients = clients(&c).await;
        let bot = Some("chaos");
        assert_eq!(
            clients[0].say("chaos-1", "1", "a", bot).await.unwrap().messages,
            vec!["ok #1: a"]
        );
        // A bystander conversation on the same node, mid-way through its own dialogue.
        let mut k = 0;
        let bystander = loop {
            let conv = format!("bystander-{k}");
            if agreed_owner(&c, &conv) == owner {
                break conv;
            }
            k += 1;
        };
        assert_eq!(clients[1].say(&bystander, "1", "x", bot).await.unwrap().turn, 1);
        for (id, text) in [("2", "panic"), ("3", "error")] {
            match clients[0].say("chaos-1", id, text, bot).await {
                Err(ClientError::Server { code: ErrorCode::Internal, message, .. }) => {
                    assert!(message.contains("chaos"), "{message}")
                }
                other => panic!("expected internal, got {other:?}"),
            }
        }
        // The conversation restarted from its committed state: the failed turns left no
        // trace (the chaos bot adds 1000 to its counter before failing).
        let after = clients[2].say("chaos-1", "4", "b", bot).await.unwrap();
        assert_eq!((after.turn, after.messages), (2, vec!["ok #2: b".to_string()]));
        assert_eq!(
            clients[0].say(&bystander, "2", "y", bot).await.unwrap().messages,
            vec!["ok #2: y"]
        );
    });
    let node = c.nodes.iter().find(|n| n.name == owner).unwrap();
    // The panic is one log line with its text quoted and escaped (it may hold client
    // input), not the default hook's raw text.
    let log = tail(&node.log, 200_000);
    assert!(log.contains("\"chaos bot asked to panic in conversation chaos-1\""), "{log}");
    assert!(!log.contains("panicked at"), "a raw panic message in the log");
    let m = node.metrics();
    assert_eq!(metric(&m, "botclaw_bot_errors_total"), 2.0);
    assert_eq!(metric(&m, "botclaw_conversation_restarts_total"), 2.0);
}

#[test]
fn idle_conversation_passivates_and_resumes() {
    let mut c = Cluster::new(1).with_config("[conversations]\nidle_passivate_ms = 300\n");
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let rt = runtime();
    let client =
        rt.block_on(Client::connect(c.nodes[0].ports.client, ClientOptions::default())).unwrap();
    let shop = Some("shop");
    let r = rt.block_on(client.say("idle-1", "1", "I want to return an order", shop)).unwrap();
    assert!(r.messages[0].contains("order number"));
    let passivated = poll(Duration::from_secs(10), || {
        let m = c.nodes[0].metrics();
        (metric(&m, "botclaw_passivations_total") >= 1.0
            && metric(&m, "botclaw_active_conversations") == 0.0)
            .then_some(())
    });
    assert!(passivated.is_some(), "conversation never passivated:\n{}", c.nodes[0].metrics());
    // Resumes mid-dialogue: the shop bot still waits for the order number.
    let r = rt.block_on(client.say("idle-1", "2", "it is 98765", None)).unwrap();
    assert_eq!(r.turn, 2);
    assert!(r.messages[0].contains("#98765"), "{:?}", r.messages);
    assert_eq!(metric(&c.nodes[0].metrics(), "botclaw_activations_total"), 2.0);
}

fn raw(c: &Cluster) -> (BufReader<TcpStream>, TcpStream) {
    raw_to(c, 0)
}

fn raw_to(c: &Cluster, node: usize) -> (BufReader<TcpStream>, TcpStream) {
    let s = TcpStream::connect(c.nodes[node].ports.client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (BufReader::new(s.try_clone().unwrap()), s)
}

fn read_json(r: &mut BufReader<TcpStream>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn junk_from_clients_gets_clear_errors_and_the_connection_stays_usable() {
    let mut c = Cluster::new(1);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let (mut r, mut w) = raw(&c);
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"this is not json\n".to_vec(), "bad_request", "invalid request"),
        (b"{\"op\":\"fly\"}\n".to_vec(), "bad_request", "unknown op"),
        (
            b"{\"op\":\"say\",\"conv\":\"c\",\"id\":\"7\"}\n".to_vec(),
            "bad_request",
            "missing field `text`",
        ),
        (
            b"{\"op\":\"say\",\"conv\":\"c\",\"id\":\"8\",\"text\":\"\xff\xfe\"}\n".to_vec(),
            "bad_request",
            "UTF-8",
        ),
        ([vec![b'x'; 70_000], b"\n".to_vec()].concat(), "too_large", "longer than"),
        (
            b"{\"op\":\"say\",\"conv\":\"c\",\"id\":\"9\",\"text\":\"t\",\"bot\":\"nope\"}\n"
                .to_vec(),
            "bad_request",
            "unknown bot",
        ),
        // Ids: bounded, no control characters (they reach logs and other nodes).
        (
            format!(
                "{{\"op\":\"say\",\"conv\":\"{}\",\"id\":\"1\",\"text\":\"t\"}}\n",
                "c".repeat(257)
            )
            .into_bytes(),
            "bad_request",
            "field `conv` is longer than 256 bytes",
        ),
        (
            b"{\"op\":\"say\",\"conv\":\"a\\nINFO forged\",\"id\":\"1\",\"text\":\"t\"}\n".to_vec(),
            "bad_request",
            "field `conv` holds control characters",
        ),
        (
            b"{\"op\":\"say\",\"conv\":\"c\",\"id\":\"\\u001b[2J\",\"text\":\"t\"}\n".to_vec(),
            "bad_request",
            "field `id` holds control characters",
        ),
        (
            b"{\"op\":\"history\",\"conv\":\"\"}\n".to_vec(),
            "bad_request",
            "field `conv` must not be empty",
        ),
        // The diagnostic bot exists only where fault injection is on.
        (
            b"{\"op\":\"say\",\"conv\":\"d\",\"id\":\"1\",\"text\":\"panic\",\"bot\":\"chaos\"}\n"
                .to_vec(),
            "bad_request",
            "unknown bot \"chaos\"",
        ),
    ];
    for (bytes, code, text) in &cases {
        w.write_all(bytes).unwrap();
        let v = read_json(&mut r);
        assert_eq!(v["op"], "error", "{v}");
        assert_eq!(v["code"], *code, "{v}");
        assert!(v["message"].as_str().unwrap().contains(text), "{v}");
    }
    // The id of a malformed say is echoed so a pipelining client can match it.
    w.write_all(b"{\"op\":\"say\",\"conv\":\"c\",\"id\":\"m-77\"}\n").unwrap();
    assert_eq!(read_json(&mut r)["id"], "m-77");
    // Still usable.
    w.write_all(&Request::Ping.to_line()).unwrap();
    assert_eq!(read_json(&mut r)["op"], "pong");
    let m = c.nodes[0].metrics();
    assert_eq!(metric(&m, "botclaw_frames_too_large_total"), 1.0);
    assert!(metric(&m, "botclaw_errors_total{code=\"bad_request\"}") >= 10.0);
}

#[test]
fn client_tokens_are_enforced() {
    let mut c = Cluster::new(1).with_config("[frontend]\nclient_tokens = [\"sesame\"]\n");
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let (mut r, mut w) = raw(&c);
    w.write_all(&Request::Ping.to_line()).unwrap();
    assert_eq!(read_json(&mut r)["code"], "unauthorized");
    let mut rest = String::new();
    assert_eq!(r.read_line(&mut rest).unwrap(), 0, "connection closed after unauthorized");

    let (mut r, mut w) = raw(&c);
    w.write_all(&Request::Hello { token: Some("wrong".into()), client: None }.to_line()).unwrap();
    assert_eq!(read_json(&mut r)["code"], "unauthorized");

    let rt = runtime();
    let opts = ClientOptions { token: Some("sesame".into()), ..ClientOptions::default() };
    let client = rt.block_on(Client::connect(c.nodes[0].ports.client, opts)).unwrap();
    assert_eq!(rt.block_on(client.ping()).unwrap(), "n0");
}

/// One `say` line for the chaos bot (whose `sleep N` holds the turn N ms).
fn chaos_line(conv: &str, id: &str, text: &str, user: Option<String>) -> Vec<u8> {
    let say = Request::Say {
        conv: conv.into(),
        id: id.into(),
        text: text.into(),
        bot: Some("chaos".into()),
        user,
    };
    say.to_line()
}

#[test]
fn overload_gets_busy_with_a_retry_hint() {
    let mut c =
        Cluster::new(1).with_config(&format!("[frontend]\nconn_inflight_max = 4\n{DIAGNOSTIC}"));
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let (mut r, mut w) = raw(&c);
    // 20 slow turns pipelined on distinct conversations: 4 run, 16 are refused at once.
    let batch: Vec<u8> =
        (0..20).flat_map(|i| chaos_line(&format!("slow-{i}"), "1", "sleep 300", None)).collect();
    w.write_all(&batch).unwrap();
    let answers: Vec<Value> = (0..20).map(|_| read_json(&mut r)).collect();
    let busy: Vec<&Value> = answers.iter().filter(|v| v["code"] == "busy").collect();
    let ok = answers.iter().filter(|v| v["op"] == "reply").count();
    assert_eq!((busy.len(), ok), (16, 4), "{answers:#?}");
    assert!(busy.iter().all(|v| v["retry_after_ms"].as_u64().is_some()));
    // Replies for one conversation keep request order even when pipelined.
    let batch: Vec<u8> = (0..3)
        .flat_map(|i| {
            chaos_line("ordered", &format!("{i}"), &format!("sleep {}", 100 - 40 * i), None)
        })
        .collect();
    w.write_all(&batch).unwrap();
    let ids: Vec<Value> = (0..3).map(|_| read_json(&mut r)["id"].clone()).collect();
    assert_eq!(ids, vec!["0", "1", "2"]);
}

/// The node's bound holds bytes too: with room for 1000 bytes of requests, 20 pipelined
/// slow turns of about 290 bytes each (a 200-byte user name, ids, envelope) get 3 places, and the other
/// 17 get `busy` at once.
#[test]
fn requests_in_flight_are_bounded_in_bytes() {
    let config = format!("[frontend]\nnode_inflight_bytes_max = 1000\n{DIAGNOSTIC}");
    let mut c = Cluster::new(1).with_config(&config);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let (mut r, mut w) = raw(&c);
    let batch: Vec<u8> = (0..20)
        .flat_map(|i| chaos_line(&format!("bytes-{i:02}"), "1", "sleep 500", Some("u".repeat(200))))
        .collect();
    w.write_all(&batch).unwrap();
    let answers: Vec<Value> = (0..20).map(|_| read_json(&mut r)).collect();
    let busy = answers.iter().filter(|v| v["code"] == "busy").count();
    let ok = answers.iter().filter(|v| v["op"] == "reply").count();
    assert_eq!((busy, ok), (17, 3), "{answers:#?}");
    let m = c.nodes[0].metrics();
    assert_eq!(metric(&m, "botclaw_work_refused_total{kind=\"client\"}"), 17.0);
    assert_eq!(metric(&m, "botclaw_work_inflight_bytes"), 0.0, "every place was given back");
}

/// 60 conversations ask about 3 cities at once: with the node-wide cache, one backend call
/// per city; without it, one per conversation.
#[test]
fn shared_cache_coalesces_concurrent_lookups() {
    for (config, calls) in [("", 3.0), ("[backends]\nshared_cache_entries_max = 0\n", 60.0)] {
        let mut c = Cluster::new(1).with_config(config);
        c.start_all();
        c.wait_converged(&[0], CONVERGE);
        let rt = runtime();
        let addr = c.nodes[0].ports.client;
        rt.block_on(async {
            let client = Arc::new(Client::connect(addr, ClientOptions::default()).await.unwrap());
            let mut asks = Vec::new();
            for k in 0..60 {
                let client = client.clone();
                asks.push(tokio::spawn(async move {
                    let city = ["Oslo", "Rome", "Lima"][k % 3];
                    let text = format!("weather in {city}?");
                    let r = client.say(&format!("w-{k}"), "1", &text, Some("weather")).await;
                    let reply = r.unwrap();
                    assert!(reply.messages[0].starts_with(city), "{:?}", reply.messages);
                }));
            }
            for a in asks {
                a.await.unwrap();
            }
        });
        let m = c.nodes[0].metrics();
        assert_eq!(
            metric(&m, "botclaw_backend_calls_total{backend=\"weather\"}"),
            calls,
            "{config:?}"
        );
        if calls == 3.0 {
            assert_eq!(metric(&m, "botclaw_shared_cache_misses_total"), 3.0);
            let served = metric(&m, "botclaw_shared_cache_coalesced_total")
                + metric(&m, "botclaw_shared_cache_hits_total");
            assert_eq!(served, 57.0);
        }
    }
}

#[test]
fn history_pipelined_after_say_shows_that_turn() {
    // Three nodes (turns forwarded and replicated, each durable on two): a history sent
    // right behind a say on the same connection answers after it and includes its turn.
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let (mut r, mut w) = raw(&c);
    let mut batch = Vec::new();
    for k in 0..30 {
        let conv = format!("piped-{}", k % 10);
        let say = Request::Say {
            conv: conv.clone(),
            id: format!("m{k}"),
            text: format!("text {k}"),
            bot: None,
            user: None,
        };
        batch.extend(say.to_line());
        batch.extend(Request::History { conv, limit: None, before: None }.to_line());
    }
    w.write_all(&batch).unwrap();
    // Answers of one conversation come in request order (others may interleave).
    let mut per_conv: HashMap<String, Vec<Value>> = HashMap::new();
    for _ in 0..60 {
        let v = read_json(&mut r);
        let conv = v["conv"].as_str().unwrap_or_else(|| panic!("no conv in {v}")).to_string();
        per_conv.entry(conv).or_default().push(v);
    }
    for (conv, answers) in per_conv {
        for pair in answers.chunks(2) {
            let (said, history) = (&pair[0], &pair[1]);
            assert_eq!(said["op"], "reply", "{conv}: {said}");
            assert_eq!(history["op"], "history", "{conv}: {history}");
            let turn = said["turn"].as_u64().unwrap();
            let turns: Vec<u64> = history["turns"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|t| t["turn"].as_u64())
                .collect();
            assert!(
                turns.contains(&turn),
                "{conv}: history after turn {turn} misses it: {turns:?}"
            );
        }
    }
}

/// Placement-aware clients: once a reply named a conversation's owner, the client sends
/// the conversation's turns straight to it, so a settled cluster forwards none of them
/// (a client that is not placement-aware, talking to one gateway, has two in three
/// forwarded). When a node joins and takes shards, the first turn of a moved conversation
/// is forwarded by its old owner, the reply names the newcomer (whose address the client
/// learns from `topology`), and the next turns go to it directly.
#[test]
fn placement_aware_client_sends_turns_to_owners() {
    use botclaw_client::{FailoverClient, FailoverOptions};
    let mut c = Cluster::new(4);
    for i in 0..3 {
        c.nodes[i].start();
    }
    c.wait_converged(&[0, 1, 2], CONVERGE);
    if by_map() {
        c.wait_placed(&[0, 1, 2], CONVERGE);
    }
    let forwards = |c: &Cluster| -> f64 {
        c.nodes.iter().map(|n| metric(&n.metrics(), "botclaw_forwards_total")).sum()
    };
    let seed = [c.nodes[0].ports.client];
    const CONVS: usize = 60;
    let rt = runtime();
    let connect = |direct: bool| {
        let opts = FailoverOptions { direct, ..FailoverOptions::default() };
        rt.block_on(FailoverClient::connect(&seed, opts)).unwrap()
    };
    // One round: turn `t` of every conversation `{prefix}-k`; the node of each reply.
    let round = |client: &FailoverClient, prefix: &str, t: u64| -> Vec<String> {
        rt.block_on(async {
            let mut nodes = Vec::new();
            for k in 0..CONVS {
                let (conv, text) = (format!("{prefix}-{k}"), format!("turn {t}"));
                let reply = client.say(&conv, &format!("m-{t}"), &text, Some("echo")).await;
                let reply = reply.unwrap_or_else(|e| panic!("{conv} turn {t}: {e}"));
                assert_eq!((reply.turn, reply.messages), (t, vec![text]), "{conv}");
                nodes.push(reply.node);
            }
            nodes
        })
    };

    let plain = connect(false);
    round(&plain, "plain", 1);
    let before = forwards(&c);
    round(&plain, "plain", 2);
    let plain_forwards = forwards(&c) - before;
    assert!(plain_forwards >= CONVS as f64 / 3.0, "a one-gateway client: {plain_forwards}");

    let direct = connect(true);
    let first = round(&direct, "direct", 1);
    let before = forwards(&c);
    let second = round(&direct, "direct", 2);
    assert_eq!(forwards(&c) - before, 0.0, "turns to known owners are not forwarded");
    assert_eq!(first, second, "the owners did not change");
    let owners: std::collections::BTreeSet<&String> = second.iter().collect();
    assert_eq!(owners.len(), 3, "every node owns some of the conversations: {owners:?}");

    // n3 joins and takes a share.
    c.nodes[3].start();
    c.wait_converged(&[0, 1, 2, 3], CONVERGE);
    // By the ring, owners follow membership at once; by the map, once the moves settle.
    if by_map() {
        c.wait_placed(&[0, 1, 2, 3], Duration::from_secs(60));
    }
    let third = round(&direct, "direct", 3);
    let moved = third.iter().filter(|n| *n == "n3").count();
    assert!(moved > 0, "n3 owns none of {CONVS} conversations: {third:?}");
    let before = forwards(&c);
    let fourth = round(&direct, "direct", 4);
    assert_eq!(forwards(&c) - before, 0.0, "turns of moved conversations go to the new owner");
    assert_eq!(third, fourth);
}

/// Ten times the work a cluster may hold, aimed at one owner: n1 owns every conversation,
/// and each node's clients pipeline slow turns for them, so n1 gets its own clients' turns
/// and both other gateways' forwarded ones. Every request is answered (a reply, or `busy`
/// with a retry hint: never a hang); no node ever has more than `node_inflight_max`
/// requests in flight of any kind, forwarded ones included; n1 refuses the excess.
#[test]
fn overload_from_every_gateway_is_refused_at_the_owner_not_queued() {
    const MAX: usize = 24;
    let config = format!("[frontend]\nnode_inflight_max = {MAX}\n{DIAGNOSTIC}");
    let mut c = Cluster::new(3).with_config(&config);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    if by_map() {
        c.wait_placed(&[0, 1, 2], CONVERGE);
    }
    // 240 conversations that n1 owns: 10x the places of one node.
    let mut convs = Vec::new();
    for k in 0.. {
        let conv = format!("over-{k}");
        let p = get_json(c.nodes[0].ports.admin, &format!("/placement?conv={conv}")).unwrap();
        if p["routed_owner"] == "n1" {
            convs.push(conv);
        }
        if convs.len() == 10 * MAX {
            break;
        }
    }
    // The controller's group formed (n1 taken in as a voter installs the map's snapshot
    // from Raft): that one-time cost is not the overload's.
    let formed = poll(CONVERGE, || {
        let s = c.nodes[1].status()?;
        let voters = s["controller"]["voters"].as_array()?.len();
        (voters == 3 && s["controller"]["learners"] == 0).then_some(())
    });
    assert!(formed.is_some(), "the controller's group did not form");
    let rss = |c: &Cluster| c.nodes[1].status().unwrap()["rss_bytes"].as_u64().unwrap();
    let rss_before = rss(&c);
    // 4 connections per node, 20 slow turns pipelined on each.
    let mut conns = Vec::new();
    for (i, chunk) in convs.chunks(20).enumerate() {
        let (r, mut w) = raw_to(&c, i % 3);
        let batch: Vec<u8> =
            chunk.iter().flat_map(|conv| chaos_line(conv, "1", "sleep 3000", None)).collect();
        w.write_all(&batch).unwrap();
        conns.push((r, w, chunk.len()));
    }
    let mut codes: HashMap<String, usize> = HashMap::new();
    for (r, _w, n) in &mut conns {
        for _ in 0..*n {
            // Each read waits at most the socket's 10 s timeout: a hang fails here.
            let answer = read_json(r);
            let code = match answer["op"].as_str() {
                Some("reply") => "reply".to_string(),
                _ => {
                    assert!(answer["retry_after_ms"].is_u64(), "{answer}");
                    answer["code"].as_str().unwrap().to_string()
                }
            };
            *codes.entry(code).or_default() += 1;
        }
    }
    assert_eq!(codes.values().sum::<usize>(), 10 * MAX, "{codes:?}");
    // Every turn sleeps 3 s and all were sent at once: had n1 run more than its places'
    // worth at once (forwarded turns not counted), more would have been answered.
    assert!(codes.get("reply").is_some_and(|&n| n > 0 && n <= MAX), "{codes:?}");
    assert!(codes.keys().all(|k| k == "reply" || k == "busy"), "{codes:?}");
    for n in &c.nodes {
        let m = n.metrics();
        let peak = metric(&m, "botclaw_work_inflight_peak");
        assert!(peak > 0.0 && peak <= MAX as f64, "{}: peak {peak}", n.name);
    }
    let m = c.nodes[1].metrics();
    let refused: f64 = ["client", "forwarded"]
        .iter()
        .map(|k| metric(&m, &format!("botclaw_work_refused_total{{kind=\"{k}\"}}")))
        .sum();
    assert!(refused > 0.0, "the owner refused nothing");
    let grew = rss(&c).saturating_sub(rss_before);
    assert!(grew < 64 << 20, "n1 grew by {grew} bytes");
}

/// A WebSocket client of the chat protocol (one JSON object per text frame).
struct Ws(tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>);

impl Ws {
    async fn connect(addr: std::net::SocketAddr) -> Ws {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(format!("ws://{addr}/chat"), tcp).await.unwrap();
        Ws(ws)
    }

    async fn send_text(&mut self, text: String) {
        use futures::SinkExt;
        self.0.send(tokio_tungstenite::tungstenite::Message::text(text)).await.unwrap();
    }

    async fn send(&mut self, request: &Request) {
        let line = request.to_line();
        self.send_text(String::from_utf8(line).unwrap().trim_end().to_string()).await;
    }

    /// The next answer, or `None` once the node closed the connection.
    async fn next(&mut self) -> Option<Value> {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let within = tokio::time::timeout(Duration::from_secs(10), self.0.next());
            match within.await.expect("an answer within 10 s") {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(_))) | None => return None,
                Some(Err(e)) => {
                    eprintln!("websocket error: {e}");
                    return None;
                }
                Some(Ok(_)) => continue,
            }
        }
    }
}

#[test]
fn websocket_clients_get_the_same_answers_as_tcp() {
    let config = "[frontend]\nclient_tokens = [\"sesame\"]\nframe_bytes_max = 4096\n";
    let mut c = Cluster::new(3).with_config(config);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let addr = c.nodes[0].ports.client;
    let rt = runtime();
    let hello = Request::Hello { token: Some("sesame".into()), client: None };
    rt.block_on(async {
        // The same tokens: a request before `hello` is refused and the connection closed.
        let mut ws = Ws::connect(addr).await;
        ws.send(&Request::Ping).await;
        assert_eq!(ws.next().await.unwrap()["code"], "unauthorized");
        assert!(ws.next().await.is_none(), "closed after unauthorized");

        let mut ws = Ws::connect(addr).await;
        ws.send(&hello).await;
        assert_eq!(ws.next().await.unwrap()["op"], "welcome");
        let (mut r, mut w) = raw(&c);
        w.write_all(&hello.to_line()).unwrap();
        assert_eq!(read_json(&mut r)["op"], "welcome");
        // Turns said over WebSocket, then the same ids over TCP: the same answers (the
        // conversation applied each once), owners on every node.
        for k in 0..12 {
            let say = Request::Say {
                conv: format!("ws-{k}"),
                id: "a".into(),
                text: format!("hello {k}"),
                bot: None,
                user: None,
            };
            ws.send(&say).await;
            let over_ws = ws.next().await.unwrap();
            assert_eq!(
                (&over_ws["op"], &over_ws["turn"]),
                (&Value::from("reply"), &Value::from(1))
            );
            w.write_all(&say.to_line()).unwrap();
            assert_eq!(read_json(&mut r), over_ws);
            let history = Request::History { conv: format!("ws-{k}"), limit: None, before: None };
            ws.send(&history).await;
            w.write_all(&history.to_line()).unwrap();
            assert_eq!(read_json(&mut r), ws.next().await.unwrap());
        }
        // A pretty-printed request spans lines: still one request.
        ws.send_text("{\n  \"op\": \"ping\"\n}".into()).await;
        assert_eq!(ws.next().await.unwrap()["op"], "pong");
        // Junk gets the same error as over TCP, and the connection stays usable.
        ws.send_text("not json".into()).await;
        w.write_all(b"not json\n").unwrap();
        assert_eq!(ws.next().await.unwrap(), read_json(&mut r));
        ws.send(&Request::Ping).await;
        assert_eq!(ws.next().await.unwrap()["op"], "pong");
        // A frame over the request bound closes that connection, and only that one.
        ws.send_text("x".repeat(8192)).await;
        assert!(ws.next().await.is_none(), "an oversized frame closes the connection");
        w.write_all(&Request::Ping.to_line()).unwrap();
        assert_eq!(read_json(&mut r)["op"], "pong");
    });
    let m = c.nodes[0].metrics();
    assert_eq!(metric(&m, "botclaw_client_websocket_connections_total"), 2.0);
}
