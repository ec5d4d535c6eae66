use bytes::BytesMut;
use proptest::prelude::*;

use super::*;

fn frames(framer: &mut LineFramer, buf: &mut BytesMut) -> Vec<Frame> {
    std::iter::from_fn(|| framer.next_frame(buf)).collect()
}

fn line(s: &str) -> Frame {
    Frame::Line(Bytes::copy_from_slice(s.as_bytes()))
}

#[test]
fn splits_lines_and_waits_for_more() {
    let mut f = LineFramer::new(100);
    let mut buf = BytesMut::from(&b"one\ntwo\r\n\nthr"[..]);
    assert_eq!(frames(&mut f, &mut buf), vec![line("one"), line("two")]);
    assert_eq!(&buf[..], b"thr");
    buf.extend_from_slice(b"ee\n");
    assert_eq!(frames(&mut f, &mut buf), vec![line("three")]);
    assert!(buf.is_empty());
}

#[test]
fn long_line_reported_once_then_skipped() {
    let mut f = LineFramer::new(8);
    let mut buf = BytesMut::from(&b"0123456789abc"[..]);
    assert_eq!(frames(&mut f, &mut buf), vec![Frame::TooLarge]);
    assert!(buf.is_empty(), "memory bounded: skipped bytes dropped");
    buf.extend_from_slice(b"defgh\nok\n");
    assert_eq!(frames(&mut f, &mut buf), vec![line("ok")]);
}

#[test]
fn long_complete_line_is_too_large() {
    let mut f = LineFramer::new(4);
    let mut buf = BytesMut::from(&b"12345\nabc\n"[..]);
    assert_eq!(frames(&mut f, &mut buf), vec![Frame::TooLarge, line("abc")]);
}

#[test]
fn line_of_exactly_the_limit_passes() {
    let mut f = LineFramer::new(4);
    let mut buf = BytesMut::from(&b"1234\n"[..]);
    assert_eq!(frames(&mut f, &mut buf), vec![line("1234")]);
}

mod fuzz {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(botclaw_core::fuzz::cases()))]
        /// Whatever the bytes and however they are split into reads, the framer never holds
        /// more than the limit plus one read, and every line it returns is within the limit.
        #[test]
        fn arbitrary_bytes_in_arbitrary_chunks(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            cuts in proptest::collection::vec(1usize..300, 1..40),
        ) {
            let max = 64;
            let mut f = LineFramer::new(max);
            let mut buf = BytesMut::new();
            let mut rest = &bytes[..];
            let mut cut = cuts.iter().cycle();
            while !rest.is_empty() {
                let n = (*cut.next().unwrap()).min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Some(frame) = f.next_frame(&mut buf) {
                    if let Frame::Line(l) = frame {
                        prop_assert!(l.len() <= max);
                        prop_assert!(!l.contains(&b'\n'));
                    }
                }
                prop_assert!(buf.len() <= max + 300);
            }
        }

        /// Lines within the limit come out exactly as they went in, whatever the chunking.
        #[test]
        fn well_formed_lines_round_trip(
            lines in proptest::collection::vec("[a-z0-9 {}:\",]{1,60}", 0..30),
            chunk in 1usize..50,
        ) {
            let mut f = LineFramer::new(64);
            let joined: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\n").into_bytes()).collect();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            for piece in joined.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(frame) = f.next_frame(&mut buf) {
                    out.push(frame);
                }
            }
            let want: Vec<Frame> = lines.iter().map(|l| line(l)).collect();
            prop_assert_eq!(out, want);
        }
    }
}
