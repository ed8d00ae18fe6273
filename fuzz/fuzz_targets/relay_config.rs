//! Arbitrary JSON as `relay-config.json`: parsing and validation never
//! panic, and an accepted config satisfies the invariants the relay relies on.
#![no_main]
use agent_link_relay::RelayConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = serde_json::from_slice::<RelayConfig>(data) {
        if cfg.validate("fuzz").is_ok() {
            assert!(cfg.max_frame() <= agent_link_proto::codec::HARD_MAX_FRAME);
            assert!(cfg.keep_alive_secs < cfg.idle_timeout_secs);
            assert!(cfg.stream_receive_window as usize >= cfg.max_frame() + 4);
        }
    }
});
