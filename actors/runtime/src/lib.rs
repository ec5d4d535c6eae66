//! botclaw's thin actor layer on ractor.
//!
//! Layout:
//! - [`router`]: the one remotable actor per node; peers send it cross-node traffic;
//! - [`forwarder`]: batches of forwarded requests and their answers, per peer;
//! - [`host`]: the registry of active conversations, activation, passivation, and the
//!   supervisor that restarts failed conversation actors;
//! - [`conversation`]: one actor per active conversation, turns one at a time;
//! - [`envelope`]: requests to and outcomes from a conversation, local or over the wire,
//!   and [`envelope::Reply`], which always answers;
//! - [`bot`]: the `Bot` trait users implement, and [`bots`]: the built-in bots;
//! - [`replicator`]: taking ownership of a conversation, writing turns to its replicas,
//!   serving peers' ops; [`store`]: `StateStore` (memory, redb);
//! - [`backends`]: the services bots call; [`modules`]: the module services (catalog,
//!   weather) placed by node role; [`shared_cache`]: the node-wide cache of backend
//!   answers with request coalescing;
//! - [`controller_log`]: the placement controller's durable log (not used by the node yet);
//! - [`metrics`]: counters the node exports.
//!
//! Actors hold no decision logic of the cluster: they call `botclaw-core` and execute.

pub mod backends;
pub mod bot;
pub mod bots;
pub mod controller_log;
pub mod conversation;
pub mod envelope;
pub mod forwarder;
pub mod host;
pub mod metrics;
pub mod module_services;
pub mod modules;
pub mod replicator;
pub mod router;
pub mod services;
pub mod shards;
pub mod shared_cache;
pub mod store;

#[cfg(test)]
mod fuzz_tests;

pub use router::{RouterActor, RouterArgs, RouterMessage};
