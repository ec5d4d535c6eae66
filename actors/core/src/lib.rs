//! botclaw's pure core: the decisions of a cluster node, as state machines that do no IO.
//!
//! Nothing in this crate opens a socket, reads a clock, spawns a task or draws from an
//! unseeded random source. Time arrives as timer events the driver delivers; randomness
//! is a seed the driver passes in; outputs are values the driver executes. The real node
//! (`node/`) and the simulator (`simulations/`) drive the same code. CI checks that this
//! crate's dependency tree contains neither tokio nor ractor.
//!
//! Layout:
//! - [`identity`]: who a node is on the wire (addresses, process incarnation, rejoin bump);
//! - [`auth`]: HMAC-SHA256 sealing of every gossip datagram with the cluster secret;
//! - [`membership`]: SWIM membership (foca) behind authenticated packets, re-announcing to
//!   seeds until joined, with a closed [`membership::Effect`] output;
//! - [`links`]: which inter-node sessions to dial or drop given membership;
//! - [`handoff`]: where a request goes while ownership changes hands, and holding it;
//! - [`load`]: load summaries spread as foca custom broadcasts;
//! - [`placement`]: conversation -> shard -> owner on a consistent-hash ring;
//! - [`conversation`]: a conversation's state and the rules of a turn (retries, window);
//! - [`replication`]: epochs, versions, what a replica accepts, keep-majority;
//! - [`rebalance`]: which shards an overloaded node gives to which underloaded node;
//! - [`roles`]: which node serves a bot module's request (catalog, weather);
//! - [`controller`]: the placement controller, a Raft group (raft-rs, sans-IO) whose
//!   committed log builds the shard map on every member;
//! - [`ownership`]: a node's side of the shards it owns or follows: writes acknowledged
//!   once every in-sync member holds them, learners streamed and promoted;
//! - [`shardmap`]: the authoritative shard map (owner, in-sync replicas, learners per
//!   shard), applied from the placement controller's log.

pub mod auth;
pub mod controller;
pub mod conversation;
pub mod flags;
pub mod fuzz;
pub mod handoff;
pub mod identity;
pub mod links;
pub mod load;
pub mod membership;
pub mod ownership;
pub mod placement;
pub mod rebalance;
pub mod replication;
pub mod roles;
pub mod services;
pub mod shardmap;

pub use identity::NodeId;
pub use membership::{Effect, MemberState, MemberView, Membership, MembershipTimer};
