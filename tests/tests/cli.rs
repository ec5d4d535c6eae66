//! The operator surface: config errors, `botclaw up`, `botclaw status`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use botclaw_tests::*;

fn node_with(args: &[&str], secret: Option<&str>) -> (i32, String) {
    let mut cmd = Command::new(botclaw_bin());
    cmd.arg("node").args(args).env_remove("BOTCLAW_SECRET");
    if let Some(s) = secret {
        cmd.env("BOTCLAW_SECRET", s);
    }
    let out = cmd.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_config_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "name = \"x\"\nclient_adr = \"127.0.0.1:1\"\n").unwrap();
    let (code, err) = node_with(&["--config", file.to_str().unwrap()], Some("0123456789"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("client_adr"), "{err}");

    let (code, err) = node_with(&["--gossip-addr", "not-an-address"], Some("0123456789"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("gossip_addr"), "{err}");

    let (code, err) = node_with(&["--name", "x"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("secret"), "{err}");

    let (code, err) = node_with(&["--config", "/nonexistent/botclaw.toml"], Some("0123456789"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/botclaw.toml"), "{err}");

    let (code, err) = node_with(&["--secret-file", "/nonexistent/secret"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("secret_file") && err.contains("/nonexistent/secret"), "{err}");

    // A misspelt setting in the environment is named, not ignored.
    let out = Command::new(botclaw_bin())
        .args(["node", "--check-config"])
        .env("BOTCLAW_SECRET", "0123456789")
        .env("BOTCLAW_GOSIP__PROBE_RTT_MS", "100")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("BOTCLAW_GOSIP__PROBE_RTT_MS"), "{err}");
}

#[test]
fn a_node_refuses_to_advertise_loopback_to_a_seed_on_another_host() {
    // Default binds are loopback; a seed on another host could never reach this node.
    let dir = tempfile::tempdir().unwrap();
    let base = free_port_block(4);
    let addr = |k: u16| format!("127.0.0.1:{}", base + k);
    let (code, err) = node_with(
        &[
            "--client-addr",
            &addr(0),
            "--cluster-addr",
            &addr(1),
            "--gossip-addr",
            &addr(2),
            "--admin-addr",
            &addr(3),
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--seed",
            "192.0.2.10:7002",
        ],
        Some("0123456789abcdef"),
    );
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("loopback") && err.contains("192.0.2.10:7002"), "{err}");
}

/// Kills `pids` on drop, so a failing test leaves nothing running.
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            send_signal(*pid, libc::SIGKILL);
        }
    }
}

fn run_up(
    base: u16,
    dir: &std::path::Path,
    extra: &[&std::ffi::OsStr],
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(botclaw_bin())
        .args(["up", "--nodes", "3", "--base-port", &base.to_string(), "--data-dir"])
        .arg(dir)
        .args(extra)
        .env_remove("BOTCLAW_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// One `say` to the `support` bot through the node at `127.0.0.1:port`, and the answer line.
fn say_line(port: u16, id: &str) -> String {
    use std::io::Write;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return "cannot connect".into();
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let line = serde_json::json!({"op": "say", "conv": "up-svc", "id": id, "text": "hi", "bot": "support"});
    let _ = s.write_all(format!("{line}\n").as_bytes());
    let mut answer = String::new();
    let _ = BufReader::new(s).read_line(&mut answer);
    answer
}

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, lines: &mut Vec<String>) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(needle);
                lines.push(line);
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

#[test]
fn up_launches_converges_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_port_block(30);
    let admin = |i: u16| format!("127.0.0.1:{}", base + 10 * i + 3).parse().unwrap();

    // The second round starts every node from a shared config: a bot service (nothing
    // listens at its URL).
    let shared = dir.path().join("shared.toml");
    std::fs::write(&shared, "[[bots]]\nname = \"support\"\nurls = [\"http://127.0.0.1:9/turn\"]\n")
        .unwrap();
    for round in 0..2 {
        let extra: Vec<&std::ffi::OsStr> = match round {
            0 => Vec::new(),
            _ => vec!["--config".as_ref(), shared.as_os_str()],
        };
        let (mut up, rx) = run_up(base, dir.path(), &extra);
        let mut reaper = Reaper(vec![up.id()]);
        let mut lines = Vec::new();
        assert!(wait_for_line(&rx, "converged", &mut lines), "no convergence: {lines:#?}");
        if round == 0 {
            assert!(lines.iter().any(|l| l.contains("generated a cluster secret")), "{lines:#?}");
            // Saved readable by its owner only, never printed; data private to the user.
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
            let file = dir.path().join("secret");
            assert_eq!(mode(&file) & 0o777, 0o600);
            let secret = std::fs::read_to_string(&file).unwrap();
            assert!(lines.iter().all(|l| !l.contains(secret.trim())), "secret printed: {lines:#?}");
            assert_eq!(mode(&dir.path().join("node-0")) & 0o777, 0o700);
        } else {
            assert!(
                lines.iter().any(|l| l.contains("using the cluster secret saved")),
                "{lines:#?}"
            );
        }
        let mut pids = Vec::new();
        for i in 0..3 {
            let status = get_json(admin(i), "/status").expect("node status");
            assert_eq!(status["node"], format!("node-{i}"));
            let up_count =
                status["members"].as_array().unwrap().iter().filter(|m| m["state"] == "up").count();
            assert_eq!(up_count, 3);
            pids.push(status["pid"].as_u64().unwrap() as u32);
        }
        reaper.0.extend(&pids);

        let out = Command::new(botclaw_bin())
            .args(["status", "--admin", &admin(1).to_string()])
            .output()
            .unwrap();
        assert!(out.status.success());
        let table = String::from_utf8_lossy(&out.stdout);
        for i in 0..3 {
            assert!(
                table.lines().any(|l| l.starts_with(&format!("node-{i}")) && l.contains(" up ")),
                "{table}"
            );
        }
        let out = Command::new(botclaw_bin())
            .args(["status", "--json", "--admin", &admin(2).to_string()])
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["members"].as_array().unwrap().len(), 3);
        if round == 0 {
            // `status --watch` redraws the table until it is stopped.
            let mut watch = Command::new(botclaw_bin())
                .args(["status", "--watch", "0.2", "--admin", &admin(0).to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            reaper.0.push(watch.id());
            let mut out = BufReader::new(watch.stdout.take().unwrap());
            let mut tables = 0;
            let mut line = String::new();
            while tables < 3 && out.read_line(&mut line).unwrap_or(0) > 0 {
                tables += usize::from(line.contains("NAME") && line.contains("INCARNATION"));
                line.clear();
            }
            send_signal(watch.id(), libc::SIGKILL);
            let _ = watch.wait();
            assert_eq!(tables, 3, "status --watch redraws");
            let out = Command::new(botclaw_bin()).args(["completions", "bash"]).output().unwrap();
            let script = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && script.contains("_botclaw") && script.contains("flags")
            );
        }
        // Without the shared config the bot is unknown; with it, its service is called.
        let expected = if round == 0 { "unknown bot" } else { "bot service support" };
        let mut said = Vec::new();
        let seen = poll(Duration::from_secs(20), || {
            let line = say_line(base, &format!("r{round}-{}", said.len()));
            let hit = line.contains(expected);
            said.push(line);
            hit.then_some(())
        });
        assert!(seen.is_some(), "round {round}: {said:#?}");

        send_signal(up.id(), libc::SIGTERM);
        let code = poll(Duration::from_secs(20), || up.try_wait().ok().flatten())
            .expect("up did not exit");
        assert!(code.success(), "up exited with {code}");
        for pid in &pids {
            // After `up` returns every node has been reaped: the pid no longer exists.
            let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
            assert!(!alive, "node pid {pid} still running after up stopped");
        }
        for i in 0..3 {
            let log = dir.path().join(format!("node-{i}/node.log"));
            assert!(tail(&log, 4000).contains("stopped"), "node-{i} did not stop cleanly");
        }
    }
}

/// `botclaw tls init` writes a CA and node certificates, keys mode 0600; run again on the
/// same directory it keeps the CA and signs the new names with it.
#[test]
fn tls_init_writes_private_keys_and_reuses_its_ca() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let init = |name: &str| {
        let out = Command::new(botclaw_bin())
            .args(["tls", "init", "--dir"])
            .arg(&certs)
            .args(["--name", name, "--ip", "10.0.0.5"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    init("a");
    let ca = std::fs::read(certs.join("ca.pem")).unwrap();
    init("b");
    assert_eq!(std::fs::read(certs.join("ca.pem")).unwrap(), ca, "the CA was replaced");
    for (file, mode) in
        [("ca-key.pem", 0o600), ("a-key.pem", 0o600), ("b-key.pem", 0o600), ("b.pem", 0o644)]
    {
        let m = std::fs::metadata(certs.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, mode, "{file}");
    }
    let b = std::fs::read_to_string(certs.join("b.pem")).unwrap();
    assert!(b.starts_with("-----BEGIN CERTIFICATE-----"), "{b}");
}

/// Runs `botclaw flags ARGS` against `admin`; exit code and output.
fn flags_cmd(admin: std::net::SocketAddr, args: &[&str]) -> (i32, String) {
    let out = Command::new(botclaw_bin())
        .arg("flags")
        .args(args)
        .args(["--admin", &admin.to_string()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Waits until every node's `/flags` shows `flag` as `expect` (`Value::Null`: absent), and
/// prints how long that took.
fn wait_flag_everywhere(c: &Cluster, flag: &str, expect: serde_json::Value) {
    let t0 = std::time::Instant::now();
    let seen = poll(Duration::from_secs(15), || {
        c.nodes
            .iter()
            .all(|n| {
                let flags = get_json(n.ports.admin, "/flags").unwrap_or_default();
                let found = flags["flags"]
                    .as_array()
                    .and_then(|fs| fs.iter().find(|f| f["name"] == flag).cloned());
                found.unwrap_or(serde_json::Value::Null) == expect
            })
            .then_some(())
    });
    assert!(seen.is_some(), "not every node shows {flag} as {expect}");
    eprintln!("every node shows {flag} as {expect} after {} ms", t0.elapsed().as_millis());
}

/// The shop's returns flow to its confirmation on `convs` (through every node); which of
/// them were refunded at once (the `shop.instant-refund` flag on for them).
fn instant_refunds(c: &Cluster, convs: &[String], round: usize) -> Vec<bool> {
    let rt = runtime();
    rt.block_on(async {
        let mut clients = Vec::new();
        for n in &c.nodes {
            let opts = botclaw_client::ClientOptions::default();
            clients.push(std::sync::Arc::new(
                botclaw_client::Client::connect(n.ports.client, opts).await.unwrap(),
            ));
        }
        let mut tasks = Vec::new();
        for (k, conv) in convs.iter().enumerate() {
            let (client, conv) = (clients[k % clients.len()].clone(), conv.clone());
            tasks.push(tokio::spawn(async move {
                let mut last = String::new();
                for (i, text) in ["I want to return an order", "#4711", "yes"].iter().enumerate() {
                    let id = format!("r{round}-{i}");
                    let reply = client.say(&conv, &id, text, Some("shop")).await.unwrap();
                    last = reply.messages.join(" ");
                }
                assert!(last.contains("confirmed"), "{conv}: {last}");
                last.contains("refund is issued now")
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

#[test]
fn feature_flags_roll_out_to_a_stable_share_of_conversations() {
    let mut c = Cluster::new(3);
    c.start_all();
    c.wait_converged(&[0, 1, 2], Duration::from_secs(30));
    c.wait_placed(&[0, 1, 2], Duration::from_secs(30));
    let admin = c.nodes[0].ports.admin;
    const FLAG: &str = "shop.instant-refund";
    // Bad input is refused with a reason, and nothing is proposed.
    let (code, out) = flags_cmd(admin, &["set", "Bad Name", "--percent", "10"]);
    assert!(code != 0 && out.contains("flag name"), "{code}: {out}");
    let (code, out) = flags_cmd(admin, &["set", FLAG, "--percent", "150"]);
    assert!(code != 0 && out.contains("between 0 and 100"), "{code}: {out}");

    let (code, out) = flags_cmd(admin, &["set", FLAG, "--percent", "30", "--bot", "shop"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("applied in"), "{out}");
    eprint!("botclaw flags set: {out}");
    let on30 = serde_json::json!({"name": FLAG, "enabled": true, "percent": 30.0, "bot": "shop"});
    wait_flag_everywhere(&c, FLAG, on30);

    // Every conversation lands in the cohort its stable bucket says, on whichever node
    // owns it, and stays there on a later return.
    let convs: Vec<String> = (0..240).map(|k| format!("flagged-{k}")).collect();
    let expected: Vec<bool> =
        convs.iter().map(|conv| botclaw_core::flags::bucket(FLAG, conv) < 3000).collect();
    let first = instant_refunds(&c, &convs, 0);
    assert_eq!(first, expected, "cohorts by bucket");
    let share = first.iter().filter(|&&on| on).count();
    assert!((40..=110).contains(&share), "{share} of 240 at 30%");
    assert_eq!(instant_refunds(&c, &convs, 1), first, "a conversation never switches cohort");

    // Off for everyone, then on for everyone: no restart, every node follows.
    let (code, out) = flags_cmd(admin, &["set", FLAG, "--off"]);
    assert_eq!(code, 0, "{out}");
    let off = serde_json::json!({"name": FLAG, "enabled": false, "percent": 30.0, "bot": "shop"});
    wait_flag_everywhere(&c, FLAG, off);
    assert!(instant_refunds(&c, &convs, 2).iter().all(|on| !on));
    let (code, out) = flags_cmd(c.nodes[2].ports.admin, &["set", FLAG, "--on", "--percent", "100"]);
    assert_eq!(code, 0, "{out}");
    let all = serde_json::json!({"name": FLAG, "enabled": true, "percent": 100.0, "bot": "shop"});
    wait_flag_everywhere(&c, FLAG, all);
    assert!(instant_refunds(&c, &convs, 3).iter().all(|&on| on));

    let (code, out) = flags_cmd(admin, &["list"]);
    assert!(code == 0 && out.contains(FLAG) && out.contains("100.00%"), "{out}");
    let (code, out) = flags_cmd(admin, &["delete", FLAG]);
    assert_eq!(code, 0, "{out}");
    wait_flag_everywhere(&c, FLAG, serde_json::Value::Null);
    assert!(instant_refunds(&c, &convs, 4).iter().all(|on| !on));
}
