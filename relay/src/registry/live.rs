//! The registry as a running relay sees it: the last loaded [`Registry`],
//! reloaded when `registry.json` changes (an operator ran `register` or
//! `revoke`) and when an unknown key connects, and written through when a
//! peer registers online. A reload that revokes an instance closes its
//! connections through the [`Router`]; this module knows nothing else of the
//! server.

use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Release};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime};

use agent_link_crypto::PublicKey;
use agent_link_proto::ErrorCode;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use async_nats::jetstream::kv;

use super::{Registry, RegistryStore, StoreError};
use crate::cluster::registry::Replica;
use crate::cluster::watch::BucketWatch;
use crate::cluster::{Cluster, ClusterError};
use crate::router::Router;

/// Modification time, size and inode of a file: every registry write
/// replaces the file (rename), so any change alters at least the inode.
pub(crate) type FileStamp = (SystemTime, u64, u64);

pub(crate) fn file_stamp(p: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The fleet's registry bucket as this relay follows it (the config has
/// `cluster`): the replica its watch keeps current, and the revision the
/// watch has applied so far, for those who wait for a write to arrive.
#[derive(Debug)]
struct Fleet {
    store: kv::Store,
    replica: Mutex<Replica>,
    applied: tokio::sync::watch::Sender<u64>,
    /// Makes the running watch compare itself with the bucket now.
    poke: Mutex<Option<Arc<tokio::sync::Notify>>>,
}

/// How long a registration, or a key nobody here knows, waits for the
/// watch to bring the bucket's newest entries.
const CATCH_UP: Duration = Duration::from_secs(2);

/// The running relay's registry.
#[derive(Debug)]
pub(crate) struct LiveRegistry {
    store: RegistryStore,
    /// With `cluster`: the bucket, which is the registry then (the file in
    /// the directory is not used).
    fleet: Option<Fleet>,
    current: RwLock<Registry>,
    /// What the registry file looked like when last loaded.
    stamp: Mutex<Option<FileStamp>>,
    /// SHA-256 of the bytes last loaded (a reload of the same bytes parses
    /// nothing; see `RegistryStore::load_if_changed`).
    digest: Mutex<Option<[u8; 32]>>,
    /// Installs so far (every reload, and every online registration, which
    /// re-reads the file under its lock).
    generation: AtomicU64,
    /// When a stranger's key last caused a reload (see
    /// [`LiveRegistry::reload_for_unknown_key`]).
    unknown_key_reload: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Fleet {
    /// Apply one entry of the watch; whether it changed anything.
    fn apply(&self, item: Result<kv::Entry, kv::WatcherError>) -> bool {
        let entry = match item {
            Ok(e) => e,
            Err(e) => {
                warn!("fleet registry watch: {e}");
                return false;
            }
        };
        let mut replica = self.replica.lock().unwrap_or_else(|e| e.into_inner());
        if entry.revision <= replica.revision {
            return false;
        }
        if let Err(e) = replica.apply(&entry.key, entry.operation, &entry.value, entry.revision) {
            warn!("fleet registry entry skipped: {e}");
        }
        true
    }

    /// Wait (at most [`CATCH_UP`]) until the watch has applied `revision`;
    /// if it has not by then, make the watch look at the bucket (it may
    /// have stalled: see `cluster::watch`) and wait once more.
    async fn caught_up(&self, revision: u64) {
        let mut rx = self.applied.subscribe();
        if tokio::time::timeout(CATCH_UP, rx.wait_for(|&r| r >= revision))
            .await
            .is_ok()
        {
            return;
        }
        let poke = self.poke.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(poke) = poke {
            poke.notify_one();
            let _ = tokio::time::timeout(CATCH_UP, rx.wait_for(|&r| r >= revision)).await;
        }
    }
}

impl LiveRegistry {
    /// Load `store` (a missing file is an empty registry).
    pub(crate) fn load(store: RegistryStore) -> Result<Self, StoreError> {
        let (registry, digest) = store
            .load_if_changed(None)?
            .expect("nothing was loaded before, so it always loads");
        Ok(Self {
            fleet: None,
            stamp: Mutex::new(file_stamp(store.path())),
            digest: Mutex::new(Some(digest)),
            current: RwLock::new(registry),
            store,
            generation: AtomicU64::new(0),
            unknown_key_reload: tokio::sync::Mutex::new(None),
        })
    }

    /// The fleet's registry from `cluster`'s bucket, and the watch that
    /// goes on from what was read (give it to [`LiveRegistry::follow`]).
    pub(crate) async fn load_fleet(
        store: RegistryStore,
        cluster: &Cluster,
    ) -> Result<(Self, kv::Watch), ClusterError> {
        let bucket = cluster.registry_store().clone();
        let (replica, watch) = crate::cluster::registry::load(&bucket).await?;
        let (applied, _) = tokio::sync::watch::channel(replica.revision);
        Ok((
            Self {
                current: RwLock::new(replica.registry.clone()),
                fleet: Some(Fleet {
                    store: bucket,
                    replica: Mutex::new(replica),
                    applied,
                    poke: Mutex::new(None),
                }),
                stamp: Mutex::new(None),
                digest: Mutex::new(None),
                store,
                generation: AtomicU64::new(0),
                unknown_key_reload: tokio::sync::Mutex::new(None),
            },
            watch,
        ))
    }

    /// Apply the fleet registry's changes as the watch brings them, and
    /// install each batch (which closes the connections of instances
    /// revoked anywhere in the fleet, within the watch's latency). A watch
    /// that fails is opened again from the last applied revision. Returns
    /// on `shutdown`.
    pub(crate) async fn follow<M>(
        &self,
        watch: kv::Watch,
        router: &Router<M>,
        shutdown: &CancellationToken,
    ) {
        let Some(fleet) = &self.fleet else { return };
        let mut watch = BucketWatch::new(fleet.store.clone(), watch, *fleet.applied.borrow());
        *fleet.poke.lock().unwrap_or_else(|e| e.into_inner()) = Some(watch.poke());
        loop {
            let first = tokio::select! {
                n = watch.next() => n,
                _ = shutdown.cancelled() => return,
            };
            let mut ended = first.is_none();
            let mut changed = first.is_some_and(|item| fleet.apply(item));
            // Everything already here goes into one install.
            while !ended {
                match watch.next_now() {
                    Some(Some(item)) => changed |= fleet.apply(item),
                    Some(None) => ended = true,
                    None => break,
                }
            }
            if changed {
                let (reg, revision) = {
                    let r = fleet.replica.lock().unwrap_or_else(|e| e.into_inner());
                    (r.registry.clone(), r.revision)
                };
                self.install(reg, router);
                fleet.applied.send_replace(revision);
            }
            if ended {
                let applied = *fleet.applied.borrow();
                match fleet.store.watch_all_from_revision(applied + 1).await {
                    Ok(w) => {
                        watch = BucketWatch::new(fleet.store.clone(), w, applied);
                        *fleet.poke.lock().unwrap_or_else(|e| e.into_inner()) = Some(watch.poke());
                    }
                    Err(e) => {
                        warn!("fleet registry watch ended and cannot be reopened yet: {e}");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = shutdown.cancelled() => return,
                        }
                    }
                }
            }
        }
    }

    /// Installs so far: changes whenever the live registry may have.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Acquire)
    }

    /// The registry as last loaded (a short read lock: never hold it across
    /// an `.await`).
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Make `reg` the live registry and close the connections of every
    /// revoked instance in it. Every install does this — not only reloads
    /// that see a revocation appear — because whichever install first
    /// carries a revocation (a reload, or an online registration that
    /// re-read the file) may be the only one that does: an install that
    /// compared against what it replaced would leave the revoked instance
    /// connected for good after a registration got there first.
    fn install<M>(&self, reg: Registry, router: &Router<M>) {
        let revoked: Vec<String> = reg
            .records()
            .iter()
            .filter(|r| r.revoked)
            .map(|r| r.instance_id.clone())
            .collect();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = reg;
        self.generation.fetch_add(1, Release);
        for id in revoked {
            let conns = router.connections_of(&id);
            if conns.is_empty() {
                continue;
            }
            info!(instance = %id, connections = conns.len(), "instance revoked; closing its connections");
            for c in conns {
                c.close(ErrorCode::Revoked.as_u32().into(), b"revoked");
            }
        }
    }

    /// Pick up registry changes made by `register`/`revoke` while running;
    /// close the connections of newly revoked instances (within about a
    /// second). Returns on `shutdown`.
    pub(crate) async fn watch<M>(&self, router: &Router<M>, shutdown: &CancellationToken) {
        const FULL_RELOAD_EVERY: u64 = 20; // ticks of 500 ms
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        for n in 1u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let force = n % FULL_RELOAD_EVERY == 0;
            if let Err(e) = self.reload_if_changed(router, force).await {
                warn!("registry reload failed, keeping the previous one: {e}");
            }
        }
    }

    /// Reload when the file changed since the last load (its stamp), and in
    /// any case when `force`d (every 10 s): a write that reuses the inode,
    /// keeps the size and lands within the file system's timestamp
    /// granularity looks unchanged.
    async fn reload_if_changed<M>(
        &self,
        router: &Router<M>,
        force: bool,
    ) -> Result<(), StoreError> {
        let now = file_stamp(self.store.path());
        if !force {
            let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if *last == now {
                return Ok(());
            }
            *last = now;
        }
        self.reload(router).await
    }

    /// An unknown key connected: an operator may have just run
    /// `agent-link-relay register`, so look at the file again — but at most
    /// once every 100 ms, with every stranger that arrives meanwhile sharing
    /// that one reload. A flood of unknown keys thus costs at most ten
    /// registry reads a second, however many connections it makes.
    pub(crate) async fn reload_for_unknown_key<M>(
        &self,
        router: &Router<M>,
    ) -> Result<(), StoreError> {
        const MIN_GAP: Duration = Duration::from_millis(100);
        if let Some(fleet) = &self.fleet {
            // The watch keeps this registry current; a registration made
            // through another relay a moment ago may still be on its way:
            // wait (bounded) for the bucket's newest entry to arrive. One
            // stream-info request per stranger, which NATS answers cheaply;
            // the connection's stranger slot bounds how many wait at once.
            match crate::cluster::watch::newest_revision(&fleet.store).await {
                Ok(last) => fleet.caught_up(last).await,
                Err(e) => warn!("fleet registry: {e}"),
            }
            return Ok(());
        }
        let seen = self.generation.load(Acquire);
        let mut last = self.unknown_key_reload.lock().await;
        if self.generation.load(Acquire) != seen {
            // Someone reloaded after this key arrived: that reload covers it.
            return Ok(());
        }
        if let Some(t) = *last {
            tokio::time::sleep_until(t + MIN_GAP).await;
        }
        let r = self.reload(router).await;
        *last = Some(tokio::time::Instant::now());
        r
    }

    /// Re-read the registry from disk and install it (revoked instances have
    /// their connections closed with `Revoked`).
    async fn reload<M>(&self, router: &Router<M>) -> Result<(), StoreError> {
        let store = self.store.clone();
        let last = *self.digest.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = tokio::task::spawn_blocking(move || store.load_if_changed(last))
            .await
            .map_err(|e| StoreError::Io {
                path: self.store.path().display().to_string(),
                source: std::io::Error::other(e),
            })??;
        // The same bytes as the last load: nothing to parse or install (that
        // install already closed every revoked instance's connections).
        if let Some((registry, digest)) = loaded {
            *self.digest.lock().unwrap_or_else(|e| e.into_inner()) = Some(digest);
            self.install(registry, router);
        }
        Ok(())
    }

    /// Record a registration whose proof was checked (see
    /// `core::admission::check_registration`) durably, then make it live.
    /// `Ok(true)` when the registration is new, `Ok(false)` when the same
    /// pair was already registered.
    pub(crate) async fn register_online<M>(
        &self,
        router: &Router<M>,
        key: &PublicKey,
        instance_id: &str,
        name: &str,
    ) -> Result<bool, ErrorCode> {
        let (id, name, k) = (instance_id.to_string(), name.to_string(), *key);
        self.change_online(router, move |r| {
            r.register(&id, &k, &name).map_err(ErrorCode::from)
        })
        .await
    }

    /// Redeem the single-use invite for `instance_id` for `key`, durably,
    /// then make it live: `proof_ok` checks the registration proof against
    /// the invite's secret, inside the same locked change that uses the
    /// invite up, so two connections racing with one invite cannot both
    /// win. `Ok(false)`: that key already holds the id.
    pub(crate) async fn redeem_invite_online<M>(
        &self,
        router: &Router<M>,
        key: &PublicKey,
        instance_id: &str,
        name: &str,
        proof_ok: impl Fn(&[u8; 32]) -> bool + Send + 'static,
    ) -> Result<bool, ErrorCode> {
        let (id, name, k) = (instance_id.to_string(), name.to_string(), *key);
        let now = agent_link_proto::clock::unix_ms(SystemTime::now());
        self.change_online(router, move |r| {
            r.redeem_invite(&id, &k, &name, now, &proof_ok)
                .map_err(ErrorCode::from)
        })
        .await
    }

    /// Apply `change` durably (the file, or the fleet's bucket) and make the
    /// result live before returning. Against the bucket `change` may run
    /// more than once (see `cluster::registry::update`).
    async fn change_online<M>(
        &self,
        router: &Router<M>,
        change: impl FnMut(&mut Registry) -> Result<bool, ErrorCode> + Send + 'static,
    ) -> Result<bool, ErrorCode> {
        if let Some(fleet) = &self.fleet {
            let base = fleet
                .replica
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return match crate::cluster::registry::update(&fleet.store, Some(base), change).await {
                Ok(Ok((new, written))) => {
                    // Live once the watch has brought this write (and
                    // whatever came before it), so the registry this relay
                    // serves never runs ahead of the bucket's order.
                    fleet.caught_up(written.revision).await;
                    Ok(new)
                }
                Ok(Err(refused)) => Err(refused),
                Err(e) => {
                    tracing::error!("fleet registry write failed: {e}");
                    Err(ErrorCode::Internal)
                }
            };
        }
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || store.update(change))
            .await
            .map_err(|_| ErrorCode::Internal)?;
        match result {
            Ok(Ok((new, reg))) => {
                self.install(reg, router);
                Ok(new)
            }
            Ok(Err(refused)) => Err(refused),
            Err(e) => {
                tracing::error!("registry write failed: {e}");
                Err(ErrorCode::Internal)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_crypto::Identity;

    #[tokio::test]
    async fn reloads_of_unchanged_bytes_parse_and_install_nothing() {
        let (_dir, store, _) = crate::registry::store::tests::store_with_i1();
        let live = LiveRegistry::load(store.clone()).unwrap();
        let router: Router<()> = Router::default();
        let g0 = live.generation.load(Acquire);
        // A stream of strangers, the file untouched: no re-parse.
        for _ in 0..3 {
            live.reload_for_unknown_key(&router).await.unwrap();
        }
        assert_eq!(
            live.generation.load(Acquire),
            g0,
            "same bytes: nothing installed"
        );
        // An operator registers someone: the next stranger's reload has it.
        let b = Identity::generate().public_key();
        store
            .update(|r| r.register("i2", &b, "n"))
            .unwrap()
            .unwrap();
        live.reload_for_unknown_key(&router).await.unwrap();
        assert_eq!(live.generation.load(Acquire), g0 + 1);
        assert!(live.read().get("i2").is_some());
    }
}
