//! Feature flags: cluster-wide, kept in the placement controller's map (so every node applies
//! the same table, in the same order, through Raft) and evaluated per conversation.
//!
//! A flag is on for a conversation when it is enabled, its bot scope (if any) is the
//! conversation's bot, and the conversation's bucket is below the flag's rollout. The bucket
//! is a stable hash of (flag name, conversation id) into `0..10_000`, so a conversation
//! keeps its cohort while the rollout stands, raising the rollout only adds conversations,
//! and two flags at the same rollout pick independent cohorts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3Default;

/// A rollout of every conversation, in basis points (100 bp = 1%).
pub const FULL_BP: u32 = 10_000;
/// Longest flag name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;
/// Most flags in the cluster (each is in every map snapshot and every node's memory).
pub const FLAGS_MAX: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    /// Off overrides the rollout (and keeps it for when the flag is turned on again).
    pub enabled: bool,
    /// Share of conversations the flag is on for, in basis points (`0..=FULL_BP`).
    pub rollout_bp: u32,
    /// Only conversations of this bot; `None`: every bot.
    pub bot: Option<String>,
}

impl Flag {
    /// Whether the flag is on for conversation `conv` of bot `bot`.
    pub fn on_for(&self, name: &str, conv: &str, bot: &str) -> bool {
        self.enabled
            && self.bot.as_deref().is_none_or(|b| b == bot)
            && bucket(name, conv) < self.rollout_bp
    }
}

/// The conversation's bucket for flag `name`, in `0..FULL_BP`.
pub fn bucket(name: &str, conv: &str) -> u32 {
    // Streamed, so a turn's flag checks allocate nothing; the same hash as of the bytes
    // `name \0 conv` in one piece.
    let mut h = Xxh3Default::new();
    h.update(name.as_bytes());
    h.update(&[0]);
    h.update(conv.as_bytes());
    (h.digest() % u64::from(FULL_BP)) as u32
}

/// A flag name: 1 to `NAME_BYTES_MAX` bytes of lowercase ASCII letters, digits, `.`, `_`, `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > NAME_BYTES_MAX || !name.chars().all(ok) {
        return Err(format!(
            "flag name {name:?}: 1 to {NAME_BYTES_MAX} characters of a-z, 0-9, '.', '_', '-'"
        ));
    }
    Ok(())
}

/// Every flag, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flags(BTreeMap<String, Flag>);

impl Flags {
    /// Sets (or with `None` removes) flag `name`; an error, and nothing changed, for a bad
    /// name or rollout, or a new flag past `FLAGS_MAX`.
    pub fn set(&mut self, name: &str, flag: Option<Flag>) -> Result<(), String> {
        check_name(name)?;
        match flag {
            None => {
                self.0.remove(name);
            }
            Some(flag) => {
                if flag.rollout_bp > FULL_BP {
                    return Err(format!("flag {name}: rollout over 100% ({} bp)", flag.rollout_bp));
                }
                if let Some(bot) = &flag.bot {
                    if bot.is_empty() || bot.len() > NAME_BYTES_MAX {
                        return Err(format!(
                            "flag {name}: bot scope of 1 to {NAME_BYTES_MAX} bytes"
                        ));
                    }
                }
                if !self.0.contains_key(name) && self.0.len() >= FLAGS_MAX {
                    return Err(format!("flag {name}: the cluster has {FLAGS_MAX} flags already"));
                }
                self.0.insert(name.to_string(), flag);
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Flag> {
        self.0.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Flag)> {
        self.0.iter().map(|(n, f)| (n.as_str(), f))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The flags on for conversation `conv` of bot `bot`, by name.
    pub fn on_for(&self, conv: &str, bot: &str) -> Vec<&str> {
        self.iter().filter(|(n, f)| f.on_for(n, conv, bot)).map(|(n, _)| n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flag(rollout_bp: u32) -> Flag {
        Flag { enabled: true, rollout_bp, bot: None }
    }

    #[test]
    fn buckets_are_the_hash_of_name_nul_conv() {
        // Cohorts must not move between versions: the streamed hash is the one-shot one.
        for (name, conv) in [("a", "b"), ("shop.instant-refund", "c-17"), ("x", "")] {
            let key = format!("{name}\0{conv}");
            let expected = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % u64::from(FULL_BP);
            assert_eq!(u64::from(bucket(name, conv)), expected);
        }
    }

    #[test]
    fn thirty_percent_lands_thirty_percent_of_conversations() {
        let f = flag(3000);
        let on =
            (0..10_000).filter(|k| f.on_for("returns-label", &format!("c-{k}"), "shop")).count();
        assert!((2900..=3100).contains(&on), "{on} of 10000");
    }

    #[test]
    fn scope_and_switch_decide_before_the_rollout() {
        let mut f = Flag { enabled: true, rollout_bp: FULL_BP, bot: Some("shop".into()) };
        assert!(f.on_for("x", "c", "shop"));
        assert!(!f.on_for("x", "c", "echo"), "another bot's conversation");
        f.enabled = false;
        assert!(!f.on_for("x", "c", "shop"), "off overrides the rollout");
        assert!(!flag(0).on_for("x", "c", "shop"));
    }

    #[test]
    fn bad_names_rollouts_and_too_many_flags_are_refused() {
        let mut flags = Flags::default();
        for bad in ["", "Upper", "a b", &"x".repeat(65)] {
            assert!(flags.set(bad, Some(flag(1))).is_err(), "{bad:?}");
        }
        assert!(flags.set("ok", Some(flag(FULL_BP + 1))).is_err());
        for i in 0..FLAGS_MAX {
            flags.set(&format!("f{i}"), Some(flag(1))).unwrap();
        }
        assert!(flags.set("one-more", Some(flag(1))).is_err());
        flags.set("f0", Some(flag(2))).expect("changing an existing flag is fine");
        flags.set("f0", None).unwrap();
        assert_eq!(flags.len(), FLAGS_MAX - 1);
    }

    proptest! {
        /// Raising a rollout only adds conversations: none leaves its cohort.
        #[test]
        fn raising_a_rollout_keeps_every_conversation_in(
            name in "[a-z]{1,12}",
            convs in proptest::collection::vec("[a-z0-9-]{1,20}", 1..200),
            low in 0u32..=FULL_BP,
            high in 0u32..=FULL_BP,
        ) {
            let (low, high) = (low.min(high), low.max(high));
            for conv in &convs {
                if flag(low).on_for(&name, conv, "b") {
                    prop_assert!(flag(high).on_for(&name, conv, "b"));
                }
                prop_assert_eq!(bucket(&name, conv), bucket(&name, conv));
            }
        }
    }
}
