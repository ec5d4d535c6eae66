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

pub use client::{Client, ClientError, ClientOptions, ClientTls, SayReply};
pub use cluster::{FailoverClient, FailoverOptions};
pub use protocol::{ErrorCode, Request, Response};

/// A new conversation id that nobody can guess: `c-` and 128 random bits (rand's thread
/// generator, a CSPRNG seeded by the operating system). Without client tokens, knowing an
/// id is what lets a client read a conversation.
pub fn new_conversation_id() -> String {
    format!("c-{}", hex::encode(rand::random::<[u8; 16]>()))
}

#[cfg(test)]
mod id_tests {
    #[test]
    fn conversation_ids_carry_128_random_bits() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| super::new_conversation_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let hex = id.strip_prefix("c-").expect("prefixed");
            assert_eq!(hex.len(), 32, "{id}");
            assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
    }
}
