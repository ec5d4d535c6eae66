//! Load-aware rebalancing decisions, without IO: which of its shards an overloaded node
//! gives to which underloaded node.
//!
//! Rules (each one a property the tests check):
//! - only an overloaded node moves shards, and only its own (the owner decides, so two
//!   nodes never decide about one shard);
//! - overloaded means load per capacity unit above `overload_ratio` x the cluster's average;
//!   a move is made only if it leaves the receiver at or under `target_ratio` x average,
//!   with `target_ratio < overload_ratio`: a receiver is never pushed into overload, so
//!   under constant load the decisions stop (hysteresis);
//! - the giver sheds down to `target_ratio`, hottest shards first, never a shard hotter
//!   than what is left to shed (no overshoot), at most `moves_per_round_max` per round;
//! - overloaded nodes decide at the same time from the same loads, so each fills only its
//!   share of a receiver's room (its excess over all overloaded nodes' excess): together
//!   they never push a receiver over the target (three hot nodes each filling a newcomer's
//!   whole room gave it three times its share);
//! - a node receives at most `moves_per_target_max` moved shards: a move lasts only as long
//!   as its target vouches for it in its load summary, which carries a bounded number of
//!   records (a move past that bound would be forgotten and decided again, forever).
//!   Load-driven moves are for hot spots; a node that is too small for its share of the
//!   ring needs a larger capacity weight instead;
//! - after a round with moves, the node decides nothing for `cooldown_rounds` rounds, so
//!   the loads its moves change are measured before it decides again (loads travel by
//!   gossip and lag a round or two; deciding on stale loads overshoots and can oscillate);
//!   a moved shard stays put as long;
//! - likewise after the placement changed under it ([`Rebalancer::hold`]: a member joined
//!   or left, shards are moving to new owners): a newcomer measured before its new shards
//!   carried load looks idle, and every hot node would fill it on top of its share.
//!
//! Iteration is ordered (rates, then names and shard ids), so a decision is a pure
//! function of its inputs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::placement::{Placement, ShardId};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RebalanceConfig {
    pub overload_ratio: f64,
    pub target_ratio: f64,
    pub moves_per_round_max: usize,
    /// Moved shards one node may be the target of (see the module docs).
    pub moves_per_target_max: usize,
    pub cooldown_rounds: u64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            overload_ratio: 1.15,
            target_ratio: 1.05,
            moves_per_round_max: 16,
            moves_per_target_max: crate::load::MOVES_MAX - crate::load::HOT_SHARDS_MAX,
            cooldown_rounds: 10,
        }
    }
}

impl RebalanceConfig {
    /// How many of its hottest shards a node weighs in one round: as many as it may move
    /// (at least the ones its load summary shows). Weighing only the summary's few made a
    /// hot node shed at most that many shards per round however far over it was.
    pub fn shards_considered(&self) -> usize {
        self.moves_per_round_max.max(crate::load::HOT_SHARDS_MAX)
    }
}

impl From<&botclaw_config::RebalanceConfig> for RebalanceConfig {
    /// The operator's settings (ratios in permille).
    fn from(r: &botclaw_config::RebalanceConfig) -> Self {
        RebalanceConfig {
            overload_ratio: f64::from(r.overload_permille) / 1000.0,
            target_ratio: f64::from(r.target_permille) / 1000.0,
            moves_per_round_max: r.moves_per_round_max,
            cooldown_rounds: r.cooldown_rounds,
            ..Default::default()
        }
    }
}

/// A node's measured load (e.g. turns/s), capacity weight, and how many moved shards it is
/// the target of now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    pub name: String,
    pub load: f64,
    pub capacity: u32,
    #[serde(default)]
    pub moved_in: usize,
}

/// One shard's measured load on its owner.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShardLoad {
    pub shard: ShardId,
    pub rate: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub shard: ShardId,
    pub to: String,
}

/// One node's rebalancer: its rounds and the cooldown of shards it moved.
#[derive(Debug, Clone)]
pub struct Rebalancer {
    cfg: RebalanceConfig,
    round: u64,
    moved_at: BTreeMap<ShardId, u64>,
    /// The last round this node moved shards.
    last_moves: Option<u64>,
}

impl Rebalancer {
    pub fn new(cfg: RebalanceConfig) -> Rebalancer {
        Rebalancer { cfg, round: 0, moved_at: BTreeMap::new(), last_moves: None }
    }

    /// The placement is changing (members joined or left, shards are moving): the loads
    /// measured now do not show it, so no moves for `cooldown_rounds` rounds from here.
    pub fn hold(&mut self) {
        self.last_moves = Some(self.round);
    }

    /// One round: the moves node `me` makes, given every node's load and `me`'s shards.
    pub fn decide(&mut self, me: &str, nodes: &[NodeLoad], mine: &[ShardLoad]) -> Vec<Move> {
        self.round += 1;
        let round = self.round;
        let cooldown = self.cfg.cooldown_rounds;
        self.moved_at.retain(|_, at| round - *at < cooldown);
        if self.last_moves.is_some_and(|at| round - at < cooldown) {
            return Vec::new();
        }
        let moves = decide(&self.cfg, me, nodes, mine, |shard| self.moved_at.contains_key(&shard));
        for m in &moves {
            self.moved_at.insert(m.shard, round);
        }
        if !moves.is_empty() {
            self.last_moves = Some(round);
        }
        moves
    }
}

/// The cluster's average load per capacity unit.
pub fn average(nodes: &[NodeLoad]) -> f64 {
    let capacity: f64 = nodes.iter().map(|n| f64::from(n.capacity)).sum();
    if capacity <= 0.0 {
        return 0.0;
    }
    nodes.iter().map(|n| n.load).sum::<f64>() / capacity
}

/// max / avg of load per capacity unit (1.0 is perfect balance).
pub fn imbalance(nodes: &[NodeLoad]) -> f64 {
    let avg = average(nodes);
    if avg <= 0.0 {
        return 1.0;
    }
    nodes.iter().map(|n| n.load / f64::from(n.capacity.max(1)) / avg).fold(0.0, f64::max)
}

/// The rules, as a pure function; `cooling` says which shards must not move now.
pub fn decide(
    cfg: &RebalanceConfig,
    me: &str,
    nodes: &[NodeLoad],
    mine: &[ShardLoad],
    cooling: impl Fn(ShardId) -> bool,
) -> Vec<Move> {
    let avg = average(nodes);
    let Some(my) = nodes.iter().find(|n| n.name == me) else { return Vec::new() };
    if avg <= 0.0 {
        return Vec::new();
    }
    let cap = |n: &NodeLoad| f64::from(n.capacity.max(1));
    if my.load / cap(my) <= cfg.overload_ratio * avg {
        return Vec::new();
    }
    let excess_of = |n: &NodeLoad| n.load - cfg.target_ratio * avg * cap(n);
    let mut excess = excess_of(my);
    // This node's share of every overloaded node's excess (it is one of them).
    let all_excess: f64 =
        nodes.iter().filter(|n| n.load / cap(n) > cfg.overload_ratio * avg).map(excess_of).sum();
    let share = (excess / all_excess).clamp(0.0, 1.0);
    // Receivers: below average, least loaded first; this node's share of their room up to
    // the target, and the moved shards they can still take (shared likewise).
    let mut receivers: Vec<(String, f64, usize)> = nodes
        .iter()
        .filter(|n| n.name != me && n.load / cap(n) < avg)
        .map(|n| {
            let slots = cfg.moves_per_target_max.saturating_sub(n.moved_in);
            let slots = (slots as f64 * share).floor() as usize;
            (n.name.clone(), (cfg.target_ratio * avg * cap(n) - n.load) * share, slots)
        })
        .collect();
    let mut shards: Vec<ShardLoad> =
        mine.iter().copied().filter(|s| s.rate > 0.0 && !cooling(s.shard)).collect();
    shards.sort_by(|a, b| b.rate.total_cmp(&a.rate).then(a.shard.cmp(&b.shard)));
    let mut moves = Vec::new();
    for s in shards {
        if moves.len() >= cfg.moves_per_round_max || excess <= 0.0 {
            break;
        }
        if s.rate > excess {
            continue;
        }
        receivers.retain(|r| r.2 > 0);
        receivers.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let Some(receiver) = receivers.first_mut().filter(|r| r.1 >= s.rate) else {
            continue;
        };
        receiver.1 -= s.rate;
        receiver.2 -= 1;
        excess -= s.rate;
        moves.push(Move { shard: s.shard, to: receiver.0.clone() });
    }
    moves
}

mod rounds;
#[cfg(test)]
mod tests;

pub use rounds::{Decided, LoadRounds, Period, DECIDED_MOVES_KEPT_MS, LOAD_PERIOD_MS};

/// One load-driven move: `shard` is owned by `to` instead of its ring owner. Versions order
/// competing records of one shard: a newer term wins, then the deciding node's name hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub shard: ShardId,
    pub to: String,
    pub version: (u64, u64),
}

/// The moves every node agrees on: records merged from every node's load summary, the
/// newest per shard, kept only while their target serves conversations. Placement = the
/// ring, then this table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveTable {
    records: BTreeMap<ShardId, MoveRecord>,
}

impl MoveTable {
    /// Merges records (any order): the newest version of each shard wins.
    pub fn merge<'a>(records: impl IntoIterator<Item = &'a MoveRecord>) -> MoveTable {
        let mut table = MoveTable::default();
        for r in records {
            let newer = table.records.get(&r.shard).is_none_or(|known| r.version > known.version);
            if newer {
                table.records.insert(r.shard, r.clone());
            }
        }
        table
    }

    /// The moves every summary vouches for (a node's view of the moves in force).
    pub fn vouched(summaries: &BTreeMap<String, crate::load::LoadSummary>) -> MoveTable {
        MoveTable::merge(summaries.values().flat_map(|s| &s.moves))
    }

    /// Drops records whose target cannot own conversations now.
    pub fn retain_targets(&mut self, can_own: impl Fn(&str) -> bool) {
        self.records.retain(|_, r| can_own(&r.to));
    }

    /// Where `shard` moved, if it did.
    pub fn target(&self, shard: ShardId) -> Option<&str> {
        self.records.get(&shard).map(|r| r.to.as_str())
    }

    /// The owner of `shard`: its move target if it moved, else the placement's owner.
    pub fn owner<'a>(&'a self, placement: &'a Placement, shard: ShardId) -> Option<&'a str> {
        self.target(shard).or_else(|| placement.owner(shard))
    }

    /// The owner, then the placement's next distinct nodes: `n` nodes at most.
    pub fn preference_list<'a>(
        &'a self,
        placement: &'a Placement,
        shard: ShardId,
        n: usize,
    ) -> Vec<&'a str> {
        let ring = placement.preference_list(shard, n);
        match self.target(shard) {
            None => ring,
            Some(target) => std::iter::once(target)
                .chain(ring.into_iter().filter(|m| *m != target))
                .take(n)
                .collect(),
        }
    }

    pub fn get(&self, shard: ShardId) -> Option<&MoveRecord> {
        self.records.get(&shard)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &MoveRecord> {
        self.records.values()
    }

    /// How many moved shards each node is the target of (for [`NodeLoad::moved_in`]).
    pub fn moved_in(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for r in self.records.values() {
            *counts.entry(r.to.as_str()).or_default() += 1;
        }
        counts
    }

    /// The record that moves `shard` to `to`, newer than any this table holds for it.
    pub fn next_record(&self, shard: ShardId, to: &str, decider: &str) -> MoveRecord {
        let term = self.records.get(&shard).map_or(0, |r| r.version.0) + 1;
        let node = xxhash_rust::xxh3::xxh3_64(decider.as_bytes());
        MoveRecord { shard, to: to.to_string(), version: (term, node) }
    }
}
