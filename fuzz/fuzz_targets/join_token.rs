//! Arbitrary text as a join token: no panic; whatever parses re-encodes to
//! a token that parses to the same values.
#![no_main]
use agent_link_proto::JoinToken;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = JoinToken::parse(text) {
        let again = JoinToken::parse(&t.encode().expect("re-encode")).expect("re-parse");
        assert_eq!(again.addr, t.addr);
        assert_eq!(again.fingerprint, t.fingerprint);
        assert_eq!(again.secret.expose(), t.secret.expose());
    }
});
