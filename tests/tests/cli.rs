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

fn run_up(base: u16, dir: &std::path::Path) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new(botclaw_bin())
        .args(["up", "--nodes", "3", "--base-port", &base.to_string(), "--data-dir"])
        .arg(dir)
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

    for round in 0..2 {
        let (mut up, rx) = run_up(base, dir.path());
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
