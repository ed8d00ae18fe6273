//! The registry in the fleet's KV bucket ([`super::REGISTRY_BUCKET`]).
//!
//! Each record is its own key, so a registration writes a few hundred bytes
//! however large the fleet is:
//! - `id.<hex id>`: the [`InstanceRecord`] as JSON;
//! - `key.<hex public key>`: the id the key is registered as (its create
//!   fails when another id holds the key: one key, one id, cluster-wide);
//! - `invite.<hex id>`: the unredeemed [`Invite`] as JSON.
//!
//! A change is the same closure over a [`Registry`] that the file-backed
//! store runs (`Registry::register`, `revoke`, `redeem_invite`, …): applied
//! to a [`Replica`] read from the bucket, its effect is [`Replica::diff`]ed
//! into creates and revision-checked updates, and [`update`] commits them.
//! A create that finds the key taken, or an update whose revision moved,
//! means someone else changed the registry first: what this attempt created
//! is taken back, the replica is read again and the closure runs again on
//! it. That is how "first key wins" holds across relays: of two relays
//! registering one id, exactly one create succeeds, and the other's retry
//! sees the id taken.

use std::collections::HashMap;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{token, untoken, ClusterError, REGISTRY_BUCKET};
use crate::registry::{InstanceRecord, Invite, Registry};

/// Attempts of one change before [`ClusterError::Contended`].
const ATTEMPTS: u32 = 8;

/// The registry as read from the bucket, with each key's revision (what an
/// update must name to succeed).
#[derive(Debug, Default, Clone)]
pub struct Replica {
    /// The registry these entries make.
    pub registry: Registry,
    revisions: HashMap<String, u64>,
    /// The highest revision applied (the bucket's stream sequence).
    pub revision: u64,
}

/// What one applied entry changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// An instance's record (with whether it is revoked now).
    Record {
        /// The instance.
        instance_id: String,
        /// Whether the record says revoked.
        revoked: bool,
    },
    /// An invite, or the bookkeeping of a key: nothing to act on.
    Other,
}

/// One write of a commit (`key`: the KV key; `value`: what to store;
/// `revision`: the one the key must still be at).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    /// Create `key`: fails when it exists.
    Create { key: String, value: Bytes },
    /// Replace `key` if it is still at `revision`.
    Update {
        key: String,
        value: Bytes,
        revision: u64,
    },
    /// Delete `key` if it is still at `revision`.
    Delete { key: String, revision: u64 },
}

fn corrupt(key: &str, reason: impl ToString) -> ClusterError {
    ClusterError::Corrupt {
        bucket: REGISTRY_BUCKET,
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("registry records encode as JSON"))
}

impl Replica {
    /// Apply one entry of the bucket (a put, or a delete's tombstone).
    pub fn apply(
        &mut self,
        key: &str,
        op: Operation,
        value: &[u8],
        revision: u64,
    ) -> Result<Applied, ClusterError> {
        self.revision = self.revision.max(revision);
        let put = op == Operation::Put;
        if put {
            self.revisions.insert(key.to_string(), revision);
        } else {
            self.revisions.remove(key);
        }
        let (kind, rest) = key.split_once('.').ok_or_else(|| corrupt(key, "no kind"))?;
        if kind == "key" || key == super::membership::FLEET_CHECK_KEY {
            // Only guards one id per key, or marks which fleet this is:
            // nothing to apply.
            return Ok(Applied::Other);
        }
        let id = untoken(rest).ok_or_else(|| corrupt(key, "not a hex id"))?;
        match kind {
            "id" if put => {
                let rec: InstanceRecord =
                    serde_json::from_slice(value).map_err(|e| corrupt(key, e))?;
                if rec.instance_id != id {
                    return Err(corrupt(key, "names another id"));
                }
                let revoked = rec.revoked;
                self.registry.put_record(rec).map_err(|e| corrupt(key, e))?;
                Ok(Applied::Record {
                    instance_id: id,
                    revoked,
                })
            }
            "invite" if put => {
                let inv: Invite = serde_json::from_slice(value).map_err(|e| corrupt(key, e))?;
                if inv.instance_id != id {
                    return Err(corrupt(key, "names another id"));
                }
                self.registry.put_invite(inv);
                Ok(Applied::Other)
            }
            "invite" => {
                self.registry.remove_invite(&id);
                Ok(Applied::Other)
            }
            // Records are never deleted (a revoked id stays revoked); key
            // entries only guard uniqueness.
            "id" => Ok(Applied::Other),
            _ => Err(corrupt(key, "unknown kind")),
        }
    }

    /// The writes that turn this replica's registry into `new`.
    pub fn diff(&self, new: &Registry) -> Vec<Op> {
        let old = &self.registry;
        let mut creates = Vec::new();
        let mut rest = Vec::new();
        for rec in new.records() {
            let id_key = format!("id.{}", token(&rec.instance_id));
            match old.get(&rec.instance_id) {
                Some(was) if was == rec => {}
                Some(_) => rest.push(self.write(id_key, json(rec))),
                None => {
                    // The key's entry first: it is the one that enforces
                    // one id per key. An entry left by a registration that
                    // died half-way is taken over by revision.
                    let key_key = format!("key.{}", rec.public_key);
                    creates.push(self.write(key_key, Bytes::from(rec.instance_id.clone())));
                    creates.push(self.write(id_key, json(rec)));
                }
            }
        }
        for inv in new.invites() {
            if old.invites().iter().any(|o| o == inv) {
                continue;
            }
            rest.push(self.write(format!("invite.{}", token(&inv.instance_id)), json(inv)));
        }
        for inv in old.invites() {
            if new
                .invites()
                .iter()
                .any(|n| n.instance_id == inv.instance_id)
            {
                continue;
            }
            let key = format!("invite.{}", token(&inv.instance_id));
            if let Some(&revision) = self.revisions.get(&key) {
                rest.push(Op::Delete { key, revision });
            }
        }
        creates.extend(rest);
        creates
    }

    /// A create for a key this replica has not seen, else an update at the
    /// revision it has.
    fn write(&self, key: String, value: Bytes) -> Op {
        match self.revisions.get(&key) {
            Some(&revision) => Op::Update {
                key,
                value,
                revision,
            },
            None => Op::Create { key, value },
        }
    }
}

/// Read the whole bucket. Returns the replica and the watch it was read
/// with, which goes on with every later change (the running relay keeps
/// it; a command drops it).
pub async fn load(store: &kv::Store) -> Result<(Replica, kv::Watch), ClusterError> {
    let err = ClusterError::js("reading the registry");
    // Fresh stream info: the store's own status is the one cached when the
    // bucket was opened.
    let mut stream = store.stream.clone();
    let values = stream
        .info()
        .await
        .map_err(|e| err(e.to_string()))?
        .state
        .messages;
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| ClusterError::js("watching the registry")(e.to_string()))?;
    let mut replica = Replica::default();
    if values > 0 {
        while let Some(entry) = watch.next().await {
            let entry =
                entry.map_err(|e| ClusterError::js("reading the registry")(e.to_string()))?;
            replica.apply(&entry.key, entry.operation, &entry.value, entry.revision)?;
            if entry.delta == 0 {
                break;
            }
        }
    }
    Ok((replica, watch))
}

/// Run `change` on the bucket's registry and commit its effect; see the
/// module's description. `base` is a replica the caller already holds (the
/// running relay's, kept current by its watch), used for the first
/// attempt. Returns what the closure returned and the registry after.
pub async fn update<T, E>(
    store: &kv::Store,
    base: Option<Replica>,
    mut change: impl FnMut(&mut Registry) -> Result<T, E>,
) -> Result<Result<(T, Replica), E>, ClusterError> {
    let mut base = base;
    for _ in 0..ATTEMPTS {
        let mut replica = match base.take() {
            Some(r) => r,
            None => load(store).await?.0,
        };
        let mut next = replica.registry.clone();
        let out = match change(&mut next) {
            Ok(out) => out,
            Err(refused) => return Ok(Err(refused)),
        };
        let ops = replica.diff(&next);
        if let Some(done) = commit(store, &ops).await? {
            for (key, op, value, revision) in done {
                replica.apply(&key, op, &value, revision)?;
            }
            return Ok(Ok((out, replica)));
        }
    }
    Err(ClusterError::Contended(ATTEMPTS))
}

type Done = Vec<(String, Operation, Bytes, u64)>;

impl Op {
    fn key(&self) -> &str {
        match self {
            Op::Create { key, .. } | Op::Update { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// What one write of a commit came to.
enum Outcome {
    /// Stored at this revision.
    Written(Operation, Bytes, u64),
    /// The key was not as this commit read it: someone else changed it.
    Conflict,
    /// Any other failure.
    Failed(String),
}

/// Carry out `ops` in order. `None`: one of them met a change made by
/// someone else; what this commit created is deleted again.
async fn commit(store: &kv::Store, ops: &[Op]) -> Result<Option<Done>, ClusterError> {
    use kv::{CreateErrorKind, UpdateErrorKind};
    let mut done: Done = Vec::with_capacity(ops.len());
    // Keys this commit created, with their revisions: the only writes a
    // rollback may take back (deleting an updated record would erase it).
    let mut created: Vec<(String, u64)> = Vec::new();
    for op in ops {
        let outcome = match op {
            Op::Create { key, value } => match store.create(key, value.clone()).await {
                Ok(rev) => {
                    created.push((key.clone(), rev));
                    Outcome::Written(Operation::Put, value.clone(), rev)
                }
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Outcome::Conflict,
                Err(e) => Outcome::Failed(e.to_string()),
            },
            Op::Update {
                key,
                value,
                revision,
            } => match store.update(key, value.clone(), *revision).await {
                Ok(rev) => Outcome::Written(Operation::Put, value.clone(), rev),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Outcome::Conflict,
                Err(e) => Outcome::Failed(e.to_string()),
            },
            // A delete names its revision too; a failure is most likely a
            // change by someone else, which the retry reads.
            Op::Delete { key, revision } => {
                match store.delete_expect_revision(key, Some(*revision)).await {
                    Ok(()) => Outcome::Written(Operation::Delete, Bytes::new(), *revision),
                    Err(_) => Outcome::Conflict,
                }
            }
        };
        match outcome {
            Outcome::Written(operation, value, rev) => {
                done.push((op.key().to_string(), operation, value, rev))
            }
            Outcome::Conflict => {
                rollback(store, &created).await;
                return Ok(None);
            }
            Outcome::Failed(reason) => {
                rollback(store, &created).await;
                return Err(ClusterError::js("writing the registry")(reason));
            }
        }
    }
    Ok(Some(done))
}

/// Take back the creates of a commit that did not complete.
async fn rollback(store: &kv::Store, created: &[(String, u64)]) {
    for (key, rev) in created {
        if let Err(e) = store.delete_expect_revision(key, Some(*rev)).await {
            tracing::warn!(%key, "could not take back a half-made registry change: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_crypto::Identity;

    fn put(r: &mut Replica, op: &Op, rev: u64) {
        match op {
            Op::Create { key, value } | Op::Update { key, value, .. } => {
                r.apply(key, Operation::Put, value, rev).unwrap();
            }
            Op::Delete { key, .. } => {
                r.apply(key, Operation::Delete, &[], rev).unwrap();
            }
        }
    }

    #[test]
    fn a_registration_creates_its_key_then_its_id_and_a_revoke_updates_by_revision() {
        let mut r = Replica::default();
        let key = Identity::generate().public_key();
        let mut next = r.registry.clone();
        next.register("i.1", &key, "one").unwrap();
        let ops = r.diff(&next);
        assert_eq!(ops.len(), 2);
        assert!(
            matches!(&ops[0], Op::Create { key: k, value } if *k == format!("key.{key}") && value == "i.1")
        );
        assert!(
            matches!(&ops[1], Op::Create { key: k, .. } if *k == format!("id.{}", token("i.1")))
        );
        put(&mut r, &ops[0], 1);
        put(&mut r, &ops[1], 2);
        assert_eq!(r.registry.get("i.1").map(|x| x.name.as_str()), Some("one"));
        assert!(r.diff(&r.registry.clone()).is_empty(), "nothing changed");
        let mut next = r.registry.clone();
        next.revoke("i.1").unwrap();
        let ops = r.diff(&next);
        assert!(matches!(&ops[..], [Op::Update { revision: 2, .. }]));
        put(&mut r, &ops[0], 3);
        assert_eq!(
            r.apply(
                &format!("id.{}", token("i.1")),
                Operation::Put,
                &json(next.get("i.1").unwrap()),
                3
            )
            .unwrap(),
            Applied::Record {
                instance_id: "i.1".into(),
                revoked: true
            }
        );
        assert_eq!(r.revision, 3);
    }

    #[test]
    fn invites_are_put_and_deleted_by_revision() {
        let mut r = Replica::default();
        let mut next = r.registry.clone();
        next.add_invite("i2", hex::encode([1u8; 32]), 10_000, 0)
            .unwrap();
        let ops = r.diff(&next);
        assert!(matches!(&ops[..], [Op::Create { .. }]));
        put(&mut r, &ops[0], 5);
        assert_eq!(r.registry.invites().len(), 1);
        let mut next = r.registry.clone();
        let key = Identity::generate().public_key();
        next.redeem_invite("i2", &key, "n", 1, |_| true).unwrap();
        let ops = r.diff(&next);
        assert_eq!(ops.len(), 3, "key, id, then the invite's delete: {ops:?}");
        assert!(matches!(&ops[2], Op::Delete { revision: 5, .. }));
        for (i, op) in ops.iter().enumerate() {
            put(&mut r, op, 6 + i as u64);
        }
        assert!(r.registry.invites().is_empty());
        assert!(r.registry.get("i2").is_some());
    }

    #[test]
    fn entries_that_do_not_decode_are_named() {
        let mut r = Replica::default();
        for (key, value) in [
            ("id.zz", &b"{}"[..]),
            ("nokind", b""),
            (&*format!("id.{}", token("a")), b"not json"),
            (&*format!("other.{}", token("a")), b""),
        ] {
            assert!(matches!(
                r.apply(key, Operation::Put, value, 1),
                Err(ClusterError::Corrupt { .. })
            ));
        }
    }
}
