//! The chat protocol over WebSocket, on the client port.
//!
//! A client connection whose first bytes are an HTTP `GET` is upgraded to WebSocket (any
//! path); then each text frame carries one request (a JSON object) and each answer goes out
//! as one text frame. Behind the upgrade runs the very connection code of JSON lines (the
//! same `hello` and tokens, limits, per-conversation order, timeouts), fed through a bounded
//! in-memory pipe: a frame becomes a line, a line becomes a frame. With TLS on the client
//! port this is `wss://`. A JSON line never starts with `G`, so the two cannot be confused.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Bytes the pipe between the WebSocket and the connection holds each way (the connection's
/// own bounds apply behind it: `frame_bytes_max` per request, `output_buffer_bytes_max`).
pub const PIPE_BYTES: usize = 64 * 1024;

/// What a client connection speaks, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    Lines,
    WebSocket,
}

/// Reads the connection's first bytes (waiting at most `within`); `None` if it closed or
/// said nothing in time. The bytes read are returned to be handled first.
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Option<(Speaks, BytesMut)> {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    match tokio::time::timeout(within, stream.read_buf(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => {
            let speaks = if buf[0] == b'G' { Speaks::WebSocket } else { Speaks::Lines };
            Some((speaks, buf))
        }
        _ => None,
    }
}

/// The WebSocket limits: a message or frame at most `frame_bytes_max` (a request line's
/// bound); buffers of 16 KiB (the defaults, 128 KiB each, are allocated per connection).
/// Answers are written as they come and flushed before more are read from the pipe, so
/// what waits unsent is at most what the pipe held.
pub fn config(frame_bytes_max: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(frame_bytes_max))
        .max_frame_size(Some(frame_bytes_max))
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
}

/// Carries frames to `pipe` as lines and `pipe`'s lines back as frames, until the
/// connection behind `pipe` closes. When the client closes (or breaks the protocol), the
/// connection sees the end of its input and still sends the answers it owes.
pub async fn pump<S>(ws: WebSocketStream<S>, pipe: DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut frames) = ws.split();
    let (mut from_conn, mut to_conn) = tokio::io::split(pipe);
    let inbound = async move {
        let mut line = Vec::new();
        while let Some(message) = frames.next().await {
            let bytes: &[u8] = match &message {
                Ok(Message::Text(text)) => text.as_bytes(),
                Ok(Message::Binary(bytes)) => bytes,
                Ok(Message::Close(_)) | Err(_) => break,
                // Pings are answered by the WebSocket layer itself.
                Ok(_) => continue,
            };
            // A pretty-printed object spans lines; outside strings a line break is only
            // whitespace, and inside them JSON does not allow one.
            line.clear();
            line.extend(bytes.iter().map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }));
            line.push(b'\n');
            if to_conn.write_all(&line).await.is_err() {
                break;
            }
        }
        let _ = to_conn.shutdown().await;
    };
    let outbound = async move {
        let mut buf = BytesMut::with_capacity(PIPE_BYTES);
        loop {
            let mut fed = false;
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line = buf.split_to(end + 1);
                let text = String::from_utf8_lossy(&line[..end]).into_owned();
                if sink.feed(Message::text(text)).await.is_err() {
                    return;
                }
                fed = true;
            }
            if fed && sink.flush().await.is_err() {
                return;
            }
            match from_conn.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        let _ = sink.close().await;
    };
    // The connection's side decides the end: when the client stops first, the answers it
    // is owed still go out; when the connection ends first, frames are no longer read.
    let (inbound, outbound) = (std::pin::pin!(inbound), std::pin::pin!(outbound));
    let mut outbound = outbound;
    tokio::select! {
        _ = &mut outbound => return,
        _ = inbound => {}
    }
    outbound.await;
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prefixed_reads_the_prefix_first() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(Bytes::from_static(b"hello"), b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn sniff_tells_websocket_from_lines() {
        for (first, speaks) in [
            (&b"GET / HTTP/1.1\r\n"[..], Speaks::WebSocket),
            (&b"{\"op\":\"ping\"}\n"[..], Speaks::Lines),
        ] {
            let (mut a, mut b) = tokio::io::duplex(64);
            a.write_all(first).await.unwrap();
            let (got, buf) = sniff(&mut b, Duration::from_secs(1)).await.unwrap();
            assert_eq!((got, &buf[..]), (speaks, first));
        }
        let (_a, mut b) = tokio::io::duplex(64);
        assert!(sniff(&mut b, Duration::from_millis(20)).await.is_none(), "silence times out");
    }
}
