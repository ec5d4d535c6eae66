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

impl TurnRecord {
    /// Bytes this turn holds: its strings plus a small fixed cost per field.
    pub fn size_bytes(&self) -> usize {
        record_bytes(&self.id, &self.text, self.user.as_deref(), &self.messages)
    }
}

/// Bytes a turn with these fields holds (see [`TurnRecord::size_bytes`]).
pub fn record_bytes(id: &str, text: &str, user: Option<&str>, messages: &[String]) -> usize {
    const FIELD: usize = 8;
    4 * FIELD
        + id.len()
        + text.len()
        + user.map_or(0, str::len)
        + messages.iter().map(|m| m.len() + FIELD).sum::<usize>()
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

    /// One page of history: the last `limit` kept turns numbered below `before` (all kept
    /// turns when `None`), oldest first, holding at most `bytes_max` bytes of turns (but
    /// always the newest one that qualifies, so paging makes progress). The flag says older
    /// kept turns were left out.
    pub fn history_page(
        &self,
        before: Option<u64>,
        limit: usize,
        bytes_max: usize,
    ) -> (Vec<&Arc<TurnRecord>>, bool) {
        let mut older = self.turns.iter().rev().filter(|t| before.is_none_or(|b| t.turn < b));
        let mut page = Vec::new();
        let mut bytes = 0;
        let more = loop {
            let Some(t) = older.next() else { break false };
            let size = t.size_bytes();
            if page.len() == limit || (!page.is_empty() && bytes + size > bytes_max) {
                break true;
            }
            bytes += size;
            page.push(t);
        };
        page.reverse();
        (page, more)
    }

    /// [`ConversationState::size_bytes`] once `commit` is applied, from `size_now` (this
    /// state's `size_bytes`): the turn's bytes, the bot state's change and the turns that
    /// fall out of the window, without summing every kept turn (an actor keeps its size
    /// this way, turn by turn).
    pub fn size_after(&self, size_now: usize, commit: &TurnCommit, turns_kept_max: usize) -> usize {
        if commit.record.turn != self.turn + 1 {
            return size_now;
        }
        let falling = (self.turns.len() + 1).saturating_sub(turns_kept_max.max(1));
        let dropped: usize = self.turns.iter().take(falling).map(|t| t.size_bytes()).sum();
        let bound = if self.bot.is_empty() { commit.bot.len() } else { 0 };
        let grown = bound + commit.bot_state.len() + commit.record.size_bytes();
        (size_now + grown).saturating_sub(dropped + self.bot_state.len())
    }

    /// Bytes this conversation holds: kept turns, bot state and bot name.
    pub fn size_bytes(&self) -> usize {
        self.bot.len()
            + self.bot_state.len()
            + self.turns.iter().map(|t| t.size_bytes()).sum::<usize>()
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
    fn the_size_kept_turn_by_turn_matches_the_sum() {
        for kept in [1, 3, 8] {
            let mut s = ConversationState::default();
            let mut size = s.size_bytes();
            for k in 0..40usize {
                let text = "x".repeat(k * 7 % 50);
                let c = s.next_commit(
                    "echo",
                    format!("id-{k}"),
                    text,
                    (k % 3 == 0).then(|| "u".repeat(k)),
                    vec!["m".repeat(k % 11); k % 4],
                    vec![7; k * 13 % 90],
                );
                size = s.size_after(size, &c, kept);
                assert!(s.apply(c.clone(), kept));
                assert_eq!(size, s.size_bytes(), "kept {kept}, turn {k}");
                // A repeated commit changes nothing.
                assert_eq!(s.size_after(size, &c, kept), size);
            }
        }
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
    fn history_pages_by_count_and_bytes() {
        let mut s = ConversationState::default();
        for i in 0..10 {
            let c = commit(&s, &format!("m{i}"));
            s.apply(c, 8);
        }
        // Kept: turns 3..=10.
        let turns = |page: &[&Arc<TurnRecord>]| page.iter().map(|t| t.turn).collect::<Vec<_>>();
        let (page, more) = s.history_page(None, 3, usize::MAX);
        assert_eq!((turns(&page), more), (vec![8, 9, 10], true));
        let (page, more) = s.history_page(Some(8), 3, usize::MAX);
        assert_eq!((turns(&page), more), (vec![5, 6, 7], true));
        let (page, more) = s.history_page(Some(5), 3, usize::MAX);
        assert_eq!((turns(&page), more), (vec![3, 4], false));
        let one = s.turns[0].size_bytes();
        let (page, more) = s.history_page(None, 100, 2 * one);
        assert_eq!((turns(&page), more), (vec![9, 10], true), "bounded in bytes");
        let (page, more) = s.history_page(None, 100, 1);
        assert_eq!((turns(&page), more), (vec![10], true), "one turn even over the bound");
        let (page, more) = s.history_page(Some(1), 5, usize::MAX);
        assert_eq!((turns(&page), more), (vec![], false));
        assert!(s.size_bytes() >= 8 * one);
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
