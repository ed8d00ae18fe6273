//! The registry: which instance id belongs to which Ed25519 key, and which
//! are revoked. The only state the relay persists (no message content).
//!
//! Three floors, each knowing only the one below:
//! - [`Registry`] (here): the pure in-memory decision logic.
//! - [`RegistryStore`] (`store`): makes changes durable. Under an exclusive
//!   lock on `registry.lock` it re-reads `registry.json`, applies the change,
//!   writes a temporary file, fsyncs and renames it into place. The running
//!   relay and the admin commands (`register`, `revoke`) both go through it,
//!   so neither loses the other's change, and a crash leaves either the old
//!   or the new file, never half.
//! - `LiveRegistry` (`live`, crate-private): the running relay's view,
//!   reloaded when the file changes, closing newly revoked connections.

use std::collections::HashMap;

use agent_link_crypto::PublicKey;
use agent_link_proto::ErrorCode;
use serde::{Deserialize, Serialize};

pub(crate) mod live;
mod store;

pub use store::{RegistryStore, StoreError};

/// One registered instance as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Instance id.
    pub instance_id: String,
    /// Human-readable name.
    pub name: String,
    /// Ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// Revoked instances may not connect and cannot receive.
    #[serde(default)]
    pub revoked: bool,
}

/// What a key maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStatus {
    /// Registered and active under this instance id.
    Active(String),
    /// Registered under this id, then revoked.
    Revoked(String),
    /// Not registered.
    Unknown,
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The id belongs to another key (first key to claim an id keeps it).
    #[error("instance id {0:?} is already registered to another key")]
    IdTaken(String),
    /// This key is already registered under another id.
    #[error("this key is already registered as {0:?}")]
    KeyTaken(String),
    /// The id (or this key) was revoked; it cannot be registered again.
    #[error("instance {0:?} has been revoked")]
    Revoked(String),
    /// The id is not valid.
    #[error("{0}")]
    BadId(String),
}

/// The wire code a peer is told for a refused registration (PROTOCOL.md §5).
impl From<RegisterError> for ErrorCode {
    fn from(e: RegisterError) -> Self {
        match e {
            RegisterError::IdTaken(_) | RegisterError::KeyTaken(_) => ErrorCode::InstanceIdTaken,
            RegisterError::Revoked(_) => ErrorCode::Revoked,
            RegisterError::BadId(_) => ErrorCode::BadAddress,
        }
    }
}

/// A single-use invite not yet redeemed (`agent-link-relay invite
/// --instance-id`). Its secret keys the registration proof, so the relay has
/// to keep it: `registry.json` is written 0600 for this reason.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The one id it registers.
    pub instance_id: String,
    /// The invite's secret, 64 hex digits.
    pub secret: String,
    /// Unix ms after which it is refused (and dropped at the next write).
    pub expires_at_ms: u64,
}

impl std::fmt::Debug for Invite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invite")
            .field("instance_id", &self.instance_id)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// Why an invite was not made or not redeemed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InviteError {
    /// The id is registered already (or revoked): an invite could never be
    /// redeemed.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// No unexpired invite for this id, or the proof is not its secret's.
    #[error("no valid invite for instance {0:?} (unknown, used or expired)")]
    Invalid(String),
}

impl From<InviteError> for ErrorCode {
    fn from(e: InviteError) -> Self {
        match e {
            InviteError::Register(r) => r.into(),
            InviteError::Invalid(_) => ErrorCode::InviteInvalid,
        }
    }
}

/// A stored record's key, with its id checked (a file or bucket entry may
/// have been edited by hand).
fn checked_key(rec: &InstanceRecord) -> Result<PublicKey, String> {
    let key: PublicKey = rec
        .public_key
        .parse()
        .map_err(|e| format!("instance {:?}: {e}", rec.instance_id))?;
    agent_link_proto::check_id(&rec.instance_id).map_err(|e| e.to_string())?;
    Ok(key)
}

/// Registry contents with both lookups.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    records: Vec<InstanceRecord>,
    by_id: HashMap<String, usize>,
    by_key: HashMap<PublicKey, usize>,
    invites: Vec<Invite>,
}

impl Registry {
    pub(super) fn from_records(records: Vec<InstanceRecord>) -> Result<Self, String> {
        let mut r = Registry::default();
        for rec in records {
            let key = checked_key(&rec)?;
            if r.by_id.contains_key(&rec.instance_id) || r.by_key.contains_key(&key) {
                return Err(format!("instance {:?} appears twice", rec.instance_id));
            }
            let i = r.records.len();
            r.by_id.insert(rec.instance_id.clone(), i);
            r.by_key.insert(key, i);
            r.records.push(rec);
        }
        Ok(r)
    }

    /// Status of a key presented in a TLS handshake.
    pub fn key_status(&self, key: &PublicKey) -> KeyStatus {
        match self.by_key.get(key).map(|&i| &self.records[i]) {
            Some(r) if r.revoked => KeyStatus::Revoked(r.instance_id.clone()),
            Some(r) => KeyStatus::Active(r.instance_id.clone()),
            None => KeyStatus::Unknown,
        }
    }

    /// The record of an instance id.
    pub fn get(&self, instance_id: &str) -> Option<&InstanceRecord> {
        self.by_id.get(instance_id).map(|&i| &self.records[i])
    }

    /// All records, in registration order.
    pub fn records(&self) -> &[InstanceRecord] {
        &self.records
    }

    /// Register `key` as `instance_id`. `Ok(true)` when new, `Ok(false)` when
    /// the same pair was already registered (idempotent).
    pub fn register(
        &mut self,
        instance_id: &str,
        key: &PublicKey,
        name: &str,
    ) -> Result<bool, RegisterError> {
        agent_link_proto::check_id(instance_id).map_err(|e| RegisterError::BadId(e.to_string()))?;
        if let Some(&i) = self.by_id.get(instance_id) {
            let rec = &self.records[i];
            if rec.public_key != key.to_string() {
                return Err(RegisterError::IdTaken(instance_id.to_string()));
            }
            if rec.revoked {
                return Err(RegisterError::Revoked(instance_id.to_string()));
            }
            return Ok(false);
        }
        if let Some(&i) = self.by_key.get(key) {
            return Err(RegisterError::KeyTaken(self.records[i].instance_id.clone()));
        }
        let i = self.records.len();
        self.records.push(InstanceRecord {
            instance_id: instance_id.to_string(),
            name: name.chars().take(128).collect(),
            public_key: key.to_string(),
            revoked: false,
        });
        self.by_id.insert(instance_id.to_string(), i);
        self.by_key.insert(*key, i);
        Ok(true)
    }

    /// Invites not yet redeemed (expired ones included until the next write).
    pub fn invites(&self) -> &[Invite] {
        &self.invites
    }

    /// Record a single-use invite for `instance_id` with `secret` (hex),
    /// replacing any earlier one for that id (re-inviting invalidates the
    /// old token). Refused for an id that is registered or revoked. Expired
    /// invites are dropped on the way.
    pub fn add_invite(
        &mut self,
        instance_id: &str,
        secret_hex: String,
        expires_at_ms: u64,
        now_ms: u64,
    ) -> Result<(), InviteError> {
        agent_link_proto::check_id(instance_id).map_err(|e| RegisterError::BadId(e.to_string()))?;
        if let Some(rec) = self.get(instance_id) {
            return Err(if rec.revoked {
                RegisterError::Revoked(instance_id.to_string())
            } else {
                RegisterError::IdTaken(instance_id.to_string())
            }
            .into());
        }
        self.invites
            .retain(|i| i.instance_id != instance_id && i.expires_at_ms > now_ms);
        self.invites.push(Invite {
            instance_id: instance_id.to_string(),
            secret: secret_hex,
            expires_at_ms,
        });
        Ok(())
    }

    /// The secret of the unexpired invite for `instance_id`, if any (to
    /// check a proof in memory before anything is written).
    pub fn invite_secret(
        &self,
        instance_id: &str,
        now_ms: u64,
    ) -> Option<zeroize::Zeroizing<[u8; 32]>> {
        let inv = self
            .invites
            .iter()
            .find(|i| i.instance_id == instance_id && i.expires_at_ms > now_ms)?;
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(&inv.secret, secret.as_mut()).ok()?;
        Some(secret)
    }

    /// Redeem the invite for `instance_id`: `proof_ok` is asked whether the
    /// registration proof is the invite's secret's (it gets the secret's
    /// bytes); then `key` is registered and the invite removed, in one
    /// change. `Ok(false)`: that very key already holds the id (a retry
    /// after the invite was used: answered as the first time).
    pub fn redeem_invite(
        &mut self,
        instance_id: &str,
        key: &PublicKey,
        name: &str,
        now_ms: u64,
        proof_ok: impl FnOnce(&[u8; 32]) -> bool,
    ) -> Result<bool, InviteError> {
        if let Some(rec) = self.get(instance_id) {
            if rec.public_key == key.to_string() && !rec.revoked {
                return Ok(false);
            }
        }
        let invalid = || InviteError::Invalid(instance_id.to_string());
        let i = self
            .invites
            .iter()
            .position(|i| i.instance_id == instance_id && i.expires_at_ms > now_ms)
            .ok_or_else(invalid)?;
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(&self.invites[i].secret, secret.as_mut()).map_err(|_| invalid())?;
        if !proof_ok(&secret) {
            return Err(invalid());
        }
        let new = self.register(instance_id, key, name)?;
        self.invites.remove(i);
        self.invites.retain(|i| i.expires_at_ms > now_ms);
        Ok(new)
    }

    /// Revoke an instance. `Ok(false)` when it already was.
    pub fn revoke(&mut self, instance_id: &str) -> Result<bool, String> {
        let i = *self
            .by_id
            .get(instance_id)
            .ok_or_else(|| format!("no instance {instance_id:?} is registered"))?;
        let was = self.records[i].revoked;
        self.records[i].revoked = true;
        Ok(!was)
    }

    pub(super) fn set_invites(&mut self, invites: Vec<Invite>) {
        self.invites = invites;
    }

    /// Put one record as a replicated registry holds it (the cluster's KV
    /// bucket, where each record is its own key): new, or replacing the
    /// record of the same id. Refused when the record's key already belongs
    /// to another id here (the bucket's `key.` entries keep that from
    /// happening; a record that breaks it is not applied).
    pub(crate) fn put_record(&mut self, rec: InstanceRecord) -> Result<(), String> {
        let key = checked_key(&rec)?;
        if let Some(&i) = self.by_key.get(&key) {
            if self.records[i].instance_id != rec.instance_id {
                return Err(format!(
                    "instance {:?}: its key belongs to {:?}",
                    rec.instance_id, self.records[i].instance_id
                ));
            }
        }
        match self.by_id.get(&rec.instance_id) {
            Some(&i) => {
                if let Ok(old) = self.records[i].public_key.parse::<PublicKey>() {
                    self.by_key.remove(&old);
                }
                self.by_key.insert(key, i);
                self.records[i] = rec;
            }
            None => {
                let i = self.records.len();
                self.by_id.insert(rec.instance_id.clone(), i);
                self.by_key.insert(key, i);
                self.records.push(rec);
            }
        }
        Ok(())
    }

    /// Put one invite (replacing the one for the same id).
    pub(crate) fn put_invite(&mut self, invite: Invite) {
        self.invites.retain(|i| i.instance_id != invite.instance_id);
        self.invites.push(invite);
    }

    /// Drop the invite for `instance_id`, if any.
    pub(crate) fn remove_invite(&mut self, instance_id: &str) {
        self.invites.retain(|i| i.instance_id != instance_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_crypto::Identity;

    #[test]
    fn first_key_keeps_the_id() {
        let mut r = Registry::default();
        let a = Identity::generate().public_key();
        let b = Identity::generate().public_key();
        assert_eq!(r.register("i1", &a, "one"), Ok(true));
        assert_eq!(r.register("i1", &a, "one"), Ok(false), "idempotent");
        assert_eq!(
            r.register("i1", &b, "x"),
            Err(RegisterError::IdTaken("i1".into()))
        );
        assert_eq!(
            r.register("i2", &a, "x"),
            Err(RegisterError::KeyTaken("i1".into()))
        );
        assert_eq!(r.key_status(&a), KeyStatus::Active("i1".into()));
        assert_eq!(r.key_status(&b), KeyStatus::Unknown);
        assert!(r.register("bad/id", &b, "x").is_err());
    }

    #[test]
    fn revoked_stays_revoked() {
        let mut r = Registry::default();
        let a = Identity::generate().public_key();
        r.register("i1", &a, "").unwrap();
        assert_eq!(r.revoke("i1"), Ok(true));
        assert_eq!(r.revoke("i1"), Ok(false));
        assert_eq!(r.key_status(&a), KeyStatus::Revoked("i1".into()));
        assert_eq!(
            r.register("i1", &a, ""),
            Err(RegisterError::Revoked("i1".into()))
        );
        assert!(r.revoke("nope").is_err());
    }

    #[test]
    fn an_invite_registers_its_one_id_once() {
        let mut r = Registry::default();
        let a = Identity::generate().public_key();
        let b = Identity::generate().public_key();
        let secret = [9u8; 32];
        let good = |s: &[u8; 32]| *s == secret;
        r.add_invite("i1", hex::encode(secret), 1_000, 0).unwrap();
        // Wrong proof, or expired: refused, the invite stays for the real one.
        assert_eq!(
            r.redeem_invite("i1", &a, "n", 10, |_| false),
            Err(InviteError::Invalid("i1".into()))
        );
        assert_eq!(
            r.redeem_invite("i1", &a, "n", 1_000, good),
            Err(InviteError::Invalid("i1".into()))
        );
        assert_eq!(r.redeem_invite("i1", &a, "n", 10, good), Ok(true));
        assert!(r.invites().is_empty(), "single use");
        // The same key again: answered as before; another key: no invite.
        assert_eq!(r.redeem_invite("i1", &a, "n", 10, good), Ok(false));
        assert_eq!(
            r.redeem_invite("i1", &b, "n", 10, good),
            Err(InviteError::Invalid("i1".into()))
        );
        // No invite for a registered or revoked id; a re-invite replaces.
        assert!(matches!(
            r.add_invite("i1", hex::encode(secret), 1_000, 0),
            Err(InviteError::Register(RegisterError::IdTaken(_)))
        ));
        r.revoke("i1").unwrap();
        assert!(matches!(
            r.add_invite("i1", hex::encode(secret), 1_000, 0),
            Err(InviteError::Register(RegisterError::Revoked(_)))
        ));
        r.add_invite("i2", hex::encode([1u8; 32]), 1_000, 0)
            .unwrap();
        r.add_invite("i2", hex::encode(secret), 1_000, 0).unwrap();
        assert_eq!(r.invites().len(), 1);
        assert_eq!(
            r.redeem_invite("i2", &b, "n", 10, |s| *s == [1u8; 32]),
            Err(InviteError::Invalid("i2".into())),
            "the replaced invite's secret no longer works"
        );
        assert_eq!(r.redeem_invite("i2", &b, "n", 10, good), Ok(true));
    }

    /// An invite is good strictly before its expiry: its secret is handed
    /// out (for the in-memory proof check) only then, and every write
    /// (another invite, a redemption) drops the ones that expired, the one
    /// expiring at that very ms included.
    #[test]
    fn expired_invites_give_no_secret_and_are_dropped_at_the_next_write() {
        let mut r = Registry::default();
        let secret = [7u8; 32];
        r.add_invite("i1", hex::encode(secret), 100, 0).unwrap();
        r.add_invite("i3", hex::encode([3u8; 32]), 500, 0).unwrap();
        assert_eq!(r.invite_secret("i1", 99).as_deref(), Some(&secret));
        assert_eq!(r.invite_secret("i1", 100), None, "expired");
        assert_eq!(r.invite_secret("i2", 99), None, "no invite for i2");
        let ids = |r: &Registry| -> Vec<String> {
            r.invites().iter().map(|i| i.instance_id.clone()).collect()
        };
        r.add_invite("i2", hex::encode([2u8; 32]), 1_000, 100)
            .unwrap();
        assert_eq!(ids(&r), ["i3", "i2"]);
        r.add_invite("i4", hex::encode([4u8; 32]), 2_000, 100)
            .unwrap();
        let key = Identity::generate().public_key();
        let two = |s: &[u8; 32]| *s == [2u8; 32];
        assert_eq!(r.redeem_invite("i2", &key, "n", 500, two), Ok(true));
        assert_eq!(ids(&r), ["i4"], "i3 expired at 500, i2 was used");
    }

    /// A registry file naming one id twice, or one key under two ids, is
    /// refused at load (either could give a key a second identity).
    #[test]
    fn a_file_with_a_repeated_id_or_key_is_refused() {
        let rec = |id: &str, key: &PublicKey| InstanceRecord {
            instance_id: id.into(),
            name: String::new(),
            public_key: key.to_string(),
            revoked: false,
        };
        let a = Identity::generate().public_key();
        let b = Identity::generate().public_key();
        assert!(Registry::from_records(vec![rec("i1", &a), rec("i2", &b)]).is_ok());
        assert!(Registry::from_records(vec![rec("i1", &a), rec("i1", &b)]).is_err());
        assert!(Registry::from_records(vec![rec("i1", &a), rec("i2", &a)]).is_err());
    }

    #[test]
    fn register_errors_map_to_their_wire_codes() {
        for (e, code) in [
            (
                RegisterError::IdTaken("i".into()),
                ErrorCode::InstanceIdTaken,
            ),
            (
                RegisterError::KeyTaken("i".into()),
                ErrorCode::InstanceIdTaken,
            ),
            (RegisterError::Revoked("i".into()), ErrorCode::Revoked),
            (RegisterError::BadId("i/".into()), ErrorCode::BadAddress),
        ] {
            assert_eq!(ErrorCode::from(e), code);
        }
    }
}
