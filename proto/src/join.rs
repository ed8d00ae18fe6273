//! The join token: one line that lets an instance find, authenticate and join
//! a relay (PROTOCOL.md §8).
//!
//! Text form: `al1` followed by unpadded base64url of the bincode encoding of
//! one of
//! - version 1, the **open fleet token**: `(version: u8 = 1, addr: str,
//!   fingerprint: [u8; 32], fleet_secret: [u8; 32])`, accepted only by a
//!   relay whose config has `open_registration: true`;
//! - version 2, an **invite**: `(version: u8 = 2, addr: str, fingerprint:
//!   [u8; 32], instance_id: str, invite_secret: [u8; 32])`, good for one
//!   registration of that one id; the fleet secret comes from the relay once
//!   registered.
//!
//! base64url uses only `A-Z a-z 0-9 - _`, so the line survives shells, chat
//! and double-click selection. Either secret lets its holder join: treat the
//! token like a password, and never commit it.

use agent_link_crypto::FleetSecret;
use base64::Engine as _;
use bincode::{BorrowDecode, Encode};

use crate::{codec, ProtoError};

const PREFIX: &str = "al1";
/// Longest relay address accepted in a token.
const MAX_ADDR_LEN: usize = 255;

/// What a join token lets its holder do.
#[derive(Clone)]
pub enum JoinSecret {
    /// The fleet secret itself (version 1): register any free id, where the
    /// relay allows open registration.
    Fleet(FleetSecret),
    /// A single-use invite (version 2) for `instance_id`, whose own secret
    /// keys the registration proof.
    Invite {
        /// The one id this invite registers.
        instance_id: String,
        /// The invite's secret (not the fleet secret).
        secret: FleetSecret,
    },
}

/// A parsed join token.
#[derive(Clone)]
pub struct JoinToken {
    /// `host:port` to dial.
    pub addr: String,
    /// SHA-256 of the relay's certificate.
    pub fingerprint: [u8; 32],
    /// The fleet secret or an invite.
    pub secret: JoinSecret,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.secret {
            JoinSecret::Fleet(_) => "open fleet token".to_string(),
            JoinSecret::Invite { instance_id, .. } => format!("invite for {instance_id}"),
        };
        f.debug_struct("JoinToken")
            .field("addr", &self.addr)
            .field("fingerprint", &hex_short(&self.fingerprint))
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

fn hex_short(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

#[derive(Encode, BorrowDecode)]
struct FleetWire<'a> {
    version: u8,
    addr: &'a str,
    fingerprint: [u8; 32],
    secret: [u8; 32],
}

#[derive(Encode, BorrowDecode)]
struct InviteWire<'a> {
    version: u8,
    addr: &'a str,
    fingerprint: [u8; 32],
    instance_id: &'a str,
    secret: [u8; 32],
}

impl JoinToken {
    /// The one-line text form.
    pub fn encode(&self) -> Result<String, ProtoError> {
        let body = match &self.secret {
            JoinSecret::Fleet(s) => codec::encode_body(&FleetWire {
                version: 1,
                addr: &self.addr,
                fingerprint: self.fingerprint,
                secret: *s.expose(),
            })?,
            JoinSecret::Invite {
                instance_id,
                secret,
            } => codec::encode_body(&InviteWire {
                version: 2,
                addr: &self.addr,
                fingerprint: self.fingerprint,
                instance_id,
                secret: *secret.expose(),
            })?,
        };
        Ok(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body)
        ))
    }

    /// The fleet secret of an open fleet token (`None` for an invite).
    pub fn fleet_secret(&self) -> Option<&FleetSecret> {
        match &self.secret {
            JoinSecret::Fleet(s) => Some(s),
            JoinSecret::Invite { .. } => None,
        }
    }

    /// The instance id an invite is for (`None` for the open fleet token).
    pub fn invited_id(&self) -> Option<&str> {
        match &self.secret {
            JoinSecret::Fleet(_) => None,
            JoinSecret::Invite { instance_id, .. } => Some(instance_id),
        }
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
        let undecodable = ProtoError::BadJoinToken("its contents do not decode (truncated?)");
        let (addr, fingerprint, secret) = match bytes.first() {
            Some(1) => {
                let w: FleetWire<'_> = codec::decode(&bytes).map_err(|_| undecodable)?;
                (
                    w.addr,
                    w.fingerprint,
                    JoinSecret::Fleet(FleetSecret::from_bytes(w.secret)),
                )
            }
            Some(2) => {
                let w: InviteWire<'_> = codec::decode(&bytes).map_err(|_| undecodable)?;
                crate::check_id(w.instance_id)
                    .map_err(|_| ProtoError::BadJoinToken("its instance id is not valid"))?;
                (
                    w.addr,
                    w.fingerprint,
                    JoinSecret::Invite {
                        instance_id: w.instance_id.to_owned(),
                        secret: FleetSecret::from_bytes(w.secret),
                    },
                )
            }
            Some(_) => return Err(ProtoError::BadJoinToken("unsupported token version")),
            None => return Err(undecodable),
        };
        if addr.is_empty() || addr.len() > MAX_ADDR_LEN || !addr.contains(':') {
            return Err(ProtoError::BadJoinToken(
                "its relay address is not HOST:PORT",
            ));
        }
        Ok(Self {
            addr: addr.to_owned(),
            fingerprint,
            secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_round_trip(t: &JoinToken) {
        let s = t.encode().unwrap();
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let back = JoinToken::parse(&format!("  {s}\n")).unwrap();
        assert_eq!(back.addr, t.addr);
        assert_eq!(back.fingerprint, t.fingerprint);
        match (&back.secret, &t.secret) {
            (JoinSecret::Fleet(a), JoinSecret::Fleet(b)) => assert_eq!(a.expose(), b.expose()),
            (
                JoinSecret::Invite {
                    instance_id: a,
                    secret: sa,
                },
                JoinSecret::Invite {
                    instance_id: b,
                    secret: sb,
                },
            ) => {
                assert_eq!(a, b);
                assert_eq!(sa.expose(), sb.expose());
            }
            _ => panic!("kind changed in the round trip"),
        }
        for cut in 0..s.len() {
            assert!(JoinToken::parse(&s[..cut]).is_err(), "cut at {cut}");
        }
        assert!(!format!("{back:?}").contains("0404"), "secret not in Debug");
    }

    #[test]
    fn round_trip_and_truncation() {
        check_round_trip(&JoinToken {
            addr: "127.0.0.1:8765".into(),
            fingerprint: [3; 32],
            secret: JoinSecret::Fleet(FleetSecret::from_bytes([4; 32])),
        });
        check_round_trip(&JoinToken {
            addr: "127.0.0.1:8765".into(),
            fingerprint: [3; 32],
            secret: JoinSecret::Invite {
                instance_id: "instance-007".into(),
                secret: FleetSecret::from_bytes([4; 32]),
            },
        });
    }

    #[test]
    fn an_invite_with_a_bad_id_or_an_unknown_version_is_refused() {
        let bad = JoinToken {
            addr: "127.0.0.1:8765".into(),
            fingerprint: [3; 32],
            secret: JoinSecret::Invite {
                instance_id: "a b".into(),
                secret: FleetSecret::from_bytes([4; 32]),
            },
        };
        assert!(JoinToken::parse(&bad.encode().unwrap()).is_err());
        let body = codec::encode_body(&FleetWire {
            version: 3,
            addr: "127.0.0.1:1",
            fingerprint: [0; 32],
            secret: [0; 32],
        })
        .unwrap();
        let text = format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body)
        );
        assert!(JoinToken::parse(&text).is_err());
    }
}
