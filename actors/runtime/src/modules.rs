//! Bot modules that do heavy work (catalog search, weather lookups) as services placed by
//! node role.
//!
//! A node with a module's role runs one [`ModuleActor`] for it, supervised like any actor;
//! it serves module requests from this node's bots and from peers' (which arrive through
//! the router, batched like conversation traffic). A node without the role sends its bots'
//! requests to a node with it (`botclaw_core::roles::pick`), so adding a `catalog` node
//! adds catalog capacity and nothing else. The actor bounds the requests it runs at once;
//! beyond that it answers `busy`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};

use crate::backends::{Backends, Forecast, Product};
use crate::envelope::{ConvOutcome, FailKind, Reply};
use crate::store::BoxFuture;

/// A module call, as it crosses nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModuleRequest {
    CatalogSearch { query: String },
    Weather { city: String },
}

impl ModuleRequest {
    /// The role a node needs to serve this request.
    pub fn role(&self) -> &'static str {
        match self {
            ModuleRequest::CatalogSearch { .. } => botclaw_core::roles::CATALOG,
            ModuleRequest::Weather { .. } => botclaw_core::roles::WEATHER,
        }
    }

    /// What decides the serving node (equal keys go to the same node).
    pub fn key(&self) -> &str {
        match self {
            ModuleRequest::CatalogSearch { query } => query,
            ModuleRequest::Weather { city } => city,
        }
    }

    pub fn weight(&self) -> usize {
        self.key().len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModuleAnswer {
    Products(Vec<Product>),
    Forecast(Forecast),
}

impl ModuleAnswer {
    pub fn weight(&self) -> usize {
        match self {
            ModuleAnswer::Products(p) => p.iter().map(|p| 32 + p.name.len() + p.sku.len()).sum(),
            ModuleAnswer::Forecast(f) => 16 + f.city.len() + f.condition.len(),
        }
    }
}

/// Sends a module request to a node with its role (implemented by the node).
pub trait ModuleRouter: Send + Sync + 'static {
    fn call(&self, request: ModuleRequest) -> BoxFuture<'static, Result<ModuleAnswer, String>>;
}

pub enum ModuleMsg {
    /// Run a request; the answer is a `ConvOutcome::Module` (or a failure).
    Call(ModuleRequest, Reply),
}

impl ractor::Message for ModuleMsg {}

/// Counters of one module service (shared with the node's metrics).
#[derive(Debug, Clone, Default)]
pub struct ModuleStats {
    /// Requests served since the node started.
    pub served: Counter,
    /// Requests refused because too many ran at once.
    pub refused: Counter,
}

pub struct ModuleArgs {
    pub role: &'static str,
    pub backends: Arc<Backends>,
    /// Requests run at once, at most; more are answered `busy`.
    pub inflight_max: usize,
    pub stats: ModuleStats,
}

/// The service of one module role on this node.
pub struct ModuleActor;

pub struct ModuleState {
    args: ModuleArgs,
    inflight: Arc<AtomicUsize>,
}

impl Actor for ModuleActor {
    type Msg = ModuleMsg;
    type State = ModuleState;
    type Arguments = ModuleArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<ModuleMsg>,
        args: ModuleArgs,
    ) -> Result<ModuleState, ActorProcessingErr> {
        Ok(ModuleState { args, inflight: Arc::default() })
    }

    async fn handle(
        &self,
        _me: ActorRef<ModuleMsg>,
        msg: ModuleMsg,
        s: &mut ModuleState,
    ) -> Result<(), ActorProcessingErr> {
        let ModuleMsg::Call(request, reply) = msg;
        if request.role() != s.args.role {
            let message = format!("the {} module does not serve {request:?}", s.args.role);
            reply.send(ConvOutcome::failed(FailKind::BadRequest, message));
            return Ok(());
        }
        if s.inflight.fetch_add(1, Ordering::AcqRel) >= s.args.inflight_max {
            s.inflight.fetch_sub(1, Ordering::AcqRel);
            s.args.stats.refused.inc();
            reply.send(ConvOutcome::Failed {
                kind: FailKind::Busy,
                message: format!("the {} module is at its limit of requests", s.args.role),
                retry_after_ms: Some(100),
            });
            return Ok(());
        }
        // The backend call waits (network latency); the actor goes on with the next one.
        let (backends, inflight, stats) =
            (s.args.backends.clone(), s.inflight.clone(), s.args.stats.clone());
        tokio::spawn(async move {
            let answer = backends.serve(request).await;
            inflight.fetch_sub(1, Ordering::AcqRel);
            stats.served.inc();
            reply.send(ConvOutcome::Module(answer));
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botclaw_config::BackendConfig;
    use tokio::sync::oneshot;

    async fn call(actor: &ActorRef<ModuleMsg>, request: ModuleRequest) -> ConvOutcome {
        let (tx, rx) = oneshot::channel();
        actor.cast(ModuleMsg::Call(request, Reply::new(move |o| drop(tx.send(o))))).unwrap();
        rx.await.unwrap()
    }

    #[tokio::test]
    async fn serves_its_role_within_its_limit() {
        let metrics = crate::metrics::ConversationMetrics::default();
        let cfg = BackendConfig { catalog_latency_ms: 200, ..BackendConfig::default() };
        let stats = ModuleStats::default();
        let args = ModuleArgs {
            role: botclaw_core::roles::CATALOG,
            backends: Backends::new(&cfg, metrics),
            inflight_max: 1,
            stats: stats.clone(),
        };
        let (actor, _) = Actor::spawn(None, ModuleActor, args).await.unwrap();
        let search = || ModuleRequest::CatalogSearch { query: "a mouse and a desk".into() };
        let first = tokio::spawn({
            let actor = actor.clone();
            async move { call(&actor, search()).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // One runs (200 ms): a second at once is refused, not queued without bound.
        assert!(matches!(
            call(&actor, search()).await,
            ConvOutcome::Failed { kind: FailKind::Busy, .. }
        ));
        match first.await.unwrap() {
            ConvOutcome::Module(ModuleAnswer::Products(p)) => {
                let names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
                assert_eq!(names, ["mouse", "desk"]);
            }
            other => panic!("{other:?}"),
        }
        let weather = ModuleRequest::Weather { city: "Oslo".into() };
        assert!(matches!(
            call(&actor, weather).await,
            ConvOutcome::Failed { kind: FailKind::BadRequest, .. }
        ));
        assert_eq!(stats.served.get(), 1);
        assert_eq!(stats.refused.get(), 1);
    }
}
