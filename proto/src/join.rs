//! The join token: one line that lets an instance find, authenticate and join
//! a relay (PROTOCOL.md §8).
//!
//! Text form: `al1` followed by unpadded base64url of the bincode encoding of
//! `(version: u8 = 1, addr: str, fingerprint: [u8; 32], secret: [u8; 32])`.
//! base64url uses only `A-Z a-z 0-9 - _`, so the line survives shells, chat
//! and double-click selection. It holds the fleet secret: treat it like a
//! password, and never commit it.

use agent_link_crypto::FleetSecret;
use base64::Engine as _;
use bincode::{BorrowDecode, Encode};

use crate::{codec, ProtoError};

const PREFIX: &str = "al1";
/// Longest relay address accepted in a token.
const MAX_ADDR_LEN: usize = 255;

/// A parsed join token.
#[derive(Clone)]
pub struct JoinToken {
    /// `host:port` to dial.
    pub addr: String,
    /// SHA-256 of the relay's certificate.
    pub fingerprint: [u8; 32],
    /// The fleet secret.
    pub secret: FleetSecret,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("addr", &self.addr)
            .field("fingerprint", &hex_short(&self.fingerprint))
            .finish_non_exhaustive()
    }
}

fn hex_short(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

#[derive(Encode, BorrowDecode)]
struct Wire<'a> {
    version: u8,
    addr: &'a str,
    fingerprint: [u8; 32],
    secret: [u8; 32],
}

impl JoinToken {
    /// The one-line text form.
    pub fn encode(&self) -> Result<String, ProtoError> {
        let body = codec::encode_body(&Wire {
            version: 1,
            addr: &self.addr,
            fingerprint: self.fingerprint,
            secret: *self.secret.expose(),
        })?;
        Ok(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body)
        ))
    }

    /// Parse the text form (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<Self, ProtoError> {
        let text = text.trim();
        let rest = text
            .strip_prefix(PREFIX)
            .ok_or(ProtoError::BadJoinToken("it does not start with \"al1\""))?;
        if rest.len() > 1024 {
            return Err(ProtoError::BadJoinToken("it is too long"));
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(rest)
            .map_err(|_| ProtoError::BadJoinToken("it is not valid base64url (truncated?)"))?;
        let wire: Wire<'_> = codec::decode(&bytes)
            .map_err(|_| ProtoError::BadJoinToken("its contents do not decode (truncated?)"))?;
        if wire.version != 1 {
            return Err(ProtoError::BadJoinToken("unsupported token version"));
        }
        if wire.addr.is_empty() || wire.addr.len() > MAX_ADDR_LEN || !wire.addr.contains(':') {
            return Err(ProtoError::BadJoinToken(
                "its relay address is not HOST:PORT",
            ));
        }
        Ok(Self {
            addr: wire.addr.to_owned(),
            fingerprint: wire.fingerprint,
            secret: FleetSecret::from_bytes(wire.secret),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let t = JoinToken {
            addr: "127.0.0.1:8765".into(),
            fingerprint: [3; 32],
            secret: FleetSecret::from_bytes([4; 32]),
        };
        let s = t.encode().unwrap();
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let back = JoinToken::parse(&format!("  {s}\n")).unwrap();
        assert_eq!(back.addr, t.addr);
        assert_eq!(back.fingerprint, t.fingerprint);
        assert_eq!(back.secret.expose(), t.secret.expose());
        for cut in 0..s.len() {
            assert!(JoinToken::parse(&s[..cut]).is_err(), "cut at {cut}");
        }
        assert!(!format!("{back:?}").contains("0404"), "secret not in Debug");
    }
}
