//! Reading frames from QUIC streams: the thin I/O layer around
//! `agent_link_proto::codec` (writing is `server/writer.rs`). Kept apart
//! from the server's modules because the reader is to be shared with the
//! peer in a frame-layer crate; nothing here knows the relay.
//!
//! A frame's length is checked against the limit as soon as its 4-byte
//! header arrives, before any buffer is grown for it, so a peer that declares
//! a 1 GiB frame costs nothing but an error. A frame that has begun must be
//! complete within the frame deadline (`frame_timeout_secs`), so a peer that
//! trickles a frame byte by byte cannot hold a stream and its buffer open
//! for ever; a stream idle between frames has no deadline.

use std::time::Duration;

use agent_link_proto::{codec, ErrorCode, ProtoError};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
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
    pub(crate) fn code(&self) -> Option<ErrorCode> {
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
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    max: usize,
    frame_timeout: Option<Duration>,
}

impl FrameReader {
    /// Frames over `max` body bytes are refused. No frame deadline until
    /// [`FrameReader::set_frame_timeout`].
    pub(crate) fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
            max,
            frame_timeout: None,
        }
    }

    /// Change the limit (after authentication raises it).
    pub(crate) fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// A frame that has begun (some of its bytes are buffered) must be
    /// complete within `timeout` of this reader starting to wait for the
    /// rest; else [`ReadError::TimedOut`].
    pub(crate) fn set_frame_timeout(&mut self, timeout: Duration) {
        self.frame_timeout = Some(timeout);
    }

    /// The next frame's body; `Ok(None)` when the peer finished the stream
    /// cleanly at a frame boundary.
    pub(crate) async fn next(&mut self) -> Result<Option<Bytes>, ReadError> {
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
    pub(crate) async fn next_batch(
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
    pub(crate) fn stop(&mut self, code: ErrorCode) {
        let _ = self.recv.stop(code.as_u32().into());
    }
}
