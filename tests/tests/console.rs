//! The web console in a real browser (headless Chromium over the DevTools protocol),
//! against a real 3-node cluster under load. Screenshots go to
//! `target/tmp/console/` (the CI run's artifacts).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use botclaw_client::{FailoverClient, FailoverOptions};
use botclaw_tests::browser::Browser;
use botclaw_tests::*;

const CONVERGE: Duration = Duration::from_secs(30);
const SHOWN: Duration = Duration::from_secs(20);

fn shots() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console")
}

#[test]
fn the_console_shows_the_cluster_live_in_a_browser() {
    if botclaw_tests::browser::chromium().is_none() {
        eprintln!("skipped: no chromium (CI installs Debian's chromium)");
        return;
    }
    // Rebalancing rounds are far apart: the skewed load below stays skewed, for the dry run
    // to show what would move.
    let mut c =
        Cluster::new(3).with_config("[rebalance]\ninterval_ms = 600000\nmin_turns_per_s = 1\n");
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    c.wait_placed(&[0, 1, 2], CONVERGE);
    let rt = runtime();

    // Skewed load on conversations the first node owns, until the test ends.
    let hot_node = c.nodes[0].name.clone();
    let owner = |conv: &str| {
        get_json(c.nodes[0].ports.admin, &format!("/placement?conv={conv}"))
            .and_then(|p| p["owner"].as_str().map(str::to_string))
    };
    let convs: Vec<String> = (0..300)
        .map(|i| format!("console-{i}"))
        .filter(|conv| owner(conv).as_deref() == Some(hot_node.as_str()))
        .take(12)
        .collect();
    assert_eq!(convs.len(), 12, "conversations owned by {hot_node}");
    let seeds: Vec<SocketAddr> = c.nodes.iter().map(|n| n.ports.client).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, done, convs) = (stop.clone(), done.clone(), convs.clone());
        std::thread::spawn(move || {
            let rt = runtime();
            rt.block_on(async {
                let client = FailoverClient::connect(&seeds, FailoverOptions::default()).await?;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let conv = &convs[i as usize % convs.len()];
                    if client.say(conv, &format!("m{i}"), "hello", None).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
                Ok::<_, botclaw_client::ClientError>(())
            })
        })
    };
    let turned = poll(CONVERGE, || (done.load(Ordering::Relaxed) > 50).then_some(()));
    assert!(turned.is_some(), "the load runs\n{}", c.logs());

    // The lookup on a node that does not own the conversation asks the owner for its
    // record of the last turns: the latest turn numbers, each with a latency.
    let placement = get_json(c.nodes[1].ports.admin, &format!("/placement?conv={}", convs[0]))
        .expect("placement from a non-owner");
    let recent = &placement["recent_turns"];
    assert_eq!(recent["node"].as_str(), Some(hot_node.as_str()), "{placement}");
    assert_eq!(recent["live"], true, "{placement}");
    let turns: Vec<(u64, u64)> = recent["turns"]
        .as_array()
        .expect("turns")
        .iter()
        .map(|t| (t["turn"].as_u64().unwrap(), t["micros"].as_u64().unwrap()))
        .collect();
    assert!(!turns.is_empty() && turns.len() <= 16, "{placement}");
    assert!(turns.windows(2).all(|w| w[0].0 < w[1].0), "oldest first: {turns:?}");
    assert!(turns.iter().all(|&(_, us)| us > 0 && us < 30_000_000), "{turns:?}");

    let admin = c.nodes[0].ports.admin;
    let checks = rt.block_on(async {
        let mut b = Browser::launch().await.expect("chromium");
        b.open(&format!("http://{admin}/console#conv={}", convs[0])).await;
        // Members appear, all up, with the controller's leader.
        let up = "document.querySelectorAll('#members tr[data-state=\"up\"]').length === 3";
        assert!(b.wait_for(up, SHOWN).await.is_some(), "three members up on the page");
        let leader = b.wait_for("document.querySelector('#leader').textContent.startsWith('n')", SHOWN);
        assert!(leader.await.is_some(), "the controller's leader is shown");
        // Numbers move: the turn counters of the page change while the load runs.
        let rates = "[...document.querySelectorAll('#members tbody tr')].map(r => r.children[6].textContent).join(' ')";
        let first = b.eval(rates).await;
        let moved = format!("{rates} !== {first}");
        assert!(b.wait_for(&moved, SHOWN).await.is_some(), "turns/s never changed: {first}");
        let busy = "[...document.querySelectorAll('#members tbody tr')].some(r => parseFloat(r.children[6].textContent) > 0)";
        assert!(b.wait_for(busy, SHOWN).await.is_some(), "no node shows turns");
        let latency = "[...document.querySelectorAll('#members tbody tr')].some(r => r.children[7].textContent.includes('s'))";
        assert!(b.wait_for(latency, SHOWN).await.is_some(), "no node shows a p50");
        // The conversation lookup answers (from the address's #conv=).
        let owner = b.wait_for("document.querySelector('#lookup-result').dataset.owner", SHOWN).await;
        let owner = owner.and_then(|v| v.as_str().map(str::to_string)).expect("lookup answered");
        assert!(owner.starts_with('n'), "owner {owner}");
        let text = b.eval("document.querySelector('#lookup-result').textContent").await;
        let expected = format!("conversation {}: shard", convs[0]);
        assert!(text.as_str().unwrap().contains(&expected), "{text}");
        assert!(text.as_str().unwrap().contains("% around the ring"), "{text}");
        let recent = format!("recent turns on {hot_node}: #");
        assert!(text.as_str().unwrap().contains(&recent), "{text}");
        assert_eq!(owner, hot_node);
        // The dry run lists what the loaded node's rebalancer would move.
        let dry = format!(
            "Number((document.querySelector('#dry-run .dry[data-node=\"{hot_node}\"]') || {{dataset: {{}}}}).dataset.moves || 0) > 0"
        );
        assert!(b.wait_for(&dry, SHOWN).await.is_some(), "the dry run lists no move");
        // Shards per node: every member owns some.
        let bars = "document.querySelectorAll('#shards .barrow').length === 3";
        assert!(b.wait_for(bars, SHOWN).await.is_some(), "shard distribution");
        b.screenshot(&shots().join("cluster.png")).await;
        // A flag set from the page (confirmed) shows in its flag list.
        let set = "window.confirm = () => true; \
            document.querySelector('#flag-name').value = 'console.beta'; \
            document.querySelector('#flag-percent').value = '30'; \
            document.querySelector('#flag-form').requestSubmit(); true";
        b.eval(set).await;
        let answered = "document.querySelector('#control-result').textContent.startsWith('202')";
        assert!(b.wait_for(answered, SHOWN).await.is_some(), "the flag set was not accepted");
        let listed = "(document.querySelector('#flags tr[data-flag=\"console.beta\"]') || {}).textContent";
        let row = b.wait_for(listed, SHOWN).await.expect("the flag is listed");
        assert!(row.as_str().unwrap().contains("30.00%"), "{row}");
        b
    });
    let mut b = checks;
    // The command line's dry run says the same.
    let out = std::process::Command::new(botclaw_bin())
        .args(["rebalance", "--dry-run", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("would move shard"), "{said}");

    // A node dies: the page turns it down (suspect, then down) without a reload.
    let victim = c.nodes[2].name.clone();
    c.nodes[2].kill9();
    let gone = format!(
        "(document.querySelector('#members tr[data-node=\"{victim}\"]') || {{}}).dataset?.state"
    );
    let shown = rt.block_on(async {
        let state =
            b.wait_for(&format!("['suspect', 'down'].includes({gone}) && {gone}"), SHOWN).await;
        b.screenshot(&shots().join("node-killed.png")).await;
        state
    });
    assert!(shown.is_some(), "the killed node {victim} is never shown down\n{}", c.logs());
    // Drain a member from the page: the node it chose drains and exits.
    let drained = c.nodes[1].name.clone();
    let drain = format!(
        "window.confirm = () => true; \
         document.querySelector('#control-result').textContent = ''; \
         document.querySelector('#drain-node').value = '{drained}'; \
         document.querySelector('#drain-form').requestSubmit(); true"
    );
    let answer = rt.block_on(async {
        b.eval(&drain).await;
        let answered = "document.querySelector('#control-result').textContent";
        b.wait_for(answered, SHOWN).await
    });
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    let answer = answer.expect("the drain was answered");
    assert!(answer.as_str().unwrap().starts_with("202"), "{answer}");
    let exited = c.nodes[1].wait_exit(Duration::from_secs(60));
    assert!(exited.is_some(), "the drained node kept running\n{}", c.logs());
}

/// The status line of `GET /console/events` on a fresh connection (kept open with it).
fn open_events(admin: SocketAddr) -> (String, std::net::TcpStream) {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /console/events HTTP/1.1\r\nHost: console\r\n\r\n").unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
    (line, s)
}

#[test]
fn the_console_bounds_its_open_streams() {
    let mut c = Cluster::new(1);
    c.start_all();
    c.wait_converged(&[0], CONVERGE);
    let admin = c.nodes[0].ports.admin;
    let mut open: Vec<std::net::TcpStream> = (0..16)
        .map(|i| {
            let (status, s) = open_events(admin);
            assert!(status.contains(" 200 "), "stream {i}: {status}");
            s
        })
        .collect();
    let (status, _) = open_events(admin);
    assert!(status.contains(" 503 "), "the 17th console: {status}");
    // One closes: its place is given back (once the node notices, at its next event).
    open.pop();
    let reopened = poll(Duration::from_secs(10), || {
        let (status, s) = open_events(admin);
        status.contains(" 200 ").then_some(s)
    });
    assert!(reopened.is_some(), "a closed console's place never came back");
}
