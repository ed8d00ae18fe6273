//! The fleet secret and HMAC-SHA256 tags.
//!
//! The tag proves "a member of this fleet made this", not who: authorship is
//! the Ed25519 signature's job. [`FleetKey`] holds an HMAC state already keyed
//! with the secret, cloned per message, so the key schedule is not redone on
//! the relay's hot path.

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::sign::Domain;
use crate::{files, CryptoError};

/// Length of an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;

/// A 32-byte HMAC tag.
pub type Tag = [u8; TAG_LEN];

/// The fleet secret: 32 random bytes made by the relay at init. `Debug`
/// prints nothing of it; memory is zeroed on drop.
#[derive(Clone)]
pub struct FleetSecret(Zeroizing<[u8; 32]>);

impl FleetSecret {
    /// 32 bytes from the operating system's CSPRNG.
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut b = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(b.as_mut());
        Self(b)
    }

    /// Wrap existing bytes (from a join token or a file).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw bytes, for putting into a join token.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A pre-keyed HMAC state for tagging and checking.
    pub fn key(&self) -> FleetKey {
        FleetKey {
            mac: Hmac::<Sha256>::new_from_slice(self.0.as_ref())
                .expect("HMAC-SHA256 accepts keys of any length"),
        }
    }

    /// Write hex to `path` with mode 0600; refuses to overwrite.
    pub fn write_new(&self, path: &Path) -> Result<(), CryptoError> {
        let text = Zeroizing::new(hex::encode(self.0.as_ref()));
        files::write_private_new(path, text.as_bytes())
    }

    /// Replace the file at `path` with this secret (hex, 0600; written to a
    /// temporary file, fsynced and renamed, so a crash leaves the old or the
    /// new secret, never half): a rotation.
    pub fn write_replace(&self, path: &Path) -> Result<(), CryptoError> {
        let text = Zeroizing::new(hex::encode(self.0.as_ref()));
        files::write_atomic(path, text.as_bytes(), 0o600)
    }

    /// Read a file written by [`FleetSecret::write_new`], refusing loose
    /// permissions.
    pub fn read(path: &Path) -> Result<Self, CryptoError> {
        let text = files::read_private(path)?;
        let malformed = || CryptoError::MalformedFile {
            path: path.display().to_string(),
            what: "fleet secret",
        };
        let s = std::str::from_utf8(&text).map_err(|_| malformed())?.trim();
        let mut b = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(s, b.as_mut()).map_err(|_| malformed())?;
        Ok(Self(b))
    }
}

impl fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetSecret(<redacted>)")
    }
}

/// HMAC-SHA256 keyed with the fleet secret.
#[derive(Clone)]
pub struct FleetKey {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetKey(<redacted>)")
    }
}

impl FleetKey {
    fn state(&self, domain: Domain, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(domain.as_bytes());
        for p in parts {
            mac.update(p);
        }
        mac
    }

    /// Tag `domain || parts[0] || parts[1] || …`.
    pub fn tag(&self, domain: Domain, parts: &[&[u8]]) -> Tag {
        self.state(domain, parts).finalize().into_bytes().into()
    }

    /// Check a tag in constant time (`hmac`'s `verify_slice` compares with
    /// `subtle`), so timing reveals nothing about how many bytes matched.
    pub fn check(&self, domain: Domain, parts: &[&[u8]], tag: &[u8]) -> Result<(), CryptoError> {
        self.state(domain, parts)
            .verify_slice(tag)
            .map_err(|_| CryptoError::BadTag)
    }
}

/// The fleet keys in force: the current secret's, and for the grace period
/// of a rotation the one it replaced, until `until_ms` (Unix ms). Tags are
/// made with the current key only; checks accept either while the grace
/// period lasts, so members that have not heard of the rotation yet are not
/// cut off, and nobody is after it.
#[derive(Clone, Debug)]
pub struct FleetKeys {
    current: FleetKey,
    previous: Option<(FleetKey, u64)>,
}

impl FleetKeys {
    /// No rotation in progress.
    pub fn new(current: FleetKey) -> Self {
        Self {
            current,
            previous: None,
        }
    }

    /// `current`, and `previous` accepted until `until_ms`.
    pub fn with_previous(current: FleetKey, previous: FleetKey, until_ms: u64) -> Self {
        Self {
            current,
            previous: Some((previous, until_ms)),
        }
    }

    /// The keys of `current`, and of `previous` until its deadline (as
    /// `fleet.secret` and `fleet.previous` hold them).
    pub fn from_secrets(current: &FleetSecret, previous: Option<&(FleetSecret, u64)>) -> Self {
        match previous {
            Some((old, until)) => Self::with_previous(current.key(), old.key(), *until),
            None => Self::new(current.key()),
        }
    }

    /// The key to tag with.
    pub fn current(&self) -> &FleetKey {
        &self.current
    }

    /// Until when the previous key is accepted (0: there is none).
    pub fn previous_until_ms(&self) -> u64 {
        self.previous.as_ref().map_or(0, |p| p.1)
    }

    /// Check a tag under the current key, else under the previous one while
    /// `now_ms` is before its deadline (constant time each).
    pub fn check(
        &self,
        domain: Domain,
        parts: &[&[u8]],
        tag: &[u8],
        now_ms: u64,
    ) -> Result<(), CryptoError> {
        match self.current.check(domain, parts, tag) {
            Ok(()) => Ok(()),
            Err(e) => match &self.previous {
                Some((key, until)) if now_ms < *until => key.check(domain, parts, tag),
                _ => Err(e),
            },
        }
    }
}

impl From<FleetKey> for FleetKeys {
    fn from(current: FleetKey) -> Self {
        Self::new(current)
    }
}

/// The secret a rotation replaced and until when it is accepted, as kept
/// beside `fleet.secret` (`fleet.previous`: `HEX UNTIL_MS`, 0600).
pub fn read_previous(path: &Path) -> Result<Option<(FleetSecret, u64)>, CryptoError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = files::read_private(path)?;
    let malformed = || CryptoError::MalformedFile {
        path: path.display().to_string(),
        what: "previous fleet secret",
    };
    let s = std::str::from_utf8(&text).map_err(|_| malformed())?;
    let mut fields = s.split_whitespace();
    let (Some(hex_secret), Some(until), None) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(malformed());
    };
    let mut b = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_secret, b.as_mut()).map_err(|_| malformed())?;
    let until = until.parse::<u64>().map_err(|_| malformed())?;
    Ok(Some((FleetSecret(b), until)))
}

/// Write `fleet.previous` (see [`read_previous`]) atomically with mode 0600.
pub fn write_previous(path: &Path, secret: &FleetSecret, until_ms: u64) -> Result<(), CryptoError> {
    let text = Zeroizing::new(format!("{} {until_ms}\n", hex::encode(secret.0.as_ref())));
    files::write_atomic(path, text.as_bytes(), 0o600)
}

/// Plain HMAC-SHA256 with no domain, for RFC 4231 test vectors only.
#[cfg(test)]
fn hmac_raw(key: &[u8], data: &[u8]) -> Tag {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_key_is_accepted_only_until_its_deadline() {
        let (old, new) = (FleetSecret::generate(), FleetSecret::generate());
        let parts: &[&[u8]] = &[b"m"];
        let old_tag = old.key().tag(Domain::EnvelopeTag, parts);
        let new_tag = new.key().tag(Domain::EnvelopeTag, parts);
        let k = FleetKeys::with_previous(new.key(), old.key(), 1_000);
        assert!(k.check(Domain::EnvelopeTag, parts, &new_tag, 5_000).is_ok());
        assert!(k.check(Domain::EnvelopeTag, parts, &old_tag, 999).is_ok());
        assert!(k
            .check(Domain::EnvelopeTag, parts, &old_tag, 1_000)
            .is_err());
        let only = FleetKeys::new(new.key());
        assert!(only.check(Domain::EnvelopeTag, parts, &old_tag, 0).is_err());
        assert_eq!(only.previous_until_ms(), 0);
        assert_eq!(k.previous_until_ms(), 1_000);
    }

    #[test]
    fn the_previous_secret_file_round_trips_and_is_refused_when_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fleet.previous");
        assert!(read_previous(&p).unwrap().is_none());
        let s = FleetSecret::generate();
        write_previous(&p, &s, 42).unwrap();
        let (back, until) = read_previous(&p).unwrap().unwrap();
        assert_eq!((back.expose(), until), (s.expose(), 42));
        files::write_atomic(&p, b"zz 1", 0o600).unwrap();
        assert!(read_previous(&p).is_err());
    }

    /// Found by cargo mutants: a constant `expose` survived (the join token
    /// would carry zeros).
    #[test]
    fn expose_gives_the_secret_back() {
        let bytes = [7u8; 32];
        assert_eq!(FleetSecret::from_bytes(bytes).expose(), &bytes);
    }

    /// RFC 4231 §4.2–4.7 (test cases 1, 2, 3, 4, 6, 7; case 5 is truncated output).
    #[test]
    fn rfc4231_vectors() {
        let cases: [(Vec<u8>, Vec<u8>, &str); 6] = [
            (vec![0x0b; 20], b"Hi There".to_vec(),
             "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
            (b"Jefe".to_vec(), b"what do ya want for nothing?".to_vec(),
             "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
            (vec![0xaa; 20], vec![0xdd; 50],
             "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
            ((1u8..=25).collect(), vec![0xcd; 50],
             "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
            (vec![0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
             "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
            (vec![0xaa; 131], b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.".to_vec(),
             "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
        ];
        for (key, data, want) in cases {
            assert_eq!(hex::encode(hmac_raw(&key, &data)), want);
        }
    }

    #[test]
    fn fleet_key_tags_domain_then_parts() {
        let secret = FleetSecret::from_bytes([9u8; 32]);
        let key = secret.key();
        let tag = key.tag(Domain::EnvelopeTag, &[b"ab", b"c"]);
        let mut whole = Domain::EnvelopeTag.as_bytes().to_vec();
        whole.extend_from_slice(b"abc");
        assert_eq!(tag, hmac_raw(&[9u8; 32], &whole));
        key.check(Domain::EnvelopeTag, &[b"abc"], &tag).unwrap();
        assert!(key.check(Domain::RegisterProof, &[b"abc"], &tag).is_err());
        let other = FleetSecret::from_bytes([8u8; 32]).key();
        assert!(other.check(Domain::EnvelopeTag, &[b"abc"], &tag).is_err());
        assert!(key
            .check(Domain::EnvelopeTag, &[b"abc"], &tag[..31])
            .is_err());
    }

    #[test]
    fn debug_is_redacted() {
        let s = FleetSecret::from_bytes([0xab; 32]);
        assert!(!format!("{s:?}{:?}", s.key()).contains("ab"));
    }
}
