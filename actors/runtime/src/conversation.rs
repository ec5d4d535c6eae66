//! One actor per active conversation.
//!
//! Turns are handled one at a time in arrival order. A turn runs the conversation's bot on
//! a copy of its state; if the bot succeeds, the turn is applied and submitted to the store,
//! and its reply waits until the store reports the turn durable. The actor does not wait
//! for that: it goes on with the next turn, whose commit then joins the same or the next
//! group commit (the store applies a conversation's commits in submission order). A retry
//! of a turn that is not durable yet also waits for it.
//!
//! A bot that errors or panics fails that turn only: the client gets `internal`, the turn
//! leaves no trace, and the conversation goes on from its last committed state with a
//! fresh cache, without losing the turns queued behind it. A commit the store refuses
//! restarts the conversation from what the store holds: every reply still waiting fails.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use botclaw_core::conversation::ConversationState;
use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::bot::{TurnContext, TurnInput};
use crate::envelope::{ConvOutcome, ConvRequest, FailKind, Reply};
use crate::host::{Activity, HostShared};
use crate::store::StoreError;

/// Messages of a conversation actor. Local-only: conversation actors are never mirrored
/// on peers (only the router is remotable).
pub enum ConvMsg {
    Request(ConvRequest, Reply),
    /// Sent by the host's idle sweeper: passivate if idle and nothing is queued.
    IdleCheck,
    /// The store finished committing `turn` (sent by the actor's own commit waiters).
    Committed {
        generation: u64,
        turn: u64,
        result: Result<(), StoreError>,
    },
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
    /// Highest turn the store reported durable.
    durable_turn: u64,
    /// Replies waiting for their turn to be durable, in arrival order (a retry of an older
    /// turn may stand behind newer turns).
    waiting: VecDeque<(u64, Reply, ConvOutcome)>,
    /// Bumped on every restart from the store, so commit results of before are ignored.
    generation: u64,
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
            durable_turn: state.turn,
            state,
            processed: 0,
            waiting: VecDeque::new(),
            generation: 0,
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
                        s.say(&me, id, text, bot.as_deref(), user, reply).await;
                    }
                    ConvRequest::History { limit } => {
                        // Only what is durable: a turn whose commit may still fail is not
                        // history yet.
                        let turns = s
                            .state
                            .history(s.state.turns.len())
                            .filter(|t| t.turn <= s.durable_turn)
                            .map(|t| (**t).clone())
                            .collect::<Vec<_>>();
                        let skip = turns.len().saturating_sub(limit as usize);
                        let turns = turns.into_iter().skip(skip).collect();
                        reply.send(ConvOutcome::History { turns, node: s.shared.node.clone() });
                    }
                }
            }
            ConvMsg::Committed { generation, turn, result } => {
                if generation == s.generation {
                    match result {
                        Ok(()) => s.durable(turn),
                        Err(e) => s.commit_failed(e).await?,
                    }
                }
            }
            ConvMsg::IdleCheck => {
                let idle = s.activity.idle_for(&s.shared) >= s.shared.idle_passivate;
                if idle && s.waiting.is_empty() && s.try_unregister() {
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

    /// Replies now if `turn` is durable, else when it becomes so.
    fn reply_when_durable(&mut self, turn: u64, reply: Reply, outcome: ConvOutcome) {
        if turn <= self.durable_turn {
            reply.send(outcome);
        } else {
            self.waiting.push_back((turn, reply, outcome));
        }
    }

    fn durable(&mut self, turn: u64) {
        self.durable_turn = self.durable_turn.max(turn);
        // Not only the front: a retry of an older turn queues behind newer turns.
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].0 <= self.durable_turn {
                if let Some((_, reply, outcome)) = self.waiting.remove(i) {
                    reply.send(outcome);
                }
            } else {
                i += 1;
            }
        }
    }

    async fn commit_failed(&mut self, e: StoreError) -> Result<(), ActorProcessingErr> {
        tracing::error!(conv = %self.conv, error = %e, "commit failed; restarting from the store");
        for (_, reply, _) in self.waiting.drain(..) {
            reply.send(ConvOutcome::failed(FailKind::Internal, format!("turn not committed: {e}")));
        }
        self.state = self.shared.store.load(&self.conv).await?.unwrap_or_default();
        self.state.reindex();
        self.durable_turn = self.state.turn;
        self.generation += 1;
        self.cx = self.shared.turn_context();
        self.shared.metrics.restarts.inc();
        Ok(())
    }

    async fn say(
        &mut self,
        me: &ActorRef<ConvMsg>,
        id: String,
        text: String,
        bot: Option<&str>,
        user: Option<String>,
        reply: Reply,
    ) {
        let node = self.shared.node.clone();
        if let Some(done) = self.state.find(&id) {
            self.shared.metrics.duplicates.inc();
            let (turn, messages) = (done.turn, done.messages.clone());
            return self.reply_when_durable(
                turn,
                reply,
                ConvOutcome::Reply { messages, turn, node },
            );
        }
        let bot_name = self.state.bot_for(bot, &self.shared.default_bot).to_string();
        let Some(runner) = self.shared.bots.get(&bot_name) else {
            let known: Vec<&str> = self.shared.bots.names().collect();
            let message = format!("unknown bot {bot_name:?} (known: {})", known.join(", "));
            return reply.send(ConvOutcome::failed(FailKind::BadRequest, message));
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
                match self.shared.store.submit(&self.conv, commit.clone()).await {
                    Ok(ticket) => {
                        let turn = commit.record.turn;
                        let messages = commit.record.messages.clone();
                        self.state.apply(commit, self.shared.turns_kept_max);
                        self.shared.metrics.turns.inc();
                        self.reply_when_durable(
                            turn,
                            reply,
                            ConvOutcome::Reply { messages, turn, node },
                        );
                        let (me, generation) = (me.clone(), self.generation);
                        tokio::spawn(async move {
                            let result = ticket.await;
                            // The actor may have stopped; its waiting replies answered then.
                            let _ = me.cast(ConvMsg::Committed { generation, turn, result });
                        });
                        return;
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
        // The failed turn never touched the state (the bot ran on a copy); what the bot may
        // have left behind in its cache is dropped with it.
        self.cx = self.shared.turn_context();
        self.shared.metrics.restarts.inc();
    }
}
