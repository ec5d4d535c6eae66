//! The per-node router actor, the only remotable actor a node exposes.
//!
//! Cross-node conversation traffic is an [`Envelope`] (postcard bytes) sent to the owner's
//! router, which hands it to the node's [`Inbound`] handler; the answer travels back as
//! [`ConvOutcome`] bytes. A gateway sends envelopes with a non-blocking cast, in request
//! order, over the one session to the owner, so turns of a conversation keep their order.
//!
//! Remote-capable actors are mirrored on every connected peer, so a node exposes exactly
//! one: conversation actors stay local. Each router joins two `ractor::pg` groups, one for
//! all routers and one for its own node name, so a peer can address one node's router
//! without knowing ractor's per-session node ids.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

use crate::envelope::{ConvOutcome, Envelope, FailKind, Reply};

/// What a node does with envelopes that peers send it.
pub trait Inbound: Send + Sync + 'static {
    fn handle(&self, envelope: Envelope, reply: Reply);
}

/// Group every router joins.
pub const ALL_ROUTERS_GROUP: &str = "botclaw.router";

/// Group of the router of the node called `node_name`.
pub fn router_group(node_name: &str) -> String {
    format!("botclaw.router/{node_name}")
}

/// Messages a router accepts, locally or from peers. Every field is encoded by ractor's
/// `BytesConvertable` for strings, which cannot fail on decode of valid UTF-8.
#[derive(RactorClusterMessage)]
pub enum RouterMessage {
    /// Link check: the caller names itself; the reply is this node's link name.
    #[rpc]
    Ping(String, RpcReplyPort<String>),
    /// A conversation request: postcard [`Envelope`] in, postcard [`ConvOutcome`] out.
    #[rpc]
    Turn(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

#[derive(Clone)]
pub struct RouterArgs {
    /// Operator-chosen node name (the pg group key).
    pub node_name: String,
    /// `name@incarnation`, the process's name on links.
    pub link_name: String,
    pub inbound: Arc<dyn Inbound>,
}

#[derive(Debug)]
pub struct RouterActor;

pub struct RouterState {
    link_name: String,
    pings: u64,
    inbound: Arc<dyn Inbound>,
}

impl Actor for RouterActor {
    type Msg = RouterMessage;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        me: ActorRef<Self::Msg>,
        args: RouterArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        ractor::pg::join(ALL_ROUTERS_GROUP.to_string(), vec![me.get_cell()]);
        ractor::pg::join(router_group(&args.node_name), vec![me.get_cell()]);
        Ok(RouterState { link_name: args.link_name, pings: 0, inbound: args.inbound })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: RouterMessage,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMessage::Ping(from, reply) => {
                state.pings += 1;
                tracing::debug!(%from, pings = state.pings, "link ping");
                // The caller may have given up (timeout); nothing to do then.
                let _ = reply.send(state.link_name.clone());
            }
            RouterMessage::Turn(bytes, port) => {
                let reply = Reply::new(move |outcome: ConvOutcome| {
                    // The gateway may have timed out and gone; nothing to do then.
                    let _ = port.send(outcome.to_bytes());
                });
                match Envelope::from_bytes(&bytes) {
                    Ok(envelope) => state.inbound.handle(envelope, reply),
                    Err(e) => {
                        tracing::warn!(error = %e, len = bytes.len(), "undecodable envelope from a peer");
                        reply.send(ConvOutcome::failed(
                            FailKind::BadRequest,
                            format!("undecodable envelope: {e}"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why a cross-node call failed. ractor_cluster reports failures vaguely (a timed-out
/// call may surface as a timeout or a sender error), so callers treat both as "unknown".
#[derive(Debug)]
pub enum CallError {
    NoRoute(String),
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NoRoute(node) => write!(f, "no link to node {node}"),
            CallError::Failed(reason) => write!(f, "call failed: {reason}"),
        }
    }
}

/// The router of `node_name` on a linked peer, if the link is up and its groups synced.
pub fn remote_router(node_name: &str) -> Option<ActorRef<RouterMessage>> {
    ractor::pg::get_members(&router_group(node_name))
        .into_iter()
        .find(|cell: &ActorCell| !cell.get_id().is_local())
        .map(ActorRef::from)
}

/// Calls the router of `node_name` across the link and returns the link name it reports.
pub async fn ping(node_name: &str, me: &str, timeout: Duration) -> Result<String, CallError> {
    let router = remote_router(node_name).ok_or_else(|| CallError::NoRoute(node_name.into()))?;
    let me = me.to_string();
    match router.call(|reply| RouterMessage::Ping(me, reply), Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(name)) => Ok(name),
        Ok(ractor::rpc::CallResult::Timeout) => Err(CallError::Failed("timeout".into())),
        Ok(ractor::rpc::CallResult::SenderError) => Err(CallError::Failed("link dropped".into())),
        Err(e) => Err(CallError::Failed(e.to_string())),
    }
}

impl std::error::Error for CallError {}

/// Sends `envelope` to the router of `node_name` and routes its answer to `reply`.
///
/// The send happens before this returns, so envelopes sent one after another reach the peer
/// in that order. The answer is awaited on a task; no answer within `timeout` (or a dropped
/// link) answers `timeout` / `unavailable`: the outcome of the request is then unknown and
/// a client retry with the same id is safe.
pub fn forward(node_name: &str, envelope: &Envelope, reply: Reply, timeout: Duration) {
    let Some(router) = remote_router(node_name) else {
        reply.send(ConvOutcome::Failed {
            kind: FailKind::Unavailable,
            message: format!("no link to {node_name} yet"),
            retry_after_ms: Some(100),
        });
        return;
    };
    let (tx, rx) = ractor::concurrency::oneshot();
    if router.cast(RouterMessage::Turn(envelope.to_bytes(), RpcReplyPort::from(tx))).is_err() {
        reply.send(ConvOutcome::Failed {
            kind: FailKind::Unavailable,
            message: format!("link to {node_name} is down"),
            retry_after_ms: Some(100),
        });
        return;
    }
    tokio::spawn(async move {
        let outcome = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(bytes)) => ConvOutcome::from_bytes(&bytes),
            Ok(Err(_)) => ConvOutcome::Failed {
                kind: FailKind::Unavailable,
                message: "the owner's link dropped before it answered".into(),
                retry_after_ms: Some(100),
            },
            Err(_) => ConvOutcome::failed(FailKind::Timeout, "the owner did not answer in time"),
        };
        reply.send(outcome);
    });
}
