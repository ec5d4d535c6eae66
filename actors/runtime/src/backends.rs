//! In-process backend services the built-in bots call: a product catalog and a weather
//! service. Each call waits the configured latency, standing in for a network hop to a
//! real service, and is counted. [`Backends::shared`] is the node-wide cache bots put in
//! front of them.

use std::sync::Arc;
use std::time::Duration;

use botclaw_config::BackendConfig;

use crate::metrics::ConversationMetrics;
use crate::shared_cache::SharedCache;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub sku: &'static str,
    pub name: &'static str,
    pub price_cents: u32,
    pub stock: u32,
}

const CATALOG: &[Product] = &[
    Product { sku: "KB-01", name: "keyboard", price_cents: 4_999, stock: 12 },
    Product { sku: "MS-02", name: "mouse", price_cents: 1_999, stock: 40 },
    Product { sku: "MN-03", name: "monitor", price_cents: 18_900, stock: 3 },
    Product { sku: "HP-04", name: "headphones", price_cents: 7_450, stock: 0 },
    Product { sku: "LP-05", name: "laptop", price_cents: 119_900, stock: 5 },
    Product { sku: "CB-06", name: "cable", price_cents: 899, stock: 230 },
    Product { sku: "WC-07", name: "webcam", price_cents: 5_900, stock: 8 },
    Product { sku: "DK-08", name: "desk", price_cents: 24_900, stock: 2 },
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forecast {
    pub city: String,
    pub celsius: i32,
    pub condition: &'static str,
}

#[derive(Debug)]
pub struct Backends {
    catalog_latency: Duration,
    weather_latency: Duration,
    metrics: ConversationMetrics,
    /// The node-wide cache of answers, for bots to put in front of these calls.
    shared: SharedCache,
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
        })
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

    /// Products whose name appears in `query`.
    pub async fn catalog_search(&self, query: &str) -> Vec<Product> {
        self.metrics.backend_call("catalog");
        Self::wait(self.catalog_latency).await;
        let query = query.to_lowercase();
        CATALOG.iter().filter(|p| query.contains(p.name)).cloned().collect()
    }

    /// Today's forecast for a city. The simulated service derives it from the city name so
    /// answers are stable.
    pub async fn weather(&self, city: &str) -> Forecast {
        self.metrics.backend_call("weather");
        Self::wait(self.weather_latency).await;
        let h = xxhash_rust::xxh3::xxh3_64(city.to_lowercase().as_bytes());
        const CONDITIONS: [&str; 5] = ["sunny", "cloudy", "rainy", "windy", "snowy"];
        Forecast {
            city: city.to_string(),
            celsius: (h % 40) as i32 - 5,
            condition: CONDITIONS[(h >> 8) as usize % CONDITIONS.len()],
        }
    }
}
