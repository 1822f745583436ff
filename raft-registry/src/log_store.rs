//! The Raft log and vote on disk (openraft `RaftLogStorage` + `RaftLogReader`).
//!
//! - `raft-log`: append-only framed records ([`crate::disk`]). An append is fsynced before
//!   openraft's callback fires. Truncation cuts the file at the first removed record and fsyncs.
//!   Purging rewrites the (short) remainder atomically, led by a `Purged` record. A torn tail left
//!   by a crash mid-append is cut off at open.
//! - `raft-meta`: the vote and the committed log id, replaced atomically on every change. The
//!   committed id must be durable before openraft applies up to it, although Raft itself does
//!   not need it: a node restarted with an older one would apply less than it had applied
//!   before the crash, and the node layer serves tenants by the registry it applied. A node that
//!   had applied "this tenant moved away" must not serve it again from an older state (the
//!   simulator found this: with the id kept in memory only, a restarted node took back a tenant
//!   it had handed off, accepted a write, and the write was lost when the handoff it had not yet
//!   applied replaced its copy).
//!
//! Entries are also kept in memory for readers; purging after each snapshot bounds them to about
//! `logs_to_keep + snapshot_interval` entries. File I/O is synchronous inside the async methods:
//! registry writes are rare admin operations and each call is a single small write + fsync.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError};
use serde::{Deserialize, Serialize};

use crate::disk::{self, io_err, Fs, FsFile, StoreError};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// File name of the log.
pub const LOG_FILE: &str = "raft-log";
/// File name of the vote + committed record.
pub const META_FILE: &str = "raft-meta";

/// One record of the log file.
#[derive(Serialize, Deserialize)]
pub(crate) enum LogRecord {
    /// Everything up to and including this id was purged; only ever the first record.
    Purged(LogId),
    Entry(Entry),
}

/// Contents of `raft-meta`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub(crate) vote: Option<Vote>,
    pub(crate) committed: Option<LogId>,
}

struct LogInner {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    file: Box<dyn FsFile>,
    /// Length of the valid part of the log file.
    end: u64,
    entries: BTreeMap<u64, Entry>,
    /// Log index → byte offset of its record in the file (for truncation).
    offsets: BTreeMap<u64, u64>,
    last_purged: Option<LogId>,
    meta: Meta,
}

/// The on-disk log store. Clones share one log (the clone is openraft's log reader).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl From<StoreError> for StorageError {
    fn from(e: StoreError) -> Self {
        StorageError::IO {
            source: StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, AnyError::new(&e)),
        }
    }
}

impl LogStore {
    /// Opens (or creates) the log in `dir` on the real disk, discarding a torn tail record.
    pub fn open(dir: &Path) -> Result<LogStore, StoreError> {
        LogStore::open_on(disk::std_fs(), dir)
    }

    /// Opens (or creates) the log in `dir` on `fs`, discarding a torn tail record.
    pub fn open_on(fs: Arc<dyn Fs>, dir: &Path) -> Result<LogStore, StoreError> {
        disk::create_dir_durable(fs.as_ref(), dir)?;
        let meta =
            disk::read_record_file::<Meta>(fs.as_ref(), &dir.join(META_FILE))?.unwrap_or_default();
        let path = dir.join(LOG_FILE);
        let existed = fs.exists(&path).map_err(io_err("stat", &path))?;
        let bytes =
            if existed { fs.read(&path).map_err(io_err("read", &path))? } else { Vec::new() };
        let replay = replay(&path, &bytes)?;
        let mut file = fs.open_append(&path).map_err(io_err("open", &path))?;
        if replay.end < bytes.len() as u64 {
            let discarded_bytes = bytes.len() as u64 - replay.end;
            tracing::warn!(path = %path.display(), discarded_bytes, "discarding torn log tail");
            file.set_len(replay.end).map_err(io_err("truncate", &path))?;
        }
        // What was read may sit only in the page cache, written by a process that died before
        // its fsync (an append that failed, a kill): make it durable before Raft counts on it.
        file.sync_all().map_err(io_err("fsync", &path))?;
        if !existed {
            disk::sync_dir(fs.as_ref(), dir)?;
        }
        let inner = LogInner {
            fs,
            dir: dir.to_path_buf(),
            file,
            end: replay.end,
            entries: replay.entries,
            offsets: replay.offsets,
            last_purged: replay.last_purged,
            meta,
        };
        Ok(LogStore { inner: Arc::new(Mutex::new(inner)) })
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // Poisoned only if a previous holder panicked, i.e. a broken invariant already aborted us.
        self.inner.lock().unwrap_or_else(|p| panic!("log store mutex poisoned: {p}"))
    }

    /// Appends and fsyncs `entries` (the synchronous core of `append`).
    pub(crate) fn append_sync(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<(), StoreError> {
        self.lock().append(entries)
    }
}

/// What the scan of an existing log file found.
pub(crate) struct Replay {
    pub(crate) entries: BTreeMap<u64, Entry>,
    offsets: BTreeMap<u64, u64>,
    last_purged: Option<LogId>,
    pub(crate) end: u64,
}

/// Scans the log file; stops at the first torn record. A record that passes its checksum but
/// does not decode, or breaks the sequence, is corruption, not a torn tail.
pub(crate) fn replay(path: &Path, bytes: &[u8]) -> Result<Replay, StoreError> {
    let mut r =
        Replay { entries: BTreeMap::new(), offsets: BTreeMap::new(), last_purged: None, end: 0 };
    let corrupt = |reason: String| StoreError::Corrupt { path: path.to_path_buf(), reason };
    while let Some((payload, len)) = disk::parse_frame(&bytes[r.end as usize..]) {
        match disk::decode::<LogRecord>(path, payload)? {
            LogRecord::Purged(id) if r.entries.is_empty() && r.last_purged.is_none() => {
                r.last_purged = Some(id)
            }
            LogRecord::Purged(_) => {
                return Err(corrupt(format!("purge record not first, at byte {}", r.end)))
            }
            LogRecord::Entry(e) => {
                if r.entries.keys().next_back().is_some_and(|&last| e.log_id.index <= last) {
                    return Err(corrupt(format!("entry {} does not ascend", e.log_id.index)));
                }
                r.offsets.insert(e.log_id.index, r.end);
                r.entries.insert(e.log_id.index, e);
            }
        }
        r.end += len as u64;
    }
    Ok(r)
}

impl LogInner {
    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.entries.values().next_back().map(|e| e.log_id).or(self.last_purged)
    }

    fn append(&mut self, entries: impl IntoIterator<Item = Entry>) -> Result<(), StoreError> {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // openraft truncates before it overwrites, and appends consecutively; its storage test
        // suite also appends over existing entries and with holes. Overwriting is a truncation, so
        // entries in the file always ascend.
        if let Some(first) = entries.first() {
            if self.entries.keys().next_back().is_some_and(|&last| last >= first.log_id.index) {
                self.truncate(first.log_id.index)?;
            }
        }
        let mut buf = Vec::new();
        for entry in entries {
            let record = disk::frame(&disk::encode("log entry", &LogRecord::Entry(entry.clone()))?);
            self.offsets.insert(entry.log_id.index, self.end + buf.len() as u64);
            self.entries.insert(entry.log_id.index, entry);
            buf.extend_from_slice(&record);
        }
        let path = self.log_path();
        self.file.write_all(&buf).map_err(io_err("append", &path))?;
        self.file.sync_data().map_err(io_err("fsync", &path))?;
        self.end += buf.len() as u64;
        Ok(())
    }

    /// Removes entries with index ≥ `index` from memory and the file.
    fn truncate(&mut self, index: u64) -> Result<(), StoreError> {
        let Some((_, &offset)) = self.offsets.range(index..).next() else {
            return Ok(());
        };
        let path = self.log_path();
        self.file.set_len(offset).map_err(io_err("truncate", &path))?;
        self.file.sync_data().map_err(io_err("fsync", &path))?;
        self.end = offset;
        self.entries.split_off(&index);
        self.offsets.split_off(&index);
        Ok(())
    }

    /// Forgets entries up to `upto` and rewrites the file without them, atomically.
    fn purge(&mut self, upto: LogId) -> Result<(), StoreError> {
        if self.last_purged.is_some_and(|p| p.index >= upto.index) {
            return Ok(());
        }
        self.entries = self.entries.split_off(&(upto.index + 1));
        self.last_purged = Some(upto);
        let mut bytes = disk::frame(&disk::encode("purge record", &LogRecord::Purged(upto))?);
        let mut offsets = BTreeMap::new();
        for (index, entry) in &self.entries {
            offsets.insert(*index, bytes.len() as u64);
            bytes.extend_from_slice(&disk::frame(&disk::encode(
                "log entry",
                &LogRecord::Entry(entry.clone()),
            )?));
        }
        disk::write_atomic(self.fs.as_ref(), &self.dir, LOG_FILE, &bytes)?;
        let path = self.log_path();
        self.file = self.fs.open_append(&path).map_err(io_err("open", &path))?;
        self.offsets = offsets;
        self.end = bytes.len() as u64;
        Ok(())
    }

    fn save_meta(&mut self, meta: Meta) -> Result<(), StoreError> {
        disk::write_record_file(self.fs.as_ref(), &self.dir, META_FILE, &meta)?;
        self.meta = meta;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self.lock().entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = self.lock();
        Ok(LogState { last_purged_log_id: inner.last_purged, last_log_id: inner.last_log_id() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut inner = self.lock();
        let meta = Meta { vote: Some(*vote), ..inner.meta.clone() };
        inner.save_meta(meta).map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().meta.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let mut inner = self.lock();
        let meta = Meta { committed, ..inner.meta.clone() };
        Ok(inner.save_meta(meta)?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().meta.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        match self.append_sync(entries) {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(AnyError::new(&e)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        Ok(self.lock().truncate(log_id.index)?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        Ok(self.lock().purge(log_id)?)
    }
}

#[cfg(test)]
#[path = "log_store_tests.rs"]
mod tests;
