//! The admin HTTP port: health, status, metrics and a cross-node link check.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use botclaw_core::placement::{Placement, RingMember};
use botclaw_core::shardmap::{ShardMap, MEMBERS_MAX};
use botclaw_core::MemberState;
use ractor::ActorRef;
use ractor_cluster::node::NodeServerMessage;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::controller::{ControllerStatus, MapView, Wire};
use crate::gossip::ClusterView;
use crate::metrics::Metrics;
use crate::routing::Dispatcher;
use botclaw_actors::host::ConversationHost;

pub struct AdminState {
    pub view: watch::Receiver<ClusterView>,
    pub dispatcher: Arc<Dispatcher>,
    pub host: ConversationHost,
    pub metrics: Metrics,
    pub server: ActorRef<NodeServerMessage>,
    pub link_name: String,
    pub call_timeout: Duration,
    /// The gossip isolation switch, when fault injection is on.
    pub isolation: Option<Arc<AtomicBool>>,
    /// The keep-majority baseline (the last stable membership).
    pub baseline: Arc<std::sync::Mutex<Vec<String>>>,
    /// Notified by `POST /drain`: the node drains, leaves and exits.
    pub drain_requested: Arc<tokio::sync::Notify>,
    /// The placement controller's applied map and status.
    pub map: watch::Receiver<Arc<MapView>>,
    /// The placement controller's inbox (for operator commands).
    pub controller: tokio::sync::mpsc::Sender<Vec<u8>>,
    pub placement: botclaw_config::PlacementConfig,
    pub replication_factor: usize,
    /// The node's state store (readiness follows whether it can write).
    pub store: Arc<dyn botclaw_actors::store::StateStore>,
    /// `[admin] tokens`: a mutating request needs one of them.
    pub admin_tokens: Vec<String>,
    /// `[admin] connections_max` and `header_timeout_ms`.
    pub connections_max: usize,
    pub header_timeout_ms: u64,
    /// The ring over the map's active members, for `/placement` (rebuilt when they change).
    pub ring: tokio::sync::Mutex<Option<(Vec<RingMember>, Arc<Placement>)>>,
    /// What the rebalancer would move now (refreshed every second by the load loop).
    pub preview: Arc<std::sync::Mutex<RebalancePreview>>,
}

/// `GET /rebalance/dry-run`: what this node's rebalancer would move now, and why.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RebalancePreview {
    pub node: String,
    /// The cluster's load imbalance (max / average per capacity unit; 1.0 is even).
    pub imbalance: f64,
    /// This node's load over the average.
    pub load_ratio: f64,
    pub why: String,
    pub moves: Vec<PreviewMove>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreviewMove {
    pub shard: u32,
    pub to: String,
    pub turns_per_s: f64,
}

impl AdminState {
    /// The ring over `map`'s active members (built off the async threads, then cached).
    async fn ring_of(&self, map: &ShardMap) -> Arc<Placement> {
        let active = map.active_members();
        let mut cached = self.ring.lock().await;
        if let Some((_, ring)) = cached.as_ref().filter(|(m, _)| *m == active) {
            return ring.clone();
        }
        let (cfg, members) = (self.placement.clone(), active.clone());
        let ring = tokio::task::spawn_blocking(move || Placement::build(&members, &cfg))
            .await
            .expect("placement build does not panic");
        let ring = Arc::new(ring);
        *cached = Some((active, ring.clone()));
        ring
    }
}

/// One member in `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    pub state: String,
    pub roles: Vec<String>,
    pub client_addr: String,
    pub cluster_addr: String,
    pub gossip_addr: String,
    pub admin_addr: String,
    pub incarnation: u64,
    pub bump: u16,
    pub uptime_s: f64,
    pub is_self: bool,
    /// An inter-node session to this member is open (always false for this node).
    pub linked: bool,
    /// The member's last load summary (spread over gossip every second), if heard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<MemberLoad>,
}

/// A member's measured load, as its last summary said.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberLoad {
    pub turns_per_s: f32,
    pub active: u32,
    pub inflight: u32,
    /// (shard, turns/s), hottest first.
    pub hot: Vec<(u32, f32)>,
    /// Module requests served per second, by role.
    #[serde(default)]
    pub modules: Vec<(String, f32)>,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub link_name: String,
    pub pid: u32,
    pub incarnation: u64,
    pub joined: bool,
    /// Sees a majority of the cluster and runs turns (keep-majority).
    pub serving: bool,
    /// The last stable membership, whose majority this node needs to serve.
    pub baseline: Vec<String>,
    pub uptime_s: f64,
    /// Resident memory of the process.
    pub rss_bytes: u64,
    /// CPU time the process used so far, user and system (what `bench` reads per node).
    #[serde(default)]
    pub cpu_seconds: f64,
    pub active_conversations: u64,
    pub members: Vec<MemberStatus>,
    /// The placement controller as this node sees it.
    #[serde(default)]
    pub controller: ControllerStatus,
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    // What changes the node: only with the admin token, never from a browser page.
    let mutating = Router::new()
        .route("/fault/isolate", post(isolate))
        .route("/drain", post(drain))
        .route("/shard/force", post(force))
        .route("/flags/set", post(flag_set))
        .route("/flags/delete", post(flag_delete))
        .route("/console/drain", post(crate::console::drain))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard));
    let app = Router::new()
        .route("/health/live", get(|| async { "live\n" }))
        .route("/health/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/ping", get(ping))
        .route("/placement", get(placement))
        .route("/conversation/recent", get(recent_here))
        .route("/flags", get(flags))
        .route(
            "/rebalance/dry-run",
            get(|State(s): State<Arc<AdminState>>| async move {
                Json(s.preview.lock().expect("preview lock").clone())
            }),
        )
        .merge(crate::console::routes())
        .merge(mutating)
        .with_state(state.clone());
    // Bounded: at most `connections_max` connections at once (more are closed as they
    // arrive), each given `header_timeout_ms` to send a request's headers, so idle or slow
    // clients cannot hold the port (the server-sent console streams are answered requests,
    // and stay until the browser leaves).
    let slots = Arc::new(tokio::sync::Semaphore::new(state.connections_max.max(1)));
    let header_timeout = Duration::from_millis(state.header_timeout_ms.max(1));
    let mut acceptor = crate::tls::Acceptor::new(listener, "admin");
    loop {
        let refused = |reason| state.metrics.admin_connection_refused(reason);
        let (stream, _) = acceptor.next(|| refused("accept_error")).await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused("connections_max");
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

/// Lets a mutating request through only if it carries no `Origin` or this port's own (a
/// browser sends one with every cross-site POST, also the "simple" ones it sends without
/// asking: an admin port reachable from a browser could otherwise be drained by any web
/// page; the console served here sends its own) and, when `[admin] tokens` is set, a
/// bearer token among them. Refusals are counted.
async fn guard(
    State(s): State<Arc<AdminState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let refuse = |reason: &str, code: StatusCode, message: &'static str| {
        s.metrics.admin_refused(reason);
        tracing::warn!(path = %request.uri().path(), reason, "admin request refused");
        (code, message).into_response()
    };
    let same_origin = |origin: &header::HeaderValue| {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| Some(o) == host)
    };
    if headers.get(header::ORIGIN).is_some_and(|o| !same_origin(o)) {
        return refuse(
            "cross-origin",
            StatusCode::FORBIDDEN,
            "cross-origin requests are refused\n",
        );
    }
    if !s.admin_tokens.is_empty() {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !token.is_some_and(|t| crate::frontend::known_token(&s.admin_tokens, t)) {
            return refuse(
                "token",
                StatusCode::UNAUTHORIZED,
                "an admin token is required (Authorization: Bearer ..., BOTCLAW_ADMIN_TOKEN)\n",
            );
        }
    }
    next.run(request).await
}

/// Ready once joined, once the placement reflects it, while it can reach its peers and
/// while a majority is in sight, so a client sent here is served. The body says why not.
async fn ready(State(s): State<Arc<AdminState>>) -> Response {
    let unavailable = |why: String| (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    let placement = s.dispatcher.view.load();
    let view = s.view.borrow().clone();
    if !view.joined {
        return unavailable(
            "not joined: no member answered yet (botclaw_cluster_warnings{reason=\"seeds_unanswered\"} \
             and the log name the seeds tried)\n"
                .into(),
        );
    }
    let by_map = placement.map.is_some();
    let placed = match by_map {
        // By the controller's map: every shard has its first owners.
        true => placement.joined && s.map.borrow().status.shards_unassigned == 0,
        false => placement.joined && !placement.placement.is_empty(),
    };
    let owns_shards = view.me.has_role(crate::routing::CONVERSATIONS_ROLE);
    if let Some(map) = placement.map.as_ref().filter(|_| placed && owns_shards) {
        if !map.counts_in(&view.me.name, view.me.incarnation) {
            // A restarted process: the map still has its last incarnation, gone, and the
            // shards only that one held have no live owner until this one is counted in.
            return unavailable(format!(
                "joined, waiting for the controller's map to count this process in \
                 (incarnation {}; controller leader: {})\n",
                view.me.incarnation,
                s.map.borrow().status.leader.as_deref().unwrap_or("none yet")
            ));
        }
    }
    if !placed {
        let leader = s.map.borrow().status.leader.clone();
        return unavailable(format!(
            "joined, waiting for the placement (controller leader: {})\n",
            leader.as_deref().unwrap_or("none yet")
        ));
    }
    let peers = view.up_peers().count();
    if peers > 0 && s.metrics.cluster_sessions.get() == 0 {
        return unavailable(format!(
            "{peers} members up but no link to any of them: their cluster ports cannot be \
             reached (advertised addresses, firewalls, TLS; see the log)\n"
        ));
    }
    if !s.store.writable() {
        return unavailable("the state store cannot write (see the log)\n".into());
    }
    if !s.dispatcher.serving.load(Ordering::Acquire) {
        return unavailable(if by_map {
            "no word from the placement controller's leader: a majority of its voters must be \
             up and linked\n"
                .into()
        } else {
            "minority: less than a majority of the cluster in sight\n".into()
        });
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// Starts a drain: the node moves its conversations to others, leaves, and exits.
async fn drain(State(s): State<Arc<AdminState>>) -> Response {
    s.drain_requested.notify_one();
    (StatusCode::ACCEPTED, "draining: conversations move to other nodes, then this node leaves\n")
        .into_response()
}

#[derive(Debug, Deserialize)]
struct IsolateQuery {
    on: bool,
}

/// Fault injection (only with `[fault] injection = true`): cut this node off from gossip,
/// or reconnect it.
async fn isolate(State(s): State<Arc<AdminState>>, Query(q): Query<IsolateQuery>) -> Response {
    match &s.isolation {
        Some(switch) => {
            switch.store(q.on, Ordering::Relaxed);
            tracing::warn!(isolated = q.on, "fault injection: gossip isolation switched");
            (StatusCode::OK, format!("isolated={}\n", q.on)).into_response()
        }
        None => (StatusCode::NOT_FOUND, "fault injection is off ([fault] injection = false)\n")
            .into_response(),
    }
}

fn uptime_s(incarnation_ms: u64) -> f64 {
    let now =
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    now.saturating_sub(incarnation_ms) as f64 / 1000.0
}

async fn status(State(s): State<Arc<AdminState>>) -> Json<Status> {
    Json(current_status(&s).await)
}

/// This node's `GET /status`.
pub async fn current_status(s: &AdminState) -> Status {
    let linked = crate::links::sessions(&s.server).await.unwrap_or_default();
    let view = s.view.borrow().clone();
    let members = view
        .members
        .iter()
        .map(|m| MemberStatus {
            name: m.id.name.clone(),
            state: m.state.as_str().to_string(),
            roles: m.id.roles.clone(),
            client_addr: m.id.client.to_string(),
            cluster_addr: m.id.cluster.to_string(),
            gossip_addr: m.id.gossip.to_string(),
            admin_addr: m.id.admin.to_string(),
            incarnation: m.id.incarnation,
            bump: m.id.bump,
            uptime_s: if m.state == MemberState::Down { 0.0 } else { uptime_s(m.id.incarnation) },
            is_self: m.is_self,
            linked: linked.contains_key(&m.id.link_name()),
            load: view.loads.get(&m.id.name).filter(|_| m.state != MemberState::Down).map(|l| {
                MemberLoad {
                    turns_per_s: l.turns_per_s,
                    active: l.active,
                    inflight: l.inflight,
                    hot: l.hot.clone(),
                    modules: l.modules.clone(),
                }
            }),
        })
        .collect();
    Status {
        node: view.me.name.clone(),
        link_name: s.link_name.clone(),
        pid: std::process::id(),
        incarnation: view.me.incarnation,
        joined: view.joined,
        serving: s.dispatcher.serving.load(Ordering::Acquire),
        baseline: s.baseline.lock().expect("baseline lock").clone(),
        uptime_s: uptime_s(view.me.incarnation),
        rss_bytes: rss_bytes(),
        cpu_seconds: cpu_seconds(),
        active_conversations: s.host.active() as u64,
        members,
        controller: s.map.borrow().status.clone(),
    }
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    match metrics_text(&s).await {
        Some(out) => (
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            out,
        )
            .into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// This node's `GET /metrics` (OpenMetrics text).
pub async fn metrics_text(s: &AdminState) -> Option<String> {
    if let Some(sessions) = crate::links::sessions(&s.server).await {
        s.metrics.cluster_sessions.set(sessions.len() as i64);
    }
    s.metrics.conversations.active.set(s.host.active() as i64);
    let admission = &s.dispatcher.admission;
    for kind in crate::admission::Work::ALL {
        let label = crate::metrics::KindLabel { kind: kind.as_str().to_string() };
        s.metrics.work_inflight.get_or_create(&label).set(admission.inflight_of(kind) as i64);
    }
    s.metrics.work_inflight_peak.set(admission.peak() as i64);
    s.metrics.work_inflight_bytes.set(admission.bytes() as i64);
    s.metrics.conversations.active_bytes.set(s.host.shared().active_bytes() as i64);
    let mut registry = s.metrics.registry();
    registry.register(
        "process_cpu_seconds",
        "User and system CPU time of the node process",
        prometheus_client::metrics::counter::ConstCounter::new(cpu_seconds()),
    );
    // Read at each scrape, for the alert rules and dashboards in cluster-config/.
    use prometheus_client::metrics::gauge::ConstGauge;
    let c = s.map.borrow().status.clone();
    let gauges: [(&str, &str, i64); 13] = [
        (
            "process_resident_memory_bytes",
            "Resident memory of the node process",
            rss_bytes() as i64,
        ),
        (
            "active_conversations_bytes_max",
            "conversations.active_bytes_max: the budget of botclaw_active_conversations_bytes",
            s.host.shared().active_bytes_max() as i64,
        ),
        ("store_writable", "1 while the state store can write", i64::from(s.store.writable())),
        (
            "controller_leader_known",
            "1 while this node hears from a placement controller leader",
            i64::from(c.leader.is_some()),
        ),
        ("controller_is_leader", "1 on the placement controller's leader", i64::from(c.is_leader)),
        ("controller_term", "The placement controller's term as this node knows it", c.term as i64),
        ("controller_map_version", "Commands applied to the shard map", c.map_version as i64),
        (
            "controller_shards_under_replicated",
            "Assigned shards with fewer in-sync members than the replication factor",
            c.shards_under_replicated as i64,
        ),
        (
            "controller_shards_unavailable",
            "Shards whose in-sync members are all gone: they refuse turns",
            c.shards_unavailable as i64,
        ),
        (
            "controller_moves_in_flight",
            "Shards with a learner (moves under way)",
            c.moves_in_flight as i64,
        ),
        (
            "controller_map_members",
            "Names the shard map holds: every node ever registered (never freed)",
            c.map_members as i64,
        ),
        (
            "controller_map_members_max",
            "Names the shard map can hold: a node beyond them is not registered, owns nothing",
            MEMBERS_MAX as i64,
        ),
        (
            "controller_members_unregistered",
            "On the leader: nodes up that the full shard map cannot take",
            c.members_unregistered as i64,
        ),
    ];
    for (name, help, value) in gauges {
        registry.register(name, help, ConstGauge::new(value));
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).ok()?;
    Some(out)
}

#[derive(Deserialize)]
struct PingQuery {
    node: Option<String>,
}

/// Result of one cross-node ping in `GET /ping`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingResult {
    /// The peer's link name as it reported it over the link.
    pub reply: Option<String>,
    pub rtt_us: Option<u64>,
    pub error: Option<String>,
}

/// Calls the router of every up peer (or only `?node=NAME`) over its inter-node link.
async fn ping(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<PingQuery>,
) -> Json<BTreeMap<String, PingResult>> {
    let peers: Vec<String> = {
        let view = s.view.borrow();
        view.up_peers()
            .map(|id| id.name.clone())
            .filter(|name| q.node.as_ref().is_none_or(|n| n == name))
            .collect()
    };
    let mut out = BTreeMap::new();
    for peer in peers {
        let start = Instant::now();
        let result = match botclaw_actors::router::ping(&peer, &s.link_name, s.call_timeout).await {
            Ok(reply) => PingResult {
                reply: Some(reply),
                rtt_us: Some(start.elapsed().as_micros() as u64),
                error: None,
            },
            Err(e) => PingResult { reply: None, rtt_us: None, error: Some(e.to_string()) },
        };
        out.insert(peer, result);
    }
    Json(out)
}

#[derive(Deserialize)]
struct PlacementQuery {
    conv: Option<String>,
    shard: Option<u32>,
}

/// `GET /placement?conv=ID` (or `?shard=N`): where a conversation lives and why: its shard, the shard's
/// entry in the controller's map (epoch, owner, in-sync members, learners), the map's
/// version, the members the ring over the map's active members wants for it, and the
/// owner the node routes by today.
async fn placement(State(s): State<Arc<AdminState>>, Query(q): Query<PlacementQuery>) -> Response {
    let view = s.map.borrow().clone();
    let (conv, shard, routed_owner) = match (q.conv.filter(|c| !c.is_empty()), q.shard) {
        (Some(conv), _) => {
            let (shard, owner) = s.dispatcher.locate(&conv);
            (Some(conv), shard, owner)
        }
        (None, Some(shard)) if shard < view.map.shard_count() => (None, shard, None),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "query parameter conv (or a valid shard) is required\n",
            )
                .into_response()
        }
    };
    let map = &view.map;
    let names = |r: &botclaw_core::shardmap::Replicas| -> Vec<String> {
        r.as_slice().iter().map(|&m| map.name(m).to_string()).collect()
    };
    let entry = map.shard(shard).copied().unwrap_or_default();
    let state = if entry.is_unassigned() {
        "unassigned"
    } else if entry.is_unavailable() {
        "unavailable"
    } else if !entry.learners.is_empty() {
        "moving"
    } else {
        "served"
    };
    let desired: Vec<String> = s
        .ring_of(map)
        .await
        .preference_list(shard, s.replication_factor)
        .into_iter()
        .map(String::from)
        .collect();
    let why = if entry.is_unassigned() {
        "not assigned yet: the controller's leader assigns every shard on its first round"
            .to_string()
    } else if entry.is_unavailable() {
        "every in-sync member is gone: the shard refuses turns until one returns or an operator forces it (botclaw shard force)".to_string()
    } else if names(&entry.isr) == desired {
        "on the members the ring over the map's active members wants".to_string()
    } else {
        format!("the ring wants {desired:?}; the controller moves it there, a learner at a time")
    };
    // Where the shard sits on the ring (its fixed point), and the conversation's hash.
    let position = botclaw_core::placement::shard_position(shard, map.shard_count());
    let conv_hash =
        conv.as_deref().map(|c| format!("{:016x}", botclaw_core::placement::conv_hash(c)));
    // A load-driven move the rebalancer recorded for the shard, if any.
    let moved = s
        .dispatcher
        .view
        .load()
        .moves
        .get(shard)
        .map(|r| serde_json::json!({"to": r.to, "version": [r.version.0, r.version.1]}));
    // The owner's record of the conversation's last turns, if it runs there now.
    let recent = match (&conv, &routed_owner) {
        (Some(conv), Some(owner)) => recent_turns(&s, owner, conv).await,
        _ => None,
    };
    Json(serde_json::json!({
        "conv": conv,
        "conv_hash": conv_hash,
        "recent_turns": recent,
        "shard": shard,
        "ring_position": format!("{position:016x}"),
        "ring_fraction": position as f64 / 2f64.powi(64),
        "rebalancer_move": moved,
        "state": state,
        "epoch": entry.epoch,
        "owner": entry.owner.map(|m| map.name(m).to_string()),
        "isr": names(&entry.isr),
        "learners": names(&entry.learners),
        "map_version": map.version,
        "leader": view.status.leader,
        "desired": desired,
        "why": why,
        "routed_owner": routed_owner,
    }))
    .into_response()
}

/// How long a lookup waits for the owner's record of recent turns.
const RECENT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize, Deserialize)]
struct RecentTurns {
    node: String,
    /// False if no actor runs the conversation there now (it was idle and passivated).
    live: bool,
    /// Oldest first; each from the owner taking the request to the durable reply.
    turns: Vec<botclaw_actors::conversation::RecentTurn>,
}

#[derive(Deserialize)]
struct ConvQuery {
    conv: String,
}

/// `GET /conversation/recent?conv=ID`: the latencies of the conversation's last turns on
/// this node, if its actor runs here (nothing is started to answer).
async fn recent_here(State(s): State<Arc<AdminState>>, Query(q): Query<ConvQuery>) -> Response {
    Json(recent_local(&s, &q.conv).await).into_response()
}

async fn recent_local(s: &AdminState, conv: &str) -> RecentTurns {
    let turns = s.host.recent(conv, RECENT_TIMEOUT).await;
    let node = s.host.shared().node.to_string();
    RecentTurns { node, live: turns.is_some(), turns: turns.unwrap_or_default() }
}

/// The owner's record of `conv`'s recent turns: asked of the local host, or of the
/// owner's admin port. `None` if the owner cannot be asked.
async fn recent_turns(s: &AdminState, owner: &str, conv: &str) -> Option<RecentTurns> {
    if *s.host.shared().node == *owner {
        return Some(recent_local(s, conv).await);
    }
    let admin = s.view.borrow().members.iter().find(|m| m.id.name == owner)?.id.admin;
    let path = format!("/conversation/recent?conv={}", crate::status::urlencode(conv));
    tokio::task::spawn_blocking(move || crate::http::get_json(admin, &path, RECENT_TIMEOUT).ok())
        .await
        .ok()
        .flatten()
}

#[derive(Deserialize)]
struct ForceQuery {
    shard: u32,
    to: String,
}

/// `POST /shard/force?shard=N&to=NAME`: an operator override for an unavailable shard: it
/// restarts on `to` from whatever `to` holds; turns its last in-sync members acknowledged
/// may be lost. Passed to the controller's leader; logged as an audit line.
async fn force(State(s): State<Arc<AdminState>>, Query(q): Query<ForceQuery>) -> Response {
    let view = s.map.borrow().clone();
    let Some(entry) = view.map.shard(q.shard).copied() else {
        return (
            StatusCode::BAD_REQUEST,
            format!("no shard {} (the map has {})\n", q.shard, view.map.shard_count()),
        )
            .into_response();
    };
    if !entry.is_unavailable() {
        return (
            StatusCode::CONFLICT,
            format!("shard {} is not unavailable: nothing to force\n", q.shard),
        )
            .into_response();
    }
    let Some(member) = view.map.member_ix(&q.to) else {
        return (StatusCode::BAD_REQUEST, format!("{} is not a member of the map\n", q.to))
            .into_response();
    };
    tracing::warn!(shard = q.shard, to = %q.to, "AUDIT operator forces an unavailable shard onto a member: acknowledged turns may be lost");
    let command = botclaw_core::shardmap::MapCommand::Force { shard: q.shard, member };
    propose(&s, command, format!("shard {} forced onto {}", q.shard, q.to))
}

/// Hands an operator's command to the placement controller (its leader logs it).
fn propose(s: &AdminState, command: botclaw_core::shardmap::MapCommand, what: String) -> Response {
    let me = s.view.borrow().me.name.clone();
    let wire = Wire::Propose { from: me, forwarded: false, command };
    if s.controller.try_send(wire.to_bytes()).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the controller is busy; try again\n")
            .into_response();
    }
    (StatusCode::ACCEPTED, format!("{what}: proposed to the controller\n")).into_response()
}

/// `GET /flags`: the feature flags of the map this node applied.
async fn flags(State(s): State<Arc<AdminState>>) -> Json<crate::flags::FlagsStatus> {
    let view = s.map.borrow().clone();
    Json(crate::flags::FlagsStatus::of(&view.map))
}

#[derive(Deserialize)]
struct FlagSetQuery {
    name: String,
    percent: f64,
    #[serde(default = "yes")]
    enabled: bool,
    bot: Option<String>,
}

fn yes() -> bool {
    true
}

/// `POST /flags/set?name=N&percent=P[&enabled=false][&bot=B]`.
async fn flag_set(State(s): State<Arc<AdminState>>, Query(q): Query<FlagSetQuery>) -> Response {
    let rollout_bp = match crate::flags::rollout_bp(q.percent) {
        Ok(bp) => bp,
        Err(why) => return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response(),
    };
    let flag = botclaw_core::flags::Flag { enabled: q.enabled, rollout_bp, bot: q.bot };
    // Checked here too, against the flags this node applied, so a bad request gets its
    // answer (the log would only skip it).
    let mut flags = s.map.borrow().map.flags().clone();
    if let Err(why) = flags.set(&q.name, Some(flag.clone())) {
        return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response();
    }
    tracing::info!(name = %q.name, enabled = flag.enabled, rollout_bp, bot = ?flag.bot, "AUDIT operator sets a flag");
    let what = format!("flag {}", q.name);
    propose(
        &s,
        botclaw_core::shardmap::MapCommand::SetFlag { name: q.name, flag: Some(flag) },
        what,
    )
}

#[derive(Deserialize)]
struct FlagDeleteQuery {
    name: String,
}

/// `POST /flags/delete?name=N`.
async fn flag_delete(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<FlagDeleteQuery>,
) -> Response {
    if let Err(why) = botclaw_core::flags::check_name(&q.name) {
        return (StatusCode::BAD_REQUEST, format!("{why}\n")).into_response();
    }
    tracing::info!(name = %q.name, "AUDIT operator removes a flag");
    let what = format!("flag {} removal", q.name);
    propose(&s, botclaw_core::shardmap::MapCommand::SetFlag { name: q.name, flag: None }, what)
}

/// User plus system CPU time of this process so far (`getrusage`).
#[allow(unsafe_code)]
pub fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers (all-zero is valid), and getrusage only writes the
    // struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Resident set size from /proc (0 where unavailable).
fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .unwrap_or(0);
    pages * 4096
}
