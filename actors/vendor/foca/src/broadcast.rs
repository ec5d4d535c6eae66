/* This Source Code Form is subject to the terms of the Mozilla Public
 * License, v. 2.0. If a copy of the MPL was not distributed with this
 * file, You can obtain one at https://mozilla.org/MPL/2.0/. */
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use bytes::BufMut;

/// A type capable of decoding a (associated) broadcast from a buffer
/// and deciding whether to keep disseminating it for other members
/// of the cluster (when it's new information) or to discard it (when
/// its outdated/stale).
pub trait BroadcastHandler<T> {
    /// A unique identifier for the broadcasts this handler manages
    ///
    /// It should be able to compare itself against an arbitrary number
    /// of other [`Self::Key`] instances and decide wether it
    /// replaces it or not so conflicting/stale information isn't
    /// disseminated.
    type Key: Invalidates;

    /// The error type that `receive_item` may emit. Will be wrapped
    /// by [`crate::Error::CustomBroadcast`].
    type Error: core::error::Error + Send + Sync + 'static;

    /// Decodes a [`Self::Key`] from a buffer and either discards
    /// it or tells Foca to persist and disseminate it.
    ///
    /// `Sender` is `None` when you're adding broadcast data directly,
    /// via [`crate::Foca::add_broadcast`], otherwise it will be the
    /// address of the member that sent the data. Notice that Foca
    /// doesn't track the origin of packets- if you need it you
    /// have to add it to the data you're broadcasting.
    ///
    /// When you receive a broadcast you have to decide whether it's
    /// new information that needs to be disseminated (`Ok(Some(...))`)
    /// or not (`Ok(None)`).
    ///
    /// Always yielding `Some(...)` is wrong because Foca will never
    /// know when to stop sending this information to other members.
    ///
    /// Example: Assume your custom broadcast is a simple Set-Key-Value
    /// operation. When you receive it you should check if your map
    /// contains the Key-Value pair; If it didn't, you yield
    /// `Some`, otherwise the operation is stale, so you yield `None`.
    ///
    /// The `data` parameter is the exact data provided to
    /// [`crate::Foca::add_broadcast`]. When Foca receives N custom
    /// broadcasts at once, this gets called N times.
    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&T>,
    ) -> Result<Option<Self::Key>, Self::Error>;

    /// Decides whether Foca should add broadcast data to the message
    /// it's about to send to active member `T`.
    ///
    /// Normally when Foca sends a message it always tries to include
    /// custom broadcasts alongside the information it actually
    /// cares about; This allows implementations to override this
    /// logic with something else.
    ///
    /// Example: You are running a heterogeneous cluster and some nodes
    /// are always very busy and you'd rather they never have to deal
    /// with the extra cpu/bandwidth cost of receiving/sending
    /// your custom broadcasts.
    ///
    /// Returning `true` tells Foca to proceed as it would normally,
    /// including broadcasts in the messages it sends when it can.
    ///
    /// Returning `false` tells Foca to not include such broadcasts
    /// in the message. It does *not* prevent the message from being
    /// sent, just keeps Foca from attaching extra data to them.
    fn should_add_broadcast_data(&self, _member: &T) -> bool {
        true
    }
}

/// A type that's able to look at another and decide wether it's
/// newer/fresher (i.e. invalidates) than it.
///
/// As you send/receive broadcasts, Foca will hold them for a while
/// as it disseminates the data to other cluster members. This trait
/// helps with replacing data that hasn't been fully disseminated
/// yet but you already know it's stale.
///
/// Example: Assume a versioned broadcast like `{key,version,...}`;
/// After you receive `{K, 0, ...}` and keep it, Foca will be
/// disseminating it. Soon after you receive `{K, 1, ...}` which
/// is a newer version for this broadcast. This trait enables
/// Foca to immediately stop disseminating the previous version,
/// even if it hasn't sent it to everyone it can yet.
pub trait Invalidates {
    /// When `item.invalidates(&other)` it means that Foca will
    /// keep `item` and discard `other` from its dissemination
    /// backlog.
    fn invalidates(&self, other: &Self) -> bool;

    /// botclaw's patch: a key that every item this one invalidates
    /// shares, if there is one: `a.invalidates(b)` implies
    /// `a.invalidation_key() == b.invalidation_key()` whenever `a`'s is
    /// `Some`. Foca then skips looking through its backlog for items to
    /// replace when no queued item has the key. Keys of items that
    /// cannot invalidate each other may still be equal: that only costs
    /// the look.
    fn invalidation_key(&self) -> Option<u64> {
        None
    }
}

impl Invalidates for &[u8] {
    fn invalidates(&self, other: &Self) -> bool {
        self.eq(other)
    }
}

// botclaw's patch: the queue is kept by remaining transmissions, then
// by length, so a fill finds the next item that fits with a lookup
// instead of popping every item of a binary heap that does not fit
// (per message, the whole backlog once the packet is nearly full: at
// 5,000 members joining, most of a node's time). What a fill writes is
// what the heap's scan wrote: the items in the order (most transmissions
// left, longest) among those that fit the room left, each at most once;
// among items equal in both, the newest first (the heap left their order
// unspecified).
//
// And the queued items' invalidation keys are counted, so an item whose
// key no queued item has is queued without looking through the backlog
// for items to replace, which could find none (the look is a pass over
// every queued item: the other half of a node's time while thousands
// join).
pub(crate) struct Broadcasts<V> {
    // remaining_tx -> data length -> items, oldest first
    levels: BTreeMap<usize, BTreeMap<usize, Vec<Entry<V>>>>,
    len: usize,
    // queued items by invalidation key (those that have one)
    keys: hashbrown::HashMap<u64, usize>,
}

impl<T> Broadcasts<T>
where
    T: Invalidates,
{
    pub(crate) fn new() -> Self {
        Self {
            levels: BTreeMap::new(),
            len: 0,
            keys: hashbrown::HashMap::new(),
        }
    }

    // Not `const`: foca's public backlog counts that call it are not.
    #[allow(clippy::missing_const_for_fn)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[allow(clippy::missing_const_for_fn)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn add_or_replace(&mut self, item: T, data: Vec<u8>, max_tx: usize) {
        debug_assert!(max_tx > 0);
        let key = item.invalidation_key();
        let queued = |k| self.keys.get(&k).is_some_and(|&n| n > 0);
        if key.is_none_or(queued) {
            let mut removed = Vec::new();
            self.levels.retain(|_, lens| {
                lens.retain(|_, items| {
                    items.retain(|node| {
                        let keep = !item.invalidates(&node.item);
                        if !keep {
                            removed.push(node.item.invalidation_key());
                        }
                        keep
                    });
                    !items.is_empty()
                });
                !lens.is_empty()
            });
            self.len -= removed.len();
            for key in removed {
                self.forget(key);
            }
        }
        if let Some(key) = key {
            *self.keys.entry(key).or_default() += 1;
        }
        self.place(Entry {
            remaining_tx: max_tx,
            item,
            data,
        });
    }

    // Queues `node` (its key is counted already).
    fn place(&mut self, node: Entry<T>) {
        let lens = self.levels.entry(node.remaining_tx).or_default();
        lens.entry(node.data.len()).or_default().push(node);
        self.len += 1;
    }

    // An item with `key` is no longer queued.
    fn forget(&mut self, key: Option<u64>) {
        let Some(key) = key else { return };
        let count = self.keys.get_mut(&key).expect("counted when queued");
        *count -= 1;
        if *count == 0 {
            self.keys.remove(&key);
        }
    }

    /// Takes the item with the most transmissions left, the longest
    /// first, among those no longer than `room`; the newest of equals.
    fn take_fitting(&mut self, room: usize) -> Option<Entry<T>> {
        let (tx, len) = self.levels.iter().rev().find_map(|(&tx, lens)| {
            let (&len, _) = lens.range(..=room).next_back()?;
            Some((tx, len))
        })?;
        let lens = self.levels.get_mut(&tx).expect("found above");
        let items = lens.get_mut(&len).expect("found above");
        let node = items.pop().expect("no empty list is kept");
        if items.is_empty() {
            lens.remove(&len);
            if lens.is_empty() {
                self.levels.remove(&tx);
            }
        }
        self.len -= 1;
        Some(node)
    }

    /// Writes items while they fit (`prefix` bytes of framing each), at
    /// most `max_items`; each taken item has one transmission less.
    fn fill_framed(
        &mut self,
        buffer: &mut impl BufMut,
        max_items: usize,
        prefix: usize,
        mut write: impl FnMut(&mut dyn BufMut, &[u8]),
    ) -> usize {
        let mut taken = Vec::new();
        while taken.len() < max_items {
            let Some(room) = buffer.remaining_mut().checked_sub(prefix) else {
                break;
            };
            let Some(node) = self.take_fitting(room) else {
                break;
            };
            debug_assert!(node.remaining_tx > 0);
            write(buffer, &node.data);
            taken.push(node);
        }
        let num_taken = taken.len();
        for mut node in taken {
            node.remaining_tx -= 1;
            if node.remaining_tx > 0 {
                self.place(node);
            } else {
                self.forget(node.item.invalidation_key());
            }
        }
        num_taken
    }

    pub(crate) fn fill(&mut self, mut buffer: impl BufMut, max_items: usize) -> usize {
        self.fill_framed(&mut buffer, max_items, 0, |buf, data| buf.put_slice(data))
    }

    pub(crate) fn fill_with_len_prefix(
        &mut self,
        mut buffer: impl BufMut,
        max_items: usize,
    ) -> usize {
        self.fill_framed(&mut buffer, max_items, 2, |buf, data| {
            debug_assert!(u16::try_from(data.len()).is_ok());
            buf.put_u16(data.len() as u16);
            buf.put_slice(data);
        })
    }
}

#[derive(Debug, Clone)]
struct Entry<T> {
    remaining_tx: usize,
    // XXX could be Bytes, or keep a pool in parent
    data: Vec<u8>,
    item: T,
}

#[cfg(test)]
mod tests {

    use super::*;

    struct Key(&'static str);

    impl Invalidates for Key {
        fn invalidates(&self, other: &Self) -> bool {
            self.0 == other.0
        }
    }

    #[test]
    fn piggyback_behaviour() {
        let max_tx = 5;
        let mut piggyback = Broadcasts::new();

        assert!(piggyback.is_empty(), "Piggyback starts empty");

        piggyback.add_or_replace(Key("AA"), b"AAabc".to_vec(), max_tx);

        assert_eq!(1, piggyback.len());

        piggyback.add_or_replace(Key("AA"), b"AAcba".to_vec(), max_tx);

        assert_eq!(
            1,
            piggyback.len(),
            "add_or_replace with same key should replace"
        );

        let mut buf = Vec::new();

        for _i in 0..max_tx {
            buf.clear();
            let num_items = piggyback.fill(&mut buf, usize::MAX);
            assert_eq!(1, num_items);
            assert_eq!(
                b"AAcba",
                &buf[..],
                "Should transmit an item at most max_tx times"
            );
        }

        assert!(
            piggyback.is_empty(),
            "Should remove item after being used max_tx times"
        );
    }

    #[test]
    fn fill_does_nothing_if_buffer_full() {
        let mut piggyback = Broadcasts::new();
        piggyback.add_or_replace(Key("a "), b"a super long value".to_vec(), 1);

        let buf = bytes::BytesMut::new();
        let mut limited = buf.limit(5);

        let num_items = piggyback.fill(&mut limited, usize::MAX);

        assert_eq!(0, num_items);
        assert_eq!(5, limited.remaining_mut());
        assert_eq!(1, piggyback.len());
    }

    // botclaw's patch: filling stops once no item can fit, and what it
    // leaves is what a fill that looked at every item leaves.
    #[test]
    fn fill_stops_when_nothing_fits_and_keeps_the_rest() {
        let mut piggyback = Broadcasts::new();
        piggyback.add_or_replace(Key("a"), b"aaaaaaaaaa".to_vec(), 2);
        piggyback.add_or_replace(Key("b"), b"bbbbbbbbbbbbbbbbbbbb".to_vec(), 2);
        piggyback.add_or_replace(Key("c"), b"cccccccccccccccccccccccccccccc".to_vec(), 2);
        piggyback.add_or_replace(Key("d"), b"dddddddddd".to_vec(), 1);

        // 30 does not fit, 20 does, then 5 bytes are left: less than any item
        let mut buf = Vec::new();
        let num_items = piggyback.fill((&mut buf).limit(25), usize::MAX);
        assert_eq!(1, num_items);
        assert_eq!(b"bbbbbbbbbbbbbbbbbbbb", &buf[..]);
        assert_eq!(4, piggyback.len());

        // Everything else is still there, with its transmissions
        let mut buf = Vec::new();
        assert_eq!(4, piggyback.fill(&mut buf, usize::MAX));
        assert_eq!(
            &b"ccccccccccccccccccccccccccccccaaaaaaaaaabbbbbbbbbbbbbbbbbbbbdddddddddd"[..],
            &buf[..]
        );
        // `d` (1) and `b` (2, sent twice now) are done
        assert_eq!(2, piggyback.len());
    }

    // botclaw's patch: random adds, replacements (keyed and not) and fills
    // of random room against the heap's scan (every item in the order
    // (most transmissions left, longest), taken when it fits) with equals
    // taken newest first, and replacement by looking at every item: the
    // same bytes, and the same queue left.
    #[test]
    fn fill_takes_what_a_scan_of_every_item_takes() {
        use alloc::vec;
        use rand::{RngExt, SeedableRng, rngs::StdRng};

        // Keyed (some keys shared by unequal items), a few unkeyed.
        struct K(u8);
        impl Invalidates for K {
            fn invalidates(&self, other: &Self) -> bool {
                self.0 == other.0
            }
            fn invalidation_key(&self) -> Option<u64> {
                (self.0 < 36).then_some(u64::from(self.0 % 16))
            }
        }
        struct Queued {
            key: u8,
            tx: usize,
            data: Vec<u8>,
            // when it was (re)queued
            seq: u64,
        }
        fn scan_fill(queue: &mut Vec<Queued>, seq: &mut u64, room: usize, max: usize) -> Vec<u8> {
            let rank = |q: &Queued| (q.tx, q.data.len(), q.seq);
            queue.sort_by_key(|q| core::cmp::Reverse(rank(q)));
            let (mut left, mut out, mut taken) = (room, Vec::new(), 0);
            for q in queue.iter_mut() {
                if taken == max {
                    break;
                }
                if q.data.len() <= left {
                    left -= q.data.len();
                    out.extend_from_slice(&q.data);
                    taken += 1;
                    q.tx -= 1;
                    *seq += 1;
                    q.seq = *seq;
                }
            }
            queue.retain(|q| q.tx > 0);
            out
        }

        let mut rng = StdRng::seed_from_u64(7);
        let mut queue: Vec<Queued> = Vec::new();
        let mut seq = 0;
        let mut bcs = Broadcasts::new();
        for _ in 0..5_000 {
            if rng.random_range(0..3) > 0 {
                let key = rng.random_range(0..40u8);
                let tx = rng.random_range(1..5usize);
                seq += 1;
                let mut data = (seq as u32).to_be_bytes().to_vec();
                data.extend(vec![key; rng.random_range(0..12usize)]);
                queue.retain(|q| q.key != key);
                queue.push(Queued {
                    key,
                    tx,
                    data: data.clone(),
                    seq,
                });
                bcs.add_or_replace(K(key), data, tx);
            } else {
                let room = rng.random_range(0..80usize);
                let max = rng.random_range(0..8usize);
                let want = scan_fill(&mut queue, &mut seq, room, max);
                let mut buf = Vec::new();
                bcs.fill((&mut buf).limit(room), max);
                assert_eq!(buf, want);
            }
            assert_eq!(bcs.len(), queue.len());
            // Every queued keyed item counted once, nothing else.
            let keyed = queue.iter().filter(|q| q.key < 36).count();
            assert_eq!(bcs.keys.values().sum::<usize>(), keyed);
        }
        // What is left: each item with the transmissions the scan left it.
        let mut buf = Vec::new();
        while !bcs.is_empty() {
            bcs.fill(&mut buf, usize::MAX);
        }
        let mut want = Vec::new();
        while !queue.is_empty() {
            want.extend(scan_fill(&mut queue, &mut seq, usize::MAX, usize::MAX));
        }
        assert_eq!(buf, want);
    }

    #[test]
    fn piggyback_consumes_largest_first() {
        let max_tx = 10;
        let mut piggyback = Broadcasts::new();

        piggyback.add_or_replace(Key("00"), b"00hi".to_vec(), max_tx);
        piggyback.add_or_replace(Key("01"), b"01hello".to_vec(), max_tx);
        piggyback.add_or_replace(Key("02"), b"02hey".to_vec(), max_tx);

        let mut buf = Vec::new();
        let num_items = piggyback.fill(&mut buf, usize::MAX);

        assert_eq!(3, num_items);
        assert_eq!(b"01hello02hey00hi", &buf[..]);
    }

    #[test]
    fn highest_max_tx_is_consumed_first() {
        let mut piggyback = Broadcasts::new();

        // 3 items, same byte size, distinct max_tx
        piggyback.add_or_replace(Key("10"), b"100".to_vec(), 1);
        piggyback.add_or_replace(Key("20"), b"200".to_vec(), 2);
        piggyback.add_or_replace(Key("30"), b"300".to_vec(), 3);

        let mut buf = Vec::new();
        piggyback.fill(&mut buf, usize::MAX);
        assert_eq!(b"300200100", &buf[..]);

        buf.clear();
        piggyback.fill(&mut buf, usize::MAX);
        assert_eq!(b"300200", &buf[..]);

        buf.clear();
        piggyback.fill(&mut buf, usize::MAX);
        assert_eq!(b"300", &buf[..]);

        assert_eq!(0, piggyback.len());
    }

    #[test]
    fn piggyback_respects_limit() {
        let max_tx = 10;
        let mut piggyback = Broadcasts::new();

        piggyback.add_or_replace(Key("fo"), b"foo".to_vec(), max_tx);
        piggyback.add_or_replace(Key("ba"), b"bar".to_vec(), max_tx);
        piggyback.add_or_replace(Key("ba"), b"baz".to_vec(), max_tx);

        let mut buf = Vec::new();
        let num_items = piggyback.fill(&mut buf, 0);

        assert_eq!(0, num_items);
        assert!(buf.is_empty());

        let num_items = piggyback.fill(&mut buf, 2);
        assert_eq!(2, num_items);
    }

    #[test]
    fn fill_with_len_prefix() {
        let mut bcs = Broadcasts::new();

        bcs.add_or_replace(Key("fo"), b"foo".to_vec(), 10);
        bcs.add_or_replace(Key("ba"), b"barr".to_vec(), 10);
        bcs.add_or_replace(Key("ba"), b"bazz".to_vec(), 10);

        let mut buf = Vec::new();
        let num_items = bcs.fill_with_len_prefix(&mut buf, 0);

        assert_eq!(0, num_items);
        assert!(buf.is_empty());

        let num_items = bcs.fill_with_len_prefix(&mut buf, 2);
        assert_eq!(2, num_items);

        use bytes::Buf;
        let mut buf = &buf[..];
        assert_eq!(4, buf.get_u16());
        assert_eq!(&b"bazz"[..], &buf[..4]);
        buf.advance(4);
        assert_eq!(3, buf.get_u16());
        assert_eq!(&b"foo"[..], &buf[..3]);
        buf.advance(3);
        assert!(buf.is_empty());
    }
}
