//! Where a request goes while ownership changes hands, and the requests held meanwhile.
//!
//! Nodes learn of a new owner (a join, a drain, a rebalancing move) at slightly different
//! times. A request that reaches a node which disagrees with the sender about the owner is
//! not refused: it is *held* on that node, in arrival order per conversation, and routed
//! again when the node's placement changes or a grace period passes (then the node trusts
//! its own view and forwards once more). Only a request held past the timeout, or one that
//! has hopped too often, fails (`unavailable`). A request that arrives while earlier ones
//! of its conversation are held waits behind them, so a conversation's turns keep their
//! order through a move.
//!
//! The old owner's side of a move is the conversation actor's: it finishes its turns in
//! flight (they are durable on the replicas, with its epoch), then closes and hands every
//! request still queued back to routing, which sends them to the new owner in order; the
//! new owner's first request acquires the conversation from the replicas.
//!
//! Pure: time is milliseconds passed in by the caller.

use std::collections::{HashMap, VecDeque};

/// How routing holds requests (from `[handoff]` in the node config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldRules {
    /// A held request is forwarded to the owner this node sees after waiting this long
    /// without a placement change (the sender may have been the one behind).
    pub grace_ms: u64,
    /// A held request fails (`unavailable`) after waiting this long in all.
    pub timeout_ms: u64,
    /// Hops after which a request is no longer forwarded, only held or run.
    pub hops_max: u8,
    /// Requests held at once on a node; more are refused (`busy`).
    pub held_max: usize,
}

impl Default for HoldRules {
    fn default() -> Self {
        HoldRules { grace_ms: 300, timeout_ms: 3000, hops_max: 3, held_max: 10_000 }
    }
}

/// A request as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask<'a> {
    /// This node's name.
    pub me: &'a str,
    /// This node has joined the cluster (before, its placement is empty).
    pub joined: bool,
    /// The owner in this node's current placement.
    pub owner: Option<&'a str>,
    /// Times the request was forwarded already.
    pub hops: u8,
    /// How long it has been held here (0 when it just arrived).
    pub waited_ms: u64,
    /// Earlier requests of the same conversation are held here.
    pub behind: bool,
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    /// This node owns the conversation: run it here.
    Local,
    /// Send it to this node (one more hop).
    Forward(&'a str),
    /// Keep it until the placement changes or time passes.
    Hold,
    /// Give up: `unavailable`, with why.
    Refuse(&'static str),
}

/// The routing rule.
pub fn route<'a>(ask: Ask<'a>, rules: &HoldRules) -> Step<'a> {
    let expired = ask.waited_ms >= rules.timeout_ms;
    if !ask.joined {
        // Peers already count this node in: their request waits for it to catch up. A
        // client's goes elsewhere.
        return match (ask.hops, expired) {
            (0, _) => Step::Refuse(NOT_JOINED),
            (_, false) => Step::Hold,
            (_, true) => Step::Refuse(IN_FLUX),
        };
    }
    let Some(owner) = ask.owner else {
        return Step::Refuse("no node serves conversations");
    };
    if ask.behind {
        return if expired { Step::Refuse(IN_FLUX) } else { Step::Hold };
    }
    if owner == ask.me {
        return Step::Local;
    }
    // The sender agreed with us (it is the gateway) or we waited long enough to believe
    // our own view over the sender's.
    if ask.hops == 0 || (ask.hops < rules.hops_max && ask.waited_ms >= rules.grace_ms) {
        return Step::Forward(owner);
    }
    if expired {
        Step::Refuse(IN_FLUX)
    } else {
        Step::Hold
    }
}

/// What to do with a request [`route`] said to forward, when there is no link to the
/// owner yet (it just joined; links follow membership): hold it until there is.
pub fn unreachable<'a>(waited_ms: u64, rules: &HoldRules) -> Step<'a> {
    if waited_ms >= rules.timeout_ms {
        Step::Refuse("no link to the owner of this conversation")
    } else {
        Step::Hold
    }
}

const IN_FLUX: &str = "ownership of this conversation is changing hands; retry";
const NOT_JOINED: &str = "this node has not joined the cluster yet";

/// A request waiting on this node.
#[derive(Debug)]
pub struct Held<T> {
    pub conv: String,
    pub hops: u8,
    /// When it was first held (caller's milliseconds).
    pub since_ms: u64,
    pub item: T,
}

/// Held requests in arrival order, bounded, with a count per conversation.
#[derive(Debug)]
pub struct HoldQueue<T> {
    items: VecDeque<Held<T>>,
    per_conv: HashMap<String, u32>,
    max: usize,
}

impl<T> HoldQueue<T> {
    pub fn new(max: usize) -> HoldQueue<T> {
        HoldQueue { items: VecDeque::new(), per_conv: HashMap::new(), max }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Requests of `conv` are held here.
    pub fn holds(&self, conv: &str) -> bool {
        self.per_conv.contains_key(conv)
    }

    /// Holds a request at the back; gives it back when the queue is full.
    pub fn push(&mut self, held: Held<T>) -> Result<(), Held<T>> {
        if self.items.len() >= self.max {
            return Err(held);
        }
        *self.per_conv.entry(held.conv.clone()).or_default() += 1;
        self.items.push_back(held);
        Ok(())
    }

    /// Takes every held request, oldest first, to route again (those still undecided are
    /// pushed back in the same order, keeping their `since_ms`).
    pub fn take_all(&mut self) -> VecDeque<Held<T>> {
        self.per_conv.clear();
        std::mem::take(&mut self.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask<'a>(owner: Option<&'a str>, hops: u8, waited_ms: u64, behind: bool) -> Ask<'a> {
        Ask { me: "a", joined: true, owner, hops, waited_ms, behind }
    }

    #[test]
    fn routing_table() {
        let r = HoldRules { grace_ms: 300, timeout_ms: 3000, hops_max: 3, held_max: 10 };
        // (owner, hops, waited, behind) -> step
        let cases: &[(Option<&str>, u8, u64, bool, Step)] = &[
            (Some("a"), 0, 0, false, Step::Local),
            (Some("a"), 2, 0, false, Step::Local),
            (Some("b"), 0, 0, false, Step::Forward("b")),
            // A forwarded request we disagree about: hold, then trust our view.
            (Some("b"), 1, 0, false, Step::Hold),
            (Some("b"), 1, 299, false, Step::Hold),
            (Some("b"), 1, 300, false, Step::Forward("b")),
            (Some("b"), 2, 300, false, Step::Forward("b")),
            // Hopped enough: only wait for our view to say we own it.
            (Some("b"), 3, 300, false, Step::Hold),
            (Some("b"), 3, 3000, false, Step::Refuse(IN_FLUX)),
            // Behind earlier requests of its conversation: wait, even if owned here.
            (Some("a"), 0, 0, true, Step::Hold),
            (Some("b"), 0, 0, true, Step::Hold),
            (Some("a"), 0, 3000, true, Step::Refuse(IN_FLUX)),
            (None, 0, 0, false, Step::Refuse("no node serves conversations")),
        ];
        for &(owner, hops, waited, behind, want) in cases {
            let before = Ask { joined: false, ..ask(owner, hops, waited, behind) };
            let not_joined = match (hops, waited >= r.timeout_ms) {
                (0, _) => Step::Refuse(NOT_JOINED),
                (_, false) => Step::Hold,
                (_, true) => Step::Refuse(IN_FLUX),
            };
            assert_eq!(route(before, &r), not_joined);
            assert_eq!(
                route(ask(owner, hops, waited, behind), &r),
                want,
                "{owner:?} {hops} {waited} {behind}"
            );
        }
    }

    #[test]
    fn queue_is_bounded_ordered_and_counts_per_conversation() {
        let mut q = HoldQueue::new(3);
        for (i, conv) in ["x", "y", "x"].into_iter().enumerate() {
            q.push(Held { conv: conv.into(), hops: 1, since_ms: i as u64, item: i }).unwrap();
        }
        let full = q.push(Held { conv: "z".into(), hops: 1, since_ms: 9, item: 9 });
        assert_eq!(full.unwrap_err().item, 9);
        assert!(q.holds("x") && q.holds("y") && !q.holds("z"));
        let all: Vec<usize> = q.take_all().into_iter().map(|h| h.item).collect();
        assert_eq!(all, vec![0, 1, 2]);
        assert!(q.is_empty() && !q.holds("x"));
    }

    /// A move seen by the gateway before the new owner: the request is held at the new
    /// owner, and runs there once its view changes; it never bounces back and forth more
    /// than `hops_max` times, whatever the views.
    #[test]
    fn a_request_never_hops_more_than_the_bound() {
        let r = HoldRules::default();
        let nodes = ["a", "b", "c"];
        // Every combination of views (who each node thinks owns it), for the whole walk.
        for views in 0..27u32 {
            let view = |n: usize| nodes[(views / 3u32.pow(n as u32) % 3) as usize];
            for start in 0..3 {
                let (mut at, mut hops, mut waited) = (start, 0u8, 0u64);
                let mut steps = 0;
                loop {
                    steps += 1;
                    assert!(steps < 100, "no end");
                    let a = Ask {
                        me: nodes[at],
                        joined: true,
                        owner: Some(view(at)),
                        hops,
                        waited_ms: waited,
                        behind: false,
                    };
                    match route(a, &r) {
                        Step::Local => break,
                        Step::Forward(to) => {
                            at = nodes.iter().position(|n| *n == to).unwrap();
                            hops += 1;
                            waited = 0;
                        }
                        Step::Hold => waited += 100,
                        Step::Refuse(_) => break,
                    }
                }
                assert!(hops <= r.hops_max, "{hops} hops");
            }
        }
    }
}
