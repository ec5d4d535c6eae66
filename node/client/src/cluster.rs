//! A client that fails over: it talks to one node at a time and, when that node goes away,
//! stops answering within the request timeout, or keeps answering `unavailable` (it died,
//! is cut off, is in a minority, or is shutting down),
//! moves to another node it learned from `topology`, backs off, and resends every
//! unacknowledged `say` with its original id, so each turn is applied once.
//!
//! It is placement-aware (`FailoverOptions::direct`): a reply's `node` is the node that owns
//! the conversation, so the client remembers it per conversation (a bounded cache) and
//! sends the conversation's next turns straight to that node over a connection of their
//! own, as Redis Cluster clients do with slots. A conversation whose owner changed is
//! forwarded by the node that receives it, and the reply names the new owner: that is the
//! "moved" answer, and costs no extra round trip. Any failure of a direct send falls back
//! to the failover path with the same id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::client::{next_backoff, retry_wait, Client, ClientError, ClientOptions, SayReply};
use crate::protocol::{ErrorCode, HistoryTurn};

/// Consecutive `unavailable` answers from one node after which a request moves on.
const UNAVAILABLE_SWITCH_AFTER: u32 = 3;

#[derive(Debug, Clone)]
pub struct FailoverOptions {
    pub client: ClientOptions,
    /// How long one request keeps retrying (across nodes) before it gives up.
    pub retry_for: Duration,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
    /// Send each `say` straight to its conversation's owner once a reply named it.
    pub direct: bool,
    /// Conversations whose owner the client remembers (least recently used forgotten).
    pub owners_cached_max: u64,
}

impl Default for FailoverOptions {
    fn default() -> Self {
        FailoverOptions {
            client: ClientOptions { request_timeout: Duration::from_secs(5), ..Default::default() },
            retry_for: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            direct: true,
            owners_cached_max: 100_000,
        }
    }
}

struct Connection {
    client: Arc<Client>,
    addr: SocketAddr,
    /// Bumped on every reconnect, so concurrent requests that saw one failure reconnect
    /// once.
    generation: u64,
}

pub struct FailoverClient {
    current: Mutex<Connection>,
    /// Every node address known (seeds, then topology), tried in turn.
    known: std::sync::Mutex<Vec<SocketAddr>>,
    opts: FailoverOptions,
    direct: Option<Direct>,
}

/// What a placement-aware client knows: owners of conversations, node addresses, and its
/// connections to owners.
struct Direct {
    /// The node that ran each conversation's last turn (its owner then).
    owners: mini_moka::sync::Cache<String, Arc<str>>,
    /// Client address of each live node, by name (from `topology`).
    addrs: std::sync::Mutex<HashMap<String, SocketAddr>>,
    /// One connection per owner talked to directly; at most one per node in `addrs`.
    conns: std::sync::Mutex<HashMap<String, Arc<Client>>>,
    /// When `topology` was last asked because a reply named a node not in `addrs`.
    topology_asked: std::sync::Mutex<Option<Instant>>,
}

/// How often a client asks for the topology when replies name nodes it does not know.
const TOPOLOGY_REFRESH: Duration = Duration::from_secs(1);

impl Direct {
    fn new(opts: &FailoverOptions, nodes: &[crate::protocol::TopologyNode]) -> Direct {
        let d = Direct {
            owners: mini_moka::sync::Cache::new(opts.owners_cached_max),
            addrs: Default::default(),
            conns: Default::default(),
            topology_asked: Default::default(),
        };
        d.set_nodes(nodes);
        d
    }

    fn set_nodes(&self, nodes: &[crate::protocol::TopologyNode]) {
        let addrs = nodes
            .iter()
            .filter_map(|n| Some((n.name.clone(), n.client_addr.parse().ok()?)))
            .collect();
        *self.addrs.lock().expect("addrs lock") = addrs;
    }

    fn learn(&self, conv: &str, node: &str) {
        if self.owners.get(&conv.to_string()).is_none_or(|n| &*n != node) {
            self.owners.insert(conv.to_string(), Arc::from(node));
        }
    }
}

impl std::fmt::Debug for FailoverClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverClient").field("known", &self.known).finish()
    }
}

impl FailoverClient {
    /// Connects to the first reachable of `seeds` and learns the rest from `topology`.
    pub async fn connect(
        seeds: &[SocketAddr],
        opts: FailoverOptions,
    ) -> Result<FailoverClient, ClientError> {
        let mut last = ClientError::ConnectionLost;
        for &addr in seeds {
            match open(addr, &opts).await {
                Ok(client) => {
                    let nodes = client.topology().await.unwrap_or_default();
                    let known = learn(&nodes, seeds);
                    let direct = opts.direct.then(|| Direct::new(&opts, &nodes));
                    let current = Connection { client: Arc::new(client), addr, generation: 0 };
                    return Ok(FailoverClient {
                        current: Mutex::new(current),
                        known: std::sync::Mutex::new(known),
                        opts,
                        direct,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The node currently talked to.
    pub async fn node(&self) -> String {
        self.current.lock().await.client.node().to_string()
    }

    async fn connection(&self) -> (Arc<Client>, u64) {
        let c = self.current.lock().await;
        (c.client.clone(), c.generation)
    }

    /// Moves to another node unless someone already did since `seen`.
    async fn reconnect(&self, seen: u64) -> Result<(), ClientError> {
        let mut c = self.current.lock().await;
        if c.generation != seen {
            return Ok(());
        }
        let known = self.known.lock().expect("known lock").clone();
        let start = known.iter().position(|a| *a == c.addr).map_or(0, |i| i + 1);
        let mut last = ClientError::ConnectionLost;
        for i in 0..known.len() {
            let addr = known[(start + i) % known.len()];
            match open(addr, &self.opts).await {
                Ok(client) => {
                    let nodes = client.topology().await.unwrap_or_default();
                    *self.known.lock().expect("known lock") = learn(&nodes, &known);
                    if let Some(d) = &self.direct {
                        d.set_nodes(&nodes);
                    }
                    *c = Connection { client: Arc::new(client), addr, generation: seen + 1 };
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Sends a turn until some node answers it, failing over as needed; the same id on
    /// every attempt, so the turn is applied once. Placement-aware, it goes first to the
    /// node that owned the conversation at its last reply.
    pub async fn say(
        &self,
        conv: &str,
        id: &str,
        text: &str,
        bot: Option<&str>,
    ) -> Result<SayReply, ClientError> {
        if let Some(owner) = self.owner_connection(conv).await {
            match owner.say_once(conv, id, text, bot).await {
                Ok(reply) => {
                    self.learn_owner(conv, &reply.node);
                    return Ok(reply);
                }
                Err(e) => {
                    let direct = self.direct.as_ref().expect("an owner connection is direct");
                    direct.owners.invalidate(&conv.to_string());
                    match e {
                        ClientError::Server { code, .. } if !code.is_retryable() => return Err(e),
                        ClientError::Server { .. } => {}
                        // The owner's connection failed: the next turn opens a new one.
                        _ => {
                            direct
                                .conns
                                .lock()
                                .expect("conns lock")
                                .retain(|_, c| !Arc::ptr_eq(c, &owner));
                        }
                    }
                }
            }
        }
        let reply = self
            .with_failover(|client| async move { client.say_once(conv, id, text, bot).await })
            .await?;
        self.learn_owner(conv, &reply.node);
        Ok(reply)
    }

    fn learn_owner(&self, conv: &str, node: &str) {
        if let Some(d) = &self.direct {
            d.learn(conv, node);
        }
    }

    /// A connection to the conversation's owner, when it is known and is not the node this
    /// client talks to anyway. An owner that cannot be reached is forgotten (the turn goes
    /// through the failover path, whose reply names the owner again).
    async fn owner_connection(&self, conv: &str) -> Option<Arc<Client>> {
        let direct = self.direct.as_ref()?;
        let owner = direct.owners.get(&conv.to_string())?;
        let (current, _) = self.connection().await;
        if current.node() == &*owner {
            return Some(current);
        }
        if let Some(c) = direct.conns.lock().expect("conns lock").get(&*owner) {
            return Some(c.clone());
        }
        let addr = direct.addrs.lock().expect("addrs lock").get(&*owner).copied();
        let addr = match addr {
            Some(addr) => Some(addr),
            None => {
                // A node this client has not heard of (it joined since): ask for the
                // topology again, at most once a second.
                let now = Instant::now();
                let due = {
                    let mut asked = direct.topology_asked.lock().expect("asked lock");
                    let due = asked.is_none_or(|t| now.duration_since(t) >= TOPOLOGY_REFRESH);
                    if due {
                        *asked = Some(now);
                    }
                    due
                };
                if due {
                    if let Ok(nodes) = current.topology().await {
                        direct.set_nodes(&nodes);
                    }
                }
                direct.addrs.lock().expect("addrs lock").get(&*owner).copied()
            }
        };
        let client = match addr {
            Some(addr) => open(addr, &self.opts).await.ok().filter(|c| c.node() == &*owner),
            None => None,
        };
        let Some(client) = client.map(Arc::new) else {
            direct.owners.invalidate(&conv.to_string());
            return None;
        };
        // Connecting happens outside the lock, so a slow or dead owner does not hold up
        // turns to the others; if two turns connected at once, the first one kept wins.
        let live: Vec<String> = direct.addrs.lock().expect("addrs lock").keys().cloned().collect();
        let mut conns = direct.conns.lock().expect("conns lock");
        conns.retain(|name, _| live.contains(name));
        Some(conns.entry(owner.to_string()).or_insert(client).clone())
    }

    pub async fn history(
        &self,
        conv: &str,
        limit: Option<u32>,
    ) -> Result<Vec<HistoryTurn>, ClientError> {
        self.with_failover(|client| async move { client.history(conv, limit).await }).await
    }

    pub async fn topology(&self) -> Result<Vec<crate::protocol::TopologyNode>, ClientError> {
        self.with_failover(|client| async move { client.topology().await }).await
    }

    pub async fn ping(&self) -> Result<String, ClientError> {
        self.with_failover(|client| async move { client.ping().await }).await
    }

    async fn with_failover<T, F, Fut>(&self, attempt: F) -> Result<T, ClientError>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let deadline = Instant::now() + self.opts.retry_for;
        let mut backoff = self.opts.client.backoff;
        let mut unavailable = 0;
        loop {
            let (client, generation) = self.connection().await;
            let error = match attempt(client).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let (wait, move_on) = match &error {
                // No answer in time: the node may be cut off (a pulled cable leaves the
                // connection open, silent). Moving on is safe: a `say` is resent with its
                // id, and the conversation applies it once.
                ClientError::ConnectionLost | ClientError::Io(_) | ClientError::Timeout(_) => {
                    (backoff, true)
                }
                ClientError::Server { code: ErrorCode::Unavailable, .. } => {
                    unavailable += 1;
                    let wait = retry_wait(&error, backoff).unwrap_or(backoff);
                    (wait, unavailable % UNAVAILABLE_SWITCH_AFTER == 0)
                }
                other => match retry_wait(other, backoff) {
                    Some(wait) => (wait, false),
                    None => return Err(error),
                },
            };
            if Instant::now() + wait > deadline {
                return Err(error);
            }
            tokio::time::sleep(wait).await;
            backoff = next_backoff(backoff);
            if move_on {
                // A failed reconnect is retried on the next round, until the deadline.
                let _ = self.reconnect(generation).await;
            }
        }
    }
}

async fn open(addr: SocketAddr, opts: &FailoverOptions) -> Result<Client, ClientError> {
    match tokio::time::timeout(opts.connect_timeout, Client::connect(addr, opts.client.clone()))
        .await
    {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout(opts.connect_timeout)),
    }
}

/// The addresses to fail over to: what the node reports, then what was known before.
fn learn(nodes: &[crate::protocol::TopologyNode], known: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    out.extend(nodes.iter().filter_map(|n| n.client_addr.parse::<SocketAddr>().ok()));
    for addr in known {
        if !out.contains(addr) {
            out.push(*addr);
        }
    }
    out
}
