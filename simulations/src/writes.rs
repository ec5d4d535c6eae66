//! The writes one simulated store holds of one shard: their numbers, ascending, without
//! repeats.
//!
//! A sorted vector: replicas mostly receive a shard's writes in the order they were
//! numbered, so an insert is usually a push at the end, and a lookup a binary search. It
//! replaced a `BTreeSet<(ShardId, u64)>` per shard, whose inserts (one per persisted
//! write on every replica) were a tenth of a 1000-node run's time in cache misses, and
//! whose copies (a learner's stream) cost a node per few writes.

/// Write numbers, ascending, distinct.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Writes(Vec<u64>);

impl Writes {
    /// Adds write `n`; false if it was there already.
    pub fn insert(&mut self, n: u64) -> bool {
        if self.0.last().is_none_or(|&last| last < n) {
            self.0.push(n);
            return true;
        }
        match self.0.binary_search(&n) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, n);
                true
            }
        }
    }

    pub fn contains(&self, n: u64) -> bool {
        self.0.binary_search(&n).is_ok()
    }

    /// Adds every write of `other` (a streamed copy).
    pub fn extend(&mut self, other: &Writes) {
        self.0.extend_from_slice(&other.0);
        self.0.sort_unstable();
        self.0.dedup();
    }

    /// Ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::rngs::StdRng;
    use rand::{RngExt as _, SeedableRng};

    use super::*;

    /// Random inserts (mostly ascending, as replicas see them, some out of order and
    /// repeated) and merges against a `BTreeSet`, the structure it replaced.
    #[test]
    fn writes_behave_as_a_set() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let (mut w, mut model) = (Writes::default(), BTreeSet::new());
            let mut next = 0u64;
            for _ in 0..rng.random_range(0..300) {
                match rng.random_range(0..10) {
                    0..=5 => {
                        next += rng.random_range(1..4);
                        assert_eq!(w.insert(next), model.insert(next));
                    }
                    6 | 7 => {
                        let n = rng.random_range(0..next + 2);
                        assert_eq!(w.insert(n), model.insert(n), "inserting {n}");
                    }
                    8 => {
                        let (mut copy, mut m) = (Writes::default(), BTreeSet::new());
                        for _ in 0..rng.random_range(0..20) {
                            let n = rng.random_range(0..next + 30);
                            copy.insert(n);
                            m.insert(n);
                        }
                        w.extend(&copy);
                        model.extend(m);
                    }
                    _ => {
                        let n = rng.random_range(0..next + 2);
                        assert_eq!(w.contains(n), model.contains(&n), "looking {n} up");
                    }
                }
                assert!(w.iter().eq(model.iter().copied()));
                assert_eq!(w.len(), model.len());
            }
        }
    }
}
