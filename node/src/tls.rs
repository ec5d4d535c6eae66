//! TLS for the cluster port (mutual: both ends show a certificate of the cluster CA) and,
//! optionally, the client port; and the cluster port's own listener.
//!
//! ractor_cluster's listener accepts in one loop and runs each TLS handshake inside it, so
//! one silent peer stalls every other accept; it has no limit on connections and retries
//! accept errors (EMFILE) without pause. The node therefore runs its own listener on the
//! cluster port: at most `tls.unauthenticated_connections_max` handshakes at a time, each
//! within `tls.handshake_timeout_ms`, at most `tls.connections_max` connections in all,
//! backoff on accept errors with rate-limited logging, and hands each authenticated stream
//! to ractor_cluster's `NodeServer` (which then runs its cookie handshake as before).
//! ractor_cluster's own listener is bound to an ephemeral loopback port nobody dials (and
//! with TLS on it demands a client certificate too).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use botclaw_config::TlsConfig;
use ractor::ActorRef;
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServerMessage};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::metrics::Metrics;

/// The loaded certificates: what accepts and what dials.
pub struct NodeTls {
    /// Cluster port: demands a client certificate of the cluster CA.
    pub cluster_acceptor: TlsAcceptor,
    /// Dials peers with this node's certificate, checking theirs against the CA.
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
    /// Client port (no client certificate), when `tls.client_port` is on.
    pub client_acceptor: Option<TlsAcceptor>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("cannot read a PEM private key from {}", path.display()))
}

impl NodeTls {
    /// Loads the files `cfg` names; `None` when TLS is off.
    pub fn load(cfg: &TlsConfig) -> anyhow::Result<Option<NodeTls>> {
        let (Some(ca), Some(cert), Some(key)) = (&cfg.ca_file, &cfg.cert_file, &cfg.key_file)
        else {
            return Ok(None);
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(ca)? {
            roots
                .add(c)
                .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
        }
        let roots = Arc::new(roots);
        let chain = read_certs(cert)?;
        let key = read_key(key)?;
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .context("cannot build the client certificate verifier")?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("the certificate does not match its key")?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .context("the certificate does not match its key")?;
        let client_acceptor = if cfg.client_port {
            let open = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(chain, key)?;
            Some(TlsAcceptor::from(Arc::new(open)))
        } else {
            None
        };
        let server_name = ServerName::try_from(cfg.server_name.clone())
            .map_err(|_| anyhow!("tls.server_name {:?} is not a DNS name", cfg.server_name))?;
        Ok(Some(NodeTls {
            cluster_acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
            client_acceptor,
        }))
    }
}

/// Writes a cluster CA and one certificate per node name into `dir` (for a quick start and
/// the local demo; production clusters bring their own PKI). If `dir` already holds a CA
/// (`ca.pem` and `ca-key.pem`), its key signs the new certificates and the CA is kept, so a
/// node can be added to a running cluster. Node certificates carry `server_name`, the
/// node's name, `localhost` and `ips` as subject alternative names and may act as TLS
/// server and client. Keys are written mode 0600.
pub fn init(dir: &Path, names: &[String], server_name: &str, ips: &[IpAddr]) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    crate::node::create_private_dir(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "botclaw cluster CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let (ca_file, ca_key_file) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let existing = ca_file.exists() && ca_key_file.exists();
    let ca_key = if existing {
        let pem = std::fs::read_to_string(&ca_key_file)
            .with_context(|| format!("cannot read {}", ca_key_file.display()))?;
        KeyPair::from_pem(&pem)
            .with_context(|| format!("{} is not a key", ca_key_file.display()))?
    } else {
        KeyPair::generate()?
    };
    // With an existing key this is the same issuer (name and key) as the CA on disk, so
    // what it signs verifies against that CA.
    let ca = ca_params.self_signed(&ca_key)?;
    if !existing {
        write_file(&ca_file, ca.pem().as_bytes(), 0o644)?;
        write_file(&ca_key_file, ca_key.serialize_pem().as_bytes(), 0o600)?;
    }
    for name in names {
        let mut sans = vec![server_name.to_string(), name.clone(), "localhost".into()];
        sans.dedup();
        let mut params = CertificateParams::new(sans)?;
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.distinguished_name.push(DnType::CommonName, name.as_str());
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        write_file(&dir.join(format!("{name}.pem")), cert.pem().as_bytes(), 0o644)?;
        write_file(&dir.join(format!("{name}-key.pem")), key.serialize_pem().as_bytes(), 0o600)?;
    }
    Ok(())
}

/// The three files of node `name` under a directory written by [`init`].
pub fn node_files(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

/// A stream handed to ractor_cluster that keeps its place among the cluster port's
/// connections until both halves are dropped.
struct Held<S> {
    stream: S,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
}

/// One half of a [`Held`] stream.
struct Half<T> {
    inner: T,
    _permit: Arc<OwnedSemaphorePermit>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Half<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Half<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> ClusterBidiStream for Held<S> {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let permit = Arc::new(self.permit);
        let (r, w) = tokio::io::split(self.stream);
        (
            Box::new(Half { inner: r, _permit: permit.clone() }),
            Box::new(Half { inner: w, _permit: permit }),
        )
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.peer.to_string())
    }
}

/// Logs at most one warning per `every` (counting the ones left out).
pub struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog { every, last: None, suppressed: 0 }
    }

    /// Calls `log` with the number suppressed since the last call that logged, if it is time.
    pub fn warn(&mut self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        log(std::mem::take(&mut self.suppressed));
    }
}

/// A port's accept loop: the next connection. On an accept error (typically EMFILE) it
/// counts it (`on_error`), waits, longer each time up to a second, instead of spinning,
/// and logs at most once per 10 s.
pub struct Acceptor {
    listener: TcpListener,
    /// What the port is, for the log.
    port: &'static str,
    backoff: Duration,
    /// Shared with the loop's own warnings (a full port, ...).
    pub log: RateLimitedLog,
}

impl Acceptor {
    const BACKOFF_MIN: Duration = Duration::from_millis(5);

    pub fn new(listener: TcpListener, port: &'static str) -> Acceptor {
        let log = RateLimitedLog::new(Duration::from_secs(10));
        Acceptor { listener, port, backoff: Self::BACKOFF_MIN, log }
    }

    pub async fn next(&mut self, on_error: impl Fn()) -> (TcpStream, std::net::SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = Self::BACKOFF_MIN;
                    return accepted;
                }
                Err(e) => {
                    on_error();
                    let port = self.port;
                    self.log.warn(
                        |n| tracing::warn!(port, error = %e, suppressed = n, "accept failed"),
                    );
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Accepts the cluster port's connections and hands authenticated ones to `server`.
pub async fn serve_cluster(
    listener: TcpListener,
    server: ActorRef<NodeServerMessage>,
    tls: Option<Arc<NodeTls>>,
    cfg: TlsConfig,
    keepalive: Duration,
    metrics: Metrics,
) {
    let all = Arc::new(Semaphore::new(cfg.connections_max));
    let handshakes = Arc::new(Semaphore::new(cfg.unauthenticated_connections_max));
    let timeout = Duration::from_millis(cfg.handshake_timeout_ms);
    let mut acceptor = Acceptor::new(listener, "cluster");
    loop {
        let (stream, peer) = acceptor.next(|| metrics.cluster_refused("accept_error")).await;
        let log = &mut acceptor.log;
        let Ok(place) = all.clone().try_acquire_owned() else {
            metrics.cluster_refused("full");
            log.warn(
                |n| tracing::warn!(%peer, suppressed = n, "cluster port full; connection closed"),
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        crate::node::set_keepalive(&stream, keepalive);
        let Some(tls) = tls.clone() else {
            hand_over(&server, Box::new(Held { stream, peer, permit: place }));
            continue;
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            metrics.cluster_refused("handshakes_full");
            log.warn(|n| tracing::warn!(%peer, suppressed = n, "too many cluster handshakes; connection closed"));
            continue;
        };
        let (server, metrics) = (server.clone(), metrics.clone());
        tokio::spawn(async move {
            let accepted = tokio::time::timeout(timeout, tls.cluster_acceptor.accept(stream)).await;
            drop(handshake);
            match accepted {
                Ok(Ok(stream)) => {
                    hand_over(&server, Box::new(Held { stream, peer, permit: place }))
                }
                Ok(Err(e)) => {
                    metrics.cluster_refused("handshake");
                    tracing::debug!(%peer, error = %e, "cluster TLS handshake refused");
                }
                Err(_) => {
                    metrics.cluster_refused("handshake_timeout");
                    tracing::debug!(%peer, "cluster TLS handshake timed out");
                }
            }
        });
    }
}

fn hand_over(server: &ActorRef<NodeServerMessage>, stream: Box<dyn ClusterBidiStream>) {
    let _ = server.cast(NodeServerMessage::ConnectionOpenedExternal { stream, is_server: true });
}

/// Dials a peer's cluster port (over TLS when configured) and hands the stream to `server`.
pub async fn dial(
    server: &ActorRef<NodeServerMessage>,
    addr: SocketAddr,
    tls: Option<&NodeTls>,
) -> anyhow::Result<()> {
    match tls {
        None => ractor_cluster::client_connect(server, addr).await?,
        Some(tls) => {
            ractor_cluster::client_connect_enc(
                server,
                addr,
                tls.connector.clone(),
                tls.server_name.clone(),
            )
            .await?
        }
    }
    Ok(())
}
