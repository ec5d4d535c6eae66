//! The shard table: every shard's entry, stored in fixed-size chunks shared between copies.
//!
//! The map is copied for every publication (the node hands each applied version to routing
//! and to the shard replicator) and compared with the version before it (which shards
//! changed). At 262,144 shards a flat table made each copy 10 MB and each comparison a scan
//! of every entry; with chunks behind `Arc`s a copy shares every chunk, a change copies one
//! chunk, and two versions differ only in chunks that are not the same allocation.
//! A tally of entry kinds and of shards per owner is kept as entries change, so status and
//! metrics need no scan, and so is each member's set of shards: a node reads the shards of
//! a change that name it without reading the others (a snapshot names all 65,536 shards; a
//! node of a thousand holds about 200).

use std::sync::Arc;

use roaring::RoaringBitmap;
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
    /// Shards owned and shards held (in sync or learning), by member slot.
    members: PerMember,
    /// The shards that name each member, by member slot.
    named: Named,
}

impl Table {
    pub fn new(len: u32) -> Table {
        // Every full chunk starts as the same empty one, copied on its first change.
        let full: Arc<[ShardEntry]> = Arc::from(vec![ShardEntry::default(); CHUNK]);
        let chunks = (0..(len as usize).div_ceil(CHUNK))
            .map(|c| match CHUNK.min(len as usize - c * CHUNK) {
                CHUNK => full.clone(),
                n => Arc::from(vec![ShardEntry::default(); n]),
            })
            .collect();
        let mut tally = Tally::default();
        tally.by_isr_len[0] = len;
        Table { len, chunks, tally, members: PerMember::default(), named: Named::default() }
    }

    fn from_entries(entries: Vec<ShardEntry>) -> Table {
        let tally = Tally::of(entries.iter());
        let members = PerMember::of(entries.iter());
        let named = Named::of(entries.iter());
        let chunks = entries.chunks(CHUNK).map(Arc::from).collect();
        Table { len: entries.len() as u32, chunks, tally, members, named }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// Shards `member` owns.
    pub fn owned(&self, member: MemberIx) -> u32 {
        self.members.get(member).0
    }

    /// Shards `member` holds a copy of (in sync or learning).
    pub fn held(&self, member: MemberIx) -> u32 {
        self.members.get(member).1
    }

    /// The shards whose entry names `member` (owner, in sync or learning), ascending.
    pub fn named(&self, member: MemberIx) -> impl Iterator<Item = ShardId> + '_ {
        self.named.get(member).into_iter().flatten()
    }

    /// How many shards' entries name `member`.
    pub fn named_count(&self, member: MemberIx) -> u64 {
        self.named.get(member).map_or(0, RoaringBitmap::len)
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
        self.members.add(e, -1);
        self.members.add(&next, 1);
        self.named.change(s as ShardId, e, &next);
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

    /// Bytes of this table's entries and index that `older` does not share (chunks and
    /// members' sets that are other allocations): what keeping both costs over one.
    pub fn bytes_apart(&self, older: &Table) -> usize {
        let entry = std::mem::size_of::<ShardEntry>();
        let chunks = self
            .chunks
            .iter()
            .enumerate()
            .filter(|(c, a)| older.chunks.get(*c).is_none_or(|b| !Arc::ptr_eq(a, b)));
        let chunks: usize = chunks.map(|(_, a)| a.len() * entry).sum();
        let sets = self
            .named
            .0
            .iter()
            .enumerate()
            .filter(|(m, a)| older.named.0.get(*m).is_none_or(|b| !Arc::ptr_eq(a, b)));
        chunks + sets.map(|(_, a)| a.serialized_size()).sum::<usize>()
    }

    /// The tallies or the index recomputed from the entries differ from the ones kept.
    pub fn tally_drifted(&self) -> bool {
        Tally::of(self.iter()) != self.tally
            || PerMember::of(self.iter()) != self.members
            || Named::of(self.iter()) != self.named
    }
}

/// Shards owned and held, by member slot.
#[derive(Debug, Clone, Default)]
struct PerMember(Vec<(u32, u32)>);

impl PerMember {
    fn of<'a>(entries: impl Iterator<Item = &'a ShardEntry>) -> PerMember {
        let mut m = PerMember::default();
        for e in entries {
            m.add(e, 1);
        }
        m
    }

    fn get(&self, member: MemberIx) -> (u32, u32) {
        self.0.get(usize::from(member)).copied().unwrap_or((0, 0))
    }

    fn slot(&mut self, m: MemberIx) -> &mut (u32, u32) {
        let m = usize::from(m);
        if self.0.len() <= m {
            self.0.resize(m + 1, (0, 0));
        }
        &mut self.0[m]
    }

    fn add(&mut self, e: &ShardEntry, sign: i8) {
        let step = |n: &mut u32| *n = if sign > 0 { *n + 1 } else { *n - 1 };
        if let Some(o) = e.owner {
            step(&mut self.slot(o).0);
        }
        for &m in e.isr.as_slice().iter().chain(e.learners.as_slice()) {
            step(&mut self.slot(m).1);
        }
    }
}

/// Equal counts (slots past the end count zero).
impl PartialEq for PerMember {
    fn eq(&self, other: &PerMember) -> bool {
        let n = self.0.len().max(other.0.len());
        (0..n).all(|m| self.get(m as MemberIx) == other.get(m as MemberIx))
    }
}

/// The shards whose entry names each member (owner, in sync or learning), by member slot.
/// Copies share the list and every member's set: a change copies the list once and a
/// member's set once (a few hundred bytes at a thousand members), not the index.
#[derive(Debug, Clone, Default)]
struct Named(Arc<Vec<Arc<RoaringBitmap>>>);

impl Named {
    fn of<'a>(entries: impl Iterator<Item = &'a ShardEntry>) -> Named {
        let mut n = Named::default();
        let none = ShardEntry::default();
        for (s, e) in entries.enumerate() {
            n.change(s as ShardId, &none, e);
        }
        n
    }

    fn get(&self, member: MemberIx) -> Option<&RoaringBitmap> {
        self.0.get(usize::from(member)).map(|m| &**m)
    }

    fn names(e: &ShardEntry, m: MemberIx) -> bool {
        e.owner == Some(m) || e.isr.contains(m) || e.learners.contains(m)
    }

    fn members(e: &ShardEntry) -> impl Iterator<Item = MemberIx> + '_ {
        e.owner
            .into_iter()
            .chain(e.isr.as_slice().iter().copied())
            .chain(e.learners.as_slice().iter().copied())
    }

    /// Shard `s`'s entry went from `before` to `after`.
    fn change(&mut self, s: ShardId, before: &ShardEntry, after: &ShardEntry) {
        for m in Named::members(before).filter(|&m| !Named::names(after, m)) {
            self.slot(m).remove(s);
        }
        for m in Named::members(after).filter(|&m| !Named::names(before, m)) {
            self.slot(m).insert(s);
        }
    }

    fn slot(&mut self, m: MemberIx) -> &mut RoaringBitmap {
        let all = Arc::make_mut(&mut self.0);
        let m = usize::from(m);
        if all.len() <= m {
            all.resize_with(m + 1, Default::default);
        }
        Arc::make_mut(&mut all[m])
    }
}

/// The same sets (slots past the end are empty).
impl PartialEq for Named {
    fn eq(&self, other: &Named) -> bool {
        let n = self.0.len().max(other.0.len());
        (0..n).all(|m| {
            let m = m as MemberIx;
            self.get(m).filter(|s| !s.is_empty()) == other.get(m).filter(|s| !s.is_empty())
        })
    }
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
