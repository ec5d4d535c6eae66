//! Node roles: bot modules run only on nodes with their role, reached through the cluster;
//! adding a node with a module's role adds capacity for that module alone.

use std::time::Duration;

use botclaw_client::{Client, ClientError, ClientOptions, ErrorCode};
use botclaw_tests::*;

const CONVERGE: Duration = Duration::from_secs(30);

fn roles(list: &[&str]) -> String {
    let quoted: Vec<String> = list.iter().map(|r| format!("{r:?}")).collect();
    format!("roles = [{}]\n", quoted.join(", "))
}

fn served(n: &TestNode, role: &str) -> f64 {
    metric(&n.metrics(), &format!("botclaw_module_served_total{{role=\"{role}\"}}"))
}

fn backend_calls(n: &TestNode, backend: &str) -> f64 {
    metric(&n.metrics(), &format!("botclaw_backend_calls_total{{backend=\"{backend}\"}}"))
}

/// Asks `count` conversations about a product (each its own query, so each is a catalog
/// call) through `client`, and checks every answer came from the catalog.
async fn ask_catalog(client: &Client, prefix: &str, count: usize) {
    for k in 0..count {
        let conv = format!("{prefix}-{k}");
        let text = format!("is the keyboard in stock? (question {k})");
        let reply = client.say(&conv, &format!("{conv}/1"), &text, Some("shop")).await.unwrap();
        assert!(reply.messages[0].contains("keyboard (KB-01)"), "{:?}", reply.messages);
    }
}

#[test]
fn modules_run_only_on_nodes_with_their_role() {
    // n0 and n1 own conversations; n2 serves catalog searches and nothing else; no node
    // serves weather.
    let mut c = Cluster::new(3);
    c.nodes[0].config = Some(roles(&["conversations"]));
    c.nodes[1].config = Some(roles(&["conversations"]));
    c.nodes[2].config = Some(roles(&["catalog"]));
    c.start_all();
    c.wait_converged(&[0, 1, 2], CONVERGE);
    let rt = runtime();
    rt.block_on(async {
        // Through every gateway, the catalog-only node included.
        for (i, node) in c.nodes.iter().enumerate() {
            let client =
                Client::connect(node.ports.client, ClientOptions::default()).await.unwrap();
            ask_catalog(&client, &format!("shop{i}"), 10).await;
        }
        // Weather: nobody has the role; the turn fails with a clear error and the
        // conversation goes on.
        let client =
            Client::connect(c.nodes[0].ports.client, ClientOptions::default()).await.unwrap();
        match client.say_once("w", "w/1", "weather in Oslo", Some("weather")).await {
            Err(ClientError::Server { code: ErrorCode::Internal, message, .. }) => {
                assert!(message.contains("no node has the weather role"), "{message}")
            }
            other => panic!("expected an internal error, got {other:?}"),
        }
    });
    // All 30 searches ran on n2; the conversation nodes made none themselves.
    assert_eq!(served(&c.nodes[2], "catalog"), 30.0);
    assert_eq!(backend_calls(&c.nodes[2], "catalog"), 30.0);
    for n in &c.nodes[..2] {
        assert_eq!(backend_calls(n, "catalog"), 0.0, "{} searched itself", n.name);
    }
    let remote: f64 = c.nodes[..2]
        .iter()
        .map(|n| {
            metric(&n.metrics(), r#"botclaw_module_calls_total{role="catalog",route="remote"}"#)
        })
        .sum();
    assert_eq!(remote, 30.0);
    // n2 owns no conversations.
    assert_eq!(c.nodes[2].status().unwrap()["active_conversations"], 0);

    // Scale the catalog alone: a second catalog node takes part of the searches.
    let i = c.add_node(SECRET);
    c.nodes[i].config = Some(roles(&["catalog"]));
    c.nodes[i].start();
    c.wait_converged(&[0, 1, 2, 3], CONVERGE);
    rt.block_on(async {
        let client =
            Client::connect(c.nodes[0].ports.client, ClientOptions::default()).await.unwrap();
        ask_catalog(&client, "more", 40).await;
    });
    let (n2, n3) = (served(&c.nodes[2], "catalog") - 30.0, served(&c.nodes[3], "catalog"));
    eprintln!("40 more searches: n2 served {n2}, n3 served {n3}");
    assert_eq!(n2 + n3, 40.0);
    assert!(n3 >= 5.0 && n2 >= 5.0, "searches not spread: n2 {n2}, n3 {n3}");
    // The conversation nodes still own everything, and status shows the roles' loads.
    assert_eq!(c.nodes[3].status().unwrap()["active_conversations"], 0);
    let table = poll(Duration::from_secs(10), || {
        let out = std::process::Command::new(botclaw_bin())
            .args(["status", "--admin", &c.nodes[0].ports.admin.to_string()])
            .output()
            .ok()?;
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        (table.contains("role catalog: 2 up") && table.contains("role conversations: 2 up"))
            .then_some(table)
    });
    assert!(table.is_some(), "status never showed the roles\n{}", c.logs());
}
