//! The state of one conversation and the rules of a turn, without IO.
//!
//! A conversation is bound to a bot on its first message. It keeps the bot's own state
//! (opaque bytes the bot encodes), the last `turns_kept_max` turns (which serve both as
//! history and as the window of processed message ids), and the number of the last turn.
//! A message id seen in the window is a retry: it gets the original reply and does not run
//! the bot again.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// One processed turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnRecord {
    /// 1 for the first turn of a conversation, then +1 per turn.
    pub turn: u64,
    /// The client's message id.
    pub id: String,
    pub text: String,
    pub user: Option<String>,
    /// What the bot answered.
    pub messages: Vec<String>,
}

/// What a turn commits: everything needed to move a stored conversation one turn forward.
/// The record is shared (not copied) between the actor's state and the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnCommit {
    pub bot: String,
    pub bot_state: Vec<u8>,
    pub record: Arc<TurnRecord>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConversationState {
    /// The bot this conversation is bound to; empty until the first turn.
    pub bot: String,
    pub bot_state: Vec<u8>,
    /// Oldest first; at most `turns_kept_max`.
    pub turns: VecDeque<Arc<TurnRecord>>,
    /// Number of the last turn (0 before the first).
    pub turn: u64,
    /// Hashes of the ids in `turns`, in the same order: a compact index so that checking a
    /// new id against the window does not walk every record. Derived, never stored; when
    /// it is out of step (just decoded), lookups fall back to comparing ids.
    #[serde(skip)]
    id_hashes: VecDeque<u64>,
}

impl PartialEq for ConversationState {
    fn eq(&self, other: &Self) -> bool {
        (&self.bot, &self.bot_state, &self.turns, self.turn)
            == (&other.bot, &other.bot_state, &other.turns, other.turn)
    }
}

impl Eq for ConversationState {}

impl ConversationState {
    /// Rebuilds the id index (after decoding a stored state).
    pub fn reindex(&mut self) {
        self.id_hashes = self.turns.iter().map(|t| xxh3_64(t.id.as_bytes())).collect();
    }

    /// The earlier turn with this message id, if it is still in the window.
    pub fn find(&self, id: &str) -> Option<&Arc<TurnRecord>> {
        if self.id_hashes.len() != self.turns.len() {
            return self.turns.iter().rev().find(|t| same_id(&t.id, id));
        }
        let h = xxh3_64(id.as_bytes());
        (0..self.turns.len())
            .rev()
            .filter(|&i| self.id_hashes[i] == h)
            .map(|i| &self.turns[i])
            .find(|t| same_id(&t.id, id))
    }

    /// The bot a new turn runs: the bound one, else the requested one, else the default.
    pub fn bot_for<'a>(&'a self, requested: Option<&'a str>, default: &'a str) -> &'a str {
        if !self.bot.is_empty() {
            &self.bot
        } else {
            requested.unwrap_or(default)
        }
    }

    /// Builds the commit of a new turn (the state itself is not changed).
    pub fn next_commit(
        &self,
        bot: &str,
        id: String,
        text: String,
        user: Option<String>,
        messages: Vec<String>,
        bot_state: Vec<u8>,
    ) -> TurnCommit {
        TurnCommit {
            bot: bot.to_string(),
            bot_state,
            record: Arc::new(TurnRecord { turn: self.turn + 1, id, text, user, messages }),
        }
    }

    /// Applies a commit. Commits must come in turn order; an older or repeated commit is
    /// ignored (returns false), so applying is idempotent.
    pub fn apply(&mut self, commit: TurnCommit, turns_kept_max: usize) -> bool {
        if commit.record.turn != self.turn + 1 {
            return false;
        }
        if self.bot.is_empty() {
            self.bot = commit.bot;
        }
        self.bot_state = commit.bot_state;
        self.turn = commit.record.turn;
        let indexed = self.id_hashes.len() == self.turns.len();
        if indexed {
            self.id_hashes.push_back(xxh3_64(commit.record.id.as_bytes()));
        }
        self.turns.push_back(commit.record);
        while self.turns.len() > turns_kept_max.max(1) {
            self.turns.pop_front();
            if indexed {
                self.id_hashes.pop_front();
            }
        }
        true
    }

    /// The last `limit` turns, oldest first.
    pub fn history(&self, limit: usize) -> impl Iterator<Item = &Arc<TurnRecord>> {
        self.turns.iter().skip(self.turns.len().saturating_sub(limit))
    }
}

/// String equality that looks at the last byte first: client ids are usually counters or
/// carry their distinguishing part at the end, and every new turn is compared with the
/// whole window.
fn same_id(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    // Length and last byte inline; only then the (out-of-line) full comparison.
    a.len() == b.len() && a.last() == b.last() && a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(state: &ConversationState, id: &str) -> TurnCommit {
        state.next_commit("echo", id.into(), "hi".into(), None, vec![format!("re {id}")], vec![])
    }

    #[test]
    fn turns_number_from_one_and_bind_the_bot() {
        let mut s = ConversationState::default();
        assert_eq!(s.bot_for(Some("shop"), "echo"), "shop");
        let mut c = commit(&s, "a");
        c.bot = "shop".into();
        assert!(s.apply(c, 4));
        assert_eq!(s.turn, 1);
        assert_eq!(s.bot, "shop");
        assert_eq!(s.bot_for(Some("weather"), "echo"), "shop", "a bound bot never changes");
    }

    #[test]
    fn window_finds_retries_and_is_bounded() {
        let mut s = ConversationState::default();
        for i in 0..10 {
            let c = commit(&s, &format!("m{i}"));
            assert!(s.apply(c, 4));
        }
        assert_eq!(s.turn, 10);
        assert_eq!(s.turns.len(), 4);
        assert_eq!(s.find("m9").unwrap().messages, vec!["re m9"]);
        assert!(s.find("m5").is_none(), "fell out of the window");
        let ids: Vec<&str> = s.history(2).map(|t| t.id.as_str()).collect();
        assert_eq!(ids, vec!["m8", "m9"]);
    }

    #[test]
    fn index_survives_encoding_and_window_eviction() {
        let mut s = ConversationState::default();
        for i in 0..10 {
            let c = commit(&s, &format!("m{i}"));
            s.apply(c, 4);
        }
        let mut decoded: ConversationState =
            postcard::from_bytes(&postcard::to_allocvec(&s).unwrap()).unwrap();
        assert_eq!(decoded, s);
        // Out of step after decoding: still correct, by comparing ids.
        assert_eq!(decoded.find("m8").unwrap().turn, 9);
        decoded.reindex();
        assert_eq!(decoded.find("m8").unwrap().turn, 9);
        assert!(decoded.find("m1").is_none());
        let c = commit(&decoded, "m10");
        decoded.apply(c, 4);
        assert!(decoded.find("m6").is_none());
        assert_eq!(decoded.find("m10").unwrap().turn, 11);
    }

    #[test]
    fn same_id_is_string_equality() {
        for (a, b) in [
            ("", ""),
            ("a", "a"),
            ("m-1", "m-2"),
            ("0123456789abc", "0123456789abc"),
            ("x0123456789", "y0123456789"),
            ("ab", "abc"),
        ] {
            assert_eq!(same_id(a, b), a == b, "{a:?} {b:?}");
        }
    }

    #[test]
    fn stale_or_repeated_commits_are_ignored() {
        let mut s = ConversationState::default();
        let c1 = commit(&s, "a");
        assert!(s.apply(c1.clone(), 8));
        assert!(!s.apply(c1, 8));
        let mut skip = commit(&s, "b");
        Arc::make_mut(&mut skip.record).turn = 5;
        assert!(!s.apply(skip, 8));
        assert_eq!(s.turn, 1);
    }
}
