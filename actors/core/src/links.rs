//! Which inter-node sessions should exist, given membership.
//!
//! Every pair of up members needs one ractor_cluster session, and only one side may dial
//! (both sides dialing caused session churn): the member with the smaller cluster address
//! dials. A session to a member declared down is dropped at once (a frozen peer's session
//! would otherwise stay open and swallow calls); a session to a name that is not an up
//! member (an older incarnation, or a peer that dialed before our gossip saw it) is
//! dropped only if it stays unknown for `dial_timeout_ticks`. [`LinkPlanner::plan`] is called
//! periodically and after membership changes; it is idempotent and remembers pending dials
//! so a slow handshake is not dialed twice before `dial_timeout_ticks` elapse.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// A peer that should be linked: its link name (`name@incarnation`) and cluster address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LinkPeer {
    pub link_name: String,
    pub cluster: SocketAddr,
}

/// What the driver should do to the link layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkAction {
    /// Open a session to this peer.
    Dial(LinkPeer),
    /// Close the session whose peer has this link name.
    Drop(String),
}

#[derive(Debug)]
pub struct LinkPlanner {
    me: SocketAddr,
    dial_timeout_ticks: u32,
    /// Dials in progress: link name -> ticks since dialed.
    pending: BTreeMap<String, u32>,
    /// Sessions to names that are neither up nor down: link name -> ticks seen so.
    unknown: BTreeMap<String, u32>,
}

impl LinkPlanner {
    pub fn new(me: SocketAddr, dial_timeout_ticks: u32) -> Self {
        LinkPlanner {
            me,
            dial_timeout_ticks: dial_timeout_ticks.max(1),
            pending: BTreeMap::new(),
            unknown: BTreeMap::new(),
        }
    }

    /// Whether this node is the one that dials `peer`.
    pub fn dials(&self, peer: SocketAddr) -> bool {
        self.me < peer
    }

    /// One planning round. `up` are the up members other than this node, `down` the link
    /// names of members declared down, `sessions` the link names of the sessions that exist
    /// now. Each call is one tick for the timeouts.
    pub fn plan(
        &mut self,
        up: &[LinkPeer],
        down: &BTreeSet<String>,
        sessions: &BTreeSet<String>,
    ) -> Vec<LinkAction> {
        let wanted: BTreeMap<&str, &LinkPeer> =
            up.iter().map(|p| (p.link_name.as_str(), p)).collect();
        let mut actions = Vec::new();
        self.unknown
            .retain(|name, _| sessions.contains(name) && !wanted.contains_key(name.as_str()));
        for name in sessions {
            if wanted.contains_key(name.as_str()) {
                continue;
            }
            let ticks = self.unknown.entry(name.clone()).or_insert(0);
            *ticks += 1;
            if down.contains(name) || *ticks > self.dial_timeout_ticks {
                self.unknown.remove(name);
                actions.push(LinkAction::Drop(name.clone()));
            }
        }
        self.pending
            .retain(|name, _| wanted.contains_key(name.as_str()) && !sessions.contains(name));
        for (name, peer) in wanted {
            if sessions.contains(name) || !self.dials(peer.cluster) {
                continue;
            }
            let ticks = self.pending.entry(name.to_string()).or_insert(0);
            if *ticks == 0 || *ticks >= self.dial_timeout_ticks {
                *ticks = 0;
                actions.push(LinkAction::Dial(peer.clone()));
            }
            *ticks += 1;
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, port: u16) -> LinkPeer {
        LinkPeer { link_name: name.into(), cluster: SocketAddr::from(([127, 0, 0, 1], port)) }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_lower_address_dials() {
        let mut p = LinkPlanner::new("127.0.0.1:5000".parse().unwrap(), 4);
        let up = [peer("a@1", 4000), peer("b@1", 6000)];
        let none = set(&[]);
        assert_eq!(p.plan(&up, &none, &none), vec![LinkAction::Dial(peer("b@1", 6000))]);
    }

    #[test]
    fn pending_dial_not_repeated_until_timeout() {
        let mut p = LinkPlanner::new("127.0.0.1:5000".parse().unwrap(), 3);
        let up = [peer("b@1", 6000)];
        let none = set(&[]);
        assert_eq!(p.plan(&up, &none, &none).len(), 1);
        assert!(p.plan(&up, &none, &none).is_empty());
        assert!(p.plan(&up, &none, &none).is_empty());
        assert_eq!(p.plan(&up, &none, &none).len(), 1, "redial after timeout");
        assert!(p.plan(&up, &none, &set(&["b@1"])).is_empty());
    }

    #[test]
    fn down_sessions_dropped_at_once() {
        let mut p = LinkPlanner::new("127.0.0.1:5000".parse().unwrap(), 3);
        let up = [peer("b@2", 6000)];
        let actions = p.plan(&up, &set(&["c@1"]), &set(&["c@1", "b@2"]));
        assert_eq!(actions, vec![LinkAction::Drop("c@1".into())]);
    }

    #[test]
    fn unknown_sessions_dropped_after_grace() {
        let mut p = LinkPlanner::new("127.0.0.1:5000".parse().unwrap(), 2);
        let none = set(&[]);
        let sessions = set(&["x@1"]);
        assert!(p.plan(&[], &none, &sessions).is_empty());
        assert!(p.plan(&[], &none, &sessions).is_empty());
        assert_eq!(p.plan(&[], &none, &sessions), vec![LinkAction::Drop("x@1".into())]);
        // A peer that becomes known in time keeps its session.
        let mut p = LinkPlanner::new("127.0.0.1:5000".parse().unwrap(), 2);
        let known = [peer("x@1", 4000)];
        assert!(p.plan(&[], &none, &sessions).is_empty());
        assert!(p.plan(&known, &none, &sessions).is_empty());
        assert!(p.plan(&known, &none, &sessions).is_empty());
        assert!(p.plan(&known, &none, &sessions).is_empty());
    }
}
