//! Reading and writing frames on QUIC streams: the thin I/O layer around
//! `agent_link_proto::codec`.
//!
//! A frame's length is checked against the limit as soon as its 4-byte
//! header arrives, before any buffer is grown for it, so a peer that declares
//! a 1 GiB frame costs nothing but an error. A frame that has begun must be
//! complete within the frame deadline (`frame_timeout_secs`), so a peer that
//! trickles a frame byte by byte cannot hold a stream and its buffer open
//! for ever; a stream idle between frames has no deadline.

use std::time::Duration;

use agent_link_proto::{codec, ErrorCode, ProtoError, RelayToPeer};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;

use crate::router::Out;

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The header declared an empty or oversized frame.
    #[error(transparent)]
    Frame(#[from] ProtoError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended mid-frame")]
    Truncated,
    /// A frame was begun but not completed within the frame deadline.
    #[error("frame not completed in time")]
    TimedOut,
    /// The stream or connection failed.
    #[error(transparent)]
    Stream(#[from] std::io::Error),
}

impl ReadError {
    /// The error code to report, if the peer is still there to hear it.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Frame(e) => Some(e.code()),
            Self::Truncated => Some(ErrorCode::Malformed),
            // No code of its own in protocol version 1: the closest is the
            // one for a first frame that does not arrive in time.
            Self::TimedOut => Some(ErrorCode::AuthTimeout),
            Self::Stream(_) => None,
        }
    }
}

/// Buffered frame reader over a QUIC receive stream.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    max: usize,
    frame_timeout: Option<Duration>,
}

impl FrameReader {
    /// Frames over `max` body bytes are refused. No frame deadline until
    /// [`FrameReader::set_frame_timeout`].
    pub fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
            max,
            frame_timeout: None,
        }
    }

    /// Change the limit (after authentication raises it).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// A frame that has begun (some of its bytes are buffered) must be
    /// complete within `timeout` of this reader starting to wait for the
    /// rest; else [`ReadError::TimedOut`].
    pub fn set_frame_timeout(&mut self, timeout: Duration) {
        self.frame_timeout = Some(timeout);
    }

    /// The next frame's body; `Ok(None)` when the peer finished the stream
    /// cleanly at a frame boundary.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ReadError> {
        // Counted only while this call waits for the peer, so time the
        // caller spends elsewhere (e.g. on backpressure) is never charged to
        // the peer.
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            if let Some((_, total)) = codec::split_frame(&self.buf, self.max)? {
                let mut frame = self.buf.split_to(total);
                let body = frame.split_off(codec::FRAME_HEADER_LEN);
                return Ok(Some(body.freeze()));
            }
            if self.buf.is_empty() {
                // Nothing buffered: hold no buffer while waiting, so an idle
                // stream costs no memory here, and take quinn's next chunk
                // as it comes (one copy into a fresh buffer per read, which
                // usually holds many frames).
                self.buf = BytesMut::new();
                match self.recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => {
                        self.buf.extend_from_slice(&chunk.bytes);
                        continue;
                    }
                    Ok(None) => return Ok(None),
                    Err(e) => return Err(ReadError::Stream(e.into())),
                }
            }
            // Grow only to what the (already checked) header declares.
            let want = match self.buf.get(..codec::FRAME_HEADER_LEN) {
                Some(h) => {
                    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                    codec::FRAME_HEADER_LEN + len - self.buf.len()
                }
                None => 8 * 1024,
            };
            self.buf.reserve(want.min(64 * 1024));
            if deadline.is_none() && !self.buf.is_empty() {
                deadline = self.frame_timeout.map(|t| tokio::time::Instant::now() + t);
            }
            let n = match deadline {
                Some(d) => tokio::time::timeout_at(d, self.recv.read_buf(&mut self.buf))
                    .await
                    .map_err(|_| ReadError::TimedOut)??,
                None => self.recv.read_buf(&mut self.buf).await?,
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated)
                };
            }
        }
    }

    /// The next frames: at least one (reading if none is buffered), then
    /// every other whole frame already buffered, up to `max_frames`.
    /// `Ok(false)` on a clean end of stream with nothing buffered.
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<Bytes>,
        max_frames: usize,
    ) -> Result<bool, ReadError> {
        out.clear();
        match self.next().await? {
            Some(f) => out.push(f),
            None => return Ok(false),
        }
        while out.len() < max_frames {
            match codec::split_frame(&self.buf, self.max) {
                Ok(Some((_, total))) => {
                    let mut frame = self.buf.split_to(total);
                    out.push(frame.split_off(codec::FRAME_HEADER_LEN).freeze());
                }
                // Incomplete, or an error the next call will report.
                _ => break,
            }
        }
        Ok(true)
    }

    /// Tell the peer to stop sending on this stream.
    pub fn stop(&mut self, code: ErrorCode) {
        let _ = self.recv.stop(code.as_u32().into());
    }
}

/// Encode a relay frame as `Bytes`. Encoding our own frames cannot fail
/// below the hard size limit, which every caller stays under.
pub fn frame(f: &RelayToPeer<'_>) -> Bytes {
    Bytes::from(codec::frame(f).unwrap_or_default())
}

/// An `Error` frame.
pub fn error_frame(code: ErrorCode) -> Bytes {
    frame(&RelayToPeer::Error { code })
}

/// Write `Error{code}`, finish the stream and give the peer a moment to read
/// it before the caller drops or closes anything.
pub async fn refuse_stream(send: &mut quinn::SendStream, code: ErrorCode) {
    let _ = send.write_all(&error_frame(code)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
}

/// Items (envelopes, frames) up to this size are copied into the writer's
/// batch buffer; larger ones go to QUIC as they are, without a copy.
const COPY_MAX: usize = 4 * 1024;

/// Largest allocation step of the writer's batch buffer. Batches are carved
/// out of it one after another, so one allocation serves many writes; QUIC
/// holds each batch until it is acknowledged. Nothing is allocated before
/// the first write, and the step grows from 1 KiB, so an idle stream costs
/// little memory.
const WRITE_BUF: usize = 16 * 1024;

/// Items the writer takes from its queue per write.
const WRITE_BATCH: usize = 128;

/// One write's worth of bytes: small items coalesced into one buffer, large
/// ones passed through as their own chunks (order kept).
struct WriteBatch {
    buf: BytesMut,
    chunks: Vec<Bytes>,
    /// Size of the next allocation (doubling up to `WRITE_BUF`).
    step: usize,
}

impl WriteBatch {
    fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            chunks: Vec::new(),
            step: 1024,
        }
    }

    /// Room for `n` more bytes: none allocated while the current buffer
    /// has room, else one allocation of at least the current step.
    fn reserve(&mut self, n: usize) {
        if self.buf.capacity() - self.buf.len() < n {
            self.buf.reserve(n.max(self.step));
            self.step = (self.step * 2).min(WRITE_BUF);
        }
    }

    fn copy(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    fn bytes(&mut self, b: Bytes) {
        if b.len() <= COPY_MAX {
            self.copy(&b);
        } else {
            self.seal();
            self.chunks.push(b);
        }
    }

    fn seal(&mut self) {
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
    }
}

/// Drain `rx` into `send`: everything queued goes out in one
/// `write_all_chunks` (small frames coalesced into one buffer, so QUIC gets
/// one chunk per write, not one per message). Ends when every sender is
/// gone, on `Out::Close`, on cancellation or on error.
pub async fn write_loop(
    mut send: quinn::SendStream,
    mut rx: tokio::sync::mpsc::Receiver<Out>,
    cancel: tokio_util::sync::CancellationToken,
    queued_bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut batch: Vec<Out> = Vec::new();
    let mut w = WriteBatch::new();
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, WRITE_BATCH) => n,
            _ = cancel.cancelled() => 0,
        };
        if n == 0 {
            let _ = send.finish();
            return;
        }
        let mut close = false;
        let mut delivered = 0;
        // Room for the copied part up front: at most one allocation per
        // write, none while the current buffer has room.
        let copied: usize = batch
            .iter()
            .map(|o| match o {
                Out::Deliver { head, envelope } if envelope.len() > COPY_MAX => {
                    head.as_bytes().len()
                }
                o if o.len() > COPY_MAX => 0,
                o => o.len(),
            })
            .sum();
        w.reserve(copied);
        for item in batch.drain(..) {
            match item {
                Out::Frame(b) => w.bytes(b),
                Out::Deliver { head, envelope } => {
                    delivered += head.as_bytes().len() + envelope.len();
                    w.copy(head.as_bytes());
                    w.bytes(envelope);
                }
                Out::Close(b) => {
                    w.bytes(b);
                    close = true;
                    break;
                }
            }
        }
        batch.clear();
        w.seal();
        if send.write_all_chunks(&mut w.chunks).await.is_err() {
            cancel.cancel();
            return;
        }
        w.chunks.clear();
        queued_bytes.fetch_sub(delivered, std::sync::atomic::Ordering::Relaxed);
        if close {
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            cancel.cancel();
            return;
        }
    }
}

/// Encodes relay frames one after another into one buffer and hands each
/// out as its own `Bytes` (one allocation for many small frames instead of
/// a growing `Vec` per frame). The bytes are those of [`frame`].
/// Nothing is allocated before the first frame; allocations grow from
/// 512 bytes to 8 KiB.
#[derive(Debug, Default)]
pub struct FrameArena {
    buf: BytesMut,
    step: usize,
}

impl FrameArena {
    /// Largest allocation.
    const CHUNK: usize = 8 * 1024;

    /// Encode `f` as a whole frame.
    pub fn frame(&mut self, f: &RelayToPeer<'_>) -> Bytes {
        use bytes::BufMut;
        if self.buf.capacity() < 256 {
            self.step = (self.step * 2).clamp(512, Self::CHUNK);
            self.buf.reserve(self.step);
        }
        self.buf.put_slice(&[0; codec::FRAME_HEADER_LEN]);
        let encoded =
            bincode::encode_into_std_write(f, &mut (&mut self.buf).writer(), codec::CONFIG);
        let body = self.buf.len() - codec::FRAME_HEADER_LEN;
        match (encoded, u32::try_from(body)) {
            (Ok(_), Ok(len)) if body <= codec::HARD_MAX_FRAME => {
                self.buf[..codec::FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
                self.buf.split().freeze()
            }
            // As `frame`: our own frames stay under the hard limit.
            _ => {
                self.buf.clear();
                Bytes::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_proto::{Address, Receipt};

    #[test]
    fn arena_frames_equal_plain_frames() {
        let mut arena = FrameArena::default();
        let mut kept = Vec::new();
        for i in 0..2000u64 {
            let receipt = Receipt {
                id: [i as u8; 16],
                from: Address {
                    instance: "instance-001",
                    agent: "xiaobaozi",
                },
                delivered_at_ms: i * 1_000_003,
            };
            let f = RelayToPeer::Receipt { receipt };
            let a = arena.frame(&f);
            assert_eq!(a, frame(&f));
            kept.push((a, f));
        }
        // Earlier frames are unchanged by later ones (no aliasing).
        for (a, f) in &kept {
            assert_eq!(a, &frame(f));
        }
        assert_eq!(
            arena.frame(&RelayToPeer::Error {
                code: ErrorCode::NotRegistered
            })[..],
            [0, 0, 0, 2, 6, 2]
        );
    }
}
