//! Fuzz targets of the decoders that take bytes from peers and from disk: every one
//! answers an error (or a value) for damaged and arbitrary input, never a panic. See
//! `botclaw_core::fuzz` for the case count and the damage.

use std::sync::Arc;

use botclaw_core::conversation::{ConversationState, TurnRecord};
use botclaw_core::fuzz::{cases, mutate};
use proptest::prelude::*;

use crate::envelope::{ConvOutcome, ConvRequest, Envelope, FailKind};
use crate::forwarder::Batch;
use crate::shards::PeerBatch;
use crate::store::Stored;

fn record() -> TurnRecord {
    TurnRecord {
        turn: 3,
        id: "m-3".into(),
        text: "hello é".into(),
        user: Some("u".into()),
        messages: vec!["hi".into(), "there".into()],
    }
}

fn state() -> ConversationState {
    let mut s = ConversationState::default();
    for i in 0..3 {
        let c = s.next_commit("echo", format!("m{i}"), "t".into(), None, vec!["r".into()], vec![i]);
        s.apply(c, 8);
    }
    s
}

/// Valid encodings of every type a peer or the disk hands a decoder.
fn valid_encodings() -> Vec<(&'static str, Vec<u8>)> {
    let envelope = Envelope {
        conv: "c-1".into(),
        request: ConvRequest::Say { id: "1".into(), text: "x".into(), bot: None, user: None },
        hops: 1,
    };
    let history = ConvOutcome::History { turns: vec![record()], more: true, node: Arc::from("n") };
    let failed = ConvOutcome::failed(FailKind::TooLarge, "big");
    let batch =
        Batch { from: "n".into(), items: vec![(1, envelope.clone()), (2, envelope.clone())] };
    let outcomes = Batch { from: "n".into(), items: vec![(1, history.clone()), (2, failed)] };
    let stored = Stored { state: state(), ..Stored::default() };
    vec![
        ("envelope", envelope.to_bytes()),
        ("outcome", history.to_bytes()),
        ("requests", batch.to_bytes()),
        ("outcomes", outcomes.to_bytes()),
        ("peer batch", PeerBatch { from: "n".into(), msgs: vec![] }.to_bytes()),
        ("record", postcard::to_allocvec(&record()).unwrap()),
        ("state", postcard::to_allocvec(&state()).unwrap()),
        ("stored", postcard::to_allocvec(&stored).unwrap()),
    ]
}

/// Every decoder on `bytes`.
fn decode_all(bytes: &[u8]) {
    let _ = Envelope::from_bytes(bytes);
    let _ = ConvOutcome::from_bytes(bytes);
    let _ = Batch::<Envelope>::from_bytes(bytes);
    let _ = Batch::<ConvOutcome>::from_bytes(bytes);
    let _ = postcard::from_bytes::<PeerBatch>(bytes);
    let _ = postcard::from_bytes::<TurnRecord>(bytes);
    if let Ok(mut s) = postcard::from_bytes::<ConversationState>(bytes) {
        // What a store does with a decoded state.
        s.reindex();
        let _ = s.find("m1");
        let _ = s.history_page(None, 10, 1024);
    }
    let _ = postcard::from_bytes::<Stored>(bytes);
    let _ = crate::store::durable::decode_meta("c", bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn damaged_encodings_never_panic(seed in any::<u64>(), pick in any::<usize>()) {
        let valid = valid_encodings();
        decode_all(&mutate(&valid[pick % valid.len()].1, seed));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_all(&bytes);
    }
}

#[test]
fn every_valid_encoding_decodes() {
    for (what, bytes) in valid_encodings() {
        let ok = match what {
            "envelope" => Envelope::from_bytes(&bytes).is_ok(),
            "outcome" => !matches!(ConvOutcome::from_bytes(&bytes), ConvOutcome::Failed { .. }),
            "requests" => Batch::<Envelope>::from_bytes(&bytes).is_ok(),
            "outcomes" => Batch::<ConvOutcome>::from_bytes(&bytes).is_ok(),
            "peer batch" => postcard::from_bytes::<PeerBatch>(&bytes).is_ok(),
            "record" => postcard::from_bytes::<TurnRecord>(&bytes).is_ok(),
            "state" => postcard::from_bytes::<ConversationState>(&bytes).is_ok(),
            _ => postcard::from_bytes::<Stored>(&bytes).is_ok(),
        };
        assert!(ok, "{what} does not decode");
    }
}
