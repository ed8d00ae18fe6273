//! Arbitrary bytes through the frame splitter and both frame decoders: no
//! panic, no slice outside the input.
#![no_main]
use agent_link_proto::{codec, PeerToRelay, RelayToPeer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((body, used))) = codec::split_frame(data, 1 << 20) {
        assert!(used <= data.len() && body.len() < used);
        let _ = codec::decode::<PeerToRelay>(body);
        let _ = codec::decode::<RelayToPeer>(body);
    }
    if let Ok(PeerToRelay::Send { envelope }) = codec::decode::<PeerToRelay>(data) {
        assert!(envelope.len() <= data.len());
    }
    let _ = codec::decode::<RelayToPeer>(data);
});
