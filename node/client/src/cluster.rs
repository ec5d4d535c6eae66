//! A client that fails over: it talks to one node at a time and, when that node goes away,
//! stops answering within the request timeout, or keeps answering `unavailable` (it died,
//! is cut off, is in a minority, or is shutting down),
//! moves to another node it learned from `topology`, backs off, and resends every
//! unacknowledged `say` with its original id, so each turn is applied once.

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
}

impl Default for FailoverOptions {
    fn default() -> Self {
        FailoverOptions {
            client: ClientOptions { request_timeout: Duration::from_secs(5), ..Default::default() },
            retry_for: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
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
                    let known = learn(&client, seeds).await;
                    let current = Connection { client: Arc::new(client), addr, generation: 0 };
                    return Ok(FailoverClient {
                        current: Mutex::new(current),
                        known: std::sync::Mutex::new(known),
                        opts,
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
                    let learned = learn(&client, &known).await;
                    *self.known.lock().expect("known lock") = learned;
                    *c = Connection { client: Arc::new(client), addr, generation: seen + 1 };
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Sends a turn until some node answers it, failing over as needed; the same id on
    /// every attempt, so the turn is applied once.
    pub async fn say(
        &self,
        conv: &str,
        id: &str,
        text: &str,
        bot: Option<&str>,
    ) -> Result<SayReply, ClientError> {
        self.with_failover(|client| async move { client.say_once(conv, id, text, bot).await }).await
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
async fn learn(client: &Client, known: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    if let Ok(nodes) = client.topology().await {
        out.extend(nodes.iter().filter_map(|n| n.client_addr.parse::<SocketAddr>().ok()));
    }
    for addr in known {
        if !out.contains(addr) {
            out.push(*addr);
        }
    }
    out
}
