//! One node's load loop, without IO: every load period it takes what the node measured
//! (its turns per second, its hottest shards) and what gossip shows of the cluster (each
//! member's load, the moves in force); every rebalancing interval it decides load-driven
//! moves; and it returns the load summary to publish. The node runs it on a timer; the
//! simulator runs it on simulated time, with the same inputs.

use std::collections::BTreeMap;

use super::{MoveRecord, MoveTable, NodeLoad, RebalanceConfig, Rebalancer, ShardLoad};
use crate::load::{LoadSummary, HOT_SHARDS_MAX, MOVES_MAX};
use crate::placement::ShardId;

/// How often a node measures and spreads its load.
pub const LOAD_PERIOD_MS: u64 = 1000;

/// How long a node keeps vouching for a move it decided (its target vouches after that).
pub const DECIDED_MOVES_KEPT_MS: u64 = 30_000;

/// What one period measured, and the cluster as this node sees it.
#[derive(Debug, Clone, Copy)]
pub struct Period<'a> {
    pub now_ms: u64,
    /// Turns this node ran over the period, per second.
    pub turns_per_s: f32,
    /// Its hottest shards over the period (turns/s), hottest first, at least
    /// [`RebalanceConfig::shards_considered`] of them when it has that many.
    pub hot: &'a [(ShardId, f32)],
    /// Every member that owns shards, with its load (this node's: `turns_per_s`).
    pub nodes: &'a [NodeLoad],
    /// Shards are moving to new owners (learners in the map): the loads do not show the
    /// new placement yet.
    pub moving: bool,
    /// Every member's newest summary, as gossip brought it.
    pub loads: &'a BTreeMap<String, LoadSummary>,
    /// The load-driven moves in force (routing's table).
    pub moves: &'a MoveTable,
    /// Conversations running here, turns in progress, module requests per second by role.
    pub active: u32,
    pub inflight: u32,
    pub modules: &'a [(String, f32)],
}

/// What a period decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// Moves decided this period (each already in `summary.moves`).
    pub moves: Vec<MoveRecord>,
    /// The summary to publish over gossip.
    pub summary: LoadSummary,
}

/// The load loop's state: the rebalancer, whether the node was overloaded at the last
/// round, the moves it decided and still vouches for, the members at the last round.
#[derive(Debug, Clone)]
pub struct LoadRounds {
    me: String,
    incarnation: u64,
    cfg: RebalanceConfig,
    enabled: bool,
    min_turns_per_s: f64,
    rounds_every: u64,
    rebalancer: Rebalancer,
    was_overloaded: bool,
    /// Decided moves and when.
    decided: Vec<(MoveRecord, u64)>,
    members_before: Vec<String>,
    seq: u64,
}

impl LoadRounds {
    pub fn new(me: &str, incarnation: u64, cfg: &botclaw_config::RebalanceConfig) -> LoadRounds {
        let core = RebalanceConfig::from(cfg);
        LoadRounds {
            me: me.to_string(),
            incarnation,
            rebalancer: Rebalancer::new(core.clone()),
            cfg: core,
            enabled: cfg.enabled,
            min_turns_per_s: f64::from(cfg.min_turns_per_s),
            rounds_every: (cfg.interval_ms / LOAD_PERIOD_MS).max(1),
            was_overloaded: false,
            decided: Vec::new(),
            members_before: Vec::new(),
            seq: 0,
        }
    }

    /// The rules this node decides by.
    pub fn config(&self) -> &RebalanceConfig {
        &self.cfg
    }

    /// One period: decides moves if a rebalancing round is due (the node is overloaded
    /// now and was at the last round, the cluster is not quiet, the placement is not
    /// changing), and returns them with the summary to publish.
    pub fn period(&mut self, p: Period<'_>) -> Decided {
        self.seq += 1;
        let mut fresh = Vec::new();
        if self.enabled && self.seq.is_multiple_of(self.rounds_every) {
            let members: Vec<String> = p.nodes.iter().map(|n| n.name.clone()).collect();
            if members != self.members_before || p.moving {
                self.rebalancer.hold();
            }
            self.members_before = members;
            let avg = p.nodes.iter().map(|n| n.load).sum::<f64>() / p.nodes.len().max(1) as f64;
            let overloaded = p.nodes.iter().find(|n| n.name == self.me).is_some_and(|m| {
                m.load / f64::from(m.capacity.max(1))
                    > self.cfg.overload_ratio * super::average(p.nodes)
            });
            if p.nodes.len() >= 2
                && avg >= self.min_turns_per_s
                && overloaded
                && self.was_overloaded
            {
                let shards: Vec<ShardLoad> = p
                    .hot
                    .iter()
                    .map(|(shard, rate)| ShardLoad { shard: *shard, rate: f64::from(*rate) })
                    .collect();
                for m in self.rebalancer.decide(&self.me, p.nodes, &shards) {
                    let record = p.moves.next_record(m.shard, &m.to, &self.me);
                    self.decided.push((record.clone(), p.now_ms));
                    fresh.push(record);
                }
            }
            self.was_overloaded = overloaded;
        }
        // A decided move is vouched for here until its target vouches for it (or for
        // DECIDED_MOVES_KEPT_MS), so the summary keeps room for fresh decisions.
        self.decided.retain(|(r, at)| {
            let adopted = p.loads.get(&r.to).is_some_and(|s| s.moves.contains(r));
            !adopted && p.now_ms.saturating_sub(*at) < DECIDED_MOVES_KEPT_MS
        });
        let mut moves: Vec<MoveRecord> = self.decided.iter().map(|(r, _)| r.clone()).collect();
        moves.extend(p.moves.iter().filter(|r| r.to == self.me).cloned());
        moves.truncate(MOVES_MAX);
        let mut hot = p.hot.to_vec();
        hot.truncate(HOT_SHARDS_MAX);
        let summary = LoadSummary {
            node: self.me.clone(),
            incarnation: self.incarnation,
            seq: self.seq,
            turns_per_s: p.turns_per_s,
            active: p.active,
            inflight: p.inflight,
            hot,
            moves,
            modules: p.modules.to_vec(),
        };
        Decided { moves: fresh, summary }
    }
}
