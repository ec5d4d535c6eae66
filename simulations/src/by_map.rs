//! A scenario run on the authoritative placement protocol: the real controller (raft-rs),
//! planner, leave steps and ownership machines of every node ([`Authority`]), under the
//! scenario's faults and workload, with the authority's checkers after every step. This is
//! what a node runs by default; [`crate::world`] models the older
//! ring-based replication (`[controller] authoritative = false`).
//!
//! What a scenario sets here: nodes, duration, seed, the network (latency range; loss and
//! duplication of gossip datagrams: the links between nodes are TCP, which turns loss
//! into delay, so ownership and Raft messages are not lost), the gossip
//! settings, the shard count and ring points, the replication factor, the request rate
//! (start, diurnal curve, flash crowds add to it), popularity (uniform random shards, or
//! with `zipf_s` conversations `{prefix}-{k}` by a Zipf law, on their shards by name; a
//! flash crowd's rate goes to its own few conversations), the node's `[rebalance]` (on:
//! every node runs the node's load loop, [`botclaw_core::rebalance::LoadRounds`], gossips
//! its load and decides moves, which the leader's planner pins; off: no load gossip,
//! which the node still sends) and every fault kind (a drain is an
//! operator's decommission, a rolling restart a SIGTERM then a start once the node has
//! left). Not modelled by the map run: bots' service times (a write costs its store's
//! durability time, 1-3 ms, on every in-sync member), `write_quorum` (by the map every
//! in-sync member acknowledges).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use botclaw_core::placement::{shard_of, ShardId};

use botclaw_core::shardmap::plan::PlanConfig;
use botclaw_core::shardmap::LeaveMode;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::authority::{Authority, AuthorityConfig};
use crate::report::{
    balance_chart, chart, json_line, latency_chart, membership_chart, Chart, Scale, SeedSeries,
};
use crate::scenario::{FaultKind, Scenario, Start};

/// Scheduling granularity of faults and the request rate (simulated ms).
const TICK_MS: u64 = 50;
/// Nodes whose view of the membership is sampled.
const VIEWS_SAMPLED: usize = 32;

/// One point of the time series (every `sample_ms`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapSample {
    pub t_s: f64,
    pub acknowledged_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Busiest owner's acknowledged writes over the average of the owners.
    pub load_max_over_avg: f64,
    /// The owner that acknowledged fewest writes, over the average.
    pub load_min_over_avg: f64,
    pub nodes_running: usize,
    pub members_up_min: usize,
    pub members_up_max: usize,
    /// Shards refusing writes (every in-sync member gone) in the committed map.
    pub unavailable_shards: u32,
    /// Shards with a learner catching up.
    pub moves_in_flight: u32,
    pub map_version: u64,
}

/// The summary of one run by the map.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapReport {
    pub scenario: String,
    pub seed: u64,
    pub model: &'static str,
    pub simulated_s: u64,
    pub nodes_final: usize,
    pub writes_submitted: u64,
    pub writes_acknowledged: u64,
    /// Refused (`unavailable`, fenced, lease run out) or failed after ownership moved.
    pub writes_failed: u64,
    /// Writes and reads the gateway could not route (no owner in its map, the owner down,
    /// frozen or unreachable).
    pub requests_unrouted: u64,
    /// On running nodes, neither acknowledged nor failed 5 s after submission at the end.
    pub writes_stuck: usize,
    pub reads_served: u64,
    pub reads_failed: u64,
    /// Submission to acknowledgement of acknowledged writes.
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_p999: f64,
    pub load_max_over_avg_mean: f64,
    pub load_max_over_avg_max: f64,
    /// The busiest owner over the average, mean over the samples of the last 10 s.
    pub load_max_over_avg_end: f64,
    /// Load-driven moves the nodes decided (`botclaw_shards_moved_total` summed), and
    /// when the last one was decided.
    pub load_moves: u64,
    pub load_moves_last_s: Option<f64>,
    /// Entries the controller committed, leaders it had.
    pub entries: u64,
    /// Committed entries by command kind (`raft`: the group's own, membership changes and
    /// a new leader's empty entry).
    pub entries_by_kind: BTreeMap<&'static str, u64>,
    pub leader_changes: u64,
    pub learners_added: u64,
    pub owner_changes: u64,
    /// Committed entries that changed nothing (all of it skipped), in all and by command
    /// kind: proposals that arrived stale or twice.
    pub entries_without_effect: u64,
    pub entries_without_effect_by_kind: BTreeMap<&'static str, u64>,
    /// Proposals the leader left out whole: stale, or copies of changes in its log.
    pub proposals_stale: u64,
    /// Ticks at which a leader dropped the changes it had gathered (refused by raft-rs, or
    /// leadership lost); their owners propose them again.
    pub proposals_dropped: u64,
    /// Shard-seconds without an owner (sampled), and shards without one at the end.
    pub unavailable_shard_s: f64,
    pub unavailable_shards_end: usize,
    /// Acknowledged writes an in-sync member lacked.
    pub writes_lost: u64,
    pub ownership_messages_lost: u64,
    /// Per crash: until every running node declared it down, and until the committed map
    /// named it owner of no shard; and the medians over the crashes (null without any).
    pub crashes: Vec<crate::authority::CrashTimes>,
    pub detected_s_median: Option<f64>,
    pub reassigned_s_median: Option<f64>,
    /// Per node joined to the running cluster: until the leader's map named it owner of a
    /// shard, and until nothing moved any more (`/status`'s `moves_in_flight` 0 and
    /// `plan_settled`); the medians over the joins (null without any).
    pub joins: Vec<crate::authority::JoinTimes>,
    pub join_owning_s_median: Option<f64>,
    pub join_settled_s_median: Option<f64>,
    pub datagrams_sent: u64,
    pub datagrams_dropped: u64,
    /// Checker failures (empty when every invariant held).
    pub failures: Vec<String>,
    #[serde(skip)]
    pub samples: Vec<MapSample>,
    /// The scenario's faults, for the plots' markers.
    #[serde(skip)]
    pub markers: Vec<(f64, String)>,
}

impl MapReport {
    pub fn to_json(&self) -> String {
        json_line(self)
    }

    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "t_s,acknowledged_per_s,p50_ms,p99_ms,p999_ms,load_max_over_avg,load_min_over_avg,nodes_running,members_up_min,members_up_max,unavailable_shards,moves_in_flight,map_version\n",
        );
        for s in &self.samples {
            out.push_str(&format!(
                "{:.3},{:.1},{:.3},{:.3},{:.3},{:.4},{:.4},{},{},{},{},{},{}\n",
                s.t_s,
                s.acknowledged_per_s,
                s.p50_ms,
                s.p99_ms,
                s.p999_ms,
                s.load_max_over_avg,
                s.load_min_over_avg,
                s.nodes_running,
                s.members_up_min,
                s.members_up_max,
                s.unavailable_shards,
                s.moves_in_flight,
                s.map_version
            ));
        }
        out
    }

    /// The times of the samples, and the metrics compared across seeds.
    pub fn seed_series(&self) -> (Vec<f64>, Vec<SeedSeries>) {
        let t = self.samples.iter().map(|s| s.t_s).collect();
        let series =
            |f: fn(&MapSample) -> f64| -> Vec<f64> { self.samples.iter().map(f).collect() };
        (
            t,
            vec![
                (
                    "throughput.svg",
                    "acknowledged writes",
                    "writes/s",
                    Scale::Linear,
                    series(|s| s.acknowledged_per_s),
                ),
                (
                    "latency.svg",
                    "write latency p99",
                    "p99 (ms, log scale)",
                    Scale::Log,
                    series(|s| s.p99_ms),
                ),
                (
                    "balance.svg",
                    "busiest owner",
                    "busiest owner's writes/s over the average",
                    Scale::Linear,
                    series(|s| s.load_max_over_avg),
                ),
            ],
        )
    }

    /// The plots: (file name, SVG).
    pub fn plots(&self) -> Vec<(&'static str, String)> {
        let t: Vec<f64> = self.samples.iter().map(|s| s.t_s).collect();
        let series =
            |f: fn(&MapSample) -> f64| -> Vec<f64> { self.samples.iter().map(f).collect() };
        let name = &self.scenario;
        vec![
            (
                "throughput.svg",
                chart(&Chart {
                    title: format!("{name} (by the map): acknowledged writes"),
                    x_label: crate::report::TIME,
                    y_label: "writes/s",
                    scale: Scale::Linear,
                    t: &t,
                    series: vec![("acknowledged", series(|s| s.acknowledged_per_s))],
                    markers: &self.markers,
                    band: None,
                }),
            ),
            (
                "latency.svg",
                latency_chart(
                    format!("{name} (by the map): write latency"),
                    &t,
                    [series(|s| s.p50_ms), series(|s| s.p99_ms), series(|s| s.p999_ms)],
                    &self.markers,
                ),
            ),
            (
                "balance.svg",
                balance_chart(
                    format!("{name} (by the map): load balance"),
                    "an owner's writes/s over the average",
                    "every owner (least to busiest)",
                    &t,
                    [series(|s| s.load_min_over_avg), series(|s| s.load_max_over_avg)],
                    &self.markers,
                ),
            ),
            (
                "placement.svg",
                chart(&Chart {
                    title: format!("{name} (by the map): shards"),
                    x_label: crate::report::TIME,
                    y_label: "shards",
                    scale: Scale::Linear,
                    t: &t,
                    series: vec![
                        ("unavailable", series(|s| f64::from(s.unavailable_shards))),
                        ("moving", series(|s| f64::from(s.moves_in_flight))),
                    ],
                    markers: &self.markers,
                    band: None,
                }),
            ),
            (
                "membership.svg",
                membership_chart(
                    format!("{name} (by the map): membership"),
                    &t,
                    [
                        series(|s| s.nodes_running as f64),
                        series(|s| s.members_up_min as f64),
                        series(|s| s.members_up_max as f64),
                    ],
                    &self.markers,
                ),
            ),
        ]
    }
}

/// What happens at a time.
#[derive(Debug, Clone)]
enum Action {
    Crash(usize),
    Start(usize),
    Freeze(usize, bool),
    Isolate(Vec<usize>),
    Join(usize),
    Leave(usize, LeaveMode),
    /// A rolling restart's SIGTERM: the node restarts once it has left.
    Restart(usize),
    /// The controller's leader (whichever node it is then) crashes, back after `down_ms`.
    CrashLeader {
        down_ms: u64,
    },
    /// Expands into crashes and restarts of random running nodes.
    Churn {
        count: usize,
        every_ms: u64,
        down_ms: u64,
    },
    RollingRestart {
        every_ms: u64,
    },
}

/// The authority's settings for `sc`.
pub fn config_of(sc: &Scenario) -> AuthorityConfig {
    AuthorityConfig {
        nodes: sc.nodes,
        shards: sc.placement.shard_count,
        latency_ms: (sc.network.latency_ms_min, sc.network.latency_ms_max),
        gossip: sc.gossip.clone(),
        gossip_loss: sc.network.loss,
        gossip_duplicate: sc.network.duplicate,
        vnodes: sc.placement.vnodes,
        writes_per_s: 0,
        plan: PlanConfig::of(&sc.controller, sc.replication.factor),
        controller: sc.controller.clone(),
        tick_ms: sc.controller.tick_ms,
        // Off, the node still gossips its load (for `/status`), but decides nothing; the
        // map model then skips the load gossip too, which costs every node a summary per
        // member per second (at 1000 nodes, the first 30 s: 49.2 -> 71.0 s wall).
        rebalance: sc.rebalance.enabled.then(|| sc.rebalance.clone()),
        formed: sc.start == Start::Formed,
        ..AuthorityConfig::default()
    }
}

/// The request rate at `t_ms` (the diurnal curve), and each flash crowd's.
fn rate_at(sc: &Scenario, t_ms: u64) -> (u64, Vec<u64>) {
    let t = t_ms as f64 / 1000.0;
    let w = &sc.workload;
    if t < w.start_s {
        return (0, vec![0; w.flash.len()]);
    }
    let phase = 2.0 * std::f64::consts::PI * t / w.diurnal_period_s.max(1e-9);
    let rate = w.turns_per_s * (1.0 + w.diurnal_amplitude * phase.sin());
    let flash = w
        .flash
        .iter()
        .map(|f| {
            let on = t >= f.at_s && t < f.at_s + f.duration_s;
            if on {
                f.turns_per_s.max(0.0).round() as u64
            } else {
                0
            }
        })
        .collect();
    (rate.max(0.0).round() as u64, flash)
}

/// The shard of conversation `k` (named `{prefix}-{k}`, as `botclaw bench` names them).
fn conversation_shard(sc: &Scenario, k: usize) -> ShardId {
    shard_of(&format!("{}-{k}", sc.workload.prefix), sc.placement.shard_count)
}

/// Runs `sc` with `seed` on the authoritative protocol; `progress` gets the fraction of
/// simulated time done.
pub fn run(sc: Scenario, seed: u64, mut progress: impl FnMut(f64)) -> MapReport {
    let mut a = Authority::new(config_of(&sc), seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5ce7a);
    if sc.workload.zipf_s > 0.0 {
        let shards =
            (0..sc.workload.conversations.max(1)).map(|k| conversation_shard(&sc, k)).collect();
        a.set_popularity(sc.workload.zipf_s, shards).expect("the scenario's Zipf exponent");
    }
    // Each flash crowd's conversations, drawn once.
    let mut flash_rng = StdRng::seed_from_u64(seed ^ 0xf1a5);
    let flash_sets: Vec<Arc<[ShardId]>> = sc
        .workload
        .flash
        .iter()
        .map(|f| {
            (0..f.conversations)
                .map(|_| {
                    let k = flash_rng.random_range(0..sc.workload.conversations.max(1));
                    conversation_shard(&sc, k)
                })
                .collect()
        })
        .collect();
    let mut plan: BTreeMap<u64, Vec<Action>> = BTreeMap::new();
    for f in &sc.faults {
        let at = (f.at_s * 1000.0) as u64;
        let actions = match &f.kind {
            FaultKind::Crash { nodes } => nodes.iter().map(|&n| Action::Crash(n)).collect(),
            FaultKind::Restart { nodes } => nodes.iter().map(|&n| Action::Start(n)).collect(),
            FaultKind::Freeze { nodes } => nodes.iter().map(|&n| Action::Freeze(n, true)).collect(),
            FaultKind::Thaw { nodes } => nodes.iter().map(|&n| Action::Freeze(n, false)).collect(),
            FaultKind::Partition { nodes } => vec![Action::Isolate(nodes.clone())],
            FaultKind::Heal => vec![Action::Isolate(Vec::new())],
            FaultKind::Join { count } => vec![Action::Join(*count)],
            FaultKind::Drain { nodes } => {
                nodes.iter().map(|&n| Action::Leave(n, LeaveMode::Decommission)).collect()
            }
            FaultKind::RollingRestart { every_s } => {
                vec![Action::RollingRestart { every_ms: (every_s * 1000.0) as u64 }]
            }
            FaultKind::CrashLeader { down_s } => {
                vec![Action::CrashLeader { down_ms: (down_s * 1000.0) as u64 }]
            }
            FaultKind::Churn { count, every_s, down_s } => vec![Action::Churn {
                count: *count,
                every_ms: (every_s * 1000.0) as u64,
                down_ms: (down_s * 1000.0) as u64,
            }],
        };
        plan.entry(at).or_default().extend(actions);
    }
    let end_ms = sc.duration_s * 1000;
    let sample_ms = sc.sample_ms.max(TICK_MS);
    let mut restart_when_left: BTreeSet<usize> = BTreeSet::new();
    let mut all = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
    let mut samples: Vec<MapSample> = Vec::new();
    let (mut last_acked, mut last_per_node) = (0u64, a.acked_per_node());
    let mut unavailable_shard_s = 0.0;
    let mut t = 0;
    while t < end_ms {
        // Faults due now, in the order the scenario lists them.
        while let Some(entry) = plan.first_entry().filter(|e| *e.key() <= t) {
            for action in entry.remove() {
                apply(&mut a, &mut plan, &mut rng, &mut restart_when_left, t, action);
            }
        }
        for i in restart_when_left.clone() {
            if i < a.nodes() && !a.is_running(i) {
                a.start(i);
                restart_when_left.remove(&i);
            }
        }
        let (rate, flash) = rate_at(&sc, t);
        a.set_writes_per_s(rate);
        let flash: Vec<(u64, Arc<[ShardId]>)> =
            flash.into_iter().zip(&flash_sets).map(|(r, s)| (r, s.clone())).collect();
        a.set_flash(&flash);
        t += TICK_MS;
        a.run_until(t);
        if t % sample_ms == 0 {
            let acked = a.writes_acknowledged();
            let mut lat = a.take_latencies();
            lat.sort_unstable();
            for &us in &lat {
                all.saturating_record(us.max(1));
            }
            let at = |permille: usize| {
                lat.get((lat.len() * permille / 1000).min(lat.len().saturating_sub(1)))
                    .map_or(0.0, |&us| us as f64 / 1000.0)
            };
            let (p50, p99, p999) = (at(500), at(990), at(999));
            let per_node = a.acked_per_node();
            let map = a.map();
            let owners: Vec<u64> = (0..per_node.len())
                .filter(|&i| map.member_ix(&format!("n{i}")).is_some_and(|ix| map.owned_by(ix) > 0))
                .map(|i| per_node[i] - last_per_node.get(i).copied().unwrap_or(0))
                .collect();
            let total: u64 = owners.iter().sum();
            let over_avg = |n: u64| {
                if total == 0 {
                    0.0
                } else {
                    n as f64 * owners.len() as f64 / total as f64
                }
            };
            let balance = over_avg(owners.iter().copied().max().unwrap_or(0));
            let least = over_avg(owners.iter().copied().min().unwrap_or(0));
            last_per_node = per_node;
            let views: Vec<usize> =
                (0..a.nodes()).filter_map(|i| a.members_up(i)).take(VIEWS_SAMPLED).collect();
            let tally = map.tally();
            unavailable_shard_s += f64::from(tally.unavailable) * sample_ms as f64 / 1000.0;
            samples.push(MapSample {
                t_s: t as f64 / 1000.0,
                acknowledged_per_s: (acked - last_acked) as f64 * 1000.0 / sample_ms as f64,
                p50_ms: p50,
                p99_ms: p99,
                p999_ms: p999,
                load_max_over_avg: balance,
                load_min_over_avg: least,
                nodes_running: a.running(),
                members_up_min: views.iter().copied().min().unwrap_or(0),
                members_up_max: views.iter().copied().max().unwrap_or(0),
                unavailable_shards: tally.unavailable,
                moves_in_flight: tally.learning,
                map_version: map.version,
            });
            last_acked = acked;
            progress(t as f64 / end_ms as f64);
        }
    }
    for us in a.take_latencies() {
        all.saturating_record(us.max(1));
    }
    let r = a.report();
    let q = |p: f64| if all.is_empty() { 0.0 } else { all.value_at_quantile(p) as f64 / 1000.0 };
    let balances: Vec<f64> =
        samples.iter().skip(2).map(|s| s.load_max_over_avg).filter(|b| *b > 0.0).collect();
    let mut failures = r.problems.clone();
    if r.unavailable_shards > 0 && a.running() == a.nodes() {
        failures.push(format!(
            "{} shards unavailable at the end although every node runs",
            r.unavailable_shards
        ));
    }
    MapReport {
        scenario: sc.name.clone(),
        seed,
        model: "map",
        simulated_s: sc.duration_s,
        nodes_final: a.running(),
        writes_submitted: r.writes_submitted,
        writes_acknowledged: r.writes_acknowledged,
        writes_failed: r.writes_failed,
        requests_unrouted: r.requests_unrouted,
        writes_stuck: r.writes_stuck,
        reads_served: r.reads_served,
        reads_failed: r.reads_failed,
        latency_ms_p50: q(0.5),
        latency_ms_p99: q(0.99),
        latency_ms_p999: q(0.999),
        load_max_over_avg_mean: if balances.is_empty() {
            0.0
        } else {
            balances.iter().sum::<f64>() / balances.len() as f64
        },
        load_max_over_avg_max: balances.iter().copied().fold(0.0, f64::max),
        load_max_over_avg_end: {
            let since = sc.duration_s as f64 - 10.0;
            let end: Vec<f64> = samples
                .iter()
                .filter(|s| s.t_s > since && s.load_max_over_avg > 0.0)
                .map(|s| s.load_max_over_avg)
                .collect();
            end.iter().fold(0.0, |a, b| a + b) / end.len().max(1) as f64
        },
        load_moves: r.load_moves,
        load_moves_last_s: r.load_moves_last_ms.map(|ms| ms as f64 / 1000.0),
        entries: r.entries,
        entries_by_kind: r.entries_by_kind.clone(),
        leader_changes: r.leader_changes,
        learners_added: r.learners_added,
        owner_changes: r.owner_changes,
        entries_without_effect: r.entries_without_effect.values().sum(),
        entries_without_effect_by_kind: r.entries_without_effect.clone(),
        proposals_stale: r.proposals_stale,
        proposals_dropped: r.proposals_dropped,
        unavailable_shard_s,
        unavailable_shards_end: r.unavailable_shards,
        writes_lost: r.writes_lost,
        ownership_messages_lost: r.messages_lost,
        detected_s_median: median(r.crashes.iter().filter_map(|c| c.detected_s)),
        reassigned_s_median: median(r.crashes.iter().filter_map(|c| c.reassigned_s)),
        crashes: r.crashes.clone(),
        join_owning_s_median: median(r.joins.iter().filter_map(|j| j.owning_s)),
        join_settled_s_median: median(r.joins.iter().filter_map(|j| j.settled_s)),
        joins: r.joins.clone(),
        datagrams_sent: a.net.sent,
        datagrams_dropped: a.net.dropped,
        failures,
        samples,
        markers: sc.markers(),
    }
}

/// The median of some numbers; `None` without any.
fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let s = crate::study::stats(&values.collect::<Vec<f64>>());
    (s.n > 0).then_some(s.median)
}

fn apply(
    a: &mut Authority,
    plan: &mut BTreeMap<u64, Vec<Action>>,
    rng: &mut StdRng,
    restart_when_left: &mut BTreeSet<usize>,
    now: u64,
    action: Action,
) {
    let exists = |a: &Authority, i: usize| i < a.nodes();
    match action {
        Action::Crash(i) if exists(a, i) => a.crash(i),
        Action::Start(i) if exists(a, i) => {
            if a.is_running(i) {
                a.crash(i);
            }
            a.start(i);
        }
        Action::Freeze(i, frozen) if exists(a, i) => a.freeze(i, frozen),
        Action::Isolate(nodes) => {
            let nodes: Vec<usize> = nodes.into_iter().filter(|&i| exists(a, i)).collect();
            a.isolate(&nodes);
        }
        Action::Join(count) => {
            for _ in 0..count {
                a.join();
            }
        }
        Action::Leave(i, mode) if exists(a, i) => a.leave(i, mode),
        Action::Restart(i) if exists(a, i) && a.is_running(i) => {
            a.leave(i, LeaveMode::Restart);
            restart_when_left.insert(i);
        }
        Action::RollingRestart { every_ms } => {
            let running: Vec<usize> = (0..a.nodes()).filter(|&i| a.is_running(i)).collect();
            for (k, i) in running.into_iter().enumerate() {
                plan.entry(now + k as u64 * every_ms).or_default().push(Action::Restart(i));
            }
        }
        Action::CrashLeader { down_ms } => {
            if let Some(l) = a.leader() {
                a.crash(l);
                plan.entry(now + down_ms).or_default().push(Action::Start(l));
            }
        }
        Action::Churn { count, every_ms, down_ms } => {
            for k in 0..count as u64 {
                let victim = rng.random_range(0..a.nodes());
                let at = now + k * every_ms;
                plan.entry(at).or_default().push(Action::Crash(victim));
                plan.entry(at + down_ms).or_default().push(Action::Start(victim));
            }
        }
        _ => {}
    }
}
