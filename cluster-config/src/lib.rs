//! Node configuration for botclaw: the TOML file format, command-line overrides and
//! validation.
//!
//! Layout:
//! - [`RawNodeConfig`] is what a TOML file (or a set of flags) says, every field optional;
//! - [`RawNodeConfig::merge`] lays command-line overrides over the file;
//! - [`RawNodeConfig::validate`] turns it into a [`NodeConfig`], or a [`ConfigError`] that
//!   names the offending field.
//!
//! This crate does no IO beyond [`RawNodeConfig::from_file`], and depends on neither tokio
//! nor ractor, so the simulator can use the same types.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest node name accepted. Names travel in every gossip packet header.
pub const NAME_BYTES_MAX: usize = 64;
/// Most roles one node may declare, and the longest role name. Roles travel in every
/// gossip packet header, as the name does.
pub const ROLES_MAX: usize = 8;

/// Roles a node has unless its config names them: it owns conversations and serves the
/// built-in bot modules (catalog search, weather lookups).
pub const DEFAULT_ROLES: [&str; 3] = ["conversations", "catalog", "weather"];
pub const ROLE_BYTES_MAX: usize = 32;
/// Smallest gossip packet allowed: two maximal identities (header source and destination)
/// plus the authentication tag must fit.
pub const PACKET_BYTES_MIN: usize = 1200;
/// Smallest cluster secret accepted, in bytes.
pub const SECRET_BYTES_MIN: usize = 8;

/// A configuration problem, always naming the field it is about.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("missing required field `{field}`{hint}")]
    Missing { field: &'static str, hint: &'static str },
    #[error("invalid value for field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ConfigError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid { field, reason: reason.into() }
    }
}

/// Earlier secrets in `path`, one per non-empty line.
fn read_previous_secrets(path: &Path) -> Result<Vec<String>, ConfigError> {
    let field = "previous_secret_file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid(field, format!("{}: {e}", path.display())))?;
    let secrets: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if secrets.iter().any(|s| s.len() < SECRET_BYTES_MIN) {
        return Err(ConfigError::invalid(
            field,
            format!("every secret must be at least {SECRET_BYTES_MIN} bytes long"),
        ));
    }
    Ok(secrets)
}

/// The secret in `path`: its first line, trimmed.
fn read_secret_file(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid("secret_file", format!("{}: {e}", path.display())))?;
    let secret = text.lines().next().unwrap_or_default().trim().to_string();
    if secret.is_empty() {
        return Err(ConfigError::invalid("secret_file", format!("{} is empty", path.display())));
    }
    Ok(secret)
}

/// Failure detection and dissemination settings (SWIM, run by foca).
///
/// The defaults declare a crashed node down in about 1.5-2.5 s on a local cluster:
/// a probe period of 500 ms, a direct-probe timeout of 200 ms and 1 s of suspicion.
/// Shorter values detect faster but raise the chance that a node starved of CPU for a
/// moment is declared down by mistake (it then rejoins by itself, see README).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipConfig {
    /// How often each node probes one random member.
    pub probe_period_ms: u64,
    /// How long to wait for a direct probe reply before asking others to probe indirectly.
    pub probe_rtt_ms: u64,
    /// How many members are asked to probe indirectly.
    pub indirect_probes: usize,
    /// How long a suspected member has to refute the suspicion before it is declared down.
    pub suspect_to_down_ms: u64,
    /// How often a node pushes pending updates to `gossip_fanout` random members (and,
    /// after joining, asks as many random members for more members while their answers
    /// still bring new ones).
    pub gossip_interval_ms: u64,
    /// How many members each periodic gossip (or catch-up) round reaches.
    pub gossip_fanout: usize,
    /// How many times one update is piggybacked before it is dropped, at least.
    pub transmissions_min: u8,
    /// Scales retransmissions with the cluster: an update is sent
    /// `max(transmissions_min, transmissions_log_factor * ceil(log10(members + 1)))` times
    /// (SWIM's lambda * log N; memberlist's retransmit multiplier). Too few and, in a large
    /// cluster, a down-declaration can miss a node, which then keeps a crashed member
    /// "suspect" until it probes it itself.
    pub transmissions_log_factor: u8,
    /// How often a node that has no members re-announces itself to its seeds.
    pub reannounce_interval_ms: u64,
    /// How often seed names are resolved again (DNS: a headless Service's records follow
    /// its pods).
    pub seed_resolve_interval_ms: u64,
    /// How long a down member is remembered (prevents a stale identity from coming back).
    pub remove_down_after_ms: u64,
    /// Largest datagram sent or accepted, authentication tag included.
    pub packet_bytes_max: usize,
    /// A datagram sealed more than this before or after the receiver's clock is refused,
    /// and one received twice within it is refused as a replay: nodes' clocks must agree
    /// within it.
    pub replay_window_ms: u64,
    /// Datagrams remembered for replay detection; past it the oldest are forgotten and
    /// anything sealed before them is refused.
    pub replay_cache_max: usize,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            probe_period_ms: 500,
            probe_rtt_ms: 200,
            indirect_probes: 3,
            suspect_to_down_ms: 1000,
            gossip_interval_ms: 200,
            gossip_fanout: 3,
            transmissions_min: 8,
            transmissions_log_factor: 4,
            reannounce_interval_ms: 500,
            seed_resolve_interval_ms: 5_000,
            remove_down_after_ms: 24 * 3600 * 1000,
            packet_bytes_max: 1400,
            replay_window_ms: 60_000,
            replay_cache_max: 65_536,
        }
    }
}

impl GossipConfig {
    /// How many times one update is piggybacked in a cluster of `members` (see
    /// [`GossipConfig::transmissions_log_factor`]).
    pub fn transmissions(&self, members: usize) -> u8 {
        let mut digits = 0u32; // ceil(log10(members + 1)), in integers
        let mut reach = 1u64;
        while reach < members as u64 + 1 {
            reach = reach.saturating_mul(10);
            digits += 1;
        }
        let scaled = u32::from(self.transmissions_log_factor) * digits;
        scaled.clamp(u32::from(self.transmissions_min.max(1)), u32::from(u8::MAX)) as u8
    }

    /// Checks the relations between the fields; messages name the violated relation.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fields = [
            ("gossip.probe_period_ms", self.probe_period_ms),
            ("gossip.probe_rtt_ms", self.probe_rtt_ms),
            ("gossip.suspect_to_down_ms", self.suspect_to_down_ms),
            ("gossip.gossip_interval_ms", self.gossip_interval_ms),
            ("gossip.reannounce_interval_ms", self.reannounce_interval_ms),
            ("gossip.seed_resolve_interval_ms", self.seed_resolve_interval_ms),
            ("gossip.remove_down_after_ms", self.remove_down_after_ms),
            ("gossip.replay_window_ms", self.replay_window_ms),
            ("gossip.replay_cache_max", self.replay_cache_max as u64),
            ("gossip.indirect_probes", self.indirect_probes as u64),
            ("gossip.gossip_fanout", self.gossip_fanout as u64),
            ("gossip.transmissions_min", u64::from(self.transmissions_min)),
        ];
        positive(fields)?;
        if self.probe_rtt_ms >= self.probe_period_ms {
            return Err(ConfigError::invalid(
                "gossip.probe_rtt_ms",
                format!(
                    "must be less than gossip.probe_period_ms ({} >= {})",
                    self.probe_rtt_ms, self.probe_period_ms
                ),
            ));
        }
        if !(PACKET_BYTES_MIN..=65_000).contains(&self.packet_bytes_max) {
            return Err(ConfigError::invalid(
                "gossip.packet_bytes_max",
                format!("must be within {PACKET_BYTES_MIN}..=65000, got {}", self.packet_bytes_max),
            ));
        }
        Ok(())
    }
}

/// Limits of the inter-node link layer (ractor_cluster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// How often links are reconciled against membership (dial missing, drop stale).
    pub reconcile_interval_ms: u64,
    /// How long a dial may take to become a session before it is retried.
    pub dial_timeout_ms: u64,
    /// Largest inbound inter-node frame accepted.
    pub frame_bytes_max: u64,
    /// TCP keepalive on cluster-port connections (accepted ones; gossip decides when a
    /// peer is gone, this only frees sockets of peers that vanished).
    pub keepalive_ms: u64,
    /// Timeout of a cross-node call such as the link ping.
    pub call_timeout_ms: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            reconcile_interval_ms: 250,
            dial_timeout_ms: 2000,
            frame_bytes_max: 4 * 1024 * 1024,
            keepalive_ms: 60_000,
            call_timeout_ms: 1000,
        }
    }
}

/// Refuses the first of `fields` that is 0, naming it.
fn positive(fields: impl IntoIterator<Item = (&'static str, u64)>) -> Result<(), ConfigError> {
    match fields.into_iter().find(|&(_, value)| value == 0) {
        Some((field, _)) => Err(ConfigError::invalid(field, "must be greater than 0")),
        None => Ok(()),
    }
}

impl LinkConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive([
            ("link.reconcile_interval_ms", self.reconcile_interval_ms),
            ("link.dial_timeout_ms", self.dial_timeout_ms),
            ("link.keepalive_ms", self.keepalive_ms),
            ("link.frame_bytes_max", self.frame_bytes_max),
            ("link.call_timeout_ms", self.call_timeout_ms),
        ])?;
        Ok(())
    }
}

/// Sharding of conversations. Every node of a cluster must use the same values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// Number of shards conversations hash into. Fixed for the life of a cluster.
    pub shard_count: u32,
    /// Ring points (virtual nodes) of a node of capacity 100; scaled by capacity.
    pub vnodes: u32,
    /// How shards map to nodes (see README, "Placement"): `ring` (consistent hashing with
    /// virtual nodes, the default), `bounded` (consistent hashing with bounded loads) or
    /// `rendezvous` (highest random weight).
    pub strategy: PlacementStrategy,
    /// For `bounded`: no node owns more than (1 + this/1000) times its fair share.
    pub bound_epsilon_permille: u32,
}

/// How shards map to nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementStrategy {
    #[default]
    Ring,
    Bounded,
    Rendezvous,
}

/// Most shards a cluster may have.
pub const SHARD_COUNT_MAX: u32 = 1 << 20;
/// Most virtual nodes per 100 capacity.
pub const VNODES_MAX: u32 = 10_000;

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            shard_count: 262_144,
            vnodes: 4_000,
            strategy: PlacementStrategy::Ring,
            bound_epsilon_permille: 250,
        }
    }
}

impl PlacementConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=SHARD_COUNT_MAX).contains(&self.shard_count) {
            return Err(ConfigError::invalid(
                "placement.shard_count",
                format!("must be within 1..={SHARD_COUNT_MAX}"),
            ));
        }
        if !(1..=VNODES_MAX).contains(&self.vnodes) {
            return Err(ConfigError::invalid(
                "placement.vnodes",
                format!("must be within 1..={VNODES_MAX}"),
            ));
        }
        if !(1..=10_000).contains(&self.bound_epsilon_permille) {
            return Err(ConfigError::invalid(
                "placement.bound_epsilon_permille",
                "must be within 1..=10000",
            ));
        }
        Ok(())
    }
}

/// Conversation actors and their state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConversationConfig {
    /// An active conversation with no turn for this long is passivated (actor stopped,
    /// state kept in the store).
    pub idle_passivate_ms: u64,
    /// Turns kept per conversation (history and the window of processed message ids).
    pub turns_kept_max: usize,
    /// Bot used when the first message of a conversation names none.
    pub default_bot: String,
    /// Active conversations per node; past it new conversations are answered `busy`.
    pub active_max: usize,
    /// Entries of each conversation's own lookup cache.
    pub cache_entries_max: u64,
    /// Lifetime of an entry in a conversation's lookup cache.
    pub cache_ttl_ms: u64,
    /// Bytes of one turn as kept (message id, text, user and the bot's answers); a larger
    /// turn is answered `too_large` and not committed. With `turns_kept_max` and
    /// `bot_state_bytes_max` it bounds a conversation's size, which must fit well inside
    /// one inter-node frame (`link.frame_bytes_max`).
    pub turn_bytes_max: usize,
    /// Bytes of a bot's own state for one conversation; a turn that leaves more is
    /// answered `too_large` and not committed.
    pub bot_state_bytes_max: usize,
    /// Bytes of turns in one `history` answer (older turns are left for the next page).
    pub history_bytes_max: usize,
    /// Memory budget of the active conversations on a node: their kept state plus a
    /// fixed per-actor cost. Past it, idle conversations are passivated early and new
    /// ones are answered `busy`.
    pub active_bytes_max: u64,
}

impl Default for ConversationConfig {
    fn default() -> Self {
        ConversationConfig {
            idle_passivate_ms: 60_000,
            turns_kept_max: 64,
            default_bot: "echo".into(),
            active_max: 200_000,
            cache_entries_max: 64,
            cache_ttl_ms: 15 * 60 * 1000,
            turn_bytes_max: 24 * 1024,
            bot_state_bytes_max: 256 * 1024,
            history_bytes_max: 256 * 1024,
            active_bytes_max: 1 << 30,
        }
    }
}

/// The chat protocol listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrontendConfig {
    /// Longest request line accepted; longer lines are answered `too_large` and skipped.
    pub frame_bytes_max: usize,
    /// Requests in flight on one connection; past it, `busy`.
    pub conn_inflight_max: usize,
    /// Requests in flight on the whole node, from this node's clients and forwarded by
    /// other gateways; past it, `busy` with `retry_after_ms`. (Replica writes and module
    /// calls from peers complete turns admitted elsewhere: counted, never refused.)
    pub node_inflight_max: usize,
    /// Bytes of those requests (their text, ids and payloads) in flight on the node; past
    /// it, `busy` likewise.
    pub node_inflight_bytes_max: usize,
    /// Open client connections; past it, new connections are closed at once. With
    /// `client_tokens`, only connections that said `hello` count here...
    pub connections_max: usize,
    /// ...and those that have not yet count here instead (so anonymous sockets cannot
    /// lock token holders out), each closed if it has not said `hello` within
    /// `hello_timeout_ms`.
    pub unauthenticated_connections_max: usize,
    pub hello_timeout_ms: u64,
    /// A connection with no request in flight that sends nothing for this long is closed.
    pub idle_timeout_ms: u64,
    /// A connection whose answers cannot be written for this long (a client that does not
    /// read) is closed.
    pub write_timeout_ms: u64,
    /// Bytes of answers a connection may have pending (written but unread, or reserved by
    /// requests in flight); past it the node stops reading that connection's requests until
    /// the client reads, and a client that reads nothing for `write_timeout_ms` is cut off.
    pub output_buffer_bytes_max: usize,
    /// TCP keepalive on client connections: probes start after this long without traffic
    /// (a peer that vanished without a FIN is found and its connection closed).
    pub keepalive_ms: u64,
    /// How long a request may wait for its turn before the client gets `timeout`.
    pub turn_timeout_ms: u64,
    /// Back-off suggested to clients with `busy` and `unavailable`.
    pub retry_after_ms: u64,
    /// If non-empty, a connection must say `hello` with one of these tokens first. Holders
    /// of these tokens share one space of conversation ids.
    #[serde(deserialize_with = "one_or_many")]
    pub client_tokens: Vec<String>,
    /// Tokens by principal (`web = ["tok-1", "tok-2"]`): a connection that says `hello`
    /// with one of a principal's tokens sees only that principal's conversations (a
    /// conversation id names a different conversation under each principal, so no other
    /// token holder can read or continue it). Rotate a principal's token by listing the new
    /// one beside the old; its conversations stay reachable.
    pub principals: std::collections::BTreeMap<String, Vec<String>>,
    /// Failed `hello`s one address may make per `hello_failure_window_ms`; past it, its
    /// new connections are closed at once until the window (from its first failure) ends.
    pub hello_failures_max: u32,
    pub hello_failure_window_ms: u64,
    /// Addresses whose failed `hello`s are counted at once (the oldest go first).
    pub hello_failure_addresses_max: u64,
}

impl FrontendConfig {
    /// No tokens of any kind: every connection is served without `hello`.
    pub fn open(&self) -> bool {
        self.client_tokens.is_empty() && self.principals.is_empty()
    }
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            frame_bytes_max: 64 * 1024,
            conn_inflight_max: 1024,
            node_inflight_max: 16_384,
            node_inflight_bytes_max: 64 << 20,
            connections_max: 4096,
            unauthenticated_connections_max: 256,
            hello_timeout_ms: 5_000,
            idle_timeout_ms: 300_000,
            write_timeout_ms: 10_000,
            output_buffer_bytes_max: 8 * 1024 * 1024,
            keepalive_ms: 60_000,
            turn_timeout_ms: 10_000,
            retry_after_ms: 50,
            client_tokens: Vec::new(),
            principals: std::collections::BTreeMap::new(),
            hello_failures_max: 10,
            hello_failure_window_ms: 60_000,
            hello_failure_addresses_max: 100_000,
        }
    }
}

/// The in-process backend services the built-in bots call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// Simulated latency of one catalog lookup.
    pub catalog_latency_ms: u64,
    /// Simulated latency of one weather lookup.
    pub weather_latency_ms: u64,
    /// Entries of the node-wide cache of backend answers (shared by all conversations,
    /// concurrent misses coalesced into one call); 0 turns it off.
    pub shared_cache_entries_max: u64,
    /// How long a node-wide cache entry lives.
    pub shared_cache_ttl_ms: u64,
    /// Module requests (catalog, weather) one module service runs at once on a node with
    /// its role; more are answered `busy`.
    pub module_calls_inflight_max: usize,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            catalog_latency_ms: 20,
            weather_latency_ms: 50,
            shared_cache_entries_max: 100_000,
            shared_cache_ttl_ms: 900_000,
            module_calls_inflight_max: 1024,
        }
    }
}

/// The embedded storage engine of durable state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreEngine {
    /// fjall, a log-structured merge tree: `data_dir/state.fjall/`.
    #[default]
    Fjall,
    /// redb, copy-on-write B-trees: `data_dir/state.redb`.
    Redb,
}

/// Where conversation state is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Keep state in memory only (lost when the process exits).
    pub ephemeral: bool,
    /// Storage engine of durable state. A node refuses to start if its data directory
    /// holds the other engine's state.
    pub engine: StoreEngine,
    /// Most turns committed in one write transaction (one fsync).
    pub group_commit_max: usize,
    /// Commits waiting for the writer; senders wait when it is full.
    pub queue_max: usize,
    /// Bytes of the fjall writer's cache of each conversation's version, promise and bot
    /// (its meta row without the bot state), which spares a turn's write a read of the
    /// row. 0 turns it off.
    pub meta_cache_bytes_max: usize,
    /// A node whose store has not been able to write for this long (a full disk, an I/O
    /// error) hands its conversations over, leaves the cluster and exits with status 75,
    /// for its supervisor to restart it once the disk is fixed; it reopens from what was
    /// durable. 0 keeps it running, not ready, until the store writes again.
    pub unwritable_exit_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            ephemeral: false,
            engine: StoreEngine::default(),
            group_commit_max: 256,
            queue_max: 4096,
            meta_cache_bytes_max: 8 << 20,
            unwritable_exit_ms: 10_000,
        }
    }
}

/// How conversation state is replicated (see README, "Durability and failover").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Copies of each conversation: its owner plus the next `factor - 1` distinct live nodes
    /// on the ring (fewer while fewer nodes are up).
    pub factor: usize,
    /// Copies that must hold a turn before it is acknowledged (at most the live copies).
    pub write_quorum: usize,
    /// How long membership must stay unchanged before it becomes the baseline whose
    /// majority a node needs to serve (keep-majority).
    pub stable_after_ms: u64,
    /// Peers' ops waiting to be queued on the local store; more are refused (the owner
    /// sees a failed write and the client retries).
    pub incoming_max: usize,
    /// Writes and reads of one owned shard waiting (for the in-sync members'
    /// acknowledgements, or for earlier writes); more are answered `busy`.
    pub pending_per_shard_max: usize,
    /// Longest a drain (`botclaw drain`, SIGTERM) waits for this node's conversations to
    /// move away before it leaves anyway.
    pub drain_timeout_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            factor: 2,
            write_quorum: 2,
            stable_after_ms: 5000,
            incoming_max: 8192,
            pending_per_shard_max: 4096,
            drain_timeout_ms: 50_000,
        }
    }
}

/// The placement controller (see README, "Authoritative placement"): a Raft group that is
/// the only writer of the shard map. Raft settings count ticks of `tick_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// Route and replicate conversations by the controller's map (owners, in-sync replica
    /// sets, learners): the default. `false` selects the older mode, where each node
    /// derives owners from its own gossip view (kept to compare against; it can lose
    /// acknowledged turns while membership changes).
    pub authoritative: bool,
    /// The founding voters, by node name, identical on each of them (`botclaw up` lists its
    /// first three nodes). Empty: a node started without seeds founds the group alone. A
    /// node founds only on its first start (an empty controller log); every other node
    /// joins as a learner, and the leader makes learners voters up to `voters_target`.
    #[serde(deserialize_with = "one_or_many")]
    pub voters: Vec<String>,
    /// Voters the leader keeps: it promotes caught-up learners while there are fewer, and
    /// replaces a voter the failure detector declared dead for `voter_replace_after_ms`.
    pub voters_target: usize,
    pub voter_replace_after_ms: u64,
    /// One Raft tick.
    pub tick_ms: u64,
    /// Ticks without a leader's word before a follower stands (raised per node by up to as
    /// many again, from its seed).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Bytes of entries in one append message.
    pub message_bytes_max: u64,
    /// Append messages in flight to one peer.
    pub inflight_messages_max: usize,
    /// Bytes of proposals not yet committed (a leader refuses more).
    pub uncommitted_bytes_max: u64,
    /// Applied entries kept in the log before it is compacted behind a snapshot.
    pub log_entries_max: u64,
    /// How often the leader plans (membership, first owners, moves) while the map stands
    /// still...
    pub plan_interval_ms: u64,
    /// ...and how soon after its last round once the map changed (a move's next step
    /// follows the commit of the one before).
    pub plan_after_change_ms: u64,
    /// Shards with a learner at once (each streams its data: the cost of a move).
    pub moves_in_flight_max: usize,
    /// Shard changes one planning round proposes.
    pub changes_per_round_max: usize,
    /// Messages from peers waiting for the controller; more are dropped (Raft resends).
    pub inbound_queue_max: usize,
    /// Observers (nodes outside the group, which fetch the log) the leader keeps track
    /// of; one beyond them is answered but not told of new entries as they apply.
    pub observers_max: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            authoritative: true,
            voters: Vec::new(),
            voters_target: 3,
            voter_replace_after_ms: 10_000,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            message_bytes_max: 1 << 20,
            inflight_messages_max: 64,
            uncommitted_bytes_max: 16 << 20,
            log_entries_max: 1024,
            plan_interval_ms: 500,
            plan_after_change_ms: 50,
            moves_in_flight_max: 4096,
            changes_per_round_max: 16_384,
            inbound_queue_max: 4096,
            observers_max: 65_536,
        }
    }
}

impl ControllerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let fields = [
            ("controller.voters_target", self.voters_target as u64),
            ("controller.tick_ms", self.tick_ms),
            ("controller.election_ticks", self.election_ticks as u64),
            ("controller.heartbeat_ticks", self.heartbeat_ticks as u64),
            ("controller.message_bytes_max", self.message_bytes_max),
            ("controller.inflight_messages_max", self.inflight_messages_max as u64),
            ("controller.uncommitted_bytes_max", self.uncommitted_bytes_max),
            ("controller.log_entries_max", self.log_entries_max),
            ("controller.plan_interval_ms", self.plan_interval_ms),
            ("controller.plan_after_change_ms", self.plan_after_change_ms),
            ("controller.moves_in_flight_max", self.moves_in_flight_max as u64),
            ("controller.changes_per_round_max", self.changes_per_round_max as u64),
            ("controller.inbound_queue_max", self.inbound_queue_max as u64),
            ("controller.observers_max", self.observers_max as u64),
        ];
        positive(fields)?;
        if self.heartbeat_ticks >= self.election_ticks {
            return Err(ConfigError::invalid(
                "controller.heartbeat_ticks",
                "must be less than controller.election_ticks",
            ));
        }
        for (i, v) in self.voters.iter().enumerate() {
            validate_name(v).map_err(|_| {
                ConfigError::invalid("controller.voters", format!("{v:?} is not a node name"))
            })?;
            if self.voters[..i].contains(v) {
                return Err(ConfigError::invalid(
                    "controller.voters",
                    format!("{v:?} is listed twice"),
                ));
            }
        }
        Ok(())
    }
}

/// Load-aware rebalancing (see README, "Rebalancing").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RebalanceConfig {
    pub enabled: bool,
    /// How often a node considers giving shards away.
    pub interval_ms: u64,
    /// A node is overloaded above this load per capacity unit, in thousandths of the
    /// cluster's average (1150 = 1.15x), two rounds in a row.
    pub overload_permille: u32,
    /// It sheds down to, and receivers take up to, this (thousandths of the average).
    pub target_permille: u32,
    pub moves_per_round_max: usize,
    /// Rounds a moved shard stays put.
    pub cooldown_rounds: u64,
    /// No rebalancing while the cluster averages fewer turns/s per node than this.
    pub min_turns_per_s: u32,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            enabled: true,
            interval_ms: 5000,
            overload_permille: 1150,
            target_permille: 1050,
            moves_per_round_max: 8,
            cooldown_rounds: 6,
            min_turns_per_s: 20,
        }
    }
}

/// Requests that meet ownership changing hands (see README, "Live handoff"): held on the
/// node, in order per conversation, instead of refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoffConfig {
    /// A forwarded request this node disagrees about is held this long for its placement
    /// to change, then forwarded to the owner it sees.
    pub hold_grace_ms: u64,
    /// A held request fails (`unavailable`) after waiting this long.
    pub hold_timeout_ms: u64,
    /// Forwards after which a request is only held or run, never forwarded again.
    pub hops_max: u8,
    /// Requests held at once on a node; more are refused (`busy`).
    pub held_requests_max: usize,
}

/// The name node certificates carry and peers check, unless `tls.server_name` says otherwise.
pub const DEFAULT_TLS_SERVER_NAME: &str = "botclaw-node";

/// TLS on the cluster port (mutual: every node presents a certificate of the cluster CA and
/// checks its peer's) and, optionally, on the client port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM files: the cluster CA, this node's certificate chain and its private key.
    /// `botclaw tls init` writes a CA and node certificates for a quick start; `botclaw up`
    /// uses it for the local demo.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name a node's certificate must carry (a DNS subject alternative name) for its
    /// peers to accept it.
    pub server_name: String,
    /// Also serve the chat protocol over TLS (same certificate; clients are not asked for one).
    pub client_port: bool,
    /// A TLS handshake on the cluster or client port must finish within this.
    pub handshake_timeout_ms: u64,
    /// Cluster-port connections still in their handshake; past it new ones are closed at once.
    pub unauthenticated_connections_max: usize,
    /// Cluster-port connections in all.
    pub connections_max: usize,
    /// Allow a cluster port reachable from other hosts without TLS (user text would cross
    /// the network in clear).
    pub plaintext_allowed: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: DEFAULT_TLS_SERVER_NAME.into(),
            client_port: false,
            handshake_timeout_ms: 5_000,
            unauthenticated_connections_max: 64,
            connections_max: 1024,
            plaintext_allowed: false,
        }
    }
}

impl TlsConfig {
    /// Whether certificates are configured (all three files).
    pub fn enabled(&self) -> bool {
        self.ca_file.is_some()
    }

    fn validate(&self, cluster_addr: SocketAddr) -> Result<(), ConfigError> {
        let set =
            [&self.ca_file, &self.cert_file, &self.key_file].iter().filter(|f| f.is_some()).count();
        if set != 0 && set != 3 {
            return Err(ConfigError::invalid(
                "tls.ca_file",
                "set all of ca_file, cert_file and key_file, or none",
            ));
        }
        positive([
            ("tls.handshake_timeout_ms", self.handshake_timeout_ms),
            ("tls.unauthenticated_connections_max", self.unauthenticated_connections_max as u64),
            ("tls.connections_max", self.connections_max as u64),
        ])?;
        if self.client_port && !self.enabled() {
            return Err(ConfigError::invalid(
                "tls.client_port",
                "needs ca_file, cert_file and key_file",
            ));
        }
        if !self.enabled() && !cluster_addr.ip().is_loopback() && !self.plaintext_allowed {
            return Err(ConfigError::invalid(
                "cluster_addr",
                format!(
                    "{cluster_addr} is reachable from other hosts and [tls] has no certificates: \
                     conversations would cross the network in clear; set tls.ca_file, cert_file \
                     and key_file (`botclaw tls init` makes them), or tls.plaintext_allowed = true"
                ),
            ));
        }
        Ok(())
    }
}

/// The admin HTTP port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// If non-empty, every mutating endpoint (`POST /drain`, `/shard/force`,
    /// `/fault/isolate`) needs `Authorization: Bearer <one of these>` (the CLI sends
    /// `BOTCLAW_ADMIN_TOKEN`). Read-only endpoints stay open.
    #[serde(deserialize_with = "one_or_many")]
    pub tokens: Vec<String>,
    /// Allow `admin_addr` on a non-loopback address without `tokens` (anyone who reaches
    /// the port can then stop the node).
    pub open_bind_allowed: bool,
    /// Connections open at once; more are closed as they arrive (and counted).
    pub connections_max: usize,
    /// Time a connection has to send a request's headers before it is closed.
    pub header_timeout_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            tokens: Vec::new(),
            open_bind_allowed: false,
            connections_max: 64,
            header_timeout_ms: 5000,
        }
    }
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            hold_grace_ms: 300,
            hold_timeout_ms: 3000,
            hops_max: 3,
            held_requests_max: 10_000,
        }
    }
}

/// Test hooks. Off unless a config file turns them on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Serve `POST /fault/isolate?on=true|false` on the admin port (drop every gossip
    /// datagram to and from peers: a network partition of this node) and offer the
    /// `chaos` bot (turns that panic, fail or stall on request). For tests only.
    pub injection: bool,
}

/// A service botclaw calls over HTTP: a bot (`[[bots]]`: for each turn the conversation's
/// owner POSTs the turn and the bot's state to one of `urls` and keeps the state it gets
/// back) or a module (`[[modules]]`: bots' `module(name, key, request)` calls, cached by
/// the node). See README, "Bot and module services".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// The bot's name, as clients ask for it (`say`'s `bot`), or the module's, as bots
    /// call it.
    pub name: String,
    /// The protocol: `http` (the only one).
    pub kind: String,
    /// The service's instances, each `http://host:port/path`; calls are balanced over
    /// them by the fewer calls outstanding of two drawn.
    pub urls: Vec<String>,
    /// A call's whole time (every attempt) at most this long; then it fails with
    /// `timeout` (a bot's turn applies nothing).
    pub timeout_ms: u64,
    /// Calls in flight from this node to the service; past it a call fails with
    /// `unavailable` at once.
    pub concurrency_max: usize,
    /// Calls in flight from this node to one instance.
    pub instance_concurrency_max: usize,
    /// Attempts per call (on another instance where there is one) after a refused
    /// connection or a 5xx answer, within `timeout_ms` and the retry budget.
    pub attempts_max: u32,
    /// Retries allowed as a share of calls, in percent (plus `retry_budget_min_per_s`):
    /// under an outage retries stay a fraction of the load.
    pub retry_budget_percent: u32,
    /// Retries a second allowed however few calls there are.
    pub retry_budget_min_per_s: u32,
    /// Failures in a row that open an instance's circuit breaker (it is ejected).
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before it lets one trial through.
    pub breaker_open_ms: u64,
    /// Active health checks: `GET` this path on each instance (its URL's path replaced)
    /// every `health_interval_ms`; empty turns them off. 2xx passes.
    pub health_path: String,
    pub health_interval_ms: u64,
    /// Failed checks in a row that take an instance out of the balancing (one passing
    /// check brings it back).
    pub health_failures: u32,
    /// Largest answer read from the service.
    pub answer_bytes_max: usize,
    /// Modules: how long an answer is cached when the service sends no
    /// `Cache-Control: max-age` (0: not cached; `no-store`, `no-cache`, `max-age=0`
    /// are never cached).
    pub cache_ttl_ms: u64,
    /// Modules: the node-wide cache of this module's answers, in bytes of keys and
    /// answers (0 turns it off).
    pub cache_bytes_max: u64,
    /// Bots: rounds of module calls a turn may ask for before it must answer.
    pub module_rounds_max: u32,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            name: String::new(),
            kind: "http".into(),
            urls: Vec::new(),
            timeout_ms: 2_000,
            concurrency_max: 256,
            instance_concurrency_max: 64,
            attempts_max: 2,
            retry_budget_percent: 20,
            retry_budget_min_per_s: 10,
            breaker_failures: 5,
            breaker_open_ms: 2_000,
            health_path: String::new(),
            health_interval_ms: 1_000,
            health_failures: 2,
            answer_bytes_max: 1024 * 1024,
            cache_ttl_ms: 0,
            cache_bytes_max: 16 * 1024 * 1024,
            module_rounds_max: 4,
        }
    }
}

impl ServiceConfig {
    /// Checks one entry of `section` (`bots` or `modules`).
    fn validate(&self, section: &'static str) -> Result<(), ConfigError> {
        // Field names are built on the error path only (the process stops on it).
        let field =
            |f: &str| -> &'static str { Box::leak(format!("{section}.{f}").into_boxed_str()) };
        let what = if section == "bots" { "bot" } else { "module" };
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
        let name = &self.name;
        if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
            return Err(ConfigError::invalid(
                field("name"),
                format!("{name:?}: a {what} name is 1-64 of a-z, 0-9, '-', '_'"),
            ));
        }
        if self.kind != "http" {
            return Err(ConfigError::invalid(
                field("kind"),
                format!("{what} {name}: {:?}: only \"http\"", self.kind),
            ));
        }
        if self.urls.is_empty() {
            return Err(ConfigError::invalid(
                field("urls"),
                format!("{what} {name}: at least one URL"),
            ));
        }
        for url in &self.urls {
            let host = url.strip_prefix("http://").and_then(|rest| rest.split('/').next());
            if host.is_none_or(|h| h.is_empty() || h.contains('@')) {
                return Err(ConfigError::invalid(
                    field("urls"),
                    format!("{what} {name}: {url:?} is not an http://host:port/path URL"),
                ));
            }
        }
        if !self.health_path.is_empty() && !self.health_path.starts_with('/') {
            return Err(ConfigError::invalid(
                field("health_path"),
                format!("{what} {name}: {:?} must start with '/'", self.health_path),
            ));
        }
        let fields = [
            ("timeout_ms", self.timeout_ms),
            ("concurrency_max", self.concurrency_max as u64),
            ("instance_concurrency_max", self.instance_concurrency_max as u64),
            ("attempts_max", u64::from(self.attempts_max)),
            ("breaker_failures", u64::from(self.breaker_failures)),
            ("breaker_open_ms", self.breaker_open_ms),
            ("health_interval_ms", self.health_interval_ms),
            ("health_failures", u64::from(self.health_failures)),
            ("answer_bytes_max", self.answer_bytes_max as u64),
            ("module_rounds_max", u64::from(self.module_rounds_max)),
        ];
        for (f, value) in fields {
            if value == 0 {
                return Err(ConfigError::invalid(
                    field(f),
                    format!("{what} {name}: must be greater than 0"),
                ));
            }
        }
        if section == "bots" && self.cache_ttl_ms != 0 {
            return Err(ConfigError::invalid(
                field("cache_ttl_ms"),
                format!("bot {name}: only module answers are cached (a bot's turns never are)"),
            ));
        }
        Ok(())
    }

    /// Checks every entry of `section`, and that no name is declared twice.
    fn validate_all(list: &[ServiceConfig], section: &'static str) -> Result<(), ConfigError> {
        let mut names = std::collections::BTreeSet::new();
        for entry in list {
            entry.validate(section)?;
            if !names.insert(entry.name.as_str()) {
                let field: &'static str = Box::leak(format!("{section}.name").into_boxed_str());
                return Err(ConfigError::invalid(
                    field,
                    format!("{} is declared twice", entry.name),
                ));
            }
        }
        Ok(())
    }
}

/// A node configuration as written in a file or given by flags: everything optional, so
/// that flags can override the file and validation can name what is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeConfig {
    pub name: Option<String>,
    pub client_addr: Option<String>,
    pub cluster_addr: Option<String>,
    pub gossip_addr: Option<String>,
    pub admin_addr: Option<String>,
    #[serde(default, deserialize_with = "opt_one_or_many")]
    pub seeds: Option<Vec<String>>,
    /// The host (IP address or DNS name) peers and clients reach this node at, for every
    /// port: required in effect when a port binds a wildcard address (`0.0.0.0`, `::`)
    /// behind NAT or in a container; derived otherwise (see README, "Deploying").
    pub advertise_host: Option<String>,
    /// Full `host:port` overrides per port, for port mappings (NAT, container ports).
    pub advertise_client_addr: Option<String>,
    pub advertise_cluster_addr: Option<String>,
    pub advertise_gossip_addr: Option<String>,
    pub advertise_admin_addr: Option<String>,
    pub secret: Option<String>,
    /// A file holding the secret (first line; keep it mode 0600): keeps it out of config
    /// files, the environment and `ps`.
    pub secret_file: Option<PathBuf>,
    /// A file of earlier cluster secrets, one per line, still accepted on gossip while a
    /// new secret rolls out (see the README's key rotation).
    pub previous_secret_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_one_or_many")]
    pub roles: Option<Vec<String>>,
    pub capacity: Option<u32>,
    pub gossip: Option<GossipConfig>,
    pub link: Option<LinkConfig>,
    pub placement: Option<PlacementConfig>,
    pub conversations: Option<ConversationConfig>,
    pub frontend: Option<FrontendConfig>,
    pub backends: Option<BackendConfig>,
    pub store: Option<StoreConfig>,
    pub replication: Option<ReplicationConfig>,
    pub rebalance: Option<RebalanceConfig>,
    pub controller: Option<ControllerConfig>,
    pub handoff: Option<HandoffConfig>,
    pub fault: Option<FaultConfig>,
    pub admin: Option<AdminConfig>,
    pub tls: Option<TlsConfig>,
    /// Bots that run as HTTP services.
    pub bots: Option<Vec<ServiceConfig>>,
    /// Bot modules that run as HTTP services.
    pub modules: Option<Vec<ServiceConfig>>,
}

/// A validated node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeConfig {
    pub name: String,
    pub client_addr: SocketAddr,
    pub cluster_addr: SocketAddr,
    pub gossip_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Members to join through, by `host:port` (a name is resolved again and again: every
    /// address it has is a seed).
    pub seeds: Vec<HostPort>,
    /// What this node announces instead of its bind addresses.
    pub advertise: Advertise,
    #[serde(skip)]
    pub secret: String,
    /// Earlier secrets still accepted on gossip (key rotation).
    #[serde(skip)]
    pub previous_secrets: Vec<String>,
    pub data_dir: PathBuf,
    pub roles: Vec<String>,
    /// Relative weight of this node in placement (virtual nodes on the ring).
    pub capacity: u32,
    pub gossip: GossipConfig,
    pub link: LinkConfig,
    pub placement: PlacementConfig,
    pub conversations: ConversationConfig,
    pub frontend: FrontendConfig,
    pub backends: BackendConfig,
    pub store: StoreConfig,
    pub replication: ReplicationConfig,
    pub rebalance: RebalanceConfig,
    pub controller: ControllerConfig,
    pub handoff: HandoffConfig,
    pub fault: FaultConfig,
    pub admin: AdminConfig,
    pub tls: TlsConfig,
    pub bots: Vec<ServiceConfig>,
    /// Bot modules that run as HTTP services.
    pub modules: Vec<ServiceConfig>,
}

/// Default addresses of a node started with no flags: node 0 of `botclaw up`.
pub const DEFAULT_BASE_PORT: u16 = 7000;

/// The four ports of node `index` in a local cluster whose first port is `base`:
/// client `base+10i`, cluster `+1`, gossip `+2`, admin `+3`.
pub fn local_ports(base: u16, index: u16) -> [u16; 4] {
    let p = base + 10 * index;
    [p, p + 1, p + 2, p + 3]
}

impl RawNodeConfig {
    /// Reads and parses a TOML file; unknown fields are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::load(Some(path), std::iter::empty())
    }

    /// The file at `path` (if any) with the `BOTCLAW_*` variables of `vars` laid over it,
    /// field by field: `BOTCLAW_NAME` sets `name`, `BOTCLAW_GOSSIP__PROBE_PERIOD_MS` sets
    /// `[gossip] probe_period_ms` (a double underscore descends into a section). A value
    /// is read as TOML if it is one (numbers, booleans, `[...]` arrays), as a list if it
    /// holds commas (`BOTCLAW_SEEDS=a:7002,b:7002`), else as a string. A variable that
    /// names no field is an error, except those in [`ENV_NOT_FIELDS`].
    pub fn load(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let file_text = match path {
            None => String::new(),
            Some(path) => std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
        };
        let mut table: toml::Table =
            file_text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.map_or("(no file)".into(), |p| p.display().to_string()),
                reason: e.to_string().trim_end().to_string(),
            })?;
        let mut from_env = Vec::new();
        for (key, value) in vars {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else { continue };
            if ENV_NOT_FIELDS.iter().any(|n| key == *n || (n.ends_with('_') && key.starts_with(n)))
            {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::Parse {
                    path: format!("environment variable {key}"),
                    reason: "empty field name".into(),
                });
            }
            insert_path(&mut table, &path, env_value(&value));
            from_env.push(key);
        }
        let source = match (path, from_env.is_empty()) {
            (Some(p), true) => p.display().to_string(),
            (Some(p), false) => format!("{} with {}", p.display(), from_env.join(", ")),
            (None, _) => format!("environment ({})", from_env.join(", ")),
        };
        // Through text: the parser's errors name the key (and, with nothing from the
        // environment, the file's own line).
        let text = if from_env.is_empty() {
            file_text
        } else {
            toml::to_string(&table)
                .map_err(|e| ConfigError::Parse { path: source.clone(), reason: e.to_string() })?
        };
        Self::from_toml(&text).map_err(|reason| ConfigError::Parse { path: source, reason })
    }

    /// Parses TOML text; the error text names the offending key.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Renders this configuration as TOML (used by `botclaw up` to write node files).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config types always serialize")
    }

    /// Lays `over` on top of `self`: every field set in `over` wins.
    pub fn merge(self, over: RawNodeConfig) -> RawNodeConfig {
        RawNodeConfig {
            name: over.name.or(self.name),
            client_addr: over.client_addr.or(self.client_addr),
            cluster_addr: over.cluster_addr.or(self.cluster_addr),
            gossip_addr: over.gossip_addr.or(self.gossip_addr),
            admin_addr: over.admin_addr.or(self.admin_addr),
            seeds: over.seeds.or(self.seeds),
            advertise_host: over.advertise_host.or(self.advertise_host),
            advertise_client_addr: over.advertise_client_addr.or(self.advertise_client_addr),
            advertise_cluster_addr: over.advertise_cluster_addr.or(self.advertise_cluster_addr),
            advertise_gossip_addr: over.advertise_gossip_addr.or(self.advertise_gossip_addr),
            advertise_admin_addr: over.advertise_admin_addr.or(self.advertise_admin_addr),
            // A secret given one way replaces one given the other way.
            secret: over.secret.clone().or(self.secret.filter(|_| over.secret_file.is_none())),
            secret_file: over.secret_file.or(self.secret_file.filter(|_| over.secret.is_none())),
            previous_secret_file: over.previous_secret_file.or(self.previous_secret_file),
            data_dir: over.data_dir.or(self.data_dir),
            roles: over.roles.or(self.roles),
            capacity: over.capacity.or(self.capacity),
            gossip: over.gossip.or(self.gossip),
            link: over.link.or(self.link),
            placement: over.placement.or(self.placement),
            conversations: over.conversations.or(self.conversations),
            frontend: over.frontend.or(self.frontend),
            backends: over.backends.or(self.backends),
            store: over.store.or(self.store),
            replication: over.replication.or(self.replication),
            rebalance: over.rebalance.or(self.rebalance),
            controller: over.controller.or(self.controller),
            handoff: over.handoff.or(self.handoff),
            fault: over.fault.or(self.fault),
            admin: over.admin.or(self.admin),
            tls: over.tls.or(self.tls),
            bots: over.bots.or(self.bots),
            modules: over.modules.or(self.modules),
        }
    }

    /// Checks every field and fills defaults. Addresses default to node 0 of a local
    /// cluster on port 7000; the secret has no default.
    pub fn validate(self) -> Result<NodeConfig, ConfigError> {
        let [client, cluster, gossip_port, admin] = local_ports(DEFAULT_BASE_PORT, 0);
        let client_addr = parse_addr("client_addr", self.client_addr, client)?;
        let cluster_addr = parse_addr("cluster_addr", self.cluster_addr, cluster)?;
        let gossip_addr = parse_addr("gossip_addr", self.gossip_addr, gossip_port)?;
        let admin_addr = parse_addr("admin_addr", self.admin_addr, admin)?;
        let admin_cfg = self.admin.unwrap_or_default();
        if !admin_addr.ip().is_loopback()
            && admin_cfg.tokens.is_empty()
            && !admin_cfg.open_bind_allowed
        {
            return Err(ConfigError::invalid(
                "admin_addr",
                format!(
                    "{admin_addr} is reachable from other hosts and [admin] tokens is empty: \
                     anyone could drain the node; set admin.tokens (or admin.open_bind_allowed \
                     = true)"
                ),
            ));
        }
        positive([
            ("admin.connections_max", admin_cfg.connections_max as u64),
            ("admin.header_timeout_ms", admin_cfg.header_timeout_ms),
        ])?;
        let name = self.name.unwrap_or_else(|| format!("node-{}", gossip_addr.port()));
        validate_name(&name)?;
        let mut seeds = Vec::new();
        for seed in self.seeds.unwrap_or_default() {
            seeds.push(seed.parse::<HostPort>().map_err(|e| ConfigError::invalid("seeds", e))?);
        }
        let advertised = |field: &'static str, value: Option<String>| {
            value
                .map(|v| {
                    let hp = v.parse::<HostPort>().map_err(|e| ConfigError::invalid(field, e))?;
                    if hp.ip().is_some_and(|ip| ip.is_unspecified()) {
                        return Err(ConfigError::invalid(
                            field,
                            format!("{hp} is a wildcard: peers cannot reach it"),
                        ));
                    }
                    Ok(hp)
                })
                .transpose()
        };
        let advertise = Advertise {
            host: match self.advertise_host {
                None => None,
                Some(host) => {
                    let hp = HostPort::from_host(&host, 1)
                        .map_err(|e| ConfigError::invalid("advertise_host", e))?;
                    if hp.ip().is_some_and(|ip| ip.is_unspecified()) {
                        return Err(ConfigError::invalid(
                            "advertise_host",
                            format!("{host} is a wildcard: peers cannot reach it"),
                        ));
                    }
                    Some(hp.host)
                }
            },
            client: advertised("advertise_client_addr", self.advertise_client_addr)?,
            cluster: advertised("advertise_cluster_addr", self.advertise_cluster_addr)?,
            gossip: advertised("advertise_gossip_addr", self.advertise_gossip_addr)?,
            admin: advertised("advertise_admin_addr", self.advertise_admin_addr)?,
        };
        let secret = match (self.secret, self.secret_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid("secret_file", "set either secret or secret_file"))
            }
            (Some(secret), None) => secret,
            (None, Some(path)) => read_secret_file(&path)?,
            (None, None) => {
                return Err(ConfigError::Missing {
                    field: "secret",
                    hint: " (set secret_file in the file, --secret-file, BOTCLAW_SECRET_FILE or \
                           BOTCLAW_SECRET)",
                })
            }
        };
        if secret.len() < SECRET_BYTES_MIN {
            return Err(ConfigError::invalid(
                "secret",
                format!("must be at least {SECRET_BYTES_MIN} bytes long"),
            ));
        }
        let previous_secrets = match &self.previous_secret_file {
            None => Vec::new(),
            Some(path) => read_previous_secrets(path)?,
        };
        let tls = self.tls.unwrap_or_default();
        let bots = self.bots.unwrap_or_default();
        ServiceConfig::validate_all(&bots, "bots")?;
        let modules = self.modules.unwrap_or_default();
        ServiceConfig::validate_all(&modules, "modules")?;
        tls.validate(cluster_addr)?;
        let gossip = self.gossip.unwrap_or_default();
        gossip.validate()?;
        let link = self.link.unwrap_or_default();
        link.validate()?;
        let placement = self.placement.unwrap_or_default();
        placement.validate()?;
        let conversations = self.conversations.unwrap_or_default();
        let frontend = self.frontend.unwrap_or_default();
        let backends = self.backends.unwrap_or_default();
        let store = self.store.unwrap_or_default();
        if store.group_commit_max == 0 || store.queue_max == 0 {
            return Err(ConfigError::invalid(
                "store.group_commit_max",
                "store.group_commit_max and store.queue_max must be greater than 0",
            ));
        }
        let replication = self.replication.unwrap_or_default();
        positive([
            ("replication.factor", replication.factor as u64),
            ("replication.write_quorum", replication.write_quorum as u64),
            ("replication.incoming_max", replication.incoming_max as u64),
            ("replication.pending_per_shard_max", replication.pending_per_shard_max as u64),
        ])?;
        if replication.write_quorum > replication.factor {
            return Err(ConfigError::invalid(
                "replication.write_quorum",
                "must not exceed replication.factor",
            ));
        }
        let rebalance = self.rebalance.unwrap_or_default();
        if rebalance.target_permille < 1000
            || rebalance.overload_permille <= rebalance.target_permille
        {
            return Err(ConfigError::invalid(
                "rebalance.overload_permille",
                "need 1000 <= target_permille < overload_permille (hysteresis)",
            ));
        }
        if rebalance.interval_ms == 0 {
            return Err(ConfigError::invalid("rebalance.interval_ms", "must be greater than 0"));
        }
        let controller = self.controller.unwrap_or_default();
        controller.validate()?;
        let handoff = self.handoff.unwrap_or_default();
        if handoff.hold_timeout_ms == 0 || handoff.held_requests_max == 0 || handoff.hops_max == 0 {
            return Err(ConfigError::invalid(
                "handoff.hold_timeout_ms",
                "handoff.hold_timeout_ms, held_requests_max and hops_max must be greater than 0",
            ));
        }
        if handoff.hold_grace_ms > handoff.hold_timeout_ms {
            return Err(ConfigError::invalid(
                "handoff.hold_grace_ms",
                "must not exceed handoff.hold_timeout_ms",
            ));
        }
        validate_runtime(&conversations, &frontend, &backends)?;
        validate_sizes(&conversations, &frontend, &link)?;
        let roles =
            self.roles.unwrap_or_else(|| DEFAULT_ROLES.iter().map(|r| r.to_string()).collect());
        if roles.len() > ROLES_MAX {
            return Err(ConfigError::invalid("roles", format!("at most {ROLES_MAX} roles")));
        }
        for role in &roles {
            let valid = !role.is_empty()
                && role.len() <= ROLE_BYTES_MAX
                && role.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !valid {
                return Err(ConfigError::invalid(
                    "roles",
                    format!(
                        "{role:?} is not a role name (1..={ROLE_BYTES_MAX} letters, digits, '-')"
                    ),
                ));
            }
        }
        let capacity = self.capacity.unwrap_or(100);
        if !(1..=10_000).contains(&capacity) {
            return Err(ConfigError::invalid("capacity", "must be within 1..=10000"));
        }
        let mut distinct = vec![client_addr, cluster_addr, gossip_addr, admin_addr];
        distinct.sort();
        distinct.dedup();
        if distinct.len() != 4 {
            return Err(ConfigError::invalid(
                "client_addr",
                "client_addr, cluster_addr, gossip_addr and admin_addr must all differ",
            ));
        }
        let data_dir = self.data_dir.unwrap_or_else(|| PathBuf::from("botclaw-data").join(&name));
        Ok(NodeConfig {
            name,
            client_addr,
            cluster_addr,
            gossip_addr,
            admin_addr,
            seeds,
            advertise,
            secret,
            previous_secrets,
            data_dir,
            roles,
            capacity,
            gossip,
            link,
            placement,
            conversations,
            frontend,
            backends,
            store,
            replication,
            rebalance,
            controller,
            handoff,
            fault: self.fault.unwrap_or_default(),
            admin: admin_cfg,
            tls,
            bots,
            modules,
        })
    }
}

fn validate_runtime(
    c: &ConversationConfig,
    f: &FrontendConfig,
    b: &BackendConfig,
) -> Result<(), ConfigError> {
    let fields = [
        ("conversations.idle_passivate_ms", c.idle_passivate_ms),
        ("conversations.turns_kept_max", c.turns_kept_max as u64),
        ("conversations.active_max", c.active_max as u64),
        ("conversations.cache_entries_max", c.cache_entries_max),
        ("conversations.cache_ttl_ms", c.cache_ttl_ms),
        ("frontend.conn_inflight_max", f.conn_inflight_max as u64),
        ("frontend.node_inflight_max", f.node_inflight_max as u64),
        ("frontend.node_inflight_bytes_max", f.node_inflight_bytes_max as u64),
        ("frontend.connections_max", f.connections_max as u64),
        ("frontend.unauthenticated_connections_max", f.unauthenticated_connections_max as u64),
        ("frontend.hello_timeout_ms", f.hello_timeout_ms),
        ("frontend.idle_timeout_ms", f.idle_timeout_ms),
        ("frontend.write_timeout_ms", f.write_timeout_ms),
        ("frontend.keepalive_ms", f.keepalive_ms),
        ("frontend.hello_failures_max", u64::from(f.hello_failures_max)),
        ("frontend.hello_failure_window_ms", f.hello_failure_window_ms),
        ("frontend.hello_failure_addresses_max", f.hello_failure_addresses_max),
        ("frontend.turn_timeout_ms", f.turn_timeout_ms),
        ("backends.module_calls_inflight_max", b.module_calls_inflight_max as u64),
    ];
    positive(fields)?;
    if !(256..=16 * 1024 * 1024).contains(&f.frame_bytes_max) {
        return Err(ConfigError::invalid(
            "frontend.frame_bytes_max",
            "must be within 256..=16777216",
        ));
    }
    if c.default_bot.is_empty() {
        return Err(ConfigError::invalid("conversations.default_bot", "must not be empty"));
    }
    let mut seen: std::collections::BTreeSet<&str> =
        f.client_tokens.iter().map(String::as_str).collect();
    for (name, tokens) in &f.principals {
        if let Some(t) = tokens.iter().find(|t| !seen.insert(t.as_str())) {
            let shown: String = t.chars().take(4).collect();
            return Err(ConfigError::invalid(
                "frontend.principals",
                format!("a token ({shown}...) is listed twice: each token names one principal"),
            ));
        }
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_');
        if !ok {
            return Err(ConfigError::invalid(
                "frontend.principals",
                format!("{name:?}: a principal is 1-64 letters, digits, '-' or '_'"),
            ));
        }
        if tokens.is_empty() || tokens.iter().any(String::is_empty) {
            return Err(ConfigError::invalid(
                "frontend.principals",
                format!("{name:?} needs at least one non-empty token"),
            ));
        }
    }
    Ok(())
}

/// Bytes a conversation's state may reach beyond its turns and bot state (names, counters,
/// encoding overhead).
pub const CONVERSATION_OVERHEAD_BYTES: u64 = 4096;

/// The largest a conversation can grow under these limits.
pub fn conversation_bytes_max(c: &ConversationConfig) -> u64 {
    (c.turns_kept_max as u64)
        .saturating_mul(c.turn_bytes_max as u64)
        .saturating_add(c.bot_state_bytes_max as u64)
        .saturating_add(CONVERSATION_OVERHEAD_BYTES)
}

/// Every conversation, and so every message that carries one between nodes, fits in half an
/// inter-node frame by construction.
fn validate_sizes(
    c: &ConversationConfig,
    f: &FrontendConfig,
    link: &LinkConfig,
) -> Result<(), ConfigError> {
    positive([
        ("conversations.turn_bytes_max", c.turn_bytes_max as u64),
        ("conversations.bot_state_bytes_max", c.bot_state_bytes_max as u64),
        ("conversations.history_bytes_max", c.history_bytes_max as u64),
        ("conversations.active_bytes_max", c.active_bytes_max),
        ("frontend.output_buffer_bytes_max", f.output_buffer_bytes_max as u64),
    ])?;
    let largest = conversation_bytes_max(c);
    if largest > link.frame_bytes_max / 2 {
        return Err(ConfigError::invalid(
            "conversations.turn_bytes_max",
            format!(
                "turns_kept_max ({}) x turn_bytes_max ({}) + bot_state_bytes_max ({}) = {largest} \
                 bytes: a conversation must fit in half of link.frame_bytes_max ({})",
                c.turns_kept_max, c.turn_bytes_max, c.bot_state_bytes_max, link.frame_bytes_max
            ),
        ));
    }
    if c.history_bytes_max as u64 > link.frame_bytes_max / 2 {
        return Err(ConfigError::invalid(
            "conversations.history_bytes_max",
            format!("must be at most half of link.frame_bytes_max ({})", link.frame_bytes_max),
        ));
    }
    if f.output_buffer_bytes_max < c.history_bytes_max.max(c.turn_bytes_max) {
        return Err(ConfigError::invalid(
            "frontend.output_buffer_bytes_max",
            "must hold at least one history page and one turn",
        ));
    }
    Ok(())
}

/// Prefix of the environment variables that set config fields.
pub const ENV_PREFIX: &str = "BOTCLAW_";

/// `BOTCLAW_*` variables that are not config fields: the secret ones (read by the command
/// line, where a file wins over a value) and, by prefix (a trailing `_`), the test suite's.
pub const ENV_NOT_FIELDS: [&str; 9] = [
    "BOTCLAW_SECRET",
    "BOTCLAW_SECRET_FILE",
    "BOTCLAW_PREVIOUS_SECRET_FILE",
    "BOTCLAW_LOG_FORMAT",
    // The CLI's credentials (`drain`, `shard force`; `chat`, `bench`).
    "BOTCLAW_ADMIN_TOKEN",
    "BOTCLAW_CLIENT_TOKEN",
    // The test suite's.
    "BOTCLAW_BIN",
    "BOTCLAW_TEST_",
    "BOTCLAW_FUZZ_",
];

/// A list of strings, also given as one string (an environment variable holding one
/// seed or one token).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl From<OneOrMany> for Vec<String> {
    fn from(v: OneOrMany) -> Vec<String> {
        match v {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    OneOrMany::deserialize(d).map(Into::into)
}

fn opt_one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    Option::<OneOrMany>::deserialize(d).map(|v| v.map(Into::into))
}

/// An environment value as a TOML value: TOML if it parses as one, a list of strings if it
/// holds commas, else a string.
fn env_value(text: &str) -> toml::Value {
    if let Ok(t) = format!("v = {text}").parse::<toml::Table>() {
        if let Some(v) = t.get("v") {
            return v.clone();
        }
    }
    if text.contains(',') {
        let items = text.split(',').map(str::trim).filter(|s| !s.is_empty());
        return toml::Value::Array(items.map(|s| toml::Value::String(s.into())).collect());
    }
    toml::Value::String(text.to_string())
}

/// Sets `table.a.b.c = value` for `path` `[a, b, c]`, creating sections on the way (a
/// value already at a section's place is replaced).
fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            insert_path(entry.as_table_mut().expect("made a table above"), rest, value);
        }
    }
}

/// A `host:port` address: an IP address or a DNS name. The node resolves names (seeds
/// again and again, so discovery by DNS follows the records as they change).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    /// An IP address (IPv6 without brackets) or a DNS name.
    pub host: String,
    pub port: u16,
}

/// Longest DNS name accepted.
pub const HOST_BYTES_MAX: usize = 253;

impl HostPort {
    /// `host` with `port`; the host must be an IP address or a DNS name.
    pub fn from_host(host: &str, port: u16) -> Result<HostPort, String> {
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if bare.parse::<std::net::IpAddr>().is_ok() {
            return Ok(HostPort { host: bare.to_string(), port });
        }
        let name_ok = !bare.is_empty()
            && bare.len() <= HOST_BYTES_MAX
            && bare.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !name_ok {
            return Err(format!("{host:?} is neither an IP address nor a DNS name"));
        }
        Ok(HostPort { host: bare.to_ascii_lowercase(), port })
    }

    /// The IP address, if the host is one (not a name).
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.host.parse().ok()
    }

    /// The socket address, if the host is an IP address.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.ip().map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(text: &str) -> Result<HostPort, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(HostPort { host: addr.ip().to_string(), port: addr.port() });
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} is not a host:port address (no port)"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{text:?} is not a host:port address (port 1..=65535)"))?;
        HostPort::from_host(host, port)
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;
    fn try_from(text: String) -> Result<HostPort, String> {
        text.parse()
    }
}

impl From<HostPort> for String {
    fn from(hp: HostPort) -> String {
        hp.to_string()
    }
}

/// What a node announces to peers and clients instead of its bind addresses. A port
/// without an override is advertised at `host` (or, with no host, at its bind address if
/// that is specific, else at an address the node derives and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Advertise {
    pub host: Option<String>,
    pub client: Option<HostPort>,
    pub cluster: Option<HostPort>,
    pub gossip: Option<HostPort>,
    pub admin: Option<HostPort>,
}

/// The default node name: unique per host (its hostname) and per node on a host (the
/// gossip port unless it is the default one). `None` if the hostname has nothing usable.
pub fn default_node_name(hostname: &str, gossip_port: u16) -> Option<String> {
    let host: String = hostname
        .trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(NAME_BYTES_MAX - 6)
        .collect();
    if host.is_empty() || host == "localhost" {
        return None;
    }
    let default_gossip = local_ports(DEFAULT_BASE_PORT, 0)[2];
    Some(if gossip_port == default_gossip { host } else { format!("{host}-{gossip_port}") })
}

fn parse_addr(
    field: &'static str,
    value: Option<String>,
    default_port: u16,
) -> Result<SocketAddr, ConfigError> {
    match value {
        None => Ok(SocketAddr::from(([127, 0, 0, 1], default_port))),
        Some(text) => text.parse().map_err(|_| {
            ConfigError::invalid(
                field,
                format!(
                    "{text:?} is not an ip:port address (a node binds IP addresses; 0.0.0.0 \
                     listens on every interface: give the name peers use as advertise_host)"
                ),
            )
        }),
    }
}

fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            "name",
            format!("{name:?} must be 1..={NAME_BYTES_MAX} characters of letters, digits, '-', '_', '.'"),
        ))
    }
}

#[cfg(test)]
mod tests;
