//! Helpers of the fuzz targets (proptest-driven; the stable toolchain here has no
//! cargo-fuzz): how many cases to run and how to damage a valid encoding.
//!
//! CI runs each target with the default case count; a long run sets `BOTCLAW_FUZZ_CASES`
//! (see the README's security section for the figures of one).

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

/// Cases per fuzz target: `BOTCLAW_FUZZ_CASES`, else 2,000.
pub fn cases() -> u32 {
    std::env::var("BOTCLAW_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

/// `valid` damaged as a hostile peer or a torn disk write would: bytes flipped, replaced,
/// inserted or removed, the tail cut off, or a length-looking byte inflated. The same seed
/// gives the same damage.
pub fn mutate(valid: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = valid.to_vec();
    for _ in 0..rng.random_range(1..=4u32) {
        let at = if out.is_empty() { 0 } else { rng.random_range(0..out.len()) };
        match rng.random_range(0..6u32) {
            0 if !out.is_empty() => out[at] ^= 1 << rng.random_range(0..8u32),
            1 if !out.is_empty() => out[at] = rng.random(),
            2 => out.insert(at, rng.random()),
            3 if !out.is_empty() => drop(out.remove(at)),
            4 => out.truncate(at),
            // A varint length prefix made huge: decoders must not allocate by it.
            _ if !out.is_empty() => {
                out[at] = 0xff;
                out.splice(at..at, [0xff, 0xff, 0xff, 0x0f]);
            }
            _ => out.push(rng.random()),
        }
        let _ = rng.next_u64();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutation_is_deterministic_and_changes_the_input() {
        let valid = b"a valid encoding".to_vec();
        assert_eq!(mutate(&valid, 7), mutate(&valid, 7));
        let changed = (0..100).filter(|&s| mutate(&valid, s) != valid).count();
        assert!(changed >= 95, "{changed} of 100 mutations changed nothing");
    }
}
