//! Admission: one bound on all the work in flight on a node.
//!
//! Every kind of request that makes a node work counts against `frontend.node_inflight_max`
//! while it runs: turns and history requests from this node's clients, the same from
//! other gateways (forwarded here because this node owns the conversation), replica writes
//! (by the ring) and module calls from peers. Past the bound a request is refused at once
//! with `busy` and a retry hint instead of queueing, so memory does not grow with the
//! offered load. A request keeps its place until it is answered, however long it waits
//! (held during an ownership change, queued behind its conversation's earlier turns).
//! Replication by the controller's map is bounded separately, by the shard replicator's
//! queue (`replication.incoming_max`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What a place in flight is taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A request from one of this node's client connections.
    Client,
    /// A request another gateway forwarded to this node, the owner.
    Forwarded,
    /// A replica write from the conversation's owner (replication by the ring).
    Replica,
    /// A module call from a peer.
    Module,
}

impl Work {
    pub const ALL: [Work; 4] = [Work::Client, Work::Forwarded, Work::Replica, Work::Module];

    pub fn as_str(self) -> &'static str {
        match self {
            Work::Client => "client",
            Work::Forwarded => "forwarded",
            Work::Replica => "replica",
            Work::Module => "module",
        }
    }

    fn ix(self) -> usize {
        self as usize
    }
}

/// The node's count of work in flight against its bound.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    inflight: AtomicUsize,
    /// The most in flight at once since the node started.
    peak: AtomicUsize,
    by_kind: [AtomicUsize; 4],
    refused: [AtomicUsize; 4],
}

impl Admission {
    pub fn new(max: usize) -> Admission {
        Admission {
            max,
            inflight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            by_kind: Default::default(),
            refused: Default::default(),
        }
    }

    /// Takes a place for `kind`, or counts a refusal and says no.
    pub fn try_admit(&self, kind: Work) -> bool {
        let admitted = self
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1));
        match admitted {
            Ok(before) => {
                self.peak.fetch_max(before + 1, Ordering::AcqRel);
                self.by_kind[kind.ix()].fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(_) => {
                self.refused[kind.ix()].fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Gives back a place taken for `kind`.
    pub fn release(&self, kind: Work) {
        self.release_many(kind, 1);
    }

    /// Gives back `n` places taken for `kind`.
    pub fn release_many(&self, kind: Work, n: usize) {
        self.by_kind[kind.ix()].fetch_sub(n, Ordering::AcqRel);
        self.inflight.fetch_sub(n, Ordering::AcqRel);
    }

    /// A place for `kind` that is given back when the permit is dropped.
    pub fn admit(self: &Arc<Self>, kind: Work) -> Option<Permit> {
        self.try_admit(kind).then(|| Permit { admission: self.clone(), kind })
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }

    pub fn inflight_of(&self, kind: Work) -> usize {
        self.by_kind[kind.ix()].load(Ordering::Acquire)
    }

    /// Requests of `kind` refused since the node started.
    pub fn refused_of(&self, kind: Work) -> usize {
        self.refused[kind.ix()].load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// A place in flight, given back on drop.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    kind: Work,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_bound_across_kinds_and_gives_places_back() {
        let a = Arc::new(Admission::new(3));
        let p1 = a.admit(Work::Client).unwrap();
        let p2 = a.admit(Work::Forwarded).unwrap();
        assert!(a.try_admit(Work::Module));
        assert!(a.admit(Work::Replica).is_none(), "every kind counts against one bound");
        assert!(!a.try_admit(Work::Client));
        assert_eq!((a.inflight(), a.peak()), (3, 3));
        assert_eq!((a.refused_of(Work::Replica), a.refused_of(Work::Client)), (1, 1));
        drop(p1);
        assert_eq!(a.inflight_of(Work::Client), 0);
        assert!(a.admit(Work::Replica).is_some(), "a dropped permit frees its place");
        a.release(Work::Module);
        drop(p2);
        assert_eq!((a.inflight(), a.peak()), (0, 3));
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_bound() {
        let a = Arc::new(Admission::new(8));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if let Some(p) = a.admit(Work::Forwarded) {
                            assert!(a.inflight() <= 8);
                            drop(p);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(a.peak() <= 8 && a.inflight() == 0, "peak {}", a.peak());
    }
}
