//! Status answers (PROTOCOL.md §9.2) from a cached snapshot: the registry's
//! non-revoked instances with who is online, each entry encoded once when
//! the snapshot is built, so a `StatusRequest` or `StatusPageRequest` costs
//! a copy of the bytes it returns, not a walk of the registry (which at
//! 10,000 instances took 15-33 ms and returned 586 KiB per 5-byte request).
//!
//! [`StatusCache`] decides when to rebuild: only when the registry or the
//! routing table changed since the last build, and at most once per
//! [`STATUS_REFRESH`], so a Status may be that much behind. Pages hold at
//! most [`STATUS_PAGE_BYTES`] of entries (at least one), so any registry can
//! be listed; the unpaged `Status` that would pass the hard frame limit is
//! refused `TooLarge`, never left unsent. No clock read here: `now` is
//! passed in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_link_proto::{codec, ErrorCode, InstanceStatus};
use bytes::Bytes;

/// The longest a snapshot is reused after the registry or the routing
/// table changed.
pub const STATUS_REFRESH: Duration = Duration::from_millis(100);

/// Bytes of entries one `StatusPage` carries at most (one entry always).
pub const STATUS_PAGE_BYTES: usize = 1 << 20;

/// `RelayToPeer::Status`'s and `StatusPage`'s variant indexes.
const STATUS_VARIANT: u32 = 1;
const STATUS_PAGE_VARIANT: u32 = 9;

/// One status snapshot: entries in registry order, each already encoded.
#[derive(Debug)]
pub struct StatusSnapshot {
    id: u64,
    /// The encoded entries, one after another.
    bytes: Vec<u8>,
    /// Where entry `i` begins; `offsets[len]` is `bytes.len()`.
    offsets: Vec<usize>,
    index: HashMap<String, usize>,
}

impl StatusSnapshot {
    /// Snapshot number `id` of `entries` (registry order).
    pub fn build(id: u64, entries: impl IntoIterator<Item = InstanceStatus>) -> Self {
        let mut bytes = Vec::new();
        let mut offsets = vec![0];
        let mut index = HashMap::new();
        for (i, e) in entries.into_iter().enumerate() {
            // Plain strings, bytes and a bool always encode.
            if bincode::encode_into_std_write(&e, &mut bytes, codec::CONFIG).is_ok() {
                offsets.push(bytes.len());
                index.insert(e.instance_id, i);
            } else {
                bytes.truncate(offsets[offsets.len() - 1]);
            }
        }
        Self {
            id,
            bytes,
            offsets,
            index,
        }
    }

    /// Its number (pages of one snapshot fit together).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Instances listed.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether it lists none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `instance` is listed.
    pub fn contains(&self, instance: &str) -> bool {
        self.index.contains_key(instance)
    }

    fn entry(&self, i: usize) -> &[u8] {
        &self.bytes[self.offsets[i]..self.offsets[i + 1]]
    }

    fn you(&self, instance: &str) -> Result<&[u8], ErrorCode> {
        let i = self.index.get(instance).ok_or(ErrorCode::NotRegistered)?;
        Ok(self.entry(*i))
    }

    /// The whole `Status` frame for `you`: `NotRegistered` if `you` is not
    /// listed, `TooLarge` past the hard frame limit (then only pages can
    /// list the fleet).
    pub fn status_frame(&self, you: &str) -> Result<Bytes, ErrorCode> {
        let you = self.you(you)?;
        let mut body = Vec::with_capacity(16 + you.len() + self.bytes.len());
        varint(STATUS_VARIANT.into(), &mut body);
        body.extend_from_slice(you);
        varint(self.len() as u64, &mut body);
        body.extend_from_slice(&self.bytes);
        whole(body)
    }

    /// The `StatusPage` frame for `you` beginning at entry `start`: the
    /// entries from there that fit `max_bytes` (at least one, none past the
    /// end).
    pub fn page_frame(&self, you: &str, start: u32, max_bytes: usize) -> Result<Bytes, ErrorCode> {
        let you = self.you(you)?;
        let from = (start as usize).min(self.len());
        let mut to = from;
        while to < self.len()
            && (to == from || self.offsets[to + 1] - self.offsets[from] <= max_bytes)
        {
            to += 1;
        }
        let entries = &self.bytes[self.offsets[from]..self.offsets[to]];
        let mut body = Vec::with_capacity(40 + you.len() + entries.len());
        varint(STATUS_PAGE_VARIANT.into(), &mut body);
        body.extend_from_slice(you);
        varint(self.id, &mut body);
        varint(from as u64, &mut body);
        varint(self.len() as u64, &mut body);
        varint((to - from) as u64, &mut body);
        body.extend_from_slice(entries);
        whole(body)
    }
}

/// `v` as the project's bincode varint (every unsigned integer and every
/// length is encoded this way, PROTOCOL.md §2.1).
fn varint(v: u64, out: &mut Vec<u8>) {
    let _ = bincode::encode_into_std_write(v, out, codec::CONFIG);
}

/// `body` behind its frame header, or `TooLarge` past the hard limit.
fn whole(body: Vec<u8>) -> Result<Bytes, ErrorCode> {
    if body.len() > codec::HARD_MAX_FRAME {
        return Err(ErrorCode::TooLarge);
    }
    let len = u32::try_from(body.len()).map_err(|_| ErrorCode::TooLarge)?;
    let mut f = Vec::with_capacity(codec::FRAME_HEADER_LEN + body.len());
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&body);
    Ok(Bytes::from(f))
}

/// What a snapshot was built from: the registry's and the routing table's
/// change counters.
pub type Version = (u64, u64);

/// The current snapshot and when to build the next.
#[derive(Debug, Default)]
pub struct StatusCache {
    current: Option<(Arc<StatusSnapshot>, Version, Instant)>,
    built: u64,
}

impl StatusCache {
    /// The snapshot to answer from at `now`, when the registry and routing
    /// table are at `version`: the current one if nothing changed since it
    /// was built, or if it is younger than [`STATUS_REFRESH`] and lists
    /// `you`; otherwise a new one from `build` (given the new id).
    pub fn get(
        &mut self,
        now: Instant,
        version: Version,
        you: &str,
        build: impl FnOnce(u64) -> StatusSnapshot,
    ) -> Arc<StatusSnapshot> {
        if let Some((snap, v, at)) = &self.current {
            let fresh = now.saturating_duration_since(*at) < STATUS_REFRESH;
            if *v == version || (fresh && snap.contains(you)) {
                return snap.clone();
            }
        }
        self.built += 1;
        let snap = Arc::new(build(self.built));
        self.current = Some((snap.clone(), version, now));
        snap
    }

    /// Snapshots built so far.
    pub fn builds(&self) -> u64 {
        self.built
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_proto::RelayToPeer;

    fn st(n: usize) -> InstanceStatus {
        InstanceStatus {
            instance_id: format!("inst-{n:05}"),
            name: format!("name {n}"),
            public_key: [n as u8; 32],
            online: n.is_multiple_of(2),
            agents: if n.is_multiple_of(2) {
                vec!["a".into(), "b".into()]
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn frames_are_the_encoded_frames() {
        let all: Vec<_> = (0..5).map(st).collect();
        let snap = StatusSnapshot::build(7, all.clone());
        let want = codec::frame(&RelayToPeer::Status {
            you: st(3),
            instances: all.clone(),
        })
        .unwrap();
        assert_eq!(snap.status_frame("inst-00003").unwrap()[..], want[..]);
        let want = codec::frame(&RelayToPeer::StatusPage {
            you: st(3),
            snapshot: 7,
            start: 1,
            total: 5,
            instances: all[1..5].to_vec(),
        })
        .unwrap();
        assert_eq!(
            snap.page_frame("inst-00003", 1, usize::MAX).unwrap()[..],
            want[..]
        );
        assert_eq!(
            snap.status_frame("inst-99999"),
            Err(ErrorCode::NotRegistered)
        );
    }

    #[test]
    fn pages_cover_every_instance_once_within_their_size() {
        let all: Vec<_> = (0..1000).map(st).collect();
        let snap = StatusSnapshot::build(1, all.clone());
        let mut got = Vec::new();
        let mut pages = 0;
        while got.len() < all.len() {
            let f = snap
                .page_frame("inst-00000", got.len() as u32, 4096)
                .unwrap();
            assert!(f.len() <= 4096 + 200, "{}", f.len());
            let RelayToPeer::StatusPage {
                start,
                total,
                instances,
                snapshot,
                ..
            } = codec::decode(&f[4..]).unwrap()
            else {
                panic!()
            };
            assert_eq!((start as usize, total, snapshot), (got.len(), 1000, 1));
            assert!(!instances.is_empty());
            got.extend(instances);
            pages += 1;
        }
        assert_eq!(got, all);
        assert!(pages > 10, "{pages}");
        // Past the end: an empty page, not an error.
        let f = snap.page_frame("inst-00000", 5000, 4096).unwrap();
        let RelayToPeer::StatusPage { instances, .. } = codec::decode(&f[4..]).unwrap() else {
            panic!()
        };
        assert!(instances.is_empty());
        // A page always carries one entry, however small the limit.
        let f = snap.page_frame("inst-00000", 0, 1).unwrap();
        let RelayToPeer::StatusPage { instances, .. } = codec::decode(&f[4..]).unwrap() else {
            panic!()
        };
        assert_eq!(instances.len(), 1);
    }

    #[test]
    fn a_status_past_the_frame_limit_is_refused_too_large() {
        let big = InstanceStatus {
            name: "x".repeat(1 << 20),
            ..st(0)
        };
        let snap = StatusSnapshot::build(
            1,
            (0..17).map(|n| InstanceStatus {
                instance_id: format!("inst-{n}"),
                ..big.clone()
            }),
        );
        assert_eq!(snap.status_frame("inst-0"), Err(ErrorCode::TooLarge));
        assert!(snap.page_frame("inst-0", 0, STATUS_PAGE_BYTES).is_ok());
    }

    #[test]
    fn the_cache_rebuilds_on_change_at_most_once_per_refresh() {
        let t0 = Instant::now();
        let mut c = StatusCache::default();
        let build = |id| StatusSnapshot::build(id, (0..3).map(st));
        assert_eq!(c.get(t0, (1, 1), "inst-00000", build).id(), 1);
        // Unchanged: reused however old.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(c.get(later, (1, 1), "inst-00000", build).id(), 1);
        // Changed, and older than the refresh: rebuilt.
        assert_eq!(c.get(later, (1, 2), "inst-00000", build).id(), 2);
        // Changed again soon after: reused while younger than the refresh...
        let soon = later + STATUS_REFRESH / 2;
        assert_eq!(c.get(soon, (1, 3), "inst-00000", build).id(), 2);
        // ...unless it does not list the caller (just registered).
        assert_eq!(c.get(soon, (1, 3), "inst-00009", build).id(), 3);
        assert_eq!(c.get(soon, (2, 3), "inst-00000", build).id(), 3);
        assert_eq!(
            c.get(soon + STATUS_REFRESH, (2, 3), "inst-00000", build)
                .id(),
            4
        );
        assert_eq!(c.builds(), 4);
    }
}
