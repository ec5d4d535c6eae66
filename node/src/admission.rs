//! Admission: one bound on all the work in flight on a node.
//!
//! Every kind of request that makes a node work counts against `frontend.node_inflight_max`
//! requests and `frontend.node_inflight_bytes_max` bytes of requests while it runs:
//! turns and history requests from this node's clients, and the same from other gateways
//! (forwarded here because this node owns the conversation). Past the bound a request is
//! refused at once with `busy` and a retry hint instead of queueing, so memory does not grow
//! with the offered load. Replica writes (by the ring) and module calls from peers are
//! counted too, by kind, but never refused and not held against the bound: each completes
//! a turn its sender already admitted (the sender's bound bounds them), and refusing them
//! failed those turns (`unavailable`) under overload instead of slowing new ones. A request
//! keeps its place until it is answered, however long it waits
//! (held during an ownership change, queued behind its conversation's earlier turns).
//! Replication by the controller's map is bounded separately, by the shard replicator's
//! queue (`replication.incoming_max`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::KindLabel;

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

    /// Whether this work completes a turn another node admitted (replica writes, module
    /// calls): counted, never refused.
    pub fn completes_admitted(self) -> bool {
        matches!(self, Work::Replica | Work::Module)
    }
}

/// The node's count of work in flight against its bound.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    bytes_max: usize,
    inflight: AtomicUsize,
    bytes: AtomicUsize,
    /// The most in flight at once since the node started.
    peak: AtomicUsize,
    by_kind: [AtomicUsize; 4],
    /// Refusals by kind: the very counters `/metrics` exports (see [`Admission::exported`]).
    refused: [Counter; 4],
    admitted: [AtomicUsize; 4],
}

impl Admission {
    pub fn new(max: usize, bytes_max: usize) -> Admission {
        Admission {
            max,
            bytes_max,
            inflight: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            by_kind: Default::default(),
            refused: Default::default(),
            admitted: Default::default(),
        }
    }

    /// Counts refusals in `family`'s counters (by `kind` label), so the exported counters
    /// are the source, not copies brought up to date at each scrape.
    pub fn exported(mut self, family: &Family<KindLabel, Counter>) -> Admission {
        self.refused = Work::ALL.map(|kind| {
            family.get_or_create(&KindLabel { kind: kind.as_str().to_string() }).clone()
        });
        self
    }

    /// Takes a place for a request of `kind` holding `bytes`, or counts a refusal and says
    /// no. A request bigger than the byte bound is admitted when nothing else is in flight
    /// (it fits a frame, so it is bounded too). Work that completes another node's admitted
    /// turn ([`Work::completes_admitted`]) is only counted.
    pub fn try_admit(&self, kind: Work, bytes: usize) -> bool {
        if kind.completes_admitted() {
            self.by_kind[kind.ix()].fetch_add(1, Ordering::AcqRel);
            self.admitted[kind.ix()].fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let counted = self
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1));
        let admitted = counted.is_ok_and(|_| {
            let fits = |b: usize| (b == 0 || b + bytes <= self.bytes_max).then_some(b + bytes);
            let taken = self.bytes.fetch_update(Ordering::AcqRel, Ordering::Acquire, fits);
            if taken.is_err() {
                self.inflight.fetch_sub(1, Ordering::AcqRel);
            }
            taken.is_ok()
        });
        if admitted {
            let before = counted.expect("admitted");
            self.peak.fetch_max(before + 1, Ordering::AcqRel);
            self.by_kind[kind.ix()].fetch_add(1, Ordering::AcqRel);
            self.admitted[kind.ix()].fetch_add(1, Ordering::Relaxed);
        } else {
            self.refused[kind.ix()].inc();
        }
        admitted
    }

    /// Gives back a place taken for `kind` with `bytes`.
    pub fn release(&self, kind: Work, bytes: usize) {
        self.release_many(kind, 1, bytes);
    }

    /// Gives back `n` places taken for `kind`, holding `bytes` in all.
    pub fn release_many(&self, kind: Work, n: usize, bytes: usize) {
        self.by_kind[kind.ix()].fetch_sub(n, Ordering::AcqRel);
        if !kind.completes_admitted() {
            self.inflight.fetch_sub(n, Ordering::AcqRel);
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// A place for `kind` that is given back when the permit is dropped.
    pub fn admit(self: &Arc<Self>, kind: Work, bytes: usize) -> Option<Permit> {
        self.try_admit(kind, bytes).then(|| Permit { admission: self.clone(), kind, bytes })
    }

    /// Bytes of the requests in flight.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
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

    /// Requests of `kind` admitted since the node started.
    pub fn admitted_of(&self, kind: Work) -> usize {
        self.admitted[kind.ix()].load(Ordering::Relaxed)
    }

    /// Requests of `kind` refused since the node started.
    pub fn refused_of(&self, kind: Work) -> usize {
        self.refused[kind.ix()].get() as usize
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
    bytes: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.kind, self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_bound_across_kinds_and_gives_places_back() {
        let a = Arc::new(Admission::new(3, 1 << 20));
        let p1 = a.admit(Work::Client, 10).unwrap();
        let p2 = a.admit(Work::Forwarded, 10).unwrap();
        let p3 = a.admit(Work::Client, 10).unwrap();
        assert!(a.admit(Work::Forwarded, 10).is_none(), "clients and peers share one bound");
        assert!(!a.try_admit(Work::Client, 10));
        assert_eq!((a.inflight(), a.peak(), a.bytes()), (3, 3, 30));
        assert_eq!((a.refused_of(Work::Forwarded), a.refused_of(Work::Client)), (1, 1));
        // Replica writes and module calls complete turns admitted elsewhere: counted by
        // kind, never refused, not held against the bound.
        let r = a.admit(Work::Replica, 10).expect("a replica write is not refused when full");
        assert!(a.try_admit(Work::Module, 10));
        let counts = (a.inflight(), a.inflight_of(Work::Replica), a.inflight_of(Work::Module));
        assert_eq!(counts, (3, 1, 1));
        drop(r);
        a.release(Work::Module, 10);
        drop(p1);
        assert_eq!(a.inflight_of(Work::Client), 1);
        assert!(a.admit(Work::Forwarded, 10).is_some(), "a dropped permit frees its place");
        drop((p2, p3));
        assert_eq!((a.inflight(), a.peak(), a.bytes()), (0, 3, 0));
        assert_eq!((a.inflight_of(Work::Replica), a.inflight_of(Work::Module)), (0, 0));
    }

    #[test]
    fn bytes_are_bounded_too_and_a_refusal_takes_no_place() {
        let a = Arc::new(Admission::new(100, 1000));
        let big = a.admit(Work::Client, 600).unwrap();
        assert!(a.admit(Work::Forwarded, 500).is_none(), "600 + 500 bytes > 1000");
        assert_eq!((a.inflight(), a.bytes()), (1, 600), "the refused request holds nothing");
        let small = a.admit(Work::Forwarded, 400).unwrap();
        drop(big);
        drop(small);
        // Alone, a request over the byte bound still goes (a frame bounds it).
        let huge = a.admit(Work::Client, 5000).unwrap();
        assert!(a.admit(Work::Client, 1).is_none());
        drop(huge);
        assert_eq!((a.inflight(), a.bytes()), (0, 0));
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_bound() {
        let a = Arc::new(Admission::new(8, 800));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if let Some(p) = a.admit(Work::Forwarded, 100) {
                            assert!(a.inflight() <= 8 && a.bytes() <= 800);
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
