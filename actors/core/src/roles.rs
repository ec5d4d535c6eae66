//! Which node serves a bot module's request (catalog search, weather lookup).
//!
//! Nodes declare roles in their config; a module runs only on nodes with its role. A node
//! that has the role serves its own bots' requests (no hop); any other node spreads them
//! over the nodes with the role by rendezvous (highest-random-weight) hashing of the
//! request's key: one key always goes to the same node while membership holds (its caches
//! stay warm), keys spread evenly, and a node joining or leaving the role moves only the
//! keys it wins or held (about 1/N).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The role a node needs to own conversations.
pub const CONVERSATIONS: &str = "conversations";
/// Roles of the built-in bot modules.
pub const CATALOG: &str = "catalog";
pub const WEATHER: &str = "weather";

/// Rendezvous weight of `node` for `key`.
pub fn weight(key: &str, node: &str) -> u64 {
    xxh3_64_with_seed(node.as_bytes(), xxh3_64_with_seed(key.as_bytes(), 0x726f_6c65))
}

/// The node that serves `key` among `candidates` (nodes that have the role): `me` if it is
/// one of them, else the highest rendezvous weight (ties by name). `None` when no node
/// has the role.
pub fn pick<'a>(
    key: &str,
    me: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(u64, &'a str)> = None;
    for node in candidates {
        if node == me {
            return Some(node);
        }
        let w = weight(key, node);
        if best.is_none_or(|(bw, bn)| (w, node) > (bw, bn)) {
            best = Some((w, node));
        }
    }
    best.map(|(_, node)| node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cat-{i}")).collect()
    }

    #[test]
    fn local_first_then_spread_evenly() {
        let nodes = names(4);
        let refs = || nodes.iter().map(String::as_str);
        assert_eq!(pick("k", "cat-2", refs()), Some("cat-2"));
        assert_eq!(pick("k", "conv-0", std::iter::empty()), None);
        let mut counts = std::collections::BTreeMap::<&str, u32>::new();
        for k in 0..40_000 {
            let key = format!("city-{k}");
            *counts.entry(pick(&key, "conv-0", refs()).unwrap()).or_default() += 1;
        }
        assert_eq!(counts.len(), 4);
        for (node, n) in counts {
            assert!((9_000..=11_000).contains(&n), "{node} got {n} of 40000");
        }
    }

    #[test]
    fn a_joining_node_takes_only_what_it_wins() {
        let before = names(5);
        let after = names(6);
        let (mut moved, total) = (0, 30_000);
        for k in 0..total {
            let key = format!("q{k}");
            let a = pick(&key, "x", before.iter().map(String::as_str)).unwrap();
            let b = pick(&key, "x", after.iter().map(String::as_str)).unwrap();
            if a != b {
                assert_eq!(b, "cat-5", "a key moved between old nodes");
                moved += 1;
            }
        }
        // About 1/6 of the keys.
        let share = moved as f64 / total as f64;
        assert!((0.14..0.19).contains(&share), "{share}");
    }
}
