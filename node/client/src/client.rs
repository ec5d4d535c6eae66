//! An async client: one TCP connection to any node, many requests in flight.
//!
//! `say` requests are matched to replies by (conv, id); other requests are answered in the
//! order they were sent. `say` retries with the same id on `busy`, `unavailable` and
//! `timeout`, waiting what the node suggests (or an exponential back-off), so a retried
//! turn is applied once.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::codec::{Frame, LineFramer};
use crate::protocol::{ErrorCode, HistoryTurn, Request, Response, TopologyNode};

/// Longest response line the client accepts.
pub const RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection lost")]
    ConnectionLost,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{code:?}: {message}")]
    Server { code: ErrorCode, message: String, retry_after_ms: Option<u64> },
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Name sent in `hello`.
    pub client_name: String,
    pub token: Option<String>,
    /// How long one attempt waits for its answer.
    pub request_timeout: Duration,
    /// Attempts of a `say` on retryable errors, the first included.
    pub attempts_max: u32,
    /// First back-off when the node suggests none; doubles per attempt.
    pub backoff: Duration,
    /// Talk TLS to the node's client port (`[tls] client_port = true`).
    pub tls: Option<ClientTls>,
}

/// How a client checks a node's certificate: the CA that signed it and the name it carries.
#[derive(Clone)]
pub struct ClientTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: rustls_pki_types::ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("server_name", &self.server_name).finish()
    }
}

impl ClientTls {
    /// Trusts the CA certificates in the PEM file `ca` and expects nodes to carry
    /// `server_name` (by default `botclaw-node`).
    pub fn from_ca_file(ca: &std::path::Path, server_name: &str) -> Result<ClientTls, ClientError> {
        use rustls_pki_types::pem::PemObject;
        let bad = |what: String| ClientError::Protocol(what);
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .map_err(|e| bad(format!("{}: {e}", ca.display())))?
        {
            let cert = cert.map_err(|e| bad(format!("{}: {e}", ca.display())))?;
            roots.add(cert).map_err(|e| bad(format!("{}: {e}", ca.display())))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = rustls_pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| bad(format!("server name {server_name:?}: {e}")))?;
        Ok(ClientTls { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), server_name })
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            client_name: "botclaw-client".into(),
            token: None,
            request_timeout: Duration::from_secs(15),
            attempts_max: 8,
            backoff: Duration::from_millis(50),
            tls: None,
        }
    }
}

/// The answer to a `say`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SayReply {
    pub messages: Vec<String>,
    pub turn: u64,
    pub node: String,
}

type Waiter = oneshot::Sender<Response>;

#[derive(Default)]
struct Pending {
    says: HashMap<(String, String), Waiter>,
    others: VecDeque<Waiter>,
    closed: bool,
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

pub struct Client {
    writer: tokio::sync::Mutex<Writer>,
    pending: Arc<Mutex<Pending>>,
    node: String,
    opts: ClientOptions,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("node", &self.node).finish()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn dispatch(pending: &Mutex<Pending>, response: Response) {
    let mut p = pending.lock().expect("pending lock");
    let waiter = match &response {
        Response::Reply { conv, id, .. } => p.says.remove(&(conv.clone(), id.clone())),
        Response::Error { id: Some(id), conv: Some(conv), .. } => {
            p.says.remove(&(conv.clone(), id.clone()))
        }
        Response::Error { id: Some(id), conv: None, .. } => {
            let key = p.says.keys().find(|(_, i)| i == id).cloned();
            key.and_then(|k| p.says.remove(&k))
        }
        _ => p.others.pop_front(),
    };
    if let Some(w) = waiter {
        let _ = w.send(response);
    }
}

async fn read_loop(mut stream: impl AsyncRead + Unpin, pending: Arc<Mutex<Pending>>) {
    let mut framer = LineFramer::new(RESPONSE_BYTES_MAX);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        while let Some(frame) = framer.next_frame(&mut buf) {
            if let Frame::Line(line) = frame {
                if let Ok(response) = crate::protocol::parse_response(&line) {
                    dispatch(&pending, response);
                }
            }
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let mut p = pending.lock().expect("pending lock");
    p.closed = true;
    p.says.clear();
    p.others.clear();
}

impl Client {
    /// Connects and says hello; fails with `Server { code: Unauthorized, .. }` on a bad
    /// token.
    pub async fn connect(addr: SocketAddr, opts: ClientOptions) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let (reader, write): (_, Writer) = match &opts.tls {
            None => {
                let (read, write) = stream.into_split();
                (tokio::spawn(read_loop(read, pending.clone())), Box::new(write))
            }
            Some(tls) => {
                let stream = tls.connector.connect(tls.server_name.clone(), stream).await?;
                let (read, write) = tokio::io::split(stream);
                (tokio::spawn(read_loop(read, pending.clone())), Box::new(write))
            }
        };
        let mut client = Client {
            writer: tokio::sync::Mutex::new(write),
            pending,
            node: String::new(),
            opts,
            reader,
        };
        let hello = Request::Hello {
            token: client.opts.token.clone(),
            client: Some(client.opts.client_name.clone()),
        };
        match client.request(hello).await? {
            Response::Welcome { node, .. } => client.node = node,
            other => return Err(unexpected(other)),
        }
        Ok(client)
    }

    /// Name of the node this client is connected to.
    pub fn node(&self) -> &str {
        &self.node
    }

    async fn send(&self, request: &Request, waiter: Waiter) -> Result<(), ClientError> {
        {
            let mut p = self.pending.lock().expect("pending lock");
            if p.closed {
                return Err(ClientError::ConnectionLost);
            }
            match request {
                Request::Say { conv, id, .. } => {
                    p.says.insert((conv.clone(), id.clone()), waiter);
                }
                _ => p.others.push_back(waiter),
            }
        }
        let mut w = self.writer.lock().await;
        w.write_all(&request.to_line()).await?;
        Ok(())
    }

    /// Sends one request and waits for its answer (no retry).
    pub async fn request(&self, request: Request) -> Result<Response, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(&request, tx).await?;
        match tokio::time::timeout(self.opts.request_timeout, rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(ClientError::ConnectionLost),
            Err(_) => {
                if let Request::Say { conv, id, .. } = &request {
                    self.pending
                        .lock()
                        .expect("pending lock")
                        .says
                        .remove(&(conv.clone(), id.clone()));
                }
                Err(ClientError::Timeout(self.opts.request_timeout))
            }
        }
    }

    /// Sends a turn once and waits for its reply; error answers become
    /// `ClientError::Server`.
    pub async fn say_once(
        &self,
        conv: &str,
        id: &str,
        text: &str,
        bot: Option<&str>,
    ) -> Result<SayReply, ClientError> {
        let request = Request::Say {
            conv: conv.into(),
            id: id.into(),
            text: text.into(),
            bot: bot.map(String::from),
            user: None,
        };
        match self.request(request).await? {
            Response::Reply { messages, turn, node, .. } => Ok(SayReply { messages, turn, node }),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a turn and waits for its reply, retrying with the same id on retryable
    /// errors; the node applies it once however many times it is sent.
    pub async fn say(
        &self,
        conv: &str,
        id: &str,
        text: &str,
        bot: Option<&str>,
    ) -> Result<SayReply, ClientError> {
        let mut backoff = self.opts.backoff;
        let mut attempt = 1;
        loop {
            let error = match self.say_once(conv, id, text, bot).await {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            let Some(wait) = retry_wait(&error, backoff) else { return Err(error) };
            if attempt >= self.opts.attempts_max {
                return Err(error);
            }
            attempt += 1;
            tokio::time::sleep(wait).await;
            backoff = next_backoff(backoff);
        }
    }

    pub async fn history(
        &self,
        conv: &str,
        limit: Option<u32>,
    ) -> Result<Vec<HistoryTurn>, ClientError> {
        Ok(self.history_page(conv, limit, None).await?.0)
    }

    /// One page of history: the last `limit` kept turns numbered below `before`, and
    /// whether older kept turns remain (ask for them with `before` = the page's first turn).
    pub async fn history_page(
        &self,
        conv: &str,
        limit: Option<u32>,
        before: Option<u64>,
    ) -> Result<(Vec<HistoryTurn>, bool), ClientError> {
        match self.request(Request::History { conv: conv.into(), limit, before }).await? {
            Response::History { turns, more, .. } => Ok((turns, more)),
            other => Err(unexpected(other)),
        }
    }

    pub async fn topology(&self) -> Result<Vec<TopologyNode>, ClientError> {
        match self.request(Request::Topology).await? {
            Response::Topology { nodes } => Ok(nodes),
            other => Err(unexpected(other)),
        }
    }

    pub async fn ping(&self) -> Result<String, ClientError> {
        match self.request(Request::Ping).await? {
            Response::Pong { node } => Ok(node),
            other => Err(unexpected(other)),
        }
    }
}

/// How long to wait before retrying after `error`, or `None` if retrying cannot help: the
/// back-off, or longer if the node suggested longer. The node's suggestion is a floor, not
/// the whole wait: a fixed 50 ms suggestion repeated spent the attempts in 350 ms, and a
/// whole-cluster restart's window without live owners lasts longer.
pub(crate) fn retry_wait(error: &ClientError, backoff: Duration) -> Option<Duration> {
    match error {
        ClientError::Server { code, retry_after_ms, .. } if code.is_retryable() => {
            Some(retry_after_ms.map_or(backoff, |ms| Duration::from_millis(ms).max(backoff)))
        }
        ClientError::Timeout(_) => Some(backoff),
        _ => None,
    }
}

/// Exponential back-off, capped at 2 s.
pub(crate) fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(Duration::from_secs(2))
}

fn unexpected(response: Response) -> ClientError {
    match response {
        Response::Error { code, message, retry_after_ms, .. } => {
            ClientError::Server { code, message, retry_after_ms }
        }
        other => ClientError::Protocol(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_back_off_grows_past_the_nodes_suggestion_and_respects_a_longer_one() {
        let unavailable = |after: Option<u64>| ClientError::Server {
            code: ErrorCode::Unavailable,
            message: "no node serves conversations".into(),
            retry_after_ms: after,
        };
        // Eight attempts against a node that keeps suggesting 50 ms wait seconds in all.
        let mut backoff = ClientOptions::default().backoff;
        let mut waited = Duration::ZERO;
        for _ in 1..ClientOptions::default().attempts_max {
            waited += retry_wait(&unavailable(Some(50)), backoff).unwrap();
            backoff = next_backoff(backoff);
        }
        assert!(waited >= Duration::from_secs(3), "{waited:?}");
        let ms = Duration::from_millis;
        assert_eq!(retry_wait(&unavailable(Some(900)), ms(50)), Some(ms(900)));
        assert_eq!(retry_wait(&unavailable(None), ms(400)), Some(ms(400)));
        assert_eq!(retry_wait(&ClientError::Timeout(ms(5)), ms(100)), Some(ms(100)));
        let refused = ClientError::Server {
            code: ErrorCode::BadRequest,
            message: String::new(),
            retry_after_ms: None,
        };
        assert_eq!(retry_wait(&refused, ms(50)), None);
    }
}
