//! State on disk: a node (or the whole cluster) stopped and started again continues every
//! conversation where it was; a corrupt state file stops the node with an error naming it.

use std::time::Duration;

use botclaw_client::{Client, ClientOptions};
use botclaw_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);

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
    round_from(c, &vec![turn; convs]);
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

/// A small tmpfs at `path`, unmounted on drop (declare it before the cluster, so the nodes
/// are killed first). `None` when this process may not mount (not root): the caller skips.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &std::path::Path, megabytes: u32) -> Option<SmallDisk> {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(path.to_path_buf()))
    }

    /// Writes a filler file until the disk is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full disk under one node: no acknowledged turn is lost; that node reports not ready,
/// hands its conversations over, leaves and exits with status 75; the others serve every
/// conversation; with space back, the node starts again and rejoins.
#[test]
fn a_full_disk_loses_nothing_and_the_node_leaves_for_a_restart() {
    let base = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&base.path().join("n2-disk"), 48) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let mut c = Cluster::new(3).with_config("[store]\nunwritable_exit_ms = 3000\n");
    c.nodes[2].data_dir = disk.0.join("data");
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    if by_map() {
        c.wait_placed(&[0, 1, 2], Duration::from_secs(60));
    }
    const CONVS: usize = 40;
    round(&c, CONVS, 1);
    let filler = disk.fill();
    // Turns go on through n0 and n1; those that fail are retried by the client (same id);
    // every acknowledged one is kept.
    let rt = runtime();
    let acked: Vec<u64> = rt.block_on(async {
        let mut clients = Vec::new();
        for node in &c.nodes[..2] {
            clients
                .push(Client::connect(node.ports.client, ClientOptions::default()).await.unwrap());
        }
        let mut acked = vec![1u64; CONVS];
        for turn in 2..=4u64 {
            for (k, last) in acked.iter_mut().enumerate() {
                let conv = format!("durable-{k}");
                let client = &clients[k % 2];
                // Retried with the same id until answered: a turn is applied once.
                let mut tries = 0;
                let r = loop {
                    match client.say(&conv, &format!("m-{turn}"), "after", Some("echo")).await {
                        Ok(r) => break r,
                        Err(e) if tries < 100 => {
                            tries += 1;
                            eprintln!("{conv} turn {turn}: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("{conv} turn {turn} never answered: {e}"),
                    }
                };
                assert_eq!(r.turn, *last + 1, "{conv}");
                *last = r.turn;
            }
        }
        acked
    });
    let status = c.nodes[2].wait_exit(Duration::from_secs(90)).expect("n2 kept running");
    assert_eq!(status.code(), Some(75), "n2 exited with {status}");
    assert!(c.logs().contains("cannot write"), "no word of the failed store in the log");
    // The two others serve every conversation from the next turn on.
    c.wait_converged(&[0, 1], CONVERGE);
    rt.block_on(async {
        let client =
            Client::connect(c.nodes[0].ports.client, ClientOptions::default()).await.unwrap();
        for (k, last) in acked.iter().enumerate() {
            let conv = format!("durable-{k}");
            let r = client.say(&conv, "m-5", "after the exit", None).await.unwrap();
            assert_eq!(r.turn, last + 1, "{conv}: an acknowledged turn was lost or replayed");
        }
    });
    // Space back: n2 starts from what was durable and rejoins.
    std::fs::remove_file(filler).unwrap();
    c.nodes[2].start();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    round_from(&c, &acked.iter().map(|t| t + 2).collect::<Vec<_>>());
}

/// Sends, through every node, the next turn of each conversation (`m-T`, bot `echo` for a
/// new one), expecting turn `turns[k]` of conversation `durable-k`.
fn round_from(c: &Cluster, turns: &[u64]) {
    let rt = runtime();
    rt.block_on(async {
        let mut clients = Vec::new();
        for node in &c.nodes {
            clients
                .push(Client::connect(node.ports.client, ClientOptions::default()).await.unwrap());
        }
        for (k, &turn) in turns.iter().enumerate() {
            let conv = format!("durable-{k}");
            let reply = clients[k % clients.len()]
                .say(&conv, &format!("m-{turn}"), &format!("turn {turn}"), Some("echo"))
                .await
                .unwrap();
            assert_eq!(reply.turn, turn, "{conv}");
        }
    });
}
