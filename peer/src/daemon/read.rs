//! Read receipts (DESIGN.md: "read means acked"), carried as ordinary
//! messages between the daemons' own agent `.read`, so they are tagged,
//! signed and verified like any other and the relay needs no change:
//! - the sender's daemon, once the delivery receipt is in, sends
//!   `{"type":"read_request","agent":A,"id":ID}` to `TARGET/.read`;
//! - the target's daemon remembers it (only from the instance that sent
//!   message ID to agent A) and, when A acks ID — or at once if it already
//!   did — answers `{"type":"read","agent":A,"id":ID,"read_at":MS}` to
//!   `SENDER/.read`;
//! - the sender's daemon accepts it only from the instance the message
//!   went to, for the agent it went to.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::store::{hex_id, parse_id, Id};

/// The daemon's own agent for read notes.
pub(crate) const READ_AGENT: &str = ".read";

/// One note between daemons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadNote {
    /// Tell me when `agent` reads `id`.
    Request { agent: String, id: Id },
    /// `agent` read `id` at `read_at` (Unix ms).
    Read { agent: String, id: Id, read_at: u64 },
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Wire {
    ReadRequest {
        agent: String,
        id: String,
    },
    Read {
        agent: String,
        id: String,
        read_at: u64,
    },
}

impl ReadNote {
    pub(crate) fn request(agent: &str, id: &Id) -> Self {
        Self::Request {
            agent: agent.to_string(),
            id: *id,
        }
    }

    pub(crate) fn read(agent: &str, id: &Id, read_at: u64) -> Self {
        Self::Read {
            agent: agent.to_string(),
            id: *id,
            read_at,
        }
    }

    pub(crate) fn encode(&self) -> Bytes {
        let w = match self {
            Self::Request { agent, id } => Wire::ReadRequest {
                agent: agent.clone(),
                id: hex_id(id),
            },
            Self::Read { agent, id, read_at } => Wire::Read {
                agent: agent.clone(),
                id: hex_id(id),
                read_at: *read_at,
            },
        };
        Bytes::from(serde_json::to_vec(&w).expect("a read note always serialises"))
    }

    pub(crate) fn parse(payload: &[u8]) -> Option<Self> {
        if payload.len() > 512 {
            return None;
        }
        Some(match serde_json::from_slice::<Wire>(payload).ok()? {
            Wire::ReadRequest { agent, id } => Self::Request {
                agent,
                id: parse_id(&id)?,
            },
            Wire::Read { agent, id, read_at } => Self::Read {
                agent,
                id: parse_id(&id)?,
                read_at,
            },
        })
    }
}

struct Wait {
    instance: String,
    agent: String,
    tx: oneshot::Sender<u64>,
}

/// Read receipts waited for (sender side) and asked for (target side).
#[derive(Default)]
pub(crate) struct Reads {
    waits: Mutex<HashMap<Id, Wait>>,
    /// (agent, id) → the instance that asked.
    wants: Mutex<HashMap<(String, Id), String>>,
}

/// Requests remembered at most (a peer could ask about many ids).
const MAX_WANTS: usize = 100_000;

impl Reads {
    /// Wait for `agent` at `instance` to read `id`.
    pub(crate) fn wait(&self, id: Id, instance: &str, agent: &str) -> oneshot::Receiver<u64> {
        let (tx, rx) = oneshot::channel();
        self.waits.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Wait {
                instance: instance.to_string(),
                agent: agent.to_string(),
                tx,
            },
        );
        rx
    }

    pub(crate) fn cancel(&self, id: &Id) {
        self.waits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// A read receipt from `instance`: it resolves a wait only if that is
    /// where the message went.
    pub(crate) fn resolve(&self, id: &Id, instance: &str, agent: &str, read_at: u64) {
        let mut waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
        let matches = waits
            .get(id)
            .is_some_and(|w| w.instance == instance && w.agent == agent);
        if matches {
            if let Some(w) = waits.remove(id) {
                let _ = w.tx.send(read_at);
            }
        }
    }

    pub(crate) fn want(&self, agent: &str, id: Id, requester: &str) {
        let mut wants = self.wants.lock().unwrap_or_else(|e| e.into_inner());
        if wants.len() < MAX_WANTS {
            wants.insert((agent.to_string(), id), requester.to_string());
        }
    }

    pub(crate) fn take_want(&self, agent: &str, id: &Id) -> Option<String> {
        self.wants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(agent.to_string(), *id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_junk_is_ignored() {
        for n in [
            ReadNote::request("bob", &[3; 16]),
            ReadNote::read("bob", &[3; 16], 77),
        ] {
            assert_eq!(ReadNote::parse(&n.encode()), Some(n));
        }
        for junk in [
            &b"{}"[..],
            b"hello",
            br#"{"type":"read","agent":"b","id":"../x","read_at":1}"#,
        ] {
            assert_eq!(ReadNote::parse(junk), None);
        }
    }

    #[test]
    fn a_read_receipt_counts_only_from_where_the_message_went() {
        let r = Reads::default();
        let mut rx = r.wait([1; 16], "inst-b", "bob");
        r.resolve(&[1; 16], "inst-evil", "bob", 5);
        r.resolve(&[1; 16], "inst-b", "eve", 5);
        assert!(rx.try_recv().is_err(), "not from another instance or agent");
        r.resolve(&[1; 16], "inst-b", "bob", 9);
        assert_eq!(rx.try_recv(), Ok(9));
    }
}
