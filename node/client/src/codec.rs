//! A pure line framer: bytes in, complete lines out.
//!
//! It never touches a socket: the caller appends what it read to a `BytesMut` and asks for
//! frames. It tells three cases apart: a complete line, "need more bytes", and a line longer
//! than `frame_bytes_max`, which is reported once and then skipped up to its newline, so the
//! connection stays usable and memory stays bounded by the limit.

use bytes::{Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// One line, without its `\n` (and without a trailing `\r`).
    Line(Bytes),
    /// A line over the limit was dropped (its bytes are being skipped).
    TooLarge,
}

#[derive(Debug, Clone)]
pub struct LineFramer {
    frame_bytes_max: usize,
    skipping: bool,
    /// Bytes of `buf` already searched for a newline (so scans are not repeated).
    scanned: usize,
}

impl LineFramer {
    pub fn new(frame_bytes_max: usize) -> Self {
        LineFramer { frame_bytes_max, skipping: false, scanned: 0 }
    }

    /// Takes the next frame out of `buf`. `None` means more bytes are needed. Empty lines
    /// are skipped.
    pub fn next_frame(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        loop {
            let newline =
                buf[self.scanned..].iter().position(|&b| b == b'\n').map(|i| i + self.scanned);
            if self.skipping {
                match newline {
                    Some(i) => {
                        let _ = buf.split_to(i + 1);
                        self.skipping = false;
                        self.scanned = 0;
                        continue;
                    }
                    None => {
                        buf.clear();
                        self.scanned = 0;
                        return None;
                    }
                }
            }
            match newline {
                Some(i) if i <= self.frame_bytes_max => {
                    let mut line = buf.split_to(i + 1);
                    self.scanned = 0;
                    line.truncate(i);
                    if line.last() == Some(&b'\r') {
                        line.truncate(i - 1);
                    }
                    if line.is_empty() {
                        continue;
                    }
                    return Some(Frame::Line(line.freeze()));
                }
                Some(i) => {
                    let _ = buf.split_to(i + 1);
                    self.scanned = 0;
                    return Some(Frame::TooLarge);
                }
                None if buf.len() > self.frame_bytes_max => {
                    buf.clear();
                    self.scanned = 0;
                    self.skipping = true;
                    return Some(Frame::TooLarge);
                }
                None => {
                    self.scanned = buf.len();
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
