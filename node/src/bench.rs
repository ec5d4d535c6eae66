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
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
    /// Send each turn straight to its conversation's owner, as a placement-aware client
    /// does: every connection opens one stream per node (learned from `topology`), sends
    /// a conversation's first turn to its home node and later ones to the node the last
    /// reply named (a reply's `node` is the node that owns the conversation).
    #[arg(long)]
    pub direct: bool,
    /// Also run the same load against this Redis server (`SET conversation text`, the same
    /// connections and pipeline depth), with its CPU time from `INFO cpu`.
    #[arg(long, value_parser = crate::addrs::socket_addr_arg)]
    pub baseline_redis: Option<SocketAddr>,
    /// Run only the baselines asked for, not the cluster.
    #[arg(long)]
    pub baselines_only: bool,
    /// Admin address of a node (repeatable: give every node's): their CPU time, memory and
    /// active conversations are read before and after, for CPU seconds per 1000 turns and
    /// memory per conversation of the whole cluster.
    #[arg(long, value_parser = crate::addrs::socket_addr_arg)]
    pub admin: Vec<SocketAddr>,
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
    /// CPU time the server processes spent during the run (the nodes given with `--admin`,
    /// the echo server, the Redis server), when it could be read.
    pub cpu_seconds: Option<f64>,
    pub cpu_s_per_1000_turns: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub connections: usize,
    pub conversations: usize,
    pub pipeline: usize,
    pub skew: f64,
    pub bot: String,
    pub direct: bool,
    /// The cluster's run (none with `--baselines-only`).
    pub cluster: Option<RunReport>,
    pub baseline: Option<RunReport>,
    pub baseline_redis: Option<RunReport>,
    /// cluster / baseline: throughput, p50 of local and forwarded turns, CPU per turn.
    pub ratios: Option<BTreeMap<String, f64>>,
    /// cluster / Redis: the same figures.
    pub ratios_redis: Option<BTreeMap<String, f64>>,
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

impl Shared {
    /// Takes one turn from the budget, or says the budget is spent.
    fn take(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        if self.issued.fetch_add(1, Ordering::Relaxed) >= self.total {
            self.stop.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }
}

struct ConnResult {
    all: Histogram<u64>,
    local: Histogram<u64>,
    forwarded: Histogram<u64>,
    errors: HashMap<String, u64>,
}

impl ConnResult {
    fn new() -> ConnResult {
        ConnResult {
            all: histogram(),
            local: histogram(),
            forwarded: histogram(),
            errors: HashMap::new(),
        }
    }

    /// Records one answer: a reply run by `node` (local when it is the node the turn was
    /// sent to), or an error code.
    fn record(&mut self, t0: Instant, ran_on: Result<bool, &str>) {
        let us = t0.elapsed().as_micros().max(1) as u64;
        match ran_on {
            Ok(local) => {
                self.all.saturating_record(us);
                let h = if local { &mut self.local } else { &mut self.forwarded };
                h.saturating_record(us);
            }
            Err(code) => *self.errors.entry(code.to_string()).or_default() += 1,
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// What one connection sends: conversations drawn uniformly or by Zipf, and the text.
struct Workload {
    args: Arc<BenchArgs>,
    rng: StdRng,
    zipf: Option<Zipf<f64>>,
    filler: String,
}

impl Workload {
    fn new(args: Arc<BenchArgs>, conn: usize) -> Result<Workload> {
        let rng =
            StdRng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(conn as u64));
        let zipf = (args.skew > 0.0)
            .then(|| Zipf::new(args.conversations as f64, args.skew))
            .transpose()
            .map_err(|e| anyhow::anyhow!("bad --skew: {e}"))?;
        let filler = "x".repeat(args.text_bytes);
        Ok(Workload { args, rng, zipf, filler })
    }

    /// The next conversation (by index) and text.
    fn next(&mut self) -> (usize, String) {
        let k = match &self.zipf {
            Some(z) => z.sample(&mut self.rng) as usize - 1,
            None => self.rng.random_range(0..self.args.conversations),
        };
        let text = match self.args.cities {
            Some(n) => format!("weather in city-{}", self.rng.random_range(0..n.max(1))),
            None => self.filler.clone(),
        };
        (k, text)
    }

    /// Draws turns while fewer than `pipeline` are in flight and the shared budget lasts,
    /// handing each (conversation, text) to `start`.
    fn top_up(&mut self, shared: &Shared, in_flight: usize, mut start: impl FnMut(usize, String)) {
        for _ in in_flight..self.args.pipeline {
            if !shared.take() {
                break;
            }
            let (k, text) = self.next();
            start(k, text);
        }
    }
}

fn conv_name(args: &BenchArgs, k: usize) -> String {
    format!("{}-{k}", args.prefix)
}

/// The `say` line of turn `id` (the connection's `seq`-th) to conversation `k`.
fn say_line(args: &BenchArgs, k: usize, conn: usize, seq: u64, text: String) -> Vec<u8> {
    Request::Say {
        conv: conv_name(args, k),
        id: format!("{conn}-{seq}"),
        text,
        bot: Some(args.bot.clone()),
        user: None,
    }
    .to_line()
}

/// Writes what `out` holds, if anything, and empties it.
async fn flush(writer: &mut (impl AsyncWrite + Unpin), out: &mut Vec<u8>) -> Result<()> {
    if !out.is_empty() {
        writer.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Connects and says hello; returns the stream and the name of the node.
async fn open_chat(addr: SocketAddr) -> Result<(TcpStream, String, BytesMut)> {
    let mut stream =
        TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let hello = Request::Hello { token: None, client: Some("botclaw-bench".into()) };
    stream.write_all(&hello.to_line()).await?;
    let mut framer = LineFramer::new(1 << 20);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        if let Some(Frame::Line(line)) = framer.next_frame(&mut buf) {
            return match parse_response(&line).map_err(anyhow::Error::msg)? {
                Response::Welcome { node, .. } => Ok((stream, node, buf)),
                other => bail!("unexpected greeting from {addr}: {other:?}"),
            };
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("{addr} closed the connection");
        }
    }
}

/// The turn a reply or error answers (its id's sequence number), the node that ran it or
/// the error code.
fn answer_of(response: Response) -> Result<Option<(u64, Result<String, &'static str>)>> {
    let (id, outcome) = match response {
        Response::Reply { id, node, .. } => (id, Ok(node)),
        Response::Error { id: Some(id), code, .. } => (id, Err(code.as_str())),
        other => bail!("unexpected answer: {other:?}"),
    };
    Ok(id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok()).map(|n| (n, outcome)))
}

/// One connection's loop: keep `pipeline` requests in flight until the shared budget is
/// spent, then collect the last answers.
async fn drive(
    addr: SocketAddr,
    args: Arc<BenchArgs>,
    shared: Arc<Shared>,
    conn: usize,
) -> Result<ConnResult> {
    let (mut stream, gateway, mut buf) = open_chat(addr).await?;
    let mut framer = LineFramer::new(1 << 20);
    let mut work = Workload::new(args.clone(), conn)?;
    let mut started: HashMap<u64, Instant> = HashMap::with_capacity(args.pipeline * 2);
    let mut result = ConnResult::new();
    let mut next_id = 0u64;
    let mut out = Vec::with_capacity(args.pipeline * 128);
    loop {
        work.top_up(&shared, started.len(), |k, text| {
            next_id += 1;
            out.extend_from_slice(&say_line(&args, k, conn, next_id, text));
            started.insert(next_id, Instant::now());
        });
        flush(&mut stream, &mut out).await?;
        if started.is_empty() {
            return Ok(result);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("{addr} closed the connection with {} requests in flight", started.len());
        }
        while let Some(frame) = framer.next_frame(&mut buf) {
            let Frame::Line(line) = frame else { continue };
            let response = parse_response(&line).map_err(anyhow::Error::msg)?;
            let Some((n, outcome)) = answer_of(response)? else { continue };
            let Some(t0) = started.remove(&n) else { continue };
            result.record(t0, outcome.as_ref().map(|node| *node == gateway).map_err(|c| *c));
            shared.done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Aborts the reader tasks of a direct connection when it ends, however it ends.
struct Readers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Readers {
    fn drop(&mut self) {
        for r in &self.0 {
            r.abort();
        }
    }
}

/// One connection of a placement-aware client: a stream to every node; a conversation's
/// turn goes to the node that answered its last turn (the owner), its first turn to this
/// connection's home node.
async fn drive_direct(
    nodes: Arc<Vec<SocketAddr>>,
    args: Arc<BenchArgs>,
    shared: Arc<Shared>,
    conn: usize,
) -> Result<ConnResult> {
    use tokio::sync::mpsc;
    // Answers of every stream, tagged by stream; `None` when a stream closed.
    let (tx, mut rx) = mpsc::channel::<(usize, Option<Response>)>(args.pipeline + nodes.len());
    let mut writers = Vec::with_capacity(nodes.len());
    let mut names = Vec::with_capacity(nodes.len());
    let mut readers = Readers(Vec::with_capacity(nodes.len()));
    for (i, &addr) in nodes.iter().enumerate() {
        let (stream, name, mut buf) = open_chat(addr).await?;
        let (mut read, write) = stream.into_split();
        let tx = tx.clone();
        readers.0.push(tokio::spawn(async move {
            let mut framer = LineFramer::new(1 << 20);
            loop {
                while let Some(frame) = framer.next_frame(&mut buf) {
                    let Frame::Line(line) = frame else { continue };
                    let Ok(response) = parse_response(&line) else { continue };
                    if tx.send((i, Some(response))).await.is_err() {
                        return;
                    }
                }
                if !matches!(read.read_buf(&mut buf).await, Ok(n) if n > 0) {
                    let _ = tx.send((i, None)).await;
                    return;
                }
            }
        }));
        writers.push(write);
        names.push(name);
    }
    let home = conn % nodes.len();
    let mut work = Workload::new(args.clone(), conn)?;
    // The owner of each conversation this connection has heard of, as a stream index.
    let mut owners: HashMap<usize, usize> = HashMap::new();
    let mut started: HashMap<u64, (Instant, usize, usize)> =
        HashMap::with_capacity(args.pipeline * 2);
    let mut result = ConnResult::new();
    let mut next_id = 0u64;
    let mut outs: Vec<Vec<u8>> = vec![Vec::with_capacity(args.pipeline * 128); nodes.len()];
    loop {
        work.top_up(&shared, started.len(), |k, text| {
            let to = owners.get(&k).copied().unwrap_or(home);
            next_id += 1;
            outs[to].extend_from_slice(&say_line(&args, k, conn, next_id, text));
            started.insert(next_id, (Instant::now(), to, k));
        });
        for (out, writer) in outs.iter_mut().zip(&mut writers) {
            flush(writer, out).await?;
        }
        if started.is_empty() {
            return Ok(result);
        }
        let mut next = rx.recv().await;
        while let Some((i, answer)) = next {
            let Some(response) = answer else {
                bail!("{} closed the connection with {} in flight", nodes[i], started.len());
            };
            if let Some((n, outcome)) = answer_of(response)? {
                if let Some((t0, to, k)) = started.remove(&n) {
                    if let Ok(node) = &outcome {
                        if let Some(owner) = names.iter().position(|m| m == node) {
                            owners.insert(k, owner);
                        }
                    }
                    result.record(
                        t0,
                        outcome.as_ref().map(|node| *node == names[to]).map_err(|c| *c),
                    );
                    shared.done.fetch_add(1, Ordering::Relaxed);
                }
            }
            next = rx.try_recv().ok();
        }
    }
}

/// One connection of the Redis baseline: `SET conversation text`, pipelined the same way.
async fn drive_redis(
    addr: SocketAddr,
    args: Arc<BenchArgs>,
    shared: Arc<Shared>,
    conn: usize,
) -> Result<ConnResult> {
    let mut stream =
        TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut work = Workload::new(args.clone(), conn)?;
    let mut started: std::collections::VecDeque<Instant> = Default::default();
    let mut result = ConnResult::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(args.pipeline * 128);
    loop {
        work.top_up(&shared, started.len(), |k, text| {
            out.extend_from_slice(&resp_command(&["SET", &conv_name(&args, k), &text]));
            started.push_back(Instant::now());
        });
        flush(&mut stream, &mut out).await?;
        if started.is_empty() {
            return Ok(result);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("{addr} closed the connection with {} requests in flight", started.len());
        }
        // Each SET answers one line: `+OK` or `-ERR ...`.
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(end + 1);
            let Some(t0) = started.pop_front() else { bail!("{addr} answered more than asked") };
            let outcome = if line.starts_with(b"+") { Ok(true) } else { Err("redis_error") };
            result.record(t0, outcome);
            shared.done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A command in RESP (Redis's protocol): an array of bulk strings.
fn resp_command(parts: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The CPU time Redis reports (`used_cpu_sys` + `used_cpu_user` of `INFO cpu`).
async fn redis_cpu_seconds(addr: SocketAddr) -> Result<f64> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&resp_command(&["INFO", "cpu"])).await?;
    let mut buf = Vec::new();
    // A bulk string: `$LEN\r\n` then LEN bytes and `\r\n`.
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("redis at {addr} closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let Some((head, body)) = text.split_once("\r\n") else { continue };
        let len: usize = head.trim_start_matches('$').parse().context("INFO answer")?;
        if body.len() < len {
            continue;
        }
        let field = |name: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
        };
        return match (field("used_cpu_sys:"), field("used_cpu_user:")) {
            (Some(sys), Some(user)) => Ok(sys + user),
            _ => bail!("redis at {addr}: INFO cpu has no used_cpu_sys/used_cpu_user"),
        };
    }
}

/// Where a load goes.
enum Target {
    /// Chat gateways, connections spread over them.
    Gateways(Vec<SocketAddr>),
    /// Every node, each turn to its owner.
    Direct(Arc<Vec<SocketAddr>>),
    Redis(SocketAddr),
}

async fn run_load(
    name: &str,
    target: &Target,
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
        let (args, shared) = (args.clone(), shared.clone());
        tasks.push(match target {
            Target::Gateways(addrs) => {
                tokio::spawn(drive(addrs[conn % addrs.len()], args, shared, conn))
            }
            Target::Direct(nodes) => tokio::spawn(drive_direct(nodes.clone(), args, shared, conn)),
            Target::Redis(addr) => tokio::spawn(drive_redis(*addr, args, shared, conn)),
        });
    }
    let ticker = progress.then(|| {
        let shared = shared.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = shared.done.load(Ordering::Relaxed);
                eprint!("\r{name}: {done}/{} turns, {}/s      ", shared.total, done - last);
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
        target: name.to_string(),
        turns,
        seconds,
        turns_per_s: turns as f64 / seconds,
        errors,
        latency_us: Latency::of(&all),
        local_us: Latency::of(&local),
        forwarded_us: Latency::of(&forwarded),
        cpu_seconds: None,
        cpu_s_per_1000_turns: None,
    })
}

impl RunReport {
    /// Adds the CPU the servers spent, read before and after the run.
    fn with_cpu(mut self, before: Option<f64>, after: Option<f64>) -> RunReport {
        if let (Some(b), Some(a)) = (before, after) {
            let spent = (a - b).max(0.0);
            self.cpu_seconds = Some(spent);
            self.cpu_s_per_1000_turns =
                (self.turns > 0).then(|| spent * 1000.0 / self.turns as f64);
        }
        self
    }
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

/// (rss, active conversations, CPU seconds) of the nodes at `admins`, summed.
fn nodes_status(admins: &[SocketAddr]) -> Result<(u64, u64, f64)> {
    let mut sum = (0, 0, 0.0);
    for &admin in admins {
        let status: serde_json::Value =
            crate::http::get_json(admin, "/status", Duration::from_secs(5))?;
        let field = |name: &str| status[name].as_u64().with_context(|| format!("no {name}"));
        sum.0 += field("rss_bytes")?;
        sum.1 += field("active_conversations")?;
        sum.2 += status["cpu_seconds"].as_f64().context("status has no cpu_seconds")?;
    }
    Ok(sum)
}

/// User plus system CPU seconds of a local process, from /proc.
#[allow(unsafe_code)]
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks / per_second as f64)
}

/// cluster / baseline: throughput, p50 of local and forwarded turns, CPU per turn.
fn ratios(cluster: &RunReport, base: &RunReport) -> BTreeMap<String, f64> {
    let mut r = BTreeMap::new();
    r.insert("throughput".to_string(), cluster.turns_per_s / base.turns_per_s);
    let base_p50 = base.latency_us.as_ref().map(|l| l.p50 as f64);
    for (name, lat) in [
        ("p50", &cluster.latency_us),
        ("p50_local", &cluster.local_us),
        ("p50_forwarded", &cluster.forwarded_us),
    ] {
        if let (Some(l), Some(b)) = (lat, base_p50) {
            r.insert(name.to_string(), l.p50 as f64 / b);
        }
    }
    if let (Some(c), Some(b)) = (cluster.cpu_s_per_1000_turns, base.cpu_s_per_1000_turns) {
        if b > 0.0 {
            r.insert("cpu_per_turn".to_string(), c / b);
        }
    }
    r
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
        let before = process_cpu_seconds(server.id());
        let report = run_load("baseline echo", &Target::Gateways(vec![addr]), &args, progress)
            .await
            .map(|r| r.with_cpu(before, process_cpu_seconds(server.id())));
        let _ = server.kill();
        let _ = server.wait();
        Some(report?)
    } else {
        None
    };
    let baseline_redis = match args.baseline_redis {
        Some(addr) => {
            let before = redis_cpu_seconds(addr).await.ok();
            let report = run_load("baseline redis", &Target::Redis(addr), &args, progress).await?;
            Some(report.with_cpu(before, redis_cpu_seconds(addr).await.ok()))
        }
        None => None,
    };
    if args.baselines_only {
        return Ok(Report {
            connections: args.connections,
            conversations: args.conversations,
            pipeline: args.pipeline,
            skew: args.skew,
            bot: args.bot.clone(),
            direct: args.direct,
            cluster: None,
            baseline,
            baseline_redis,
            ratios: None,
            ratios_redis: None,
            memory: None,
        });
    }
    let target = if args.direct {
        Target::Direct(Arc::new(cluster_nodes(&args.connect).await?))
    } else {
        Target::Gateways(args.connect.clone())
    };
    let admins = args.admin.clone();
    let status = |admins: Vec<SocketAddr>| async move {
        if admins.is_empty() {
            return Ok(None);
        }
        tokio::task::spawn_blocking(move || nodes_status(&admins)).await?.map(Some)
    };
    let before = status(admins.clone()).await?;
    let cluster = run_load("botclaw", &target, &args, progress).await?;
    let after = status(admins).await?;
    let cluster = cluster.with_cpu(before.map(|b| b.2), after.map(|a| a.2));
    let memory = before.zip(after).map(|((rss0, active0, _), (rss1, active1, _))| {
        let grew = active1.saturating_sub(active0);
        MemoryReport {
            rss_before_bytes: rss0,
            rss_after_bytes: rss1,
            active_before: active0,
            active_after: active1,
            bytes_per_active_conversation: (grew > 0)
                .then(|| rss1.saturating_sub(rss0) as f64 / grew as f64),
        }
    });
    Ok(Report {
        connections: args.connections,
        conversations: args.conversations,
        pipeline: args.pipeline,
        skew: args.skew,
        bot: args.bot.clone(),
        direct: args.direct,
        ratios: baseline.as_ref().map(|b| ratios(&cluster, b)),
        ratios_redis: baseline_redis.as_ref().map(|b| ratios(&cluster, b)),
        cluster: Some(cluster),
        baseline,
        baseline_redis,
        memory,
    })
}

/// The client addresses of every live node, from the `topology` of the first gateway that
/// answers.
async fn cluster_nodes(gateways: &[SocketAddr]) -> Result<Vec<SocketAddr>> {
    use botclaw_client::client::{Client, ClientOptions};
    let mut last = None;
    for &addr in gateways {
        let opts = ClientOptions { client_name: "botclaw-bench".into(), ..Default::default() };
        match Client::connect(addr, opts).await {
            Ok(client) => {
                let nodes = client.topology().await?;
                let addrs: Vec<SocketAddr> =
                    nodes.iter().filter_map(|n| n.client_addr.parse().ok()).collect();
                if addrs.is_empty() {
                    bail!("{addr} knows no live node to send turns to");
                }
                return Ok(addrs);
            }
            Err(e) => last = Some(e),
        }
    }
    bail!("no gateway answered: {last:?}")
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
    if let (Some(cpu), Some(per)) = (r.cpu_seconds, r.cpu_s_per_1000_turns) {
        println!("  cpu {cpu:.2} s = {per:.4} s per 1000 turns");
    }
    if !r.errors.is_empty() {
        println!("  errors: {:?}", r.errors);
    }
}

pub fn print(report: &Report) {
    println!(
        "{} connections, {} conversations, pipeline {}, skew {}, bot {}{}",
        report.connections,
        report.conversations,
        report.pipeline,
        report.skew,
        report.bot,
        if report.direct { ", each turn sent to its owner" } else { "" }
    );
    if let Some(b) = &report.baseline {
        print_run(b);
    }
    if let Some(b) = &report.baseline_redis {
        print_run(b);
    }
    if let Some(c) = &report.cluster {
        print_run(c);
    }
    for (name, ratios) in [("echo", &report.ratios), ("redis", &report.ratios_redis)] {
        if let Some(r) = ratios {
            let parts: Vec<String> = r.iter().map(|(k, v)| format!("{k} {v:.2}x")).collect();
            println!("vs {name}: {}", parts.join(", "));
        }
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
