//! The botclaw node: drivers that connect the pure core to sockets, timers and actors,
//! plus the operator CLI.
//!
//! Layout:
//! - [`cli`]: the `botclaw` command (node, up, status, chat, bench);
//! - [`chat`]: the REPL; [`bench`]: the load generator with its baseline echo server;
//! - [`node`]: `run(config, shutdown)`, one node's lifetime;
//! - [`gossip`]: the UDP driver of the membership state machine;
//! - [`addrs`]: names resolved, advertised addresses, incarnation, remembered members;
//! - [`links`]: keeps ractor_cluster sessions in step with membership;
//! - [`controller`]: the placement controller's Raft member, its log and the leader's round;
//! - [`frontend`]: the chat protocol listener (JSON lines, and WebSocket through
//!   [`websocket`]); [`routing`]: placement and dispatch;
//! - [`admission`]: one bound on every kind of work in flight on the node;
//! - [`shards`]: routing and replication by the controller's map;
//! - [`modules`]: bot module services placed by node role (catalog, weather);
//! - [`flags`]: `botclaw flags`, the cluster's feature flags through the admin port;
//! - [`admin`]: the admin HTTP port (health, status, metrics, placement, link ping);
//! - [`metrics`]: Prometheus metrics;
//! - [`up`]: the local N-node launcher; [`status`]: the status table;
//! - [`sim`]: `botclaw sim`, the simulation scenarios' runner.

pub mod addrs;
pub mod admin;
pub mod admission;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod console;
pub mod controller;
pub mod flags;
pub mod frontend;
pub mod gossip;
pub mod http;
pub mod links;
pub mod metrics;
pub mod modules;
pub mod node;
pub mod routing;
pub mod shards;
pub mod sim;
pub mod status;
pub mod tls;
pub mod up;
pub mod websocket;
