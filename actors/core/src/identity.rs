//! A node's identity on the wire.
//!
//! The identity travels in every gossip packet, so it carries what peers need to reach the
//! node (its four addresses) and nothing that changes while it runs. `incarnation` is the
//! process start time in milliseconds since the Unix epoch, chosen by the driver: a restarted
//! process on the same address is a new, newer identity and replaces the old one at once.
//! `bump` is raised by foca (through [`foca::Identity::renew`]) when the cluster wrongly
//! declared this process down, so it rejoins by itself.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    /// Operator-chosen node name, unique in the cluster.
    pub name: String,
    /// Gossip (UDP) address: the identity's address in foca's sense.
    pub gossip: SocketAddr,
    /// ractor_cluster listener.
    pub cluster: SocketAddr,
    /// Chat protocol listener.
    pub client: SocketAddr,
    /// Admin HTTP listener.
    pub admin: SocketAddr,
    /// Process start time (ms since the Unix epoch); newer wins an address conflict.
    pub incarnation: u64,
    /// Raised each time this process rejoins after being declared down.
    pub bump: u16,
    /// Roles this node serves (e.g. `conversations`).
    pub roles: Vec<String>,
    /// Placement weight.
    pub capacity: u32,
}

/// Equal when every field is; the fields that tell two processes apart are compared first
/// (foca compares identities for every update it applies and every member it picks, and
/// the name and roles were compared first).
impl PartialEq for NodeId {
    fn eq(&self, other: &Self) -> bool {
        // Destructured: a field added to `NodeId` does not compile until it is compared.
        let NodeId { name, gossip, cluster, client, admin, incarnation, bump, roles, capacity } =
            self;
        *gossip == other.gossip
            && *incarnation == other.incarnation
            && *bump == other.bump
            && *capacity == other.capacity
            && *cluster == other.cluster
            && *client == other.client
            && *admin == other.admin
            && *name == other.name
            && *roles == other.roles
    }
}

/// Hashes every field, in declaration order (what the derived `Hash` did).
impl std::hash::Hash for NodeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let NodeId { name, gossip, cluster, client, admin, incarnation, bump, roles, capacity } =
            self;
        name.hash(state);
        gossip.hash(state);
        cluster.hash(state);
        client.hash(state);
        admin.hash(state);
        incarnation.hash(state);
        bump.hash(state);
        roles.hash(state);
        capacity.hash(state);
    }
}

impl NodeId {
    /// The name this process uses on inter-node links: unique per process, so a restarted
    /// peer's new session is never mistaken for the old one.
    pub fn link_name(&self) -> String {
        format!("{}@{}", self.name, self.incarnation)
    }

    /// Whether this node serves `role` (e.g. [`crate::roles::CONVERSATIONS`]).
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// A placeholder identity for announcing to a seed whose identity we do not know yet;
    /// foca addresses the packet by [`foca::Identity::addr`] and ignores the rest.
    pub fn seed(gossip: SocketAddr) -> NodeId {
        NodeId {
            name: String::new(),
            gossip,
            cluster: gossip,
            client: gossip,
            admin: gossip,
            incarnation: 0,
            bump: 0,
            roles: Vec::new(),
            capacity: 0,
        }
    }
}

/// A gossip address as foca indexes its members by it (hashed): equal exactly when the
/// addresses are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GossipAddr(pub SocketAddr);

impl foca::Identity for NodeId {
    type Addr = GossipAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId { bump: self.bump.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> GossipAddr {
        GossipAddr(self.gossip)
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // A newer process wins; within one process, the later rejoin wins. A bump that
        // wrapped around after 65536 rejoins loses once; the process then rejoins again.
        (self.incarnation, self.bump) > (adversary.incarnation, adversary.bump)
    }
}

/// A [`NodeId`] as foca keeps it: one shared copy per identity, so that a member table of N
/// entries holds N pointers (16 B each with foca's own fields, not ~300 B). A simulation of
/// 5,000 nodes keeps 25 million such entries. On the wire and in every comparison it is
/// the `NodeId` itself.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedId(Arc<NodeId>);

impl SharedId {
    pub fn new(id: NodeId) -> SharedId {
        SharedId(Arc::new(id))
    }
}

impl std::ops::Deref for SharedId {
    type Target = NodeId;

    fn deref(&self) -> &NodeId {
        &self.0
    }
}

impl Serialize for SharedId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        NodeId::deserialize(d).map(SharedId::new)
    }
}

impl foca::Identity for SharedId {
    type Addr = GossipAddr;

    fn renew(&self) -> Option<Self> {
        self.0.renew().map(SharedId::new)
    }

    fn addr(&self) -> GossipAddr {
        self.0.addr()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.0.win_addr_conflict(&adversary.0)
    }
}

/// Gives every decoded identity equal to one already held the same shared copy. Several
/// membership machines may share one (the simulator's nodes do). Copies nobody else holds
/// any more are dropped when the table has doubled since the last sweep, so it holds at
/// most about twice the identities in use (at least [`IdInterner::SWEEP_MIN`]).
/// Interning changes no value: runs stay byte-identical with or without sharing.
#[derive(Debug, Clone, Default)]
pub struct IdInterner(Arc<Mutex<Interned>>);

#[derive(Debug, Default)]
struct Interned {
    /// Seeded hashing (foldhash), as the identities come from peers; the lookup with
    /// SipHash was most of the interning's 6% of 1000 simulated nodes joining.
    ids: hashbrown::HashSet<Arc<NodeId>>,
    sweep_at: usize,
}

impl IdInterner {
    pub const SWEEP_MIN: usize = 1024;

    pub fn intern(&self, id: SharedId) -> SharedId {
        let mut t = self.0.lock().expect("interner lock");
        if let Some(known) = t.ids.get(&*id.0) {
            return SharedId(known.clone());
        }
        t.ids.insert(id.0.clone());
        if t.ids.len() > t.sweep_at.max(Self::SWEEP_MIN) {
            t.ids.retain(|a| Arc::strong_count(a) > 1);
            t.sweep_at = 2 * t.ids.len();
        }
        id
    }

    /// Identities held (in use or not yet swept).
    pub fn len(&self) -> usize {
        self.0.lock().expect("interner lock").ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    fn id(incarnation: u64, bump: u16) -> NodeId {
        NodeId {
            incarnation,
            bump,
            name: "n".into(),
            ..NodeId::seed("127.0.0.1:1".parse().unwrap())
        }
    }

    #[test]
    fn newer_process_wins_conflict() {
        assert!(id(2, 0).win_addr_conflict(&id(1, 9)));
        assert!(!id(1, 9).win_addr_conflict(&id(2, 0)));
    }

    /// Equality (hand-written, cheap fields first) agrees with the derived order: equal
    /// exactly when every field is; equal identities hash alike.
    #[test]
    fn equality_sees_every_field() {
        use std::hash::BuildHasher;
        let base = NodeId {
            name: "n1".into(),
            roles: vec!["conversations".into()],
            capacity: 100,
            ..id(7, 1)
        };
        let other: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        let variants = [
            NodeId { name: "n2".into(), ..base.clone() },
            NodeId { gossip: other, ..base.clone() },
            NodeId { cluster: other, ..base.clone() },
            NodeId { client: other, ..base.clone() },
            NodeId { admin: other, ..base.clone() },
            NodeId { incarnation: 8, ..base.clone() },
            NodeId { bump: 2, ..base.clone() },
            NodeId { roles: vec!["gateway".into()], ..base.clone() },
            NodeId { capacity: 50, ..base.clone() },
        ];
        let hasher = std::hash::RandomState::new();
        assert_eq!(base, base.clone());
        assert_eq!(hasher.hash_one(&base), hasher.hash_one(base.clone()));
        for v in &variants {
            assert_ne!(&base, v, "{v:?}");
            assert_ne!(base.cmp(v), std::cmp::Ordering::Equal);
        }
    }

    /// Gossip addresses are equal, and hash alike, exactly when their addresses are, for
    /// both families.
    #[test]
    fn gossip_addresses_hash_as_they_compare() {
        let addrs: Vec<GossipAddr> = [
            "10.0.0.1:7002",
            "10.0.0.1:7003",
            "10.0.1.0:7002",
            "9.255.255.255:9",
            "[::1]:7002",
            "[::1%2]:7002",
            "[fe80::1]:1",
        ]
        .iter()
        .map(|a| GossipAddr(a.parse().unwrap()))
        .collect();
        use std::hash::BuildHasher;
        let hasher = std::hash::RandomState::new();
        for (i, a) in addrs.iter().enumerate() {
            for (j, b) in addrs.iter().enumerate() {
                assert_eq!(a == b, i == j, "{a:?} {b:?}");
            }
            let copy = GossipAddr(a.0);
            assert_eq!(hasher.hash_one(a), hasher.hash_one(copy));
        }
    }

    #[test]
    fn renew_bumps_and_wins() {
        let a = id(5, 0);
        let b = a.renew().unwrap();
        assert_eq!(b.bump, 1);
        assert!(b.win_addr_conflict(&a));
        assert_eq!(a.link_name(), b.link_name());
    }
}
