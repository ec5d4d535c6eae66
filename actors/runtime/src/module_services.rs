//! Bot modules that run as HTTP services (`[[modules]]`), in any language, each scaled on
//! its own: a bot's `module(name, key, request)` call goes through the module's
//! [`ServicePool`] (balancing, limits, retries, breakers, health checks), fronted by a
//! node-wide cache of its answers with request coalescing.
//!
//! A call POSTs `{"version":1,"module","key","request"}` and takes any JSON answer. The
//! cache is keyed by `key` (equal keys must mean equal answers) and keeps an answer as
//! long as the service's `Cache-Control: max-age` says, or the module's `cache_ttl_ms`
//! when it says nothing; `no-store`, `no-cache` and `max-age=0` answers are not kept (but
//! still answer the calls that waited for them). It is bounded in bytes
//! (`cache_bytes_max`). Failed calls are never cached.
//!
//! Built-in bots reach them through `Backends` (`module`, and the weather and catalog
//! lookups, which use a module service of that name when there is one); service bots
//! through module-call rounds (see `crate::bots::service`). In-process modules placed by
//! node role (`crate::modules`) keep serving the names no module service takes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use botclaw_config::ServiceConfig;
use bytes::Bytes;
use moka::notification::RemovalCause;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::bot::BotError;
use crate::services::{Freshness, ServiceLabel, ServiceMetrics, ServicePool};

/// The payload version of module calls.
pub const MODULE_PAYLOAD_VERSION: u32 = 1;

/// Bytes a cache entry costs beyond its key and answer (moka's bookkeeping, roughly).
const ENTRY_OVERHEAD_BYTES: u32 = 128;

#[derive(Serialize)]
struct ModuleCall<'a> {
    version: u32,
    module: &'a str,
    key: &'a str,
    request: Option<&'a RawValue>,
}

#[derive(Clone)]
struct Cached {
    answer: Arc<str>,
    ttl: Duration,
}

/// Each entry lives as long as its answer said.
struct AsTheAnswerSays;

impl moka::Expiry<String, Cached> for AsTheAnswerSays {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Cached,
        _now: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The cache's counters for one module.
#[derive(Clone)]
struct CacheCounters {
    hits: Counter,
    misses: Counter,
    coalesced: Counter,
}

pub struct ModuleService {
    pool: Arc<ServicePool>,
    cache: Option<moka::future::Cache<String, Cached>>,
    default_ttl: Duration,
    counters: CacheCounters,
}

impl std::fmt::Debug for ModuleService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleService")
            .field("name", &self.pool.name())
            .field("cached", &self.cache.as_ref().map(|c| c.entry_count()))
            .finish()
    }
}

impl ModuleService {
    pub fn new(cfg: &ServiceConfig, metrics: ServiceMetrics) -> Result<ModuleService, String> {
        let label = ServiceLabel { kind: "module".into(), service: cfg.name.clone() };
        let counters = CacheCounters {
            hits: metrics.cache_hits.get_or_create(&label).clone(),
            misses: metrics.cache_misses.get_or_create(&label).clone(),
            coalesced: metrics.cache_coalesced.get_or_create(&label).clone(),
        };
        let evictions = metrics.cache_evictions.get_or_create(&label).clone();
        let cache = (cfg.cache_bytes_max > 0).then(|| {
            moka::future::Cache::builder()
                .max_capacity(cfg.cache_bytes_max)
                .weigher(|key: &String, value: &Cached| {
                    let bytes = key.len().saturating_add(value.answer.len());
                    u32::try_from(bytes).unwrap_or(u32::MAX).saturating_add(ENTRY_OVERHEAD_BYTES)
                })
                .expire_after(AsTheAnswerSays)
                .eviction_listener(move |_key, _value, cause| {
                    if cause == RemovalCause::Size {
                        evictions.inc();
                    }
                })
                .build()
        });
        Ok(ModuleService {
            pool: ServicePool::new("module", cfg, metrics)?,
            cache,
            default_ttl: Duration::from_millis(cfg.cache_ttl_ms),
            counters,
        })
    }

    pub fn name(&self) -> &str {
        self.pool.name()
    }

    /// The answer for `key`: cached, or another caller's call for it awaited, or a call.
    pub async fn call(&self, key: &str, request: Option<&RawValue>) -> Result<Arc<str>, BotError> {
        let Some(cache) = &self.cache else {
            self.counters.misses.inc();
            return self.fetch(key, request).await.map(|c| c.answer);
        };
        if let Some(hit) = cache.get(key).await {
            self.counters.hits.inc();
            return Ok(hit.answer);
        }
        let entry = cache
            .entry_by_ref(key)
            .or_try_insert_with(self.fetch(key, request))
            .await
            .map_err(|e| (*e).clone())?;
        if entry.is_fresh() {
            self.counters.misses.inc();
        } else {
            self.counters.coalesced.inc();
        }
        Ok(entry.into_value().answer)
    }

    async fn fetch(&self, key: &str, request: Option<&RawValue>) -> Result<Cached, BotError> {
        let call =
            ModuleCall { version: MODULE_PAYLOAD_VERSION, module: self.name(), key, request };
        let body = Bytes::from(serde_json::to_vec(&call).expect("a module call encodes"));
        let answer = self.pool.post(body).await?;
        let text = std::str::from_utf8(&answer.body)
            .ok()
            .filter(|t| serde_json::from_str::<&RawValue>(t).is_ok());
        self.pool.accepted(text.is_some());
        let Some(text) = text else {
            return Err(BotError::new(format!(
                "module service {}: the answer is not JSON",
                self.name()
            )));
        };
        let ttl = match answer.freshness {
            Freshness::Unsaid => self.default_ttl,
            Freshness::MaxAge(age) => age,
            Freshness::DoNotStore => Duration::ZERO,
        };
        Ok(Cached { answer: Arc::from(text), ttl })
    }
}

/// The node's module services, by name.
#[derive(Debug, Clone, Default)]
pub struct ModuleServices {
    by_name: Arc<BTreeMap<String, ModuleService>>,
}

impl ModuleServices {
    /// The module services of `cfgs` (health checks, if any, start on the current tokio
    /// runtime).
    pub fn new(cfgs: &[ServiceConfig], metrics: &ServiceMetrics) -> Result<ModuleServices, String> {
        let mut by_name = BTreeMap::new();
        for cfg in cfgs {
            by_name.insert(cfg.name.clone(), ModuleService::new(cfg, metrics.clone())?);
        }
        Ok(ModuleServices { by_name: Arc::new(by_name) })
    }

    pub fn get(&self, name: &str) -> Option<&ModuleService> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}
