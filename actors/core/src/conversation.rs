//! The state of one conversation and the rules of a turn, without IO.
//!
//! A conversation is bound to a bot on its first message. It keeps the bot's own state
//! (opaque bytes the bot encodes), the last `turns_kept_max` turns (which serve both as
//! history and as the window of processed message ids), and the number of the last turn.
//! A message id seen in the window is a retry: it gets the original reply and does not run
//! the bot again.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnCommit {
    pub bot: String,
    pub bot_state: Vec<u8>,
    pub record: TurnRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConversationState {
    /// The bot this conversation is bound to; empty until the first turn.
    pub bot: String,
    pub bot_state: Vec<u8>,
    /// Oldest first; at most `turns_kept_max`.
    pub turns: VecDeque<TurnRecord>,
    /// Number of the last turn (0 before the first).
    pub turn: u64,
}

impl ConversationState {
    /// The earlier turn with this message id, if it is still in the window.
    pub fn find(&self, id: &str) -> Option<&TurnRecord> {
        self.turns.iter().rev().find(|t| t.id == id)
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
        id: &str,
        text: &str,
        user: Option<&str>,
        messages: Vec<String>,
        bot_state: Vec<u8>,
    ) -> TurnCommit {
        TurnCommit {
            bot: bot.to_string(),
            bot_state,
            record: TurnRecord {
                turn: self.turn + 1,
                id: id.to_string(),
                text: text.to_string(),
                user: user.map(String::from),
                messages,
            },
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
        self.turns.push_back(commit.record);
        while self.turns.len() > turns_kept_max.max(1) {
            self.turns.pop_front();
        }
        true
    }

    /// The last `limit` turns, oldest first.
    pub fn history(&self, limit: usize) -> impl Iterator<Item = &TurnRecord> {
        self.turns.iter().skip(self.turns.len().saturating_sub(limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(state: &ConversationState, id: &str) -> TurnCommit {
        state.next_commit("echo", id, "hi", None, vec![format!("re {id}")], vec![])
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
    fn stale_or_repeated_commits_are_ignored() {
        let mut s = ConversationState::default();
        let c1 = commit(&s, "a");
        assert!(s.apply(c1.clone(), 8));
        assert!(!s.apply(c1, 8));
        let mut skip = commit(&s, "b");
        skip.record.turn = 5;
        assert!(!s.apply(skip, 8));
        assert_eq!(s.turn, 1);
    }
}
