//! One actor per active conversation.
//!
//! An actor starts by taking ownership of its conversation ([`crate::replicator::Replicator::acquire`]): it
//! fences the preference list with a new epoch and continues from the newest replicated
//! copy. Turns are handled one at a time in arrival order. A turn runs the conversation's
//! bot on a copy of its state; if the bot succeeds, the turn is applied and submitted to
//! the replicator, and its reply waits until the write quorum holds the turn. The actor
//! does not wait for that: it goes on with the next turn, whose writes then join the same
//! or the next group commits (stores apply a conversation's writes in submission order).
//! A retry of a turn that is not durable yet also waits for it.
//!
//! A bot that errors or panics fails that turn only: the client gets `internal`, the turn
//! leaves no trace, and the conversation goes on from its last committed state with a
//! fresh cache, without losing the turns queued behind it. If ownership cannot be taken or
//! kept (a newer epoch fenced the conversation, a replica did not answer, the node lost
//! its majority, a store failed), the actor closes: it leaves the registry, every reply
//! still waiting and every request still queued fails (`unavailable`: retry), and the
//! next request starts a fresh actor that acquires again. If the refusal says ownership
//! moved, those requests go to the new owner instead, the ones waiting for their turn to
//! be durable too: the new owner either holds that turn (an in-sync member got it) and
//! answers the request by its id, or never saw it and runs it.
//!
//! When ownership moves to another node (placement changed: a join, a drain, a
//! rebalancing move), the actor is told to relinquish: it runs no new turns, finishes the
//! ones in flight (durable with its epoch, so the new owner's acquire continues from
//! them), then closes and hands every request it held back, in order, to the node's
//! routing, which sends them to the new owner (see `botclaw_core::handoff`). Clients
//! see added latency, not an error.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use botclaw_core::conversation::{record_bytes, ConversationState};
use botclaw_core::replication::{Epoch, Version};
use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::bot::{BotFailure, TurnContext, TurnInput};
use crate::envelope::{ConvOutcome, ConvRequest, FailKind, Reply};
use crate::host::{Activity, HostShared, MemoryCharge};
use crate::replicator::{Notify, Refusal};

/// Messages of a conversation actor. Local-only: conversation actors are never mirrored
/// on peers (only the router is remotable).
pub enum ConvMsg {
    Request(ConvRequest, Reply),
    /// Sent by the host's idle sweeper: passivate if idle this long and nothing is queued.
    IdleCheck(std::time::Duration),
    /// The write quorum holds `turn`, or cannot (sent by the actor's own commit waiters).
    Committed {
        turn: u64,
        result: Result<(), Refusal>,
    },
    /// This node no longer owns the conversation: run no new turns, close once nothing
    /// waits, and pass held requests on.
    Relinquish,
    /// The latencies of its last turns, oldest first (for the operator's lookup).
    Recent(ractor::RpcReplyPort<Vec<RecentTurn>>),
}

/// How many turns' latencies an actor keeps for the operator's lookup.
pub const RECENT_TURNS_MAX: usize = 16;

/// One recent turn as its owner saw it: from the actor taking the request to the reply
/// (the bot's run and the write quorum's acknowledgement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecentTurn {
    pub turn: u64,
    pub micros: u64,
}

impl ractor::Message for ConvMsg {}

pub struct ConversationActor;

pub struct ConvArgs {
    pub conv: Arc<str>,
    pub shared: Arc<HostShared>,
    pub activity: Arc<Activity>,
    pub charge: MemoryCharge,
}

pub struct ConvActorState {
    conv: Arc<str>,
    state: ConversationState,
    /// Version of `state` (what the next write builds on) and this owner's epoch.
    version: Version,
    epoch: Epoch,
    cx: TurnContext,
    /// Requests handled; equals `activity.sent` when nothing is queued.
    processed: u64,
    /// Highest turn the write quorum holds.
    durable_turn: u64,
    /// The acquired copy holds turns not known to be held as the mode requires and was not
    /// submitted to be confirmed yet (see `confirm_copy`).
    unconfirmed: bool,
    /// Replies waiting for their turn to be durable, in arrival order (a retry of an older
    /// turn may stand behind newer turns).
    /// Each keeps its request: if the turn's commit is refused because ownership moved, the
    /// request goes to the new owner (which holds the turn if any in-sync member got it, and
    /// answers a retry of it by its id once every in-sync member holds it; else it runs it).
    waiting: VecDeque<Waiting>,
    /// Set when ownership ended: every request is answered with it until the actor stops.
    closed: Option<Refusal>,
    /// Close as soon as nothing waits; meanwhile requests are held in `deferred`.
    relinquished: bool,
    /// Requests that arrived after `Relinquish`, passed on (in order) when the actor closes.
    deferred: VecDeque<(ConvRequest, Reply)>,
    shared: Arc<HostShared>,
    activity: Arc<Activity>,
    /// This actor's share of the node's conversation memory budget.
    charge: MemoryCharge,
    /// The turn-time histogram of the bot its last turn ran (looked up again only when
    /// the bot changes, not on every turn).
    bot_timer: Option<(String, prometheus_client::metrics::histogram::Histogram)>,
    /// The last [`RECENT_TURNS_MAX`] turns' latencies, oldest first.
    recent: VecDeque<RecentTurn>,
}

/// A reply waiting for its turn to be durable.
struct Waiting {
    turn: u64,
    reply: Reply,
    outcome: ConvOutcome,
    request: ConvRequest,
    /// When the actor took a new turn's request (`None` for a retry or a read).
    started: Option<std::time::Instant>,
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
        let (owned, closed) = match args.shared.replicator.acquire(&args.conv).await {
            Ok(owned) => (owned, None),
            Err(refusal) => {
                args.shared.metrics.acquire_failures.inc();
                let nothing = crate::replicator::Owned {
                    state: ConversationState::default(),
                    version: Version::default(),
                    epoch: Epoch::ZERO,
                    durable_turn: 0,
                };
                (nothing, Some(refusal))
            }
        };
        // A refusal is kept aside until `post_start`, which closes the actor.
        let mut charge = args.charge;
        charge.set(owned.state.size_bytes());
        Ok(ConvActorState {
            charge,
            cx: args.shared.turn_context(),
            conv: args.conv,
            unconfirmed: owned.durable_turn < owned.state.turn,
            durable_turn: owned.durable_turn,
            state: owned.state,
            version: owned.version,
            epoch: owned.epoch,
            processed: 0,
            waiting: VecDeque::new(),
            closed,
            relinquished: false,
            deferred: VecDeque::new(),
            shared: args.shared,
            activity: args.activity,
            bot_timer: None,
            recent: VecDeque::new(),
        })
    }

    async fn post_start(
        &self,
        me: ActorRef<ConvMsg>,
        s: &mut ConvActorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(refusal) = s.closed.take() {
            s.close(&me, refusal);
        }
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<ConvMsg>,
        msg: ConvMsg,
        s: &mut ConvActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ConvMsg::Request(request, reply) if s.closed.is_some() => {
                s.processed += 1;
                let refusal = s.closed.clone().expect("closed");
                s.pass_on(request, reply, &refusal);
                s.stop_if_drained(&me);
            }
            ConvMsg::Request(request, reply) if s.relinquished => {
                s.processed += 1;
                s.deferred.push_back((request, reply));
            }
            ConvMsg::Request(request, reply) => {
                s.processed += 1;
                s.activity.touch(&s.shared);
                match request {
                    ConvRequest::Say { id, text, bot, user } => {
                        s.say(&me, id, text, bot.as_deref(), user, reply).await;
                    }
                    request @ ConvRequest::History { limit, before } => {
                        // Only where reads are allowed (the controller lease).
                        if let Err(refusal) = s.shared.replicator.read(&s.conv).await {
                            reply.send(refused(&refusal, s.shared.retry_after_ms));
                            return Ok(());
                        }
                        // Every turn asked before it, answered once they are durable (a
                        // history pipelined after a say shows that say's turn; if a commit
                        // fails, this read fails with it).
                        let (page, more) = s.state.history_page(
                            before,
                            limit as usize,
                            s.shared.history_bytes_max,
                        );
                        let turns = page.into_iter().map(|t| (**t).clone()).collect();
                        let node = s.shared.node.clone();
                        let outcome = ConvOutcome::History { turns, more, node };
                        let upto = s.state.turn;
                        s.reply_from_copy(&me, upto, reply, outcome, request).await;
                    }
                    ConvRequest::Replica(_) | ConvRequest::Module(_) => {
                        reply.send(ConvOutcome::failed(
                            FailKind::BadRequest,
                            "replica ops and module requests do not go to a conversation",
                        ))
                    }
                }
            }
            ConvMsg::Committed { turn, result } => {
                if s.closed.is_none() {
                    match result {
                        Ok(()) => s.durable(&me, turn),
                        Err(refusal) => {
                            tracing::warn!(conv = %s.conv, turn, reason = %refusal, "turn not replicated; closing");
                            s.shared.metrics.replication_failures.inc();
                            s.close(&me, refusal);
                        }
                    }
                }
            }
            ConvMsg::Relinquish => {
                s.relinquished = true;
                if s.waiting.is_empty() && s.closed.is_none() {
                    s.close(&me, Refusal::moved("ownership moved to another node"));
                }
            }
            ConvMsg::Recent(port) => {
                let _ = port.send(s.recent.iter().copied().collect());
            }
            ConvMsg::IdleCheck(after) => {
                let idle = s.activity.idle_for(&s.shared) >= after;
                if idle && s.waiting.is_empty() && s.closed.is_none() && s.try_unregister() {
                    s.shared.metrics.passivations.inc();
                    me.stop(Some("passivated".into()));
                }
            }
        }
        Ok(())
    }
}

fn refused(refusal: &Refusal, retry_after_ms: u64) -> ConvOutcome {
    let retry_after_ms = (refusal.kind == FailKind::Unavailable).then_some(retry_after_ms);
    ConvOutcome::Failed { kind: refusal.kind, message: refusal.message.clone(), retry_after_ms }
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

    /// Replies now if `turn` is durable, else when it becomes so. `started` (a new turn's)
    /// records the turn's latency when it is answered.
    fn reply_when_durable(
        &mut self,
        turn: u64,
        reply: Reply,
        outcome: ConvOutcome,
        request: ConvRequest,
        started: Option<std::time::Instant>,
    ) {
        if turn <= self.durable_turn {
            self.answered(turn, started);
            reply.send(outcome);
        } else {
            self.waiting.push_back(Waiting { turn, reply, outcome, request, started });
        }
    }

    /// The first time the acquired copy is used (a reply from it, a turn built on it), it
    /// is submitted as a write, unless it is known to be held already. By the map the copy
    /// is only the local one: it may hold a previous owner's write that nobody
    /// acknowledged and another in-sync member lacks; answered from here (a retry found
    /// done, a read), such a turn would be lost once ownership moved to that member.
    /// Replies from the copy wait for its acknowledgement (`Committed` of its turn).
    async fn confirm_copy(&mut self, me: &ActorRef<ConvMsg>) -> Result<(), Refusal> {
        if !self.unconfirmed {
            return Ok(());
        }
        self.unconfirmed = false;
        let (me_then, turn) = (me.clone(), self.state.turn);
        let notify = Notify::new(move |result| {
            let _ = me_then.cast(ConvMsg::Committed { turn, result });
        });
        let (conv, epoch, version) = (&self.conv, self.epoch, self.version);
        self.shared.replicator.confirm(conv, epoch, version, self.state.clone(), notify).await
    }

    /// Answers from the copy (a retry found done, a read) once it is held up to `turn`,
    /// submitting the copy first if it is not known to be held; a refused submission
    /// closes the actor (which passes the waiting requests on).
    async fn reply_from_copy(
        &mut self,
        me: &ActorRef<ConvMsg>,
        turn: u64,
        reply: Reply,
        outcome: ConvOutcome,
        request: ConvRequest,
    ) {
        self.reply_when_durable(turn, reply, outcome, request, None);
        if let Err(refusal) = self.confirm_copy(me).await {
            self.close(me, refusal);
        }
    }

    /// Keeps a new turn's latency among the recent ones.
    fn answered(&mut self, turn: u64, started: Option<std::time::Instant>) {
        let Some(started) = started else { return };
        if self.recent.len() == RECENT_TURNS_MAX {
            self.recent.pop_front();
        }
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.recent.push_back(RecentTurn { turn, micros });
    }

    fn durable(&mut self, me: &ActorRef<ConvMsg>, turn: u64) {
        self.durable_turn = self.durable_turn.max(turn);
        // Not only the front: a retry of an older turn queues behind newer turns.
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].turn <= self.durable_turn {
                if let Some(w) = self.waiting.remove(i) {
                    self.answered(w.turn, w.started);
                    w.reply.send(w.outcome);
                }
            } else {
                i += 1;
            }
        }
        if self.relinquished && self.waiting.is_empty() {
            self.close(me, Refusal::moved("ownership moved to another node"));
        }
    }

    /// Ends this actor's ownership: out of the registry (the next request starts a new
    /// actor, which acquires again), every reply still waiting fails, held requests are
    /// passed on, and the actor stops once it has handled every request already sent to
    /// it.
    fn close(&mut self, me: &ActorRef<ConvMsg>, refusal: Refusal) {
        // Out of the registry first: requests passed on must not come back to this actor.
        let mine = &self.activity;
        self.shared.registry.remove_if(&*self.conv, |_, h| Arc::ptr_eq(&h.activity, mine));
        for w in std::mem::take(&mut self.waiting) {
            self.pass_on(w.request, w.reply, &refusal);
        }
        for (request, reply) in std::mem::take(&mut self.deferred) {
            self.pass_on(request, reply, &refusal);
        }
        self.closed = Some(refusal);
        self.stop_if_drained(me);
    }

    /// A request this closed actor will not run: to the new owner through the node's
    /// routing if ownership moved, else answered with the refusal.
    fn pass_on(&self, request: ConvRequest, reply: Reply, refusal: &Refusal) {
        match self.shared.redirect.get() {
            Some(redirect) if refusal.moved => redirect(&self.conv, request, reply),
            _ => reply.send(refused(refusal, self.shared.retry_after_ms)),
        }
    }

    /// After `close`: nothing more can be sent (the actor left the registry), so once
    /// `processed` reaches `sent` the mailbox is empty.
    fn stop_if_drained(&self, me: &ActorRef<ConvMsg>) {
        if self.processed == self.activity.sent.load(Ordering::Acquire) {
            me.stop(Some("closed".into()));
        }
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
        let taken = std::time::Instant::now();
        if let Some(done) = self.state.find(&id) {
            self.shared.metrics.duplicates.inc();
            let (turn, messages) = (done.turn, done.messages.clone());
            let request = ConvRequest::Say { id, text, bot: bot.map(String::from), user };
            let outcome = ConvOutcome::Reply { messages, turn, node };
            return self.reply_from_copy(me, turn, reply, outcome, request).await;
        }
        if record_bytes(&id, &text, user.as_deref(), &[]) > self.shared.turn_bytes_max {
            self.shared.metrics.turns_too_large.inc();
            let message = format!(
                "the message is over this conversation's turn limit of {} bytes",
                self.shared.turn_bytes_max
            );
            return reply.send(ConvOutcome::failed(FailKind::TooLarge, message));
        }
        let bot_name = self.state.bot_for(bot, &self.shared.default_bot).to_string();
        let Some(runner) = self.shared.bots.get(&bot_name) else {
            let known: Vec<&str> = self.shared.bots.names().collect();
            let message = format!("unknown bot {bot_name:?} (known: {})", known.join(", "));
            return reply.send(ConvOutcome::failed(FailKind::BadRequest, message));
        };
        let mut bot_state = self.state.bot_state.clone();
        // The flags as they are now, held (not the swap's guard) across the bot's await.
        let all_flags = self.shared.flags.load_full();
        let flags = all_flags.on_for(&self.conv, &bot_name);
        let input = TurnInput {
            conv: &self.conv,
            id: &id,
            text: &text,
            user: user.as_deref(),
            turn: self.state.turn + 1,
            flags: &flags,
        };
        let started = std::time::Instant::now();
        let outcome =
            AssertUnwindSafe(runner.turn(&mut self.cx, &mut bot_state, input)).catch_unwind().await;
        let took = started.elapsed().as_secs_f64();
        let timer = match &mut self.bot_timer {
            Some((bot, histogram)) if *bot == bot_name => histogram,
            slot => {
                let label = crate::metrics::BotLabel { bot: bot_name.clone() };
                let histogram =
                    self.shared.metrics.bot_turn_seconds.0.get_or_create(&label).clone();
                &mut slot.insert((bot_name.clone(), histogram)).1
            }
        };
        timer.observe(took);
        let failure = match outcome {
            Ok(Ok(messages)) => {
                let turn_bytes = record_bytes(&id, &text, user.as_deref(), &messages);
                let limits = (self.shared.turn_bytes_max, self.shared.bot_state_bytes_max);
                if turn_bytes > limits.0 || bot_state.len() > limits.1 {
                    // Nothing is committed; the conversation stays as it was.
                    self.shared.metrics.turns_too_large.inc();
                    let message = format!(
                        "the turn ({turn_bytes} bytes with the bot's answer) or the bot state \
                         ({} bytes) is over this conversation's limits ({} and {} bytes)",
                        bot_state.len(),
                        limits.0,
                        limits.1
                    );
                    return reply.send(ConvOutcome::failed(FailKind::TooLarge, message));
                }
                let commit = self.state.next_commit(&bot_name, id, text, user, messages, bot_state);
                let record = &commit.record;
                // What the new owner runs (or finds done) if ownership moves before the turn
                // is durable.
                let request = ConvRequest::Say {
                    id: record.id.clone(),
                    text: record.text.clone(),
                    bot: Some(bot_name),
                    user: record.user.clone(),
                };
                // Told once the turn is replicated (the actor may have stopped by then; its
                // waiting replies were answered when it did).
                let (me_then, turn) = (me.clone(), commit.record.turn);
                let (submitted_at, latency) =
                    (std::time::Instant::now(), self.shared.metrics.replication_seconds.clone());
                let notify = Notify::new(move |result| {
                    if result.is_ok() {
                        latency.0.observe(submitted_at.elapsed().as_secs_f64());
                    }
                    let _ = me_then.cast(ConvMsg::Committed { turn, result });
                });
                // The copy goes first (in order, so a member that lacked it takes the turn).
                let submitted = match self.confirm_copy(me).await {
                    Ok(()) => {
                        let (conv, epoch, base) = (&self.conv, self.epoch, self.version);
                        self.shared
                            .replicator
                            .submit(conv, epoch, base, commit.clone(), notify)
                            .await
                    }
                    Err(refusal) => {
                        notify.dismiss();
                        Err(refusal)
                    }
                };
                match submitted {
                    Ok(()) => {
                        let turn = commit.record.turn;
                        let messages = commit.record.messages.clone();
                        let kept = self.shared.turns_kept_max;
                        let size = self.state.size_after(self.charge.state_bytes(), &commit, kept);
                        self.state.apply(commit, kept);
                        self.charge.set(size);
                        self.version = Version { epoch: self.epoch, turn };
                        self.shared.metrics.turns.inc();
                        self.reply_when_durable(
                            turn,
                            reply,
                            ConvOutcome::Reply { messages, turn, node },
                            request,
                            Some(taken),
                        );
                        return;
                    }
                    Err(refusal) => {
                        // Nothing was written. If ownership moved, the new owner runs the
                        // turn (before the requests queued behind it).
                        self.deferred.push_front((request, reply));
                        self.close(me, refusal);
                        return;
                    }
                }
            }
            Ok(Err(e)) => {
                self.shared.metrics.bot_errors.inc();
                let kind = match e.kind {
                    BotFailure::Failed => FailKind::Internal,
                    BotFailure::Timeout => FailKind::Timeout,
                    BotFailure::Unavailable => FailKind::Unavailable,
                };
                if kind != FailKind::Internal {
                    // A service the bot is did not answer: the same id may be retried; the
                    // conversation is untouched, so nothing restarts.
                    let retry_after_ms = Some(self.shared.retry_after_ms);
                    let message = format!("bot {bot_name}: {e}");
                    return reply.send(ConvOutcome::Failed { kind, message, retry_after_ms });
                }
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
