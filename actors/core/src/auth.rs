//! Authentication of gossip datagrams with the cluster secret.
//!
//! A sealed packet is `VERSION || payload || HMAC-SHA256(key, VERSION || payload)`.
//! [`PacketAuth::open`] checks size and tag (in constant time) before anything parses the
//! payload, so a peer without the secret can never get a packet into foca. The key is
//! derived from the secret with a domain label, so the same secret can key other uses
//! (the inter-node cookie) without the two ever being equal.
//!
//! Replay is not prevented: a captured packet can be re-sent. SWIM tolerates duplicates and
//! stale updates (incarnations only move forward), which bounds what a replay can do.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Wire format version, the first byte of every datagram.
pub const PACKET_VERSION: u8 = 1;
/// Length of the authentication tag.
pub const TAG_BYTES: usize = 32;
/// Bytes a sealed packet adds to its payload.
pub const OVERHEAD_BYTES: usize = 1 + TAG_BYTES;

/// Why a datagram was rejected. The driver counts each reason separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("datagram shorter than the header and tag")]
    TooShort,
    #[error("datagram larger than packet_bytes_max")]
    TooLarge,
    #[error("unknown packet version")]
    BadVersion,
    #[error("authentication tag does not match the cluster secret")]
    BadTag,
}

impl AuthError {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::TooShort => "too_short",
            AuthError::TooLarge => "too_large",
            AuthError::BadVersion => "bad_version",
            AuthError::BadTag => "bad_tag",
        }
    }
}

/// Seals and opens datagrams with a key derived from the cluster secret.
#[derive(Clone)]
pub struct PacketAuth {
    mac: HmacSha256,
    packet_bytes_max: usize,
}

impl std::fmt::Debug for PacketAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketAuth").field("packet_bytes_max", &self.packet_bytes_max).finish()
    }
}

/// Derives a purpose-specific key from the cluster secret.
pub fn derive_key(secret: &[u8], purpose: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"botclaw/v1/");
    h.update(purpose.as_bytes());
    h.update([0u8]);
    h.update(secret);
    h.finalize().into()
}

impl PacketAuth {
    pub fn new(secret: &[u8], packet_bytes_max: usize) -> Self {
        let key = derive_key(secret, "gossip-hmac");
        let mac = HmacSha256::new_from_slice(&key).expect("hmac takes keys of any length");
        PacketAuth { mac, packet_bytes_max }
    }

    /// Largest payload that still fits in `packet_bytes_max` once sealed.
    pub fn payload_bytes_max(&self) -> usize {
        self.packet_bytes_max - OVERHEAD_BYTES
    }

    pub fn seal(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + OVERHEAD_BYTES);
        out.push(PACKET_VERSION);
        out.extend_from_slice(payload);
        let mut mac = self.mac.clone();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// Returns the payload of an authentic datagram.
    pub fn open<'a>(&self, packet: &'a [u8]) -> Result<&'a [u8], AuthError> {
        if packet.len() > self.packet_bytes_max {
            return Err(AuthError::TooLarge);
        }
        if packet.len() < OVERHEAD_BYTES {
            return Err(AuthError::TooShort);
        }
        if packet[0] != PACKET_VERSION {
            return Err(AuthError::BadVersion);
        }
        let (signed, tag) = packet.split_at(packet.len() - TAG_BYTES);
        let mut mac = self.mac.clone();
        mac.update(signed);
        mac.verify_slice(tag).map_err(|_| AuthError::BadTag)?;
        Ok(&signed[1..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let auth = PacketAuth::new(b"secret-one", 1400);
        let sealed = auth.seal(b"hello");
        assert_eq!(auth.open(&sealed).unwrap(), b"hello");
    }

    #[test]
    fn wrong_secret_rejected() {
        let a = PacketAuth::new(b"secret-one", 1400);
        let b = PacketAuth::new(b"secret-two", 1400);
        assert_eq!(b.open(&a.seal(b"hello")), Err(AuthError::BadTag));
    }

    #[test]
    fn any_flipped_bit_rejected() {
        let auth = PacketAuth::new(b"secret-one", 1400);
        let sealed = auth.seal(b"payload bytes");
        for i in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(auth.open(&bad).is_err(), "bit {i} flip accepted");
        }
    }

    #[test]
    fn truncated_and_oversized_rejected() {
        let auth = PacketAuth::new(b"secret-one", 100);
        let sealed = auth.seal(b"0123456789");
        assert_eq!(auth.open(&sealed[..sealed.len() - 1]), Err(AuthError::BadTag));
        assert_eq!(auth.open(&sealed[..10]), Err(AuthError::TooShort));
        assert_eq!(auth.open(&[1u8; 101]), Err(AuthError::TooLarge));
    }

    #[test]
    fn keys_differ_by_purpose() {
        assert_ne!(derive_key(b"s", "gossip-hmac"), derive_key(b"s", "cluster-cookie"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let auth = PacketAuth::new(b"secret-one", 1400);
            prop_assert!(auth.open(&bytes).is_err());
        }
    }
}
