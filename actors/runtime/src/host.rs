//! The conversations hosted on this node: registry, activation, passivation, supervision.
//!
//! The registry maps a conversation id to its live actor. [`ConversationHost::dispatch`]
//! sends a request to it under the registry's lock, counting it in the handle's `sent`;
//! an idle actor leaves the registry only if it has handled everything sent (see
//! `ConvActorState::try_unregister`), so passivation never loses a request. A missing
//! actor is spawned at once (`spawn_linked_instant`: requests queue while it loads its
//! state), so requests keep their order.
//!
//! The supervisor overrides ractor's default of stopping when a child fails: it drops the
//! failed actor from the registry and stays up; the next request restarts the conversation
//! from its last committed state. Requests queued at the failed actor are answered
//! `internal` by their [`Reply`] guards.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use botclaw_config::ConversationConfig;
use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr, SupervisionEvent};
use xxhash_rust::xxh3::Xxh3Builder;

use crate::backends::Backends;
use crate::bot::{BotRegistry, TurnContext};
use crate::conversation::{ConvArgs, ConvMsg, ConversationActor};
use crate::envelope::{ConvOutcome, ConvRequest, FailKind, Reply};
use crate::metrics::ConversationMetrics;
use crate::replicator::Replication;

/// A live conversation actor, as the registry holds it.
pub struct Handle {
    pub actor: ActorRef<ConvMsg>,
    pub activity: Arc<Activity>,
}

/// Counters shared by a conversation actor and its registry entry.
#[derive(Debug)]
pub struct Activity {
    /// Requests sent to the actor through the registry.
    pub sent: AtomicU64,
    /// Milliseconds since the host started, at the last request.
    last_active_ms: AtomicU64,
}

impl Activity {
    pub fn touch(&self, shared: &HostShared) {
        self.last_active_ms.store(shared.now_ms(), Ordering::Relaxed);
    }

    pub fn idle_for(&self, shared: &HostShared) -> Duration {
        Duration::from_millis(
            shared.now_ms().saturating_sub(self.last_active_ms.load(Ordering::Relaxed)),
        )
    }
}

/// Routes a request again: conversation, request, where its answer goes.
pub type Redirect = Box<dyn Fn(&str, ConvRequest, Reply) + Send + Sync>;

/// What every conversation actor of this node shares.
pub struct HostShared {
    pub node: Arc<str>,
    pub replicator: Arc<dyn Replication>,
    pub bots: BotRegistry,
    pub backends: Arc<Backends>,
    pub metrics: ConversationMetrics,
    /// Live actors by conversation id, hashed with a per-process random seed (ids come
    /// from clients).
    pub registry: DashMap<Arc<str>, Handle, Xxh3Builder>,
    pub default_bot: String,
    /// The cluster's feature flags, as the node last applied them from the controller's map.
    pub flags: arc_swap::ArcSwap<botclaw_core::flags::Flags>,
    /// Advised to clients on `unavailable`.
    pub retry_after_ms: u64,
    pub turns_kept_max: usize,
    pub idle_passivate: Duration,
    /// Where requests go that an actor will not run because ownership moved (set once by
    /// the node: its routing).
    pub redirect: OnceLock<Redirect>,
    /// Byte limits of one conversation (see `ConversationConfig`).
    pub turn_bytes_max: usize,
    pub bot_state_bytes_max: usize,
    pub history_bytes_max: usize,
    active_max: usize,
    /// Memory budget of the active conversations, and what they hold now (each actor adds
    /// its estimate while it lives: see [`MemoryCharge`]).
    active_bytes_max: u64,
    active_bytes: AtomicI64,
    cache_entries_max: u64,
    cache_ttl: Duration,
    started: Instant,
}

/// What a live actor costs beyond its state (mailbox, caches, task, registry entry), as
/// measured: ~21 KB per active conversation with small turns.
pub const ACTOR_BYTES: usize = 20 * 1024;

/// One actor's share of the node's conversation memory, given back when it is dropped
/// (whichever way the actor ends).
pub struct MemoryCharge {
    shared: Arc<HostShared>,
    bytes: usize,
}

impl MemoryCharge {
    pub fn new(shared: &Arc<HostShared>, state_bytes: usize) -> MemoryCharge {
        let mut charge = MemoryCharge { shared: shared.clone(), bytes: 0 };
        charge.set(state_bytes);
        charge
    }

    /// What the actor's state holds, as last set.
    pub fn state_bytes(&self) -> usize {
        self.bytes.saturating_sub(ACTOR_BYTES)
    }

    /// The actor's state now holds `state_bytes`.
    pub fn set(&mut self, state_bytes: usize) {
        let bytes = state_bytes + ACTOR_BYTES;
        let delta = bytes as i64 - self.bytes as i64;
        self.shared.active_bytes.fetch_add(delta, Ordering::AcqRel);
        self.bytes = bytes;
    }
}

impl Drop for MemoryCharge {
    fn drop(&mut self) {
        self.shared.active_bytes.fetch_sub(self.bytes as i64, Ordering::AcqRel);
    }
}

impl HostShared {
    /// Estimated bytes of the active conversations.
    /// `conversations.active_bytes_max`: the budget of [`HostShared::active_bytes`].
    pub fn active_bytes_max(&self) -> u64 {
        self.active_bytes_max
    }

    pub fn active_bytes(&self) -> u64 {
        self.active_bytes.load(Ordering::Acquire).max(0) as u64
    }

    /// Whether the conversations' memory budget is nearly spent (idle ones then go early).
    fn memory_pressed(&self) -> bool {
        self.active_bytes() >= self.active_bytes_max / 10 * 9
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn turn_context(&self) -> TurnContext {
        TurnContext::new(
            self.backends.clone(),
            self.metrics.clone(),
            self.cache_entries_max,
            self.cache_ttl,
        )
    }
}

/// The supervisor of every conversation actor on this node.
pub struct ConversationSupervisor;

pub struct SupervisorState {
    shared: Arc<HostShared>,
}

impl Actor for ConversationSupervisor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = Arc<HostShared>;

    async fn pre_start(
        &self,
        _me: ActorRef<()>,
        shared: Arc<HostShared>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState { shared })
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<()>,
        event: SupervisionEvent,
        s: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // Never stop because a child stopped: that is ractor's default, and it would take
        // every conversation of the node down with one bad one.
        if let SupervisionEvent::ActorFailed(cell, error) = event {
            let id = cell.get_id();
            s.shared.registry.retain(|_, h| h.actor.get_id() != id);
            s.shared.metrics.restarts.inc();
            tracing::warn!(actor = %id, %error, "conversation actor failed; it restarts on its next request");
        }
        Ok(())
    }
}

/// Handle to this node's conversations. Cheap to clone.
#[derive(Clone)]
pub struct ConversationHost {
    shared: Arc<HostShared>,
    supervisor: ActorRef<()>,
}

impl std::fmt::Debug for ConversationHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConversationHost").field("active", &self.active()).finish()
    }
}

impl ConversationHost {
    /// Starts the supervisor and the idle sweeper.
    pub async fn start(
        node: Arc<str>,
        cfg: &ConversationConfig,
        replicator: Arc<dyn Replication>,
        retry_after_ms: u64,
        bots: BotRegistry,
        backends: Arc<Backends>,
        metrics: ConversationMetrics,
    ) -> Result<ConversationHost, ractor::SpawnErr> {
        let shared = Arc::new(HostShared {
            node,
            replicator,
            retry_after_ms,
            bots,
            backends,
            metrics,
            registry: DashMap::with_hasher(Xxh3Builder::new().with_seed(random_seed())),
            default_bot: cfg.default_bot.clone(),
            flags: Default::default(),
            turns_kept_max: cfg.turns_kept_max,
            idle_passivate: Duration::from_millis(cfg.idle_passivate_ms),
            redirect: OnceLock::new(),
            turn_bytes_max: cfg.turn_bytes_max,
            bot_state_bytes_max: cfg.bot_state_bytes_max,
            history_bytes_max: cfg.history_bytes_max,
            active_max: cfg.active_max,
            active_bytes_max: cfg.active_bytes_max,
            active_bytes: AtomicI64::new(0),
            cache_entries_max: cfg.cache_entries_max,
            cache_ttl: Duration::from_millis(cfg.cache_ttl_ms),
            started: Instant::now(),
        });
        let (supervisor, _) = Actor::spawn(None, ConversationSupervisor, shared.clone()).await?;
        let host = ConversationHost { shared, supervisor };
        tokio::spawn(sweep_idle(host.clone()));
        Ok(host)
    }

    pub fn active(&self) -> usize {
        self.shared.registry.len()
    }

    /// The flags turns see from now on (the node calls it when the map's flags change).
    pub fn set_flags(&self, flags: botclaw_core::flags::Flags) {
        self.shared.flags.store(Arc::new(flags));
    }

    pub fn shared(&self) -> &Arc<HostShared> {
        &self.shared
    }

    /// Tells the actors of conversations this node no longer owns to close once their
    /// waiting turns are durable (ownership moved with a membership change).
    pub fn relinquish(&self, owned_here: impl Fn(&str) -> bool) -> usize {
        let mut n = 0;
        for entry in self.shared.registry.iter() {
            if !owned_here(entry.key()) {
                let _ = entry.actor.cast(ConvMsg::Relinquish);
                n += 1;
            }
        }
        n
    }

    /// The latencies of a live conversation's last turns here, oldest first; `None` if no
    /// actor runs it on this node (or it did not answer within `timeout`). Starts nothing.
    pub async fn recent(
        &self,
        conv: &str,
        timeout: Duration,
    ) -> Option<Vec<crate::conversation::RecentTurn>> {
        let actor = self.shared.registry.get(conv).map(|h| h.actor.clone())?;
        actor.call(ConvMsg::Recent, Some(timeout)).await.ok()?.success_or(()).ok()
    }

    /// Sends a request to the conversation's actor, starting it if needed.
    pub fn dispatch(&self, conv: &str, request: ConvRequest, reply: Reply) {
        let mut msg = ConvMsg::Request(request, reply);
        // At most two rounds: a stale entry is replaced once, then the send succeeds or
        // the new actor is already gone too (the node is stopping).
        for _ in 0..3 {
            if let Some(handle) = self.shared.registry.get(conv) {
                handle.activity.sent.fetch_add(1, Ordering::AcqRel);
                match handle.actor.cast(msg) {
                    Ok(()) => return,
                    Err(MessagingErr::SendErr(back)) => {
                        // The actor stopped (its state failed to load, or it crashed) and
                        // the supervisor has not cleaned up yet: drop it, start afresh.
                        msg = back;
                        let stale = handle.activity.clone();
                        drop(handle);
                        self.shared
                            .registry
                            .remove_if(conv, |_, h| Arc::ptr_eq(&h.activity, &stale));
                        continue;
                    }
                    Err(_) => return,
                }
            }
            let full = if self.shared.registry.len() >= self.shared.active_max {
                Some("too many active conversations on this node")
            } else if self.shared.active_bytes() >= self.shared.active_bytes_max {
                Some("this node's memory budget for conversations is spent")
            } else {
                None
            };
            if let Some(message) = full {
                self.shared.metrics.activations_refused.inc();
                if let ConvMsg::Request(_, reply) = msg {
                    reply.send(ConvOutcome::Failed {
                        kind: FailKind::Busy,
                        message: message.into(),
                        retry_after_ms: Some(1000),
                    });
                }
                return;
            }
            if let dashmap::Entry::Vacant(slot) = self.shared.registry.entry(Arc::from(conv)) {
                let activity = Arc::new(Activity {
                    sent: AtomicU64::new(0),
                    last_active_ms: AtomicU64::new(self.shared.now_ms()),
                });
                // Charged now, not once the actor has loaded: a burst of new conversations
                // must not all pass the budget before any of them counts.
                let args = ConvArgs {
                    conv: Arc::from(conv),
                    shared: self.shared.clone(),
                    activity: activity.clone(),
                    charge: MemoryCharge::new(&self.shared, 0),
                };
                match ractor::ActorRuntime::<ConversationActor>::spawn_linked_instant(
                    None,
                    ConversationActor,
                    args,
                    self.supervisor.get_cell(),
                ) {
                    Ok((actor, _)) => {
                        self.shared.metrics.activations.inc();
                        slot.insert(Handle { actor, activity });
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a conversation actor");
                        return;
                    }
                }
            }
        }
    }
}

/// A seed from the standard library's per-process random hasher keys.
pub(crate) fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
}

/// How long a conversation must be idle to be passivated while memory is pressed.
const PRESSED_IDLE: Duration = Duration::from_secs(1);

async fn sweep_idle(host: ConversationHost) {
    let every = (host.shared.idle_passivate / 4).clamp(Duration::from_millis(50), PRESSED_IDLE);
    let mut tick = tokio::time::interval(every);
    let mut last_full = Instant::now();
    loop {
        tick.tick().await;
        if host.supervisor.get_status() != ractor::ActorStatus::Running {
            return;
        }
        let pressed = host.shared.memory_pressed();
        if !pressed && last_full.elapsed() < host.shared.idle_passivate / 4 {
            continue;
        }
        last_full = Instant::now();
        let idle = if pressed {
            host.shared.idle_passivate.min(PRESSED_IDLE)
        } else {
            host.shared.idle_passivate
        };
        for entry in host.shared.registry.iter() {
            if entry.activity.idle_for(&host.shared) >= idle {
                let _ = entry.actor.cast(ConvMsg::IdleCheck(idle));
            }
        }
    }
}

#[cfg(test)]
mod tests;
