//! Which relay holds which receiving agent, as one relay sees the fleet's
//! [`super::ATTACH_BUCKET`]: pure bookkeeping, no I/O (the server's cluster
//! tasks do the puts, deletes and the watch, and carry out what it says).
//!
//! Each receiving attach on this relay is put under `<hex instance>.<hex
//! agent>` with this relay's id; the bucket's revision orders attaches
//! cluster-wide, so "the newest attach wins" means the highest revision
//! wins. A relay whose own attach is overtaken by a higher revision from
//! another relay replaces its stream (`Replaced`, as on one relay). Its
//! own put may still be in flight when the other relay's entry is seen:
//! then the decision waits for the put's revision ([`AttachTable::put_done`]).

use std::collections::HashMap;
use std::sync::Arc;

type Agent = (String, String);

#[derive(Debug, Clone)]
struct Holder {
    relay: Arc<str>,
    revision: u64,
}

#[derive(Debug, Clone, Copy)]
struct Local {
    token: u64,
    /// The revision of this relay's put; `None` while it is in flight.
    revision: Option<u64>,
}

/// The attach table of one relay.
#[derive(Debug)]
pub struct AttachTable {
    relay_id: Arc<str>,
    holders: HashMap<Agent, Holder>,
    local: HashMap<Agent, Local>,
}

/// The KV key of an agent's attach.
pub fn key(instance: &str, agent: &str) -> String {
    format!("{}.{}", super::token(instance), super::token(agent))
}

/// The agent a KV key names.
pub fn parse_key(key: &str) -> Option<(String, String)> {
    let (i, a) = key.split_once('.')?;
    Some((super::untoken(i)?, super::untoken(a)?))
}

/// The value of an attach entry.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct AttachValue {
    /// The relay holding the receiving stream.
    pub relay: String,
}

impl AttachTable {
    /// The table of the relay `relay_id`, empty.
    pub fn new(relay_id: &str) -> Self {
        Self {
            relay_id: Arc::from(relay_id),
            holders: HashMap::new(),
            local: HashMap::new(),
        }
    }

    /// The relay to forward a message for `instance/agent` to, when another
    /// relay holds it.
    pub fn remote_holder(&self, instance: &str, agent: &str) -> Option<Arc<str>> {
        // One lookup per message that found no local route: the key is
        // built only then.
        let h = self
            .holders
            .get(&(instance.to_string(), agent.to_string()))?;
        (h.relay != self.relay_id).then(|| h.relay.clone())
    }

    /// The stream `token` became this relay's receiving stream for the
    /// agent; its put is about to be sent.
    pub fn local_attached(&mut self, instance: &str, agent: &str, token: u64) {
        self.local.insert(
            (instance.to_string(), agent.to_string()),
            Local {
                token,
                revision: None,
            },
        );
    }

    /// The put for `token`'s attach was stored at `revision`. Returns the
    /// token to replace when another relay's attach got a higher revision
    /// meanwhile.
    pub fn put_done(
        &mut self,
        instance: &str,
        agent: &str,
        token: u64,
        revision: u64,
    ) -> Option<u64> {
        let k = (instance.to_string(), agent.to_string());
        let local = self.local.get_mut(&k).filter(|l| l.token == token)?;
        local.revision = Some(revision);
        let newer = self
            .holders
            .get(&k)
            .is_some_and(|h| h.revision > revision && h.relay != self.relay_id);
        if newer {
            self.local.remove(&k);
            return Some(token);
        }
        None
    }

    /// The watch saw `relay` attach the agent at `revision`. Returns the
    /// local stream's token to replace when this overtakes it.
    pub fn seen_put(
        &mut self,
        instance: &str,
        agent: &str,
        relay: &str,
        revision: u64,
    ) -> Option<u64> {
        let k = (instance.to_string(), agent.to_string());
        let relay: Arc<str> = if *relay == *self.relay_id {
            self.relay_id.clone()
        } else {
            Arc::from(relay)
        };
        let other = relay != self.relay_id;
        if self.holders.get(&k).is_none_or(|h| h.revision < revision) {
            self.holders.insert(k.clone(), Holder { relay, revision });
        }
        let local = self.local.get(&k)?;
        if other && local.revision.is_some_and(|r| r < revision) {
            let token = local.token;
            self.local.remove(&k);
            return Some(token);
        }
        None
    }

    /// Whether the stream `token` is this relay's receiving stream for the
    /// agent.
    pub fn holds(&self, instance: &str, agent: &str, token: u64) -> bool {
        self.local
            .get(&(instance.to_string(), agent.to_string()))
            .is_some_and(|l| l.token == token)
    }

    /// The watch saw the agent's entry deleted at `revision`.
    pub fn seen_delete(&mut self, instance: &str, agent: &str, revision: u64) {
        let k = (instance.to_string(), agent.to_string());
        if self.holders.get(&k).is_some_and(|h| h.revision < revision) {
            self.holders.remove(&k);
        }
    }

    /// The stream `token` stopped receiving for the agent. Returns the
    /// revision to delete the entry at, when the entry is still this
    /// stream's (`Some(None)`: its put is still in flight; the caller
    /// deletes when it lands).
    pub fn local_detached(
        &mut self,
        instance: &str,
        agent: &str,
        token: u64,
    ) -> Option<Option<u64>> {
        let k = (instance.to_string(), agent.to_string());
        let l = self.local.get(&k).filter(|l| l.token == token)?;
        let revision = l.revision;
        self.local.remove(&k);
        Some(revision)
    }

    /// Entries that name this relay but hold no stream here (left by an
    /// earlier run of it that died): to delete, with their revisions.
    pub fn stale_own(&self) -> Vec<(String, String, u64)> {
        self.holders
            .iter()
            .filter(|(k, h)| h.relay == self.relay_id && !self.local.contains_key(*k))
            .map(|((i, a), h)| (i.clone(), a.clone(), h.revision))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_higher_revision_wins_whichever_order_things_arrive_in() {
        // r1 attached first (rev 5), r2 later (rev 6): r1 replaces its stream.
        let mut r1 = AttachTable::new("r1");
        r1.local_attached("i", "a", 11);
        assert_eq!(r1.put_done("i", "a", 11, 5), None);
        assert_eq!(r1.seen_put("i", "a", "r1", 5), None, "its own echo");
        assert_eq!(r1.remote_holder("i", "a"), None, "held here");
        assert_eq!(r1.seen_put("i", "a", "r2", 6), Some(11));
        assert_eq!(r1.remote_holder("i", "a").as_deref(), Some("r2"));
        // r2's view: r1's older entry arrives while r2's own put is in
        // flight; nothing happens, and when the put lands r2 keeps it.
        let mut r2 = AttachTable::new("r2");
        r2.local_attached("i", "a", 22);
        assert_eq!(r2.seen_put("i", "a", "r1", 5), None);
        assert_eq!(r2.put_done("i", "a", 22, 6), None);
        assert_eq!(r2.seen_put("i", "a", "r2", 6), None);
        assert_eq!(r2.remote_holder("i", "a"), None);
    }

    #[test]
    fn an_attach_overtaken_while_its_put_was_in_flight_is_replaced_when_it_lands() {
        let mut r1 = AttachTable::new("r1");
        r1.local_attached("i", "a", 11);
        assert_eq!(
            r1.seen_put("i", "a", "r2", 9),
            None,
            "own revision unknown yet"
        );
        assert_eq!(r1.put_done("i", "a", 11, 8), Some(11));
        assert_eq!(r1.local_detached("i", "a", 11), None, "already gone");
    }

    #[test]
    fn detaching_deletes_only_its_own_entry_and_deletes_drop_only_older_holders() {
        let mut t = AttachTable::new("r1");
        t.local_attached("i", "a", 1);
        assert_eq!(t.local_detached("i", "a", 2), None, "another stream's");
        assert_eq!(t.local_detached("i", "a", 1), Some(None), "put in flight");
        t.local_attached("i", "a", 3);
        t.put_done("i", "a", 3, 4);
        assert_eq!(t.local_detached("i", "a", 3), Some(Some(4)));
        t.seen_put("i", "b", "r2", 10);
        t.seen_delete("i", "b", 9);
        assert!(t.remote_holder("i", "b").is_some(), "an older delete");
        t.seen_delete("i", "b", 11);
        assert!(t.remote_holder("i", "b").is_none());
    }

    #[test]
    fn entries_of_an_earlier_run_are_stale() {
        let mut t = AttachTable::new("r1");
        t.seen_put("i", "a", "r1", 3);
        t.seen_put("i", "b", "r2", 4);
        t.local_attached("i", "c", 1);
        t.seen_put("i", "c", "r1", 5);
        assert_eq!(t.stale_own(), vec![("i".into(), "a".into(), 3)]);
        assert_eq!(
            parse_key(&key("i.1", "x")),
            Some(("i.1".into(), "x".into()))
        );
        assert_eq!(parse_key("zz.00"), None);
    }
}
