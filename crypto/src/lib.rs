//! Cryptography for agent-link: who an instance is, how fleet membership and
//! authorship of a message are proven, and how both ends of a QUIC connection
//! authenticate each other.
//!
//! - [`Identity`] / [`PublicKey`]: an instance's Ed25519 key pair and the
//!   copy-paste-safe text form of its public key (64 lowercase hex digits).
//! - [`FleetSecret`] / [`FleetKey`]: the 32-byte fleet secret and a pre-keyed
//!   HMAC-SHA256 state that tags and checks messages in constant time.
//! - [`sign`](Identity::sign) / [`verify`]: Ed25519 signatures over a
//!   domain-separated input, verified with `verify_strict`.
//! - [`tls`]: rustls configurations for the relay and for instances (rcgen
//!   certificates made from the same Ed25519 keys, a pinned relay certificate,
//!   client keys extracted for the relay's registry lookup).
//! - [`files`]: key files written with mode 0600 and refused when others can
//!   read them.
//! - `process`: core dumps off (both binaries call it first).
//!
//! ```
//! use agent_link_crypto::{Identity, FleetSecret, Domain, verify};
//! let id = Identity::generate();
//! let fleet = FleetSecret::generate().key();
//! let body = b"example body";
//! let tag = fleet.tag(Domain::EnvelopeTag, &[body]);
//! assert!(fleet.check(Domain::EnvelopeTag, &[body], &tag).is_ok());
//! let sig = id.sign(Domain::EnvelopeSignature, body);
//! assert!(verify(&id.public_key(), Domain::EnvelopeSignature, body, &sig).is_ok());
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod files;
mod fleet;
mod identity;
#[cfg(unix)]
pub mod process;
mod sign;
pub mod tls;

pub use fleet::{read_previous, write_previous, FleetKey, FleetKeys, FleetSecret, Tag, TAG_LEN};
pub use identity::{Identity, PublicKey, PUBLIC_KEY_LEN};
pub use sign::{
    verify, verify_batch, verify_batch_checked, verify_checked, CheckedKey, Domain, Signature,
    SIGNATURE_LEN,
};

/// Errors from this crate. Each variant says what was wrong, never the secret
/// material involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A public key in text form was not 64 hex digits, or the bytes are not a
    /// valid Ed25519 point. Likely a truncated copy-paste.
    #[error("malformed public key: expected 64 hex digits of an Ed25519 key")]
    MalformedPublicKey,
    /// The key is a small-order ("weak") point: anyone can forge signatures for it.
    #[error("weak public key (small-order Ed25519 point) refused")]
    WeakPublicKey,
    /// An HMAC tag did not match: the sender does not hold the fleet secret,
    /// or the bytes were changed in transit.
    #[error("fleet tag does not match")]
    BadTag,
    /// An Ed25519 signature did not verify under the claimed key and domain.
    #[error("signature does not verify")]
    BadSignature,
    /// A key or secret file has the wrong size or encoding.
    #[error("{path}: malformed {what} file")]
    MalformedFile { path: String, what: &'static str },
    /// A private file is readable or writable by group or others.
    #[error("{path}: permissions {mode:o} are too open; run `chmod 600 {path}`")]
    InsecurePermissions { path: String, mode: u32 },
    /// A state directory that group or others may write to.
    #[error("{path}: permissions {mode:o} let others change this directory (its config and keys); run `chmod 700 {path}`")]
    InsecureDirectory { path: String, mode: u32 },
    /// A state directory owned by another user.
    #[error("{path} belongs to uid {owner}, not to you (uid {me}): another user could change its config and keys; use a directory of your own")]
    ForeignDirectory { path: String, owner: u32, me: u32 },
    /// File-system error while reading or writing a key file.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Building a TLS certificate or configuration failed.
    #[error("TLS setup failed: {0}")]
    Tls(String),
}
