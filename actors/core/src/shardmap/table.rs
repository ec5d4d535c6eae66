//! The shard table: every shard's entry, stored in fixed-size chunks shared between copies.
//!
//! The map is copied for every publication (the node hands each applied version to routing
//! and to the shard replicator) and compared with the version before it (which shards
//! changed). At 262,144 shards a flat table made each copy 10 MB and each comparison a scan
//! of every entry; with chunks behind `Arc`s a copy shares every chunk, a change copies one
//! chunk, and two versions differ only in chunks that are not the same allocation.
//! A tally of entry kinds and of shards per owner is kept as entries change, so status and
//! metrics need no scan.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{MemberIx, ShardEntry, REPLICAS_MAX};
use crate::placement::ShardId;

/// Entries per chunk: a change copies 40 KB; a copy of the table holds 256 pointers.
const CHUNK: usize = 1024;

/// Counts of entries by kind, kept as entries change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Entries with at least one learner (a move in flight).
    pub learning: u32,
    /// Assigned entries without an owner.
    pub unavailable: u32,
    /// Entries by ISR size; `[0]` counts the never-assigned ones.
    pub by_isr_len: [u32; REPLICAS_MAX + 1],
}

impl Tally {
    fn add(&mut self, e: &ShardEntry, sign: i8) {
        let step = |n: &mut u32| {
            *n = if sign > 0 { *n + 1 } else { *n - 1 };
        };
        if !e.learners.is_empty() {
            step(&mut self.learning);
        }
        if e.is_unavailable() {
            step(&mut self.unavailable);
        }
        step(&mut self.by_isr_len[e.isr.len()]);
    }

    fn of<'a>(entries: impl Iterator<Item = &'a ShardEntry>) -> Tally {
        let mut t = Tally::default();
        for e in entries {
            t.add(e, 1);
        }
        t
    }

    pub fn unassigned(&self) -> u32 {
        self.by_isr_len[0]
    }

    /// Assigned entries with fewer than `r` in-sync members.
    pub fn under_replicated(&self, r: usize) -> u32 {
        self.by_isr_len[1..r.clamp(1, REPLICAS_MAX + 1)].iter().sum()
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct Table {
    len: u32,
    chunks: Vec<Arc<[ShardEntry]>>,
    tally: Tally,
    /// Shards owned, by member slot.
    owned: Vec<u32>,
}

impl Table {
    pub fn new(len: u32) -> Table {
        let chunks = (0..(len as usize).div_ceil(CHUNK))
            .map(|c| {
                let n = CHUNK.min(len as usize - c * CHUNK);
                Arc::from(vec![ShardEntry::default(); n])
            })
            .collect();
        let mut tally = Tally::default();
        tally.by_isr_len[0] = len;
        Table { len, chunks, tally, owned: Vec::new() }
    }

    fn from_entries(entries: Vec<ShardEntry>) -> Table {
        let tally = Tally::of(entries.iter());
        let owned = owned_of(entries.iter());
        let chunks = entries.chunks(CHUNK).map(Arc::from).collect();
        Table { len: entries.len() as u32, chunks, tally, owned }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Shards `member` owns.
    pub fn owned(&self, member: MemberIx) -> u32 {
        self.owned.get(usize::from(member)).copied().unwrap_or(0)
    }

    pub fn get(&self, s: ShardId) -> Option<&ShardEntry> {
        let s = s as usize;
        self.chunks.get(s / CHUNK).and_then(|c| c.get(s % CHUNK))
    }

    /// Replaces shard `s`'s entry (it must exist), copying its chunk if it is shared.
    pub fn set(&mut self, s: ShardId, next: ShardEntry) {
        let s = s as usize;
        let chunk = &mut self.chunks[s / CHUNK];
        let e = &chunk[s % CHUNK];
        if *e == next {
            return;
        }
        self.tally.add(e, -1);
        self.tally.add(&next, 1);
        if let Some(o) = e.owner {
            self.owned[usize::from(o)] -= 1;
        }
        if let Some(o) = next.owner {
            let o = usize::from(o);
            if self.owned.len() <= o {
                self.owned.resize(o + 1, 0);
            }
            self.owned[o] += 1;
        }
        Arc::make_mut(chunk)[s % CHUNK] = next;
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &ShardEntry> + Clone + '_ {
        Entries { chunks: &self.chunks, at: 0, len: self.len as usize }
    }

    /// Shards whose entry differs from `older`'s, ascending; `None` when the tables do not
    /// have the same size. Chunks both share are skipped without a look.
    pub fn changed_since(&self, older: &Table) -> Option<Vec<ShardId>> {
        if self.len != older.len {
            return None;
        }
        let mut out = Vec::new();
        for (c, (a, b)) in self.chunks.iter().zip(&older.chunks).enumerate() {
            if Arc::ptr_eq(a, b) {
                continue;
            }
            for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                if x != y {
                    out.push((c * CHUNK + i) as ShardId);
                }
            }
        }
        Some(out)
    }

    /// The tallies recomputed from the entries differ from the ones kept.
    pub fn tally_drifted(&self) -> bool {
        let mut owned = self.owned.clone();
        while owned.last() == Some(&0) {
            owned.pop();
        }
        Tally::of(self.iter()) != self.tally || owned_of(self.iter()) != owned
    }
}

/// Shards owned by member slot, without trailing zeros.
fn owned_of<'a>(entries: impl Iterator<Item = &'a ShardEntry>) -> Vec<u32> {
    let mut owned: Vec<u32> = Vec::new();
    for o in entries.filter_map(|e| e.owner) {
        let o = usize::from(o);
        if owned.len() <= o {
            owned.resize(o + 1, 0);
        }
        owned[o] += 1;
    }
    owned
}

/// Iterates every entry in shard order.
#[derive(Clone)]
struct Entries<'a> {
    chunks: &'a [Arc<[ShardEntry]>],
    at: usize,
    len: usize,
}

impl<'a> Iterator for Entries<'a> {
    type Item = &'a ShardEntry;

    fn next(&mut self) -> Option<&'a ShardEntry> {
        if self.at == self.len {
            return None;
        }
        let e = &self.chunks[self.at / CHUNK][self.at % CHUNK];
        self.at += 1;
        Some(e)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.len - self.at, Some(self.len - self.at))
    }
}

impl ExactSizeIterator for Entries<'_> {}

impl PartialEq for Table {
    fn eq(&self, other: &Table) -> bool {
        self.len == other.len
            && self.chunks.iter().zip(&other.chunks).all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

impl Eq for Table {}

/// Encoded as the sequence of its entries (the layout of a flat table).
impl Serialize for Table {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Table {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entries = Vec::<ShardEntry>::deserialize(d)?;
        if entries.len() > u32::MAX as usize {
            return Err(serde::de::Error::custom("more shards than a u32 counts"));
        }
        Ok(Table::from_entries(entries))
    }
}
