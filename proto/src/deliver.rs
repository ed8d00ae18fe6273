//! The head of a `Deliver` frame (PROTOCOL.md §4), encoded without the
//! envelope: the relay forwards an envelope's original bytes behind it, so a
//! delivery costs neither a copy of the envelope nor an allocation.

use crate::codec;

/// Longest `Deliver` head: frame length (4), variant index (1), reply token
/// (varint, at most 9), sender key (32), envelope length (varint, at most 9).
const DELIVER_HEAD_MAX: usize = 4 + 1 + 9 + 32 + 9;

/// `RelayToPeer::Deliver`'s variant index.
const DELIVER_VARIANT: u32 = 3;

/// Everything of a `Deliver` frame that comes before the envelope's bytes:
/// the frame length, the variant index, `reply_token`, `sender_key` and the
/// envelope's length prefix. Head followed by the envelope is byte for byte
/// what `codec::frame(&RelayToPeer::Deliver { .. })` makes (tested here and
/// against the golden vector `frame_deliver`).
#[derive(Clone, Copy)]
pub struct DeliverHead {
    bytes: [u8; DELIVER_HEAD_MAX],
    len: u8,
}

impl std::fmt::Debug for DeliverHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliverHead(")?;
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

impl DeliverHead {
    /// The head of a `Deliver` frame carrying an envelope of `envelope_len`
    /// bytes; `None` if the frame would exceed [`codec::HARD_MAX_FRAME`].
    pub fn new(reply_token: u64, sender_key: &[u8; 32], envelope_len: usize) -> Option<Self> {
        let mut bytes = [0u8; DELIVER_HEAD_MAX];
        let hdr = codec::FRAME_HEADER_LEN;
        // The project's one bincode configuration, field by field as the
        // derived encoder writes them: variant index (varint u32), the
        // fields in order, and for `envelope: &[u8]` its length (varint u64)
        // whose bytes the writer appends.
        let n = bincode::encode_into_slice(
            (
                DELIVER_VARIANT,
                reply_token,
                sender_key,
                envelope_len as u64,
            ),
            &mut bytes[hdr..],
            codec::CONFIG,
        )
        .ok()?;
        let body = n.checked_add(envelope_len)?;
        if body > codec::HARD_MAX_FRAME {
            return None;
        }
        bytes[..hdr].copy_from_slice(&u32::try_from(body).ok()?.to_be_bytes());
        Some(Self {
            bytes,
            len: (hdr + n) as u8,
        })
    }

    /// The encoded head.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RelayToPeer;

    #[test]
    fn deliver_head_then_envelope_is_the_encoded_frame() {
        let key = [6u8; 32];
        for token in [
            0u64,
            1,
            250,
            251,
            300,
            0xffff,
            0x1_0000,
            u32::MAX as u64,
            u64::MAX,
        ] {
            for len in [0usize, 1, 250, 251, 400, 0xffff, 0x1_0000, 70_000] {
                let envelope = vec![0x5a; len];
                let head = DeliverHead::new(token, &key, len).unwrap();
                let mut ours = head.as_bytes().to_vec();
                ours.extend_from_slice(&envelope);
                let theirs = codec::frame(&RelayToPeer::Deliver {
                    reply_token: token,
                    sender_key: key,
                    envelope: &envelope,
                })
                .unwrap();
                assert_eq!(ours, theirs, "token {token} len {len}");
            }
        }
        assert!(DeliverHead::new(1, &key, codec::HARD_MAX_FRAME).is_none());
    }

    #[test]
    fn debug_is_the_head_in_hex() {
        let head = DeliverHead::new(1, &[0xab; 32], 2).unwrap();
        let s = format!("{head:?}");
        assert!(s.starts_with("DeliverHead(000000250301abab"), "{s}");
    }
}
