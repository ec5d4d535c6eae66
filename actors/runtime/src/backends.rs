//! The backend services the built-in bots' modules call: a product catalog and a weather
//! service. Each call waits the configured latency, standing in for a network hop to a
//! real service, and is counted. [`Backends::shared`] is the node-wide cache bots put in
//! front of them.
//!
//! Bots call [`Backends::catalog_search`] and [`Backends::weather`]; where the work runs is
//! the node's business: with a [`ModuleRouter`] installed (a cluster node), each call goes
//! to a node with the module's role (see `crate::modules`); without one, it runs here.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use botclaw_config::BackendConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::bot::BotError;
use crate::metrics::ConversationMetrics;
use crate::module_services::{ModuleService, ModuleServices};
use crate::modules::{ModuleAnswer, ModuleRequest, ModuleRouter};
use crate::shared_cache::SharedCache;

/// The module service names the built-in bots' lookups use when one is declared
/// (`[[modules]] name = "weather"`): `{"city"}` answered by a [`Forecast`], `{"query"}`
/// by `{"products": [Product]}`.
pub const WEATHER_MODULE: &str = "weather";
pub const CATALOG_MODULE: &str = "catalog";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub price_cents: u32,
    pub stock: u32,
}

/// (sku, name, price in cents, stock)
const CATALOG: &[(&str, &str, u32, u32)] = &[
    ("KB-01", "keyboard", 4_999, 12),
    ("MS-02", "mouse", 1_999, 40),
    ("MN-03", "monitor", 18_900, 3),
    ("HP-04", "headphones", 7_450, 0),
    ("LP-05", "laptop", 119_900, 5),
    ("CB-06", "cable", 899, 230),
    ("WC-07", "webcam", 5_900, 8),
    ("DK-08", "desk", 24_900, 2),
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forecast {
    pub city: String,
    pub celsius: i32,
    pub condition: String,
}

pub struct Backends {
    catalog_latency: Duration,
    weather_latency: Duration,
    metrics: ConversationMetrics,
    /// The node-wide cache of answers, for bots to put in front of these calls.
    shared: SharedCache,
    /// Where module calls run (set once by a cluster node); here if unset.
    router: OnceLock<Arc<dyn ModuleRouter>>,
    /// Modules that run as HTTP services (set once by the node): a name here is served by
    /// its service, not in process.
    services: OnceLock<ModuleServices>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends").field("routed", &self.router.get().is_some()).finish()
    }
}

impl Backends {
    pub fn new(cfg: &BackendConfig, metrics: ConversationMetrics) -> Arc<Self> {
        let shared = SharedCache::new(
            cfg.shared_cache_entries_max,
            Duration::from_millis(cfg.shared_cache_ttl_ms),
            metrics.clone(),
        );
        Arc::new(Backends {
            catalog_latency: Duration::from_millis(cfg.catalog_latency_ms),
            weather_latency: Duration::from_millis(cfg.weather_latency_ms),
            metrics,
            shared,
            router: OnceLock::new(),
            services: OnceLock::new(),
        })
    }

    /// Sends module calls through `router` from now on (once; later calls are ignored).
    pub fn route_through(&self, router: Arc<dyn ModuleRouter>) {
        let _ = self.router.set(router);
    }

    /// Serves module calls by the module services of `services` from now on (once; later
    /// calls are ignored).
    pub fn use_services(&self, services: ModuleServices) {
        let _ = self.services.set(services);
    }

    fn service(&self, name: &str) -> Option<&ModuleService> {
        self.services.get().and_then(|s| s.get(name))
    }

    /// Whether module `name` is a service (with its own node-wide cache, which honours
    /// the service's freshness: bots should not cache its answers longer).
    pub fn is_service(&self, name: &str) -> bool {
        self.service(name).is_some()
    }

    /// A module service's answer (JSON text) for `key`; `request` is sent along (equal
    /// keys must mean equal answers: the key is what the cache keeps).
    pub async fn module(
        &self,
        name: &str,
        key: &str,
        request: Option<&RawValue>,
    ) -> Result<Arc<str>, BotError> {
        match self.service(name) {
            Some(service) => service.call(key, request).await,
            None => {
                let known: Vec<&str> =
                    self.services.get().map(|s| s.names().collect()).unwrap_or_default();
                Err(BotError::new(format!("no module service {name:?} (there are: {known:?})")))
            }
        }
    }

    /// A module service's answer to a typed request, parsed.
    async fn module_typed<Req: Serialize, Ans: DeserializeOwned>(
        &self,
        service: &ModuleService,
        key: &str,
        request: &Req,
    ) -> Result<Ans, BotError> {
        let raw = serde_json::value::to_raw_value(request).expect("a module request encodes");
        let text = service.call(key, Some(&raw)).await?;
        serde_json::from_str(&text).map_err(|e| {
            BotError::new(format!("module service {}: unexpected answer: {e}", service.name()))
        })
    }

    async fn call(&self, request: ModuleRequest) -> Result<ModuleAnswer, BotError> {
        match self.router.get() {
            Some(router) => router.call(request).await.map_err(BotError::new),
            None => Ok(self.serve(request).await),
        }
    }

    /// Runs a module request here (on a node with its role).
    pub async fn serve(&self, request: ModuleRequest) -> ModuleAnswer {
        match request {
            ModuleRequest::CatalogSearch { query } => {
                ModuleAnswer::Products(self.search_here(&query).await)
            }
            ModuleRequest::Weather { city } => {
                ModuleAnswer::Forecast(self.weather_here(&city).await)
            }
        }
    }

    /// The node-wide cache of backend answers.
    pub fn shared(&self) -> &SharedCache {
        &self.shared
    }

    async fn wait(latency: Duration) {
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }

    /// Products whose name appears in `query`, from a node with the `catalog` role.
    pub async fn catalog_search(&self, query: &str) -> Result<Vec<Product>, BotError> {
        if let Some(service) = self.service(CATALOG_MODULE) {
            #[derive(Deserialize)]
            struct Found {
                products: Vec<Product>,
            }
            let key = query.to_lowercase();
            let request = serde_json::json!({ "query": query });
            let found: Found = self.module_typed(service, &key, &request).await?;
            return Ok(found.products);
        }
        match self.call(ModuleRequest::CatalogSearch { query: query.to_string() }).await? {
            ModuleAnswer::Products(products) => Ok(products),
            other => Err(BotError::new(format!("catalog answered {other:?}"))),
        }
    }

    /// Today's forecast for a city, from a node with the `weather` role.
    pub async fn weather(&self, city: &str) -> Result<Forecast, BotError> {
        if let Some(service) = self.service(WEATHER_MODULE) {
            let request = serde_json::json!({ "city": city });
            return self.module_typed(service, &city.to_lowercase(), &request).await;
        }
        match self.call(ModuleRequest::Weather { city: city.to_string() }).await? {
            ModuleAnswer::Forecast(forecast) => Ok(forecast),
            other => Err(BotError::new(format!("weather answered {other:?}"))),
        }
    }

    async fn search_here(&self, query: &str) -> Vec<Product> {
        self.metrics.backend_call("catalog");
        Self::wait(self.catalog_latency).await;
        let query = query.to_lowercase();
        CATALOG
            .iter()
            .filter(|(_, name, _, _)| query.contains(name))
            .map(|&(sku, name, price_cents, stock)| Product {
                sku: sku.into(),
                name: name.into(),
                price_cents,
                stock,
            })
            .collect()
    }

    /// The simulated service derives the forecast from the city name so answers are
    /// stable.
    async fn weather_here(&self, city: &str) -> Forecast {
        self.metrics.backend_call("weather");
        Self::wait(self.weather_latency).await;
        let h = xxhash_rust::xxh3::xxh3_64(city.to_lowercase().as_bytes());
        const CONDITIONS: [&str; 5] = ["sunny", "cloudy", "rainy", "windy", "snowy"];
        Forecast {
            city: city.to_string(),
            celsius: (h % 40) as i32 - 5,
            condition: CONDITIONS[(h >> 8) as usize % CONDITIONS.len()].to_string(),
        }
    }
}
