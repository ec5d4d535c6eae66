//! The botclaw chat protocol and a Rust client for it.
//!
//! The protocol is public: one JSON object per line over TCP, field `op` names the
//! operation. Any language can speak it; this crate is the reference.
//!
//! Layout:
//! - [`protocol`]: request and response types, error codes, validation;
//! - [`codec`]: a pure line framer that never touches a socket and tells "need more bytes"
//!   apart from "line too long";
//! - [`client`]: an async client with pipelining and retries (same id) on `busy`,
//!   `unavailable` and `timeout`;
//! - [`cluster`]: a client that fails over to other nodes from `topology` and resends
//!   unacknowledged turns with their ids.

pub mod client;
pub mod cluster;
pub mod codec;
pub mod protocol;

pub use client::{Client, ClientError, ClientOptions, SayReply};
pub use cluster::{FailoverClient, FailoverOptions};
pub use protocol::{ErrorCode, Request, Response};
