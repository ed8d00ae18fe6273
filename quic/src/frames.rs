//! Reading and writing frames on QUIC streams: the [`Deframer`] on a
//! `quinn::RecvStream`, plus the few writes every side makes.
//!
//! A frame's length is checked against the limit as soon as its 4-byte
//! header arrives, before the reader waits for or buffers its body, so a
//! peer that declares a 1 GiB frame costs nothing but an error. A frame that
//! has begun must be complete within the frame deadline
//! ([`FrameReader::set_frame_timeout`]), so a peer that trickles a frame byte
//! by byte cannot hold a stream and its buffer open for ever; a stream idle
//! between frames has no deadline and holds no buffer. A stream that ends
//! in the middle of a frame is [`ReadError::Truncated`], never a clean end.

use std::time::Duration;

use agent_link_proto::deframe::Deframer;
use agent_link_proto::{ErrorCode, PeerToRelay, ProtoError, RelayToPeer};
use bytes::Bytes;
use futures_util::FutureExt;

use crate::endpoint::connection_error;

/// Largest chunk taken from quinn per read. A chunk read while nothing is
/// buffered is kept as it is (its frames are slices of it); while a frame
/// is incomplete, reads are also capped by what its header declares.
const READ_CHUNK: usize = 64 * 1024;

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The header declared an empty frame or one over the limit (the other
    /// side's limit is lower than ours, or it is hostile).
    #[error(transparent)]
    Frame(ProtoError),
    /// The stream ended in the middle of a frame: `have` of its `need`
    /// bytes arrived. The sender stopped or was cut off mid-write.
    #[error("stream ended mid-frame: {have} of {need} bytes arrived")]
    Truncated {
        /// Bytes of the unfinished frame that arrived, header included.
        have: usize,
        /// Bytes the frame takes (just the header's 4 if it is cut).
        need: usize,
    },
    /// A frame was begun but not completed within the frame deadline (a
    /// slow or stalled sender, or one trickling bytes on purpose).
    #[error("frame not completed in time")]
    TimedOut,
    /// The stream was reset or the connection was lost.
    #[error(transparent)]
    Stream(#[from] quinn::ReadError),
}

impl From<ProtoError> for ReadError {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::Truncated { have, need } => Self::Truncated { have, need },
            e => Self::Frame(e),
        }
    }
}

impl ReadError {
    /// The error code to report, if the other side is still there to hear
    /// it.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Frame(e) => Some(e.code()),
            Self::Truncated { .. } => Some(ErrorCode::Malformed),
            // No code of its own in protocol version 1: the closest is the
            // one for a first frame that does not arrive in time.
            Self::TimedOut => Some(ErrorCode::AuthTimeout),
            Self::Stream(_) => None,
        }
    }
}

/// Buffered frame reader over a QUIC receive stream. Cancel-safe: a
/// [`FrameReader::next`] dropped before it returns (a `select!` or a
/// `timeout` around it) loses no bytes; the frame deadline starts again
/// with the next call.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    deframer: Deframer,
    frame_timeout: Option<Duration>,
    /// The end of the stream (or its failure), seen by `next_batch` while it
    /// took what was ready: reported by the next call.
    ended: Option<Result<(), quinn::ReadError>>,
}

impl FrameReader {
    /// Frames over `max` body bytes are refused. No frame deadline until
    /// [`FrameReader::set_frame_timeout`].
    pub fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Self {
            recv,
            deframer: Deframer::new(max),
            frame_timeout: None,
            ended: None,
        }
    }

    /// Change the limit (after authentication raises it).
    pub fn set_max(&mut self, max: usize) {
        self.deframer.set_max(max);
    }

    /// A frame that has begun (some of its bytes are buffered) must be
    /// complete within `timeout` of this reader starting to wait for the
    /// rest; else [`ReadError::TimedOut`].
    pub fn set_frame_timeout(&mut self, timeout: Duration) {
        self.frame_timeout = Some(timeout);
    }

    /// The next frame's body; `Ok(None)` when the other side finished the
    /// stream cleanly at a frame boundary.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ReadError> {
        // Counted only while this call waits for the other side, so time
        // the caller spends elsewhere (e.g. on backpressure) is never
        // charged to it.
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            if let Some(frame) = self.deframer.next_frame()? {
                return Ok(Some(frame));
            }
            match self.ended.take() {
                Some(Ok(())) => {
                    self.deframer.finish()?;
                    self.ended = Some(Ok(()));
                    return Ok(None);
                }
                Some(Err(e)) => return Err(ReadError::Stream(e)),
                None => {}
            }
            let chunk = if self.deframer.is_mid_frame() {
                if deadline.is_none() {
                    deadline = self.frame_timeout.map(|t| tokio::time::Instant::now() + t);
                }
                // Only what the (already checked) header still declares, so
                // the buffer never grows past the frame being completed.
                let want = self.deframer.wanted().clamp(1, READ_CHUNK);
                let read = self.recv.read_chunk(want, true);
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, read)
                        .await
                        .map_err(|_| ReadError::TimedOut)??,
                    None => read.await?,
                }
            } else {
                // Nothing buffered: no deadline (an idle stream is fine) and
                // no buffer held while waiting.
                self.recv.read_chunk(READ_CHUNK, true).await?
            };
            match chunk {
                Some(c) => self.deframer.push(c.bytes),
                None => {
                    self.deframer.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// The next frames: at least one (reading if none is buffered), then
    /// every other whole frame already buffered or already received by
    /// QUIC (taken without waiting), up to `max_frames`. `Ok(false)` on a
    /// clean end of stream with nothing buffered. Taking what has arrived
    /// keeps batches as large as the traffic makes them (one signature
    /// batch, one write of replies), whatever the packet boundaries.
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
            match self.deframer.next_frame() {
                Ok(Some(f)) => {
                    out.push(f);
                    continue;
                }
                // An error the next call will report (the bytes stay
                // buffered).
                Err(_) => break,
                Ok(None) => {}
            }
            if self.ended.is_some() {
                break;
            }
            let want = if self.deframer.is_mid_frame() {
                self.deframer.wanted().clamp(1, READ_CHUNK)
            } else {
                READ_CHUNK
            };
            // Only what is there now: never wait here.
            match self.recv.read_chunk(want, true).now_or_never() {
                Some(Ok(Some(c))) => self.deframer.push(c.bytes),
                Some(Ok(None)) => self.ended = Some(Ok(())),
                Some(Err(e)) => self.ended = Some(Err(e)),
                None => break,
            }
        }
        Ok(true)
    }

    /// Tell the other side to stop sending on this stream, with `code`.
    pub fn stop(&mut self, code: ErrorCode) {
        // Fails only if the stream is already stopped or finished and
        // read to the end: nothing left to stop.
        let _ = self.recv.stop(code.as_u32().into());
    }
}

/// A frame this workspace sends: [`PeerToRelay`] or [`RelayToPeer`]. Sealed,
/// so [`encode`] cannot be handed anything else (an envelope, a body of
/// some other type).
pub trait Frame: sealed::Encode {}

impl Frame for PeerToRelay<'_> {}
impl Frame for RelayToPeer<'_> {}

mod sealed {
    use agent_link_proto::{codec, PeerToRelay, ProtoError, RelayToPeer};

    pub trait Encode {
        fn frame(&self) -> Result<Vec<u8>, ProtoError>;
    }

    impl Encode for PeerToRelay<'_> {
        fn frame(&self) -> Result<Vec<u8>, ProtoError> {
            codec::frame(self)
        }
    }

    impl Encode for RelayToPeer<'_> {
        fn frame(&self) -> Result<Vec<u8>, ProtoError> {
            codec::frame(self)
        }
    }
}

/// One of our own frames, header and body, as `Bytes`.
///
/// # Panics
/// If the frame's body would be over [`codec::HARD_MAX_FRAME`]
/// (`agent_link_proto::codec`): encoding fails for nothing else, since our
/// frames hold only integers, short ids and byte strings, which bincode
/// writes to a `Vec` without error below its byte limit. Every caller builds
/// frames from bounded parts (ids of at most 64 bytes, envelopes the sender
/// already checked against the relay's `max_message_size`, which is
/// validated to be under the hard limit); a frame over 16 MiB is a bug in
/// the caller, not an input to report. Before this, an encoding error
/// silently became an empty frame.
///
/// [`codec::HARD_MAX_FRAME`]: agent_link_proto::codec::HARD_MAX_FRAME
pub fn encode<F: Frame>(frame: &F) -> Bytes {
    Bytes::from(
        frame
            .frame()
            .expect("our own frames stay under the hard frame limit (see `encode`)"),
    )
}

/// Write one of our own frames (see [`encode`]).
pub async fn write_frame<F: Frame>(
    send: &mut quinn::SendStream,
    frame: &F,
) -> Result<(), quinn::WriteError> {
    send.write_all(&encode(frame)).await
}

/// Refuse a stream: write `Error{code}`, finish the stream and give the
/// other side up to a second to read it before the caller drops or closes
/// anything (dropping at once could reset the stream before the frame is
/// delivered). Failures are ignored: the stream is being given up anyway.
pub async fn refuse_stream(send: &mut quinn::SendStream, code: ErrorCode) {
    let _ = send.write_all(&encode(&RelayToPeer::Error { code })).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
}

/// Why a [`request`] got no reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No stream could be opened: the connection is closed or lost.
    #[error("could not open a stream")]
    Open(#[source] quinn::ConnectionError),
    /// The request could not be written: the stream was stopped or the
    /// connection lost.
    #[error("could not send the request")]
    Write(#[source] quinn::WriteError),
    /// The reply could not be read: a bad or over-limit frame, a truncated
    /// one, a reset stream or a lost connection.
    #[error("could not read the reply")]
    Read(#[source] ReadError),
    /// The other side finished the stream without replying.
    #[error("the stream ended without a reply")]
    NoReply,
}

impl RequestError {
    /// The relay's reason, when the request failed because it closed the
    /// connection on purpose (e.g. `Revoked`).
    pub fn close_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Open(e)
            | Self::Write(quinn::WriteError::ConnectionLost(e))
            | Self::Read(ReadError::Stream(quinn::ReadError::ConnectionLost(e))) => {
                connection_error(e)
            }
            _ => None,
        }
    }
}

/// One request and one reply on a fresh bidirectional stream (a status
/// request, a registration): the reply frame's body, at most `limit`
/// bytes. Not bounded in time: wrap it in `tokio::time::timeout`.
pub async fn request(
    conn: &quinn::Connection,
    req: &PeerToRelay<'_>,
    limit: usize,
) -> Result<Bytes, RequestError> {
    let (mut send, recv) = conn.open_bi().await.map_err(RequestError::Open)?;
    write_frame(&mut send, req)
        .await
        .map_err(RequestError::Write)?;
    let mut reader = FrameReader::new(recv, limit);
    let reply = reader.next().await.map_err(RequestError::Read)?;
    // Our side finishes once the reply is in, as the peer always did.
    let _ = send.finish();
    reply.ok_or(RequestError::NoReply)
}
