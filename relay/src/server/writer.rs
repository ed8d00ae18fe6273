//! Writing to a stream: [`Outbound`], the item of a stream's writer queue,
//! and [`write_loop`], the task that drains it; [`FrameArena`] and
//! [`frame`] encode the relay's own frames. Every frame the relay sends on
//! an agent stream goes through one queue, so a stream's writes are never
//! interleaved and a slow reader costs a bounded queue, never a blocked
//! sender.

use std::time::Duration;

use agent_link_proto::{codec, DeliverHead, ErrorCode, RelayToPeer};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::router::StreamLedger;

/// An item for a stream's writer task.
#[derive(Debug)]
pub enum Outbound {
    /// A whole frame to write.
    Frame(Bytes),
    /// A `Deliver` frame as its encoded head and the envelope's original
    /// bytes (a slice of the sender's receive buffer: never re-encoded, not
    /// copied on the read side). Counted against the stream's byte budget
    /// until it is written.
    Deliver {
        /// Frame header and every field before the envelope's bytes.
        head: DeliverHead,
        /// The envelope, exactly as received.
        envelope: Bytes,
        /// Its reply token in the stream's ledger: a delivery no longer
        /// outstanding there (the stream ended) is not written.
        token: u64,
    },
    /// Write this last frame, then finish the stream.
    Close(Bytes),
}

impl Outbound {
    /// Bytes this item puts on the stream.
    pub fn len(&self) -> usize {
        match self {
            Outbound::Frame(b) | Outbound::Close(b) => b.len(),
            Outbound::Deliver { head, envelope, .. } => head.as_bytes().len() + envelope.len(),
        }
    }

    /// Whether this item writes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Encode a relay frame as `Bytes`.
///
/// # Panics
/// If `f` does not encode, which only a frame over the hard size limit
/// could do: the relay's own frames built here are small (`Status` and
/// `StatusPage`, which grow with the registry, are built by
/// `core::status`, which refuses what would not fit).
pub(crate) fn frame(f: &RelayToPeer<'_>) -> Bytes {
    agent_link_quic::frames::encode(f)
}

/// An `Error` frame.
pub(crate) fn error_frame(code: ErrorCode) -> Bytes {
    frame(&RelayToPeer::Error { code })
}

/// Items (envelopes, frames) up to this size are copied into the writer's
/// batch buffer; larger ones go to QUIC as they are, without a copy.
const COPY_MAX: usize = 4 * 1024;

/// Largest allocation step of the writer's batch buffer. Batches are carved
/// out of it one after another, so one allocation serves many writes; QUIC
/// holds each batch until it is acknowledged. Nothing is allocated before
/// the first write, and the step grows from [`WRITE_BUF_FIRST`], so an
/// idle stream costs little memory.
const WRITE_BUF: usize = 16 * 1024;

/// The first allocation step: room for the `Attached` frame and a few small
/// frames. What is left of it stays allocated while the stream is idle
/// (1 KiB was 2 % of an idle connection's memory); a busy stream reaches
/// [`WRITE_BUF`] after six writes.
const WRITE_BUF_FIRST: usize = 256;

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
            step: WRITE_BUF_FIRST,
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
/// gone, on `Outbound::Close`, on cancellation or on error.
pub(crate) async fn write_loop(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Outbound>,
    cancel: CancellationToken,
    ledger: StreamLedger,
) {
    let mut batch: Vec<Outbound> = Vec::new();
    let mut w = WriteBatch::new();
    let mut written: Vec<u64> = Vec::new();
    // One waiter for the whole loop, polled only when the queue is empty
    // (`biased`): see `agent::AgentTask::read_loop`.
    // A queue that never empties would hide a cancellation from `biased`:
    // every `CANCEL_CHECK` writes the token is looked at as well.
    const CANCEL_CHECK: u32 = 64;
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let mut writes = 0u32;
    loop {
        writes = writes.wrapping_add(1);
        let n = if writes.is_multiple_of(CANCEL_CHECK) && cancel.is_cancelled() {
            0
        } else {
            tokio::select! {
                biased;
                n = rx.recv_many(&mut batch, WRITE_BATCH) => n,
                _ = &mut cancelled => 0,
            }
        };
        if n == 0 {
            let _ = send.finish();
            return;
        }
        let mut close = false;
        // Deliveries failed meanwhile (the stream ended, its senders were
        // told `TargetOffline`) are not written after all.
        {
            let l = ledger.lock().unwrap_or_else(|e| e.into_inner());
            batch.retain(|o| match o {
                Outbound::Deliver { token, .. } => l.is_outstanding(*token),
                _ => true,
            });
        }
        // Room for the copied part up front: at most one allocation per
        // write, none while the current buffer has room.
        let copied: usize = batch
            .iter()
            .map(|o| match o {
                Outbound::Deliver { head, envelope, .. } if envelope.len() > COPY_MAX => {
                    head.as_bytes().len()
                }
                o if o.len() > COPY_MAX => 0,
                o => o.len(),
            })
            .sum();
        w.reserve(copied);
        for item in batch.drain(..) {
            match item {
                Outbound::Frame(b) => w.bytes(b),
                Outbound::Deliver {
                    head,
                    envelope,
                    token,
                } => {
                    written.push(token);
                    w.copy(head.as_bytes());
                    w.bytes(envelope);
                }
                Outbound::Close(b) => {
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
        // Written: off the queue (its bytes no longer count), outstanding
        // until answered.
        if !written.is_empty() {
            let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
            for token in written.drain(..) {
                l.unqueue(token);
            }
        }
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
pub(crate) struct FrameArena {
    buf: BytesMut,
    step: usize,
}

impl FrameArena {
    /// Largest allocation.
    const CHUNK: usize = 8 * 1024;

    /// Encode `f` as a whole frame.
    ///
    /// # Panics
    /// As [`frame`]: if `f` does not encode, which the relay's own small
    /// frames never fail to.
    pub(crate) fn frame(&mut self, f: &RelayToPeer<'_>) -> Bytes {
        use bytes::BufMut;
        if self.buf.capacity() < 256 {
            self.step = (self.step * 2).clamp(512, Self::CHUNK);
            self.buf.reserve(self.step);
        }
        self.buf.put_slice(&[0; codec::FRAME_HEADER_LEN]);
        let encoded =
            bincode::encode_into_std_write(f, &mut (&mut self.buf).writer(), codec::CONFIG);
        let body = self.buf.len() - codec::FRAME_HEADER_LEN;
        encoded.expect("the relay's own frames encode (they are far under the hard limit)");
        let len = u32::try_from(body)
            .ok()
            .filter(|_| body <= codec::HARD_MAX_FRAME)
            .expect("the relay's own frames are under the hard frame limit");
        self.buf[..codec::FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        self.buf.split().freeze()
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
