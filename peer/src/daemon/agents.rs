//! The agents registered at this instance: `DIR/agents.json` (0600), read
//! when the daemon starts and rewritten atomically on every change, so an
//! agent stays registered across restarts. `agent add` edits the file
//! itself when no daemon runs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name inside the peer directory.
pub const AGENTS_FILE: &str = "agents.json";

/// Agent names that start with this are the daemon's own (read receipts).
pub(crate) const RESERVED_PREFIX: char = '.';

/// One registered agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// The agent id.
    pub agent: String,
    /// Where to POST `{agent, id, from}` when a message lands (loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
}

/// `agents.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsFile {
    /// Registered agents, in the order they were added.
    pub agents: Vec<AgentEntry>,
}

/// Why an agent entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// Not a valid agent id, or a reserved one.
    #[error("invalid agent {agent:?}: {reason}")]
    BadAgent {
        /// As given.
        agent: String,
        /// Why.
        reason: String,
    },
    /// A notify URL that is not plain http to a loopback address.
    #[error("invalid --notify-url {url:?}: {reason}")]
    BadNotifyUrl {
        /// As given.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// The file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Check an agent id for local registration.
pub fn check_agent(agent: &str) -> Result<(), AgentError> {
    agent_link_proto::check_id(agent).map_err(|e| AgentError::BadAgent {
        agent: agent.chars().take(80).collect(),
        reason: e.to_string(),
    })?;
    if agent.starts_with(RESERVED_PREFIX) {
        return Err(AgentError::BadAgent {
            agent: agent.to_string(),
            reason: "names that start with '.' are reserved for the daemon".into(),
        });
    }
    Ok(())
}

/// A notify URL: `http://` to `127.0.0.1`, `[::1]` or `localhost`, with a port;
/// nothing else (the daemon must not become a way to reach other hosts).
pub fn check_notify_url(url: &str) -> Result<NotifyTarget, AgentError> {
    let bad = |reason| AgentError::BadNotifyUrl {
        url: url.chars().take(200).collect(),
        reason,
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// to a loopback address is allowed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(bad("no user info"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once("]:")
            .ok_or_else(|| bad("a port is required"))?;
        (h, p)
    } else {
        authority
            .rsplit_once(':')
            .ok_or_else(|| bad("a port is required"))?
    };
    let port: u16 = port.parse().map_err(|_| bad("the port must be a number"))?;
    let ip: std::net::IpAddr = match host {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        h => h
            .parse()
            .map_err(|_| bad("the host must be 127.0.0.1, [::1] or localhost"))?,
    };
    if !ip.is_loopback() {
        return Err(bad("the host must be a loopback address"));
    }
    if path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(bad("the path has spaces or control characters"));
    }
    Ok(NotifyTarget {
        addr: std::net::SocketAddr::new(ip, port),
        host: authority.to_string(),
        path: path.to_string(),
    })
}

/// Where a notification goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyTarget {
    /// The loopback address to connect to.
    pub addr: std::net::SocketAddr,
    /// The `Host` header.
    pub host: String,
    /// The request path.
    pub path: String,
}

impl AgentsFile {
    /// The file's path in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(AGENTS_FILE)
    }

    /// Read `DIR/agents.json` (none yet: no agents).
    pub fn load(dir: &Path) -> Result<Self, AgentError> {
        let path = Self::path(dir);
        let file_err = |reason: String| AgentError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(file_err(e.to_string())),
        };
        let f: Self = serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        for a in &f.agents {
            check_agent(&a.agent).map_err(|e| file_err(e.to_string()))?;
            if let Some(u) = &a.notify_url {
                check_notify_url(u).map_err(|e| file_err(e.to_string()))?;
            }
        }
        Ok(f)
    }

    /// Write it back atomically (0600).
    pub fn save(&self, dir: &Path) -> Result<(), AgentError> {
        let path = Self::path(dir);
        let json = serde_json::to_vec_pretty(self).expect("an agents file always serialises");
        agent_link_crypto::files::write_atomic(&path, &json, 0o600).map_err(|e| AgentError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Add or update `agent`; whether it was new.
    pub fn upsert(&mut self, entry: AgentEntry) -> bool {
        match self.agents.iter_mut().find(|a| a.agent == entry.agent) {
            Some(a) => {
                *a = entry;
                false
            }
            None => {
                self.agents.push(entry);
                true
            }
        }
    }

    /// Remove `agent`; whether it was there.
    pub fn remove(&mut self, agent: &str) -> bool {
        let before = self.agents.len();
        self.agents.retain(|a| a.agent != agent);
        self.agents.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_urls_are_loopback_http_only() {
        let t = check_notify_url("http://127.0.0.1:8080/hooks/agent?x=1").unwrap();
        assert_eq!(t.addr.port(), 8080);
        assert_eq!(t.path, "/hooks/agent?x=1");
        assert!(check_notify_url("http://[::1]:9/").is_ok());
        assert_eq!(check_notify_url("http://localhost:9").unwrap().path, "/");
        for bad in [
            "https://127.0.0.1:1/",
            "http://10.0.0.1:80/",
            "http://example.com:80/",
            "http://127.0.0.1/",
            "http://user@127.0.0.1:80/",
            "http://127.0.0.1:99999/",
            "http://127.0.0.1:80/a b",
            "ftp://127.0.0.1:21/",
        ] {
            assert!(check_notify_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reserved_and_invalid_agents_are_refused() {
        assert!(check_agent("xiaobaozi").is_ok());
        for bad in [".read", "", "a/b", "../x", &"a".repeat(65)] {
            assert!(check_agent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_file_round_trips_and_refuses_junk() {
        let d = tempfile::tempdir().unwrap();
        let mut f = AgentsFile::load(d.path()).unwrap();
        assert!(f.agents.is_empty());
        assert!(f.upsert(AgentEntry {
            agent: "bob".into(),
            notify_url: None
        }));
        assert!(!f.upsert(AgentEntry {
            agent: "bob".into(),
            notify_url: Some("http://127.0.0.1:1/".into())
        }));
        f.save(d.path()).unwrap();
        assert_eq!(AgentsFile::load(d.path()).unwrap(), f);
        assert!(f.remove("bob") && !f.remove("bob"));
        std::fs::write(
            AgentsFile::path(d.path()),
            r#"{"agents":[{"agent":"../x"}]}"#,
        )
        .unwrap();
        assert!(AgentsFile::load(d.path()).is_err());
    }
}
