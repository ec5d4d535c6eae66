//! SWIM membership: foca behind authenticated datagrams.
//!
//! [`Membership`] is a state machine. Its inputs are method calls ([`Membership::start`],
//! [`Membership::handle_packet`], [`Membership::handle_timer`], [`Membership::leave`]); its
//! outputs are [`Effect`]s the driver drains with [`Membership::poll_effect`] and executes
//! in order: send a datagram, schedule a timer, react to a member going up or down.
//! The driver must deliver timers in deadline order (foca relies on it).
//!
//! What it adds to foca:
//! - every outgoing datagram is sealed and every incoming one opened with the cluster
//!   secret ([`crate::auth`]); nothing unauthenticated reaches foca's decoder;
//! - foca does not retry a first announce, so a node with seeds re-announces every
//!   `reannounce_interval_ms` while it has no members;
//! - a view of all members with an up/suspect/down state, ordered by name.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use botclaw_config::GossipConfig;
use foca::{
    Codec, Foca, Header, Identity, Member, Notification, PeriodicParams, PostcardCodec, State,
};
use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::auth::{AuthError, Keyring, PacketAuth, ReplayGuard};
use crate::identity::{IdInterner, SharedId};
use crate::load::{LoadGossip, LoadSummary, LoadTable};
use crate::NodeId;

/// A timer the driver must deliver back through [`Membership::handle_timer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipTimer {
    /// A foca protocol timer.
    Foca(foca::Timer<SharedId>),
    /// Re-announce to the seeds if still alone.
    Reannounce,
    /// Announce to a few random members while their feeds still teach this node new ones.
    CatchUp,
}

/// Catch-up rounds in a row that taught nothing new before this node stops asking.
const CATCH_UP_QUIET_ROUNDS: u8 = 3;

/// Output of the membership state machine, executed by the driver in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send this sealed datagram to a gossip address.
    Send { to: SocketAddr, packet: Vec<u8> },
    /// Deliver `timer` after `after` has elapsed.
    Schedule { after: Duration, timer: MembershipTimer },
    /// A member became active (joined, or came back as a new identity).
    MemberUp(NodeId),
    /// A member was declared down (crashed, frozen, partitioned away or left).
    MemberDown(NodeId),
    /// This node is known to at least one active member: it has joined.
    Joined,
    /// Every other member is gone; this node is alone.
    Isolated,
    /// The cluster declared this node down and it rejoined as `NodeId` (bump raised).
    Rejoined(NodeId),
    /// A member announced a new identity for its address (roles dropped at a drain, a
    /// rejoin, a restart) while its state stayed the same: this is the new one.
    MemberChanged(NodeId),
    /// Another live member has this node's name at another address. Names must be unique
    /// (they name controller members, shard replicas and links): the process that started
    /// later (`this_node_yields`) must stop; the other one only warns.
    NameTaken { other: NodeId, this_node_yields: bool },
    /// Still alone after `attempts` announces to the seeds (every
    /// `SEEDS_UNANSWERED_EVERY` attempts while it lasts); `seeds` are the addresses tried
    /// (empty: none resolved).
    SeedsUnanswered { attempts: u32, seeds: Vec<SocketAddr> },
}

/// Announces to silent seeds between two [`Effect::SeedsUnanswered`].
pub const SEEDS_UNANSWERED_EVERY: u32 = 20;

/// Why an incoming datagram was dropped.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("rejected datagram: {0}")]
    Auth(#[from] AuthError),
    #[error("authenticated datagram that foca rejected: {0}")]
    Protocol(foca::Error),
}

impl PacketError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            PacketError::Auth(e) => e.label(),
            PacketError::Protocol(_) => "protocol",
        }
    }
}

/// Liveness of a member as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Up,
    Suspect,
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Up => "up",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
        }
    }
}

/// One row of the membership table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub id: NodeId,
    pub state: MemberState,
    pub is_self: bool,
}

/// Converts the operator's gossip settings into foca's, leaving room for the auth tag.
pub fn foca_config(cfg: &GossipConfig, payload_bytes_max: usize) -> foca::Config {
    let ms = Duration::from_millis;
    let nz = |n: usize| NonZeroUsize::new(n.max(1)).expect("max(1) is non-zero");
    foca::Config {
        probe_period: ms(cfg.probe_period_ms),
        probe_rtt: ms(cfg.probe_rtt_ms),
        num_indirect_probes: nz(cfg.indirect_probes),
        // For a node on its own; `Membership` follows the cluster's size from there.
        max_transmissions: NonZeroU8::new(cfg.transmissions(1)).expect("at least 1"),
        suspect_to_down_after: ms(cfg.suspect_to_down_ms),
        remove_down_after: Some(ms(cfg.remove_down_after_ms)),
        max_packet_size: nz(payload_bytes_max),
        notify_down_members: true,
        // Ask one random member for more members now and then: a node that joined
        // through one seed learns the full roster even if the first feed was partial.
        periodic_announce: Some(PeriodicParams { frequency: ms(5_000), num_members: nz(1) }),
        // Talk to members we believe down, so both sides of a healed partition (and a
        // node wrongly declared down) find each other again without an operator.
        periodic_announce_to_down_members: Some(PeriodicParams {
            frequency: ms(3_000),
            num_members: nz(2),
        }),
        periodic_gossip: Some(PeriodicParams {
            frequency: ms(cfg.gossip_interval_ms),
            num_members: nz(cfg.gossip_fanout),
        }),
    }
}

type Swim = Foca<SharedId, InterningCodec, StdRng, LoadGossip>;

/// foca's postcard codec (the same bytes), with every identity it decodes interned: the
/// member table then shares one copy of each identity with the other tables that use the
/// same [`IdInterner`].
struct InterningCodec(IdInterner);

impl Codec<SharedId> for InterningCodec {
    type Error = postcard::Error;

    fn encode_header(
        &mut self,
        header: &Header<SharedId>,
        buf: impl bytes::BufMut,
    ) -> Result<(), Self::Error> {
        PostcardCodec.encode_header(header, buf)
    }

    fn decode_header(&mut self, buf: impl bytes::Buf) -> Result<Header<SharedId>, Self::Error> {
        let mut header: Header<SharedId> = PostcardCodec.decode_header(buf)?;
        header.src = self.0.intern(header.src);
        header.dst = self.0.intern(header.dst);
        Ok(header)
    }

    fn encode_member(
        &mut self,
        member: &Member<SharedId>,
        buf: impl bytes::BufMut,
    ) -> Result<(), Self::Error> {
        PostcardCodec.encode_member(member, buf)
    }

    fn decode_member(&mut self, buf: impl bytes::Buf) -> Result<Member<SharedId>, Self::Error> {
        let m: Member<SharedId> = PostcardCodec.decode_member(buf)?;
        let (incarnation, state) = (m.incarnation(), m.state());
        Ok(Member::new(self.0.intern(m.id().clone()), incarnation, state))
    }
}

/// The membership state machine of one node.
pub struct Membership {
    foca: Swim,
    /// What foca runs with now (its retransmission count follows the cluster's size).
    config: foca::Config,
    gossip: GossipConfig,
    loads: LoadTable,
    auth: PacketAuth,
    seeds: Vec<SocketAddr>,
    /// Alone and without seeds at start, it founds a cluster (see [`Membership::founding`]).
    founds: bool,
    /// Announces to the seeds while alone, since the last member was seen.
    unanswered: u32,
    /// This node's name and (incarnation, bump), for telling a namesake.
    own: (String, SocketAddr, (u64, u16)),
    reannounce_after: Duration,
    effects: VecDeque<Effect>,
    joined: bool,
    left: bool,
    /// foca reported a rejoin since the last input was handled.
    rejoined: bool,
    /// Picks catch-up targets (seeded: runs stay deterministic).
    rng: StdRng,
    catch_up: CatchUp,
    /// Draws the nonces of sealed datagrams.
    nonces: StdRng,
    /// The driver's clock (milliseconds since the Unix epoch on a node; simulated time in
    /// the simulator), set before each input: stamps sealed datagrams and judges replays.
    now_ms: u64,
}

/// A joining node asks random members for more members (foca answers an announce with a
/// feed of about 20 random identities) every gossip interval, as long as the feeds keep
/// teaching it new ones: a node joining a 1000-member cluster otherwise learns it one
/// feed per periodic announce (5 s) and runs on a partial view for minutes.
#[derive(Debug, Default)]
struct CatchUp {
    /// Active members after the last round.
    known: usize,
    quiet_rounds: u8,
    running: bool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("identity", self.foca.identity())
            .field("members", &self.foca.num_members())
            .field("joined", &self.joined)
            .field("left", &self.left)
            .finish()
    }
}

/// Collects foca's outputs as [`Effect`]s, sealing datagrams on the way out.
struct Outbox<'a> {
    effects: &'a mut VecDeque<Effect>,
    auth: &'a PacketAuth,
    nonces: &'a mut StdRng,
    now_ms: u64,
    /// Set when foca reports that this node rejoined (it was declared down).
    rejoined: &'a mut bool,
    own: &'a (String, SocketAddr, (u64, u16)),
}

impl foca::Runtime<SharedId> for Outbox<'_> {
    fn notify(&mut self, notification: Notification<'_, SharedId>) {
        let effect = match notification {
            Notification::MemberUp(id) => {
                let (name, gossip, age) = self.own;
                if id.name == *name && id.gossip != *gossip {
                    let this_node_yields = (id.incarnation, id.bump) < *age;
                    self.effects.push_back(Effect::NameTaken {
                        other: NodeId::clone(id),
                        this_node_yields,
                    });
                }
                Effect::MemberUp(NodeId::clone(id))
            }
            Notification::MemberDown(id) => Effect::MemberDown(NodeId::clone(id)),
            Notification::Active => Effect::Joined,
            Notification::Idle => Effect::Isolated,
            Notification::Rejoin(id) => {
                *self.rejoined = true;
                Effect::Rejoined(NodeId::clone(id))
            }
            // Rename is followed by MemberUp/MemberDown when liveness changes, which is
            // all the driver acts on. Defunct cannot happen: our identity always renews.
            Notification::Rename(_, new) => Effect::MemberChanged(NodeId::clone(new)),
            Notification::Defunct => return,
        };
        self.effects.push_back(effect);
    }

    fn send_to(&mut self, to: SharedId, data: &[u8]) {
        let mut nonce = [0u8; 24];
        self.nonces.fill_bytes(&mut nonce);
        let packet = self.auth.seal(data, self.now_ms, nonce);
        self.effects.push_back(Effect::Send { to: to.addr().0, packet });
    }

    fn submit_after(&mut self, timer: foca::Timer<SharedId>, after: Duration) {
        self.effects.push_back(Effect::Schedule { after, timer: MembershipTimer::Foca(timer) });
    }
}

/// An [`Outbox`] that drops members coming up (see [`Membership::assume_members`]).
struct Quiet<'a>(Outbox<'a>);

impl foca::Runtime<SharedId> for Quiet<'_> {
    fn notify(&mut self, notification: Notification<'_, SharedId>) {
        if !matches!(notification, Notification::MemberUp(_)) {
            self.0.notify(notification);
        }
    }

    fn send_to(&mut self, to: SharedId, data: &[u8]) {
        self.0.send_to(to, data);
    }

    fn submit_after(&mut self, timer: foca::Timer<SharedId>, after: Duration) {
        self.0.submit_after(timer, after);
    }
}

impl Membership {
    /// Creates the state machine. `seed` drives every random choice (probe order, gossip
    /// targets, nonces); the same seed and the same inputs give the same outputs. `keys`
    /// seal and open datagrams (derive them once per process: see [`Keyring`]).
    pub fn new(
        identity: NodeId,
        seeds: &[SocketAddr],
        keys: Keyring,
        cfg: &GossipConfig,
        seed: u64,
    ) -> Self {
        Membership::with_interner(identity, seeds, keys, cfg, seed, IdInterner::default())
    }

    /// As [`Membership::new`], keeping the identities it learns in `interner`, which
    /// machines in one process may share (the simulator's thousands of nodes do: each
    /// identity is then held once, not once per node that knows it).
    pub fn with_interner(
        identity: NodeId,
        seeds: &[SocketAddr],
        keys: Keyring,
        cfg: &GossipConfig,
        seed: u64,
        interner: IdInterner,
    ) -> Self {
        let replay = ReplayGuard::new(cfg.replay_window_ms, cfg.replay_cache_max);
        let auth = PacketAuth::new(keys, cfg.packet_bytes_max, replay);
        let config = foca_config(cfg, auth.payload_bytes_max());
        let own = identity.gossip;
        let own_id = (identity.name.clone(), own, (identity.incarnation, identity.bump));
        let gossip = LoadGossip::default();
        let loads = gossip.table();
        let rng = StdRng::seed_from_u64(seed);
        let catch_up_rng = StdRng::seed_from_u64(seed ^ 0x6361_7463_6875_7021);
        let identity = interner.intern(SharedId::new(identity));
        let codec = InterningCodec(interner);
        let foca = Foca::with_custom_broadcast(identity, config.clone(), rng, codec, gossip);
        let mut seeds: Vec<SocketAddr> = seeds.iter().copied().filter(|s| *s != own).collect();
        seeds.sort();
        seeds.dedup();
        Membership {
            foca,
            config,
            gossip: cfg.clone(),
            loads,
            auth,
            founds: seeds.is_empty(),
            seeds,
            unanswered: 0,
            own: own_id,
            reannounce_after: Duration::from_millis(cfg.reannounce_interval_ms),
            effects: VecDeque::new(),
            joined: false,
            left: false,
            rejoined: false,
            rng: catch_up_rng,
            catch_up: CatchUp::default(),
            nonces: StdRng::seed_from_u64(seed ^ 0x6e6f_6e63_6573_2121),
            now_ms: 0,
        }
    }

    /// Whether a node alone at [`Membership::start`] founds a cluster (joined at once) or
    /// waits for its seeds. By default it founds only when created without seeds; a node
    /// whose seeds are names that did not resolve yet, or that remembers members from an
    /// earlier run, must not (it would serve alone while the cluster it belongs to runs).
    pub fn founding(mut self, founds: bool) -> Self {
        self.founds = founds;
        self
    }

    /// Founds after all: a node that waited for its seeds learned it may serve alone (its
    /// placement controller has no other voter). Joined at once; the seeds still hear it.
    pub fn found(&mut self) {
        self.founds = true;
        if !self.joined && !self.left {
            self.joined = true;
            self.effects.push_back(Effect::Joined);
        }
    }

    /// Replaces the seeds' addresses (the driver resolves seed names again and again).
    pub fn set_seeds(&mut self, seeds: &[SocketAddr]) {
        let own = self.own.1;
        let mut seeds: Vec<SocketAddr> = seeds.iter().copied().filter(|s| *s != own).collect();
        seeds.sort();
        seeds.dedup();
        self.seeds = seeds;
    }

    /// The seeds' addresses now.
    pub fn seeds(&self) -> &[SocketAddr] {
        &self.seeds
    }

    /// Sets the clock the next inputs are handled at (see the `now_ms` field).
    pub fn set_clock(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    fn outbox(&mut self) -> (&mut Swim, Outbox<'_>) {
        let outbox = Outbox {
            effects: &mut self.effects,
            auth: &self.auth,
            nonces: &mut self.nonces,
            now_ms: self.now_ms,
            rejoined: &mut self.rejoined,
            own: &self.own,
        };
        (&mut self.foca, outbox)
    }

    /// Starts the protocol: a founding node (see [`Membership::founding`]) is joined at
    /// once; any other announces to its seeds and keeps re-announcing until it has members.
    pub fn start(&mut self) {
        if self.founds {
            self.joined = true;
            self.effects.push_back(Effect::Joined);
        }
        self.announce_to_seeds();
        self.effects.push_back(Effect::Schedule {
            after: self.reannounce_after,
            timer: MembershipTimer::Reannounce,
        });
        self.start_catch_up();
    }

    fn start_catch_up(&mut self) {
        if !self.catch_up.running {
            self.catch_up = CatchUp { known: 0, quiet_rounds: 0, running: true };
            self.schedule_catch_up();
        }
    }

    fn schedule_catch_up(&mut self) {
        self.effects.push_back(Effect::Schedule {
            after: Duration::from_millis(self.gossip.gossip_interval_ms),
            timer: MembershipTimer::CatchUp,
        });
    }

    /// One catch-up round: stop after `CATCH_UP_QUIET_ROUNDS` rounds without news, else
    /// announce to `gossip_fanout` random active members.
    fn catch_up_round(&mut self) {
        let known = self.foca.num_members();
        // Alone with seeds that did not answer yet: nothing to ask, not quiet either. A
        // founder alone is quiet: members come to it.
        if known <= self.catch_up.known && (known > 0 || self.founds) {
            self.catch_up.quiet_rounds += 1;
        } else {
            self.catch_up.quiet_rounds = 0;
        }
        self.catch_up.known = known;
        if self.left || self.catch_up.quiet_rounds >= CATCH_UP_QUIET_ROUNDS {
            self.catch_up.running = false;
            return;
        }
        let wanted = self.gossip.gossip_fanout.max(1);
        let chosen: Vec<SharedId> = (self.foca.iter_members().map(|m| m.id()))
            .sample(&mut self.rng, wanted)
            .into_iter()
            .cloned()
            .collect();
        for id in chosen {
            let (foca, outbox) = self.outbox();
            foca.announce(id, outbox).expect("an announce always encodes");
        }
        self.schedule_catch_up();
    }

    fn announce_to_seeds(&mut self) {
        for i in 0..self.seeds.len() {
            let seed = SharedId::new(NodeId::seed(self.seeds[i]));
            let (foca, outbox) = self.outbox();
            // An announce only fails to encode if our own identity is larger than a
            // packet, which validated config rules out.
            foca.announce(seed, outbox).expect("announce to a seed always encodes");
        }
    }

    /// Feeds a datagram received on the gossip socket. Errors say why it was dropped;
    /// state is unchanged by a rejected datagram.
    pub fn handle_packet(&mut self, datagram: &[u8]) -> Result<(), PacketError> {
        let payload = self.auth.open(datagram, self.now_ms)?;
        let (foca, outbox) = self.outbox();
        foca.handle_data(&payload, outbox).map_err(PacketError::Protocol)?;
        self.track_join();
        Ok(())
    }

    /// Delivers a timer previously requested through [`Effect::Schedule`].
    pub fn handle_timer(&mut self, timer: MembershipTimer) -> Result<(), foca::Error> {
        match timer {
            MembershipTimer::Foca(t) => {
                let (foca, outbox) = self.outbox();
                foca.handle_timer(t, outbox)?;
            }
            MembershipTimer::CatchUp => self.catch_up_round(),
            MembershipTimer::Reannounce => {
                if !self.left {
                    if self.foca.num_members() == 0 {
                        self.announce_to_seeds();
                        if !self.founds {
                            self.unanswered += 1;
                            if self.unanswered.is_multiple_of(SEEDS_UNANSWERED_EVERY) {
                                self.effects.push_back(Effect::SeedsUnanswered {
                                    attempts: self.unanswered,
                                    seeds: self.seeds.clone(),
                                });
                            }
                        }
                    } else {
                        self.unanswered = 0;
                    }
                    self.effects.push_back(Effect::Schedule {
                        after: self.reannounce_after,
                        timer: MembershipTimer::Reannounce,
                    });
                }
            }
        }
        self.track_join();
        Ok(())
    }

    fn track_join(&mut self) {
        if !self.joined && self.foca.num_members() > 0 {
            self.joined = true;
            self.effects.push_back(Effect::Joined);
        }
        // Declared down and back: the members may have changed meanwhile.
        if std::mem::take(&mut self.rejoined) {
            self.start_catch_up();
        }
        self.track_size();
    }

    /// Keeps retransmissions at lambda * log N for the cluster this node sees now, so an
    /// update (a down-declaration above all: only the suspecting node runs the suspicion
    /// timer, everyone else learns it from gossip) still reaches every member of a large
    /// cluster.
    fn track_size(&mut self) {
        let tx = self.gossip.transmissions(self.foca.num_members() + 1);
        if tx != self.config.max_transmissions.get() {
            self.config.max_transmissions = NonZeroU8::new(tx).expect("transmissions() >= 1");
            // foca refuses only changed probe timings or newly enabled periodic tasks.
            self.foca.set_config(self.config.clone()).expect("only retransmissions changed");
        }
    }

    /// How many times this node piggybacks one update now.
    pub fn transmissions(&self) -> u8 {
        self.config.max_transmissions.get()
    }

    /// Announces this node again without `role` (a draining node gives up the
    /// `conversations` role, so every ring is rebuilt without it while it stays a member
    /// and keeps forwarding). foca declares the old identity down and spreads the new one,
    /// whose raised bump wins. Returns false if the node did not have the role.
    pub fn drop_role(&mut self, role: &str) -> bool {
        let mut id = NodeId::clone(self.foca.identity());
        if self.left || !id.has_role(role) {
            return false;
        }
        id.roles.retain(|r| r != role);
        id.bump = id.bump.wrapping_add(1);
        let (foca, outbox) = self.outbox();
        // A smaller identity than the current one always encodes.
        foca.change_identity(SharedId::new(id), outbox).expect("a changed identity always encodes");
        true
    }

    /// Publishes this node's load summary: it piggybacks on gossip until every member has
    /// it (or a newer one replaces it).
    pub fn publish_load(&mut self, summary: &LoadSummary) -> Result<(), foca::Error> {
        self.foca.add_broadcast(&summary.to_bytes()).map(|_| ())
    }

    /// The newest load summary of every node heard from (this one included), by name.
    pub fn loads(&self) -> std::collections::BTreeMap<String, LoadSummary> {
        self.loads.lock().expect("load table lock").clone()
    }

    /// Reads the newest load summaries in place (`loads` without the copy).
    pub fn with_loads<R>(
        &self,
        f: impl FnOnce(&std::collections::BTreeMap<String, LoadSummary>) -> R,
    ) -> R {
        f(&self.loads.lock().expect("load table lock"))
    }

    /// Leaves the cluster: declares this node down to a few members, who spread it.
    pub fn leave(&mut self) {
        if self.left {
            return;
        }
        self.left = true;
        let (foca, outbox) = self.outbox();
        // Leaving only fails if our own identity does not encode, ruled out above.
        foca.leave_cluster(outbox).expect("leave always encodes");
    }

    /// Takes `members` as up, as if gossip had told this node of each long ago: nothing is
    /// spread about them and no [`Effect::MemberUp`] is emitted for them (a driver that
    /// starts every node of an already formed cluster knows them all, as the simulator's
    /// formed start does). A node alone until then joins.
    pub fn assume_members(
        &mut self,
        members: impl Iterator<Item = SharedId>,
    ) -> Result<(), foca::Error> {
        let (foca, outbox) = self.outbox();
        foca.apply_many(members.map(Member::alive), false, Quiet(outbox))?;
        self.track_join();
        Ok(())
    }

    /// The next output to execute, in the order it was produced.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    pub fn identity(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Joined a cluster (or founded one), and has not left.
    pub fn is_joined(&self) -> bool {
        self.joined && !self.left
    }

    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Number of other members currently considered active (up or suspect).
    pub fn active_members(&self) -> usize {
        self.foca.num_members()
    }

    /// Visits every member this node knows, itself included, in no particular order and
    /// without copying (for simulations of thousands of nodes).
    pub fn visit_members(&self, mut f: impl FnMut(&NodeId, MemberState)) {
        for m in self.foca.iter_membership_state() {
            f(m.id(), member_state(m.state()));
        }
        f(self.foca.identity(), if self.left { MemberState::Down } else { MemberState::Up });
    }

    /// How many members this node knows in `state`, itself included (without copying).
    pub fn count(&self, state: MemberState) -> usize {
        let mut n = 0;
        self.visit_members(|_, s| n += usize::from(s == state));
        n
    }

    /// Every member this node knows, itself included, ordered by name, incarnation, then
    /// bump (a renamed identity after the one it replaces).
    pub fn members(&self) -> Vec<MemberView> {
        let mut out: Vec<MemberView> = self
            .foca
            .iter_membership_state()
            .map(|m| MemberView {
                id: NodeId::clone(m.id()),
                state: member_state(m.state()),
                is_self: false,
            })
            .collect();
        out.push(MemberView {
            id: NodeId::clone(self.foca.identity()),
            state: if self.left { MemberState::Down } else { MemberState::Up },
            is_self: true,
        });
        out.sort_by(|a, b| {
            (&a.id.name, a.id.incarnation, a.id.bump).cmp(&(
                &b.id.name,
                b.id.incarnation,
                b.id.bump,
            ))
        });
        out
    }

    /// How many members [`Membership::members`] would list as not down (this node
    /// included unless it left), without building the list.
    pub fn members_not_down(&self) -> usize {
        let others = self.foca.iter_membership_state().filter(|m| m.state() != State::Down);
        others.count() + usize::from(!self.left)
    }

    /// Updates waiting to be piggybacked; a large backlog means dissemination lags.
    pub fn updates_backlog(&self) -> usize {
        self.foca.updates_backlog()
    }
}

fn member_state(state: State) -> MemberState {
    match state {
        State::Alive => MemberState::Up,
        State::Suspect => MemberState::Suspect,
        State::Down => MemberState::Down,
    }
}

#[cfg(test)]
mod tests;
