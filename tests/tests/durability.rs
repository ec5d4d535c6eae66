//! State on disk: a node (or the whole cluster) stopped and started again continues every
//! conversation where it was; a corrupt state file stops the node with an error naming it.

use std::time::Duration;

use botclaw_client::{Client, ClientOptions};
use botclaw_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn stop_all(c: &mut Cluster) {
    for node in &c.nodes {
        node.signal(libc::SIGTERM);
    }
    // By the controller's map a node waits for its drain to be committed, or for the others
    // to be gone or the controller to lose its majority: then it keeps its copies.
    let bound = Duration::from_secs(if by_map() { 30 } else { 15 });
    for node in &mut c.nodes {
        let status = node.wait_exit(bound).expect("node did not stop");
        assert!(status.success(), "{} exited with {status}", node.name);
    }
}

/// Sends turn `turn` of every conversation and checks its number.
fn round(c: &Cluster, convs: usize, turn: u64) {
    let rt = runtime();
    rt.block_on(async {
        let mut clients = Vec::new();
        for node in &c.nodes {
            clients
                .push(Client::connect(node.ports.client, ClientOptions::default()).await.unwrap());
        }
        for k in 0..convs {
            let client = &clients[k % clients.len()];
            let conv = format!("durable-{k}");
            let reply = client
                .say(&conv, &format!("m-{turn}"), &format!("turn {turn}"), Some("echo"))
                .await
                .unwrap();
            assert_eq!(reply.turn, turn, "{conv}");
        }
    });
}

#[test]
fn restarted_node_continues_every_conversation() {
    let mut c = Cluster::new(1);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let rt = runtime();
    let addr = c.nodes[0].ports.client;
    rt.block_on(async {
        let client = Client::connect(addr, ClientOptions::default()).await.unwrap();
        let r = client.say("shop-1", "1", "I want to return an order", Some("shop")).await.unwrap();
        assert!(r.messages[0].contains("order number"));
    });
    round(&c, 50, 1);
    round(&c, 50, 2);
    stop_all(&mut c);
    c.nodes[0].start();
    c.wait_converged(&[0], CONVERGE);
    round(&c, 50, 3);
    rt.block_on(async {
        let client = Client::connect(addr, ClientOptions::default()).await.unwrap();
        // Mid-dialogue bot state survived: the shop still waits for the order number.
        let r = client.say("shop-1", "2", "it is 31337", None).await.unwrap();
        assert_eq!(r.turn, 2);
        assert!(r.messages[0].contains("#31337"), "{:?}", r.messages);
        let history = client.history("durable-7", None).await.unwrap();
        let ids: Vec<&str> = history.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, vec!["m-1", "m-2", "m-3"]);
        // A retry of a turn acknowledged before the restart is still recognised.
        let again = client.say("durable-7", "m-2", "turn 2 (resent)", None).await.unwrap();
        assert_eq!(again.turn, 2);
    });
    assert!(metric(&c.nodes[0].metrics(), "botclaw_store_commits_total") >= 51.0);
}

#[test]
fn whole_cluster_restart_loses_nothing() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    round(&c, 300, 1);
    round(&c, 300, 2);
    stop_all(&mut c);
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    round(&c, 300, 3);
}

#[test]
fn corrupt_redb_state_file_stops_the_node_with_its_name() {
    let mut c = Cluster::new(1).with_config("[store]\nengine = \"redb\"\n");
    std::fs::create_dir_all(&c.nodes[0].data_dir).unwrap();
    let file = c.nodes[0].data_dir.join("state.redb");
    std::fs::write(&file, vec![0x5Au8; 32 * 1024]).unwrap();
    c.start_all();
    let status = c.nodes[0].wait_exit(Duration::from_secs(15)).expect("node kept running");
    assert!(!status.success());
    let log = tail(&c.nodes[0].log, 4000);
    assert!(log.contains(&file.display().to_string()), "{log}");
    // The file is left as it was for the operator to inspect: nothing silently reset.
    assert_eq!(std::fs::read(&file).unwrap(), vec![0x5Au8; 32 * 1024]);
}

#[test]
fn overwritten_fjall_journal_stops_the_node_with_its_name() {
    let mut c = Cluster::new(1);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    round(&c, 20, 1);
    stop_all(&mut c);
    let dir = c.nodes[0].data_dir.join("state.fjall");
    let journals: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .collect();
    assert!(!journals.is_empty(), "no journal in {}", dir.display());
    for journal in &journals {
        let len = std::fs::metadata(journal).unwrap().len();
        std::fs::write(journal, vec![0x5Au8; len as usize]).unwrap();
    }
    // Refused on every start, not only the first.
    for _ in 0..2 {
        c.nodes[0].start();
        let status = c.nodes[0].wait_exit(Duration::from_secs(15)).expect("node kept running");
        assert!(!status.success());
        let log = tail(&c.nodes[0].log, 4000);
        assert!(log.contains(&dir.display().to_string()), "{log}");
        assert!(log.contains("lost committed writes"), "{log}");
    }
}

#[test]
fn state_of_the_other_engine_is_not_silently_ignored() {
    let mut c = Cluster::new(1);
    std::fs::create_dir_all(&c.nodes[0].data_dir).unwrap();
    let file = c.nodes[0].data_dir.join("state.redb");
    std::fs::write(&file, b"state of an earlier redb node").unwrap();
    c.start_all();
    let status = c.nodes[0].wait_exit(Duration::from_secs(15)).expect("node kept running");
    assert!(!status.success());
    let log = tail(&c.nodes[0].log, 4000);
    assert!(log.contains("holds redb state") && log.contains("engine = \"redb\""), "{log}");
    assert!(!c.nodes[0].data_dir.join("state.fjall").exists(), "an empty store was created");
}
