//! Prometheus metrics of a node, served on `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub use botclaw_actors::metrics::ReasonLabel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleCallLabel {
    pub role: String,
    /// `local` (this node has the role) or `remote`.
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// Every metric a node exports. Cheap to clone (metrics are shared handles).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub conversations: botclaw_actors::metrics::ConversationMetrics,
    /// Seconds from reading a `say` to its answer, at the gateway.
    pub turn_latency: Histogram,
    pub errors: Family<CodeLabel, Counter>,
    pub forwards: Counter,
    pub forward_refusals: Counter,
    /// Requests held while ownership changed hands, and held right now.
    pub held_requests: Counter,
    pub held_now: Gauge,
    /// Requests a closing conversation passed on to its new owner.
    pub redirects: Counter,
    /// Module requests this node's bots made, by role and route; served and refused here.
    pub module_calls: Family<ModuleCallLabel, Counter>,
    /// Time of the bots' calls to in-process modules (here or on a node with the role).
    pub module_call_seconds: botclaw_actors::metrics::LatencyBy<ModuleCallLabel>,
    pub module_served: Family<RoleLabel, Counter>,
    pub module_refused: Family<RoleLabel, Counter>,
    /// Requests refused because this node sees less than a majority.
    pub minority_refusals: Counter,
    /// 1 while this node sees a majority of the cluster and runs turns.
    pub serving: Gauge,
    /// Shards this node gave away by load (rebalancing decisions).
    pub shards_moved: Counter,
    pub frames_too_large: Counter,
    /// Times a connection stopped reading because its unread answers filled its buffer.
    pub output_buffer_full: Counter,
    pub connections: Gauge,
    pub connections_rejected: Counter,
    /// Client connections upgraded to WebSocket.
    pub websocket_connections: Counter,
    pub connections_timed_out: Family<ReasonLabel, Counter>,
    pub members: Family<StateLabel, Gauge>,
    pub gossip_sent: Counter,
    /// Sizes of the gossip datagrams sent (against the path's MTU: foca's limit is
    /// `gossip.max_packet_bytes`).
    pub gossip_datagram_bytes: Histogram,
    pub gossip_received: Counter,
    pub gossip_rejected: Family<ReasonLabel, Counter>,
    pub admin_refused: Family<ReasonLabel, Counter>,
    /// Admin-port connections closed at once, by reason (`connections_max`).
    pub admin_connections_refused: Family<ReasonLabel, Counter>,
    /// Cluster-port connections closed before they reached ractor_cluster, by reason.
    pub cluster_refused: Family<ReasonLabel, Counter>,
    pub gossip_send_errors: Counter,
    /// Problems joining or staying in the cluster, by reason (each also logged).
    pub cluster_warnings: Family<ReasonLabel, Counter>,
    /// Addresses the seeds resolved to at the last lookup.
    pub seed_addresses: Gauge,
    pub gossip_updates_backlog: Gauge,
    pub member_events: Family<EventLabel, Counter>,
    pub cluster_sessions: Gauge,
    /// Work in flight by kind and the most at once (set on each scrape), and refusals
    /// (counted by `admission` itself). The process's CPU seconds are read at each scrape.
    pub work_inflight: Family<KindLabel, Gauge>,
    pub work_inflight_peak: Gauge,
    pub work_inflight_bytes: Gauge,
    pub work_refused: Family<KindLabel, Counter>,
    pub link_dials: Counter,
    pub link_drops: Counter,
    pub controller: crate::controller::ControllerMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Metrics {
            conversations: Default::default(),
            // 50 us .. ~1.6 s
            turn_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            errors: Default::default(),
            forwards: Default::default(),
            forward_refusals: Default::default(),
            held_requests: Default::default(),
            held_now: Default::default(),
            redirects: Default::default(),
            module_calls: Default::default(),
            module_call_seconds: Default::default(),
            module_served: Default::default(),
            module_refused: Default::default(),
            minority_refusals: Default::default(),
            serving: Default::default(),
            shards_moved: Default::default(),
            frames_too_large: Default::default(),
            output_buffer_full: Default::default(),
            connections: Default::default(),
            connections_rejected: Default::default(),
            websocket_connections: Default::default(),
            connections_timed_out: Default::default(),
            members: Default::default(),
            gossip_sent: Default::default(),
            // 64 B .. 64 KiB
            gossip_datagram_bytes: Histogram::new(exponential_buckets(64.0, 2.0, 11)),
            gossip_received: Default::default(),
            gossip_rejected: Default::default(),
            admin_refused: Default::default(),
            admin_connections_refused: Default::default(),
            cluster_refused: Default::default(),
            gossip_send_errors: Default::default(),
            cluster_warnings: Default::default(),
            seed_addresses: Default::default(),
            gossip_updates_backlog: Default::default(),
            member_events: Default::default(),
            cluster_sessions: Default::default(),
            work_inflight: Default::default(),
            work_inflight_peak: Default::default(),
            work_inflight_bytes: Default::default(),
            work_refused: Default::default(),
            link_dials: Default::default(),
            link_drops: Default::default(),
            controller: Default::default(),
        };
        // Every error code is exported from the start (at 0): a rate over a series that
        // appears only with the first error would miss it, and dashboards show no data.
        for code in botclaw_client::ErrorCode::ALL {
            drop(metrics.errors.get_or_create(&CodeLabel { code: code.as_str().to_string() }));
        }
        metrics
    }
}

impl Metrics {
    pub fn error(&self, code: &str) {
        self.errors.get_or_create(&CodeLabel { code: code.to_string() }).inc();
    }

    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("botclaw");
        r.register(
            "members",
            "Cluster members by state, as this node sees them",
            self.members.clone(),
        );
        r.register("gossip_packets_sent", "Gossip datagrams sent", self.gossip_sent.clone());
        r.register(
            "gossip_datagram_bytes",
            "Sizes of the gossip datagrams sent",
            self.gossip_datagram_bytes.clone(),
        );
        r.register(
            "module_call_seconds",
            "Time of the bots' calls to in-process modules, by role and route",
            self.module_call_seconds.0.clone(),
        );
        r.register(
            "gossip_packets_received",
            "Gossip datagrams received",
            self.gossip_received.clone(),
        );
        r.register(
            "gossip_packets_rejected",
            "Gossip datagrams dropped (size, version, unknown key, bad tag, stale, replayed or protocol)",
            self.gossip_rejected.clone(),
        );
        r.register(
            "admin_requests_refused",
            "Mutating admin requests refused (cross-origin, missing or unknown token)",
            self.admin_refused.clone(),
        );
        r.register(
            "admin_connections_refused",
            "Admin-port connections closed as they arrived, by reason (connections_max)",
            self.admin_connections_refused.clone(),
        );
        r.register(
            "cluster_connections_refused",
            "Cluster-port connections closed before reaching the link layer, by reason",
            self.cluster_refused.clone(),
        );
        r.register(
            "gossip_send_errors",
            "Gossip datagrams the socket failed to send",
            self.gossip_send_errors.clone(),
        );
        r.register(
            "cluster_warnings",
            "Problems joining or staying in the cluster, by reason (seeds_unanswered, \
             seed_unresolved, name_taken, gossip_send_failed), each also logged",
            self.cluster_warnings.clone(),
        );
        r.register(
            "seed_addresses",
            "Addresses the configured seeds resolved to at the last lookup",
            self.seed_addresses.clone(),
        );
        r.register(
            "gossip_updates_backlog",
            "Membership updates waiting to be disseminated",
            self.gossip_updates_backlog.clone(),
        );
        r.register("member_events", "Members seen going up or down", self.member_events.clone());
        r.register(
            "cluster_sessions",
            "Open inter-node (ractor_cluster) sessions",
            self.cluster_sessions.clone(),
        );
        r.register(
            "work_inflight",
            "Requests in flight on this node by kind (client, forwarded, replica, module)",
            self.work_inflight.clone(),
        );
        r.register(
            "work_inflight_peak",
            "The most requests in flight at once since the node started",
            self.work_inflight_peak.clone(),
        );
        r.register(
            "work_inflight_bytes",
            "Bytes of the requests in flight on this node",
            self.work_inflight_bytes.clone(),
        );
        r.register(
            "work_refused",
            "Requests refused with busy at the node's in-flight bound, by kind",
            self.work_refused.clone(),
        );
        r.register("link_dials", "Inter-node sessions dialed", self.link_dials.clone());
        r.register(
            "link_drops",
            "Inter-node sessions dropped because the peer is not an up member",
            self.link_drops.clone(),
        );
        r.register(
            "turn_latency_seconds",
            "Time from reading a say to writing its answer, at the gateway",
            self.turn_latency.clone(),
        );
        r.register("errors", "Error answers sent to clients, by code", self.errors.clone());
        r.register("forwards", "Requests forwarded to the owning node", self.forwards.clone());
        r.register(
            "forward_refusals",
            "Forwarded requests refused because ownership was in flux",
            self.forward_refusals.clone(),
        );
        r.register(
            "held_requests",
            "Requests held on this node while ownership changed hands",
            self.held_requests.clone(),
        );
        r.register("held_now", "Requests held on this node right now", self.held_now.clone());
        r.register(
            "redirects",
            "Requests a closing conversation passed on to its new owner",
            self.redirects.clone(),
        );
        r.register(
            "module_calls",
            "Module requests (catalog, weather) this node's bots made, by role and route",
            self.module_calls.clone(),
        );
        r.register(
            "module_served",
            "Module requests this node served (it has the role)",
            self.module_served.clone(),
        );
        r.register(
            "module_refused",
            "Module requests this node refused (too many at once)",
            self.module_refused.clone(),
        );
        r.register(
            "minority_refusals",
            "Requests refused because this node saw less than a majority of the cluster",
            self.minority_refusals.clone(),
        );
        r.register(
            "shards_moved",
            "Shards this node gave to less loaded nodes (rebalancing)",
            self.shards_moved.clone(),
        );
        r.register(
            "serving",
            "1 while this node sees a majority of the cluster and runs turns",
            self.serving.clone(),
        );
        r.register(
            "frames_too_large",
            "Request lines over frame_bytes_max",
            self.frames_too_large.clone(),
        );
        r.register(
            "client_output_buffer_full",
            "Times a client connection stopped being read: its unread answers reached output_buffer_bytes_max",
            self.output_buffer_full.clone(),
        );
        r.register("client_connections", "Open client connections", self.connections.clone());
        r.register(
            "client_websocket_connections",
            "Client connections upgraded to WebSocket",
            self.websocket_connections.clone(),
        );
        r.register(
            "client_connections_rejected",
            "Connections closed at once: connections_max reached",
            self.connections_rejected.clone(),
        );
        r.register(
            "client_connections_timed_out",
            "Client connections the node closed, by reason: hello, idle or write timeout, failed TLS handshake or WebSocket upgrade",
            self.connections_timed_out.clone(),
        );
        self.conversations.register(&mut r);
        self.controller.register(&mut r);
        r
    }

    pub fn cluster_warning(&self, reason: &str) {
        self.cluster_warnings.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    }

    pub fn reject(&self, reason: &str) {
        by_reason(&self.gossip_rejected, reason);
    }

    pub fn connection_timed_out(&self, reason: &str) {
        by_reason(&self.connections_timed_out, reason);
    }

    pub fn cluster_refused(&self, reason: &str) {
        by_reason(&self.cluster_refused, reason);
    }

    pub fn admin_refused(&self, reason: &str) {
        by_reason(&self.admin_refused, reason);
    }

    pub fn admin_connection_refused(&self, reason: &str) {
        by_reason(&self.admin_connections_refused, reason);
    }

    pub fn member_event(&self, event: &str) {
        self.member_events.get_or_create(&EventLabel { event: event.to_string() }).inc();
    }

    pub fn set_members(&self, up: usize, suspect: usize, down: usize) {
        for (state, n) in [("up", up), ("suspect", suspect), ("down", down)] {
            self.members.get_or_create(&StateLabel { state: state.to_string() }).set(n as i64);
        }
    }
}

/// Counts one event of `reason` in a family labelled by reason.
fn by_reason(family: &Family<ReasonLabel, Counter>, reason: &str) {
    family.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
}
