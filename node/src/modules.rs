//! Bot modules placed by node role: this node's module services, and where its bots'
//! module requests go (see `botclaw_actors::modules` and `botclaw_core::roles`).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use botclaw_actors::backends::Backends;
use botclaw_actors::envelope::{ConvOutcome, ConvRequest, Envelope, FailKind, Reply};
use botclaw_actors::forwarder::Forwarder;
use botclaw_actors::modules::{
    ModuleActor, ModuleAnswer, ModuleArgs, ModuleMsg, ModuleRequest, ModuleRouter, ModuleStats,
};
use botclaw_actors::store::BoxFuture;
use botclaw_core::roles::{self, CATALOG, WEATHER};
use botclaw_core::MemberState;
use ractor::{Actor, ActorRef};
use tokio::sync::{oneshot, watch};

use crate::gossip::ClusterView;
use crate::metrics::{Metrics, ModuleCallLabel, RoleLabel};

/// The module roles this binary knows.
pub const MODULE_ROLES: [&str; 2] = [CATALOG, WEATHER];

pub struct NodeModules {
    me: Arc<str>,
    view: watch::Receiver<ClusterView>,
    /// This node's module services, by role (only the roles it declares).
    local: BTreeMap<&'static str, ActorRef<ModuleMsg>>,
    forwarder: Arc<Forwarder>,
    metrics: Metrics,
}

impl NodeModules {
    /// Starts a module service for each module role this node declares.
    pub async fn start(
        me: Arc<str>,
        my_roles: &[String],
        backends: Arc<Backends>,
        inflight_max: usize,
        view: watch::Receiver<ClusterView>,
        forwarder: Arc<Forwarder>,
        metrics: Metrics,
    ) -> Result<Arc<NodeModules>> {
        let mut local = BTreeMap::new();
        for role in MODULE_ROLES.into_iter().filter(|r| my_roles.iter().any(|m| m == r)) {
            let label = RoleLabel { role: role.to_string() };
            let stats = ModuleStats {
                served: metrics.module_served.get_or_create(&label).clone(),
                refused: metrics.module_refused.get_or_create(&label).clone(),
            };
            let args = ModuleArgs { role, backends: backends.clone(), inflight_max, stats };
            let (actor, _) = Actor::spawn(None, ModuleActor, args)
                .await
                .with_context(|| format!("cannot start the {role} module"))?;
            local.insert(role, actor);
        }
        Ok(Arc::new(NodeModules { me, view, local, forwarder, metrics }))
    }

    /// Roles whose services run here.
    pub fn local_roles(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.local.keys().copied()
    }

    /// Module requests served here so far, by role.
    pub fn served(&self) -> Vec<(String, u64)> {
        self.local_roles()
            .map(|role| {
                let label = RoleLabel { role: role.to_string() };
                (role.to_string(), self.metrics.module_served.get_or_create(&label).get())
            })
            .collect()
    }

    /// Runs a request on this node's service for its role (a peer's, or our bots').
    pub fn serve(&self, request: ModuleRequest, reply: Reply) {
        match self.local.get(request.role()) {
            Some(actor) => {
                if let Err(e) = actor.cast(ModuleMsg::Call(request, reply)) {
                    // The message (and its reply, which answers when dropped) is gone.
                    tracing::error!(error = %e, "a module service is not running");
                }
            }
            None => reply.send(ConvOutcome::failed(
                FailKind::Unavailable,
                format!("this node does not have the {} role", request.role()),
            )),
        }
    }

    /// The node that serves `request`: this one if it has the role, else one chosen by the
    /// request's key among the live members with the role.
    fn target(&self, request: &ModuleRequest) -> Option<String> {
        let role = request.role();
        if self.local.contains_key(role) {
            return Some(self.me.to_string());
        }
        let view = self.view.borrow();
        let candidates = view
            .members
            .iter()
            .filter(|m| m.state != MemberState::Down && m.id.has_role(role))
            .map(|m| m.id.name.as_str());
        roles::pick(request.key(), &self.me, candidates).map(String::from)
    }
}

impl ModuleRouter for NodeModules {
    fn call(&self, request: ModuleRequest) -> BoxFuture<'static, Result<ModuleAnswer, String>> {
        let role = request.role();
        let Some(target) = self.target(&request) else {
            return Box::pin(async move { Err(format!("no node has the {role} role")) });
        };
        let (tx, rx) = oneshot::channel();
        let reply = Reply::new(move |o| drop(tx.send(o)));
        let local = *target == *self.me;
        let label = ModuleCallLabel {
            role: role.to_string(),
            route: if local { "local" } else { "remote" }.to_string(),
        };
        self.metrics.module_calls.get_or_create(&label).inc();
        let timer = self.metrics.module_call_seconds.0.get_or_create(&label).clone();
        let started = std::time::Instant::now();
        if local {
            self.serve(request, reply);
        } else {
            let conv = request.key().to_string();
            let envelope = Envelope { conv, request: ConvRequest::Module(request), hops: 1 };
            self.forwarder.forward(&target, envelope, reply);
        }
        Box::pin(async move {
            let outcome = rx.await;
            timer.observe(started.elapsed().as_secs_f64());
            match outcome {
                Ok(ConvOutcome::Module(answer)) => Ok(answer),
                Ok(ConvOutcome::Failed { message, .. }) => {
                    Err(format!("{role} module on {target}: {message}"))
                }
                Ok(other) => Err(format!("unexpected answer from the {role} module: {other:?}")),
                Err(_) => Err(format!("the {role} module on {target} did not answer")),
            }
        })
    }
}
