//! One actor per active conversation.
//!
//! Turns are handled one at a time in arrival order. A turn runs the conversation's bot on
//! a copy of its state; only when the store has committed the turn does the state move and
//! the client get its reply. A bot that errors or panics fails that turn only: the client
//! gets `internal` and the conversation restarts from its last committed state (reloaded
//! from the store, with a fresh cache), without losing the turns queued behind it.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use botclaw_core::conversation::ConversationState;
use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::bot::{TurnContext, TurnInput};
use crate::envelope::{ConvOutcome, ConvRequest, FailKind, Reply};
use crate::host::{Activity, HostShared};

/// Messages of a conversation actor. Local-only: conversation actors are never mirrored
/// on peers (only the router is remotable).
pub enum ConvMsg {
    Request(ConvRequest, Reply),
    /// Sent by the host's idle sweeper: passivate if idle and nothing is queued.
    IdleCheck,
}

impl ractor::Message for ConvMsg {}

pub struct ConversationActor;

pub struct ConvArgs {
    pub conv: Arc<str>,
    pub shared: Arc<HostShared>,
    pub activity: Arc<Activity>,
}

pub struct ConvActorState {
    conv: Arc<str>,
    state: ConversationState,
    cx: TurnContext,
    /// Requests handled; equals `activity.sent` when nothing is queued.
    processed: u64,
    shared: Arc<HostShared>,
    activity: Arc<Activity>,
}

impl Actor for ConversationActor {
    type Msg = ConvMsg;
    type State = ConvActorState;
    type Arguments = ConvArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<ConvMsg>,
        args: ConvArgs,
    ) -> Result<ConvActorState, ActorProcessingErr> {
        let mut state = args.shared.store.load(&args.conv).await?.unwrap_or_default();
        state.reindex();
        Ok(ConvActorState {
            cx: args.shared.turn_context(),
            conv: args.conv,
            state,
            processed: 0,
            shared: args.shared,
            activity: args.activity,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<ConvMsg>,
        msg: ConvMsg,
        s: &mut ConvActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ConvMsg::Request(request, reply) => {
                s.processed += 1;
                s.activity.touch(&s.shared);
                match request {
                    ConvRequest::Say { id, text, bot, user } => {
                        s.say(id, text, bot.as_deref(), user, reply).await?;
                    }
                    ConvRequest::History { limit } => {
                        let turns =
                            s.state.history(limit as usize).map(|t| (**t).clone()).collect();
                        reply.send(ConvOutcome::History { turns, node: s.shared.node.clone() });
                    }
                }
            }
            ConvMsg::IdleCheck => {
                if s.activity.idle_for(&s.shared) >= s.shared.idle_passivate && s.try_unregister() {
                    s.shared.metrics.passivations.inc();
                    me.stop(Some("passivated".into()));
                }
            }
        }
        Ok(())
    }
}

impl ConvActorState {
    /// Leaves the registry if every request sent to this actor has been handled. The
    /// check runs under the registry's lock, the same lock senders hold while sending, so
    /// no request can slip in between.
    fn try_unregister(&self) -> bool {
        let processed = self.processed;
        let mine = &self.activity;
        self.shared
            .registry
            .remove_if(&*self.conv, |_, h| {
                Arc::ptr_eq(&h.activity, mine) && mine.sent.load(Ordering::Acquire) == processed
            })
            .is_some()
    }

    async fn say(
        &mut self,
        id: String,
        text: String,
        bot: Option<&str>,
        user: Option<String>,
        reply: Reply,
    ) -> Result<(), ActorProcessingErr> {
        let node = self.shared.node.clone();
        if let Some(done) = self.state.find(&id) {
            self.shared.metrics.duplicates.inc();
            reply.send(ConvOutcome::Reply {
                messages: done.messages.clone(),
                turn: done.turn,
                node,
            });
            return Ok(());
        }
        let bot_name = self.state.bot_for(bot, &self.shared.default_bot).to_string();
        let Some(runner) = self.shared.bots.get(&bot_name) else {
            let known: Vec<&str> = self.shared.bots.names().collect();
            reply.send(ConvOutcome::failed(
                FailKind::BadRequest,
                format!("unknown bot {bot_name:?} (known: {})", known.join(", ")),
            ));
            return Ok(());
        };
        let mut bot_state = self.state.bot_state.clone();
        let input = TurnInput {
            conv: &self.conv,
            id: &id,
            text: &text,
            user: user.as_deref(),
            turn: self.state.turn + 1,
        };
        let outcome =
            AssertUnwindSafe(runner.turn(&mut self.cx, &mut bot_state, input)).catch_unwind().await;
        let failure = match outcome {
            Ok(Ok(messages)) => {
                let commit = self.state.next_commit(&bot_name, id, text, user, messages, bot_state);
                match self.shared.store.commit(&self.conv, commit.clone()).await {
                    Ok(()) => {
                        let turn = commit.record.turn;
                        let messages = commit.record.messages.clone();
                        self.state.apply(commit, self.shared.turns_kept_max);
                        self.shared.metrics.turns.inc();
                        reply.send(ConvOutcome::Reply { messages, turn, node });
                        return Ok(());
                    }
                    Err(e) => format!("turn not committed: {e}"),
                }
            }
            Ok(Err(e)) => {
                self.shared.metrics.bot_errors.inc();
                format!("bot {bot_name} failed: {e}")
            }
            Err(panic) => {
                self.shared.metrics.bot_errors.inc();
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic");
                format!("bot {bot_name} panicked: {what}")
            }
        };
        let turn = self.state.turn + 1;
        tracing::warn!(conv = %self.conv, turn, error = %failure, "turn failed; restarting from committed state");
        reply.send(ConvOutcome::failed(FailKind::Internal, failure));
        self.restart().await
    }

    /// Back to the last committed state, with a fresh cache, as a restarted actor would be.
    async fn restart(&mut self) -> Result<(), ActorProcessingErr> {
        self.state = self.shared.store.load(&self.conv).await?.unwrap_or_default();
        self.state.reindex();
        self.cx = self.shared.turn_context();
        self.shared.metrics.restarts.inc();
        Ok(())
    }
}
