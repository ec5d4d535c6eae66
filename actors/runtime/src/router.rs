//! The per-node router actor, the only remotable actor a node exposes.
//!
//! Cross-node conversation traffic travels in batches (see [`crate::forwarder`]): a gateway
//! casts `Requests` (envelopes) to the owner's router, which hands each to the node's
//! [`Inbound`] handler; answers come back to the gateway's router as `Outcomes`. Casts from
//! one queue per peer go over the one session to that peer, so a conversation's turns
//! keep their order.
//!
//! Remote-capable actors are mirrored on every connected peer, so a node exposes exactly
//! one: conversation actors stay local. Each router joins two `ractor::pg` groups, one for
//! all routers and one for its own node name, so a peer can address one node's router
//! without knowing ractor's per-session node ids.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

use crate::envelope::{ConvOutcome, Envelope, Reply};
use crate::forwarder::{Batch, Forwarder};

/// What a node does with envelopes that peers send it.
pub trait Inbound: Send + Sync + 'static {
    fn handle(&self, envelope: Envelope, reply: Reply);
    /// A message for the placement controller.
    fn controller(&self, bytes: Vec<u8>);
    /// A batch for the shard replicator.
    fn shards(&self, bytes: Vec<u8>);
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
    /// Requests for conversations this node owns: a postcard `Batch<Envelope>`.
    Requests(Vec<u8>),
    /// Answers to requests this node forwarded: a postcard `Batch<ConvOutcome>`.
    Outcomes(Vec<u8>),
    /// For the placement controller (Raft messages, proposals), handed over undecoded.
    Controller(Vec<u8>),
    /// For the shard replicator: a postcard `shards::PeerBatch`, handed over undecoded.
    Shards(Vec<u8>),
}

#[derive(Clone)]
pub struct RouterArgs {
    /// Operator-chosen node name (the pg group key).
    pub node_name: String,
    /// `name@incarnation`, the process's name on links.
    pub link_name: String,
    pub inbound: Arc<dyn Inbound>,
    pub forwarder: Arc<Forwarder>,
}

#[derive(Debug)]
pub struct RouterActor;

pub struct RouterState {
    link_name: String,
    pings: u64,
    inbound: Arc<dyn Inbound>,
    forwarder: Arc<Forwarder>,
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
        Ok(RouterState {
            link_name: args.link_name,
            pings: 0,
            inbound: args.inbound,
            forwarder: args.forwarder,
        })
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
            RouterMessage::Requests(bytes) => match Batch::<Envelope>::from_bytes(&bytes) {
                Ok(batch) => {
                    for (id, envelope) in batch.items {
                        let reply = state.forwarder.answer_to(&batch.from, id);
                        state.inbound.handle(envelope, reply);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, len = bytes.len(), "undecodable request batch from a peer")
                }
            },
            RouterMessage::Outcomes(bytes) => match Batch::<ConvOutcome>::from_bytes(&bytes) {
                Ok(batch) => state.forwarder.deliver(batch),
                Err(e) => {
                    tracing::warn!(error = %e, len = bytes.len(), "undecodable answer batch from a peer")
                }
            },
            RouterMessage::Controller(bytes) => state.inbound.controller(bytes),
            RouterMessage::Shards(bytes) => state.inbound.shards(bytes),
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
///
/// Looked up in `ractor::pg` once per link, not per message (a lookup formats the group
/// name and clones the group under pg's global lock): the reference is kept until the
/// session it came over stops.
pub fn remote_router(node_name: &str) -> Option<ActorRef<RouterMessage>> {
    use std::collections::HashMap;
    use std::sync::{LazyLock, RwLock};
    static KNOWN: LazyLock<RwLock<HashMap<String, ActorRef<RouterMessage>>>> =
        LazyLock::new(Default::default);
    let live = |r: &ActorRef<RouterMessage>| {
        !matches!(r.get_status(), ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped)
    };
    if let Some(r) = KNOWN.read().expect("routers lock").get(node_name).filter(|r| live(r)) {
        return Some(r.clone());
    }
    let found: Option<ActorRef<RouterMessage>> = ractor::pg::get_members(&router_group(node_name))
        .into_iter()
        .find(|cell: &ActorCell| !cell.get_id().is_local() && live(&ActorRef::from(cell.clone())))
        .map(ActorRef::from);
    let mut known = KNOWN.write().expect("routers lock");
    match &found {
        Some(r) => drop(known.insert(node_name.to_string(), r.clone())),
        None => drop(known.remove(node_name)),
    }
    found
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
