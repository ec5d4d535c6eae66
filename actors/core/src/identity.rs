//! A node's identity on the wire.
//!
//! The identity travels in every gossip packet, so it carries what peers need to reach the
//! node (its four addresses) and nothing that changes while it runs. `incarnation` is the
//! process start time in milliseconds since the Unix epoch, chosen by the driver: a restarted
//! process on the same address is a new, newer identity and replaces the old one at once.
//! `bump` is raised by foca (through [`foca::Identity::renew`]) when the cluster wrongly
//! declared this process down, so it rejoins by itself.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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

impl NodeId {
    /// The name this process uses on inter-node links: unique per process, so a restarted
    /// peer's new session is never mistaken for the old one.
    pub fn link_name(&self) -> String {
        format!("{}@{}", self.name, self.incarnation)
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

impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId { bump: self.bump.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // A newer process wins; within one process, the later rejoin wins. A bump that
        // wrapped around after 65536 rejoins loses once; the process then rejoins again.
        (self.incarnation, self.bump) > (adversary.incarnation, adversary.bump)
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

    #[test]
    fn renew_bumps_and_wins() {
        let a = id(5, 0);
        let b = a.renew().unwrap();
        assert_eq!(b.bump, 1);
        assert!(b.win_addr_conflict(&a));
        assert_eq!(a.link_name(), b.link_name());
    }
}
