//! Bytes in, whole frames out: the buffering half of reading frames from a
//! stream, with no I/O and no clock, so it is unit-tested, property-tested
//! and fuzzed (`fuzz/fuzz_targets/deframe.rs`) apart from any socket.
//!
//! The rules are those of [`codec::split_frame`] (PROTOCOL.md §2): a 4-byte
//! big-endian length, then that many body bytes.
//! - A header over the limit (or declaring zero bytes) is refused by
//!   [`Deframer::next_frame`] as soon as its 4 bytes are buffered, before
//!   anything is allocated for its body or the reader waits for it.
//! - "Incomplete" is not an error: `next_frame` answers `Ok(None)` and
//!   [`Deframer::wanted`] says how many more bytes the frame at the front
//!   needs, so a reader grows its buffer only to what the header declares
//!   (a peer declaring 1 MiB and sending 5 bytes costs 5 bytes).
//! - At the end of the stream, [`Deframer::finish`] tells a clean end (at a
//!   frame boundary) from a truncated one: [`ProtoError::Truncated`].
//! - Nothing is held while idle: once every buffered frame is taken out the
//!   buffer is released, and a chunk that arrives while nothing is buffered
//!   is kept as it is ([`Deframer::push`]); frames are slices of it, not
//!   copies.
//!
//! The frame deadline (a frame that has begun must complete in time) is the
//! I/O layer's, since it needs a clock: it asks [`Deframer::is_mid_frame`].
//!
//! ```
//! use agent_link_proto::{codec, deframe::Deframer, PeerToRelay, ProtoError};
//! let wire = codec::frame(&PeerToRelay::StatusRequest).unwrap();
//! let mut d = Deframer::new(1024);
//! d.extend(&wire[..3]);
//! assert_eq!(d.next_frame(), Ok(None)); // incomplete, not invalid
//! assert!(d.is_mid_frame());
//! d.extend(&wire[3..]);
//! let body = d.next_frame().unwrap().unwrap();
//! assert_eq!(codec::decode::<PeerToRelay>(&body).unwrap(), PeerToRelay::StatusRequest);
//! assert_eq!(d.finish(), Ok(()));
//! d.extend(&wire[..4]); // the stream ends after the next header
//! assert_eq!(d.next_frame(), Ok(None));
//! assert_eq!(d.finish(), Err(ProtoError::Truncated { have: 4, need: wire.len() }));
//! ```

use bytes::{Bytes, BytesMut};

use crate::codec::{self, FRAME_HEADER_LEN};
use crate::ProtoError;

/// Smallest allocation when a frame's bytes must be gathered (a frame split
/// across chunks); doubled from there, never past the frame's declared size.
const MIN_GROW: usize = 1024;

/// A frame splitter with a body-size limit. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Deframer {
    /// Bytes kept as they arrived (a chunk pushed while nothing was
    /// buffered). Frames are split off it without a copy.
    chunk: Bytes,
    /// Bytes gathered by copying (a frame split across pushes). At most one
    /// of `chunk` and `buf` is non-empty; `chunk` comes first if both were.
    buf: BytesMut,
    max: usize,
}

impl Deframer {
    /// Frames whose body is over `max_body` bytes are refused (and never
    /// more than [`codec::HARD_MAX_FRAME`], whatever `max_body` says).
    pub fn new(max_body: usize) -> Self {
        Self {
            chunk: Bytes::new(),
            buf: BytesMut::new(),
            max: max_body,
        }
    }

    /// Change the limit (a relay raises it once a stream authenticated). It
    /// applies to the frame at the front too, even if its header has been
    /// seen already.
    pub fn set_max(&mut self, max_body: usize) {
        self.max = max_body;
    }

    /// The body-size limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes buffered and not yet taken out as frames.
    pub fn buffered(&self) -> usize {
        self.chunk.len() + self.buf.len()
    }

    /// True if bytes are buffered. Once [`Deframer::next_frame`] answered
    /// `Ok(None)`, they are the start of a frame that has not completed:
    /// what a frame deadline is for.
    pub fn is_mid_frame(&self) -> bool {
        self.buffered() > 0
    }

    /// How many more bytes the frame at the front needs: the rest of the
    /// header if it is cut, else the rest of the body it declares. 0 when
    /// nothing is buffered, when a whole frame is, or when the header is
    /// invalid (`next_frame` reports it). A reader that reads at most this
    /// much while mid-frame never buffers past the frame it is completing.
    pub fn wanted(&self) -> usize {
        let front = self.front();
        if front.is_empty() {
            return 0;
        }
        match self.need(front) {
            Ok(need) => need.saturating_sub(front.len()),
            Err(_) => 0,
        }
    }

    /// Add bytes (copied). Growth is bounded by the frame at the front: the
    /// buffer's capacity is at most what that frame declares or what has
    /// been pushed, whichever is more.
    pub fn extend(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if !self.chunk.is_empty() {
            // Move what is left of the kept chunk (a partial frame, unless
            // the caller pushes before taking frames out) into the gather
            // buffer, so the order of bytes is kept in one place.
            let chunk = std::mem::take(&mut self.chunk);
            self.grow(chunk.len() + bytes.len());
            self.buf.extend_from_slice(&chunk);
        } else {
            self.grow(bytes.len());
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Add a chunk as it came from the stream: kept without a copy if
    /// nothing is buffered (the usual case: a chunk holds many frames, and
    /// they are handed out as slices of it), else copied as by
    /// [`Deframer::extend`].
    pub fn push(&mut self, chunk: Bytes) {
        if self.buffered() == 0 {
            self.buf = BytesMut::new();
            self.chunk = chunk;
        } else {
            self.extend(&chunk);
        }
    }

    /// The next whole frame's body. `Ok(None)` when more bytes are needed
    /// (incomplete, not invalid). An error when the header at the front
    /// declares an empty frame or one over the limit; it is reported again on
    /// every call, as the bytes stay buffered: the stream is unusable.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, ProtoError> {
        if !self.chunk.is_empty() {
            let Some((_, total)) = codec::split_frame(&self.chunk, self.max)? else {
                return Ok(None);
            };
            let frame = self.chunk.split_to(total);
            if self.chunk.is_empty() {
                // Drop our reference to the chunk's allocation: the frames
                // handed out keep it alive only as long as they live.
                self.chunk = Bytes::new();
            }
            return Ok(Some(frame.slice(FRAME_HEADER_LEN..)));
        }
        let Some((_, total)) = codec::split_frame(&self.buf, self.max)? else {
            return Ok(None);
        };
        let frame = self.buf.split_to(total).freeze();
        if self.buf.is_empty() {
            // Hold no buffer while idle (see the module docs).
            self.buf = BytesMut::new();
        }
        Ok(Some(frame.slice(FRAME_HEADER_LEN..)))
    }

    /// The stream has ended: `Ok(())` if it ended at a frame boundary
    /// (whole frames still buffered are not an error; take them with
    /// [`Deframer::next_frame`]), [`ProtoError::Truncated`] if it ended in
    /// the middle of a frame, or the header's error if the bytes after the
    /// whole frames start with an invalid header.
    pub fn finish(&self) -> Result<(), ProtoError> {
        let mut rest = self.front();
        while !rest.is_empty() {
            let need = self.need(rest)?;
            if rest.len() < need {
                return Err(ProtoError::Truncated {
                    have: rest.len(),
                    need,
                });
            }
            rest = rest.get(need..).unwrap_or_default();
        }
        Ok(())
    }

    /// The buffered bytes (only one of the two buffers is ever in use).
    fn front(&self) -> &[u8] {
        if self.chunk.is_empty() {
            &self.buf
        } else {
            &self.chunk
        }
    }

    /// Total bytes (header and body) of the frame starting `bytes`: just the
    /// header's length while the header is cut.
    fn need(&self, bytes: &[u8]) -> Result<usize, ProtoError> {
        match bytes.first_chunk::<FRAME_HEADER_LEN>() {
            Some(h) => Ok(FRAME_HEADER_LEN + codec::body_len(*h, self.max)?),
            None => Ok(FRAME_HEADER_LEN),
        }
    }

    /// Room for `add` more bytes in `buf`. Reallocates by hand (a fresh
    /// buffer of exactly the chosen size, the old bytes copied over) because
    /// `BytesMut::reserve` may round up past what the frame declares.
    /// Doubling keeps the copying linear in the frame's size.
    fn grow(&mut self, add: usize) {
        let len = self.buf.len();
        if self.buf.capacity() - len >= add {
            return;
        }
        let need = len + add;
        // The frame at the front, once `add` more bytes arrived: its
        // declared total if its header is (or will be) known and valid.
        let declared = match self.buf.first_chunk::<FRAME_HEADER_LEN>() {
            Some(h) => codec::body_len(*h, self.max).map_or(need, |b| FRAME_HEADER_LEN + b),
            None => need,
        };
        let cap = (len * 2).max(MIN_GROW).min(declared).max(need);
        let mut grown = BytesMut::with_capacity(cap);
        grown.extend_from_slice(&self.buf);
        self.buf = grown;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::PeerToRelay;

    fn wire(bodies: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in bodies {
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        }
        out
    }

    fn drain(d: &mut Deframer) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            out.push(f);
        }
        out
    }

    #[test]
    fn byte_by_byte_equals_all_at_once() {
        let w = wire(&[b"a", b"hello", &[7; 300]]);
        let mut whole = Deframer::new(1024);
        whole.push(Bytes::from(w.clone()));
        let all = drain(&mut whole);
        assert_eq!(all.len(), 3);
        let mut slow = Deframer::new(1024);
        let mut got = Vec::new();
        for b in &w {
            slow.extend(std::slice::from_ref(b));
            got.extend(drain(&mut slow));
        }
        assert_eq!(got, all);
        assert_eq!(slow.finish(), Ok(()));
        assert!(!slow.is_mid_frame());
    }

    #[test]
    fn incomplete_is_not_invalid_and_wanted_counts_down() {
        let w = wire(&[&[1; 10]]);
        let mut d = Deframer::new(1024);
        assert_eq!(d.wanted(), 0);
        assert!(!d.is_mid_frame());
        d.extend(&w[..2]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.wanted(), 2, "the rest of the header");
        d.extend(&w[2..7]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.wanted(), 7, "the rest of the declared body");
        assert_eq!(d.finish(), Err(ProtoError::Truncated { have: 7, need: 14 }));
        d.extend(&w[7..]);
        assert_eq!(d.wanted(), 0);
        assert_eq!(d.next_frame().unwrap().unwrap(), &[1; 10][..]);
        assert_eq!(d.finish(), Ok(()));
    }

    #[test]
    fn a_cut_header_is_truncation_too() {
        let mut d = Deframer::new(1024);
        d.extend(&[0, 0]);
        assert_eq!(d.finish(), Err(ProtoError::Truncated { have: 2, need: 4 }));
    }

    #[test]
    fn over_limit_is_refused_at_the_header() {
        let mut d = Deframer::new(100);
        d.extend(&101u32.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(ProtoError::FrameTooLarge { len: 101, max: 100 })
        );
        assert_eq!(d.wanted(), 0, "no growth for a refused frame");
        // Still refused: the stream is unusable.
        assert!(d.next_frame().is_err());
        assert!(d.finish().is_err());
        let mut d = Deframer::new(100);
        d.extend(&[0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(ProtoError::EmptyFrame));
    }

    #[test]
    fn the_hard_limit_applies_whatever_the_configured_one() {
        let mut d = Deframer::new(usize::MAX);
        d.extend(&[0xff; 4]);
        assert!(matches!(
            d.next_frame(),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn set_max_applies_to_a_header_already_seen() {
        let w = wire(&[&[0; 50]]);
        let mut d = Deframer::new(10);
        d.extend(&w[..4]);
        assert!(d.next_frame().is_err());
        d.set_max(64);
        assert_eq!(d.max(), 64);
        assert_eq!(d.next_frame(), Ok(None));
        d.extend(&w[4..]);
        assert_eq!(d.next_frame().unwrap().unwrap().len(), 50);
    }

    #[test]
    fn finish_allows_unread_whole_frames() {
        let w = wire(&[b"x", b"y"]);
        let mut d = Deframer::new(16);
        d.extend(&w);
        assert_eq!(d.finish(), Ok(()));
        d.extend(&w[..3]);
        assert_eq!(d.finish(), Err(ProtoError::Truncated { have: 3, need: 4 }));
    }

    #[test]
    fn a_pushed_chunk_is_not_copied_and_is_released_when_drained() {
        let w = Bytes::from(wire(&[b"abc", b"defg"]));
        let mut d = Deframer::new(16);
        d.push(w.clone());
        let f = d.next_frame().unwrap().unwrap();
        assert_eq!(f, &b"abc"[..]);
        assert_eq!(f.as_ptr(), w[4..].as_ptr(), "a slice of the chunk");
        let g = d.next_frame().unwrap().unwrap();
        assert_eq!(g.as_ptr(), w[11..].as_ptr());
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.front().len(), 0);
        assert_eq!(d.buf.capacity(), 0, "no buffer held while idle");
    }

    #[test]
    fn growth_stays_within_the_declared_frame() {
        let body = vec![9u8; 100_000];
        let w = wire(&[&body]);
        let mut d = Deframer::new(1 << 20);
        d.extend(&w[..5]);
        assert!(
            d.buf.capacity() < 2 * MIN_GROW,
            "5 bytes cost ~1 KiB, not 100 KB"
        );
        let mut at = 5;
        while at < w.len() {
            let n = d.wanted().min(3000);
            d.extend(&w[at..at + n]);
            at += n;
            assert!(
                d.buf.capacity() <= w.len(),
                "{} > {}",
                d.buf.capacity(),
                w.len()
            );
        }
        assert_eq!(d.next_frame().unwrap().unwrap(), &body[..]);
        assert_eq!(d.buf.capacity(), 0, "released once taken out");
    }

    #[test]
    fn a_push_after_a_partial_chunk_keeps_the_order() {
        let w = wire(&[b"one", b"two!", b"three"]);
        let mut d = Deframer::new(16);
        d.push(Bytes::copy_from_slice(&w[..9]));
        assert_eq!(d.next_frame().unwrap().unwrap(), &b"one"[..]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(Bytes::copy_from_slice(&w[9..]));
        let rest = drain(&mut d);
        assert_eq!(rest, vec![&b"two!"[..], &b"three"[..]]);
    }

    #[test]
    fn real_frames_decode() {
        let a = codec::frame(&PeerToRelay::StatusRequest).unwrap();
        let b = codec::frame(&PeerToRelay::Attach {
            agent: "healthguard",
            receive: true,
        })
        .unwrap();
        let mut d = Deframer::new(1024);
        d.push(Bytes::from([a, b].concat()));
        let frames = drain(&mut d);
        assert_eq!(
            codec::decode::<PeerToRelay>(&frames[0]).unwrap(),
            PeerToRelay::StatusRequest
        );
        assert!(matches!(
            codec::decode::<PeerToRelay>(&frames[1]).unwrap(),
            PeerToRelay::Attach {
                agent: "healthguard",
                receive: true
            }
        ));
    }
}
