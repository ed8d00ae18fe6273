//! One agent's durable inbox on its own computer: plain files, no I/O but
//! the file system's, blocking (the daemon calls it on blocking threads).
//!
//! Layout of `DIR/inbox/AGENT/` (0700):
//! - `ID.msg` (0600, `ID` = the message id in 32 hex digits): one waiting
//!   message, written to `.ID.tmp`, made durable with one `syncfs` per
//!   batch, renamed into place, and the folder fsynced once per batch
//!   (group commit) before any receipt goes out.
//! - `seen.log` (0600): one record per message that left the inbox (acked
//!   or expired) — id, sender instance, sent and stored times, read time —
//!   so that a retry or a replay of it is still answered with its first
//!   receipt after a restart, for as long as its timestamp could pass the
//!   window. Appended and fsynced on every ack; rewritten without the old
//!   records when the inbox is opened.
//! - `.ID.tmp`: a write a crash cut short; removed on open (its sender got
//!   no receipt).
//!
//! Which ids are known (waiting or seen) is kept in memory; message bodies
//! are read from their files only when a client asks for them.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bincode::{Decode, Encode};

/// A message id.
pub(crate) type Id = [u8; 16];

const MSG_MAGIC: &[u8; 4] = b"ALM\x01";
const SEEN_MAGIC: &[u8; 4] = b"ALS\x01";
/// The seen log's name inside an agent's folder.
const SEEN_LOG: &str = "seen.log";
/// Longest sender address, recipient address or seen record we decode
/// (ids are at most 64 characters each).
const MAX_RECORD: usize = 512;

/// Bounds of one agent's inbox (`agent-link-config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Waiting messages at most.
    pub(crate) max_messages: usize,
    /// Waiting payload bytes at most.
    pub(crate) max_bytes: u64,
    /// A waiting message older than this (ms since it was stored) is removed.
    pub(crate) ttl_ms: u64,
}

/// A message to store, as the receiving agent verified it.
#[derive(Debug, Clone)]
pub(crate) struct Incoming<'a> {
    pub(crate) id: Id,
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) sent_at_ms: u64,
    pub(crate) payload: &'a [u8],
}

/// What became of one message of a batch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Durable as of this time (Unix ms): send the receipt.
    New { at_ms: u64 },
    /// Known already (waiting or seen): answer with its first time.
    Duplicate { at_ms: u64 },
    /// Over the inbox's bounds, or the disk is full: refuse `InboxFull`.
    Full,
    /// The same id from another sender instance: refuse; the one stored
    /// stays as it is.
    Conflict,
    /// Could not be written: refuse (`Internal`); nothing was kept.
    Failed,
}

/// A waiting message's metadata (its payload stays in its file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Waiting {
    pub(crate) id: Id,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) sent_at_ms: u64,
    pub(crate) received_at_ms: u64,
    pub(crate) size: u64,
}

/// A waiting message with its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Full {
    pub(crate) meta: Waiting,
    pub(crate) payload: Vec<u8>,
}

/// `ID.msg` after its magic.
#[derive(Encode, Decode)]
struct MsgRecord {
    id: Id,
    from: String,
    to: String,
    sent_at_ms: u64,
    received_at_ms: u64,
    payload: Vec<u8>,
}

/// One record of `seen.log`, after its 4-byte little-endian length.
#[derive(Debug, Clone, Encode, Decode)]
struct SeenRecord {
    id: Id,
    from_instance: String,
    sent_at_ms: u64,
    delivered_at_ms: u64,
    /// 0: removed unread (expired).
    read_at_ms: u64,
}

#[derive(Debug, Clone)]
enum Known {
    Waiting(Waiting),
    Seen(SeenRecord),
}

/// One agent's inbox.
#[derive(Debug)]
pub(crate) struct Inbox {
    dir: PathBuf,
    limits: Limits,
    /// Every id waiting or seen.
    known: HashMap<Id, Known>,
    /// Waiting ids, oldest first: (stored at, id).
    order: BTreeSet<(u64, Id)>,
    bytes: u64,
    seen_log: File,
    /// Records in the seen log (compacted when most are no longer needed).
    log_records: usize,
    /// Messages removed unread because they outlived `ttl_ms`, since open.
    expired: u64,
}

/// What opening an inbox found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Messages waiting.
    pub(crate) waiting: usize,
    /// Unfinished writes removed.
    pub(crate) torn: usize,
    /// Files that did not decode, left in place and named in the log.
    pub(crate) unreadable: Vec<String>,
}

/// Why an ack did nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AckError {
    /// No such message waiting (never came, or already acked).
    #[error("no message {0} in the inbox")]
    NotFound(String),
    /// The seen log could not be written: the message stays.
    #[error("could not record the ack: {0}")]
    Io(#[from] io::Error),
}

/// The hex name of an id.
pub(crate) fn hex_id(id: &Id) -> String {
    hex::encode(id)
}

/// An id from its 32 hex digits; anything else (`../x`, upper case, short)
/// is not an id.
pub(crate) fn parse_id(text: &str) -> Option<Id> {
    if text.len() != 32
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut id = [0u8; 16];
    hex::decode_to_slice(text, &mut id).ok()?;
    Some(id)
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 64 * 1024 * 1024 + 4096 }>()
}

fn is_disk_full(e: &io::Error) -> bool {
    // ENOSPC and EDQUOT: the disk (or the user's quota) is full.
    matches!(e.raw_os_error(), Some(28) | Some(122)) || e.kind() == io::ErrorKind::StorageFull
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The instance part of `instance/agent`.
pub(crate) fn instance_of(address: &str) -> &str {
    address.split_once('/').map_or(address, |(i, _)| i)
}

impl Inbox {
    /// Open (or make) the inbox in `dir`, reading what a previous run left:
    /// waiting messages, seen ids younger than `keep_seen_ms` (older ones
    /// are dropped from the log), unfinished writes (removed).
    pub(crate) fn open(
        dir: &Path,
        limits: Limits,
        now_ms: u64,
        keep_seen_ms: u64,
    ) -> io::Result<(Self, Opened)> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut opened = Opened::default();
        let mut known = HashMap::new();
        let mut order = BTreeSet::new();
        let mut bytes = 0u64;
        // Seen ids first: a message both waiting and seen was acked and its
        // file not yet removed when the process stopped.
        let log_path = dir.join(SEEN_LOG);
        let mut young = Vec::new();
        if let Ok(mut f) = File::open(&log_path) {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            for r in decode_seen(&buf) {
                if now_ms.saturating_sub(r.sent_at_ms) <= keep_seen_ms {
                    young.push(r);
                }
            }
        }
        for r in &young {
            known.insert(r.id, Known::Seen(r.clone()));
        }
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
                opened.torn += 1;
                continue;
            }
            let Some(id) = name.strip_suffix(".msg").and_then(parse_id) else {
                continue;
            };
            if known.contains_key(&id) {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            match read_msg(&entry.path()) {
                Ok(rec) if rec.id == id => {
                    let w = Waiting {
                        id,
                        from: rec.from,
                        to: rec.to,
                        sent_at_ms: rec.sent_at_ms,
                        received_at_ms: rec.received_at_ms,
                        size: rec.payload.len() as u64,
                    };
                    bytes += w.size;
                    order.insert((w.received_at_ms, id));
                    known.insert(id, Known::Waiting(w));
                }
                _ => opened.unreadable.push(entry.path().display().to_string()),
            }
        }
        let seen_log = write_seen_log(&log_path, young.iter())?;
        let log_records = young.len();
        opened.waiting = order.len();
        let mut inbox = Self {
            dir: dir.to_path_buf(),
            limits,
            known,
            order,
            bytes,
            seen_log,
            log_records,
            expired: 0,
        };
        inbox.sweep(now_ms, keep_seen_ms)?;
        Ok((inbox, opened))
    }

    /// Messages waiting.
    pub(crate) fn depth(&self) -> usize {
        self.order.len()
    }

    /// Payload bytes waiting.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Messages removed unread (TTL) since the inbox was opened.
    pub(crate) fn expired(&self) -> u64 {
        self.expired
    }

    /// Ids remembered, waiting or seen.
    #[cfg(test)]
    pub(crate) fn known(&self) -> usize {
        self.known.len()
    }

    /// Store messages that arrived together: every new one is written and
    /// fsynced, then the folder once; an outcome per message, in order.
    /// `Stored::New` is only returned once the message is durable.
    pub(crate) fn store(&mut self, batch: &[Incoming<'_>], now_ms: u64) -> Vec<Stored> {
        let mut out = Vec::with_capacity(batch.len());
        let mut written: Vec<(usize, Waiting, PathBuf)> = Vec::new();
        let (mut count, mut bytes) = (self.order.len(), self.bytes);
        for (i, m) in batch.iter().enumerate() {
            match self.known.get(&m.id) {
                Some(k) => {
                    let (from, at) = match k {
                        Known::Waiting(w) => (instance_of(&w.from), w.received_at_ms),
                        Known::Seen(s) => (s.from_instance.as_str(), s.delivered_at_ms),
                    };
                    out.push(if from == instance_of(m.from) {
                        Stored::Duplicate { at_ms: at }
                    } else {
                        Stored::Conflict
                    });
                    continue;
                }
                None if written.iter().any(|(_, w, _)| w.id == m.id) => {
                    // Twice in one batch: the second is the first's duplicate.
                    out.push(Stored::Duplicate { at_ms: now_ms });
                    continue;
                }
                None => {}
            }
            let size = m.payload.len() as u64;
            if count + 1 > self.limits.max_messages || bytes + size > self.limits.max_bytes {
                out.push(Stored::Full);
                continue;
            }
            let rec = MsgRecord {
                id: m.id,
                from: m.from.to_string(),
                to: m.to.to_string(),
                sent_at_ms: m.sent_at_ms,
                received_at_ms: now_ms,
                payload: m.payload.to_vec(),
            };
            match self.write_tmp(&rec) {
                Ok(tmp) => {
                    count += 1;
                    bytes += size;
                    out.push(Stored::Failed); // until the batch is durable
                    written.push((
                        i,
                        Waiting {
                            id: m.id,
                            from: rec.from,
                            to: rec.to,
                            sent_at_ms: m.sent_at_ms,
                            received_at_ms: now_ms,
                            size,
                        },
                        tmp,
                    ));
                }
                Err(e) if is_disk_full(&e) => out.push(Stored::Full),
                Err(e) => {
                    tracing::warn!(inbox = %self.dir.display(), "could not write a message: {e}");
                    out.push(Stored::Failed);
                }
            }
        }
        if written.is_empty() {
            return out;
        }
        // Group commit: every file's data durable with one syncfs, then
        // into place, then one fsync of the folder, whatever the batch's
        // size (a per-file fsync costs a journal commit each). syncfs also
        // flushes other dirty data of this file system: the price of one
        // flush for many messages.
        if let Err(e) =
            File::open(&self.dir).and_then(|d| rustix::fs::syncfs(&d).map_err(io::Error::from))
        {
            tracing::warn!(inbox = %self.dir.display(), "could not sync the inbox: {e}");
            let full = is_disk_full(&e);
            for (i, _, tmp) in written {
                let _ = fs::remove_file(tmp);
                out[i] = if full { Stored::Full } else { Stored::Failed };
            }
            return out;
        }
        let mut renamed = Vec::with_capacity(written.len());
        for (i, w, tmp) in written {
            let path = self.msg_path(&w.id);
            match fs::rename(&tmp, &path) {
                Ok(()) => renamed.push((i, w, path)),
                Err(e) => {
                    tracing::warn!(inbox = %self.dir.display(), "could not move a message into place: {e}");
                    let _ = fs::remove_file(&tmp);
                }
            }
        }
        if let Err(e) = sync_dir(&self.dir) {
            // Not durable: no receipt, and nothing left that a client could
            // read while its sender was told it failed.
            tracing::warn!(inbox = %self.dir.display(), "could not sync the inbox: {e}");
            let full = is_disk_full(&e);
            for (i, _, path) in renamed {
                let _ = fs::remove_file(path);
                out[i] = if full { Stored::Full } else { Stored::Failed };
            }
            return out;
        }
        for (i, w, _) in renamed {
            self.bytes += w.size;
            self.order.insert((w.received_at_ms, w.id));
            self.known.insert(w.id, Known::Waiting(w));
            out[i] = Stored::New { at_ms: now_ms };
        }
        out
    }

    fn msg_path(&self, id: &Id) -> PathBuf {
        self.dir.join(format!("{}.msg", hex_id(id)))
    }

    /// Write one message to its temporary file and fsync it.
    fn write_tmp(&self, rec: &MsgRecord) -> io::Result<PathBuf> {
        let tmp = self.dir.join(format!(".{}.tmp", hex_id(&rec.id)));
        let mut body = Vec::with_capacity(rec.payload.len() + 128);
        body.extend_from_slice(MSG_MAGIC);
        bincode::encode_into_std_write(rec, &mut body, config()).map_err(io::Error::other)?;
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // Made durable by the batch's syncfs (see `store`).
            f.write_all(&body)
        })();
        match result {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Waiting messages, oldest first, at most `limit`.
    pub(crate) fn list(&self, limit: usize) -> Vec<Waiting> {
        self.order
            .iter()
            .take(limit)
            .filter_map(|(_, id)| match self.known.get(id) {
                Some(Known::Waiting(w)) => Some(w.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether `id` is waiting.
    pub(crate) fn is_waiting(&self, id: &Id) -> bool {
        matches!(self.known.get(id), Some(Known::Waiting(_)))
    }

    /// A waiting message with its payload, read from its file.
    pub(crate) fn read(&self, id: &Id) -> io::Result<Option<Full>> {
        let Some(Known::Waiting(w)) = self.known.get(id) else {
            return Ok(None);
        };
        let rec = read_msg(&self.msg_path(id))?;
        Ok(Some(Full {
            meta: w.clone(),
            payload: rec.payload,
        }))
    }

    /// When `id` was read, if it was acked (0 if it expired unread).
    pub(crate) fn read_at(&self, id: &Id) -> Option<(String, u64)> {
        match self.known.get(id) {
            Some(Known::Seen(s)) => Some((s.from_instance.clone(), s.read_at_ms)),
            _ => None,
        }
    }

    /// The sender instance of a waiting or seen message.
    pub(crate) fn sender_of(&self, id: &Id) -> Option<&str> {
        match self.known.get(id) {
            Some(Known::Waiting(w)) => Some(instance_of(&w.from)),
            Some(Known::Seen(s)) => Some(&s.from_instance),
            None => None,
        }
    }

    /// The agent read message `id`: record that durably, then remove its
    /// file. Returns its metadata.
    pub(crate) fn ack(&mut self, id: &Id, now_ms: u64) -> Result<Waiting, AckError> {
        self.ack_many(std::slice::from_ref(id), now_ms)
            .pop()
            .expect("one answer per id")
    }

    /// Ack several messages with one write and one fsync of the seen log:
    /// an answer per id, in order (a repeated id is `NotFound` the second
    /// time). Nothing is removed unless the log write succeeded.
    pub(crate) fn ack_many(&mut self, ids: &[Id], now_ms: u64) -> Vec<Result<Waiting, AckError>> {
        let mut out = Vec::with_capacity(ids.len());
        let mut recs = Vec::new();
        let mut buf = Vec::with_capacity(96 * ids.len());
        for id in ids {
            match self.known.get(id) {
                Some(Known::Waiting(w))
                    if !recs
                        .iter()
                        .any(|(r, _): &(SeenRecord, Waiting)| r.id == *id) =>
                {
                    let rec = SeenRecord {
                        id: *id,
                        from_instance: instance_of(&w.from).to_string(),
                        sent_at_ms: w.sent_at_ms,
                        delivered_at_ms: w.received_at_ms,
                        read_at_ms: now_ms.max(1),
                    };
                    push_seen(&mut buf, &rec);
                    recs.push((rec, w.clone()));
                    out.push(None);
                }
                _ => out.push(Some(AckError::NotFound(hex_id(id)))),
            }
        }
        if !recs.is_empty() {
            let written = self
                .seen_log
                .write_all(&buf)
                .and_then(|()| self.seen_log.sync_data());
            if let Err(e) = written {
                return ids
                    .iter()
                    .zip(out)
                    .map(|(_, o)| {
                        Err(o.unwrap_or_else(|| {
                            AckError::Io(io::Error::new(e.kind(), e.to_string()))
                        }))
                    })
                    .collect();
            }
            self.log_records += recs.len();
        }
        let mut done = recs.into_iter();
        out.into_iter()
            .map(|o| match o {
                Some(e) => Err(e),
                None => {
                    let (rec, w) = done.next().expect("one record per acked id");
                    self.forget_waiting(&w);
                    // Removed after the log says it was read: a crash in
                    // between leaves a file that the next open drops.
                    let _ = fs::remove_file(self.msg_path(&rec.id));
                    self.known.insert(rec.id, Known::Seen(rec));
                    Ok(w)
                }
            })
            .collect()
    }

    fn forget_waiting(&mut self, w: &Waiting) {
        self.order.remove(&(w.received_at_ms, w.id));
        self.bytes = self.bytes.saturating_sub(w.size);
    }

    fn append_seen(&mut self, rec: &SeenRecord) -> io::Result<()> {
        let mut buf = Vec::with_capacity(96);
        push_seen(&mut buf, rec);
        self.seen_log.write_all(&buf)?;
        self.seen_log.sync_data()?;
        self.log_records += 1;
        Ok(())
    }

    /// Remove waiting messages older than the TTL (counted as expired) and
    /// forget seen ids older than `keep_seen_ms`.
    pub(crate) fn sweep(&mut self, now_ms: u64, keep_seen_ms: u64) -> io::Result<()> {
        let ttl = self.limits.ttl_ms;
        let old: Vec<(u64, Id)> = self
            .order
            .iter()
            .take_while(|(at, _)| now_ms.saturating_sub(*at) > ttl)
            .copied()
            .collect();
        for (_, id) in old {
            let Some(Known::Waiting(w)) = self.known.get(&id).cloned() else {
                continue;
            };
            let rec = SeenRecord {
                id,
                from_instance: instance_of(&w.from).to_string(),
                sent_at_ms: w.sent_at_ms,
                delivered_at_ms: w.received_at_ms,
                read_at_ms: 0,
            };
            self.append_seen(&rec)?;
            self.forget_waiting(&w);
            self.known.insert(id, Known::Seen(rec));
            let _ = fs::remove_file(self.msg_path(&id));
            self.expired += 1;
        }
        self.known.retain(|_, k| match k {
            Known::Waiting(_) => true,
            Known::Seen(s) => now_ms.saturating_sub(s.sent_at_ms) <= keep_seen_ms,
        });
        // The log again, with only what is still remembered, once most of
        // it is old: it stays in proportion to the window's traffic.
        let seen = self.known.len() - self.order.len();
        if self.log_records > 2 * seen + 1024 {
            let young = self.known.values().filter_map(|k| match k {
                Known::Seen(s) => Some(s),
                Known::Waiting(_) => None,
            });
            self.seen_log = write_seen_log(&self.dir.join(SEEN_LOG), young)?;
            self.log_records = seen;
        }
        Ok(())
    }

    /// The folder, for removing the whole inbox.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

fn read_msg(path: &Path) -> io::Result<MsgRecord> {
    let buf = fs::read(path)?;
    let body = buf
        .strip_prefix(MSG_MAGIC)
        .ok_or_else(|| io::Error::other("not an inbox message file"))?;
    let (rec, used): (MsgRecord, usize) =
        bincode::decode_from_slice(body, config()).map_err(io::Error::other)?;
    if used != body.len() {
        return Err(io::Error::other("trailing bytes in an inbox message file"));
    }
    Ok(rec)
}

/// Replace the seen log with `records` (atomically) and open it to append.
fn write_seen_log<'a>(
    path: &Path,
    records: impl Iterator<Item = &'a SeenRecord>,
) -> io::Result<File> {
    let mut fresh = Vec::from(*SEEN_MAGIC);
    for r in records {
        push_seen(&mut fresh, r);
    }
    agent_link_crypto::files::write_atomic(path, &fresh, 0o600)
        .map_err(|e| io::Error::other(e.to_string()))?;
    OpenOptions::new().append(true).open(path)
}

fn push_seen(buf: &mut Vec<u8>, rec: &SeenRecord) {
    let body = bincode::encode_to_vec(rec, bincode::config::standard())
        .expect("a seen record of bounded fields encodes");
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
}

/// The records of a seen log, up to the first torn or foreign one (a crash
/// mid-append leaves at most the last one torn).
fn decode_seen(buf: &[u8]) -> Vec<SeenRecord> {
    let mut out = Vec::new();
    let Some(mut rest) = buf.strip_prefix(SEEN_MAGIC) else {
        return out;
    };
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > MAX_RECORD || rest.len() < 4 + len {
            break;
        }
        let Ok((r, used)) = bincode::decode_from_slice::<SeenRecord, _>(
            &rest[4..4 + len],
            bincode::config::standard(),
        ) else {
            break;
        };
        if used != len {
            break;
        }
        out.push(r);
        rest = &rest[4 + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_messages: 3,
        max_bytes: 100,
        ttl_ms: 10_000,
    };
    const KEEP: u64 = 120_000;

    fn msg<'a>(id: u8, from: &'a str, payload: &'a [u8]) -> Incoming<'a> {
        Incoming {
            id: [id; 16],
            from,
            to: "me/bob",
            sent_at_ms: 1_000,
            payload,
        }
    }

    fn open(dir: &Path, now: u64) -> Inbox {
        Inbox::open(dir, LIMITS, now, KEEP).unwrap().0
    }

    #[test]
    fn stored_messages_survive_a_restart_and_duplicates_get_the_first_time() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("bob");
        let mut inbox = open(&dir, 1_000);
        let out = inbox.store(&[msg(1, "a/x", b"one"), msg(2, "a/x", b"two")], 1_005);
        assert_eq!(
            out,
            vec![Stored::New { at_ms: 1_005 }, Stored::New { at_ms: 1_005 }]
        );
        assert!(dir.join(format!("{}.msg", hex_id(&[1; 16]))).exists());
        drop(inbox);
        let (mut inbox, opened) = Inbox::open(&dir, LIMITS, 2_000, KEEP).unwrap();
        assert_eq!(opened.waiting, 2);
        assert_eq!(
            inbox.store(&[msg(1, "a/x", b"one")], 2_000),
            vec![Stored::Duplicate { at_ms: 1_005 }]
        );
        let full = inbox.read(&[2; 16]).unwrap().unwrap();
        assert_eq!(full.payload, b"two");
        assert_eq!(full.meta.from, "a/x");
        assert_eq!(inbox.list(10).len(), 2);
    }

    #[test]
    fn an_acked_id_is_still_known_after_a_restart_until_it_is_too_old() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("bob");
        let mut inbox = open(&dir, 1_000);
        inbox.store(&[msg(1, "a/x", b"one")], 1_005);
        inbox.ack(&[1; 16], 1_500).unwrap();
        assert_eq!(inbox.depth(), 0);
        assert!(matches!(
            inbox.ack(&[1; 16], 1_600),
            Err(AckError::NotFound(_))
        ));
        drop(inbox);
        let mut inbox = open(&dir, 5_000);
        assert_eq!(inbox.depth(), 0, "acked is not waiting again");
        assert_eq!(
            inbox.store(&[msg(1, "a/x", b"one")], 5_000),
            vec![Stored::Duplicate { at_ms: 1_005 }]
        );
        assert_eq!(inbox.read_at(&[1; 16]), Some(("a".into(), 1_500)));
        drop(inbox);
        // Past the window the id is forgotten (a message that old is
        // refused by its timestamp anyway) and the log shrinks.
        let mut inbox = open(&dir, 1_000 + KEEP + 1);
        assert_eq!(inbox.known(), 0);
        let log = fs::metadata(dir.join(SEEN_LOG)).unwrap().len();
        assert_eq!(log, 4, "only the magic is left");
        assert_eq!(
            inbox
                .store(&[msg(1, "a/x", b"one")], 1_000 + KEEP + 1)
                .len(),
            1
        );
    }

    #[test]
    fn many_acks_in_one_log_write() {
        let d = tempfile::tempdir().unwrap();
        let mut inbox = open(d.path(), 0);
        inbox.store(
            &[
                msg(1, "a/x", b"1"),
                msg(2, "a/x", b"2"),
                msg(3, "a/x", b"3"),
            ],
            10,
        );
        let out = inbox.ack_many(&[[1; 16], [9; 16], [2; 16], [1; 16]], 20);
        let ok: Vec<bool> = out.iter().map(Result::is_ok).collect();
        assert_eq!(
            ok,
            [true, false, true, false],
            "unknown and repeated ids are NotFound"
        );
        assert_eq!(inbox.depth(), 1);
        drop(inbox);
        let inbox = open(d.path(), 30);
        assert_eq!(inbox.depth(), 1);
        assert_eq!(inbox.read_at(&[2; 16]), Some(("a".into(), 20)));
    }

    #[test]
    fn a_full_inbox_refuses_and_touches_nothing_stored() {
        let d = tempfile::tempdir().unwrap();
        let mut inbox = open(d.path(), 0);
        let out = inbox.store(
            &[
                msg(1, "a/x", b"1"),
                msg(2, "a/x", b"2"),
                msg(3, "a/x", b"3"),
                msg(4, "a/x", b"4"),
            ],
            10,
        );
        assert_eq!(out[3], Stored::Full, "count bound");
        assert_eq!(inbox.depth(), 3);
        inbox.ack(&[1; 16], 20).unwrap();
        let big = vec![0u8; 99];
        assert_eq!(
            inbox.store(&[msg(5, "a/x", &big)], 30),
            vec![Stored::Full],
            "byte bound"
        );
        assert_eq!(
            inbox.store(&[msg(5, "a/x", &big[..98])], 30),
            vec![Stored::New { at_ms: 30 }]
        );
        assert_eq!(inbox.bytes(), 100);
        for id in [2u8, 3] {
            assert!(inbox.read(&[id; 16]).unwrap().is_some());
        }
    }

    #[test]
    fn the_same_id_from_another_sender_is_a_conflict_not_a_receipt() {
        let d = tempfile::tempdir().unwrap();
        let mut inbox = open(d.path(), 0);
        inbox.store(&[msg(1, "a/x", b"real")], 10);
        assert_eq!(
            inbox.store(&[msg(1, "evil/x", b"fake")], 11),
            vec![Stored::Conflict]
        );
        assert_eq!(inbox.read(&[1; 16]).unwrap().unwrap().payload, b"real");
    }

    #[test]
    fn old_messages_expire_and_are_counted_and_remembered() {
        let d = tempfile::tempdir().unwrap();
        let mut inbox = open(d.path(), 0);
        inbox.store(&[msg(1, "a/x", b"old")], 100);
        inbox.store(&[msg(2, "a/x", b"new")], 9_000);
        inbox.sweep(10_200, KEEP).unwrap();
        assert_eq!((inbox.depth(), inbox.expired()), (1, 1));
        assert_eq!(inbox.read_at(&[1; 16]), Some(("a".into(), 0)));
        assert!(!d.path().join(format!("{}.msg", hex_id(&[1; 16]))).exists());
    }

    #[test]
    fn torn_writes_and_a_torn_log_tail_are_cleaned_up_on_open() {
        let d = tempfile::tempdir().unwrap();
        let mut inbox = open(d.path(), 0);
        inbox.store(&[msg(1, "a/x", b"one")], 10);
        inbox.ack(&[1; 16], 20).unwrap();
        drop(inbox);
        fs::write(d.path().join(format!(".{}.tmp", hex_id(&[7; 16]))), b"half").unwrap();
        let mut log = OpenOptions::new()
            .append(true)
            .open(d.path().join(SEEN_LOG))
            .unwrap();
        log.write_all(&[40, 0, 0, 0, 1, 2]).unwrap();
        drop(log);
        let (inbox, opened) = Inbox::open(d.path(), LIMITS, 30, KEEP).unwrap();
        assert_eq!(opened.torn, 1);
        assert_eq!(
            inbox.read_at(&[1; 16]),
            Some(("a".into(), 20)),
            "records before the tear are kept"
        );
        assert!(!d.path().join(format!(".{}.tmp", hex_id(&[7; 16]))).exists());
    }

    #[test]
    fn the_seen_log_is_compacted_while_running_once_most_of_it_is_old() {
        let d = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_messages: 10_000,
            max_bytes: 1 << 20,
            ttl_ms: u64::MAX,
        };
        let (mut inbox, _) = Inbox::open(d.path(), limits, 0, KEEP).unwrap();
        for i in 0..1100u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_le_bytes());
            inbox.store(
                &[Incoming {
                    id,
                    from: "a/x",
                    to: "me/bob",
                    sent_at_ms: 0,
                    payload: b"p",
                }],
                1,
            );
            inbox.ack(&id, 2).unwrap();
        }
        let log = d.path().join(SEEN_LOG);
        let big = fs::metadata(&log).unwrap().len();
        // All old now: forgotten in memory and dropped from the log.
        inbox.sweep(KEEP + 1, KEEP).unwrap();
        assert_eq!(fs::metadata(&log).unwrap().len(), 4, "was {big}");
        // And the log still takes appends.
        inbox.store(&[msg(9, "a/x", b"z")], KEEP + 2);
        inbox.ack(&[9; 16], KEEP + 3).unwrap();
        drop(inbox);
        let inbox = open(d.path(), KEEP + 4);
        assert!(inbox.read_at(&[9; 16]).is_some());
    }

    #[test]
    fn ids_are_exactly_32_lower_hex_digits() {
        assert_eq!(parse_id(&"ab".repeat(16)), Some([0xab; 16]));
        for bad in [
            "../x",
            "",
            &"AB".repeat(16),
            &"a".repeat(31),
            &"a".repeat(33),
            &format!("{}/", "a".repeat(31)),
        ] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("bob");
        let mut inbox = open(&dir, 0);
        inbox.store(&[msg(1, "a/x", b"one")], 10);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(format!("{}.msg", hex_id(&[1; 16])))), 0o600);
        assert_eq!(mode(&dir.join(SEEN_LOG)), 0o600);
    }
}
