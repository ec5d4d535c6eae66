//! What sealing gossip costs: XChaCha20-Poly1305 seal + open (with the replay guard) per
//! datagram, against the HMAC-SHA256 sign + verify it replaced, and the one-off Argon2id
//! key derivation. Run with `cargo run --release -p botclaw-core --example gossip_seal`.

use std::time::Instant;

use botclaw_core::auth::{ClusterKeys, Keyring, PacketAuth, ReplayGuard};
use hmac::{Hmac, Mac};
use sha2::Sha256;

fn main() {
    let started = Instant::now();
    let keys = ClusterKeys::derive(b"a cluster secret of some length");
    let derive_ms = started.elapsed().as_secs_f64() * 1e3;
    let ring = Keyring::new(&keys, &[]);
    const N: u64 = 200_000;
    for size in [200usize, 1_300] {
        let payload = vec![7u8; size];
        let sealer = PacketAuth::new(ring.clone(), 1400, ReplayGuard::new(60_000, 65_536));
        let mut opener = PacketAuth::new(ring.clone(), 1400, ReplayGuard::new(60_000, 65_536));
        let t = Instant::now();
        for i in 0..N {
            let mut nonce = [0u8; 24];
            nonce[..8].copy_from_slice(&i.to_le_bytes());
            let packet = sealer.seal(&payload, 1_000 + i / 1_000, nonce);
            opener.open(&packet, 1_000 + i / 1_000).expect("opens");
        }
        let aead_ns = t.elapsed().as_nanos() as f64 / N as f64;
        let t = Instant::now();
        let mut bytes = 0;
        for i in 0..N {
            let mut nonce = [0u8; 24];
            nonce[..8].copy_from_slice(&i.to_le_bytes());
            bytes += sealer.seal(&payload, 1_000, nonce).len();
        }
        let seal_ns = t.elapsed().as_nanos() as f64 / N as f64;
        assert!(bytes > 0);
        let mac = Hmac::<Sha256>::new_from_slice(&[9u8; 32]).unwrap();
        let t = Instant::now();
        for _ in 0..N {
            let mut m = mac.clone();
            m.update(&payload);
            let tag = m.finalize().into_bytes();
            let mut v = mac.clone();
            v.update(&payload);
            v.verify_slice(&tag).expect("verifies");
        }
        let hmac_ns = t.elapsed().as_nanos() as f64 / N as f64;
        println!(
            "{size} B payload: AEAD seal+open {aead_ns:.0} ns (seal alone {seal_ns:.0} ns), HMAC-SHA256 sign+verify {hmac_ns:.0} ns per datagram"
        );
    }
    println!("Argon2id key derivation (once per process): {derive_ms:.0} ms");
}
