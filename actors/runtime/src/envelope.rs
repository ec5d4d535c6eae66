//! Requests to a conversation and their outcomes, for the local path (a closure) and the
//! cross-node path (postcard bytes through the router).

use std::sync::Arc;

use crate::modules::{ModuleAnswer, ModuleRequest};
use crate::replicator::ReplicaAnswer;
use crate::store::StoreOp;
use botclaw_core::conversation::TurnRecord;
use serde::{Deserialize, Serialize};

/// What a client asks of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConvRequest {
    Say {
        id: String,
        text: String,
        bot: Option<String>,
        user: Option<String>,
    },
    /// The last `limit` kept turns before turn `before` (all kept turns when `None`),
    /// oldest first, at most the node's `history_bytes_max` of them.
    History {
        limit: u32,
        before: Option<u64>,
    },
    /// An owner's op for this node's copy of the conversation (replication).
    Replica(StoreOp),
    /// A bot module's request for this node's module service (the envelope's `conv` is
    /// the request's key).
    Module(ModuleRequest),
}

/// A request addressed to a conversation, as it crosses nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub conv: String,
    pub request: ConvRequest,
    /// Forward hops taken so far; a node never forwards an envelope that already hopped.
    pub hops: u8,
}

/// Why a request failed; maps one-to-one onto protocol error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailKind {
    BadRequest,
    Busy,
    Unavailable,
    Timeout,
    Internal,
    /// A turn, or the state it would leave, is over the conversation's byte limits.
    TooLarge,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConvOutcome {
    Reply {
        messages: Vec<String>,
        turn: u64,
        node: Arc<str>,
    },
    History {
        turns: Vec<TurnRecord>,
        /// Older kept turns were left out (by `limit` or by bytes): ask again with `before`
        /// set to the first turn returned.
        more: bool,
        node: Arc<str>,
    },
    Failed {
        kind: FailKind,
        message: String,
        retry_after_ms: Option<u64>,
    },
    /// A replica's answer to a [`ConvRequest::Replica`] op.
    Replica(ReplicaAnswer),
    /// A module service's answer to a [`ConvRequest::Module`] request.
    Module(ModuleAnswer),
}

impl ConvOutcome {
    pub fn failed(kind: FailKind, message: impl Into<String>) -> ConvOutcome {
        ConvOutcome::Failed { kind, message: message.into(), retry_after_ms: None }
    }

    /// Encodes for the wire. Encoding these types cannot fail.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("outcomes always encode")
    }

    /// Decodes bytes from a peer; junk becomes an `internal` failure, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> ConvOutcome {
        postcard::from_bytes(bytes).unwrap_or_else(|e| {
            ConvOutcome::failed(FailKind::Internal, format!("undecodable answer from peer: {e}"))
        })
    }
}

impl Envelope {
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("envelopes always encode")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Envelope, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

type ReplyFn = Box<dyn FnOnce(ConvOutcome) + Send>;

/// Where an outcome goes. Every request gets exactly one answer: a `Reply` dropped without
/// one (its actor died with the request queued, a peer went away) answers `internal`.
pub struct Reply(Option<ReplyFn>);

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Reply(pending)" } else { "Reply(sent)" })
    }
}

impl Reply {
    pub fn new(f: impl FnOnce(ConvOutcome) + Send + 'static) -> Reply {
        Reply(Some(Box::new(f)))
    }

    pub fn send(mut self, outcome: ConvOutcome) {
        if let Some(f) = self.0.take() {
            f(outcome);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            // Outcome unknown (the request may or may not have run): retryable.
            f(ConvOutcome::Failed {
                kind: FailKind::Unavailable,
                message: "the conversation stopped before answering".into(),
                retry_after_ms: Some(100),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn dropped_reply_answers_unavailable() {
        let got = Arc::new(Mutex::new(None));
        let sink = got.clone();
        drop(Reply::new(move |o| *sink.lock().unwrap() = Some(o)));
        assert!(matches!(
            got.lock().unwrap().take(),
            Some(ConvOutcome::Failed { kind: FailKind::Unavailable, .. })
        ));
    }

    #[test]
    fn outcomes_round_trip_and_junk_is_contained() {
        let o = ConvOutcome::Reply { messages: vec!["x".into()], turn: 7, node: "n".into() };
        assert_eq!(ConvOutcome::from_bytes(&o.to_bytes()), o);
        assert!(matches!(
            ConvOutcome::from_bytes(&[0xff, 0xff, 0xff]),
            ConvOutcome::Failed { kind: FailKind::Internal, .. }
        ));
        let e = Envelope {
            conv: "c".into(),
            request: ConvRequest::History { limit: 3, before: Some(9) },
            hops: 1,
        };
        assert_eq!(Envelope::from_bytes(&e.to_bytes()).unwrap(), e);
        assert!(Envelope::from_bytes(&[0xff; 3]).is_err());
    }
}
