//! Property tests: every decoder round-trips what the encoder makes, and no
//! decoder panics (or claims more than its input) on arbitrary bytes or on
//! mutations of valid encodings.

use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::{
    codec, Address, EnvelopeBody, ErrorCode, JoinToken, OpenedEnvelope, PeerToRelay, Receipt,
    RelayToPeer,
};
use proptest::prelude::*;

fn id_strategy() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

fn code_strategy() -> impl Strategy<Value = ErrorCode> {
    (0..ErrorCode::ALL.len()).prop_map(|i| ErrorCode::ALL[i])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn envelope_round_trips_and_verifies(
        id in any::<[u8; 16]>(),
        from_i in id_strategy(), from_a in id_strategy(),
        to_i in id_strategy(), to_a in id_strategy(),
        sent in any::<u64>(),
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
        seed in any::<[u8; 32]>(),
    ) {
        let identity = Identity::from_seed(&seed);
        let fleet = FleetSecret::from_bytes([9; 32]).key();
        let body = EnvelopeBody {
            version: 1,
            id,
            from: Address { instance: &from_i, agent: &from_a },
            to: Address { instance: &to_i, agent: &to_a },
            sent_at_ms: sent,
            payload: &payload,
        };
        let bytes = body.seal(&identity, &fleet).unwrap();
        let env = OpenedEnvelope::open(&bytes).unwrap();
        prop_assert_eq!(env.body, body);
        prop_assert!(env.check_tag(&fleet).is_ok());
        prop_assert!(env.check_signature(&identity.public_key()).is_ok());
        prop_assert_eq!(env.bytes, bytes.as_slice());
    }

    #[test]
    fn peer_frames_round_trip(
        agent in id_strategy(),
        receive in any::<bool>(),
        token in any::<u64>(),
        id in any::<[u8; 16]>(),
        code in code_strategy(),
        env in proptest::collection::vec(any::<u8>(), 0..512),
        at in any::<u64>(),
    ) {
        let frames = [
            PeerToRelay::Attach { agent: &agent, receive },
            PeerToRelay::Send { envelope: &env },
            PeerToRelay::Ack { reply_token: token, receipt: Receipt { id, from: Address { instance: &agent, agent: &agent }, delivered_at_ms: at } },
            PeerToRelay::Nack { reply_token: token, id, code },
            PeerToRelay::Register { instance_id: &agent, name: &agent, proof: [7; 32] },
            PeerToRelay::StatusRequest,
        ];
        for f in frames {
            let bytes = codec::frame(&f).unwrap();
            let (body, used) = codec::split_frame(&bytes, codec::HARD_MAX_FRAME).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(codec::decode::<PeerToRelay>(body).unwrap(), f);
        }
    }

    #[test]
    fn relay_frames_round_trip(
        token in any::<u64>(),
        key in any::<[u8; 32]>(),
        id in any::<[u8; 16]>(),
        code in code_strategy(),
        env in proptest::collection::vec(any::<u8>(), 0..512),
        max in any::<u32>(),
        window in any::<u64>(),
    ) {
        let frames = [
            RelayToPeer::Deliver { reply_token: token, sender_key: key, envelope: &env },
            RelayToPeer::Failed { id, code },
            RelayToPeer::Error { code },
            RelayToPeer::Attached { agent: "a", max_message_size: max, timestamp_window_ms: window },
        ];
        for f in frames {
            let bytes = codec::frame(&f).unwrap();
            let (body, _) = codec::split_frame(&bytes, codec::HARD_MAX_FRAME).unwrap().unwrap();
            prop_assert_eq!(codec::decode::<RelayToPeer>(body).unwrap(), f);
        }
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        if let Ok(PeerToRelay::Send { envelope }) = codec::decode::<PeerToRelay>(&bytes) {
            prop_assert!(envelope.len() <= bytes.len());
        }
        let _ = codec::decode::<RelayToPeer>(&bytes);
        if let Ok(env) = OpenedEnvelope::open(&bytes) {
            prop_assert!(env.body.payload.len() <= bytes.len());
        }
        if let Ok(Some((body, used))) = codec::split_frame(&bytes, 1 << 20) {
            prop_assert!(used <= bytes.len() && body.len() < used);
        }
        let _ = JoinToken::parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn mutated_envelopes_never_panic_and_never_verify(
        flips in proptest::collection::vec((any::<usize>(), 0u8..8), 1..4),
        cut in any::<usize>(),
        extra in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let identity = Identity::from_seed(&[1; 32]);
        let fleet = FleetSecret::from_bytes([2; 32]).key();
        let good = EnvelopeBody {
            version: 1,
            id: [3; 16],
            from: Address { instance: "i1", agent: "a" },
            to: Address { instance: "i2", agent: "b" },
            sent_at_ms: 5,
            payload: b"payload",
        }
        .seal(&identity, &fleet)
        .unwrap();
        let mut bad = good.clone();
        for (pos, bit) in &flips {
            let i = pos % bad.len();
            bad[i] ^= 1 << bit;
        }
        let cut = cut % (bad.len() + 1);
        let mut variants = vec![bad.clone(), bad[..cut].to_vec()];
        let mut appended = good.clone();
        appended.extend_from_slice(&extra);
        variants.push(appended);
        for v in variants {
            if v == good {
                continue;
            }
            if let Ok(env) = OpenedEnvelope::open(&v) {
                let verified = env.check_tag(&fleet).is_ok() && env.check_signature(&identity.public_key()).is_ok();
                prop_assert!(!verified, "a changed envelope verified");
            }
        }
    }
}
