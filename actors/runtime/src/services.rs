//! Calls to HTTP services (bot services, module services): one [`ServicePool`] per
//! service executes what `botclaw_core::services::Pool` decides.
//!
//! Each call is bounded node-wide (`concurrency_max`, a semaphore) and per instance
//! (`instance_concurrency_max`), balanced by the fewer calls outstanding of two instances
//! drawn, and retried on another instance after a refused connection or a 5xx while the
//! call's deadline (`timeout_ms`, over every attempt) and the service's retry budget allow.
//! Each instance has a circuit breaker: failures in a row eject it until a trial call
//! succeeds (outlier ejection). With `health_path` set, a task checks every instance each
//! `health_interval_ms` and takes failing ones out of the balancing.
//!
//! A slow or hanging service fails the call with `timeout`; a down one, one whose breakers
//! are all open, one whose retry budget is spent, or a full node, with `unavailable`.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use botclaw_config::ServiceConfig;
use botclaw_core::services::{Pool, RetryBudget};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::bot::BotError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    /// `bot` or `module`.
    pub kind: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    pub kind: String,
    pub service: String,
    /// `ok`, `error` (4xx, 5xx, a bad answer), `refused` (connection), `timeout`,
    /// `breaker_open` (no instance takes calls), `retry_budget` (retries spent), `busy`
    /// (the node's bound).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabel {
    pub kind: String,
    pub service: String,
    /// The instance's URL.
    pub instance: String,
}

/// Calls to bot and module services (shared by every pool of a node).
#[derive(Debug, Default, Clone)]
pub struct ServiceMetrics {
    /// Outcomes: of each call (`ok`, `timeout`, `breaker_open`, `retry_budget`, `busy`)
    /// and of each failed attempt (`refused`, `error`; a call retried after one counts it
    /// and its own outcome).
    pub calls: Family<CallLabel, Counter>,
    /// Attempts by instance: how the balancing spread them.
    pub attempts: Family<InstanceLabel, Counter>,
    /// Retries made.
    pub retries: Family<ServiceLabel, Counter>,
    pub breaker_opened: Family<ServiceLabel, Counter>,
    /// Instances out of the balancing by health checks.
    pub instances_down: Family<ServiceLabel, Gauge>,
    /// Module answers from the node-wide cache, calls made for a miss, calls that waited
    /// for another's call for the same key, entries evicted for room.
    pub cache_hits: Family<ServiceLabel, Counter>,
    pub cache_misses: Family<ServiceLabel, Counter>,
    pub cache_coalesced: Family<ServiceLabel, Counter>,
    pub cache_evictions: Family<ServiceLabel, Counter>,
    /// Time of calls (every attempt), by kind and service.
    pub call_seconds: crate::metrics::LatencyBy<ServiceLabel>,
}

/// What the service said about caching its answer (`Cache-Control`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// No `max-age`, `no-store` or `no-cache`: the caller's default applies.
    Unsaid,
    MaxAge(Duration),
    /// `no-store` or `no-cache`.
    DoNotStore,
}

impl Freshness {
    /// From a `Cache-Control` header's value: `no-store`/`no-cache` win over `max-age`.
    pub fn parse(value: &str) -> Freshness {
        let mut max_age = None;
        for directive in value.split(',').map(str::trim) {
            let lower = directive.to_ascii_lowercase();
            if lower == "no-store" || lower == "no-cache" {
                return Freshness::DoNotStore;
            }
            if let Some(n) = lower.strip_prefix("max-age=") {
                match n.trim_matches('"').parse::<u64>() {
                    Ok(s) => max_age = Some(s),
                    // A malformed max-age is stale (RFC 9111 4.2.1).
                    Err(_) => return Freshness::DoNotStore,
                }
            }
        }
        match max_age {
            Some(0) => Freshness::DoNotStore,
            Some(s) => Freshness::MaxAge(Duration::from_secs(s)),
            None => Freshness::Unsaid,
        }
    }
}

/// A 2xx answer.
#[derive(Debug)]
pub struct Answer {
    pub body: Bytes,
    pub freshness: Freshness,
}

/// Why one attempt failed.
enum Attempt {
    /// Worth another instance: a refused connection, a 5xx.
    Retry(String),
    /// The service answered, but not with success (4xx, an answer too large): not retried.
    Fail(String),
}

pub struct ServicePool {
    kind: &'static str,
    cfg: ServiceConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    urls: Vec<hyper::Uri>,
    pool: Mutex<Pool>,
    budget: Mutex<RetryBudget>,
    permits: tokio::sync::Semaphore,
    /// The clock breakers and the budget read (milliseconds since the pool was made).
    epoch: Instant,
    metrics: ServiceMetrics,
    label: ServiceLabel,
}

impl std::fmt::Debug for ServicePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePool")
            .field("kind", &self.kind)
            .field("name", &self.cfg.name)
            .finish()
    }
}

impl ServicePool {
    /// The pool of service `cfg` (`kind`: `bot` or `module`); with a `health_path`, its
    /// health checks run on the current tokio runtime until the pool is dropped.
    pub fn new(
        kind: &'static str,
        cfg: &ServiceConfig,
        metrics: ServiceMetrics,
    ) -> Result<Arc<ServicePool>, String> {
        let urls = cfg
            .urls
            .iter()
            .map(|u| u.parse().map_err(|e| format!("{kind} {}: {u:?}: {e}", cfg.name)))
            .collect::<Result<Vec<hyper::Uri>, String>>()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(cfg.instance_concurrency_max)
            .build(connector);
        let pool = Pool::new(
            urls.len(),
            cfg.instance_concurrency_max,
            cfg.breaker_failures,
            cfg.breaker_open_ms,
            cfg.health_failures,
        );
        let label = ServiceLabel { kind: kind.into(), service: cfg.name.clone() };
        let me = Arc::new(ServicePool {
            kind,
            cfg: cfg.clone(),
            client,
            urls,
            pool: Mutex::new(pool),
            budget: Mutex::new(RetryBudget::new(
                cfg.retry_budget_percent,
                cfg.retry_budget_min_per_s,
            )),
            permits: tokio::sync::Semaphore::new(cfg.concurrency_max),
            epoch: Instant::now(),
            metrics,
            label,
        });
        if !cfg.health_path.is_empty() {
            let health = me.health_urls()?;
            tokio::spawn(check_health(Arc::downgrade(&me), health));
        }
        Ok(me)
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.cfg
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn count(&self, outcome: &str) {
        let label = CallLabel {
            kind: self.kind.into(),
            service: self.cfg.name.clone(),
            outcome: outcome.into(),
        };
        self.metrics.calls.get_or_create(&label).inc();
    }

    /// Each instance's URL with its path replaced by `health_path`.
    fn health_urls(&self) -> Result<Vec<hyper::Uri>, String> {
        self.urls
            .iter()
            .map(|u| {
                let authority = u.authority().map(|a| a.as_str()).unwrap_or_default();
                format!("http://{authority}{}", self.cfg.health_path)
                    .parse()
                    .map_err(|e| format!("{} {}: health check URL: {e}", self.kind, self.cfg.name))
            })
            .collect()
    }

    /// An instance for the next attempt (not `avoid` where there is another), taken in
    /// the pool; `None` if none takes calls now.
    fn choose(&self, avoid: Option<usize>) -> Option<usize> {
        let (a, b) = (rand::random::<u32>() as usize, rand::random::<u32>() as usize);
        let now = self.now_ms();
        self.pool.lock().expect("service pool lock").choose(now, avoid, a, b)
    }

    fn settle(&self, ix: usize, ok: bool) {
        let now = self.now_ms();
        let opened = self.pool.lock().expect("service pool lock").settle(ix, ok, now);
        if opened {
            self.metrics.breaker_opened.get_or_create(&self.label).inc();
            tracing::warn!(kind = self.kind, service = %self.cfg.name, url = %self.urls[ix],
                "service instance failing: its breaker opened (ejected)");
        }
    }

    async fn attempt(&self, ix: usize, body: Bytes) -> Result<Answer, Attempt> {
        let url = &self.urls[ix];
        let label = InstanceLabel {
            kind: self.kind.into(),
            service: self.cfg.name.clone(),
            instance: url.to_string(),
        };
        self.metrics.attempts.get_or_create(&label).inc();
        let request = hyper::Request::post(url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| Attempt::Fail(e.to_string()))?;
        let response = self.client.request(request).await.map_err(|e| {
            self.count("refused");
            Attempt::Retry(format!("calling {url}: {e}"))
        })?;
        let status = response.status();
        let freshness = response
            .headers()
            .get(hyper::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .map_or(Freshness::Unsaid, Freshness::parse);
        let max = self.cfg.answer_bytes_max;
        let body = Limited::new(response.into_body(), max)
            .collect()
            .await
            .map_err(|e| {
                self.count("error");
                Attempt::Fail(format!("reading the answer (at most {max} bytes): {e}"))
            })?
            .to_bytes();
        if !status.is_success() {
            self.count("error");
            let said = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            let why = format!("{url} answered {status}: {said}");
            return Err(if status.is_server_error() {
                Attempt::Retry(why)
            } else {
                Attempt::Fail(why)
            });
        }
        Ok(Answer { body, freshness })
    }

    /// POSTs `body` to an instance; a 2xx answer, or the failure as a `BotError` of the
    /// right kind. The caller counts `ok` once it accepted the answer ([`Self::accepted`]).
    pub async fn post(&self, body: Bytes) -> Result<Answer, BotError> {
        let started = Instant::now();
        let result = self.post_timed(body).await;
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.call_seconds.0.get_or_create(&self.label).observe(seconds);
        result
    }

    async fn post_timed(&self, body: Bytes) -> Result<Answer, BotError> {
        let (kind, name) = (self.kind, &self.cfg.name);
        let Ok(_permit) = self.permits.try_acquire() else {
            self.count("busy");
            return Err(BotError::unavailable(format!(
                "{kind} service {name}: {} calls in flight from this node (concurrency_max)",
                self.cfg.concurrency_max
            )));
        };
        let deadline = Instant::now() + Duration::from_millis(self.cfg.timeout_ms);
        self.budget.lock().expect("retry budget lock").called();
        let mut last: Option<(usize, String)> = None;
        for attempt in 0..self.cfg.attempts_max {
            if attempt > 0 {
                let now = self.now_ms();
                if !self.budget.lock().expect("retry budget lock").retry(now) {
                    self.count("retry_budget");
                    let why = last.map(|(_, w)| w).unwrap_or_default();
                    return Err(BotError::unavailable(format!(
                        "{kind} service {name}: retry budget spent (last: {why})"
                    )));
                }
                self.metrics.retries.get_or_create(&self.label).inc();
            }
            let Some(ix) = self.choose(last.as_ref().map(|(ix, _)| *ix)) else {
                self.count("breaker_open");
                let why = last.map(|(_, why)| format!(" (last: {why})")).unwrap_or_default();
                return Err(BotError::unavailable(format!(
                    "{kind} service {name}: no instance takes calls now: breakers open or instances full{why}"
                )));
            };
            match tokio::time::timeout_at(deadline.into(), self.attempt(ix, body.clone())).await {
                Ok(Ok(answer)) => {
                    self.settle(ix, true);
                    return Ok(answer);
                }
                Ok(Err(Attempt::Retry(why))) => {
                    self.settle(ix, false);
                    last = Some((ix, why));
                }
                Ok(Err(Attempt::Fail(why))) => {
                    // The instance is up (it answered): not a breaker failure.
                    self.settle(ix, true);
                    return Err(BotError::new(format!("{kind} service {name}: {why}")));
                }
                Err(_) => {
                    self.settle(ix, false);
                    self.count("timeout");
                    return Err(BotError::timeout(format!(
                        "{kind} service {name} did not answer within {} ms",
                        self.cfg.timeout_ms
                    )));
                }
            }
        }
        let why = last.map(|(_, w)| w).unwrap_or_default();
        Err(BotError::unavailable(format!("{kind} service {name}: {why}")))
    }

    /// Counts a call whose answer the caller accepted (`ok`) or found malformed (`error`).
    pub fn accepted(&self, ok: bool) {
        self.count(if ok { "ok" } else { "error" });
    }

    async fn check_once(&self, client: &HealthClient, health: &[hyper::Uri]) {
        let timeout = Duration::from_millis(self.cfg.timeout_ms.min(self.cfg.health_interval_ms));
        let checks = health.iter().map(|url| {
            let request = hyper::Request::get(url.clone()).body(Empty::<Bytes>::new());
            async move {
                let Ok(request) = request else { return false };
                matches!(
                    tokio::time::timeout(timeout, client.request(request)).await,
                    Ok(Ok(r)) if r.status().is_success()
                )
            }
        });
        let results = futures::future::join_all(checks).await;
        let mut pool = self.pool.lock().expect("service pool lock");
        for (ix, ok) in results.into_iter().enumerate() {
            if let Some(up) = pool.checked(ix, ok) {
                tracing::warn!(kind = self.kind, service = %self.cfg.name, url = %self.urls[ix],
                    up, "service instance health changed");
            }
        }
        self.metrics.instances_down.get_or_create(&self.label).set(pool.down() as i64);
    }
}

type HealthClient = Client<HttpConnector, Empty<Bytes>>;

/// Checks every instance each `health_interval_ms` while the pool lives, on a client of
/// its own (checks must not wait behind the calls' connections).
async fn check_health(pool: Weak<ServicePool>, health: Vec<hyper::Uri>) {
    let client: HealthClient = Client::builder(TokioExecutor::new()).build_http();
    loop {
        let Some(p) = pool.upgrade() else { return };
        let interval = Duration::from_millis(p.cfg.health_interval_ms);
        p.check_once(&client, &health).await;
        drop(p);
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_is_read_as_rfc_9111_says() {
        assert_eq!(Freshness::parse("max-age=900"), Freshness::MaxAge(Duration::from_secs(900)));
        assert_eq!(
            Freshness::parse("public, Max-Age=\"60\""),
            Freshness::MaxAge(Duration::from_secs(60))
        );
        assert_eq!(Freshness::parse("max-age=0"), Freshness::DoNotStore);
        assert_eq!(Freshness::parse("max-age=60, no-store"), Freshness::DoNotStore);
        assert_eq!(Freshness::parse("no-cache"), Freshness::DoNotStore);
        assert_eq!(Freshness::parse("max-age=soon"), Freshness::DoNotStore);
        assert_eq!(Freshness::parse("public"), Freshness::Unsaid);
    }
}
