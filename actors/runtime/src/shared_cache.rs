//! A node-wide cache of backend answers, shared by every conversation on the node, with
//! request coalescing: concurrent misses for one key make one backend call, and the
//! others wait for its answer.
//!
//! Bots look here after their conversation's own cache (which answers repeats within a
//! conversation) and before the backend. Entries expire after a TTL (the weather answers'
//! 15 minutes by default) and the cache is bounded in entries; 0 entries turns it off.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::ConversationMetrics;

#[derive(Clone)]
pub struct SharedCache {
    cache: Option<moka::future::Cache<String, Arc<str>>>,
    metrics: ConversationMetrics,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("entries", &self.cache.as_ref().map(|c| c.entry_count()))
            .finish()
    }
}

impl SharedCache {
    pub fn new(entries_max: u64, ttl: Duration, metrics: ConversationMetrics) -> SharedCache {
        let cache = (entries_max > 0).then(|| {
            moka::future::Cache::builder().max_capacity(entries_max).time_to_live(ttl).build()
        });
        SharedCache { cache, metrics }
    }

    /// The cached answer for `key`, or the answer of `fetch`, which runs only if no one
    /// holds or is already fetching the key. A failed fetch is not cached: its error goes
    /// to every caller that waited for it, and the next caller fetches again.
    pub async fn get_or_fetch<F, E>(&self, key: &str, fetch: F) -> Result<Arc<str>, Arc<E>>
    where
        F: Future<Output = Result<String, E>>,
        E: Send + Sync + 'static,
    {
        let Some(cache) = &self.cache else {
            self.metrics.shared_cache_misses.inc();
            return fetch.await.map(Arc::from).map_err(Arc::new);
        };
        if let Some(hit) = cache.get(key).await {
            self.metrics.shared_cache_hits.inc();
            return Ok(hit);
        }
        let entry = cache
            .entry_by_ref(key)
            .or_try_insert_with(async move { fetch.await.map(Arc::<str>::from) })
            .await?;
        if entry.is_fresh() {
            self.metrics.shared_cache_misses.inc();
        } else {
            // Another caller's fetch answered this one.
            self.metrics.shared_cache_coalesced.inc();
        }
        Ok(entry.into_value())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    async fn slow_fetch(calls: &AtomicU64, value: &str) -> Result<String, String> {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if value == "fail" {
            return Err("backend down".into());
        }
        Ok(value.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_make_one_call_and_later_reads_hit() {
        let metrics = ConversationMetrics::default();
        let cache = SharedCache::new(100, Duration::from_secs(60), metrics.clone());
        let calls = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache.get_or_fetch("weather:oslo", slow_fetch(&calls, "cold")).await.unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(&*t.await.unwrap(), "cold");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one backend call for 50 concurrent misses");
        assert_eq!(metrics.shared_cache_misses.get(), 1);
        assert_eq!(metrics.shared_cache_coalesced.get() + metrics.shared_cache_hits.get(), 49);
        assert_eq!(
            &*cache.get_or_fetch("weather:oslo", slow_fetch(&calls, "x")).await.unwrap(),
            "cold"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Another key is its own call.
        assert_eq!(
            &*cache.get_or_fetch("weather:rome", slow_fetch(&calls, "warm")).await.unwrap(),
            "warm"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn entries_expire_and_zero_entries_turns_it_off() {
        let metrics = ConversationMetrics::default();
        let calls = AtomicU64::new(0);
        let cache = SharedCache::new(100, Duration::from_millis(100), metrics.clone());
        cache.get_or_fetch("k", slow_fetch(&calls, "a")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(&*cache.get_or_fetch("k", slow_fetch(&calls, "b")).await.unwrap(), "b");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "expired entries are fetched again");
        let off = SharedCache::new(0, Duration::from_secs(60), metrics);
        off.get_or_fetch("k", slow_fetch(&calls, "c")).await.unwrap();
        off.get_or_fetch("k", slow_fetch(&calls, "c")).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // A failed fetch is not kept: the next caller tries again.
        let err = cache.get_or_fetch("f", slow_fetch(&calls, "fail")).await.unwrap_err();
        assert_eq!(err.as_str(), "backend down");
        assert_eq!(&*cache.get_or_fetch("f", slow_fetch(&calls, "ok")).await.unwrap(), "ok");
    }
}
