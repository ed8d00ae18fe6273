//! The peer directory: `agent-link-config.json` (no secrets: the old tool
//! kept its shared secret there and the security review said no),
//! `instance.key` and `fleet.secret` (0600), `known_instances.json`.

use std::path::{Path, PathBuf};

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

/// `agent-link-config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Relay address, `host:port`.
    pub relay_url: String,
    /// SHA-256 fingerprint of the relay certificate, 64 hex digits.
    pub relay_fingerprint: String,
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
}

impl PeerConfig {
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
        if !self.relay_url.contains(':') || self.relay_url.len() > 255 {
            return Err(("relay_url", "field `relay_url` must be HOST:PORT".into()));
        }
        if self.fingerprint().is_err() {
            return Err((
                "relay_fingerprint",
                "field `relay_fingerprint` must be 64 hex digits".into(),
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
        Ok(())
    }

    /// The relay fingerprint as bytes.
    pub fn fingerprint(&self) -> Result<[u8; 32], hex::FromHexError> {
        let mut fp = [0u8; 32];
        hex::decode_to_slice(self.relay_fingerprint.trim(), &mut fp)?;
        Ok(fp)
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
            instance_id: "instance-001".into(),
            name: "one".into(),
            auto_reconnect: true,
            send_timeout_secs: 30,
            strict_pins: false,
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
        ] {
            let (named, reason) = cfg.validate().unwrap_err();
            assert_eq!(named, field);
            assert!(reason.contains(field));
        }
        assert_eq!(good().fingerprint().unwrap(), [0xab; 32]);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v = serde_json::to_value(good()).unwrap();
        v["secret"] = "oops".into();
        assert!(serde_json::from_value::<PeerConfig>(v).is_err());
    }
}
