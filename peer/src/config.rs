//! The peer directory: `agent-link-config.json` (no secrets: the old tool
//! kept its shared secret there and the security review said no),
//! `instance.key` and `fleet.secret` (0600), `known_instances.json`.

use std::path::{Path, PathBuf};

use agent_link_proto::RelayTrust;
use serde::{Deserialize, Serialize};

use crate::error::LinkError;

/// File names inside the peer directory.
pub const CONFIG_FILE: &str = "agent-link-config.json";
/// The instance's private key (0600).
pub const KEY_FILE: &str = "instance.key";
/// The fleet secret (0600).
pub const SECRET_FILE: &str = "fleet.secret";
/// Pinned public keys of other instances.
pub const PINS_FILE: &str = "known_instances.json";

fn default_true() -> bool {
    true
}
fn default_timeout() -> u64 {
    30
}
fn default_inbox_max_messages() -> usize {
    10_000
}
fn default_inbox_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_inbox_ttl_secs() -> u64 {
    7 * 24 * 3600
}

/// `agent-link-config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Relay address, `host:port`.
    pub relay_url: String,
    /// How the relay is known: the SHA-256 fingerprint of its certificate,
    /// 64 hex digits, or `ca` when it presents a CA-issued chain for the
    /// host of `relay_url` (checked against `relay_ca_file`, else the
    /// system's CA roots).
    pub relay_fingerprint: String,
    /// PEM CA certificates to check `ca` relays against instead of the
    /// system's roots (a path relative to the directory, or absolute;
    /// `init --relay-ca-file` copies the file in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_ca_file: Option<String>,
    /// This instance's id.
    pub instance_id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// Reconnect by itself when the relay goes away.
    #[serde(default = "default_true")]
    pub auto_reconnect: bool,
    /// Default deadline of a send, seconds.
    #[serde(default = "default_timeout")]
    pub send_timeout_secs: u64,
    /// Strict pins: deliver only from instances whose key is pinned
    /// already (`agent-link trust`); refuse every other sender with
    /// `KeyChanged` instead of pinning its key on first contact. Closes the
    /// relay's one chance to pick a sender's key (SECURITY.md).
    #[serde(default)]
    pub strict_pins: bool,
    /// The daemon: waiting messages per agent inbox at most; over it a
    /// sender gets `InboxFull`.
    #[serde(default = "default_inbox_max_messages")]
    pub inbox_max_messages: usize,
    /// The daemon: waiting payload bytes per agent inbox at most.
    #[serde(default = "default_inbox_max_bytes")]
    pub inbox_max_bytes: u64,
    /// The daemon: a message nobody read in this many seconds is removed
    /// (counted in `status`).
    #[serde(default = "default_inbox_ttl_secs")]
    pub inbox_ttl_secs: u64,
    /// The daemon's local API: uids besides the daemon's own and root that
    /// may use its socket (checked by the socket's peer credentials).
    #[serde(default)]
    pub local_api_uids: Vec<u32>,
    /// The fleet's other relays, from the join token: tried in turn when
    /// `relay_url` cannot be reached or goes away (DESIGN.md, "A fleet of
    /// relays"). Empty for a relay alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_relays: Vec<OtherRelay>,
}

/// One of `other_relays` in `agent-link-config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtherRelay {
    /// Relay address, `host:port`.
    pub relay_url: String,
    /// Its certificate's fingerprint, 64 hex digits, or `ca` (see
    /// [`PeerConfig::relay_fingerprint`]).
    pub relay_fingerprint: String,
}

fn check_relay(url: &str, fingerprint: &str) -> Result<RelayTrust, &'static str> {
    if !url.contains(':') || url.len() > 255 {
        return Err("relay_url");
    }
    RelayTrust::from_config(fingerprint).ok_or("relay_fingerprint")
}

impl PeerConfig {
    /// A config for `instance_id` at the relay `relay_url` (its certificate
    /// fingerprint in hex), every other field at its default.
    pub fn new(relay_url: &str, relay_fingerprint: &str, instance_id: &str, name: &str) -> Self {
        Self {
            relay_url: relay_url.to_string(),
            relay_fingerprint: relay_fingerprint.to_string(),
            relay_ca_file: None,
            instance_id: instance_id.to_string(),
            name: name.to_string(),
            auto_reconnect: true,
            send_timeout_secs: default_timeout(),
            strict_pins: false,
            inbox_max_messages: default_inbox_max_messages(),
            inbox_max_bytes: default_inbox_max_bytes(),
            inbox_ttl_secs: default_inbox_ttl_secs(),
            local_api_uids: Vec::new(),
            other_relays: Vec::new(),
        }
    }

    /// A config for `instance_id` of the fleet `join` lists, its relays in
    /// the token's order.
    pub fn for_join(join: &agent_link_proto::JoinToken, instance_id: &str, name: &str) -> Self {
        let mut c = Self::new(&join.addr, &join.trust.to_config(), instance_id, name);
        c.other_relays = join
            .other_relays
            .iter()
            .map(|r| OtherRelay {
                relay_url: r.addr.clone(),
                relay_fingerprint: r.trust.to_config(),
            })
            .collect();
        c
    }

    /// Every relay to dial, `relay_url` first, with how it is known (the
    /// config is validated: every entry decodes).
    pub fn relays(&self) -> Vec<(String, RelayTrust)> {
        std::iter::once((&self.relay_url, &self.relay_fingerprint))
            .chain(
                self.other_relays
                    .iter()
                    .map(|r| (&r.relay_url, &r.relay_fingerprint)),
            )
            .filter_map(|(u, f)| Some((u.clone(), check_relay(u, f).ok()?)))
            .collect()
    }

    /// Read and validate `DIR/agent-link-config.json`.
    pub fn load(dir: &Path) -> Result<Self, LinkError> {
        let path = dir.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let reason = format!(
                    "not found: is {} an agent-link directory? Run `agent-link init --dir {}` first",
                    dir.display(),
                    dir.display()
                );
                return Err(LinkError::config(path, None, reason));
            }
            Err(e) => return Err(LinkError::config(path, None, e.to_string())),
        };
        // A directory others can change is not ours to trust (they could
        // point its config at their own relay).
        agent_link_crypto::files::check_private_dir(dir)?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| LinkError::config(path.clone(), None, e.to_string()))?;
        cfg.validate()
            .map_err(|(field, reason)| LinkError::config(path, Some(field), reason))?;
        Ok(cfg)
    }

    /// Check every field; the error names it (and says what is wrong).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        match check_relay(&self.relay_url, &self.relay_fingerprint) {
            Ok(_) => {}
            Err("relay_url") => {
                return Err(("relay_url", "field `relay_url` must be HOST:PORT".into()))
            }
            Err(_) => {
                return Err((
                    "relay_fingerprint",
                    "field `relay_fingerprint` must be 64 hex digits, or `ca`".into(),
                ))
            }
        }
        for (i, r) in self.other_relays.iter().enumerate() {
            if let Err(field) = check_relay(&r.relay_url, &r.relay_fingerprint) {
                let what = if field == "relay_url" {
                    "HOST:PORT"
                } else {
                    "64 hex digits, or `ca`"
                };
                return Err((
                    "other_relays",
                    format!("field `other_relays`: entry {i}'s `{field}` must be {what}"),
                ));
            }
        }
        if self.other_relays.len() >= agent_link_proto::MAX_RELAYS {
            return Err((
                "other_relays",
                format!(
                    "field `other_relays` lists more than {} relays",
                    agent_link_proto::MAX_RELAYS - 1
                ),
            ));
        }
        agent_link_proto::check_id(&self.instance_id)
            .map_err(|e| ("instance_id", format!("field `instance_id`: {e}")))?;
        if !(1..=3600).contains(&self.send_timeout_secs) {
            return Err((
                "send_timeout_secs",
                "field `send_timeout_secs` must be between 1 and 3600".into(),
            ));
        }
        if self.inbox_max_messages == 0 {
            return Err((
                "inbox_max_messages",
                "field `inbox_max_messages` must be at least 1".into(),
            ));
        }
        if self.inbox_ttl_secs == 0 {
            return Err((
                "inbox_ttl_secs",
                "field `inbox_ttl_secs` must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// How the first relay is known (`None` when `relay_fingerprint` does
    /// not decode).
    pub fn trust(&self) -> Option<RelayTrust> {
        RelayTrust::from_config(&self.relay_fingerprint)
    }

    /// `relay_ca_file` as a path (relative ones are in `dir`).
    pub fn ca_file(&self, dir: &Path) -> Option<PathBuf> {
        self.relay_ca_file.as_ref().map(|f| dir.join(f))
    }
}

/// The default peer directory: `$XDG_DATA_HOME/agent-link`, else
/// `~/.local/share/agent-link`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("agent-link");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/agent-link")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> PeerConfig {
        PeerConfig {
            relay_url: "127.0.0.1:8765".into(),
            relay_fingerprint: "ab".repeat(32),
            relay_ca_file: None,
            instance_id: "instance-001".into(),
            name: "one".into(),
            auto_reconnect: true,
            send_timeout_secs: 30,
            strict_pins: false,
            inbox_max_messages: 10,
            inbox_max_bytes: 1000,
            inbox_ttl_secs: 60,
            local_api_uids: vec![],
            other_relays: vec![],
        }
    }

    #[test]
    fn validation_names_the_field() {
        good().validate().unwrap();
        for (cfg, field) in [
            (
                PeerConfig {
                    relay_url: "nohost".into(),
                    ..good()
                },
                "relay_url",
            ),
            (
                PeerConfig {
                    relay_fingerprint: "zz".into(),
                    ..good()
                },
                "relay_fingerprint",
            ),
            (
                PeerConfig {
                    instance_id: "a/b".into(),
                    ..good()
                },
                "instance_id",
            ),
            (
                PeerConfig {
                    send_timeout_secs: 0,
                    ..good()
                },
                "send_timeout_secs",
            ),
            (
                PeerConfig {
                    other_relays: vec![OtherRelay {
                        relay_url: "127.0.0.1:1".into(),
                        relay_fingerprint: "00".into(),
                    }],
                    ..good()
                },
                "other_relays",
            ),
        ] {
            let (named, reason) = cfg.validate().unwrap_err();
            assert_eq!(named, field);
            assert!(reason.contains(field));
        }
        assert_eq!(good().trust(), Some(RelayTrust::Pinned([0xab; 32])));
    }

    #[test]
    fn the_relays_come_in_the_tokens_order() {
        let join = agent_link_proto::JoinToken {
            addr: "127.0.0.1:1".into(),
            trust: RelayTrust::Pinned([1; 32]),
            secret: agent_link_proto::JoinSecret::Fleet(
                agent_link_crypto::FleetSecret::from_bytes([0; 32]),
            ),
            other_relays: vec![agent_link_proto::RelayEndpoint {
                addr: "relay.example.org:2".into(),
                trust: RelayTrust::Ca,
            }],
        };
        let c = PeerConfig::for_join(&join, "instance-001", "one");
        c.validate().unwrap();
        assert_eq!(
            c.relays(),
            [
                ("127.0.0.1:1".to_string(), RelayTrust::Pinned([1; 32])),
                ("relay.example.org:2".to_string(), RelayTrust::Ca)
            ]
        );
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(serde_json::from_value::<PeerConfig>(json).unwrap(), c);
        let alone =
            serde_json::to_value(PeerConfig::new("h:1", &"ab".repeat(32), "i", "i")).unwrap();
        assert!(
            alone.get("other_relays").is_none(),
            "a lone relay's config is as before"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = serde_json::to_value(good()).unwrap();
        v["secret"] = "oops".into();
        assert!(serde_json::from_value::<PeerConfig>(v).is_err());
    }
}
