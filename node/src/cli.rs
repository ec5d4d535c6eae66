//! The `botclaw` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use botclaw_config::RawNodeConfig;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "botclaw", version, about = "A horizontally scalable chat-bot cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one cluster node.
    Node(Box<NodeArgs>),
    /// Launch a local N-node cluster (the demo), wait until it converges, stop it on Ctrl-C.
    Up(crate::up::UpArgs),
    /// Show the cluster's members as one node sees them.
    Status(StatusArgs),
    /// Move a node's conversations to the others, then make it leave and exit.
    Drain(DrainArgs),
    /// Where a conversation lives and why (shard, owner, in-sync members, map version).
    Placement(PlacementArgs),
    /// Operator overrides of the shard map.
    #[command(subcommand)]
    Shard(ShardCommand),
    /// What the rebalancer would move now on every node, and why (`--dry-run`).
    Rebalance(RebalanceArgs),
    /// Cluster-wide feature flags: list, set (on for a share of conversations), delete.
    #[command(subcommand)]
    Flags(crate::flags::FlagsCommand),
    /// Talk to a bot (an interactive REPL over the chat protocol).
    Chat(crate::chat::ChatArgs),
    /// Generate chat load and report throughput and latency percentiles.
    Bench(crate::bench::BenchArgs),
    /// Run a deterministic simulation scenario (same core code, simulated time and network).
    Sim(crate::sim::SimArgs),
    /// TLS certificates for the cluster.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Print a shell completion script (e.g. `botclaw completions bash >
    /// /etc/bash_completion.d/botclaw`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The bench's baseline: a minimal tokio server speaking the same framing.
    #[command(hide = true)]
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

#[derive(Debug, clap::Subcommand)]
enum TlsCommand {
    /// Write a cluster CA and one certificate per node (for [tls] ca_file, cert_file,
    /// key_file). Production clusters may use their own PKI instead.
    Init {
        /// Directory to write ca.pem, ca-key.pem, NAME.pem and NAME-key.pem into.
        #[arg(long)]
        dir: PathBuf,
        /// Node name to issue a certificate for (repeatable).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Name every node certificate carries and peers check ([tls] server_name).
        #[arg(long, default_value = botclaw_config::DEFAULT_TLS_SERVER_NAME)]
        server_name: String,
        /// IP address to add to every node certificate (repeatable).
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
    },
}

/// Flags override the config file field of the same name.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// TOML config file (see cluster-config/examples/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unique node name (default: this host's name, plus the gossip port unless it is
    /// 7002).
    #[arg(long)]
    name: Option<String>,
    /// Chat protocol listener (ip:port; 0.0.0.0 listens on every interface).
    #[arg(long)]
    client_addr: Option<String>,
    /// Inter-node link listener (ip:port).
    #[arg(long)]
    cluster_addr: Option<String>,
    /// Gossip UDP listener (ip:port).
    #[arg(long)]
    gossip_addr: Option<String>,
    /// Admin HTTP listener (ip:port).
    #[arg(long)]
    admin_addr: Option<String>,
    /// The address (IP or DNS name) peers and clients reach this node at, for every port
    /// (derived and logged when a port binds 0.0.0.0 and this is not set).
    #[arg(long)]
    advertise_host: Option<String>,
    /// What to advertise for one port (host:port), for NAT and port mappings.
    #[arg(long)]
    advertise_client_addr: Option<String>,
    #[arg(long)]
    advertise_cluster_addr: Option<String>,
    #[arg(long)]
    advertise_gossip_addr: Option<String>,
    #[arg(long)]
    advertise_admin_addr: Option<String>,
    /// Gossip address (host:port) of a member to join through (repeatable). A name is
    /// resolved again and again and each of its addresses is a seed (a headless Service).
    #[arg(long = "seed")]
    seeds: Vec<String>,
    /// Cluster secret shared by all nodes (a flag's value shows in `ps`: prefer
    /// --secret-file or BOTCLAW_SECRET).
    #[arg(long, env = "BOTCLAW_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// File holding the cluster secret (its first line; keep it mode 0600). Wins over
    /// --secret and BOTCLAW_SECRET.
    #[arg(long, env = "BOTCLAW_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// File of earlier cluster secrets, one per line, still accepted on gossip during a
    /// key rotation.
    #[arg(long, env = "BOTCLAW_PREVIOUS_SECRET_FILE")]
    previous_secret_file: Option<PathBuf>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Role this node serves (repeatable).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// Keep conversation state in memory only (lost when the process exits).
    #[arg(long)]
    ephemeral: bool,
    /// Log lines as text (colours only on a terminal) or one JSON object per line.
    #[arg(long, env = "BOTCLAW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Check the configuration (file, BOTCLAW_* environment, flags), print it and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl NodeArgs {
    fn overrides(&self) -> RawNodeConfig {
        let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        RawNodeConfig {
            name: self.name.clone(),
            client_addr: self.client_addr.clone(),
            cluster_addr: self.cluster_addr.clone(),
            gossip_addr: self.gossip_addr.clone(),
            admin_addr: self.admin_addr.clone(),
            advertise_host: self.advertise_host.clone(),
            advertise_client_addr: self.advertise_client_addr.clone(),
            advertise_cluster_addr: self.advertise_cluster_addr.clone(),
            advertise_gossip_addr: self.advertise_gossip_addr.clone(),
            advertise_admin_addr: self.advertise_admin_addr.clone(),
            seeds: non_empty(&self.seeds),
            secret: self.secret.clone().filter(|_| self.secret_file.is_none()),
            secret_file: self.secret_file.clone(),
            previous_secret_file: self.previous_secret_file.clone(),
            data_dir: self.data_dir.clone(),
            roles: non_empty(&self.roles),
            ..RawNodeConfig::default()
        }
    }

    /// `--ephemeral` overrides `[store] ephemeral` from the file.
    fn apply_flags(&self, mut raw: RawNodeConfig) -> RawNodeConfig {
        if self.ephemeral {
            raw.store = Some(botclaw_config::StoreConfig {
                ephemeral: true,
                ..raw.store.unwrap_or_default()
            });
        }
        raw
    }
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Admin address of any node.
    #[arg(long, default_value = "127.0.0.1:7003", value_parser = crate::addrs::socket_addr_arg)]
    admin: SocketAddr,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
    /// Redraw the table every this many seconds until interrupted (a node that stops
    /// answering is shown, not fatal).
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,
}

#[derive(Debug, Args)]
struct RebalanceArgs {
    /// Admin address of any node.
    #[arg(long, default_value = "127.0.0.1:7003", value_parser = crate::addrs::socket_addr_arg)]
    admin: SocketAddr,
    /// Show what would move, change nothing (rebalancing itself runs on its own, see
    /// `[rebalance]`).
    #[arg(long, required = true)]
    dry_run: bool,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DrainArgs {
    /// Admin address of the node to drain.
    #[arg(long, default_value = "127.0.0.1:7003", value_parser = crate::addrs::socket_addr_arg)]
    admin: SocketAddr,
    /// How long to wait for the node to finish and exit.
    #[arg(long, default_value_t = 60)]
    wait_s: u64,
}

#[derive(Debug, Args)]
struct PlacementArgs {
    /// Admin address of any node.
    #[arg(long, default_value = "127.0.0.1:7003", value_parser = crate::addrs::socket_addr_arg)]
    admin: SocketAddr,
    /// Conversation id.
    #[arg(long)]
    conv: String,
}

#[derive(Debug, Subcommand)]
enum ShardCommand {
    /// Restart an unavailable shard (every in-sync member gone) on a member, from whatever
    /// it holds: turns the shard's last in-sync members acknowledged may be lost.
    Force {
        /// Admin address of any node.
        #[arg(long, default_value = "127.0.0.1:7003", value_parser = crate::addrs::socket_addr_arg)]
        admin: SocketAddr,
        #[arg(long)]
        shard: u32,
        /// The member to serve it.
        #[arg(long)]
        to: String,
        /// Confirms that losing acknowledged turns is acceptable.
        #[arg(long)]
        yes_lose_turns: bool,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,ractor_cluster=warn,ractor=warn")
    });
    // Colours only on a terminal: a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match format {
        LogFormat::Text => fmt.with_ansi(ansi).init(),
        LogFormat::Json => fmt.json().with_current_span(false).init(),
    }
    // Panics go to the log as one line with their text escaped: a panic message can hold
    // what a client sent (a conversation id, a turn's text), and newlines or escape
    // sequences in it would forge log lines.
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = (payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(not a string)".into());
        let at = info.location().map(ToString::to_string).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        tracing::error!(%at, thread = ?thread, text = ?message, "panic");
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            eprintln!("{backtrace}");
        }
    }));
}

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts")
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::EchoServer { listen } => {
            match client_runtime().block_on(crate::bench::run_echo_server(listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("botclaw echo-server: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Chat(args) => match client_runtime().block_on(crate::chat::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("botclaw chat: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(args) => {
            let json = args.json;
            match client_runtime().block_on(crate::bench::run(args)) {
                Ok(report) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report).expect("report serializes")
                    );
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    crate::bench::print(&report);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("botclaw bench: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Node(args) => run_node(*args),
        Command::Sim(args) => crate::sim::run(args),
        Command::Rebalance(args) => match crate::status::rebalance_dry_run(args.admin) {
            Ok(previews) if args.json => {
                println!("{}", serde_json::to_string_pretty(&previews).expect("serializes"));
                ExitCode::SUCCESS
            }
            Ok(previews) => {
                print!("{}", crate::status::render_dry_run(&previews));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("botclaw rebalance: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "botclaw", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Tls(TlsCommand::Init { dir, names, server_name, ips }) => {
            match crate::tls::init(&dir, &names, &server_name, &ips) {
                Ok(()) => {
                    println!(
                        "wrote {}/ca.pem and a certificate per node; keep ca-key.pem and the \
                         *-key.pem files private (mode 0600)",
                        dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("botclaw tls init: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Up(args) => match crate::up::run(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("botclaw up: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Drain(args) => {
            match crate::status::drain(args.admin, Duration::from_secs(args.wait_s)) {
                Ok(took) => {
                    println!("{} drained and left after {:.1} s", args.admin, took.as_secs_f64());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("botclaw drain: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Placement(args) => match crate::status::placement(args.admin, &args.conv) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("botclaw placement: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Shard(ShardCommand::Force { admin, shard, to, yes_lose_turns }) => {
            if !yes_lose_turns {
                eprintln!(
                    "botclaw shard force: shard {shard} restarts on {to} from whatever {to} holds; \
                     turns its last in-sync members acknowledged may be lost. \
                     Add --yes-lose-turns to confirm."
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            match crate::status::force(admin, shard, &to) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("botclaw shard force: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Flags(cmd) => match crate::flags::run(cmd) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("botclaw flags: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Status(StatusArgs { admin, watch: Some(every), json }) => {
            if !(every.is_finite() && every >= 0.1) {
                eprintln!("botclaw status: --watch takes at least 0.1 seconds");
                return ExitCode::from(2);
            }
            loop {
                let shown = match crate::status::fetch(admin) {
                    Ok(status) if json => {
                        serde_json::to_string_pretty(&status).expect("status serializes") + "\n"
                    }
                    Ok(status) => crate::status::render(&status),
                    Err(e) => format!("{admin} does not answer: {e:#}\n"),
                };
                // Clear the screen and go home, then the table and when it was taken.
                let now = httpdate::fmt_http_date(std::time::SystemTime::now());
                print!("\x1b[2J\x1b[H{shown}\n(every {every} s, at {now}; Ctrl-C to stop)\n");
                std::thread::sleep(Duration::from_secs_f64(every));
            }
        }
        Command::Status(args) => match crate::status::fetch(args.admin) {
            Ok(status) if args.json => {
                println!("{}", serde_json::to_string_pretty(&status).expect("status serializes"));
                ExitCode::SUCCESS
            }
            Ok(status) => {
                print!("{}", crate::status::render(&status));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("botclaw status: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Exit code for configuration errors, as for command-line usage errors.
const EXIT_CONFIG: u8 = 2;

/// The node's configuration: the file, the `BOTCLAW_*` environment over it, the flags over
/// both; then the defaults that depend on this machine (name from the hostname, data
/// directory absolute).
fn node_config(args: &NodeArgs) -> Result<botclaw_config::NodeConfig, String> {
    let file =
        RawNodeConfig::load(args.config.as_deref(), std::env::vars()).map_err(|e| e.to_string())?;
    let mut raw = args.apply_flags(file.merge(args.overrides()));
    if raw.name.is_none() {
        let port =
            raw.gossip_addr.as_deref().and_then(|a| a.parse::<SocketAddr>().ok()).map_or(
                botclaw_config::local_ports(botclaw_config::DEFAULT_BASE_PORT, 0)[2],
                |a| a.port(),
            );
        let host = crate::addrs::hostname().unwrap_or_default();
        raw.name = Some(botclaw_config::default_node_name(&host, port).ok_or_else(|| {
            format!("no --name given and the hostname {host:?} cannot name a node: set --name or BOTCLAW_NAME")
        })?);
    }
    let mut cfg = raw.validate().map_err(|e| e.to_string())?;
    if cfg.data_dir.is_relative() {
        let cwd = std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
        cfg.data_dir = cwd.join(&cfg.data_dir);
    }
    Ok(cfg)
}

fn run_node(args: NodeArgs) -> ExitCode {
    let cfg = match node_config(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("botclaw node: config error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        println!("# botclaw node: configuration is valid (the secret is not shown)");
        print!("{}", toml::to_string_pretty(&cfg).expect("config serializes"));
        return ExitCode::SUCCESS;
    }
    init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("botclaw node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::node::run(cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<crate::node::StoreUnwritable>() => {
            eprintln!("botclaw node: {e:#}");
            ExitCode::from(crate::node::EXIT_STORE_UNWRITABLE)
        }
        Err(e) if e.is::<crate::node::NameTaken>() => {
            eprintln!("botclaw node: {e:#}");
            ExitCode::from(crate::node::EXIT_NAME_TAKEN)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("botclaw node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
