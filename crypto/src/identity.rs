//! Instance identities: an Ed25519 key pair per instance, and the public key's
//! text form that operators copy between machines.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::sign::{Domain, Signature};
use crate::{files, CryptoError};

/// Length of an Ed25519 public key in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;

/// An instance's private identity. `Debug` shows only the public key.
pub struct Identity {
    signing: SigningKey,
}

impl Identity {
    /// A fresh key pair from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self {
            signing: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// Rebuild from the 32-byte seed (RFC 8032 "private key").
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// Sign `message` under `domain` (see [`Domain`] for what each covers).
    pub fn sign(&self, domain: Domain, message: &[u8]) -> Signature {
        let input = domain.prefixed(message);
        Signature(self.signing.sign(&input).to_bytes())
    }

    /// Sign a message built from several parts, without concatenating them
    /// twice (the domain is still prefixed).
    pub fn sign_parts(&self, domain: Domain, parts: &[&[u8]]) -> Signature {
        let mut input = Vec::with_capacity(64 + parts.iter().map(|p| p.len()).sum::<usize>());
        input.extend_from_slice(domain.as_bytes());
        for p in parts {
            input.extend_from_slice(p);
        }
        Signature(self.signing.sign(&input).to_bytes())
    }

    /// A 32-byte secret for another purpose, derived from this key as
    /// HMAC-SHA256(seed, "agent-link/v1 derive " || `label`): one key file
    /// backs several independent secrets, and none of them reveals the key.
    pub fn derive_secret(&self, label: &str) -> Zeroizing<[u8; 32]> {
        use hmac::{Hmac, Mac};
        let seed = Zeroizing::new(self.signing.to_bytes());
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(seed.as_ref())
            .expect("HMAC takes keys of any length");
        mac.update(b"agent-link/v1 derive ");
        mac.update(label.as_bytes());
        Zeroizing::new(mac.finalize().into_bytes().into())
    }

    /// PKCS#8 v2 DER of the key, for rcgen / rustls. Zeroized when dropped.
    pub(crate) fn pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let doc = self
            .signing
            .to_pkcs8_der()
            .map_err(|e| CryptoError::Tls(format!("encoding key as PKCS#8: {e}")))?;
        Ok(Zeroizing::new(doc.as_bytes().to_vec()))
    }

    /// Write the seed to `path` with mode 0600 (atomically; refuses to
    /// overwrite an existing file so a key is never lost by accident).
    pub fn write_new(&self, path: &Path) -> Result<(), CryptoError> {
        let seed = Zeroizing::new(hex::encode(self.signing.to_bytes()));
        files::write_private_new(path, seed.as_bytes())
    }

    /// Read a key written by [`Identity::write_new`]. Refuses a file that
    /// group or others can read (like OpenSSH), naming the path.
    pub fn read(path: &Path) -> Result<Self, CryptoError> {
        let text = files::read_private(path)?;
        let malformed = || CryptoError::MalformedFile {
            path: path.display().to_string(),
            what: "private key",
        };
        let trimmed = std::str::from_utf8(&text).map_err(|_| malformed())?.trim();
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(trimmed, seed.as_mut()).map_err(|_| malformed())?;
        Ok(Self::from_seed(&seed))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// An Ed25519 public key. Text form: 64 lowercase hex digits (no separators,
/// so a double-click selects all of it and no shell quoting is needed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    /// Decode and check that the bytes are a usable verification key: a valid
    /// point that is not of small order. Small-order keys are refused because
    /// a signature under them can be forged without any private key.
    pub fn verifying_key(&self) -> Result<VerifyingKey, CryptoError> {
        let vk = VerifyingKey::from_bytes(&self.0).map_err(|_| CryptoError::MalformedPublicKey)?;
        if vk.is_weak() {
            return Err(CryptoError::WeakPublicKey);
        }
        Ok(vk)
    }

    /// Parse raw bytes, checking the key as in [`PublicKey::verifying_key`].
    pub fn from_bytes_checked(bytes: [u8; PUBLIC_KEY_LEN]) -> Result<Self, CryptoError> {
        let pk = Self(bytes);
        pk.verifying_key()?;
        Ok(pk)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = CryptoError;
    /// Accepts the 64 hex digits in either case, with surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; PUBLIC_KEY_LEN];
        hex::decode_to_slice(s.trim(), &mut bytes).map_err(|_| CryptoError::MalformedPublicKey)?;
        Self::from_bytes_checked(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by cargo mutants: a constant `derive_secret` (all zeros or all
    /// ones) survived, which would make the relay's stateless-reset and
    /// connection-id keys guessable. Each (key, label) gives its own secret,
    /// stable, equal to HMAC-SHA256(seed, "agent-link/v1 derive " || label).
    #[test]
    fn derived_secrets_depend_on_key_and_label() {
        use hmac::{Hmac, Mac};
        let (a, b) = (Identity::generate(), Identity::generate());
        let s = a.derive_secret("x");
        assert_eq!(*s, *a.derive_secret("x"), "stable");
        assert_ne!(*s, *a.derive_secret("y"), "per label");
        assert_ne!(*s, *b.derive_secret("x"), "per key");
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&a.signing.to_bytes()).unwrap();
        mac.update(b"agent-link/v1 derive x");
        let want: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(*s, want);
    }

    #[test]
    fn public_key_as_bytes_are_the_key() {
        let id = Identity::generate();
        let pk = id.public_key();
        assert_eq!(pk.as_bytes(), &pk.0);
        assert_ne!(pk.as_bytes(), &[0; PUBLIC_KEY_LEN]);
    }

    #[test]
    fn text_form_round_trips() {
        let pk = Identity::generate().public_key();
        let text = pk.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<PublicKey>().unwrap(), pk);
        assert_eq!(text.to_uppercase().parse::<PublicKey>().unwrap(), pk);
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63), &"a".repeat(66)] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn small_order_key_is_refused() {
        // The identity point (encoded as y = 1) has order 1.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        assert!(matches!(
            PublicKey::from_bytes_checked(weak),
            Err(CryptoError::WeakPublicKey)
        ));
    }

    #[test]
    fn debug_does_not_print_the_private_key() {
        let seed = [7u8; 32];
        let id = Identity::from_seed(&seed);
        let dbg = format!("{id:?}");
        assert!(!dbg.contains(&hex::encode(seed)));
    }
}
