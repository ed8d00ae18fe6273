//! Arbitrary text as a join token: no panic; whatever parses re-encodes to
//! a token that parses to the same values.
#![no_main]
use agent_link_proto::{JoinSecret, JoinToken};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = JoinToken::parse(text) {
        let again = JoinToken::parse(&t.encode().expect("re-encode")).expect("re-parse");
        assert_eq!(again.addr, t.addr);
        assert_eq!(again.trust, t.trust);
        assert_eq!(again.other_relays, t.other_relays);
        match (&again.secret, &t.secret) {
            (JoinSecret::Fleet(a), JoinSecret::Fleet(b)) => assert_eq!(a.expose(), b.expose()),
            (
                JoinSecret::Invite {
                    instance_id: ia,
                    secret: a,
                },
                JoinSecret::Invite {
                    instance_id: ib,
                    secret: b,
                },
            ) => {
                assert_eq!(ia, ib);
                assert_eq!(a.expose(), b.expose());
            }
            _ => panic!("the token's kind changed in a round trip"),
        }
    }
});
