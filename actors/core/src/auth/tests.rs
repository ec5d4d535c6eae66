use std::sync::OnceLock;

use super::*;
use proptest::prelude::*;

const NOW: u64 = 1_700_000_000_000;
const WINDOW: u64 = 30_000;

/// Keys of the test secrets, derived once (Argon2id is slow on purpose).
fn keys(which: usize) -> &'static ClusterKeys {
    static KEYS: OnceLock<Vec<ClusterKeys>> = OnceLock::new();
    &KEYS.get_or_init(|| {
        [b"secret-one".as_slice(), b"secret-two", b"secret-three"]
            .iter()
            .map(|s| ClusterKeys::derive(s))
            .collect()
    })[which]
}

fn auth(primary: usize, previous: &[usize], packet_bytes_max: usize) -> PacketAuth {
    let previous: Vec<ClusterKeys> = previous.iter().map(|&i| keys(i).clone()).collect();
    let ring = Keyring::new(keys(primary), &previous);
    PacketAuth::new(ring, packet_bytes_max, ReplayGuard::new(WINDOW, 1024))
}

fn nonce(n: u8) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[0] = n;
    out[23] = 0xa5;
    out
}

#[test]
fn round_trip_and_the_payload_is_not_in_clear() {
    let mut a = auth(0, &[], 1400);
    let sealed = a.seal(b"user text: hello hello", NOW, nonce(1));
    assert!(!sealed.windows(5).any(|w| w == b"hello"), "payload visible on the wire");
    assert_eq!(a.open(&sealed, NOW + 5).unwrap(), b"user text: hello hello");
}

#[test]
fn wrong_secret_rejected() {
    let a = auth(0, &[], 1400);
    let mut b = auth(1, &[], 1400);
    assert_eq!(b.open(&a.seal(b"hello", NOW, nonce(1)), NOW), Err(AuthError::UnknownKey));
    // A forger who copies a known key id still fails the tag.
    let mut forged = b.seal(b"hello", NOW, nonce(2));
    forged[1..5].copy_from_slice(&a.seal(b"x", NOW, nonce(3))[1..5]);
    let mut a = a;
    assert_eq!(a.open(&forged, NOW), Err(AuthError::BadTag));
}

#[test]
fn any_flipped_bit_rejected() {
    let a = auth(0, &[], 1400);
    let sealed = a.seal(b"payload bytes", NOW, nonce(1));
    for i in 0..sealed.len() * 8 {
        let mut bad = sealed.clone();
        bad[i / 8] ^= 1 << (i % 8);
        let mut fresh = auth(0, &[], 1400);
        assert!(fresh.open(&bad, NOW).is_err(), "bit {i} flip accepted");
    }
}

#[test]
fn truncated_and_oversized_rejected() {
    let mut a = auth(0, &[], 100);
    let sealed = a.seal(b"0123456789", NOW, nonce(1));
    assert_eq!(a.open(&sealed[..sealed.len() - 1], NOW), Err(AuthError::BadTag));
    assert_eq!(a.open(&sealed[..10], NOW), Err(AuthError::TooShort));
    assert_eq!(a.open(&[PACKET_VERSION; 101], NOW), Err(AuthError::TooLarge));
    let mut v1 = sealed.clone();
    v1[0] = 1;
    assert_eq!(a.open(&v1, NOW), Err(AuthError::BadVersion));
}

#[test]
fn replayed_and_stale_packets_rejected() {
    let mut a = auth(0, &[], 1400);
    let sealed = a.seal(b"ping", NOW, nonce(1));
    assert!(a.open(&sealed, NOW + 10).is_ok());
    assert_eq!(a.open(&sealed, NOW + 20), Err(AuthError::Replayed));
    // After the window it is refused as stale (it is no longer remembered).
    assert_eq!(a.open(&sealed, NOW + WINDOW + 11), Err(AuthError::Stale));
    // Too far in the future (a skewed or forged clock) too.
    let ahead = a.seal(b"ping", NOW + WINDOW + 1_000, nonce(2));
    assert_eq!(a.open(&ahead, NOW), Err(AuthError::Stale));
    let old = a.seal(b"ping", NOW - WINDOW - 1, nonce(3));
    assert_eq!(a.open(&old, NOW), Err(AuthError::Stale));
}

#[test]
fn replay_memory_is_bounded_and_forgetting_refuses_older_packets() {
    let ring = Keyring::new(keys(0), &[]);
    let mut a = PacketAuth::new(ring, 1400, ReplayGuard::new(WINDOW, 4));
    let packets: Vec<Vec<u8>> = (0..8u8).map(|i| a.seal(b"p", NOW + i as u64, nonce(i))).collect();
    for p in &packets {
        assert!(a.open(p, NOW + 10).is_ok());
    }
    assert_eq!(a.replay.len(), 4, "bounded");
    // The forgotten ones cannot come back: they are at or below the floor.
    for p in &packets[..4] {
        assert_eq!(a.open(p, NOW + 10), Err(AuthError::Stale));
    }
    for p in &packets[4..] {
        assert_eq!(a.open(p, NOW + 10), Err(AuthError::Replayed));
    }
}

#[test]
fn rotation_accepts_old_and_new_keys_until_the_old_is_dropped() {
    // Step 1: the new secret (1) installed as a previous key everywhere.
    let mut old = auth(0, &[1], 1400);
    // Step 2: some nodes switch their primary to the new secret.
    let mut new = auth(1, &[0], 1400);
    assert!(new.open(&old.seal(b"a", NOW, nonce(1)), NOW).is_ok());
    assert!(old.open(&new.seal(b"b", NOW, nonce(2)), NOW).is_ok());
    // Step 3: the old key is dropped; its packets are refused.
    let mut done = auth(1, &[], 1400);
    assert!(done.open(&new.seal(b"c", NOW, nonce(3)), NOW).is_ok());
    assert_eq!(
        done.open(&auth(0, &[], 1400).seal(b"d", NOW, nonce(4)), NOW),
        Err(AuthError::UnknownKey)
    );
    // A key unknown to both sides is refused during the rollover too.
    assert_eq!(
        new.open(&auth(2, &[], 1400).seal(b"e", NOW, nonce(5)), NOW),
        Err(AuthError::UnknownKey)
    );
}

#[test]
fn a_simulated_keyring_frames_like_a_sealed_one_without_the_cipher() {
    let clear = |secret: &[u8]| {
        PacketAuth::new(Keyring::clear_for_simulation(secret), 1400, ReplayGuard::new(WINDOW, 1024))
    };
    let mut a = clear(b"secret-one");
    let framed = a.seal(b"user text: hello", NOW, nonce(1));
    // Same length and header as a sealed datagram, so the simulated network's packets
    // fill and split as a node's do.
    assert_eq!(framed.len(), auth(0, &[], 1400).seal(b"user text: hello", NOW, nonce(1)).len());
    assert_eq!(framed[0], PACKET_VERSION);
    assert_eq!(a.open(&framed, NOW + 5).unwrap(), b"user text: hello");
    assert_eq!(a.open(&framed, NOW + 6), Err(AuthError::Replayed));
    assert_eq!(a.open(&a.seal(b"x", NOW - WINDOW - 1, nonce(2)), NOW), Err(AuthError::Stale));
    // Another secret, or a node's real keys, cannot open it, and it cannot open theirs.
    assert_eq!(clear(b"secret-two").open(&framed, NOW), Err(AuthError::UnknownKey));
    assert_eq!(auth(0, &[], 1400).open(&framed, NOW), Err(AuthError::UnknownKey));
    assert_eq!(
        a.open(&auth(0, &[], 1400).seal(b"x", NOW, nonce(3)), NOW),
        Err(AuthError::UnknownKey)
    );
    assert_eq!(a.open(&framed[..OVERHEAD_BYTES - 1], NOW), Err(AuthError::TooShort));
}

#[test]
fn derivation_is_deterministic_and_keys_differ_by_purpose() {
    let k = keys(0);
    assert_eq!(ClusterKeys::derive(b"secret-one").cookie_hex(), k.cookie_hex());
    assert_ne!(k.gossip, k.cookie);
    assert_ne!(keys(1).cookie_hex(), k.cookie_hex());
}

mod fuzz {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn arbitrary_bytes_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut a = auth(0, &[], 1400);
            prop_assert!(a.open(&bytes, NOW).is_err());
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_header_never_open(
            body in proptest::collection::vec(any::<u8>(), 0..1300),
        ) {
            let mut a = auth(0, &[], 1400);
            let mut packet = a.seal(b"", NOW, nonce(9))[..HEADER_BYTES].to_vec();
            packet.extend_from_slice(&body);
            prop_assert!(a.open(&packet, NOW).is_err());
        }
    }
}
