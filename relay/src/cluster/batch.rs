//! Several relay-to-relay items in one NATS message (PROTOCOL.md §9.8):
//! forwards to one relay, or answers to one relay, that were queued at the
//! same moment. A NATS message costs both relays and the NATS server a
//! parse, a routing decision and a wake-up whatever it carries; under load
//! one message now carries many envelopes, and when idle a batch is one
//! item and waits for nothing.
//!
//! Encoding: the bincode body (no length header, PROTOCOL.md §3) of a
//! sequence of `(n: u64, bytes: [u8])`: `n` is the asking relay's number
//! for the forward, `bytes` the envelope (a forward) or a
//! `RelayToPeer::Receipt`/`Failed` body (an answer).

use agent_link_proto::codec;
use bytes::Bytes;

/// Bytes of items one batch carries at most, well under NATS's default
/// 1 MiB `max_payload`; a single larger item goes alone.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A batch that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("a relay-to-relay batch that does not decode: {0}")]
pub struct BatchError(String);

/// Groups items into batches of at most [`MAX_BATCH_BYTES`], in order.
#[derive(Debug, Default)]
pub struct Batcher {
    done: Vec<Vec<(u64, Bytes)>>,
    open: Vec<(u64, Bytes)>,
    open_bytes: usize,
}

impl Batcher {
    /// Add item `n`.
    pub fn push(&mut self, n: u64, bytes: Bytes) {
        if !self.open.is_empty() && self.open_bytes + bytes.len() > MAX_BATCH_BYTES {
            self.done.push(std::mem::take(&mut self.open));
            self.open_bytes = 0;
        }
        self.open_bytes += bytes.len();
        self.open.push((n, bytes));
    }

    /// The batches, encoded, each with the numbers of its items.
    pub fn finish(mut self) -> Vec<(Bytes, Vec<u64>)> {
        if !self.open.is_empty() {
            self.done.push(self.open);
        }
        self.done
            .into_iter()
            .map(|items| {
                let wire: Vec<(u64, &[u8])> = items.iter().map(|(n, b)| (*n, &b[..])).collect();
                let body =
                    codec::encode_body(&wire).expect("a batch under the frame limit encodes");
                (
                    Bytes::from(body),
                    items.into_iter().map(|(n, _)| n).collect(),
                )
            })
            .collect()
    }
}

/// The items of `payload`, each a slice of it (nothing is copied).
pub fn decode(payload: &Bytes) -> Result<Vec<(u64, Bytes)>, BatchError> {
    let items: Vec<(u64, &[u8])> = codec::decode(payload).map_err(|e| BatchError(e.to_string()))?;
    Ok(items
        .into_iter()
        .map(|(n, b)| (n, payload.slice_ref(b)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_back_in_order_and_batches_stay_under_the_limit() {
        let mut b = Batcher::default();
        let big = Bytes::from(vec![7u8; MAX_BATCH_BYTES / 2 + 1]);
        b.push(1, Bytes::from_static(b"one"));
        b.push(2, big.clone());
        b.push(3, big.clone());
        b.push(9, Bytes::new());
        let batches = b.finish();
        assert_eq!(batches.len(), 2, "the second big item starts a batch");
        assert_eq!(batches[0].1, vec![1, 2]);
        assert_eq!(batches[1].1, vec![3, 9]);
        let first = decode(&batches[0].0).unwrap();
        assert_eq!(first[0], (1, Bytes::from_static(b"one")));
        assert_eq!(first[1], (2, big.clone()));
        let second = decode(&batches[1].0).unwrap();
        assert_eq!(second, vec![(3, big), (9, Bytes::new())]);
        // One item larger than the limit goes alone.
        let mut b = Batcher::default();
        b.push(1, Bytes::from(vec![0u8; MAX_BATCH_BYTES + 1]));
        b.push(2, Bytes::from_static(b"x"));
        assert_eq!(b.finish().len(), 2);
        assert!(Batcher::default().finish().is_empty());
    }

    #[test]
    fn what_does_not_decode_is_refused() {
        for bad in [&b"\xff"[..], b"\x02\x01\x05ab", b""] {
            assert!(decode(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }
}
