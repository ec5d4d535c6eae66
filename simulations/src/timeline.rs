//! Events due at simulated times, taken in (time, submission) order: ties resolve in the
//! order they were pushed, so a run is a pure function of its inputs. The events live in
//! the heap itself (no side table to look them up in).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

struct Due<E> {
    at: u64,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Due<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Due<E> {}

impl<E> PartialOrd for Due<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Due<E> {
    /// Reversed: the max-heap yields the earliest, then the first pushed.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

pub struct Timeline<E> {
    heap: BinaryHeap<Due<E>>,
    seq: u64,
}

impl<E> Default for Timeline<E> {
    fn default() -> Self {
        Timeline { heap: BinaryHeap::new(), seq: 0 }
    }
}

impl<E> Timeline<E> {
    pub fn push(&mut self, at: u64, event: E) {
        self.seq += 1;
        self.heap.push(Due { at, seq: self.seq, event });
    }

    /// The earliest event due at or before `until`, with its time.
    pub fn pop_due(&mut self, until: u64) -> Option<(u64, E)> {
        if self.heap.peek()?.at > until {
            return None;
        }
        self.heap.pop().map(|d| (d.at, d.event))
    }

    /// The earliest event, whenever it is due.
    pub fn pop(&mut self) -> Option<(u64, E)> {
        self.heap.pop().map(|d| (d.at, d.event))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_ties_in_push_order() {
        let mut t = Timeline::default();
        for (at, e) in [(5, 'a'), (1, 'b'), (5, 'c'), (1, 'd'), (3, 'e'), (5, 'f')] {
            t.push(at, e);
        }
        assert_eq!(t.pop_due(0), None);
        let mut got = Vec::new();
        while let Some((at, e)) = t.pop_due(4) {
            got.push((at, e));
        }
        assert_eq!(got, [(1, 'b'), (1, 'd'), (3, 'e')]);
        assert_eq!(t.len(), 3);
        let rest: Vec<_> = std::iter::from_fn(|| t.pop()).collect();
        assert_eq!(rest, [(5, 'a'), (5, 'c'), (5, 'f')]);
        assert!(t.is_empty());
    }
}
