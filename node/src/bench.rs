//! `botclaw bench`: a load generator for the chat protocol.
//!
//! C connections spread over the given gateways, each keeping D requests in flight
//! (pipelining), N turns in all over K conversations chosen uniformly or with a Zipf skew.
//! Latency is recorded per reply in an HDR histogram, split by whether the gateway ran the
//! turn itself or forwarded it (the reply's `node` says which). With `--baseline-echo` the
//! same load first runs against a minimal in-process tokio server that answers each line
//! with the same framing and no actors, so figures come with a baseline from the same run.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use botclaw_client::codec::{Frame, LineFramer};
use botclaw_client::protocol::{parse_request, parse_response, Request, Response};
use bytes::BytesMut;
use clap::Args;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Gateway client address (repeatable; connections are spread over them).
    #[arg(long = "connect", default_value = "127.0.0.1:7000", value_parser = crate::addrs::socket_addr_arg)]
    pub connect: Vec<SocketAddr>,
    /// Client connections.
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Distinct conversations.
    #[arg(long, default_value_t = 1000)]
    pub conversations: usize,
    /// Turns in all.
    #[arg(long, default_value_t = 100_000)]
    pub turns: u64,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16)]
    pub pipeline: usize,
    /// Zipf exponent of conversation popularity; 0 is uniform.
    #[arg(long, default_value_t = 0.0)]
    pub skew: f64,
    /// Bot of every conversation.
    #[arg(long, default_value = "echo")]
    pub bot: String,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 32)]
    pub text_bytes: usize,
    /// Ask about one of this many cities ("weather in city-K", K drawn per message)
    /// instead of sending filler text: with `--bot weather`, a load where many users ask
    /// for the same cities.
    #[arg(long)]
    pub cities: Option<u32>,
    /// Prefix of conversation ids (runs with different prefixes do not share state).
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Also run the same load against a minimal tokio server with the same framing.
    #[arg(long)]
    pub baseline_echo: bool,
    /// Admin address of a node to read its memory and active conversations before and
    /// after (memory per conversation).
    #[arg(long, value_parser = crate::addrs::socket_addr_arg)]
    pub admin: Option<SocketAddr>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Seed of the conversation choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Option<Latency> {
        (!h.is_empty()).then(|| Latency {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub target: String,
    pub turns: u64,
    pub seconds: f64,
    pub turns_per_s: f64,
    pub errors: BTreeMap<String, u64>,
    pub latency_us: Option<Latency>,
    /// Turns the gateway ran itself.
    pub local_us: Option<Latency>,
    /// Turns the gateway forwarded to the owner.
    pub forwarded_us: Option<Latency>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub connections: usize,
    pub conversations: usize,
    pub pipeline: usize,
    pub skew: f64,
    pub bot: String,
    pub cluster: RunReport,
    pub baseline: Option<RunReport>,
    /// cluster / baseline: throughput, and p50 of local and forwarded turns.
    pub ratios: Option<BTreeMap<String, f64>>,
    pub memory: Option<MemoryReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub active_before: u64,
    pub active_after: u64,
    pub bytes_per_active_conversation: Option<f64>,
}

struct Shared {
    done: AtomicU64,
    issued: AtomicU64,
    total: u64,
    stop: AtomicBool,
}

struct ConnResult {
    all: Histogram<u64>,
    local: Histogram<u64>,
    forwarded: Histogram<u64>,
    errors: HashMap<String, u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// One connection's loop: keep `pipeline` requests in flight until the shared budget is
/// spent, then collect the last answers.
async fn drive(
    addr: SocketAddr,
    args: Arc<BenchArgs>,
    shared: Arc<Shared>,
    conn: usize,
) -> Result<ConnResult> {
    let mut stream =
        TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let hello = Request::Hello { token: None, client: Some("botclaw-bench".into()) };
    stream.write_all(&hello.to_line()).await?;
    let mut framer = LineFramer::new(1 << 20);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let gateway = loop {
        if let Some(Frame::Line(line)) = framer.next_frame(&mut buf) {
            match parse_response(&line).map_err(anyhow::Error::msg)? {
                Response::Welcome { node, .. } => break node,
                other => bail!("unexpected greeting from {addr}: {other:?}"),
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("{addr} closed the connection");
        }
    };
    let mut rng =
        StdRng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(conn as u64));
    let zipf = (args.skew > 0.0)
        .then(|| Zipf::new(args.conversations as f64, args.skew))
        .transpose()
        .map_err(|e| anyhow::anyhow!("bad --skew: {e}"))?;
    let text: String = "x".repeat(args.text_bytes);
    let mut started: HashMap<u64, Instant> = HashMap::with_capacity(args.pipeline * 2);
    let mut result = ConnResult {
        all: histogram(),
        local: histogram(),
        forwarded: histogram(),
        errors: HashMap::new(),
    };
    let mut next_id = 0u64;
    let mut out = Vec::with_capacity(args.pipeline * 128);
    loop {
        // Top up the pipeline.
        while started.len() < args.pipeline && !shared.stop.load(Ordering::Relaxed) {
            if shared.issued.fetch_add(1, Ordering::Relaxed) >= shared.total {
                shared.stop.store(true, Ordering::Relaxed);
                break;
            }
            let k = match &zipf {
                Some(z) => z.sample(&mut rng) as usize - 1,
                None => rng.random_range(0..args.conversations),
            };
            next_id += 1;
            let text = match args.cities {
                Some(n) => format!("weather in city-{}", rng.random_range(0..n.max(1))),
                None => text.clone(),
            };
            let say = Request::Say {
                conv: format!("{}-{k}", args.prefix),
                id: format!("{conn}-{next_id}"),
                text,
                bot: Some(args.bot.clone()),
                user: None,
            };
            out.extend_from_slice(&say.to_line());
            started.insert(next_id, Instant::now());
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if started.is_empty() {
            return Ok(result);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("{addr} closed the connection with {} requests in flight", started.len());
        }
        while let Some(frame) = framer.next_frame(&mut buf) {
            let Frame::Line(line) = frame else { continue };
            let response = parse_response(&line).map_err(anyhow::Error::msg)?;
            let (id, node, code) = match response {
                Response::Reply { id, node, .. } => (id, Some(node), None),
                Response::Error { id: Some(id), code, .. } => (id, None, Some(code)),
                other => bail!("unexpected answer: {other:?}"),
            };
            let Some(n) = id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let Some(t0) = started.remove(&n) else { continue };
            let us = t0.elapsed().as_micros().max(1) as u64;
            match (node, code) {
                (Some(node), _) => {
                    result.all.saturating_record(us);
                    if node == gateway {
                        result.local.saturating_record(us);
                    } else {
                        result.forwarded.saturating_record(us);
                    }
                }
                (None, Some(code)) => {
                    *result.errors.entry(code.as_str().to_string()).or_default() += 1
                }
                (None, None) => {}
            }
            shared.done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run_load(
    target: &str,
    addrs: &[SocketAddr],
    args: &Arc<BenchArgs>,
    progress: bool,
) -> Result<RunReport> {
    let shared = Arc::new(Shared {
        done: AtomicU64::new(0),
        issued: AtomicU64::new(0),
        total: args.turns,
        stop: AtomicBool::new(false),
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for conn in 0..args.connections {
        let addr = addrs[conn % addrs.len()];
        tasks.push(tokio::spawn(drive(addr, args.clone(), shared.clone(), conn)));
    }
    let ticker = progress.then(|| {
        let shared = shared.clone();
        let target = target.to_string();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = shared.done.load(Ordering::Relaxed);
                eprint!("\r{target}: {done}/{} turns, {}/s      ", shared.total, done - last);
                last = done;
            }
        })
    });
    let mut all = histogram();
    let mut local = histogram();
    let mut forwarded = histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for task in tasks {
        let r = task.await??;
        all.add(&r.all)?;
        local.add(&r.local)?;
        forwarded.add(&r.forwarded)?;
        for (code, n) in r.errors {
            *errors.entry(code).or_default() += n;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(t) = ticker {
        t.abort();
        eprintln!();
    }
    let turns = all.len();
    Ok(RunReport {
        target: target.to_string(),
        turns,
        seconds,
        turns_per_s: turns as f64 / seconds,
        errors,
        latency_us: Latency::of(&all),
        local_us: Latency::of(&local),
        forwarded_us: Latency::of(&forwarded),
    })
}

/// The baseline: reads lines, parses each as a request and answers a `say` with a reply of
/// the same shape, on plain tokio with no actors, no routing and no state.
pub async fn echo_server(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut framer = LineFramer::new(64 * 1024);
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let mut out = Vec::with_capacity(16 * 1024);
            loop {
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                while let Some(Frame::Line(line)) = framer.next_frame(&mut buf) {
                    let response = match parse_request(&line) {
                        Ok(Request::Say { conv, id, text, .. }) => Response::Reply {
                            conv,
                            id,
                            messages: vec![text],
                            turn: 1,
                            node: "echo".into(),
                        },
                        Ok(_) => Response::Welcome { node: "echo".into(), protocol: 1 },
                        Err(e) => e.into_response(),
                    };
                    serde_json::to_writer(&mut out, &response).expect("serializes");
                    out.push(b'\n');
                }
                if stream.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        });
    }
}

/// Starts `botclaw echo-server` on a free port and returns it with its address.
fn spawn_echo_server() -> Result<(std::process::Child, SocketAddr)> {
    use std::io::BufRead;
    let exe = std::env::current_exe().context("locating the botclaw binary")?;
    let mut child = std::process::Command::new(exe)
        .args(["echo-server", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("starting the baseline echo server")?;
    let stdout = child.stdout.take().context("echo server stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    match line.trim().strip_prefix("listening on ").and_then(|a| a.parse().ok()) {
        Some(addr) => Ok((child, addr)),
        None => {
            let _ = child.kill();
            bail!("the echo server did not start: {line:?}")
        }
    }
}

/// `botclaw echo-server`: the baseline server as its own process.
pub async fn run_echo_server(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    echo_server(listener).await;
    Ok(())
}

fn node_memory(admin: SocketAddr) -> Result<(u64, u64)> {
    let status: serde_json::Value =
        crate::http::get_json(admin, "/status", Duration::from_secs(5))?;
    let rss = status["rss_bytes"].as_u64().context("status has no rss_bytes")?;
    let active =
        status["active_conversations"].as_u64().context("status has no active_conversations")?;
    Ok((rss, active))
}

pub async fn run(args: BenchArgs) -> Result<Report> {
    if args.connections == 0
        || args.pipeline == 0
        || args.conversations == 0
        || args.connect.is_empty()
    {
        bail!("--connections, --pipeline, --conversations and --connect must be positive");
    }
    let args = Arc::new(args);
    let progress = !args.json;
    let baseline = if args.baseline_echo {
        let (mut server, addr) = spawn_echo_server()?;
        let report = run_load("baseline echo", &[addr], &args, progress).await;
        let _ = server.kill();
        let _ = server.wait();
        Some(report?)
    } else {
        None
    };
    let before = args.admin.map(node_memory).transpose()?;
    let cluster = run_load("botclaw", &args.connect, &args, progress).await?;
    let memory = match (args.admin, before) {
        (Some(admin), Some((rss0, active0))) => {
            let (rss1, active1) = node_memory(admin)?;
            let grew = active1.saturating_sub(active0);
            Some(MemoryReport {
                rss_before_bytes: rss0,
                rss_after_bytes: rss1,
                active_before: active0,
                active_after: active1,
                bytes_per_active_conversation: (grew > 0)
                    .then(|| rss1.saturating_sub(rss0) as f64 / grew as f64),
            })
        }
        _ => None,
    };
    let ratios = baseline.as_ref().map(|b| {
        let mut r = BTreeMap::new();
        r.insert("throughput".to_string(), cluster.turns_per_s / b.turns_per_s);
        let base_p50 = b.latency_us.as_ref().map(|l| l.p50 as f64);
        for (name, lat) in
            [("p50_local", &cluster.local_us), ("p50_forwarded", &cluster.forwarded_us)]
        {
            if let (Some(l), Some(base)) = (lat, base_p50) {
                r.insert(name.to_string(), l.p50 as f64 / base);
            }
        }
        r
    });
    Ok(Report {
        connections: args.connections,
        conversations: args.conversations,
        pipeline: args.pipeline,
        skew: args.skew,
        bot: args.bot.clone(),
        cluster,
        baseline,
        ratios,
        memory,
    })
}

fn print_run(r: &RunReport) {
    println!(
        "{}: {} turns in {:.2} s = {:.0} turns/s",
        r.target, r.turns, r.seconds, r.turns_per_s
    );
    for (name, lat) in
        [("all", &r.latency_us), ("local", &r.local_us), ("forwarded", &r.forwarded_us)]
    {
        if let Some(l) = lat {
            println!(
                "  {name:<10} n={:<8} p50={}us p90={}us p99={}us p99.9={}us max={}us",
                l.count, l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
    }
    if !r.errors.is_empty() {
        println!("  errors: {:?}", r.errors);
    }
}

pub fn print(report: &Report) {
    println!(
        "{} connections, {} conversations, pipeline {}, skew {}, bot {}",
        report.connections, report.conversations, report.pipeline, report.skew, report.bot
    );
    if let Some(b) = &report.baseline {
        print_run(b);
    }
    print_run(&report.cluster);
    if let Some(r) = &report.ratios {
        let parts: Vec<String> = r.iter().map(|(k, v)| format!("{k} {v:.2}x")).collect();
        println!("vs baseline: {}", parts.join(", "));
    }
    if let Some(m) = &report.memory {
        println!(
            "memory: rss {} -> {} bytes, active conversations {} -> {}{}",
            m.rss_before_bytes,
            m.rss_after_bytes,
            m.active_before,
            m.active_after,
            m.bytes_per_active_conversation
                .map(|b| format!(", {b:.0} bytes per conversation"))
                .unwrap_or_default()
        );
    }
}
