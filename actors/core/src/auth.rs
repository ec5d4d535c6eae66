//! Gossip datagrams encrypted and authenticated with the cluster secret.
//!
//! Keys: the cluster secret goes through Argon2id (memory-hard, ~19 MiB and 2 passes per
//! guess) once per process, and the result is split by purpose (the gossip key, the
//! inter-node cookie), so a captured datagram does not let a weak secret be brute-forced at
//! the speed of SHA-256, and no two uses share a key.
//!
//! A sealed packet is
//! `VERSION || key_id (4) || nonce (24) || XChaCha20-Poly1305(key, ts_ms (8) || payload)`
//! with `VERSION || key_id` as associated data. The nonce is random (192 bits: collisions
//! are negligible without a counter); `key_id` names the key without revealing it, so a
//! receiver holding several keys tries only the right one.
//!
//! Rotation, as memberlist's keyring: a [`Keyring`] seals with its primary key and opens
//! with the primary or any previous key. Roll a new secret out as a previous key on every
//! node, then make it primary everywhere, then drop the old one: at every step every pair
//! of nodes understands each other.
//!
//! Replay: the sealed timestamp must be within `window_ms` of the receiver's clock, and a
//! packet opened once is refused again within that window ([`ReplayGuard`] remembers the
//! nonces it saw, bounded in count; once full it forgets the oldest and refuses anything
//! not newer than what it forgot). Clocks of nodes must agree within the window.
//!
//! [`PacketAuth::open`] checks size, key and tag (in constant time) before anything parses
//! the payload, so a peer without the secret can never get a packet into foca.

use std::collections::BTreeSet;
use std::sync::Arc;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

/// Wire format version, the first byte of every datagram (1 was HMAC-only).
pub const PACKET_VERSION: u8 = 2;
const KEY_ID_BYTES: usize = 4;
const NONCE_BYTES: usize = 24;
const TS_BYTES: usize = 8;
const TAG_BYTES: usize = 16;
const HEADER_BYTES: usize = 1 + KEY_ID_BYTES + NONCE_BYTES;
/// Bytes a sealed packet adds to its payload.
pub const OVERHEAD_BYTES: usize = HEADER_BYTES + TS_BYTES + TAG_BYTES;
/// Fixed salt of the key derivation: every node must derive the same keys from the same
/// secret, so the salt cannot be random; it separates botclaw's keys from other uses of a
/// reused password.
const KDF_SALT: &[u8] = b"botclaw/v2/cluster-secret-kdf";
/// Argon2id cost: OWASP's minimum recommendation (19 MiB, 2 passes, 1 lane).
const KDF_MEMORY_KIB: u32 = 19 * 1024;
const KDF_PASSES: u32 = 2;

/// Why a datagram was rejected. The driver counts each reason separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("datagram shorter than the header and tag")]
    TooShort,
    #[error("datagram larger than packet_bytes_max")]
    TooLarge,
    #[error("unknown packet version")]
    BadVersion,
    #[error("sealed with a key this node does not hold")]
    UnknownKey,
    #[error("authentication tag does not match the cluster secret")]
    BadTag,
    #[error("timestamp outside the replay window (clock skew or an old packet)")]
    Stale,
    #[error("packet already received (replayed)")]
    Replayed,
}

impl AuthError {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::TooShort => "too_short",
            AuthError::TooLarge => "too_large",
            AuthError::BadVersion => "bad_version",
            AuthError::UnknownKey => "unknown_key",
            AuthError::BadTag => "bad_tag",
            AuthError::Stale => "stale",
            AuthError::Replayed => "replayed",
        }
    }
}

/// The keys derived from one cluster secret.
#[derive(Clone)]
pub struct ClusterKeys {
    gossip: [u8; 32],
    cookie: [u8; 32],
}

impl std::fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKeys(..)")
    }
}

impl ClusterKeys {
    /// Argon2id of the secret, split by purpose. Costs tens of milliseconds (optimised):
    /// derive once per process and secret.
    pub fn derive(secret: &[u8]) -> ClusterKeys {
        let params = argon2::Params::new(KDF_MEMORY_KIB, KDF_PASSES, 1, Some(64))
            .expect("constant argon2 parameters are valid");
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 64];
        argon
            .hash_password_into(secret, KDF_SALT, &mut out)
            .expect("any secret length and the fixed salt are accepted");
        let (mut gossip, mut cookie) = ([0u8; 32], [0u8; 32]);
        gossip.copy_from_slice(&out[..32]);
        cookie.copy_from_slice(&out[32..]);
        ClusterKeys { gossip, cookie }
    }

    /// The inter-node link cookie (ractor_cluster's handshake), hex.
    pub fn cookie_hex(&self) -> String {
        self.cookie.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One gossip key and its public id.
#[derive(Clone)]
struct GossipKey {
    id: [u8; KEY_ID_BYTES],
    protection: Protection,
}

/// What a key does to a datagram's body.
#[derive(Clone)]
enum Protection {
    /// XChaCha20-Poly1305: every node's.
    Sealed(Arc<XChaCha20Poly1305>),
    /// The same frame, length, key id and replay guard, with the body in clear and the tag
    /// unchecked: for the simulator's network, which loses, delays and duplicates datagrams
    /// but carries nothing its nodes did not send (the cipher was a fifth of a 1000-node
    /// run's time). See [`Keyring::clear_for_simulation`].
    Clear,
}

impl GossipKey {
    fn new(keys: &ClusterKeys) -> GossipKey {
        let id = key_id(b"botclaw/v2/gossip-key-id", &keys.gossip);
        let cipher = Arc::new(XChaCha20Poly1305::new((&keys.gossip).into()));
        GossipKey { id, protection: Protection::Sealed(cipher) }
    }
}

/// A key's id on the wire: the first bytes of a labelled hash of its secret.
fn key_id(label: &[u8], secret: &[u8]) -> [u8; KEY_ID_BYTES] {
    let mut h = Sha256::new();
    h.update(label);
    h.update(secret);
    let digest = h.finalize();
    let mut id = [0u8; KEY_ID_BYTES];
    id.copy_from_slice(&digest[..KEY_ID_BYTES]);
    id
}

/// The gossip keys a node holds: it seals with the primary and opens with any.
#[derive(Clone)]
pub struct Keyring {
    primary: GossipKey,
    previous: Vec<GossipKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("keys", &(1 + self.previous.len())).finish()
    }
}

impl Keyring {
    pub fn new(primary: &ClusterKeys, previous: &[ClusterKeys]) -> Keyring {
        Keyring {
            primary: GossipKey::new(primary),
            previous: previous.iter().map(GossipKey::new).collect(),
        }
    }

    /// Derives the keys of `primary` and `previous` secrets (see [`ClusterKeys::derive`]).
    pub fn from_secrets(primary: &[u8], previous: &[&[u8]]) -> Keyring {
        let previous: Vec<ClusterKeys> = previous.iter().map(|s| ClusterKeys::derive(s)).collect();
        Keyring::new(&ClusterKeys::derive(primary), &previous)
    }

    /// A keyring for a simulated network only: datagrams keep their frame, length and
    /// replay guard, and a node with another secret still cannot open them (the key id is
    /// the secret's), but nothing is encrypted or authenticated, and no KDF runs. Never for
    /// a node: anyone on its network could read and forge its gossip.
    pub fn clear_for_simulation(secret: &[u8]) -> Keyring {
        let id = key_id(b"botclaw/v2/simulated-key-id", secret);
        Keyring { primary: GossipKey { id, protection: Protection::Clear }, previous: Vec::new() }
    }

    fn key(&self, id: &[u8]) -> Option<&GossipKey> {
        std::iter::once(&self.primary).chain(&self.previous).find(|k| k.id == id)
    }
}

/// Nonces of packets opened within the replay window, bounded in count.
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    window_ms: u64,
    max: usize,
    /// (timestamp, nonce prefix) of the packets opened, oldest first. A replay carries the
    /// same pair (the timestamp is inside the authenticated plaintext).
    seen: BTreeSet<(u64, u128)>,
    /// Packets sealed at or before this were forgotten for room: refused.
    floor_ms: Option<u64>,
}

impl ReplayGuard {
    pub fn new(window_ms: u64, max: usize) -> ReplayGuard {
        ReplayGuard { window_ms, max: max.max(1), seen: BTreeSet::new(), floor_ms: None }
    }

    /// Whether a packet sealed at `ts_ms` with `nonce` may be accepted at `now_ms`
    /// (remembering it if so).
    fn admit(&mut self, ts_ms: u64, nonce: &[u8], now_ms: u64) -> Result<(), AuthError> {
        if ts_ms.saturating_add(self.window_ms) < now_ms
            || ts_ms > now_ms.saturating_add(self.window_ms)
            || self.floor_ms.is_some_and(|f| ts_ms <= f)
        {
            return Err(AuthError::Stale);
        }
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&nonce[..16]);
        let id = u128::from_le_bytes(prefix);
        if self.seen.contains(&(ts_ms, id)) {
            return Err(AuthError::Replayed);
        }
        // Forget what fell out of the window, then the oldest if still full.
        let horizon = now_ms.saturating_sub(self.window_ms);
        while let Some(&(t, _)) = self.seen.first() {
            if t >= horizon && self.seen.len() < self.max {
                break;
            }
            self.seen.pop_first();
            if t >= horizon {
                self.floor_ms = Some(self.floor_ms.map_or(t, |f| f.max(t)));
            }
        }
        self.seen.insert((ts_ms, id));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Seals and opens datagrams with a [`Keyring`], refusing replays.
#[derive(Clone)]
pub struct PacketAuth {
    keys: Keyring,
    packet_bytes_max: usize,
    replay: ReplayGuard,
}

impl std::fmt::Debug for PacketAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketAuth")
            .field("packet_bytes_max", &self.packet_bytes_max)
            .field("keys", &self.keys)
            .finish()
    }
}

impl PacketAuth {
    pub fn new(keys: Keyring, packet_bytes_max: usize, replay: ReplayGuard) -> Self {
        PacketAuth { keys, packet_bytes_max, replay }
    }

    /// Largest payload that still fits in `packet_bytes_max` once sealed.
    pub fn payload_bytes_max(&self) -> usize {
        self.packet_bytes_max - OVERHEAD_BYTES
    }

    /// Encrypts `payload` under the primary key, stamped `now_ms`, with the random `nonce`.
    pub fn seal(&self, payload: &[u8], now_ms: u64, nonce: [u8; NONCE_BYTES]) -> Vec<u8> {
        let key = &self.keys.primary;
        // One buffer: header, then the plaintext encrypted in place, then the tag.
        let mut out = Vec::with_capacity(payload.len() + OVERHEAD_BYTES);
        out.push(PACKET_VERSION);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&now_ms.to_le_bytes());
        out.extend_from_slice(payload);
        match &key.protection {
            Protection::Sealed(cipher) => {
                let (header, body) = out.split_at_mut(HEADER_BYTES);
                let tag = cipher
                    .encrypt_in_place_detached(
                        XNonce::from_slice(&nonce),
                        &header[..1 + KEY_ID_BYTES],
                        body,
                    )
                    .expect("XChaCha20-Poly1305 encrypts any datagram-sized message");
                out.extend_from_slice(&tag);
            }
            Protection::Clear => out.extend_from_slice(&[0; TAG_BYTES]),
        }
        out
    }

    /// Returns the payload of an authentic datagram received at `now_ms` that was not
    /// received before.
    pub fn open(&mut self, packet: &[u8], now_ms: u64) -> Result<Vec<u8>, AuthError> {
        let (payload, ts, nonce) = self.decrypt(packet)?;
        self.replay.admit(ts, &nonce, now_ms)?;
        Ok(payload)
    }

    /// Checks and decrypts, without the replay guard: (payload, timestamp, nonce).
    fn decrypt(&self, packet: &[u8]) -> Result<(Vec<u8>, u64, [u8; NONCE_BYTES]), AuthError> {
        if packet.len() > self.packet_bytes_max {
            return Err(AuthError::TooLarge);
        }
        if packet.len() < OVERHEAD_BYTES {
            return Err(AuthError::TooShort);
        }
        if packet[0] != PACKET_VERSION {
            return Err(AuthError::BadVersion);
        }
        let key = self.keys.key(&packet[1..1 + KEY_ID_BYTES]).ok_or(AuthError::UnknownKey)?;
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&packet[1 + KEY_ID_BYTES..HEADER_BYTES]);
        let aad = &packet[..1 + KEY_ID_BYTES];
        let (sealed, tag) =
            packet[HEADER_BYTES..].split_at(packet.len() - HEADER_BYTES - TAG_BYTES);
        let mut plain = sealed.to_vec();
        if let Protection::Sealed(cipher) = &key.protection {
            cipher
                .decrypt_in_place_detached(
                    XNonce::from_slice(&nonce),
                    aad,
                    &mut plain,
                    Tag::from_slice(tag),
                )
                .map_err(|_| AuthError::BadTag)?;
        }
        let mut ts = [0u8; TS_BYTES];
        ts.copy_from_slice(&plain[..TS_BYTES]);
        plain.drain(..TS_BYTES);
        Ok((plain, u64::from_le_bytes(ts), nonce))
    }
}

#[cfg(test)]
mod tests;
