//! The data an application sees: messages it received, receipts for what it
//! sent, and the id both carry.

use bytes::Bytes;

/// A message id: 16 random bytes, printed as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 16]);

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// A message delivered to an agent, already verified (fleet tag, the
/// sender's pinned key and strict signature, timestamp, replay window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Message id.
    pub id: MessageId,
    /// Sender, `instance/agent`.
    pub from: String,
    /// Recipient (this agent), `instance/agent`.
    pub to: String,
    /// Sender's clock, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// The payload.
    pub payload: Bytes,
}

/// Proof of delivery: the receiving agent verified the message and its
/// application took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Message id.
    pub id: MessageId,
    /// The agent that received it, `instance/agent`.
    pub to: String,
    /// Receiver's clock when its application took the message, ms since the
    /// Unix epoch.
    pub delivered_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_as_hex() {
        let mut id = [0u8; 16];
        id[0] = 0xab;
        id[15] = 0x01;
        assert_eq!(
            MessageId(id).to_string(),
            "ab000000000000000000000000000001"
        );
    }
}
