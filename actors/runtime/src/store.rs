//! Where conversation state lives between turns and across passivation.
//!
//! A turn is acknowledged only after its commit returned. [`MemoryStore`] keeps state in
//! memory (tests, `--ephemeral` nodes); [`redb::RedbStore`] keeps it in a crash-safe file
//! under the data directory with group commit.

use std::future::Future;
use std::pin::Pin;

use botclaw_core::conversation::{ConversationState, TurnCommit};
use dashmap::DashMap;
use xxhash_rust::xxh3::Xxh3Builder;

pub mod redb;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

/// Resolves when a submitted commit is durable (or failed).
pub type CommitTicket = BoxFuture<'static, Result<(), StoreError>>;

pub trait StateStore: Send + Sync + 'static {
    /// The committed state of a conversation, if it ever had a turn.
    fn load<'a>(
        &'a self,
        conv: &'a str,
    ) -> BoxFuture<'a, Result<Option<ConversationState>, StoreError>>;

    /// Queues one turn for commit and returns once it is queued (commits of one
    /// conversation are applied in the order they were submitted); the ticket resolves when
    /// the turn is as durable as the store makes it. Submitting the next turn of a
    /// conversation before the previous ticket resolved is allowed: that is how a
    /// conversation keeps working while its last turn is being made durable.
    fn submit<'a>(
        &'a self,
        conv: &'a str,
        commit: TurnCommit,
    ) -> BoxFuture<'a, Result<CommitTicket, StoreError>>;

    /// Submits and waits for durability.
    fn commit<'a>(
        &'a self,
        conv: &'a str,
        commit: TurnCommit,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.submit(conv, commit).await?.await })
    }
}

/// Keeps every conversation in memory: for tests and `--ephemeral` nodes.
#[derive(Debug)]
pub struct MemoryStore {
    conversations: DashMap<String, ConversationState, Xxh3Builder>,
    turns_kept_max: usize,
}

impl MemoryStore {
    pub fn new(turns_kept_max: usize) -> Self {
        let hasher = Xxh3Builder::new().with_seed(crate::host::random_seed());
        MemoryStore { conversations: DashMap::with_hasher(hasher), turns_kept_max }
    }
}

impl MemoryStore {
    fn apply(&self, conv: &str, commit: TurnCommit) -> Result<(), StoreError> {
        let mut state = match self.conversations.get_mut(conv) {
            Some(state) => state,
            None => self.conversations.entry(conv.to_string()).or_default(),
        };
        let expected = state.turn + 1;
        let turn = commit.record.turn;
        if state.apply(commit, self.turns_kept_max) {
            Ok(())
        } else {
            Err(StoreError(format!("commit of turn {turn} out of order (expected {expected})")))
        }
    }
}

impl StateStore for MemoryStore {
    fn load<'a>(
        &'a self,
        conv: &'a str,
    ) -> BoxFuture<'a, Result<Option<ConversationState>, StoreError>> {
        Box::pin(async move { Ok(self.conversations.get(conv).map(|s| s.clone())) })
    }

    fn submit<'a>(
        &'a self,
        conv: &'a str,
        commit: TurnCommit,
    ) -> BoxFuture<'a, Result<CommitTicket, StoreError>> {
        Box::pin(async move {
            let ticket: CommitTicket = Box::pin(std::future::ready(self.apply(conv, commit)));
            Ok(ticket)
        })
    }
}
