//! Deterministic simulation of botclaw's pure core.
//!
//! The simulator runs the same state machines as the real node ([`botclaw_core`]) on
//! simulated time and a simulated network, in one thread, with no IO. Same scenario and
//! seed give the same results, byte for byte.
//!
//! Layout:
//! - [`authority`]: the authoritative placement protocol (the real controller, planner and
//!   ownership machines of every node, on simulated time) with its checkers;
//! - [`by_map`]: a scenario run on that protocol (what a node runs by default):
//!   `botclaw sim --model map`, the default;
//! - [`net`]: a simulated datagram network (latency range, loss, duplication, partitions)
//!   of real [`botclaw_core::Membership`] state machines, with crash, freeze and leave;
//! - [`scenario`]: scenario files (TOML): nodes, network, placement strategy, rebalancing,
//!   workload, service times, scheduled faults;
//! - [`world`]: the ring-based cluster model that runs a scenario (`--model ring`):
//!   membership, per-node placement views, routing with the handoff rule, the rebalancer,
//!   conversation replicas with epochs, and the checkers;
//! - [`report`]: the JSON summary, CSV time series and SVG plots of a run;
//! - [`timeline`]: events in (time, submission) order, shared by the models;
//! - [`writes`]: the writes a simulated store holds of a shard;
//! - [`study`]: runs compared: a scenario with one setting changed (a sweep), statistics
//!   across seeds, a sweep's CSV and plots.

pub mod authority;
pub mod by_map;
pub mod net;
pub mod report;
pub mod scenario;
pub mod study;
pub mod timeline;
pub mod world;
pub mod writes;

/// Runs `scenario` with `seed`; `progress` gets the fraction of simulated time done.
pub fn run(scenario: scenario::Scenario, seed: u64, progress: impl FnMut(f64)) -> report::Report {
    world::World::new(scenario, seed).run(progress)
}
