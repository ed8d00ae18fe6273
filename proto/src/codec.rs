//! Frames on a QUIC stream: `len: u32 big-endian` then `len` bytes of a
//! bincode body (PROTOCOL.md §2). This module holds the project's only
//! bincode configuration.
//!
//! Decoding rules, each closing a known bincode 2.0.1 trap:
//! - a byte limit is always set, so a length prefix of `u64::MAX` inside a
//!   body is an error, not a "capacity overflow" panic;
//! - the whole body must be consumed: trailing bytes are refused;
//! - signatures and tags are checked over the bytes received, never over a
//!   re-encoding (bincode accepts non-minimal varints, so a re-encoding may
//!   differ).

use bincode::config::{self, Configuration, LittleEndian, Varint};
use bincode::{BorrowDecode, Encode};

use crate::ProtoError;

/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 4;

/// No frame may exceed this, whatever the configuration says (16 MiB). The
/// relay's configured limit is validated against it at start.
pub const HARD_MAX_FRAME: usize = 16 << 20;

type Cfg = Configuration<LittleEndian, Varint, bincode::config::Limit<HARD_MAX_FRAME>>;

/// Standard bincode 2 configuration: little-endian, variable-length integers,
/// byte limit [`HARD_MAX_FRAME`].
pub const CONFIG: Cfg = config::standard()
    .with_little_endian()
    .with_variable_int_encoding()
    .with_limit::<HARD_MAX_FRAME>();

/// Encode `value` as a bare bincode body (no frame header).
pub fn encode_body<T: Encode>(value: &T) -> Result<Vec<u8>, ProtoError> {
    bincode::encode_to_vec(value, CONFIG).map_err(|e| ProtoError::Encode(e.to_string()))
}

/// Append `value` as a whole frame (header and body) to `out`. On error
/// `out` is left exactly as it was, so a reused buffer never carries a
/// half-written frame.
pub fn encode_frame<T: Encode>(value: &T, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let start = out.len();
    let result = append_frame(value, out, start);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn append_frame<T: Encode>(value: &T, out: &mut Vec<u8>, start: usize) -> Result<(), ProtoError> {
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    bincode::encode_into_std_write(value, out, CONFIG)
        .map_err(|e| ProtoError::Encode(e.to_string()))?;
    let body_len = out.len() - start - FRAME_HEADER_LEN;
    let too_large = || ProtoError::FrameTooLarge {
        len: body_len as u64,
        max: HARD_MAX_FRAME,
    };
    if body_len > HARD_MAX_FRAME {
        return Err(too_large());
    }
    let len = u32::try_from(body_len).map_err(|_| too_large())?;
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// A whole frame as a fresh buffer, allocated once at its size (a growing
/// `Vec` reallocates four or five times for a receipt). A body over the
/// hard limit is refused by [`encode_frame`], as for any buffer.
pub fn frame<T: Encode>(value: &T) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + encoded_len(value)?);
    encode_frame(value, &mut out)?;
    Ok(out)
}

/// The length of `value`'s body: a counting pass, nothing is written.
fn encoded_len<T: Encode>(value: &T) -> Result<usize, ProtoError> {
    let mut counter =
        bincode::enc::EncoderImpl::new(bincode::enc::write::SizeWriter::default(), CONFIG);
    value
        .encode(&mut counter)
        .map_err(|e| ProtoError::Encode(e.to_string()))?;
    Ok(counter.into_writer().bytes_written)
}

/// Read the body length from a frame header, refusing empty frames and
/// frames over `max` before anything is allocated for them.
pub fn body_len(header: [u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    let max = max.min(HARD_MAX_FRAME);
    if len > max {
        return Err(ProtoError::FrameTooLarge {
            len: len as u64,
            max,
        });
    }
    Ok(len)
}

/// Split one frame off the front of `buf`: `Ok(Some((body, consumed)))`,
/// `Ok(None)` when more bytes are needed (incomplete, not invalid), or an
/// error when the header already rules the frame out.
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, ProtoError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let header: [u8; FRAME_HEADER_LEN] = header.try_into().map_err(|_| ProtoError::EmptyFrame)?;
    let len = body_len(header, max)?;
    let total = FRAME_HEADER_LEN + len;
    Ok(buf.get(FRAME_HEADER_LEN..total).map(|body| (body, total)))
}

/// Decode a body that must be exactly one `T`, borrowing from `body`.
pub fn decode<'a, T: BorrowDecode<'a, ()>>(body: &'a [u8]) -> Result<T, ProtoError> {
    let (value, used) = bincode::borrow_decode_from_slice::<T, _>(body, CONFIG)
        .map_err(|e| ProtoError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(ProtoError::TrailingBytes {
            extra: body.len() - used,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::PeerToRelay;

    /// `frame` allocates once, at the frame's size, and writes the same
    /// bytes as appending to an empty buffer.
    #[test]
    fn a_fresh_frame_is_allocated_at_its_size() {
        let payload = [7u8; 300];
        for f in [
            PeerToRelay::Attach {
                agent: "a1",
                receive: true,
            },
            PeerToRelay::Send { envelope: &payload },
        ] {
            let fresh = frame(&f).unwrap();
            let mut appended = Vec::new();
            encode_frame(&f, &mut appended).unwrap();
            assert_eq!(fresh, appended);
            assert_eq!(fresh.capacity(), fresh.len(), "{f:?}");
        }
    }

    /// A frame appended to a buffer that already holds bytes gets its own
    /// body's length in its header (found by cargo mutants: the length was
    /// only ever checked from an empty buffer, where `- start` and
    /// `+ start` agree).
    #[test]
    fn a_frame_appended_after_other_bytes_has_its_own_length() {
        let mut out = vec![7u8; 10];
        encode_frame(&PeerToRelay::StatusRequest, &mut out).unwrap();
        let alone = frame(&PeerToRelay::StatusRequest).unwrap();
        assert_eq!(&out[..10], &[7u8; 10]);
        assert_eq!(&out[10..], &alone[..]);
    }

    #[test]
    fn header_limits() {
        assert!(matches!(
            body_len([0, 0, 0, 0], 100),
            Err(ProtoError::EmptyFrame)
        ));
        assert!(matches!(
            body_len([0, 0, 0, 101], 100),
            Err(ProtoError::FrameTooLarge { len: 101, max: 100 })
        ));
        assert_eq!(body_len([0, 0, 0, 100], 100).unwrap(), 100);
        assert!(body_len([0xff; 4], usize::MAX).is_err(), "hard cap applies");
    }

    #[test]
    fn split_reports_incomplete_separately() {
        let f = frame(&PeerToRelay::StatusRequest).unwrap();
        for cut in 0..f.len() {
            assert!(split_frame(&f[..cut], 1024).unwrap().is_none());
        }
        let (body, used) = split_frame(&f, 1024).unwrap().unwrap();
        assert_eq!(used, f.len());
        assert!(matches!(
            decode::<PeerToRelay>(body).unwrap(),
            PeerToRelay::StatusRequest
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut body = encode_body(&PeerToRelay::StatusRequest).unwrap();
        body.push(0);
        assert!(matches!(
            decode::<PeerToRelay>(&body),
            Err(ProtoError::TrailingBytes { extra: 1 })
        ));
    }

    /// Writes some bytes, then fails, like an encoder that hits a bad value
    /// half-way.
    struct FailsHalfway;

    impl Encode for FailsHalfway {
        fn encode<E: bincode::enc::Encoder>(
            &self,
            encoder: &mut E,
        ) -> Result<(), bincode::error::EncodeError> {
            7u8.encode(encoder)?;
            Err(bincode::error::EncodeError::Other("halfway"))
        }
    }

    #[test]
    fn failed_encode_leaves_the_buffer_unchanged() {
        let mut out = frame(&PeerToRelay::StatusRequest).unwrap();
        let before = out.clone();
        assert!(matches!(
            encode_frame(&FailsHalfway, &mut out),
            Err(ProtoError::Encode(_))
        ));
        assert_eq!(out, before, "no header or partial body left behind");
        let big = vec![0u8; HARD_MAX_FRAME];
        assert!(matches!(
            encode_frame(&PeerToRelay::Send { envelope: &big }, &mut out),
            Err(ProtoError::FrameTooLarge { .. })
        ));
        assert_eq!(out, before);
        // The buffer still holds exactly one good frame.
        let (body, used) = split_frame(&out, 1024).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(
            decode::<PeerToRelay>(body).unwrap(),
            PeerToRelay::StatusRequest
        );
    }

    #[test]
    fn huge_declared_length_is_an_error_not_a_panic() {
        // Variant 2 (Attach) then a u64::MAX varint length for the agent id.
        let body = [2u8, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1];
        assert!(decode::<PeerToRelay>(&body).is_err());
    }
}
