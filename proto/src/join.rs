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
//!   registered;
//! - versions 3 and 4, the same two for a **fleet of relays**: the single
//!   `addr, fingerprint` pair becomes `relays: [(addr: str, fingerprint:
//!   [u8; 32])]`, one to [`MAX_RELAYS`], the first the one to dial first:
//!   `(3, relays, fleet_secret)` and `(4, relays, instance_id,
//!   invite_secret)`. A token of one relay is still written as version 1
//!   or 2, so a relay alone keeps handing out tokens every peer reads;
//! - versions 5 and 6, the same as 3 and 4 where a relay may be verified by
//!   a **CA chain** instead of a pin: each relay is `(addr: str, trust:
//!   RelayTrust)`, `RelayTrust` the enum `Pinned([u8; 32])` (index 0) or
//!   `Ca` (index 1: the relay presents a chain the peer checks against its
//!   CA roots, for the host of `addr`). Written only when a relay is `Ca`.
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
/// Most relays one token lists.
pub const MAX_RELAYS: usize = 16;
/// Longest token text accepted (a token of [`MAX_RELAYS`] relays with
/// long host names fits).
const MAX_TEXT_LEN: usize = 8192;

/// How a peer knows it reached the relay and not someone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, BorrowDecode)]
pub enum RelayTrust {
    /// The relay's exact certificate, by its SHA-256 (a self-signed one).
    Pinned([u8; 32]),
    /// A certificate chain from a certificate authority, for the host of
    /// the relay's address, checked against the peer's CA roots (the
    /// system's, or a CA file of its config).
    Ca,
}

impl RelayTrust {
    /// The pinned fingerprint (`None` for [`RelayTrust::Ca`]).
    pub fn pinned(&self) -> Option<[u8; 32]> {
        match self {
            Self::Pinned(f) => Some(*f),
            Self::Ca => None,
        }
    }

    /// As a config file spells it: 64 hex digits, or `ca`.
    pub fn to_config(&self) -> String {
        match self {
            Self::Pinned(f) => hex_full(f),
            Self::Ca => "ca".into(),
        }
    }

    /// From [`RelayTrust::to_config`]'s spelling.
    pub fn from_config(s: &str) -> Option<Self> {
        let s = s.trim();
        if s == "ca" {
            return Some(Self::Ca);
        }
        if s.len() != 64 {
            return None;
        }
        let mut f = [0u8; 32];
        for (i, b) in f.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self::Pinned(f))
    }
}

fn hex_full(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One relay a token lists: where to dial it and how to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayEndpoint {
    /// `host:port` to dial.
    pub addr: String,
    /// Its certificate's pin, or that a CA vouches for it.
    pub trust: RelayTrust,
}

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
    /// How to know the relay: its certificate's pin, or a CA chain.
    pub trust: RelayTrust,
    /// The fleet secret or an invite.
    pub secret: JoinSecret,
    /// The fleet's other relays, in the order to try them when the first
    /// (`addr`) cannot be reached or goes away. Empty for a relay alone.
    pub other_relays: Vec<RelayEndpoint>,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.secret {
            JoinSecret::Fleet(_) => "open fleet token".to_string(),
            JoinSecret::Invite { instance_id, .. } => format!("invite for {instance_id}"),
        };
        f.debug_struct("JoinToken")
            .field("addr", &self.addr)
            .field(
                "trust",
                &match self.trust {
                    RelayTrust::Pinned(f) => hex_short(&f),
                    RelayTrust::Ca => "ca".into(),
                },
            )
            .field("kind", &kind)
            .field("other_relays", &self.other_relays.len())
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

#[derive(Encode, BorrowDecode)]
struct RelayWire<'a> {
    addr: &'a str,
    fingerprint: [u8; 32],
}

#[derive(Encode, BorrowDecode)]
struct TrustedRelayWire<'a> {
    addr: &'a str,
    trust: RelayTrust,
}

#[derive(Encode, BorrowDecode)]
struct FleetOfTrustedRelaysWire<'a> {
    version: u8,
    relays: Vec<TrustedRelayWire<'a>>,
    secret: [u8; 32],
}

#[derive(Encode, BorrowDecode)]
struct InviteOfTrustedRelaysWire<'a> {
    version: u8,
    relays: Vec<TrustedRelayWire<'a>>,
    instance_id: &'a str,
    secret: [u8; 32],
}

#[derive(Encode, BorrowDecode)]
struct FleetOfRelaysWire<'a> {
    version: u8,
    relays: Vec<RelayWire<'a>>,
    secret: [u8; 32],
}

#[derive(Encode, BorrowDecode)]
struct InviteOfRelaysWire<'a> {
    version: u8,
    relays: Vec<RelayWire<'a>>,
    instance_id: &'a str,
    secret: [u8; 32],
}

impl JoinToken {
    /// The one-line text form.
    pub fn encode(&self) -> Result<String, ProtoError> {
        // Pinned relays only: the versions every peer reads.
        let pins: Option<Vec<RelayWire<'_>>> = self
            .relays()
            .map(|(addr, trust)| {
                Some(RelayWire {
                    addr,
                    fingerprint: trust.pinned()?,
                })
            })
            .collect();
        let trusted = || -> Vec<TrustedRelayWire<'_>> {
            self.relays()
                .map(|(addr, trust)| TrustedRelayWire { addr, trust })
                .collect()
        };
        let alone = self.other_relays.is_empty();
        let body = match (&self.secret, pins) {
            (JoinSecret::Fleet(s), Some(mut pins)) if alone => {
                let only = pins.remove(0);
                codec::encode_body(&FleetWire {
                    version: 1,
                    addr: only.addr,
                    fingerprint: only.fingerprint,
                    secret: *s.expose(),
                })?
            }
            (JoinSecret::Fleet(s), Some(relays)) => codec::encode_body(&FleetOfRelaysWire {
                version: 3,
                relays,
                secret: *s.expose(),
            })?,
            (JoinSecret::Fleet(s), None) => codec::encode_body(&FleetOfTrustedRelaysWire {
                version: 5,
                relays: trusted(),
                secret: *s.expose(),
            })?,
            (
                JoinSecret::Invite {
                    instance_id,
                    secret,
                },
                Some(mut pins),
            ) if alone => {
                let only = pins.remove(0);
                codec::encode_body(&InviteWire {
                    version: 2,
                    addr: only.addr,
                    fingerprint: only.fingerprint,
                    instance_id,
                    secret: *secret.expose(),
                })?
            }
            (
                JoinSecret::Invite {
                    instance_id,
                    secret,
                },
                Some(relays),
            ) => codec::encode_body(&InviteOfRelaysWire {
                version: 4,
                relays,
                instance_id,
                secret: *secret.expose(),
            })?,
            (
                JoinSecret::Invite {
                    instance_id,
                    secret,
                },
                None,
            ) => codec::encode_body(&InviteOfTrustedRelaysWire {
                version: 6,
                relays: trusted(),
                instance_id,
                secret: *secret.expose(),
            })?,
        };
        Ok(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body)
        ))
    }

    /// Every relay the token lists, the first to dial first: `addr` and
    /// `trust`, then [`JoinToken::other_relays`].
    pub fn relays(&self) -> impl Iterator<Item = (&str, RelayTrust)> {
        std::iter::once((self.addr.as_str(), self.trust))
            .chain(self.other_relays.iter().map(|r| (r.addr.as_str(), r.trust)))
    }

    /// The first relay's pinned fingerprint (`None` when a CA vouches for
    /// it).
    pub fn pinned(&self) -> Option<[u8; 32]> {
        self.trust.pinned()
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
        if rest.len() > MAX_TEXT_LEN {
            return Err(ProtoError::BadJoinToken("it is too long"));
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(rest)
            .map_err(|_| ProtoError::BadJoinToken("it is not valid base64url (truncated?)"))?;
        let undecodable = ProtoError::BadJoinToken("its contents do not decode (truncated?)");
        let invite = |instance_id: &str, secret: [u8; 32]| {
            crate::check_id(instance_id)
                .map_err(|_| ProtoError::BadJoinToken("its instance id is not valid"))?;
            Ok(JoinSecret::Invite {
                instance_id: instance_id.to_owned(),
                secret: FleetSecret::from_bytes(secret),
            })
        };
        let pinned = |relays: Vec<RelayWire<'_>>| -> Vec<(String, RelayTrust)> {
            relays
                .into_iter()
                .map(|r| (r.addr.to_owned(), RelayTrust::Pinned(r.fingerprint)))
                .collect()
        };
        let trusted = |relays: Vec<TrustedRelayWire<'_>>| -> Vec<(String, RelayTrust)> {
            relays
                .into_iter()
                .map(|r| (r.addr.to_owned(), r.trust))
                .collect()
        };
        let (relays, secret) = match bytes.first() {
            Some(1) => {
                let w: FleetWire<'_> = codec::decode(&bytes).map_err(|_| undecodable)?;
                (
                    vec![(w.addr.to_owned(), RelayTrust::Pinned(w.fingerprint))],
                    JoinSecret::Fleet(FleetSecret::from_bytes(w.secret)),
                )
            }
            Some(2) => {
                let w: InviteWire<'_> = codec::decode(&bytes).map_err(|_| undecodable)?;
                (
                    vec![(w.addr.to_owned(), RelayTrust::Pinned(w.fingerprint))],
                    invite(w.instance_id, w.secret)?,
                )
            }
            Some(3) => {
                let w: FleetOfRelaysWire<'_> = codec::decode(&bytes).map_err(|_| undecodable)?;
                (
                    pinned(w.relays),
                    JoinSecret::Fleet(FleetSecret::from_bytes(w.secret)),
                )
            }
            Some(4) => {
                let w: InviteOfRelaysWire<'_> = codec::decode(&bytes).map_err(|_| undecodable)?;
                let secret = invite(w.instance_id, w.secret)?;
                (pinned(w.relays), secret)
            }
            Some(5) => {
                let w: FleetOfTrustedRelaysWire<'_> =
                    codec::decode(&bytes).map_err(|_| undecodable)?;
                (
                    trusted(w.relays),
                    JoinSecret::Fleet(FleetSecret::from_bytes(w.secret)),
                )
            }
            Some(6) => {
                let w: InviteOfTrustedRelaysWire<'_> =
                    codec::decode(&bytes).map_err(|_| undecodable)?;
                let secret = invite(w.instance_id, w.secret)?;
                (trusted(w.relays), secret)
            }
            Some(_) => {
                return Err(ProtoError::BadJoinToken(
                    "unsupported token version (made by a newer relay? upgrade agent-link)",
                ))
            }
            None => return Err(undecodable),
        };
        if relays.is_empty() || relays.len() > MAX_RELAYS {
            return Err(ProtoError::BadJoinToken(
                "it lists no relay, or more than 16",
            ));
        }
        let mut relays = relays.into_iter().map(|(addr, trust)| {
            if addr.is_empty() || addr.len() > MAX_ADDR_LEN || !addr.contains(':') {
                return Err(ProtoError::BadJoinToken(
                    "its relay address is not HOST:PORT",
                ));
            }
            Ok(RelayEndpoint { addr, trust })
        });
        let first = relays.next().expect("one relay at least, checked above")?;
        Ok(Self {
            addr: first.addr,
            trust: first.trust,
            secret,
            other_relays: relays.collect::<Result<_, _>>()?,
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
        assert_eq!(back.trust, t.trust);
        assert_eq!(back.other_relays, t.other_relays);
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
            trust: RelayTrust::Pinned([3; 32]),
            secret: JoinSecret::Fleet(FleetSecret::from_bytes([4; 32])),
            other_relays: vec![],
        });
        check_round_trip(&JoinToken {
            addr: "127.0.0.1:8765".into(),
            trust: RelayTrust::Pinned([3; 32]),
            secret: JoinSecret::Invite {
                instance_id: "instance-007".into(),
                secret: FleetSecret::from_bytes([4; 32]),
            },
            other_relays: vec![RelayEndpoint {
                addr: "127.0.0.1:8766".into(),
                trust: RelayTrust::Pinned([5; 32]),
            }],
        });
        check_round_trip(&JoinToken {
            addr: "127.0.0.1:8765".into(),
            trust: RelayTrust::Pinned([3; 32]),
            secret: JoinSecret::Invite {
                instance_id: "instance-007".into(),
                secret: FleetSecret::from_bytes([4; 32]),
            },
            other_relays: vec![],
        });
    }

    #[test]
    fn a_relay_a_ca_vouches_for_takes_versions_5_and_6() {
        let ca = |secret| JoinToken {
            addr: "relay.example.org:4433".into(),
            trust: RelayTrust::Ca,
            secret,
            other_relays: vec![RelayEndpoint {
                addr: "127.0.0.1:8766".into(),
                trust: RelayTrust::Pinned([5; 32]),
            }],
        };
        let fleet = ca(JoinSecret::Fleet(FleetSecret::from_bytes([4; 32])));
        let invite = ca(JoinSecret::Invite {
            instance_id: "i-1".into(),
            secret: FleetSecret::from_bytes([4; 32]),
        });
        for (t, version) in [(&fleet, 5u8), (&invite, 6)] {
            check_round_trip(t);
            let text = t.encode().unwrap();
            let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&text[PREFIX.len()..])
                .unwrap();
            assert_eq!(body[0], version);
        }
        // A CA relay alone still needs version 5/6 (1 and 2 carry a pin).
        let mut alone = fleet.clone();
        alone.other_relays.clear();
        check_round_trip(&alone);
        assert_eq!(
            JoinToken::parse(&alone.encode().unwrap()).unwrap().pinned(),
            None
        );
        // The config spelling.
        for t in [RelayTrust::Ca, RelayTrust::Pinned([0xab; 32])] {
            assert_eq!(RelayTrust::from_config(&t.to_config()), Some(t));
        }
        for bad in ["", "CA", "ab", &"zz".repeat(32), &"ab".repeat(33)] {
            assert_eq!(RelayTrust::from_config(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_invite_with_a_bad_id_or_an_unknown_version_is_refused() {
        let bad = JoinToken {
            addr: "127.0.0.1:8765".into(),
            trust: RelayTrust::Pinned([3; 32]),
            secret: JoinSecret::Invite {
                instance_id: "a b".into(),
                secret: FleetSecret::from_bytes([4; 32]),
            },
            other_relays: vec![],
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

    fn wrap(body: Vec<u8>) -> String {
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body)
        )
    }

    #[test]
    fn a_fleet_token_lists_one_to_sixteen_good_relays() {
        let relay = |addr| RelayWire {
            addr,
            fingerprint: [1; 32],
        };
        let token = |relays: Vec<RelayWire<'_>>| {
            wrap(
                codec::encode_body(&FleetOfRelaysWire {
                    version: 3,
                    relays,
                    secret: [2; 32],
                })
                .unwrap(),
            )
        };
        let sixteen: Vec<_> = (0..16).map(|_| relay("h:1")).collect();
        let t = JoinToken::parse(&token(sixteen)).unwrap();
        assert_eq!(t.relays().count(), 16);
        for bad in [
            vec![],
            (0..17).map(|_| relay("h:1")).collect(),
            vec![relay("h:1"), relay("no-port")],
        ] {
            assert!(JoinToken::parse(&token(bad)).is_err());
        }
    }
}
