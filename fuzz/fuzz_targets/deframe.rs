//! Arbitrary bytes, split at arbitrary points, through the `Deframer` (the
//! buffering every frame reader uses): no panic, and whatever the split,
//! the same frames and the same ending as one pass of `codec::split_frame`
//! over the whole input (a clean end, the header's error, or `Truncated`).
//!
//! Input layout: byte 0 picks the body limit, byte 1 the number of cuts `n`
//! (mod 16), then `n` cut points (2 bytes each, big-endian, taken modulo the
//! stream's length; the high bit of each says push-without-copy or copy),
//! then the stream.
#![no_main]
use agent_link_proto::{codec, deframe::Deframer, ProtoError};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

/// The stream read in one go: its whole frames, then how it ends.
fn one_pass(stream: &[u8], max: usize) -> (Vec<&[u8]>, Result<(), ProtoError>) {
    let mut frames = Vec::new();
    let mut rest = stream;
    loop {
        match codec::split_frame(rest, max) {
            Err(e) => return (frames, Err(e)),
            Ok(Some((body, used))) => {
                assert!(used <= rest.len() && body.len() < used);
                frames.push(body);
                rest = &rest[used..];
            }
            Ok(None) if rest.is_empty() => return (frames, Ok(())),
            Ok(None) => {
                let need = match rest.first_chunk::<4>() {
                    Some(h) => 4 + u32::from_be_bytes(*h) as usize,
                    None => 4,
                };
                let have = rest.len();
                return (frames, Err(ProtoError::Truncated { have, need }));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let max = [0, 1, 4, 16, 255, 4096, 1 << 20, usize::MAX][usize::from(sel % 8)];
    let Some((&n, mut rest)) = rest.split_first() else {
        return;
    };
    let mut cuts = Vec::new();
    for _ in 0..n % 16 {
        let Some((c, r)) = rest.split_first_chunk::<2>() else {
            break;
        };
        cuts.push(u16::from_be_bytes(*c));
        rest = r;
    }
    let stream = rest;
    let mut points: Vec<(usize, bool)> = cuts
        .iter()
        .map(|c| {
            (
                usize::from(c & 0x7fff) % (stream.len() + 1),
                c & 0x8000 != 0,
            )
        })
        .collect();
    points.push((stream.len(), false));
    points.sort_unstable();

    let mut d = Deframer::new(max);
    let mut frames: Vec<Bytes> = Vec::new();
    let mut at = 0;
    let mut end = None;
    'feed: for (cut, by_push) in points {
        let piece = &stream[at..cut];
        at = cut;
        if by_push {
            d.push(Bytes::copy_from_slice(piece));
        } else {
            d.extend(piece);
        }
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    assert!(!f.is_empty() && f.len() <= max.min(codec::HARD_MAX_FRAME));
                    frames.push(f);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(d.is_mid_frame());
                    assert_eq!(d.wanted(), 0, "no growth for a refused header");
                    assert_eq!(d.finish(), Err(e.clone()));
                    end = Some(Err(e));
                    break 'feed;
                }
            }
        }
        // Incomplete: something is wanted exactly when something is buffered.
        assert_eq!(d.wanted() > 0, d.is_mid_frame());
    }
    let end = end.unwrap_or_else(|| d.finish());
    let (want_frames, want_end) = one_pass(stream, max);
    assert_eq!(frames.len(), want_frames.len());
    for (got, want) in frames.iter().zip(&want_frames) {
        assert_eq!(&got[..], *want);
    }
    assert_eq!(end, want_end);
});
