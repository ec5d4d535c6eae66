//! Counters of the conversation layer; the node registers them on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BotLabel {
    pub bot: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Buckets of the latency histograms below: 100 us to about 6.5 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 17))
}

/// A latency histogram (seconds) with [`latency_histogram`]'s buckets.
#[derive(Debug, Clone)]
pub struct Latency(pub Histogram);

impl Default for Latency {
    fn default() -> Self {
        Latency(latency_histogram())
    }
}

/// Latency histograms (seconds) by label, with [`latency_histogram`]'s buckets.
#[derive(Debug, Clone)]
pub struct LatencyBy<L>(pub Family<L, Histogram, fn() -> Histogram>);

impl<L: Clone + std::hash::Hash + Eq> Default for LatencyBy<L> {
    fn default() -> Self {
        LatencyBy(Family::new_with_constructor(latency_histogram))
    }
}

#[derive(Debug, Default, Clone)]
pub struct ConversationMetrics {
    /// Turns run by a bot on this node (retries answered from the window excluded).
    pub turns: Counter,
    /// Retried message ids answered with the original reply.
    pub duplicates: Counter,
    pub active: Gauge,
    /// Estimated bytes of the active conversations (state plus per-actor cost).
    pub active_bytes: Gauge,
    pub activations: Counter,
    /// New conversations refused because `active_max` or `active_bytes_max` was reached.
    pub activations_refused: Counter,
    /// Turns refused because they, or the bot state they left, were over the byte limits.
    pub turns_too_large: Counter,
    pub passivations: Counter,
    /// Conversation actors restarted after a failure (bot panics and actor crashes).
    pub restarts: Counter,
    pub bot_errors: Counter,
    /// Time a bot took for a turn (a service bot: its calls and module rounds), by bot.
    pub bot_turn_seconds: LatencyBy<BotLabel>,
    /// Time from submitting a turn to its replication (every in-sync copy, or the write
    /// quorum, holds it).
    pub replication_seconds: Latency,
    /// Calls to bot and module services, and the module cache.
    pub services: crate::services::ServiceMetrics,
    pub backend_calls: Family<BackendLabel, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    /// Turns committed by the durable store, and the write transactions (fsyncs) they took.
    pub store_commits: Counter,
    pub store_groups: Counter,
    /// Group commits that failed (a full disk, an I/O error; nothing of them was acknowledged).
    pub store_commit_failures: Counter,
    /// Seconds the store writer spent applying groups, and committing them (fsync).
    pub store_apply_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    pub store_sync_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Node-wide cache of backend answers: hits, misses (a backend call), and misses that
    /// waited for another caller's call instead of making their own.
    pub shared_cache_hits: Counter,
    pub shared_cache_misses: Counter,
    pub shared_cache_coalesced: Counter,
    /// Conversations this node could not take ownership of (no quorum, fenced out).
    pub acquire_failures: Counter,
    /// Turns that did not reach the write quorum (the conversation closed).
    pub replication_failures: Counter,
    /// Ops of peers applied to this node's copies (fences, writes, installs).
    pub replica_ops: Counter,
    /// Ops of peers refused because a newer epoch was promised.
    pub replica_stale: Counter,
    /// What the shard driver dropped of its peers' messages, by reason: `undecodable`,
    /// `unknown-sender` (a member this node's map does not have yet), `not-a-member` (this
    /// node is not in its own map yet), `parked-full` (a learner's parked write made room
    /// for a newer one). The sender retries after its patience.
    pub shard_messages_dropped: Family<ReasonLabel, Counter>,
}

impl ConversationMetrics {
    /// Counts a shard message dropped for `reason` (see `shard_messages_dropped`).
    pub fn shard_dropped(&self, reason: &str, n: u64) {
        self.shard_messages_dropped.get_or_create(&ReasonLabel { reason: reason.into() }).inc_by(n);
    }
}

impl ConversationMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("turns", "Turns run by a bot on this node", self.turns.clone());
        r.register(
            "turn_duplicates",
            "Retried message ids answered from the window",
            self.duplicates.clone(),
        );
        r.register(
            "active_conversations",
            "Conversation actors alive on this node",
            self.active.clone(),
        );
        r.register(
            "active_conversations_bytes",
            "Estimated bytes held by the active conversations (the memory budget's measure)",
            self.active_bytes.clone(),
        );
        r.register("activations", "Conversation actors started", self.activations.clone());
        r.register(
            "activations_refused",
            "New conversations refused: active_max or active_bytes_max reached",
            self.activations_refused.clone(),
        );
        r.register(
            "turns_too_large",
            "Turns refused as over turn_bytes_max or bot_state_bytes_max",
            self.turns_too_large.clone(),
        );
        r.register(
            "passivations",
            "Idle conversation actors stopped (state kept)",
            self.passivations.clone(),
        );
        r.register(
            "conversation_restarts",
            "Conversations restarted from committed state after a failure",
            self.restarts.clone(),
        );
        r.register(
            "bot_errors",
            "Turns whose bot returned an error or panicked",
            self.bot_errors.clone(),
        );
        r.register("backend_calls", "Calls to backend services", self.backend_calls.clone());
        r.register(
            "bot_turn_seconds",
            "Time a bot took for a turn, by bot",
            self.bot_turn_seconds.0.clone(),
        );
        r.register(
            "replication_seconds",
            "Time from submitting a turn to its replication",
            self.replication_seconds.0.clone(),
        );
        r.register(
            "service_call_seconds",
            "Time of calls to bot and module services (with their retries), by kind and service",
            self.services.call_seconds.0.clone(),
        );
        let sv = &self.services;
        r.register(
            "service_calls",
            "Calls to bot and module services (with their retries), by kind, service and outcome (ok, error, refused, timeout, breaker_open, retry_budget, busy)",
            sv.calls.clone(),
        );
        r.register(
            "service_attempts",
            "Attempts of calls to bot and module services, by instance",
            sv.attempts.clone(),
        );
        r.register("service_retries", "Retries of calls to services", sv.retries.clone());
        r.register(
            "service_breakers_opened",
            "Times a service instance's circuit breaker opened (the instance ejected)",
            sv.breaker_opened.clone(),
        );
        r.register(
            "service_instances_down",
            "Service instances out of the balancing by active health checks",
            sv.instances_down.clone(),
        );
        r.register(
            "module_cache_hits",
            "Module calls answered by the node-wide module cache",
            sv.cache_hits.clone(),
        );
        r.register(
            "module_cache_misses",
            "Module calls that called the module service",
            sv.cache_misses.clone(),
        );
        r.register(
            "module_cache_coalesced",
            "Module calls answered by another caller's call for the same key",
            sv.cache_coalesced.clone(),
        );
        r.register(
            "module_cache_evictions",
            "Module answers evicted from the cache for room",
            sv.cache_evictions.clone(),
        );
        r.register(
            "conversation_cache_hits",
            "Lookups answered by a conversation's own cache",
            self.cache_hits.clone(),
        );
        r.register(
            "conversation_cache_misses",
            "Lookups that went to a backend",
            self.cache_misses.clone(),
        );
        r.register(
            "store_commits",
            "Turns committed by the durable store",
            self.store_commits.clone(),
        );
        r.register(
            "store_groups",
            "Write transactions (one fsync each) of the durable store",
            self.store_groups.clone(),
        );
        r.register(
            "shard_messages_dropped",
            "Peers' shard replication messages dropped, by reason (the sender retries)",
            self.shard_messages_dropped.clone(),
        );
        r.register(
            "store_commit_failures",
            "Group commits of the durable store that failed (none of their ops acknowledged)",
            self.store_commit_failures.clone(),
        );
        r.register(
            "store_apply_seconds",
            "Time the store writer spent applying turns to its tables",
            self.store_apply_seconds.clone(),
        );
        r.register(
            "store_sync_seconds",
            "Time the store writer spent committing write transactions (fsync)",
            self.store_sync_seconds.clone(),
        );
        r.register(
            "shared_cache_hits",
            "Backend lookups answered by the node-wide cache",
            self.shared_cache_hits.clone(),
        );
        r.register(
            "shared_cache_misses",
            "Backend lookups the node-wide cache sent to the backend",
            self.shared_cache_misses.clone(),
        );
        r.register(
            "shared_cache_coalesced",
            "Backend lookups that waited for a concurrent caller's backend call",
            self.shared_cache_coalesced.clone(),
        );
        r.register(
            "acquire_failures",
            "Conversations this node could not take ownership of",
            self.acquire_failures.clone(),
        );
        r.register(
            "replication_failures",
            "Turns that did not reach the write quorum",
            self.replication_failures.clone(),
        );
        r.register(
            "replica_ops",
            "Peers' ops applied to this node's copies",
            self.replica_ops.clone(),
        );
        r.register(
            "replica_stale",
            "Peers' ops refused because a newer epoch was promised",
            self.replica_stale.clone(),
        );
    }

    pub fn backend_call(&self, backend: &str) {
        self.backend_calls.get_or_create(&BackendLabel { backend: backend.to_string() }).inc();
    }
}
