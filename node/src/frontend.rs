//! The chat protocol listener: newline-delimited JSON over TCP.
//!
//! One task per connection reads requests, dispatches them without waiting, and writes
//! answers as they complete, batching writes. Answers for one conversation are released in
//! request order (a per-conversation reorder queue keyed by a connection-wide sequence
//! number); answers for different conversations do not wait for each other.
//!
//! Limits: `frame_bytes_max` per line (longer lines are answered `too_large` and skipped),
//! `conn_inflight_max` and `node_inflight_max` requests in flight (past them, `busy` with
//! `retry_after_ms`), `connections_max` connections, `turn_timeout_ms` per request (then
//! `timeout`; a late answer is dropped). Nothing a client sends can panic the task.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::Work;
use botclaw_actors::envelope::{ConvOutcome, ConvRequest, FailKind, Reply};
use botclaw_actors::forwarder::Weight;
use botclaw_client::codec::{Frame, LineFramer};
use botclaw_client::protocol::{
    parse_request, ErrorCode, HistoryTurn, Request, Response, TopologyNode, PROTOCOL_VERSION,
};
use botclaw_config::FrontendConfig;
use botclaw_core::MemberState;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::gossip::ClusterView;
use crate::metrics::Metrics;
use crate::routing::Dispatcher;
use crate::websocket::{self, Speaks};

/// How often a connection looks for requests past their timeout.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Most completed answers handled before writing them out.
const DONE_BATCH_MAX: usize = 1024;
/// Answers buffered past this size are written without waiting for more.
const WRITE_BATCH_BYTES: usize = 32 * 1024;
/// Default and largest `history` limit.
const HISTORY_LIMIT_DEFAULT: u32 = 20;

pub struct Frontend {
    pub dispatcher: Arc<Dispatcher>,
    pub cfg: FrontendConfig,
    pub node: Arc<str>,
    pub view: watch::Receiver<ClusterView>,
    pub metrics: Metrics,
    /// Failed `hello`s per client address within `hello_failure_window_ms`.
    pub hello_failures: HelloFailures,
    /// The largest answer to a turn and to a history request, in bytes (the conversations'
    /// `turn_bytes_max` and `history_bytes_max`): what a request reserves of its
    /// connection's output buffer.
    pub answer_bytes_max: AnswerBytes,
}

#[derive(Debug, Clone, Copy)]
pub struct AnswerBytes {
    pub turn: usize,
    pub history: usize,
}

/// Room for the JSON around an answer's strings.
const ANSWER_ENVELOPE_BYTES: usize = 256;

/// Failed `hello`s per client address, each address forgotten a window after its first
/// failure (a bounded cache: a flood of addresses evicts the oldest).
pub struct HelloFailures {
    counts: mini_moka::sync::Cache<std::net::IpAddr, Arc<std::sync::atomic::AtomicU32>>,
    max: u32,
}

impl HelloFailures {
    pub fn new(cfg: &FrontendConfig) -> HelloFailures {
        let counts = mini_moka::sync::Cache::builder()
            .max_capacity(cfg.hello_failure_addresses_max)
            .time_to_live(Duration::from_millis(cfg.hello_failure_window_ms))
            .build();
        HelloFailures { counts, max: cfg.hello_failures_max }
    }

    fn failed(&self, ip: std::net::IpAddr) {
        let count = self.counts.get(&ip).unwrap_or_else(|| {
            let fresh = Arc::new(std::sync::atomic::AtomicU32::new(0));
            self.counts.insert(ip, fresh.clone());
            fresh
        });
        count.fetch_add(1, Ordering::AcqRel);
    }

    fn blocked(&self, ip: std::net::IpAddr) -> bool {
        self.counts.get(&ip).is_some_and(|c| c.load(Ordering::Acquire) >= self.max)
    }
}

pub async fn serve(
    listener: TcpListener,
    fe: Arc<Frontend>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let permits = Arc::new(Semaphore::new(fe.cfg.connections_max));
    // With tokens, a connection first holds a place among the unauthenticated ones and
    // takes one of `permits` when its `hello` succeeds.
    let anonymous = Arc::new(Semaphore::new(fe.cfg.unauthenticated_connections_max));
    let open = fe.cfg.open();
    let mut acceptor = crate::tls::Acceptor::new(listener, "client");
    loop {
        let (stream, peer) = acceptor.next(|| ()).await;
        if !open && fe.hello_failures.blocked(peer.ip()) {
            fe.metrics.connections_rejected.inc();
            tracing::debug!(%peer, "connection refused: too many failed hellos");
            continue;
        }
        let pool = if open { &permits } else { &anonymous };
        let Ok(permit) = pool.clone().try_acquire_owned() else {
            fe.metrics.connections_rejected.inc();
            tracing::debug!(%peer, open, "connection refused: its pool is full");
            continue;
        };
        let _ = stream.set_nodelay(true);
        crate::node::set_keepalive(&stream, Duration::from_millis(fe.cfg.keepalive_ms));
        let (fe, permits, tls) = (fe.clone(), permits.clone(), tls.clone());
        tokio::spawn(async move {
            fe.metrics.connections.inc();
            let connection = Connection::new(fe.clone(), peer.ip(), permit, permits);
            match tls {
                None => connection.serve(stream).await,
                Some(tls) => {
                    // The handshake counts against the hello deadline.
                    let within = Duration::from_millis(fe.cfg.hello_timeout_ms);
                    match tokio::time::timeout(within, tls.accept(stream)).await {
                        Ok(Ok(stream)) => connection.serve(stream).await,
                        Ok(Err(e)) => {
                            fe.metrics.connection_timed_out("tls");
                            tracing::debug!(%peer, error = %e, "client TLS handshake failed");
                        }
                        Err(_) => fe.metrics.connection_timed_out("hello"),
                    }
                }
            }
            fe.metrics.connections.dec();
        });
    }
}

/// A completed request, sent by whoever answered it.
struct Done {
    conv: Arc<str>,
    seq: u64,
    outcome: ConvOutcome,
}

/// A request's place in its conversation's answer order; `reserve` is what it holds of the
/// connection's output buffer until its answer is written.
enum Slot {
    Waiting { started: Instant, id: Option<String>, reserve: usize },
    Ready(Response, usize),
}

/// Requests of one conversation on one connection, by connection-wide sequence number.
#[derive(Default)]
struct ConvQueue {
    slots: BTreeMap<u64, Slot>,
}

struct Connection {
    fe: Arc<Frontend>,
    tx: mpsc::UnboundedSender<Done>,
    rx: mpsc::UnboundedReceiver<Done>,
    authed: bool,
    close: bool,
    queues: HashMap<Arc<str>, ConvQueue>,
    seq: u64,
    inflight: usize,
    /// Bytes of the output buffer reserved by requests whose answers are not written yet.
    reserved: usize,
    /// Requests are held back for room in the output buffer (counted once per episode).
    held: bool,
    /// The principal whose token said `hello` (see `frontend.principals`).
    principal: Option<Arc<str>>,
    out: Vec<u8>,
    /// The connection's place: among the unauthenticated ones until `hello`, then among
    /// `permits` (dropped with the connection).
    permit: tokio::sync::OwnedSemaphorePermit,
    permits: Arc<Semaphore>,
    opened: Instant,
    last_read: Instant,
    peer: std::net::IpAddr,
}

impl Connection {
    /// A connection from `peer` holding `permit`; `permits` are the authenticated places
    /// it moves to when its `hello` succeeds.
    fn new(
        fe: Arc<Frontend>,
        peer: std::net::IpAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
        permits: Arc<Semaphore>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let authed = fe.cfg.open();
        Connection {
            fe,
            tx,
            rx,
            authed,
            close: false,
            queues: HashMap::new(),
            seq: 0,
            inflight: 0,
            reserved: 0,
            held: false,
            principal: None,
            out: Vec::with_capacity(16 * 1024),
            permit,
            permits,
            opened: Instant::now(),
            last_read: Instant::now(),
            peer,
        }
    }

    /// Serves JSON lines or, if the client's first bytes are an HTTP `GET`, the same
    /// protocol over WebSocket (see [`crate::websocket`]).
    async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(self, mut stream: S) {
        let within = Duration::from_millis(self.fe.cfg.hello_timeout_ms);
        let Some((speaks, buf)) = websocket::sniff(&mut stream, within).await else {
            if self.opened.elapsed() >= within {
                self.fe.metrics.connection_timed_out("hello");
            }
            return;
        };
        if speaks == Speaks::Lines {
            return self.run(stream, buf).await;
        }
        let stream = websocket::Prefixed::new(buf.freeze(), stream);
        let config = websocket::config(self.fe.cfg.frame_bytes_max);
        let upgrade = tokio_tungstenite::accept_async_with_config(stream, Some(config));
        let ws = match tokio::time::timeout(within, upgrade).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                self.fe.metrics.connection_timed_out("websocket");
                tracing::debug!(peer = %self.peer, error = %e, "WebSocket upgrade failed");
                return;
            }
            Err(_) => return self.fe.metrics.connection_timed_out("hello"),
        };
        self.fe.metrics.websocket_connections.inc();
        let (pipe, theirs) = tokio::io::duplex(websocket::PIPE_BYTES);
        tokio::join!(self.run(theirs, BytesMut::new()), websocket::pump(ws, pipe));
    }

    async fn run(mut self, mut stream: impl AsyncRead + AsyncWrite + Unpin, mut buf: BytesMut) {
        let mut framer = LineFramer::new(self.fe.cfg.frame_bytes_max);
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut eof = false;
        // Requests already read (with the bytes that told the protocol) are handled first.
        self.on_frames(&mut framer, &mut buf);
        loop {
            if eof && self.queues.is_empty() {
                // Requests held back for room in the output buffer still get their turn.
                self.on_frames(&mut framer, &mut buf);
                if self.queues.is_empty() && self.out.is_empty() {
                    break;
                }
            }
            let full = self.output_full();
            tokio::select! {
                biased;
                // Answers written at once (the requests read with the first bytes).
                _ = std::future::ready(()), if !self.out.is_empty() => {}
                Some(done) = self.rx.recv() => {
                    self.on_done(done);
                    self.drain_done();
                    // Answers written out make room for the requests held back.
                    self.on_frames(&mut framer, &mut buf);
                }
                read = stream.read_buf(&mut buf), if !eof && !full => match read {
                    Ok(0) | Err(_) => eof = true,
                    Ok(_) => {
                        self.last_read = Instant::now();
                        self.on_frames(&mut framer, &mut buf);
                        if buf.capacity() - buf.len() < 4096 {
                            buf.reserve(16 * 1024);
                        }
                    }
                },
                _ = sweep.tick() => {
                    self.sweep();
                    if let Some(reason) = self.timed_out() {
                        self.fe.metrics.connection_timed_out(reason);
                        break;
                    }
                }
            }
            if !self.out.is_empty() {
                // A write is a syscall that also runs the peer's receive path on loopback;
                // one answer per write cost a quarter of a node's CPU under load. With more
                // requests in flight, let the conversation actors already queued on this
                // worker finish first and send their answers in the same write; with none,
                // write at once (no added latency for a lone request).
                if self.inflight > 0 && self.out.len() < WRITE_BATCH_BYTES {
                    tokio::task::yield_now().await;
                    self.drain_done();
                }
                let write_timeout = Duration::from_millis(self.fe.cfg.write_timeout_ms);
                match tokio::time::timeout(write_timeout, stream.write_all(&self.out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        // The client does not read its answers: cut it off.
                        self.fe.metrics.connection_timed_out("write");
                        break;
                    }
                }
                self.out.clear();
                self.on_frames(&mut framer, &mut buf);
            }
            if self.close {
                break;
            }
        }
    }

    /// Whether reserved and unwritten answers fill the output buffer (then no request is
    /// read until some are written).
    fn output_full(&self) -> bool {
        self.reserved + self.out.len() >= self.fe.cfg.output_buffer_bytes_max
    }

    /// Handles the complete request lines already read, as far as the output buffer has
    /// room for their answers.
    fn on_frames(&mut self, framer: &mut LineFramer, buf: &mut BytesMut) {
        while !self.close {
            if self.output_full() {
                if !self.held && buf.contains(&b'\n') {
                    self.held = true;
                    self.fe.metrics.output_buffer_full.inc();
                }
                return;
            }
            self.held = false;
            let Some(frame) = framer.next_frame(buf) else { return };
            self.on_frame(frame);
        }
    }

    fn drain_done(&mut self) {
        for _ in 0..DONE_BATCH_MAX {
            match self.rx.try_recv() {
                Ok(done) => self.on_done(done),
                Err(_) => break,
            }
        }
    }

    fn write(&mut self, response: &Response) {
        if let Response::Error { code, message, .. } = response {
            self.fe.metrics.error(code.as_str());
            tracing::debug!(code = code.as_str(), %message, "error answer");
        }
        serde_json::to_writer(&mut self.out, response).expect("responses serialize");
        self.out.push(b'\n');
    }

    fn on_frame(&mut self, frame: Frame) {
        let line = match frame {
            Frame::Line(line) => line,
            Frame::TooLarge => {
                self.fe.metrics.frames_too_large.inc();
                let message = format!("line longer than {} bytes", self.fe.cfg.frame_bytes_max);
                return self.write(&Response::error(ErrorCode::TooLarge, message));
            }
        };
        let request = match parse_request(&line) {
            Ok(request) => request,
            Err(e) => return self.write(&e.into_response()),
        };
        if !self.authed && !matches!(request, Request::Hello { .. }) {
            self.close = true;
            return self
                .write(&Response::error(ErrorCode::Unauthorized, "say hello with a token first"));
        }
        match request {
            Request::Hello { token, .. } => {
                let open = self.fe.cfg.open();
                let holder = token.and_then(|t| token_holder(&self.fe.cfg, &t));
                let known = open || holder.is_some();
                if let Some(Some(principal)) = holder {
                    self.principal = Some(Arc::from(principal));
                }
                if known && !self.authed {
                    // From the unauthenticated places to the authenticated ones.
                    match self.permits.clone().try_acquire_owned() {
                        Ok(permit) => self.permit = permit,
                        Err(_) => {
                            self.fe.metrics.connections_rejected.inc();
                            self.close = true;
                            let full = "connections_max reached; try another node or later";
                            return self.write(&Response::error(ErrorCode::Busy, full));
                        }
                    }
                }
                if known {
                    self.authed = true;
                    let welcome = Response::Welcome {
                        node: self.fe.node.to_string(),
                        protocol: PROTOCOL_VERSION,
                    };
                    self.write(&welcome);
                } else {
                    self.fe.hello_failures.failed(self.peer);
                    self.close = true;
                    self.write(&Response::error(ErrorCode::Unauthorized, "unknown token"));
                }
            }
            Request::Ping => self.write(&Response::Pong { node: self.fe.node.to_string() }),
            Request::Topology => {
                let nodes = topology(&self.fe.view.borrow());
                self.write(&Response::Topology { nodes });
            }
            Request::Say { conv, id, text, bot, user } => {
                let request = ConvRequest::Say { id: id.clone(), text, bot, user };
                self.submit(conv, Some(id), request, self.fe.answer_bytes_max.turn);
            }
            Request::History { conv, limit, before } => {
                let limit = limit.unwrap_or(HISTORY_LIMIT_DEFAULT);
                let request = ConvRequest::History { limit, before };
                self.submit(conv, None, request, self.fe.answer_bytes_max.history);
            }
        }
    }

    fn submit(&mut self, conv: String, id: Option<String>, request: ConvRequest, answer: usize) {
        let conv: Arc<str> = Arc::from(conv);
        self.seq += 1;
        let seq = self.seq;
        let cfg = &self.fe.cfg;
        let bytes = 64 + conv.len() + request.weight();
        let over_conn = self.inflight >= cfg.conn_inflight_max;
        // The place is held until the work is answered (not until the client gives up on
        // it: a turn that timed out may still be running).
        let permit =
            if over_conn { None } else { self.fe.dispatcher.admission.admit(Work::Client, bytes) };
        let over_node = !over_conn && permit.is_none();
        if over_conn || over_node {
            let busy = Response::Error {
                id,
                conv: Some(conv.to_string()),
                code: ErrorCode::Busy,
                message: if over_node {
                    "node is at its in-flight limit"
                } else {
                    "connection is at its in-flight limit"
                }
                .into(),
                retry_after_ms: Some(cfg.retry_after_ms),
            };
            self.queues.entry(conv.clone()).or_default().slots.insert(seq, Slot::Ready(busy, 0));
            return self.release(&conv);
        }
        let reserve = answer + ANSWER_ENVELOPE_BYTES;
        self.reserved += reserve;
        self.inflight += 1;
        self.queues
            .entry(conv.clone())
            .or_default()
            .slots
            .insert(seq, Slot::Waiting { started: Instant::now(), id, reserve });
        let tx = self.tx.clone();
        let reply_conv = conv.clone();
        let reply = Reply::new(move |outcome| {
            drop(permit);
            // The connection may be gone; its requests then need no answer.
            let _ = tx.send(Done { conv: reply_conv, seq, outcome });
        });
        match &self.principal {
            // The principal's own space of conversation ids: names cannot hold '/', so
            // `name/conv` never equals another principal's id.
            Some(p) => self.fe.dispatcher.submit(&format!("{p}/{conv}"), request, 0, reply),
            None => self.fe.dispatcher.submit(&conv, request, 0, reply),
        }
    }

    fn finish_one(&mut self) {
        self.inflight -= 1;
    }

    fn on_done(&mut self, done: Done) {
        let Some(queue) = self.queues.get_mut(&done.conv) else { return };
        let Some(&mut Slot::Waiting { started, ref mut id, reserve }) =
            queue.slots.get_mut(&done.seq)
        else {
            // Timed out earlier: the client already has its answer.
            return;
        };
        let is_turn = id.is_some();
        let response = to_response(&done.conv, id.take(), done.outcome, self.fe.cfg.retry_after_ms);
        if is_turn {
            self.fe.metrics.turn_latency.observe(started.elapsed().as_secs_f64());
        }
        queue.slots.insert(done.seq, Slot::Ready(response, reserve));
        self.finish_one();
        self.release(&done.conv);
    }

    /// Writes the answers at the head of a conversation's queue that are ready.
    fn release(&mut self, conv: &Arc<str>) {
        let Some(mut queue) = self.queues.remove(conv) else { return };
        while let Some(entry) = queue.slots.first_entry() {
            if !matches!(entry.get(), Slot::Ready(..)) {
                break;
            }
            if let Slot::Ready(response, reserve) = entry.remove() {
                self.write(&response);
                self.reserved -= reserve;
            }
        }
        if !queue.slots.is_empty() {
            self.queues.insert(conv.clone(), queue);
        }
    }

    /// Why this connection should close now: no `hello` in time, or idle too long.
    fn timed_out(&self) -> Option<&'static str> {
        let cfg = &self.fe.cfg;
        if !self.authed && self.opened.elapsed() >= Duration::from_millis(cfg.hello_timeout_ms) {
            return Some("hello");
        }
        let idle = self.queues.is_empty() && self.inflight == 0;
        (idle && self.last_read.elapsed() >= Duration::from_millis(cfg.idle_timeout_ms))
            .then_some("idle")
    }

    fn sweep(&mut self) {
        let timeout = Duration::from_millis(self.fe.cfg.turn_timeout_ms);
        let mut expired = Vec::new();
        for (conv, queue) in &mut self.queues {
            for slot in queue.slots.values_mut() {
                if let Slot::Waiting { started, id, reserve } = slot {
                    if started.elapsed() >= timeout {
                        let reserve = *reserve;
                        *slot = Slot::Ready(Response::Error {
                            id: id.take(),
                            conv: Some(conv.to_string()),
                            code: ErrorCode::Timeout,
                            message: format!("no answer within {} ms; the outcome is unknown, retry with the same id", timeout.as_millis()),
                            retry_after_ms: Some(self.fe.cfg.retry_after_ms),
                        }, reserve);
                        expired.push(conv.clone());
                    }
                }
            }
        }
        for conv in expired {
            self.finish_one();
            self.release(&conv);
        }
    }
}

fn to_response(
    conv: &str,
    id: Option<String>,
    outcome: ConvOutcome,
    retry_after_ms: u64,
) -> Response {
    match outcome {
        ConvOutcome::Reply { messages, turn, node } => Response::Reply {
            conv: conv.to_string(),
            id: id.unwrap_or_default(),
            messages,
            turn,
            node: node.to_string(),
        },
        ConvOutcome::History { turns, more, node } => Response::History {
            conv: conv.to_string(),
            turns: turns
                .into_iter()
                .map(|t| HistoryTurn {
                    turn: t.turn,
                    id: t.id,
                    text: t.text,
                    messages: t.messages,
                    user: t.user,
                })
                .collect(),
            more,
            node: node.to_string(),
        },
        ConvOutcome::Failed { kind, message, retry_after_ms: hint } => {
            let code = match kind {
                FailKind::BadRequest => ErrorCode::BadRequest,
                FailKind::Busy => ErrorCode::Busy,
                FailKind::Unavailable => ErrorCode::Unavailable,
                FailKind::Timeout => ErrorCode::Timeout,
                FailKind::Internal => ErrorCode::Internal,
                FailKind::TooLarge => ErrorCode::TooLarge,
            };
            let retry_after_ms = code.is_retryable().then(|| hint.unwrap_or(retry_after_ms));
            Response::Error { id, conv: Some(conv.to_string()), code, message, retry_after_ms }
        }
        // Replica ops and module requests come from peers only; clients cannot send one.
        ConvOutcome::Replica(_) | ConvOutcome::Module(_) => Response::Error {
            id,
            conv: Some(conv.to_string()),
            code: ErrorCode::Internal,
            message: "a peer-to-peer answer reached a client".into(),
            retry_after_ms: None,
        },
    }
}

/// Client addresses of the live nodes, by name.
pub fn topology(view: &ClusterView) -> Vec<TopologyNode> {
    view.members
        .iter()
        .filter(|m| m.state == MemberState::Up)
        .map(|m| TopologyNode { name: m.id.name.clone(), client_addr: m.id.client.to_string() })
        .collect()
}

/// Who holds `token`: `Some(None)` for one of `client_tokens`, `Some(Some(name))` for one
/// of principal `name`'s tokens, `None` for an unknown token. Every token is compared, in
/// constant time (see [`known_token`]).
fn token_holder<'a>(cfg: &'a FrontendConfig, token: &str) -> Option<Option<&'a str>> {
    let shared = known_token(&cfg.client_tokens, token).then_some(None);
    let named = cfg.principals.iter().fold(None, |found, (name, tokens)| {
        let hit = known_token(tokens, token);
        found.or(hit.then_some(Some(name.as_str())))
    });
    shared.or(named)
}

/// Whether `token` is one of `tokens`, compared in constant time (a comparison that stops
/// at the first differing byte tells a prober how much of its guess was right).
pub fn known_token(tokens: &[String], token: &str) -> bool {
    use subtle::ConstantTimeEq;
    // Every token is compared: which one matched does not show in the time either.
    tokens.iter().fold(false, |found, t| found | bool::from(t.as_bytes().ct_eq(token.as_bytes())))
}
