//! Domain-separated Ed25519 signatures.
//!
//! Every signature covers `domain || message`, where the domain names the
//! protocol, its version and the purpose (PROTOCOL.md §5). Without it a
//! signature made for one purpose (say, a registration proof) could be
//! presented as another (a message). Verification is `verify_strict`: it
//! refuses small-order keys and non-canonical signatures, so a signature can
//! neither be forged under a weak key nor mutated into a second valid one.

use crate::identity::PublicKey;
use crate::CryptoError;

/// Length of an Ed25519 signature in bytes.
pub const SIGNATURE_LEN: usize = 64;

/// What a signature or tag is for. Each has a distinct, NUL-terminated ASCII
/// prefix; none is a prefix of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Domain {
    /// Ed25519 signature over an envelope body (sender authorship).
    EnvelopeSignature,
    /// HMAC-SHA256 tag over an envelope body (fleet membership).
    EnvelopeTag,
    /// HMAC-SHA256 registration proof, bound to one TLS session.
    RegisterProof,
    /// HMAC-SHA256 registration proof keyed by a single-use invite's own
    /// secret (not the fleet secret), bound to one TLS session.
    InviteProof,
    /// HMAC-SHA256 of nothing under the fleet key: the mark a fleet of
    /// relays keeps in its registry bucket, so a relay joining with the
    /// wrong fleet secret is refused (it proves the secret without showing
    /// it).
    FleetCheck,
}

impl Domain {
    /// The exact prefix bytes.
    pub const fn as_bytes(self) -> &'static [u8] {
        match self {
            Domain::EnvelopeSignature => b"agent-link/1 envelope signature\0",
            Domain::EnvelopeTag => b"agent-link/1 envelope tag\0",
            Domain::RegisterProof => b"agent-link/1 register proof\0",
            Domain::InviteProof => b"agent-link/1 invite proof\0",
            Domain::FleetCheck => b"agent-link/1 fleet check\0",
        }
    }

    pub(crate) fn prefixed(self, message: &[u8]) -> Vec<u8> {
        let d = self.as_bytes();
        let mut v = Vec::with_capacity(d.len() + message.len());
        v.extend_from_slice(d);
        v.extend_from_slice(message);
        v
    }
}

/// A 64-byte Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

/// Verify `signature` over `domain || message` under `key`, strictly.
pub fn verify(
    key: &PublicKey,
    domain: Domain,
    message: &[u8],
    signature: &Signature,
) -> Result<(), CryptoError> {
    verify_checked(&CheckedKey::new(key)?, domain, message, signature)
}

/// A public key decoded and checked once (a valid point, not of small
/// order), for verifying many signatures under it: decoding a key is a
/// field exponentiation, about a fifth of a strict verification.
#[derive(Clone, Copy, Debug)]
pub struct CheckedKey {
    key: PublicKey,
    vk: ed25519_dalek::VerifyingKey,
}

impl CheckedKey {
    /// Decode and check `key` as [`PublicKey::verifying_key`] does.
    pub fn new(key: &PublicKey) -> Result<Self, CryptoError> {
        Ok(Self {
            key: *key,
            vk: key.verifying_key()?,
        })
    }

    /// The key's bytes.
    pub fn public_key(&self) -> &PublicKey {
        &self.key
    }
}

/// [`verify`] under an already checked key: strict verification.
pub fn verify_checked(
    key: &CheckedKey,
    domain: Domain,
    message: &[u8],
    signature: &Signature,
) -> Result<(), CryptoError> {
    let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
    key.vk
        .verify_strict(&domain.prefixed(message), &sig)
        .map_err(|_| CryptoError::BadSignature)
}

/// The y coordinates (sign bit cleared) of every point of small order, in
/// every encoding that decodes to one: the eight torsion points' canonical
/// encodings and the non-canonical `y + p` of y = 0 and y = 1 (no other
/// y + p fits in 255 bits). Comparing with the sign bit masked also covers
/// the "negative zero" x of (0, ±1), which decoders accept.
fn small_order_ys() -> &'static [[u8; 32]] {
    static YS: std::sync::OnceLock<Vec<[u8; 32]>> = std::sync::OnceLock::new();
    YS.get_or_init(|| {
        let mut ys: Vec<[u8; 32]> = curve25519_dalek::constants::EIGHT_TORSION
            .iter()
            .map(|p| {
                let mut y = p.compress().to_bytes();
                y[31] &= 0x7f;
                y
            })
            .collect();
        for low in [0xed_u8, 0xee] {
            // p = 2^255 - 19 and p + 1, little-endian.
            let mut y = [0xff_u8; 32];
            y[0] = low;
            y[31] = 0x7f;
            ys.push(y);
        }
        ys.sort_unstable();
        ys.dedup();
        ys
    })
}

/// Whether a signature's `R` encodes a point of small order, which
/// `verify_strict` refuses (checked from the bytes: no decompression).
fn r_is_small_order(r: &[u8]) -> bool {
    let mut y = [0u8; 32];
    y.copy_from_slice(&r[..32]);
    y[31] &= 0x7f;
    small_order_ys().contains(&y)
}

/// Verify many signatures at once (ed25519-dalek batch verification: about
/// 2-3x cheaper per signature than one by one). All must be valid; on
/// failure the caller falls back to [`verify`] to find the bad ones.
///
/// Batch verification is not "strict" in the `verify_strict` sense, so what
/// `verify_strict` refuses outright is refused here before the batch runs:
/// weak (small-order) keys, non-canonical `s` (ed25519-dalek's signature
/// parsing) and small-order `R`. What remains different is only reachable
/// by the holder of the signing key: an `R` or key with a small torsion
/// component can make a batch pass that `verify_strict` would refuse
/// (dalek's batch equation is cofactorless with random 128-bit weights).
/// Nobody without the private key can produce a signature that passes
/// either check.
pub fn verify_batch(items: &[(&PublicKey, Domain, &[u8], &Signature)]) -> Result<(), CryptoError> {
    let keys = items
        .iter()
        .map(|(pk, ..)| CheckedKey::new(pk))
        .collect::<Result<Vec<_>, _>>()?;
    let checked: Vec<_> = items
        .iter()
        .zip(&keys)
        .map(|((_, d, m, s), k)| (k, *d, *m, *s))
        .collect();
    verify_batch_checked(&checked)
}

/// [`verify_batch`] under already checked keys.
pub fn verify_batch_checked(
    items: &[(&CheckedKey, Domain, &[u8], &Signature)],
) -> Result<(), CryptoError> {
    if items.is_empty() {
        return Ok(());
    }
    let mut keys = Vec::with_capacity(items.len());
    let mut msgs = Vec::with_capacity(items.len());
    let mut sigs = Vec::with_capacity(items.len());
    for (key, domain, msg, sig) in items {
        if r_is_small_order(&sig.0[..32]) {
            return Err(CryptoError::BadSignature);
        }
        keys.push(key.vk);
        msgs.push(domain.prefixed(msg));
        sigs.push(ed25519_dalek::Signature::from_bytes(&sig.0));
    }
    let msg_refs: Vec<&[u8]> = msgs.iter().map(|m| m.as_slice()).collect();
    ed25519_dalek::verify_batch(&msg_refs, &sigs, &keys).map_err(|_| CryptoError::BadSignature)
}

/// Plain RFC 8032 verification without a domain; only for test vectors.
#[cfg(test)]
fn verify_raw(key: &PublicKey, message: &[u8], signature: &Signature) -> Result<(), CryptoError> {
    use ed25519_dalek::Verifier as _;
    let vk = key.verifying_key()?;
    vk.verify(message, &ed25519_dalek::Signature::from_bytes(&signature.0))
        .map_err(|_| CryptoError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;
    use ed25519_dalek::Signer;

    fn h<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0u8; N];
        hex::decode_to_slice(s, &mut out).unwrap();
        out
    }

    /// RFC 8032 §7.1, TEST 1, TEST 2 and TEST 3 (pure Ed25519, no domain).
    #[test]
    fn rfc8032_vectors() {
        let vectors: [(&str, &str, &str, &str); 3] = [
            (
                "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
                "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
                "",
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
            ),
            (
                "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
                "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
                "72",
                "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
            ),
            (
                "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
                "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
                "af82",
                "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
            ),
        ];
        for (sk, pk, msg, sig) in vectors {
            let id = Identity::from_seed(&h::<32>(sk));
            assert_eq!(id.public_key().0, h::<32>(pk));
            let msg = hex::decode(msg).unwrap();
            let signing = ed25519_dalek::SigningKey::from_bytes(&h::<32>(sk));
            let produced = signing.sign(&msg).to_bytes();
            assert_eq!(produced, h::<64>(sig));
            verify_raw(&id.public_key(), &msg, &Signature(produced)).unwrap();
        }
    }

    #[test]
    fn domain_separation() {
        let id = Identity::generate();
        let sig = id.sign(Domain::EnvelopeSignature, b"m");
        assert!(verify(&id.public_key(), Domain::EnvelopeSignature, b"m", &sig).is_ok());
        assert!(verify(&id.public_key(), Domain::RegisterProof, b"m", &sig).is_err());
        assert!(verify(&id.public_key(), Domain::EnvelopeSignature, b"n", &sig).is_err());
        let other = Identity::generate();
        assert!(verify(&other.public_key(), Domain::EnvelopeSignature, b"m", &sig).is_err());
        assert_eq!(
            sig,
            id.sign_parts(Domain::EnvelopeSignature, &[b"", b"m"]),
            "sign_parts signs the concatenation"
        );
    }

    #[test]
    fn domains_are_prefix_free() {
        let all = [
            Domain::EnvelopeSignature,
            Domain::EnvelopeTag,
            Domain::RegisterProof,
            Domain::InviteProof,
            Domain::FleetCheck,
        ];
        for a in all {
            for b in all {
                if a != b {
                    assert!(!a.as_bytes().starts_with(b.as_bytes()));
                }
            }
        }
    }

    #[test]
    fn flipped_signature_bits_fail() {
        let id = Identity::generate();
        let sig = id.sign(Domain::EnvelopeSignature, b"hello");
        for i in 0..SIGNATURE_LEN * 8 {
            let mut bad = sig;
            bad.0[i / 8] ^= 1 << (i % 8);
            assert!(verify(&id.public_key(), Domain::EnvelopeSignature, b"hello", &bad).is_err());
        }
    }

    #[test]
    fn batch_verifies_and_detects_a_bad_one() {
        let ids: Vec<Identity> = (0..8).map(|_| Identity::generate()).collect();
        let pks: Vec<PublicKey> = ids.iter().map(|i| i.public_key()).collect();
        let msgs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 40]).collect();
        let mut sigs: Vec<Signature> = ids
            .iter()
            .zip(&msgs)
            .map(|(id, m)| id.sign(Domain::EnvelopeSignature, m))
            .collect();
        let items = |sigs: &[Signature]| -> Result<(), CryptoError> {
            let v: Vec<_> = (0..8)
                .map(|i| {
                    (
                        &pks[i],
                        Domain::EnvelopeSignature,
                        msgs[i].as_slice(),
                        &sigs[i],
                    )
                })
                .collect();
            verify_batch(&v)
        };
        items(&sigs).unwrap();
        sigs[3].0[0] ^= 1;
        assert!(items(&sigs).is_err());
    }

    #[test]
    fn small_order_r_bytes_are_recognised_without_decoding() {
        use curve25519_dalek::edwards::CompressedEdwardsY;
        let ys = small_order_ys();
        assert_eq!(ys.len(), 7, "0, 1, p-1, two order-8 ys, p, p+1");
        // Every encoding that decodes to a small-order point is caught,
        // with either sign bit; random points are not.
        for y in ys {
            for sign in [0u8, 0x80] {
                let mut b = *y;
                b[31] |= sign;
                assert!(r_is_small_order(&b));
                if let Some(p) = CompressedEdwardsY(b).decompress() {
                    assert!(p.is_small_order(), "{}", hex::encode(b));
                }
            }
        }
        for t in curve25519_dalek::constants::EIGHT_TORSION {
            assert!(r_is_small_order(t.compress().as_bytes()));
        }
        for i in 0..64u8 {
            let sig = Identity::generate().sign(Domain::EnvelopeSignature, &[i]);
            let r = CompressedEdwardsY(sig.0[..32].try_into().unwrap());
            assert!(!r.decompress().unwrap().is_small_order());
            assert!(!r_is_small_order(&sig.0[..32]));
        }
    }

    #[test]
    fn batch_refuses_a_small_order_r_like_verify_strict() {
        let id = Identity::generate();
        let pk = id.public_key();
        let good = id.sign(Domain::EnvelopeSignature, b"m");
        // R = the identity point (small order), any canonical s.
        let mut bad = Signature([0u8; 64]);
        bad.0[0] = 1;
        assert!(verify(&pk, Domain::EnvelopeSignature, b"m", &bad).is_err());
        let items = [
            (&pk, Domain::EnvelopeSignature, &b"m"[..], &good),
            (&pk, Domain::EnvelopeSignature, &b"m"[..], &bad),
        ];
        assert!(verify_batch(&items).is_err());
        assert!(verify_batch(&items[..1]).is_ok());
    }
}
