//! `botclaw up`: a local N-node cluster, for demos and development.
//!
//! Node i listens on client `P+10i`, cluster `P+10i+1`, gossip `P+10i+2`, admin `P+10i+3`.
//! Each node gets a directory under the data dir holding its config file and its log; the
//! cluster secret is kept in `DATA/secret`, so running `up` again on the same data dir
//! restarts the same cluster.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use botclaw_config::{
    local_ports, ControllerConfig, RawNodeConfig, StoreConfig, StoreEngine, TlsConfig,
    DEFAULT_BASE_PORT,
};
use clap::Args;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// How many nodes to launch.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=100))]
    nodes: u16,
    /// First port: node i uses P+10i .. P+10i+3.
    #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
    base_port: u16,
    /// Where node configs, logs and data live.
    #[arg(long, default_value = "botclaw-data")]
    data_dir: PathBuf,
    /// Cluster secret (default: DATA/secret, or a newly generated one saved there).
    #[arg(long, env = "BOTCLAW_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Give up if the cluster has not converged after this many seconds.
    #[arg(long, default_value_t = 60)]
    converge_timeout_s: u64,
    /// Keep conversation state in memory only (no state files; nothing survives a stop).
    #[arg(long)]
    ephemeral: bool,
    /// Links between nodes in clear (by default `up` writes a cluster CA and node
    /// certificates under DATA/tls and the nodes talk mutual TLS).
    #[arg(long)]
    plaintext: bool,
    /// Storage engine of durable state: fjall or redb.
    #[arg(long, default_value = "fjall", value_parser = ["fjall", "redb"])]
    store_engine: String,
    /// A node config file every node starts from (bot and module services, `[backends]`,
    /// ...); what `up` sets itself (names, addresses, seeds, data dirs, store, TLS) wins.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also write DATA/prometheus/: a Prometheus config that scrapes every node (a
    /// file-based target list) with botclaw's alert rules, to run with `prometheus
    /// --config.file=DATA/prometheus/prometheus.yml`.
    #[arg(long)]
    prometheus: bool,
    /// The nodes' log lines (in DATA/node-i/node.log): text or one JSON object per line.
    #[arg(long, env = "BOTCLAW_LOG_FORMAT", value_enum, default_value_t = crate::cli::LogFormat::Text)]
    log_format: crate::cli::LogFormat,
}

/// The alert rules shipped in `cluster-config/prometheus/`.
pub const ALERT_RULES: &str = include_str!("../../cluster-config/prometheus/botclaw-alerts.yml");

/// Writes `dir/prometheus.yml` (scraping every 2 s the targets of `dir/targets.json`, with
/// the alert rules of `dir/botclaw-alerts.yml`) and those two files; paths in the config
/// are relative to it.
pub fn write_prometheus(dir: &Path, admins: &[SocketAddr]) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let config = "# Written by `botclaw up --prometheus`.\n\
        global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\n\
        rule_files:\n  - botclaw-alerts.yml\n\
        scrape_configs:\n  - job_name: botclaw\n    file_sd_configs:\n      - files: [targets.json]\n        refresh_interval: 5s\n";
    let targets: Vec<String> = admins.iter().map(ToString::to_string).collect();
    let sd = serde_json::json!([{"targets": targets, "labels": {"cluster": "botclaw-up"}}]);
    fs::write(dir.join("targets.json"), serde_json::to_string_pretty(&sd)?)?;
    fs::write(dir.join("botclaw-alerts.yml"), ALERT_RULES)?;
    let path = dir.join("prometheus.yml");
    fs::write(&path, config)?;
    Ok(path)
}

struct Launched {
    name: String,
    admin: SocketAddr,
    log: PathBuf,
    child: Child,
    exited: bool,
}

fn load_or_create_secret(args: &UpArgs) -> Result<String> {
    let path = args.data_dir.join("secret");
    if let Some(secret) = &args.secret {
        return Ok(secret.clone());
    }
    if path.exists() {
        let secret =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        println!("using the cluster secret saved in {}", path.display());
        return Ok(secret.trim().to_string());
    }
    let secret = hex::encode(rand::random::<[u8; 16]>());
    // Readable by its owner only from the start (never printed: say where it is).
    let mut file = fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    file.open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{secret}\n").as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("generated a cluster secret, saved in {} (mode 0600)", path.display());
    Ok(secret)
}

/// The config of node `i` of an `n`-node local cluster.
pub fn node_config(base: u16, i: u16, n: u16, data_dir: &Path) -> RawNodeConfig {
    let addr = |port: u16| format!("127.0.0.1:{port}");
    let [client, cluster, gossip, admin] = local_ports(base, i);
    let seeds = (0..n).filter(|j| *j != i).map(|j| addr(local_ports(base, j)[2])).collect();
    RawNodeConfig {
        name: Some(format!("node-{i}")),
        client_addr: Some(addr(client)),
        cluster_addr: Some(addr(cluster)),
        gossip_addr: Some(addr(gossip)),
        admin_addr: Some(addr(admin)),
        seeds: Some(seeds),
        data_dir: Some(data_dir.to_path_buf()),
        // The first three nodes found the placement controller.
        controller: Some(ControllerConfig {
            voters: (0..n.min(3)).map(|j| format!("node-{j}")).collect(),
            ..ControllerConfig::default()
        }),
        ..RawNodeConfig::default()
    }
}

/// Makes the child receive SIGTERM if `up` dies, so no node outlives its launcher.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

fn spawn_node(
    exe: &Path,
    config: &Path,
    log: &Path,
    secret: &str,
    format: crate::cli::LogFormat,
) -> Result<Child> {
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let format = clap::ValueEnum::to_possible_value(&format).expect("log formats have names");
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("--config")
        .arg(config)
        .arg("--log-format")
        .arg(format.get_name())
        .env("BOTCLAW_SECRET", secret)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    die_with_parent(&mut cmd);
    cmd.spawn().with_context(|| format!("starting {}", exe.display()))
}

fn log_tail(path: &Path, bytes: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

/// Polls every node until each one sees all `n` nodes up and is ready to serve turns
/// (`/health/ready`: placed, linked, its store writable, the controller's leader heard).
fn converged(nodes: &[Launched]) -> bool {
    nodes.iter().all(|node| {
        crate::status::fetch(node.admin).is_ok_and(|s| {
            s.joined && s.members.iter().filter(|m| m.state == "up").count() == nodes.len()
        }) && crate::http::get(node.admin, "/health/ready", Duration::from_secs(2)).is_ok()
    })
}

fn check_exits(nodes: &mut [Launched]) -> Option<String> {
    for node in nodes.iter_mut().filter(|n| !n.exited) {
        if let Ok(Some(status)) = node.child.try_wait() {
            node.exited = true;
            return Some(format!(
                "{} exited ({status}); last lines of {}:\n{}",
                node.name,
                node.log.display(),
                log_tail(&node.log, 1500)
            ));
        }
    }
    None
}

fn stop_all(nodes: &mut [Launched]) {
    for node in nodes.iter().filter(|n| !n.exited) {
        // SIGTERM makes the node leave the cluster and exit 0.
        let _ = Command::new("kill").arg("-TERM").arg(node.child.id().to_string()).status();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in nodes.iter_mut().filter(|n| !n.exited) {
        loop {
            match node.child.try_wait() {
                Ok(Some(status)) => {
                    println!("{} stopped ({status})", node.name);
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = node.child.kill();
                    let _ = node.child.wait();
                    println!("{} killed after 10 s", node.name);
                    break;
                }
            }
        }
        node.exited = true;
    }
}

pub fn run(args: UpArgs) -> Result<ExitCode> {
    let last = u32::from(args.base_port) + 10 * u32::from(args.nodes - 1) + 3;
    if last > u32::from(u16::MAX) {
        bail!("--base-port {} leaves no room for {} nodes", args.base_port, args.nodes);
    }
    crate::node::create_private_dir(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let secret = load_or_create_secret(&args)?;
    let exe = std::env::current_exe().context("locating the botclaw binary")?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;

    let names: Vec<String> = (0..args.nodes).map(|i| format!("node-{i}")).collect();
    let tls_dir = data_dir.join("tls");
    if !args.plaintext {
        let have = names.iter().all(|n| crate::tls::node_files(&tls_dir, n).2.exists());
        if !have {
            let local = [std::net::IpAddr::from([127, 0, 0, 1])];
            crate::tls::init(&tls_dir, &names, botclaw_config::DEFAULT_TLS_SERVER_NAME, &local)
                .context("writing the cluster's TLS certificates")?;
            println!("wrote a cluster CA and node certificates to {}", tls_dir.display());
        }
    }
    let mut nodes = Vec::new();
    println!(
        "{:<8} {:<16} {:<16} {:<16} {:<16} LOG",
        "NODE", "CLIENT", "CLUSTER", "GOSSIP", "ADMIN"
    );
    let shared = match &args.config {
        Some(path) => RawNodeConfig::from_file(path)
            .with_context(|| format!("cannot read the shared config {}", path.display()))?,
        None => RawNodeConfig::default(),
    };
    for i in 0..args.nodes {
        let dir = data_dir.join(format!("node-{i}"));
        crate::node::create_private_dir(&dir)?;
        let mut raw = shared.clone().merge(node_config(args.base_port, i, args.nodes, &dir));
        let engine =
            if args.store_engine == "redb" { StoreEngine::Redb } else { StoreEngine::Fjall };
        raw.store =
            Some(StoreConfig { ephemeral: args.ephemeral, engine, ..StoreConfig::default() });
        if !args.plaintext {
            let (ca, cert, key) = crate::tls::node_files(&tls_dir, &names[i as usize]);
            raw.tls = Some(TlsConfig {
                ca_file: Some(ca),
                cert_file: Some(cert),
                key_file: Some(key),
                ..TlsConfig::default()
            });
        }
        let config = dir.join("botclaw.toml");
        fs::write(&config, raw.to_toml())?;
        let log = dir.join("node.log");
        let child = spawn_node(&exe, &config, &log, &secret, args.log_format)?;
        let [c, l, g, a] = local_ports(args.base_port, i).map(|p| format!("127.0.0.1:{p}"));
        println!("{:<8} {c:<16} {l:<16} {g:<16} {a:<16} {}", format!("node-{i}"), log.display());
        nodes.push(Launched {
            name: format!("node-{i}"),
            admin: a.parse()?,
            log,
            child,
            exited: false,
        });
    }

    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.converge_timeout_s);
    loop {
        if stop.load(Ordering::Relaxed) {
            stop_all(&mut nodes);
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(problem) = check_exits(&mut nodes) {
            eprintln!("botclaw up: {problem}");
            stop_all(&mut nodes);
            return Ok(ExitCode::FAILURE);
        }
        if converged(&nodes) {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("botclaw up: the cluster did not converge in {} s", args.converge_timeout_s);
            stop_all(&mut nodes);
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let seeds = nodes.first().map(|_| format!("127.0.0.1:{}", local_ports(args.base_port, 0)[2]));
    let secret_file = data_dir.join("secret");
    let secret = if args.secret.is_none() && secret_file.exists() {
        format!("--secret-file {}", secret_file.display())
    } else {
        "--secret-file FILE".to_string()
    };
    let certs = if args.plaintext {
        String::new()
    } else {
        format!(
            "\n  (its certificate: botclaw tls init --dir {} --name extra, and a [tls] section naming it)",
            tls_dir.display()
        )
    };
    let prometheus = if args.prometheus {
        let admins: Vec<SocketAddr> = nodes.iter().map(|n| n.admin).collect();
        let config = write_prometheus(&data_dir.join("prometheus"), &admins)?;
        format!(
            "\n  metrics:  prometheus --config.file={} (every node, with the alert rules)",
            config.display()
        )
    } else {
        String::new()
    };
    println!(
        "\ncluster of {} nodes converged in {} ms\n\n  status:   botclaw status --admin {}\n  console:  http://{}/console\n  add one:  botclaw node {secret} --name extra --gossip-addr 127.0.0.1:PORT ... --seed {}{certs}{prometheus}\n  stop:     Ctrl-C\n",
        nodes.len(),
        start.elapsed().as_millis(),
        nodes[0].admin,
        nodes[0].admin,
        seeds.unwrap_or_default(),
    );
    while !stop.load(Ordering::Relaxed) {
        if let Some(problem) = check_exits(&mut nodes) {
            eprintln!("botclaw up: warning: {problem}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("stopping");
    stop_all(&mut nodes);
    Ok(ExitCode::SUCCESS)
}
