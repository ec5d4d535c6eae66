//! Harness for multi-process tests: starts real `botclaw` processes on free loopback ports,
//! polls their admin endpoints, and kills every process it started (by pid) when dropped,
//! also when the test fails.
//!
//! The binary is built once per test process with `cargo build -p botclaw` (a no-op when
//! fresh), or taken from `BOTCLAW_BIN`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod browser;
pub mod checker;
pub mod hosts;

pub use checker::runtime;

pub const SECRET: &str = "test-cluster-secret";

/// Path of a fresh `botclaw` binary.
pub fn botclaw_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(bin) = std::env::var("BOTCLAW_BIN") {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "botclaw", "--bin", "botclaw"])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p botclaw failed");
        // target/<profile>/deps/<test exe> -> target/<profile>/botclaw
        let exe = std::env::current_exe().expect("test executable path");
        let bin = exe.parent().and_then(Path::parent).expect("target dir").join("botclaw");
        assert!(bin.exists(), "{} not found", bin.display());
        bin
    })
}

/// Test ports come from below the kernel's ephemeral range (32768 and up), where outgoing
/// connections take their local ports: a port picked by binding port 0 can be taken by a
/// connection a moment later. Each test process starts at its own offset.
const PORT_LOW: u32 = 20_000;
const PORT_HIGH: u32 = 32_000;

static NEXT_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn port_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok() && UdpSocket::bind(("127.0.0.1", p)).is_ok()
}

/// `count` consecutive ports, free for both TCP and UDP, starting at a multiple of 10.
pub fn free_port_block(count: u16) -> u16 {
    use std::sync::atomic::Ordering;
    let span = PORT_HIGH - PORT_LOW;
    let _ = NEXT_PORT.compare_exchange(
        0,
        (std::process::id() * 7919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..2_000 {
        let step = u32::from(count).div_ceil(10) * 10;
        let offset = NEXT_PORT.fetch_add(step, Ordering::SeqCst) % span;
        let base = (PORT_LOW + offset / 10 * 10) as u16;
        if u32::from(base) + u32::from(count) < PORT_HIGH && (base..base + count).all(port_free) {
            return base;
        }
    }
    panic!("no free block of {count} ports");
}

/// Polls `f` every 25 ms until it returns `Some`, or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// `GET` on an admin port: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut resp = agent().get(&format!("http://{addr}{path}")).call().ok()?;
    let code = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().ok()?;
    Some((code, body))
}

/// `POST` on an admin port: (status code, body).
pub fn http_post(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_post_with(addr, path, &[])
}

/// `POST` on an admin port with extra headers: (status code, body).
pub fn http_post_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    let mut req = agent().post(&format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let mut resp = req.send_empty().ok()?;
    let code = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().ok()?;
    Some((code, body))
}

pub fn get_json(addr: SocketAddr, path: &str) -> Option<Value> {
    let (code, body) = http_get(addr, path)?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

/// Value of a Prometheus sample `name{labels}` (or `name`) in a /metrics body; 0 if absent.
pub fn metric(body: &str, sample: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == sample).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) touches no memory of ours; the pid is a child we have not reaped,
    // so it cannot have been reused by another process.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

pub fn tail(path: &Path, bytes: u64) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

/// The addresses of one test node.
#[derive(Debug, Clone)]
pub struct Ports {
    pub client: SocketAddr,
    pub cluster: SocketAddr,
    pub gossip: SocketAddr,
    pub admin: SocketAddr,
}

impl Ports {
    pub fn free() -> Ports {
        let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let base = free_port_block(4);
        Ports { client: at(base), cluster: at(base + 1), gossip: at(base + 2), admin: at(base + 3) }
    }
}

/// The suite runs by the controller's map (the node's default) unless
/// `BOTCLAW_TEST_BY_RING=1`: then every node gets `[controller] authoritative = false`, the
/// older mode that derives owners from each node's gossip view.
pub fn by_map() -> bool {
    !std::env::var("BOTCLAW_TEST_BY_RING").is_ok_and(|v| v == "1")
}

/// A node's extra config with the suite's routing mode added.
fn with_mode(config: Option<&str>) -> Option<String> {
    if by_map() {
        return config.map(String::from);
    }
    const ON: &str = "authoritative = false\n";
    Some(match config {
        Some(c) if c.contains("authoritative") => c.to_string(),
        Some(c) if c.contains("[controller]\n") => {
            c.replacen("[controller]\n", &format!("[controller]\n{ON}"), 1)
        }
        Some(c) => format!("{c}\n[controller]\n{ON}"),
        None => format!("[controller]\n{ON}"),
    })
}

/// One `botclaw node` process under test.
#[derive(Debug)]
pub struct TestNode {
    pub name: String,
    pub ports: Ports,
    pub seeds: Vec<SocketAddr>,
    pub secret: String,
    pub log: PathBuf,
    pub data_dir: PathBuf,
    /// Extra TOML (sections such as `[conversations]`) passed with `--config`.
    pub config: Option<String>,
    pub child: Option<Child>,
}

impl TestNode {
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = File::options().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(botclaw_bin());
        cmd.arg("node")
            .args(["--name", &self.name])
            .args(["--client-addr", &self.ports.client.to_string()])
            .args(["--cluster-addr", &self.ports.cluster.to_string()])
            .args(["--gossip-addr", &self.ports.gossip.to_string()])
            .args(["--admin-addr", &self.ports.admin.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("BOTCLAW_SECRET", &self.secret)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for seed in &self.seeds {
            cmd.args(["--seed", &seed.to_string()]);
        }
        if let Some(toml) = with_mode(self.config.as_deref()) {
            let path = self.log.with_extension("toml");
            std::fs::write(&path, toml).unwrap();
            cmd.arg("--config").arg(path);
        }
        self.child = Some(cmd.spawn().expect("spawning botclaw"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node not running").id()
    }

    pub fn signal(&self, signal: i32) {
        send_signal(self.pid(), signal);
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = poll(timeout, || child.try_wait().ok().flatten())?;
        self.child = None;
        Some(status)
    }

    pub fn status(&self) -> Option<Value> {
        get_json(self.ports.admin, "/status")
    }

    pub fn metrics(&self) -> String {
        http_get(self.ports.admin, "/metrics").map(|(_, b)| b).unwrap_or_default()
    }

    /// This node's view of member `name`: (state, incarnation).
    pub fn member(&self, name: &str) -> Option<(String, u64)> {
        let status = self.status()?;
        status["members"].as_array()?.iter().find(|m| m["name"] == name).map(|m| {
            (m["state"].as_str().unwrap_or("").to_string(), m["incarnation"].as_u64().unwrap_or(0))
        })
    }

    /// Names of members this node sees up.
    pub fn up_members(&self) -> Vec<String> {
        let Some(status) = self.status() else { return Vec::new() };
        let mut names: Vec<String> = status["members"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .filter(|m| m["state"] == "up")
                    .filter_map(|m| m["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// A set of test nodes sharing a temporary directory. Dropping it kills every process.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<TestNode>,
    /// Held while a cluster routed by the controller's map runs (see [`Cluster::start_all`]).
    exclusive: Option<std::sync::MutexGuard<'static, ()>>,
}

/// One cluster by the controller's map at a time per test binary: a debug build of three
/// such nodes re-replicating 262,144 shards after a kill fills both cores of a small
/// machine, and two of them side by side starved each other's clients (12 and 168 turns
/// in the seconds a test waits). Ring-mode clusters still run side by side.
static MAP_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the one-map-cluster-at-a-time lock for clusters a test starts some other way (a
/// script).
pub fn map_cluster_exclusive() -> std::sync::MutexGuard<'static, ()> {
    MAP_CLUSTER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `tool` runs (`tool args` exits 0); in CI it must (see `.ci/run`).
pub fn have_tool(tool: &str, args: &[&str]) -> bool {
    let ok = Command::new(tool).args(args).output().is_ok_and(|o| o.status.success());
    if !ok && std::env::var_os("CI").is_some() {
        panic!("{tool} is needed in CI (see .ci/run)");
    }
    if !ok {
        eprintln!("skipped: {tool} is not installed");
    }
    ok
}

impl Cluster {
    /// `n` nodes with the shared test secret; node 0 founds the cluster, the others seed
    /// from node 0. Nothing is started yet.
    pub fn new(n: usize) -> Cluster {
        let mut c =
            Cluster { dir: tempfile::tempdir().unwrap(), nodes: Vec::new(), exclusive: None };
        for _ in 0..n {
            c.add_node(SECRET);
        }
        c
    }

    pub fn add_node(&mut self, secret: &str) -> usize {
        let i = self.nodes.len();
        let name = format!("n{i}");
        let seeds = self.nodes.iter().map(|n| n.ports.gossip).take(1).collect();
        self.nodes.push(TestNode {
            log: self.dir.path().join(format!("{name}.log")),
            data_dir: self.dir.path().join(&name),
            name,
            ports: Ports::free(),
            seeds,
            secret: secret.into(),
            config: None,
            child: None,
        });
        i
    }

    /// Mutual TLS between the nodes: a CA and a certificate per node written with
    /// `botclaw tls init` under the cluster's directory, and a `[tls]` section added to each
    /// node's config (call after `with_config`), with `extra` lines in that section.
    pub fn with_tls(mut self, extra: &str) -> Cluster {
        let dir = self.dir.path().join("tls");
        let mut cmd = Command::new(botclaw_bin());
        cmd.args(["tls", "init", "--dir"]).arg(&dir);
        for node in &self.nodes {
            cmd.args(["--name", &node.name]);
        }
        let out = cmd.output().expect("running botclaw tls init");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for node in &mut self.nodes {
            let d = dir.display();
            let tls = format!(
                "[tls]\nca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/{n}.pem\"\nkey_file = \"{d}/{n}-key.pem\"\n{extra}",
                n = node.name
            );
            node.config = Some(format!("{}\n{tls}", node.config.clone().unwrap_or_default()));
        }
        self
    }

    /// Gives every node the same extra config (TOML sections).
    pub fn with_config(mut self, toml: &str) -> Cluster {
        for node in &mut self.nodes {
            node.config = Some(toml.to_string());
        }
        self
    }

    pub fn start_all(&mut self) {
        let by_ring = |n: &TestNode| {
            with_mode(n.config.as_deref()).is_some_and(|c| c.contains("authoritative = false"))
        };
        let map = !self.nodes.iter().all(by_ring);
        if map && self.exclusive.is_none() {
            // A test that failed while holding it poisoned it; the next may go on.
            self.exclusive = Some(map_cluster_exclusive());
        }
        for node in &mut self.nodes {
            node.start();
        }
    }

    /// Waits until each of `which` sees exactly `which` up, linked to each other, and is
    /// ready (its placement reflects that membership).
    pub fn wait_converged(&self, which: &[usize], timeout: Duration) {
        let mut want: Vec<String> = which.iter().map(|&i| self.nodes[i].name.clone()).collect();
        want.sort();
        let ok = poll(timeout, || {
            which
                .iter()
                .all(|&i| {
                    let Some(status) = self.nodes[i].status() else { return false };
                    let members = status["members"].as_array().cloned().unwrap_or_default();
                    let up: Vec<&Value> = members.iter().filter(|m| m["state"] == "up").collect();
                    let mut names: Vec<String> =
                        up.iter().filter_map(|m| m["name"].as_str().map(String::from)).collect();
                    names.sort();
                    let ready = || {
                        http_get(self.nodes[i].ports.admin, "/health/ready")
                            .is_some_and(|(code, _)| code == 200)
                    };
                    names == want
                        && up.iter().all(|m| m["is_self"] == true || m["linked"] == true)
                        && ready()
                })
                .then_some(())
        });
        if ok.is_none() {
            // What each node says of itself: why it is not ready, and its controller.
            for &i in which {
                let ready = http_get(self.nodes[i].ports.admin, "/health/ready");
                let controller = self.nodes[i].status().map(|s| s["controller"].to_string());
                eprintln!("n{i}: ready {ready:?}, controller {controller:?}");
            }
        }
        assert!(ok.is_some(), "nodes {which:?} did not converge in {timeout:?}\n{}", self.logs());
    }

    /// Waits until `which` agree on the controller's map and it is settled: every shard
    /// owned with its full replica set, no move in flight.
    pub fn wait_placed(&self, which: &[usize], timeout: Duration) {
        let ok = poll(timeout, || {
            // No move in flight is not enough (the next step of a move is proposed a round
            // after the last committed): the leader's last round must have proposed nothing.
            let mut planned = false;
            let versions: Option<Vec<u64>> = which
                .iter()
                .map(|&i| {
                    let s = self.nodes[i].status()?;
                    let c = &s["controller"];
                    planned |= c["plan_settled"] == true;
                    let settled = !c["leader"].is_null()
                        && [
                            "moves_in_flight",
                            "shards_unassigned",
                            "shards_unavailable",
                            "shards_under_replicated",
                        ]
                        .iter()
                        .all(|k| c[k] == 0);
                    settled.then(|| c["map_version"].as_u64()).flatten()
                })
                .collect();
            versions.filter(|v| planned && v.windows(2).all(|w| w[0] == w[1])).map(|_| ())
        });
        assert!(
            ok.is_some(),
            "nodes {which:?} did not settle on a map in {timeout:?}\n{}",
            self.logs()
        );
    }

    /// Waits until each of `observers` sees member `name` in `state`; returns how long
    /// after `since` that was, or panics with the logs after `timeout`.
    pub fn wait_seen_as(
        &self,
        observers: &[usize],
        name: &str,
        state: &str,
        since: Instant,
        timeout: Duration,
    ) -> Duration {
        let seen = poll(timeout, || {
            observers
                .iter()
                .all(|&i| self.nodes[i].member(name).is_some_and(|(s, _)| s == state))
                .then(|| since.elapsed())
        });
        seen.unwrap_or_else(|| {
            panic!("{name} never seen {state} by {observers:?}\n{}", self.logs())
        })
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "----- {} ({}) -----\n{}\n",
                node.name,
                node.log.display(),
                tail(&node.log, 3000)
            ));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // SIGKILL also ends a stopped (SIGSTOP) process.
        for node in &mut self.nodes {
            node.kill9();
        }
    }
}
