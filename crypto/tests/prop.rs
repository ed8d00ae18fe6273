//! Property tests for the public surface of agent-link-crypto: the public
//! key's text form round-trips and its parser never panics; a signature or
//! tag verifies for exactly what was signed, and any single-bit change to
//! the message, the signature, the key or the domain is refused.

use agent_link_crypto::{
    verify, verify_batch, Domain, FleetSecret, Identity, PublicKey, Signature,
};
use proptest::prelude::*;

const DOMAINS: [Domain; 3] = [
    Domain::EnvelopeSignature,
    Domain::EnvelopeTag,
    Domain::RegisterProof,
];

fn domain() -> impl Strategy<Value = Domain> {
    (0..DOMAINS.len()).prop_map(|i| DOMAINS[i])
}

fn message() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn public_key_text_round_trips(seed in any::<[u8; 32]>()) {
        let pk = Identity::from_seed(&seed).public_key();
        let text = pk.to_string();
        prop_assert_eq!(text.len(), 64);
        prop_assert!(text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        prop_assert_eq!(text.parse::<PublicKey>().unwrap(), pk);
        prop_assert_eq!(text.to_uppercase().parse::<PublicKey>().unwrap(), pk);
        prop_assert_eq!(format!("  {text}\n").parse::<PublicKey>().unwrap(), pk);
        // One digit short or one too many is refused.
        prop_assert!(text[..63].parse::<PublicKey>().is_err());
        let longer = format!("{text}0");
        prop_assert!(longer.parse::<PublicKey>().is_err());
    }

    /// Any 32 bytes: parsing their text accepts exactly the keys that
    /// `from_bytes_checked` accepts, and never panics.
    #[test]
    fn public_key_parse_agrees_with_the_byte_check(bytes in any::<[u8; 32]>()) {
        let text = hex::encode(bytes);
        match (text.parse::<PublicKey>(), PublicKey::from_bytes_checked(bytes)) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(a, b);
                prop_assert_eq!(a.to_string(), text);
            }
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "text {:?} vs bytes {:?}", a.is_ok(), b.is_ok()),
        }
    }

    #[test]
    fn public_key_parse_never_panics(s in prop_oneof![".{0,80}", "[0-9a-fA-F ]{60,70}"]) {
        if let Ok(pk) = s.parse::<PublicKey>() {
            prop_assert_eq!(pk.to_string(), s.trim().to_lowercase());
        }
    }

    #[test]
    fn signatures_verify_and_every_bit_flip_is_refused(
        seed in any::<[u8; 32]>(),
        d in domain(),
        msg in message(),
        flip in any::<usize>(),
    ) {
        let id = Identity::from_seed(&seed);
        let pk = id.public_key();
        let sig = id.sign(d, &msg);
        prop_assert!(verify(&pk, d, &msg, &sig).is_ok());
        // Deterministic (RFC 8032): the same input signs the same way.
        prop_assert_eq!(id.sign(d, &msg), sig);
        prop_assert!(verify_batch(&[(&pk, d, &msg, &sig)]).is_ok());

        // One bit of the signature.
        let mut bad = sig;
        let bit = flip % (64 * 8);
        bad.0[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(verify(&pk, d, &msg, &bad).is_err());
        prop_assert!(verify_batch(&[(&pk, d, &msg, &bad)]).is_err());

        // One bit of the message (or one byte more when it is empty).
        let mut m2 = msg.clone();
        if m2.is_empty() {
            m2.push((flip & 0xff) as u8);
        } else {
            let bit = flip % (m2.len() * 8);
            m2[bit / 8] ^= 1 << (bit % 8);
        }
        prop_assert!(verify(&pk, d, &m2, &sig).is_err());

        // One bit of the key: either not a usable key, or the wrong one.
        let mut k2 = pk.0;
        let bit = flip % (32 * 8);
        k2[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(verify(&PublicKey(k2), d, &msg, &sig).is_err());

        // Another domain.
        for other in DOMAINS {
            if other != d {
                prop_assert!(verify(&pk, other, &msg, &sig).is_err());
            }
        }
    }

    /// The domain is a prefix of what is signed, and nothing else is added:
    /// moving bytes between domain and message is not possible because the
    /// domains end in NUL and are prefix-free, but `sign_parts` must equal
    /// signing the concatenation.
    #[test]
    fn sign_parts_signs_the_concatenation(
        seed in any::<[u8; 32]>(),
        d in domain(),
        a in message(),
        b in message(),
    ) {
        let id = Identity::from_seed(&seed);
        let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
        prop_assert_eq!(id.sign_parts(d, &[&a, &b]), id.sign(d, &whole));
    }

    #[test]
    fn fleet_tags_check_and_every_bit_flip_is_refused(
        secret in any::<[u8; 32]>(),
        d in domain(),
        a in message(),
        b in message(),
        flip in any::<usize>(),
    ) {
        let key = FleetSecret::from_bytes(secret).key();
        let tag = key.tag(d, &[&a, &b]);
        prop_assert!(key.check(d, &[&a, &b], &tag).is_ok());
        // Parts are concatenated: the split point does not matter.
        let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
        prop_assert!(key.check(d, &[&whole], &tag).is_ok());

        let mut bad = tag;
        let bit = flip % (32 * 8);
        bad[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(key.check(d, &[&whole], &bad).is_err());
        prop_assert!(key.check(d, &[&whole], &tag[..31]).is_err());

        let mut m2 = whole.clone();
        if m2.is_empty() {
            m2.push(0);
        } else {
            let bit = flip % (m2.len() * 8);
            m2[bit / 8] ^= 1 << (bit % 8);
        }
        prop_assert!(key.check(d, &[&m2], &tag).is_err());

        let mut s2 = secret;
        s2[flip % 32] ^= 1;
        prop_assert!(FleetSecret::from_bytes(s2).key().check(d, &[&whole], &tag).is_err());

        for other in DOMAINS {
            if other != d {
                prop_assert!(key.check(other, &[&whole], &tag).is_err());
            }
        }
    }

    #[test]
    fn batch_agrees_with_single_verification(
        seeds in proptest::collection::vec(any::<[u8; 32]>(), 1..6),
        msgs in proptest::collection::vec(message(), 6),
        spoil in proptest::option::of(any::<usize>()),
    ) {
        let ids: Vec<Identity> = seeds.iter().map(Identity::from_seed).collect();
        let pks: Vec<PublicKey> = ids.iter().map(|i| i.public_key()).collect();
        let mut sigs: Vec<Signature> = ids
            .iter()
            .zip(&msgs)
            .map(|(id, m)| id.sign(Domain::EnvelopeSignature, m))
            .collect();
        if let Some(i) = spoil {
            let i = i % sigs.len();
            sigs[i].0[0] ^= 1;
        }
        let items: Vec<_> = (0..ids.len())
            .map(|i| (&pks[i], Domain::EnvelopeSignature, msgs[i].as_slice(), &sigs[i]))
            .collect();
        let all_single = items
            .iter()
            .all(|(k, d, m, s)| verify(k, *d, m, s).is_ok());
        prop_assert_eq!(verify_batch(&items).is_ok(), all_single);
        prop_assert_eq!(all_single, spoil.is_none());
    }
}
