//! Placement: conversation -> shard -> node.
//!
//! A conversation id hashes to one of `shard_count` shards with xxh3-64 (stable across
//! processes, platforms and releases; pinned by test vectors). Shards map to nodes through a
//! consistent-hash ring: each node places `vnodes * capacity / 100` points at
//! `xxh3(name "#" k)`; shard `s` sits at the fixed position `(s + 1/2) * 2^64 / shard_count`
//! and belongs to the node of the first point at or after it (wrapping).
//!
//! Why fixed, evenly spaced shard positions: a node's share of shards is then its share of
//! the ring up to one shard per arc, so the count imbalance is the arc imbalance
//! (about 1/sqrt(vnodes)) instead of that plus the binomial noise of hashing shards.
//! Why points depend on the node name only: a restarted node gets its shards back.
//!
//! A [`Placement`] is an immutable snapshot computed from a member list; every node that
//! computes it from the same members gets the same table (members are sorted by name; ties
//! between equal points break by name).
//!
//! Three strategies (`placement.strategy`), the same code in the node and the simulator:
//! - `ring` (default): the ring above;
//! - `bounded`: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam
//!   2018): shards in order take the first node clockwise from their position that owns
//!   fewer than `ceil((1 + epsilon) * fair share)` shards, so no node exceeds its share by
//!   more than epsilon;
//! - `rendezvous`: highest random weight (Thaler, Ravishankar 1998), capacity-weighted
//!   (`-capacity / ln(u)` with `u` the shard-member hash in (0, 1)).
//!
//! For every strategy a shard's preference list is its owner followed by the ring's next
//! distinct nodes.

use std::collections::BTreeMap;

use botclaw_config::{PlacementConfig, PlacementStrategy, NAME_BYTES_MAX};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// A shard number in `0..shard_count`.
pub type ShardId = u32;

/// Stable 64-bit hash of a conversation id.
pub fn conv_hash(conv: &str) -> u64 {
    xxh3_64(conv.as_bytes())
}

/// The shard of a conversation.
pub fn shard_of(conv: &str, shard_count: u32) -> ShardId {
    assert!(shard_count > 0, "shard_count must be positive");
    (conv_hash(conv) % u64::from(shard_count)) as ShardId
}

/// Ring position of the `k`-th virtual node of `name`: the hash of `"{name}#{k}"`, written
/// on the stack for validated names (at most [`NAME_BYTES_MAX`] bytes), since builds hash
/// every point of every member.
pub fn vnode_position(name: &str, k: u32) -> u64 {
    use std::io::Write;
    let mut stack = [0u8; NAME_BYTES_MAX + 11];
    let room = stack.len();
    let mut rest = &mut stack[..];
    if write!(rest, "{name}#{k}").is_ok() {
        let len = room - rest.len();
        return xxh3_64(&stack[..len]);
    }
    xxh3_64(format!("{name}#{k}").as_bytes())
}

/// Fixed ring position of a shard.
pub fn shard_position(shard: ShardId, shard_count: u32) -> u64 {
    let step = (1u128 << 64) / u128::from(shard_count);
    (u128::from(shard) * step + step / 2) as u64
}

/// A node taking part in placement.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RingMember {
    pub name: String,
    /// Relative weight; a node of capacity 200 gets twice the points of one of 100.
    pub capacity: u32,
}

/// Number of ring points of a member.
pub fn vnodes_of(capacity: u32, vnodes_per_100: u32) -> u32 {
    ((u64::from(capacity) * u64::from(vnodes_per_100) + 50) / 100).max(1) as u32
}

/// An immutable shard -> owner table for one membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    shard_count: u32,
    /// Ring points per 100 capacity (what [`Placement::rebuild_from`] can reuse).
    vnodes: u32,
    /// Members sorted by name.
    members: Vec<RingMember>,
    /// Ring points sorted by (position, member index).
    points: Vec<(u64, u16)>,
    /// Per shard: index into `points` of its successor point.
    successor: Vec<u32>,
    /// Per shard: owner's member index, when the strategy is not the plain ring.
    assigned: Option<Vec<u16>>,
}

impl Placement {
    /// Builds the table. Duplicate names are merged (first capacity wins); at most
    /// `u16::MAX` members.
    pub fn build(members: &[RingMember], cfg: &PlacementConfig) -> Placement {
        let members = Self::normalized(members);
        let mut points = Vec::new();
        for (i, m) in members.iter().enumerate() {
            for k in 0..vnodes_of(m.capacity, cfg.vnodes) {
                points.push((vnode_position(&m.name, k), i as u16));
            }
        }
        points.sort_unstable();
        Self::with_points(members, points, cfg)
    }

    /// The same table as [`Placement::build`], derived from `base` (built with the same
    /// `cfg`): the ring points of members in both are kept, only the others are hashed,
    /// and the two sorted lists are merged. A membership change of one node costs a pass
    /// over the points instead of hashing and sorting them all.
    pub fn rebuild_from(
        base: &Placement,
        members: &[RingMember],
        cfg: &PlacementConfig,
    ) -> Placement {
        if (base.shard_count, base.vnodes) != (cfg.shard_count, cfg.vnodes) {
            return Placement::build(members, cfg);
        }
        let members = Self::normalized(members);
        // Old member index -> new index, for members kept with the same capacity (both
        // lists are sorted by name, so the mapping keeps their order).
        let mut remap = vec![None; base.members.len()];
        let mut new_ones = Vec::new();
        let mut old = base.members.iter().enumerate().peekable();
        for (i, m) in members.iter().enumerate() {
            while old.next_if(|(_, o)| o.name < m.name).is_some() {}
            match old.next_if(|(_, o)| o.name == m.name) {
                Some((j, o)) if o.capacity == m.capacity => remap[j] = Some(i as u16),
                _ => new_ones.push(i),
            }
        }
        let mut added = Vec::new();
        for i in new_ones {
            for k in 0..vnodes_of(members[i].capacity, cfg.vnodes) {
                added.push((vnode_position(&members[i].name, k), i as u16));
            }
        }
        added.sort_unstable();
        let kept = base.points.iter().filter_map(|&(pos, j)| Some((pos, remap[usize::from(j)]?)));
        let mut points = Vec::with_capacity(base.points.len() + added.len());
        let mut added = added.into_iter().peekable();
        for p in kept {
            while let Some(a) = added.next_if(|a| *a < p) {
                points.push(a);
            }
            points.push(p);
        }
        points.extend(added);
        Self::with_points(members, points, cfg)
    }

    /// Members sorted by name, duplicates merged (first capacity wins).
    fn normalized(members: &[RingMember]) -> Vec<RingMember> {
        let mut members: Vec<RingMember> = members.to_vec();
        members.sort();
        members.dedup_by(|a, b| a.name == b.name);
        assert!(members.len() <= usize::from(u16::MAX), "too many members for placement");
        members
    }

    /// The table for sorted members and their sorted ring points.
    fn with_points(
        members: Vec<RingMember>,
        points: Vec<(u64, u16)>,
        cfg: &PlacementConfig,
    ) -> Placement {
        let mut successor = Vec::new();
        if !points.is_empty() {
            successor.reserve(cfg.shard_count as usize);
            let mut j = 0usize;
            for s in 0..cfg.shard_count {
                let pos = shard_position(s, cfg.shard_count);
                while j < points.len() && points[j].0 < pos {
                    j += 1;
                }
                successor.push((j % points.len()) as u32);
            }
        }
        let mut placement = Placement {
            shard_count: cfg.shard_count,
            vnodes: cfg.vnodes,
            members,
            points,
            successor,
            assigned: None,
        };
        if !placement.members.is_empty() {
            placement.assigned = match cfg.strategy {
                PlacementStrategy::Ring => None,
                PlacementStrategy::Bounded => {
                    Some(placement.bounded(f64::from(cfg.bound_epsilon_permille) / 1000.0))
                }
                PlacementStrategy::Rendezvous => Some(placement.rendezvous()),
            };
        }
        placement
    }

    /// Bounded loads: each shard, in order, goes to the first member clockwise that is
    /// under its cap.
    fn bounded(&self, epsilon: f64) -> Vec<u16> {
        let total: f64 = self.members.iter().map(|m| f64::from(m.capacity)).sum();
        let caps: Vec<u32> = self
            .members
            .iter()
            .map(|m| {
                let fair = f64::from(self.shard_count) * f64::from(m.capacity) / total;
                ((1.0 + epsilon) * fair).ceil().max(1.0) as u32
            })
            .collect();
        let mut counts = vec![0u32; self.members.len()];
        (0..self.shard_count as usize)
            .map(|s| {
                let mut i = self.successor[s] as usize;
                // Caps sum to at least shard_count, so some member always has room.
                loop {
                    let member = self.points[i].1;
                    let c = &mut counts[usize::from(member)];
                    if *c < caps[usize::from(member)] {
                        *c += 1;
                        return member;
                    }
                    i = (i + 1) % self.points.len();
                }
            })
            .collect()
    }

    /// Rendezvous: each shard goes to the member with the highest weighted score.
    fn rendezvous(&self) -> Vec<u16> {
        let seeds: Vec<(u64, f64)> = self
            .members
            .iter()
            .map(|m| (xxh3_64(m.name.as_bytes()), f64::from(m.capacity)))
            .collect();
        (0..self.shard_count)
            .map(|s| {
                let key = s.to_le_bytes();
                let mut best = (f64::NEG_INFINITY, 0u16);
                for (i, &(seed, capacity)) in seeds.iter().enumerate() {
                    let u =
                        (xxh3_64_with_seed(&key, seed) as f64 + 0.5) / 18_446_744_073_709_551_616.0;
                    let score = -capacity / u.ln();
                    if score > best.0 {
                        best = (score, i as u16);
                    }
                }
                best.1
            })
            .collect()
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    pub fn members(&self) -> &[RingMember] {
        &self.members
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The node that owns `shard`, if there are any members.
    pub fn owner(&self, shard: ShardId) -> Option<&str> {
        let member = match &self.assigned {
            Some(assigned) => *assigned.get(shard as usize)?,
            None => self.points[*self.successor.get(shard as usize)? as usize].1,
        };
        Some(&self.members[usize::from(member)].name)
    }

    /// Shard and owner of a conversation.
    pub fn locate(&self, conv: &str) -> (ShardId, Option<&str>) {
        let shard = shard_of(conv, self.shard_count);
        (shard, self.owner(shard))
    }

    /// The owner followed by the next distinct nodes clockwise, `n` in all (fewer if the
    /// cluster is smaller): the shard's preference list.
    pub fn preference_list(&self, shard: ShardId, n: usize) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::with_capacity(n);
        let Some(&start) = self.successor.get(shard as usize) else { return out };
        let n = n.min(self.members.len());
        if let Some(owner) = self.owner(shard).filter(|_| self.assigned.is_some() && n > 0) {
            out.push(owner);
        }
        let mut i = start as usize;
        while out.len() < n {
            let name = self.members[usize::from(self.points[i].1)].name.as_str();
            if !out.contains(&name) {
                out.push(name);
            }
            i = (i + 1) % self.points.len();
        }
        out
    }

    /// Shards owned per member, for every member (zero included).
    pub fn shard_counts(&self) -> BTreeMap<&str, u32> {
        let mut counts: BTreeMap<&str, u32> =
            self.members.iter().map(|m| (m.name.as_str(), 0)).collect();
        for shard in 0..self.shard_count {
            if let Some(owner) = self.owner(shard) {
                *counts.entry(owner).or_default() += 1;
            }
        }
        counts
    }

    /// Most shards owned by one member over the capacity-weighted average (1.0 = perfect).
    pub fn imbalance(&self) -> f64 {
        let total_capacity: u64 = self.members.iter().map(|m| u64::from(m.capacity)).sum();
        if total_capacity == 0 {
            return 1.0;
        }
        let counts = self.shard_counts();
        self.members
            .iter()
            .map(|m| {
                let fair = f64::from(self.shard_count) * m.capacity as f64 / total_capacity as f64;
                f64::from(counts[m.name.as_str()]) / fair
            })
            .fold(0.0, f64::max)
    }

    /// Shards whose owner differs between `self` and `other` (same shard count).
    pub fn moved_shards(&self, other: &Placement) -> Vec<ShardId> {
        assert_eq!(self.shard_count, other.shard_count);
        (0..self.shard_count).filter(|&s| self.owner(s) != other.owner(s)).collect()
    }
}

#[cfg(test)]
mod tests;
