//! Separate "hosts" on one machine: a network namespace per host, each with its own
//! address on a bridge (the root namespace is on it too, at `.254`, so the test talks to
//! every host), its own `/etc/hosts` (`ip netns exec` mounts `/etc/netns/NS/hosts`) and
//! its own hostname (a UTS namespace per process). Nodes run with the default ports, as on
//! real machines. Needs root and iproute2; [`Hosts::new`] says why when it cannot run.
//!
//! Dropping a [`Hosts`] kills every process it started (by pid) and removes the
//! namespaces, the bridge and the hosts files, also when the test fails.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{botclaw_bin, tail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Ports every node uses, as a node started with defaults does.
pub const CLIENT_PORT: u16 = 7000;
pub const GOSSIP_PORT: u16 = 7002;
pub const ADMIN_PORT: u16 = 7003;

pub struct Hosts {
    bridge: String,
    namespaces: Vec<String>,
    /// `10.A.B.` of this set of hosts; host `i` is `.{i + 1}`.
    prefix: String,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<HostNode>,
}

/// One node process on one host.
pub struct HostNode {
    pub host: usize,
    pub hostname: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub child: Option<Child>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Hosts {
    /// `n` hosts named `h1`..`hN` that know each other's names. `Err` says why they
    /// cannot be made here (not root, no iproute2).
    pub fn new(n: usize) -> Result<Hosts, String> {
        if Command::new("id").arg("-u").output().map(|o| o.stdout != b"0\n").unwrap_or(true) {
            return Err("not root: network namespaces need root".into());
        }
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{k}", pid % 10_000);
        let prefix = format!("10.{}.{}.", 100 + k % 100, pid % 250);
        let mut hosts = Hosts {
            bridge: format!("bcb{tag}"),
            namespaces: Vec::new(),
            prefix,
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            nodes: Vec::new(),
        };
        let b = hosts.bridge.clone();
        ip(&["link", "add", &b, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}254/24", hosts.prefix), "dev", &b])?;
        ip(&["link", "set", &b, "up"])?;
        let mut lines = String::from("127.0.0.1 localhost\n");
        for i in 0..n {
            lines.push_str(&format!("{} h{}\n", hosts.ip(i), i + 1));
        }
        for i in 0..n {
            let ns = format!("bcn{tag}-{i}");
            ip(&["netns", "add", &ns])?;
            hosts.namespaces.push(ns.clone());
            let veth = hosts.veth(i);
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["link", "set", &veth, "master", &b, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", hosts.ip(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let etc = PathBuf::from("/etc/netns").join(&ns);
            std::fs::create_dir_all(&etc).map_err(|e| e.to_string())?;
            std::fs::write(etc.join("hosts"), &lines).map_err(|e| e.to_string())?;
        }
        Ok(hosts)
    }

    fn veth(&self, i: usize) -> String {
        format!("{}v{i}", self.bridge)
    }

    /// Host `i`'s address.
    pub fn ip(&self, i: usize) -> IpAddr {
        format!("{}{}", self.prefix, i + 1).parse().expect("an IPv4 address")
    }

    pub fn addr(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(i), port)
    }

    /// Adds a node on host `i` (hostname `hostname`), not started yet; returns its index.
    pub fn add(
        &mut self,
        host: usize,
        hostname: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> usize {
        let k = self.nodes.len();
        self.nodes.push(HostNode {
            host,
            hostname: hostname.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.to_vec(),
            log: self.dir.path().join(format!("node{k}-{hostname}.log")),
            child: None,
        });
        k
    }

    /// Starts node `k` with its command: `botclaw node ARGS` in its host's namespace, under
    /// its hostname.
    pub fn start(&mut self, k: usize) {
        let ns = self.namespaces[self.nodes[k].host].clone();
        let node = &mut self.nodes[k];
        assert!(node.child.is_none(), "node {k} already running");
        let log = File::options().create(true).append(true).open(&node.log).unwrap();
        // ip netns exec, unshare and sh each exec the next: the child's pid is botclaw's.
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, "unshare", "--uts", "sh", "-c"])
            .arg(format!("hostname {} && exec \"$0\" node \"$@\"", node.hostname))
            .arg(botclaw_bin())
            .args(&node.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &node.env {
            cmd.env(k, v);
        }
        node.child = Some(cmd.spawn().expect("spawning botclaw in a namespace"));
    }

    pub fn kill9(&mut self, k: usize) {
        if let Some(mut child) = self.nodes[k].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for node `k` to exit on its own.
    pub fn wait_exit(&mut self, k: usize, timeout: Duration) -> Option<ExitStatus> {
        let child = self.nodes[k].child.as_mut()?;
        let status = crate::poll(timeout, || child.try_wait().ok().flatten());
        if status.is_some() {
            self.nodes[k].child = None;
        }
        status
    }

    /// Cuts host `i` off the network (its cable pulled), or plugs it back in.
    pub fn cable(&self, i: usize, plugged: bool) {
        ip(&["link", "set", &self.veth(i), if plugged { "up" } else { "down" }]).unwrap();
    }

    pub fn log(&self, k: usize) -> String {
        std::fs::read_to_string(&self.nodes[k].log).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (k, n) in self.nodes.iter().enumerate() {
            out.push_str(&format!(
                "----- node {k} on h{} as {} ({}) -----\n{}\n",
                n.host + 1,
                n.hostname,
                n.log.display(),
                tail(&n.log, 4000)
            ));
        }
        out
    }

    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name` in the test's directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path: &Path = self.dir.path();
        let path = path.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for k in 0..self.nodes.len() {
            self.kill9(k);
        }
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
