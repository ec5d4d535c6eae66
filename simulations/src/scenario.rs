//! Scenario files: what to simulate (TOML, `simulations/scenarios/*.toml`).
//!
//! Every field but `name` has a default, so a scenario states only what it studies. Unknown
//! keys are errors naming the key.

use botclaw_config::{ControllerConfig, GossipConfig, PlacementStrategy, RebalanceConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Nodes at the start (`n0` ..); `join` faults add more.
    #[serde(default = "default_nodes")]
    pub nodes: usize,
    #[serde(default = "default_duration")]
    pub duration_s: u64,
    /// Seed used when the command line gives none.
    #[serde(default)]
    pub seed: u64,
    /// Time series resolution.
    #[serde(default = "default_sample")]
    pub sample_ms: u64,
    #[serde(default)]
    pub network: Network,
    /// The node's `[gossip]` section (the node's defaults).
    #[serde(default)]
    pub gossip: GossipConfig,
    #[serde(default)]
    pub placement: Placement,
    /// The node's `[controller]` section (the node's defaults): its tick, elections and
    /// planner settings drive the simulated controllers and owners.
    #[serde(default)]
    pub controller: ControllerConfig,
    /// The node's `[rebalance]` section (on by default, as in the node).
    #[serde(default)]
    pub rebalance: RebalanceConfig,
    #[serde(default)]
    pub replication: Replication,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub service: Service,
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// How the cluster starts (the map model only forms one).
    #[serde(default)]
    pub start: Start,
}

/// How a scenario's cluster starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// Every node boots at 0 s and joins through `n0`: the failure detectors spread every
    /// join, the controller registers each node and moves shards onto it.
    #[default]
    Together,
    /// The cluster has run a while: every node's failure detector holds every other as
    /// up; by the map, the controller's map has every node as a member with the shards
    /// where the ring wants them (`formed_map`); by the ring, every node has joined. For studying a large cluster's steady state and
    /// faults, not its formation (5000 nodes joining at once through one seed take
    /// minutes of wall time per simulated second).
    Formed,
}

fn default_nodes() -> usize {
    5
}
fn default_duration() -> u64 {
    60
}
fn default_sample() -> u64 {
    1000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    pub latency_ms_min: u64,
    pub latency_ms_max: u64,
    pub loss: f64,
    pub duplicate: f64,
}

impl Default for Network {
    fn default() -> Self {
        Network { latency_ms_min: 1, latency_ms_max: 3, loss: 0.0, duplicate: 0.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Placement {
    pub strategy: PlacementStrategy,
    pub shard_count: u32,
    pub vnodes: u32,
    pub bound_epsilon_permille: u32,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            strategy: PlacementStrategy::Ring,
            shard_count: 16_384,
            vnodes: 100,
            bound_epsilon_permille: 250,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Replication {
    pub factor: usize,
    pub write_quorum: usize,
}

impl Default for Replication {
    fn default() -> Self {
        Replication { factor: 2, write_quorum: 2 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Clients start sending this long after the nodes start (the cluster forms first).
    pub start_s: f64,
    pub conversations: usize,
    /// Mean arrival rate of turns (Poisson).
    pub turns_per_s: f64,
    /// Zipf exponent of conversation popularity (0: uniform).
    pub zipf_s: f64,
    /// Conversation ids are `{prefix}-{k}`, as `botclaw bench --prefix` names them: the
    /// map model places them on shards by their hash, as a node does.
    pub prefix: String,
    /// Diurnal curve: rate * (1 + amplitude * sin(2 pi t / period)).
    pub diurnal_amplitude: f64,
    pub diurnal_period_s: f64,
    pub flash: Vec<Flash>,
    /// A client retries a failed turn after this long.
    pub retry_ms: u64,
    /// A client gives up on an unanswered turn after this long, then retries.
    pub timeout_ms: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            start_s: 5.0,
            conversations: 10_000,
            turns_per_s: 500.0,
            zipf_s: 0.0,
            prefix: "sim".into(),
            diurnal_amplitude: 0.0,
            diurnal_period_s: 86_400.0,
            flash: Vec::new(),
            retry_ms: 100,
            timeout_ms: 2_000,
        }
    }
}

/// A flash crowd: extra turns on a few conversations for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flash {
    pub at_s: f64,
    pub duration_s: f64,
    pub conversations: usize,
    pub turns_per_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Service {
    /// Turns a node runs at once; more wait in its queue.
    pub workers_per_node: usize,
    pub bots: Vec<Bot>,
}

impl Default for Service {
    fn default() -> Self {
        Service {
            workers_per_node: 8,
            bots: vec![Bot { name: "echo".into(), share: 1.0, mean_ms: 2.0 }],
        }
    }
}

/// A bot's share of turns and mean service time (exponentially distributed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bot {
    pub name: String,
    pub share: f64,
    pub mean_ms: f64,
}

/// Something that happens to nodes at a time. (serde cannot refuse unknown keys through
/// `flatten`; the kind's own fields are checked.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    pub at_s: f64,
    #[serde(flatten)]
    pub kind: FaultKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultKind {
    /// The processes die without a word.
    Crash {
        nodes: Vec<usize>,
    },
    /// Crashed (or running) nodes start again with a new incarnation and their data.
    Restart {
        nodes: Vec<usize>,
    },
    /// SIGSTOP / SIGCONT.
    Freeze {
        nodes: Vec<usize>,
    },
    Thaw {
        nodes: Vec<usize>,
    },
    /// These nodes are cut off from the rest (one side), until `heal`.
    Partition {
        nodes: Vec<usize>,
    },
    Heal,
    /// `count` new nodes start, seeded with node 0.
    Join {
        count: usize,
    },
    /// Graceful: drop the conversations role, then leave.
    Drain {
        nodes: Vec<usize>,
    },
    /// Every running node in turn: drain, restart, `every_s` apart.
    RollingRestart {
        every_s: f64,
    },
    /// `count` random running nodes crash and restart `down_s` later, one every `every_s`.
    Churn {
        count: usize,
        every_s: f64,
        down_s: f64,
    },
    /// The node leading the placement controller crashes and restarts `down_s` later (by
    /// the ring, which has no controller: node 0, the seed).
    CrashLeader {
        down_s: f64,
    },
}

impl FaultKind {
    /// A short name for plots ("crash 3", "heal").
    pub fn label(&self) -> String {
        let nodes = |n: &[usize]| n.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        match self {
            FaultKind::Crash { nodes: n } => format!("crash {}", nodes(n)),
            FaultKind::Restart { nodes: n } => format!("restart {}", nodes(n)),
            FaultKind::Freeze { nodes: n } => format!("freeze {}", nodes(n)),
            FaultKind::Thaw { nodes: n } => format!("thaw {}", nodes(n)),
            FaultKind::Partition { nodes: n } => format!("partition {}", nodes(n)),
            FaultKind::Heal => "heal".into(),
            FaultKind::Join { count } => format!("join {count}"),
            FaultKind::Drain { nodes: n } => format!("drain {}", nodes(n)),
            FaultKind::RollingRestart { .. } => "rolling restart".into(),
            FaultKind::Churn { count, .. } => format!("churn {count}"),
            FaultKind::CrashLeader { .. } => "crash leader".into(),
        }
    }
}

impl Scenario {
    /// The faults as plot markers: (time in s, label).
    pub fn markers(&self) -> Vec<(f64, String)> {
        self.faults.iter().map(|f| (f.at_s, f.kind.label())).collect()
    }

    pub fn from_toml(text: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), String> {
        let bad = |field: &str, why: &str| Err(format!("{field}: {why}"));
        if self.nodes == 0 {
            return bad("nodes", "must be at least 1");
        }
        if self.duration_s == 0 || self.sample_ms == 0 {
            return bad("duration_s", "duration_s and sample_ms must be positive");
        }
        if !(0.0..1.0).contains(&self.network.loss) || !(0.0..1.0).contains(&self.network.duplicate)
        {
            return bad("network.loss", "loss and duplicate are probabilities below 1");
        }
        if self.network.latency_ms_max < self.network.latency_ms_min {
            return bad("network.latency_ms_max", "must be at least latency_ms_min");
        }
        if self.workload.conversations == 0 || self.workload.turns_per_s < 0.0 {
            return bad("workload.conversations", "need conversations > 0 and turns_per_s >= 0");
        }
        if self.service.workers_per_node == 0 || self.service.bots.is_empty() {
            return bad("service.workers_per_node", "need workers and at least one bot");
        }
        if self.service.bots.iter().any(|b| b.share <= 0.0 || b.mean_ms < 0.0) {
            return bad("service.bots", "shares must be positive and means non-negative");
        }
        if self.replication.factor == 0 || self.replication.write_quorum > self.replication.factor {
            return bad("replication.write_quorum", "need 1 <= write_quorum <= factor");
        }
        let mut placement = botclaw_config::PlacementConfig::default();
        placement.shard_count = self.placement.shard_count;
        placement.vnodes = self.placement.vnodes;
        placement.bound_epsilon_permille = self.placement.bound_epsilon_permille;
        placement.validate().map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_states_only_what_it_studies() {
        let s = Scenario::from_toml(
            r#"
name = "crash"
nodes = 7
[network]
loss = 0.05
[[faults]]
at_s = 10
kind = "crash"
nodes = [3]
[[faults]]
at_s = 20
kind = "restart"
nodes = [3]
"#,
        )
        .unwrap();
        assert_eq!(s.nodes, 7);
        assert_eq!(s.faults[0].kind, FaultKind::Crash { nodes: vec![3] });
        assert_eq!(s.workload, Workload::default());
        let err = Scenario::from_toml("name = \"x\"\nnodez = 3\n").unwrap_err();
        assert!(err.contains("nodez"), "{err}");
        let err = Scenario::from_toml("name = \"x\"\n[network]\nloss = 1.5\n").unwrap_err();
        assert!(err.contains("network.loss"), "{err}");
    }
}
