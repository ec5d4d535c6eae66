//! The `Bot` trait: what a user implements to add a bot.
//!
//! A bot handles one turn at a time for one conversation: it gets the message and its own
//! state, and returns the messages to send back; the state it leaves is committed with the
//! turn. A bot that returns an error or panics fails only that turn: the client gets
//! `internal`, the conversation restarts from its last committed state.
//!
//! Most bots implement [`TypedBot`] (state is any serde type, encoded with postcard) and
//! register with [`BotRegistry::add_typed`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mini_moka::sync::Cache;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backends::Backends;
use crate::metrics::ConversationMetrics;
use crate::store::BoxFuture;

/// One incoming message.
#[derive(Debug, Clone, Copy)]
pub struct TurnInput<'a> {
    pub conv: &'a str,
    pub id: &'a str,
    pub text: &'a str,
    pub user: Option<&'a str>,
    /// Number this turn will have.
    pub turn: u64,
    /// The feature flags on for this conversation (see `botclaw_core::flags`), by name.
    pub flags: &'a [&'a str],
}

impl TurnInput<'_> {
    /// Whether feature flag `name` is on for this conversation.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.contains(&name)
    }
}

/// Why a turn's bot failed; nothing of the turn is applied.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BotError {
    pub message: String,
    pub kind: BotFailure,
}

/// How a failed turn is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BotFailure {
    /// `internal`: the bot failed.
    Failed,
    /// `timeout`: a service the bot is did not answer in time (retryable with the same id).
    Timeout,
    /// `unavailable`: a service the bot is cannot be reached or is shedding load
    /// (retryable with the same id).
    Unavailable,
}

impl BotError {
    pub fn new(message: impl Into<String>) -> BotError {
        BotError { message: message.into(), kind: BotFailure::Failed }
    }

    pub fn timeout(message: impl Into<String>) -> BotError {
        BotError { message: message.into(), kind: BotFailure::Timeout }
    }

    pub fn unavailable(message: impl Into<String>) -> BotError {
        BotError { message: message.into(), kind: BotFailure::Unavailable }
    }
}

/// What a bot can use during a turn: backends and the conversation's own cache.
pub struct TurnContext {
    backends: Arc<Backends>,
    metrics: ConversationMetrics,
    cache: Option<Cache<String, String>>,
    cache_entries_max: u64,
    cache_ttl: Duration,
}

impl std::fmt::Debug for TurnContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnContext")
            .field("cached", &self.cache.as_ref().map(|c| c.entry_count()))
            .finish()
    }
}

impl TurnContext {
    pub fn new(
        backends: Arc<Backends>,
        metrics: ConversationMetrics,
        cache_entries_max: u64,
        cache_ttl: Duration,
    ) -> Self {
        TurnContext { backends, metrics, cache: None, cache_entries_max, cache_ttl }
    }

    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// A value from this conversation's cache (bounded in entries, entries expire after
    /// the configured TTL). Allocated on first use, so conversations that never look
    /// anything up pay nothing.
    pub fn cached(&mut self, key: &str) -> Option<String> {
        let hit = self.cache.as_ref().and_then(|c| c.get(&key.to_string()));
        if hit.is_some() {
            self.metrics.cache_hits.inc();
        } else {
            self.metrics.cache_misses.inc();
        }
        hit
    }

    pub fn cache(&mut self, key: &str, value: String) {
        let (max, ttl) = (self.cache_entries_max, self.cache_ttl);
        self.cache
            .get_or_insert_with(|| Cache::builder().max_capacity(max).time_to_live(ttl).build())
            .insert(key.to_string(), value);
    }
}

/// A bot over opaque state bytes. Implement [`TypedBot`] instead unless you need control
/// of the encoding.
pub trait Bot: Send + Sync + 'static {
    fn turn<'a>(
        &'a self,
        cx: &'a mut TurnContext,
        state: &'a mut Vec<u8>,
        input: TurnInput<'a>,
    ) -> BoxFuture<'a, Result<Vec<String>, BotError>>;
}

/// A bot with typed state.
pub trait TypedBot: Send + Sync + 'static {
    type State: Serialize + DeserializeOwned + Default + Send;

    fn turn<'a>(
        &'a self,
        cx: &'a mut TurnContext,
        state: &'a mut Self::State,
        input: TurnInput<'a>,
    ) -> impl Future<Output = Result<Vec<String>, BotError>> + Send + 'a;
}

struct Typed<B>(B);

impl<B: TypedBot> Bot for Typed<B>
where
    B::State: Sync,
{
    fn turn<'a>(
        &'a self,
        cx: &'a mut TurnContext,
        state: &'a mut Vec<u8>,
        input: TurnInput<'a>,
    ) -> BoxFuture<'a, Result<Vec<String>, BotError>> {
        Box::pin(async move {
            let mut typed: B::State = if state.is_empty() {
                B::State::default()
            } else {
                postcard::from_bytes(state)
                    .map_err(|e| BotError::new(format!("stored bot state does not decode: {e}")))?
            };
            let messages = self.0.turn(cx, &mut typed, input).await?;
            *state = postcard::to_allocvec(&typed)
                .map_err(|e| BotError::new(format!("bot state does not encode: {e}")))?;
            Ok(messages)
        })
    }
}

/// The bots a node can run, by name.
#[derive(Clone, Default)]
pub struct BotRegistry {
    bots: BTreeMap<String, Arc<dyn Bot>>,
}

impl std::fmt::Debug for BotRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.bots.keys()).finish()
    }
}

impl BotRegistry {
    pub fn add(&mut self, name: &str, bot: impl Bot) -> &mut Self {
        self.bots.insert(name.to_string(), Arc::new(bot));
        self
    }

    pub fn add_typed<B: TypedBot>(&mut self, name: &str, bot: B) -> &mut Self
    where
        B::State: Sync,
    {
        self.add(name, Typed(bot))
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Bot>> {
        self.bots.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.bots.keys().map(String::as_str)
    }
}
