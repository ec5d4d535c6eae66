//! The rules of replicated conversation state, without IO: epochs, versions, what a replica
//! accepts, how a new owner picks the state it continues from, and the keep-majority rule.
//!
//! Every stored conversation carries the version of its data (the epoch of the owner that
//! wrote its last turn, and that turn) and a promise: the highest epoch it has been fenced
//! with. An owner starts by fencing the conversation on its preference list with an epoch
//! higher than any it has seen ([`Replica::fence`]); from then on a replica refuses writes
//! of any older epoch, so an owner that was frozen and resumed, or that lost its shard,
//! cannot overwrite what the new owner wrote. The new owner continues from the newest
//! version among the replicas that answered ([`newest`]) and copies it to those that lag.
//!
//! Versions order by (epoch, turn): a turn written under a newer epoch beats any turn of an
//! older one, which is what makes a stale owner's unacknowledged write lose.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

/// An ownership epoch: a term that every new owner raises, tie-broken by the owner's name
/// hash so two nodes never propose the same epoch.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch {
    pub term: u64,
    pub node: u64,
}

impl Epoch {
    pub const ZERO: Epoch = Epoch { term: 0, node: 0 };

    /// The epoch a node named `node` proposes after having seen `highest`.
    pub fn after(highest: Epoch, node: &str) -> Epoch {
        Epoch { term: highest.term + 1, node: xxh3_64(node.as_bytes()) }
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:04x}", self.term, self.node & 0xffff)
    }
}

/// The version of a conversation's stored data: who wrote its last turn, and which turn.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Version {
    pub epoch: Epoch,
    pub turn: u64,
}

/// What a replica keeps beside a conversation's data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub version: Version,
    pub promised: Epoch,
}

/// What a replica (the owner's own store included) is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Promise to refuse writes older than `epoch`.
    Fence { epoch: Epoch },
    /// Append turn `base.turn + 1`, written under `epoch`, to data at version `base`.
    Write { epoch: Epoch, base: Version },
    /// Replace the data with a copy at `version`, sent by the owner of `epoch`.
    Install { epoch: Epoch, version: Version },
}

/// A replica's decision on an [`Op`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Do it; afterwards the replica is at `to`.
    Apply { to: Replica },
    /// Nothing to do: the replica already holds it (a repeated write or install).
    Have,
    /// Refused: the replica promised a newer epoch.
    Stale { promised: Epoch },
    /// Refused: the write does not follow the stored data; the owner must install a copy.
    Behind { version: Version },
}

impl Replica {
    pub fn decide(&self, op: Op) -> Decision {
        match op {
            Op::Fence { epoch } => {
                if epoch > self.promised {
                    Decision::Apply { to: Replica { version: self.version, promised: epoch } }
                } else {
                    Decision::Stale { promised: self.promised }
                }
            }
            Op::Write { epoch, base } => {
                let version = Version { epoch, turn: base.turn + 1 };
                if epoch < self.promised {
                    Decision::Stale { promised: self.promised }
                } else if self.version >= version && self.version.epoch == epoch {
                    Decision::Have
                } else if self.version == base {
                    Decision::Apply { to: Replica { version, promised: epoch } }
                } else {
                    Decision::Behind { version: self.version }
                }
            }
            Op::Install { epoch, version } => {
                if epoch < self.promised {
                    Decision::Stale { promised: self.promised }
                } else if self.version == version && epoch > self.promised {
                    // The same data, sent by a newer owner: the promise rises (an owner's
                    // copy that nobody wrote since it took over is then streamed under its
                    // epoch, which a learner that received the copy first accepts).
                    Decision::Apply { to: Replica { version, promised: epoch } }
                } else if self.version.epoch == version.epoch && self.version.turn >= version.turn {
                    // Same writer, and this replica is as far or further: never go back.
                    Decision::Have
                } else if self.version.epoch == epoch && self.version > version {
                    // The sender itself wrote this replica's data after the copy it sends
                    // (its copy overtaken by its own next write): never go back.
                    Decision::Have
                } else {
                    // The owner of the newest epoch is the authority: its copy replaces
                    // whatever this replica holds, even a higher turn of an older epoch
                    // (a stale owner's write nobody acknowledged).
                    Decision::Apply { to: Replica { version, promised: epoch } }
                }
            }
        }
    }
}

/// Index of the newest of the answers (`None` if there are none). Ties keep the first, so
/// callers list the local store first.
pub fn newest<'a>(versions: impl IntoIterator<Item = &'a Version>) -> Option<usize> {
    let mut best: Option<(usize, &Version)> = None;
    for (i, v) in versions.into_iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// How many stores must hold a write before it is acknowledged, for a preference list of
/// `list_len` live nodes: the configured quorum, at most the list, at least the owner.
pub fn write_quorum(configured: usize, list_len: usize) -> usize {
    configured.clamp(1, list_len.max(1))
}

/// Keep-majority (as in Akka's split-brain resolver): a node serves only while it sees a
/// majority of the last stable membership; on an exact half, the half holding the
/// lowest-named member of that membership serves.
///
/// The baseline becomes the current membership once that membership has been unchanged for
/// `stable_after_ms` and itself holds a majority of the old baseline, so a minority never
/// promotes itself, while crashes one at a time shrink the baseline step by step. Time is
/// passed in; the guard reads no clock.
#[derive(Debug, Clone)]
pub struct MajorityGuard {
    baseline: BTreeSet<String>,
    seen: BTreeSet<String>,
    seen_since_ms: u64,
    stable_after_ms: u64,
}

impl MajorityGuard {
    /// A node on its own: its baseline is itself.
    pub fn new(me: &str, now_ms: u64, stable_after_ms: u64) -> MajorityGuard {
        let me: BTreeSet<String> = [me.to_string()].into();
        MajorityGuard { baseline: me.clone(), seen: me, seen_since_ms: now_ms, stable_after_ms }
    }

    pub fn baseline(&self) -> &BTreeSet<String> {
        &self.baseline
    }

    /// Feeds the members this node sees alive now (itself included); returns whether it
    /// may serve.
    pub fn observe(&mut self, live: &BTreeSet<String>, now_ms: u64) -> bool {
        if *live != self.seen {
            self.seen = live.clone();
            self.seen_since_ms = now_ms;
        }
        self.tick(now_ms)
    }

    /// The same as [`MajorityGuard::observe`] with the members last observed: time passed
    /// but the live set did not change (no copy or comparison of the set).
    pub fn tick(&mut self, now_ms: u64) -> bool {
        let stable = now_ms.saturating_sub(self.seen_since_ms) >= self.stable_after_ms;
        if stable && self.seen != self.baseline && self.majority_of_baseline(&self.seen) {
            self.baseline = self.seen.clone();
        }
        self.majority_of_baseline(&self.seen)
    }

    /// Whether `live` holds a majority of the baseline (or the lowest-named half).
    pub fn majority_of_baseline(&self, live: &BTreeSet<String>) -> bool {
        let present = self.baseline.intersection(live).count();
        let total = self.baseline.len();
        present * 2 > total
            || (present * 2 == total
                && self.baseline.first().is_some_and(|lowest| live.contains(lowest)))
    }
}

#[cfg(test)]
mod tests;
