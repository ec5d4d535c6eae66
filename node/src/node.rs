//! `run`: one botclaw node, from a validated config until shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use botclaw_actors::backends::Backends;
use botclaw_actors::forwarder::Forwarder;
use botclaw_actors::host::ConversationHost;
use botclaw_actors::replicator::{Replication, Replicator};
use botclaw_actors::shards::{ShardLimits, ShardReplicator};
use botclaw_actors::store::fjall::{FjallStore, STATE_DIR as FJALL_DIR};
use botclaw_actors::store::redb::{RedbStore, STATE_FILE as REDB_FILE};
use botclaw_actors::store::{MemoryStore, StateStore, StoreLimits};
use botclaw_actors::{RouterActor, RouterArgs};
use botclaw_config::{NodeConfig, StoreEngine};
use botclaw_core::auth::{ClusterKeys, Keyring};
use botclaw_core::ownership::OwnershipConfig;
use botclaw_core::placement::Placement;
use botclaw_core::rebalance::{LoadRounds, NodeLoad, Period, ShardLoad, LOAD_PERIOD_MS};
use botclaw_core::shardmap::{leave_step, LeaveMode, LeaveStep, MapCommand};
use botclaw_core::{Membership, NodeId};
use ractor::Actor;
use ractor_cluster::NodeServer;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::{self, AdminState};
use crate::frontend::{self, Frontend};
use crate::gossip::{ClusterView, GossipCommand, GossipDriver};
use crate::metrics::Metrics;
use crate::modules::NodeModules;
use crate::routing::{self, Dispatcher, Maintained, NodePeers, PlacementView};

/// The inter-node cookie (ractor_cluster's handshake). Without TLS it is derived from the
/// cluster secret (never equal to the gossip key) and is what keeps strangers off the
/// cluster port. With TLS the CA's certificates authenticate peers, and the cookie is a
/// constant, so a secret rotation never breaks a link.
pub fn cluster_cookie(keys: &ClusterKeys, tls: bool) -> String {
    if tls {
        "botclaw-mutual-tls".into()
    } else {
        keys.cookie_hex()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Refuses to start on an empty store of one engine while the data directory holds the
/// other engine's state: that would silently start this node from nothing.
fn check_other_engine(dir: &std::path::Path, engine: StoreEngine) -> Result<()> {
    let (mine, other, other_name) = match engine {
        StoreEngine::Fjall => (fjall_dir(dir), dir.join(REDB_FILE), "redb"),
        StoreEngine::Redb => (dir.join(REDB_FILE), fjall_dir(dir), "fjall"),
    };
    if other.exists() && !mine.exists() {
        anyhow::bail!(
            "{} holds {other_name} state but [store] engine is {engine:?}: set engine = \"{other_name}\", \
             or move {} away to start this node empty (its replicas refill it)",
            dir.display(),
            other.display()
        );
    }
    Ok(())
}

fn fjall_dir(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join(FJALL_DIR)
}

/// What a leaving node needs.
struct Leaving<'a> {
    gossip: &'a mpsc::Sender<GossipCommand>,
    cluster: &'a watch::Receiver<ClusterView>,
    dispatcher: &'a Dispatcher,
    /// The local controller member's inbox (proposals reach the leader through it).
    controller: &'a mpsc::Sender<Vec<u8>>,
    incarnation: u64,
    mode: LeaveMode,
    timeout: Duration,
}

/// Moves this node's conversations away before it leaves: it gives up the conversations
/// role (it stays a member and forwards what clients still send it), then waits until
/// nothing it holds is needed here and its conversation actors have closed (each once its
/// waiting turns are durable), at most `timeout`. By the ring: until its own placement
/// excludes it. By the controller's map: the steps of [`leave_step`] (a restart hands
/// ownership to the other in-sync members; a decommission moves every copy away). Then it
/// lingers (at most [`DRAIN_LINGER`]) until no request is held here or waiting for an
/// answer it relays, and no peer has sent it work for [`DRAIN_QUIET`]: peers that had not
/// heard of the drain yet send it turns and (by the ring) replica writes, which fail if
/// it is gone when they arrive.
async fn drain(l: Leaving<'_>) {
    let (host, placement) = (&l.dispatcher.host, &l.dispatcher.view);
    // From now on a request held here goes to the owner this node sees at once.
    l.dispatcher.draining.store(true, Ordering::Release);
    l.dispatcher.release_held();
    let started = std::time::Instant::now();
    let (tx, rx) = oneshot::channel();
    if l.gossip.send(GossipCommand::DropRole(routing::CONVERSATIONS_ROLE.into(), tx)).await.is_err()
    {
        return;
    }
    if !rx.await.unwrap_or(false) {
        return;
    }
    let me = host.shared().node.clone();
    let mut closed = false;
    // The last step decided, on which map version, failure detector's word and contact
    // with the controller (a step scans the map at most once per version), and when
    // `Leave` was last proposed.
    let mut decided: Option<((u64, bool, bool), LeaveStep)> = None;
    let mut proposed: Option<std::time::Instant> = None;
    let moved = async {
        loop {
            let view = placement.load();
            let excluded = match &view.map {
                Some(map) => {
                    let others = someone_takes(map, &me, &l.cluster.borrow());
                    // Serving by the map means the controller's leader was heard.
                    let heard = l.dispatcher.serving.load(Ordering::Acquire);
                    let key = (map.version, others, heard);
                    let step = match decided {
                        Some((at, step)) if at == key => step,
                        _ => {
                            let step = leave_step(map, &me, l.incarnation, l.mode, others, heard);
                            decided = Some((key, step));
                            step
                        }
                    };
                    match step {
                        LeaveStep::Wait => false,
                        LeaveStep::ProposeLeave => {
                            if proposed.is_none_or(|at| at.elapsed() >= LEAVE_PROPOSED_EVERY) {
                                proposed = Some(std::time::Instant::now());
                                propose_leave(l.controller, &me, l.incarnation);
                            }
                            false
                        }
                        // Nobody left to take the shards (the whole cluster stops, and the
                        // others' drains may not have been committed before they left), or
                        // out of every shard: the actors close once their turns are
                        // durable; kept copies return with the node.
                        LeaveStep::KeepCopies | LeaveStep::Done => {
                            if !closed {
                                host.relinquish(|_| false);
                                closed = true;
                            }
                            true
                        }
                    }
                }
                None => view.placement.members().iter().all(|m| m.name != *me),
            };
            if excluded && host.active() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    match tokio::time::timeout(l.timeout, moved).await {
        Ok(()) => {
            tracing::info!(took_ms = started.elapsed().as_millis() as u64, mode = ?l.mode, "drained")
        }
        Err(_) => tracing::warn!(active = host.active(), "drain timed out; leaving anyway"),
    }
    let settled = async {
        use crate::admission::Work;
        let admission = &l.dispatcher.admission;
        let from_peers =
            || [Work::Forwarded, Work::Replica, Work::Module].map(|k| admission.admitted_of(k));
        let busy = || {
            [Work::Forwarded, Work::Replica, Work::Module]
                .iter()
                .any(|&k| admission.inflight_of(k) > 0)
        };
        let mut last = (from_peers(), std::time::Instant::now());
        while l.dispatcher.held() > 0
            || l.dispatcher.forwarder.pending_len() > 0
            || busy()
            || last.1.elapsed() < DRAIN_QUIET
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = from_peers();
            if now != last.0 {
                last = (now, std::time::Instant::now());
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_LINGER, settled).await;
}

/// How often a leaving node repeats its `Leave` proposal until the map shows it applied (a
/// proposal is lost when the leader changes meanwhile).
const LEAVE_PROPOSED_EVERY: Duration = Duration::from_millis(250);

/// Asks the controller's leader to commit this incarnation's `Leave` (a controlled
/// shutdown).
fn propose_leave(controller: &mpsc::Sender<Vec<u8>>, me: &str, incarnation: u64) {
    let command = MapCommand::Leave { name: me.to_string(), incarnation };
    let wire = crate::controller::Wire::Propose { from: me.to_string(), forwarded: false, command };
    // A full inbox drops it; the next try follows.
    let _ = controller.try_send(wire.to_bytes());
}

/// Whether a member other than `me` is active in `map` and up in `view`.
/// Hands the map's feature flags to the conversations whenever they change (by the map
/// and by the ring alike: every node runs the controller).
async fn follow_flags(
    mut maps: tokio::sync::watch::Receiver<Arc<crate::controller::MapView>>,
    host: ConversationHost,
) {
    let mut last = botclaw_core::flags::Flags::default();
    loop {
        let flags = {
            let view = maps.borrow_and_update();
            (view.map.flags() != &last).then(|| view.map.flags().clone())
        };
        if let Some(flags) = flags {
            tracing::info!(flags = flags.len(), "feature flags changed");
            host.set_flags(flags.clone());
            last = flags;
        }
        if maps.changed().await.is_err() {
            return;
        }
    }
}

fn someone_takes(map: &botclaw_core::shardmap::ShardMap, me: &str, view: &ClusterView) -> bool {
    let up = |name: &str| {
        view.members
            .iter()
            .any(|m| !m.is_self && m.id.name == name && m.state != botclaw_core::MemberState::Down)
    };
    map.active_members().iter().any(|m| m.name != me && up(&m.name))
}

/// Longest a drained node waits for requests it holds or relays before it leaves.
const DRAIN_LINGER: Duration = Duration::from_secs(2);

/// How long no work from peers must have arrived before a drained node leaves (a few
/// gossip rounds: the time its peers take to hear that it gave up its role).
const DRAIN_QUIET: Duration = Duration::from_millis(600);

/// What the load loop reads and decides with.
struct LoadLoop {
    gossip: mpsc::Sender<GossipCommand>,
    node: String,
    incarnation: u64,
    dispatcher: Arc<Dispatcher>,
    metrics: Metrics,
    view: watch::Receiver<ClusterView>,
    rebalance: botclaw_config::RebalanceConfig,
    /// What the rebalancer would move now, for `GET /rebalance/dry-run`.
    preview: Arc<std::sync::Mutex<admin::RebalancePreview>>,
}

/// The loads of the members that own shards, by the map (its active members) or else the
/// ring.
fn cluster_loads(l: &LoadLoop, own_turns_per_s: f32) -> Vec<NodeLoad> {
    let placement = l.dispatcher.view.load();
    let members: Vec<(String, u32)> = match &placement.map {
        Some(map) => map
            .members()
            .iter()
            .filter(|m| m.state == botclaw_core::shardmap::MemberState::Active)
            .map(|m| (m.name.clone(), m.capacity))
            .collect(),
        None => {
            placement.placement.members().iter().map(|m| (m.name.clone(), m.capacity)).collect()
        }
    };
    let view = l.view.borrow();
    botclaw_core::load::member_loads(
        members,
        &view.loads,
        &placement.moves.moved_in(),
        &l.node,
        own_turns_per_s,
    )
}

/// What the rebalancer would decide on this node now, with the reason, from the same pure
/// rules and inputs as its rounds (but without their hysteresis: a dry run shows the
/// decision the next round would take if the load stays).
fn preview(
    l: &LoadLoop,
    cfg: &botclaw_core::rebalance::RebalanceConfig,
    nodes: &[NodeLoad],
    hot: &[(u32, f32)],
) -> admin::RebalancePreview {
    let avg = botclaw_core::rebalance::average(nodes);
    let per_node = nodes.iter().map(|n| n.load).sum::<f64>() / nodes.len().max(1) as f64;
    let mine = nodes.iter().find(|n| n.name == l.node);
    let my_ratio =
        mine.map_or(
            0.0,
            |m| {
                if avg > 0.0 {
                    m.load / f64::from(m.capacity.max(1)) / avg
                } else {
                    0.0
                }
            },
        );
    let shards: Vec<ShardLoad> = hot
        .iter()
        .map(|(shard, rate)| ShardLoad { shard: *shard, rate: f64::from(*rate) })
        .collect();
    let moves = botclaw_core::rebalance::decide(cfg, &l.node, nodes, &shards, |_| false);
    let why = if !l.rebalance.enabled {
        "rebalancing is off ([rebalance] enabled = false)".to_string()
    } else if nodes.len() < 2 {
        "fewer than two members own shards: nowhere to move to".to_string()
    } else if per_node < f64::from(l.rebalance.min_turns_per_s) {
        format!(
            "the cluster is quiet: {per_node:.1} turns/s per node, under min_turns_per_s {}",
            l.rebalance.min_turns_per_s
        )
    } else if my_ratio <= cfg.overload_ratio {
        format!(
            "this node's load is {my_ratio:.2}x the average, not over overload_ratio {:.2}",
            cfg.overload_ratio
        )
    } else if moves.is_empty() {
        format!("overloaded ({my_ratio:.2}x the average), but no hot shard fits a receiver's room")
    } else {
        format!(
            "overloaded ({my_ratio:.2}x the average): its hottest shards go to the least loaded"
        )
    };
    admin::RebalancePreview {
        node: l.node.clone(),
        imbalance: botclaw_core::rebalance::imbalance(nodes),
        load_ratio: my_ratio,
        why,
        moves: moves
            .iter()
            .map(|m| admin::PreviewMove {
                shard: m.shard,
                to: m.to.clone(),
                turns_per_s: shards.iter().find(|s| s.shard == m.shard).map_or(0.0, |s| s.rate),
            })
            .collect(),
    }
}

/// Measures this node's load every [`LOAD_PERIOD_MS`] and spreads it over gossip, with the
/// moves it vouches for; the rounds ([`LoadRounds`]) decide, every `rebalance.interval_ms`,
/// on the cluster's loads and its own hottest shards.
async fn load_loop(l: LoadLoop) {
    let mut rounds = LoadRounds::new(&l.node, l.incarnation, &l.rebalance);
    let core_cfg = rounds.config().clone();
    let mut tick = tokio::time::interval(Duration::from_millis(LOAD_PERIOD_MS));
    let started = std::time::Instant::now();
    let mut last = (started, l.metrics.conversations.turns.get());
    let mut last_served = l.dispatcher.modules.served();
    loop {
        tick.tick().await;
        let (now, turns) = (std::time::Instant::now(), l.metrics.conversations.turns.get());
        let period = now - last.0;
        let per_s = |n: u64| n as f32 / period.as_secs_f32().max(0.001);
        let turns_per_s = per_s(turns.saturating_sub(last.1));
        last = (now, turns);
        let served = l.dispatcher.modules.served();
        let modules: Vec<(String, f32)> = served
            .iter()
            .zip(&last_served)
            .map(|((role, n), (_, before))| (role.clone(), per_s(n.saturating_sub(*before))))
            .collect();
        last_served = served;
        let hot = l.dispatcher.take_hot_shards(core_cfg.shards_considered(), period);
        let nodes = cluster_loads(&l, turns_per_s);
        *l.preview.lock().expect("preview lock") = preview(&l, &core_cfg, &nodes, &hot);
        let table = l.dispatcher.view.load();
        let decided = {
            let view = l.view.borrow();
            rounds.period(Period {
                now_ms: now.duration_since(started).as_millis() as u64,
                turns_per_s,
                hot: &hot,
                nodes: &nodes,
                moving: table.map.as_ref().is_some_and(|m| m.tally().learning > 0),
                loads: &view.loads,
                moves: &table.moves,
                active: l.dispatcher.host.active() as u32,
                inflight: l.dispatcher.admission.inflight() as u32,
                modules: &modules,
            })
        };
        for m in &decided.moves {
            tracing::info!(shard = m.shard, to = %m.to, "rebalancing: moving a hot shard");
            l.metrics.shards_moved.inc();
        }
        if l.gossip.send(GossipCommand::PublishLoad(decided.summary)).await.is_err() {
            return;
        }
    }
}

/// Creates `dir` and its missing parents readable by this user only (mode 0700): the
/// conversations, the controller's log and the secret live there. An existing directory
/// keeps its mode.
/// Turns on TCP keepalive: probes after `idle` without traffic, then every 10 s, 3 times.
pub fn set_keepalive(stream: &tokio::net::TcpStream, idle: Duration) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

pub fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Why a node stopped on its own: its store could not write for `unwritable_exit_ms`. The
/// CLI exits with [`EXIT_STORE_UNWRITABLE`] for it.
#[derive(Debug, thiserror::Error)]
#[error("the state store could not write for {0} ms (a full disk or an I/O error; see the log): left the cluster for a restart")]
pub struct StoreUnwritable(pub u64);

/// Why a node refused to run: a live member that started earlier has its name.
#[derive(Debug, thiserror::Error)]
#[error("a live member at {other} (started earlier) is named {name:?}: node names must be unique; give this node another --name (or BOTCLAW_NAME)")]
pub struct NameTaken {
    pub name: String,
    pub other: std::net::SocketAddr,
}

/// Exit status of a node that refused to run under a taken name (EX_CONFIG).
pub const EXIT_NAME_TAKEN: u8 = 78;

/// How long a node whose store failed tries to hand its conversations over before leaving.
const STORE_FAILED_DRAIN: Duration = Duration::from_secs(5);

/// Exit status of a node that stopped because its store could not write (EX_TEMPFAIL).
pub const EXIT_STORE_UNWRITABLE: u8 = 75;

/// Resolves once `store` has been unable to write for `after` without a break (never when
/// `after` is zero).
async fn store_unwritable_for(store: Arc<dyn StateStore>, after: Duration) {
    if after.is_zero() {
        return std::future::pending().await;
    }
    let mut since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        if store.writable() {
            since = None;
        } else if since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= after {
            return;
        }
    }
}

/// Runs a node until `shutdown` resolves, then leaves the cluster and stops.
pub async fn run(cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    create_private_dir(&cfg.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
    // Bind every socket first, so a port in use fails fast and names the field.
    let gossip_socket = UdpSocket::bind(cfg.gossip_addr)
        .await
        .with_context(|| format!("cannot bind gossip_addr {}", cfg.gossip_addr))?;
    let admin_listener = TcpListener::bind(cfg.admin_addr)
        .await
        .with_context(|| format!("cannot bind admin_addr {}", cfg.admin_addr))?;
    let client_listener = TcpListener::bind(cfg.client_addr)
        .await
        .with_context(|| format!("cannot bind client_addr {}", cfg.client_addr))?;
    // The node's own listener on the cluster port (see `tls`); ractor_cluster's listens on
    // an ephemeral loopback port.
    let cluster_listener = TcpListener::bind(cfg.cluster_addr)
        .await
        .with_context(|| format!("cannot bind cluster_addr {}", cfg.cluster_addr))?;
    let tls = crate::tls::NodeTls::load(&cfg.tls).context("cannot load [tls] certificates")?;
    let tls = tls.map(Arc::new);
    // Derived once per process: Argon2id is slow on purpose.
    let keys = ClusterKeys::derive(cfg.secret.as_bytes());
    let previous: Vec<ClusterKeys> =
        cfg.previous_secrets.iter().map(|s| ClusterKeys::derive(s.as_bytes())).collect();

    let metrics = Metrics::default();
    // Seeds: what their names resolve to now (again every seed_resolve_interval_ms), and
    // the members this data directory remembers from its last run.
    let mut seeds = crate::gossip::Seeds {
        names: cfg.seeds.clone(),
        resolve_every: Duration::from_millis(cfg.gossip.seed_resolve_interval_ms),
        peers_dir: (!cfg.store.ephemeral).then(|| cfg.data_dir.clone()),
        ..Default::default()
    };
    let resolved = seeds.resolve_names(&metrics).await;
    let (advertised, how) = crate::addrs::advertised(&cfg, &resolved).await?;
    crate::addrs::check_reachable(&advertised, &resolved)?;
    if let Some(how) = how {
        tracing::info!(?how, client = %advertised.client, cluster = %advertised.cluster, gossip = %advertised.gossip, admin = %advertised.admin, "advertising");
    }
    seeds.remembered = crate::addrs::remembered_peers(&cfg.data_dir)
        .into_iter()
        .filter(|p| *p != advertised.gossip)
        .collect();
    // A node founds a cluster only if nothing names or remembers one: a node restarted
    // with its first command joins the members it knew instead of serving alone.
    let founds = cfg.seeds.is_empty() && seeds.remembered.is_empty();
    if cfg.seeds.is_empty() && !founds {
        tracing::info!(members = ?seeds.remembered, "no seeds given: joining the members remembered from the last run");
    }
    let incarnation = if cfg.store.ephemeral {
        now_ms()
    } else {
        crate::addrs::take_incarnation(&cfg.data_dir, now_ms())?
    };
    let identity = NodeId {
        name: cfg.name.clone(),
        gossip: advertised.gossip,
        cluster: advertised.cluster,
        client: advertised.client,
        admin: advertised.admin,
        incarnation,
        bump: 0,
        roles: cfg.roles.clone(),
        capacity: cfg.capacity,
    };
    let link_name = identity.link_name();
    tracing::info!(node = %cfg.name, link = %link_name, gossip = %advertised.gossip, data_dir = %cfg.data_dir.display(), "starting");

    // The store first: a bad state file stops the node before anything else starts.
    let conv_metrics = metrics.conversations.clone();
    let limits = StoreLimits {
        shard_count: cfg.placement.shard_count,
        turns_kept_max: cfg.conversations.turns_kept_max,
        group_commit_max: cfg.store.group_commit_max,
        queue_max: cfg.store.queue_max,
        meta_cache_bytes_max: cfg.store.meta_cache_bytes_max,
    };
    let (dir, m) = (&cfg.data_dir, conv_metrics.clone());
    if !cfg.store.ephemeral {
        check_other_engine(dir, cfg.store.engine)?;
    }
    let store: Arc<dyn StateStore> = match (cfg.store.ephemeral, cfg.store.engine) {
        (true, _) => {
            Arc::new(MemoryStore::new(cfg.conversations.turns_kept_max, cfg.placement.shard_count))
        }
        (false, StoreEngine::Fjall) => Arc::new(FjallStore::open(dir, limits, m)?),
        (false, StoreEngine::Redb) => Arc::new(RedbStore::open(dir, limits, m)?),
    };
    let unused_listener = tls
        .as_ref()
        .map(|t| ractor_cluster::IncomingEncryptionMode::Tls(t.cluster_acceptor.clone()));
    let server = NodeServer::new(
        0,
        cluster_cookie(&keys, tls.is_some()),
        link_name.clone(),
        advertised.cluster.ip().to_string(),
        unused_listener,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(std::net::Ipv4Addr::LOCALHOST.into())
    .with_max_inbound_frame_size(cfg.link.frame_bytes_max);
    let (server_ref, server_task) =
        Actor::spawn(None, server, ()).await.context("cannot start the inter-node server")?;

    let node: Arc<str> = Arc::from(cfg.name.as_str());
    let placement = Arc::new(ArcSwap::from_pointee(PlacementView::new(
        Placement::build(&[], &cfg.placement),
        false,
    )));
    let serving = Arc::new(AtomicBool::new(true));
    let drain_requested = Arc::new(tokio::sync::Notify::new());
    let baseline = Arc::new(std::sync::Mutex::new(vec![cfg.name.clone()]));
    let forwarder =
        Forwarder::start(&cfg.name, Duration::from_millis(cfg.frontend.turn_timeout_ms));
    let peers = NodePeers {
        me: node.clone(),
        view: placement.clone(),
        serving: serving.clone(),
        forwarder: forwarder.clone(),
        factor: cfg.replication.factor,
    };
    let replicator = Replicator::start(
        store.clone(),
        Arc::new(peers),
        cfg.replication.write_quorum,
        cfg.replication.incoming_max,
        conv_metrics.clone(),
    );
    let membership = Membership::new(
        identity,
        &seeds.with_remembered(resolved),
        Keyring::new(&keys, &previous),
        &cfg.gossip,
        rand::random(),
    )
    .founding(founds);
    let (mut driver, view) = GossipDriver::new(
        membership,
        seeds,
        gossip_socket,
        metrics.clone(),
        cfg.gossip.packet_bytes_max,
    );
    let mut name_taken = driver.name_taken();
    let (controller_tx, controller_rx) = mpsc::channel(cfg.controller.inbound_queue_max);
    let heard = Arc::new(crate::controller::ControllerContact::default());
    let (controller, map_view) = crate::controller::open(crate::controller::ControllerArgs {
        me: cfg.name.clone(),
        cfg: cfg.controller.clone(),
        placement: cfg.placement.clone(),
        replication_factor: cfg.replication.factor,
        dir: (!cfg.store.ephemeral).then(|| cfg.data_dir.join("controller")),
        founder_by_default: founds,
        frame_bytes_max: cfg.link.frame_bytes_max,
        gossip: view.clone(),
        inbox: controller_rx,
        metrics: metrics.controller.clone(),
        heard: heard.clone(),
    })?;
    let authoritative = cfg.controller.authoritative;
    let shards = authoritative.then(|| {
        let machine = OwnershipConfig {
            pending_per_shard_max: cfg.replication.pending_per_shard_max,
            ..OwnershipConfig::default()
        };
        let links = crate::shards::NodeShardLinks {
            me: cfg.name.clone(),
            controller: controller_tx.clone(),
            heard: heard.clone(),
            heard_within: Duration::from_millis(
                machine.read_lease_ticks * cfg.controller.tick_ms / 2,
            ),
            metrics: metrics.clone(),
        };
        let limits = ShardLimits {
            shard_count: cfg.placement.shard_count,
            inbox_max: cfg.replication.incoming_max,
            // A quarter of a link frame: room for the link's own framing and a batch of
            // small messages behind a large one.
            batch_bytes_max: (cfg.link.frame_bytes_max / 4) as usize,
            parked_max: cfg.replication.incoming_max,
            tick: Duration::from_millis(cfg.controller.tick_ms),
            machine,
        };
        ShardReplicator::start(
            &cfg.name,
            incarnation,
            store.clone(),
            Arc::new(links),
            limits,
            conv_metrics.clone(),
        )
    });
    if authoritative {
        tracing::info!("routing and replicating by the placement controller's map");
    }
    let backends = Backends::new(&cfg.backends, conv_metrics.clone());
    let modules = NodeModules::start(
        node.clone(),
        &cfg.roles,
        backends.clone(),
        cfg.backends.module_calls_inflight_max,
        view.clone(),
        forwarder.clone(),
        metrics.clone(),
    )
    .await?;
    backends.route_through(modules.clone());
    backends.use_services(
        botclaw_actors::module_services::ModuleServices::new(&cfg.modules, &conv_metrics.services)
            .map_err(anyhow::Error::msg)
            .context("cannot start the module services")?,
    );
    let host = ConversationHost::start(
        node.clone(),
        &cfg.conversations,
        match &shards {
            Some(shards) => Arc::new(shards.clone()) as Arc<dyn Replication>,
            None => replicator.clone(),
        },
        cfg.frontend.retry_after_ms,
        botclaw_actors::bots::with_services(cfg.fault.injection, &cfg.bots, &conv_metrics.services)
            .map_err(anyhow::Error::msg)
            .context("cannot start the bot services")?,
        backends,
        conv_metrics,
    )
    .await
    .context("cannot start the conversation supervisor")?;
    let dispatcher = Arc::new(Dispatcher {
        host: host.clone(),
        shard_turns: routing::ShardCounters::new(cfg.placement.shard_count),
        replicator,
        serving: serving.clone(),
        forwarder: forwarder.clone(),
        view: placement.clone(),
        me: node.clone(),
        retry_after_ms: cfg.frontend.retry_after_ms,
        admission: Arc::new(
            crate::admission::Admission::new(
                cfg.frontend.node_inflight_max,
                cfg.frontend.node_inflight_bytes_max,
            )
            .exported(&metrics.work_refused),
        ),
        metrics: metrics.clone(),
        holding: routing::Holding::new(&cfg.handoff),
        modules: modules.clone(),
        draining: AtomicBool::new(false),
        controller: controller_tx.clone(),
        shards: Default::default(),
    });
    if let Some(shards) = &shards {
        let _ = dispatcher.shards.set(shards.clone());
    }
    let weak = Arc::downgrade(&dispatcher);
    let _ =
        host.shared().redirect.set(Box::new(move |conv, request, reply| match weak.upgrade() {
            Some(dispatcher) => dispatcher.redirect(conv, request, reply),
            None => drop(reply),
        }));
    let hold_task = tokio::spawn(routing::release_held_loop(dispatcher.clone()));
    let (router, router_task) = Actor::spawn(
        None,
        RouterActor,
        RouterArgs {
            node_name: cfg.name.clone(),
            link_name: link_name.clone(),
            inbound: dispatcher.clone(),
            forwarder: forwarder.clone(),
        },
    )
    .await
    .context("cannot start the router actor")?;

    let isolation = cfg.fault.injection.then(|| driver.isolation());
    let (gossip_tx, gossip_rx) = mpsc::channel(4);
    let gossip_task = tokio::spawn(driver.run(gossip_rx));
    // A node that remembers members but is its controller's only voter (the others left)
    // is a cluster of one: it founds again rather than wait for members that are gone.
    if !founds && cfg.seeds.is_empty() && authoritative && controller.sole_voter() {
        tracing::info!("the placement controller's only voter: founding again, still announcing to the remembered members");
        let _ = gossip_tx.send(GossipCommand::Found).await;
    }
    let controller_task = tokio::spawn(controller.run());
    let cluster_port_task = tokio::spawn(crate::tls::serve_cluster(
        cluster_listener,
        server_ref.clone(),
        tls.clone(),
        cfg.tls.clone(),
        Duration::from_millis(cfg.link.keepalive_ms),
        metrics.clone(),
    ));
    let links_task = tokio::spawn(crate::links::run(
        server_ref.clone(),
        view.clone(),
        metrics.clone(),
        tls.clone(),
        Duration::from_millis(cfg.link.reconcile_interval_ms),
        Duration::from_millis(cfg.link.dial_timeout_ms),
    ));
    let placement_task = match shards {
        Some(shards) => tokio::spawn(crate::shards::follow_map(crate::shards::Follow {
            map: map_view.clone(),
            gossip: view.clone(),
            dispatcher: dispatcher.clone(),
            shards,
            contact: heard.clone(),
            // Two election timeouts: by then the majority elected a leader without it.
            serve_lease: Duration::from_millis(
                2 * cfg.controller.election_ticks as u64 * cfg.controller.tick_ms,
            ),
        })),
        None => tokio::spawn(routing::maintain(
            view.clone(),
            cfg.placement.clone(),
            cfg.replication.clone(),
            Maintained { dispatcher: dispatcher.clone(), baseline: baseline.clone() },
        )),
    };
    tokio::spawn(follow_flags(map_view.clone(), host.clone()));
    let frontend = Arc::new(Frontend {
        dispatcher: dispatcher.clone(),
        cfg: cfg.frontend.clone(),
        node,
        view: view.clone(),
        metrics: metrics.clone(),
        hello_failures: frontend::HelloFailures::new(&cfg.frontend),
        answer_bytes_max: frontend::AnswerBytes {
            turn: cfg.conversations.turn_bytes_max,
            history: cfg.conversations.history_bytes_max,
        },
    });
    let preview = Arc::new(std::sync::Mutex::new(admin::RebalancePreview::default()));
    let load_task = tokio::spawn(load_loop(LoadLoop {
        gossip: gossip_tx.clone(),
        node: cfg.name.clone(),
        incarnation,
        dispatcher: dispatcher.clone(),
        metrics: metrics.clone(),
        view: view.clone(),
        rebalance: cfg.rebalance.clone(),
        preview: preview.clone(),
    }));
    let client_tls = tls.as_ref().and_then(|t| t.client_acceptor.clone());
    let frontend_task = tokio::spawn(frontend::serve(client_listener, frontend, client_tls));
    let drain_dispatcher = dispatcher.clone();
    let admin_state = Arc::new(AdminState {
        view: view.clone(),
        dispatcher,
        host: host.clone(),
        metrics,
        server: server_ref.clone(),
        link_name,
        call_timeout: Duration::from_millis(cfg.link.call_timeout_ms),
        isolation,
        baseline,
        drain_requested: drain_requested.clone(),
        map: map_view,
        controller: controller_tx.clone(),
        placement: cfg.placement.clone(),
        replication_factor: cfg.replication.factor,
        store: store.clone(),
        admin_tokens: cfg.admin.tokens.clone(),
        connections_max: cfg.admin.connections_max,
        header_timeout_ms: cfg.admin.header_timeout_ms,
        ring: Default::default(),
        preview,
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state));
    let leave_controller = controller_tx;

    // SIGTERM is a restart (ownership handed over, no data moved); an operator's drain
    // decommissions (every copy moved away first).
    let unwritable_after = Duration::from_millis(cfg.store.unwritable_exit_ms);
    let mut store_failed = false;
    let mode = tokio::select! {
        Ok(other) = &mut name_taken => {
            // Nothing to hand over: this process is the impostor. Leave and stop.
            let (done_tx, done_rx) = oneshot::channel();
            if gossip_tx.send(GossipCommand::Leave(done_tx)).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
            }
            return Err(NameTaken { name: other.name, other: other.gossip }.into());
        }
        () = shutdown => {
            tracing::info!("shutting down");
            LeaveMode::Restart
        }
        () = drain_requested.notified() => {
            tracing::info!("drain requested");
            LeaveMode::Decommission
        }
        () = store_unwritable_for(store.clone(), unwritable_after) => {
            tracing::error!(
                after_ms = cfg.store.unwritable_exit_ms,
                "the state store cannot write: handing conversations over and leaving for a restart"
            );
            store_failed = true;
            LeaveMode::Restart
        }
    };
    drain(Leaving {
        gossip: &gossip_tx,
        cluster: &view,
        dispatcher: &drain_dispatcher,
        controller: &leave_controller,
        incarnation,
        mode,
        // A node whose store cannot write gains nothing by waiting long: its controller
        // member may have stopped too (its log is on the same disk); the failure detector
        // and the others take over once it is gone.
        timeout: if store_failed {
            STORE_FAILED_DRAIN
        } else {
            Duration::from_millis(cfg.replication.drain_timeout_ms)
        },
    })
    .await;
    tracing::info!("leaving the cluster");
    let (done_tx, done_rx) = oneshot::channel();
    if gossip_tx.send(GossipCommand::Leave(done_tx)).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), done_rx).await;
    }
    frontend_task.abort();
    load_task.abort();
    placement_task.abort();
    hold_task.abort();
    links_task.abort();
    cluster_port_task.abort();
    admin_task.abort();
    gossip_task.abort();
    controller_task.abort();
    router.stop(None);
    server_ref.stop(None);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = router_task.await;
        let _ = server_task.await;
    })
    .await;
    tracing::info!("stopped");
    if store_failed {
        return Err(StoreUnwritable(cfg.store.unwritable_exit_ms).into());
    }
    Ok(())
}
