//! Arbitrary bytes as an envelope, through every check the relay and a
//! receiver run (the relay's `check_send` included): no panic, and nothing
//! verifies without the fleet key and the signer's key.
#![no_main]
use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::OpenedEnvelope;
use agent_link_relay::core::checks::{check_send, CheckPolicy, SenderContext};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Keys unlike the seed corpus's (the golden envelope is validly signed
    // with seed 01×32 and fleet 02×32): verifying here would need a forgery.
    let fleet = FleetSecret::from_bytes([7; 32]).key();
    let key = Identity::from_seed(&[8; 32]).public_key();
    if let Ok(env) = OpenedEnvelope::open(data) {
        assert!(env.body.payload.len() <= data.len());
        let verified = env.check_tag(&fleet).is_ok() && env.check_signature(&key).is_ok();
        assert!(!verified, "random bytes verified");
    }
    let policy = CheckPolicy {
        fleet,
        window_ms: 60_000,
        verify_signatures: true,
        max_payload: 1 << 20,
    };
    let ctx = SenderContext {
        instance: "i",
        agent: "a",
        key: &key,
    };
    assert!(check_send(data, &ctx, &policy, 1_700_000_000_000).is_err());
});
