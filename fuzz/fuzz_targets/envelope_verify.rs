//! Arbitrary bytes as an envelope, through every check the relay and a
//! receiver run (the relay's `check_send` included), under the keys of the
//! seed corpus: the golden envelope (`tests/vectors/envelope.hex`, signed
//! with seed 01×32, fleet secret 02×32) verifies, so mutations of it reach
//! the timestamp, sender and signature checks instead of all stopping at the
//! tag. No panic, and nothing but the golden body verifies: a tag or a
//! signature accepted over any other body (or another signature over it:
//! strict Ed25519 admits one) would be a forgery.
#![no_main]
use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::OpenedEnvelope;
use agent_link_relay::core::checks::{check_send, CheckPolicy, SenderContext};
use libfuzzer_sys::fuzz_target;

const GOLDEN_ENVELOPE: &str = include_str!("../../tests/vectors/envelope.hex");
const SENT_AT: u64 = 1_700_000_000_000;

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim().as_bytes();
    let digit = |c: u8| (c as char).to_digit(16).expect("hex") as u8;
    s.chunks(2).map(|p| digit(p[0]) << 4 | digit(p[1])).collect()
}

fuzz_target!(|data: &[u8]| {
    let golden = unhex(GOLDEN_ENVELOPE);
    let golden = OpenedEnvelope::open(&golden).expect("the golden envelope opens");
    let fleet = FleetSecret::from_bytes([2; 32]).key();
    let key = Identity::from_seed(&[1; 32]).public_key();
    if let Ok(env) = OpenedEnvelope::open(data) {
        assert!(env.body.payload.len() <= data.len());
        if env.check_tag(&fleet).is_ok() {
            assert_eq!(env.outer.body, golden.outer.body, "a tag over another body");
        }
        if env.check_signature(&key).is_ok() {
            assert_eq!(env.outer.body, golden.outer.body, "a signature over another body");
            assert_eq!(env.outer.signature, golden.outer.signature, "a second signature");
        }
    }
    let policy = CheckPolicy {
        fleet: fleet.clone().into(),
        window_ms: 60_000,
        verify_signatures: true,
        max_payload: 1 << 20,
    };
    // The golden envelope's sender, at its own send time: only it passes.
    let ctx = SenderContext {
        instance: "instance-002",
        agent: "healthguard",
        key: &key,
    };
    if let Ok(env) = check_send(data, &ctx, &policy, SENT_AT) {
        assert_eq!(env.outer.body, golden.outer.body, "check_send passed another body");
    }
    // Any other sender or a time outside the window: never.
    let other = SenderContext {
        instance: "instance-002",
        agent: "other",
        key: &key,
    };
    assert!(check_send(data, &other, &policy, SENT_AT).is_err());
    assert!(check_send(data, &ctx, &policy, SENT_AT + 61_000).is_err());
});
