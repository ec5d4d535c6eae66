//! Deterministic simulation of botclaw's pure core.
//!
//! The simulator runs the same state machines as the real node ([`botclaw_core`]) on
//! simulated time and a simulated network, in one thread, with no IO. Same inputs and seeds
//! give the same trace, byte for byte.
//!
//! Layout:
//! - [`net`]: a simulated datagram network with per-packet latency, crash, freeze and
//!   leave, delivering each node's timers in deadline order.
//!
//! Workloads, scenarios files, strategies and reports arrive with the simulation issue;
//! today the membership tests of the core run on [`net::SimNet`].

pub mod net;
