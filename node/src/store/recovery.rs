//! Loading a tenant from disk: its phext files, then its log replayed on top.
//!
//! A crash can leave three kinds of debris, and each is harmless by construction:
//! - a temp file from an unfinished checkpoint: deleted, the log still holds its changes;
//! - phext files newer than some log records (a checkpoint that did not finish deleting
//!   segments): replaying idempotent records over them changes nothing;
//! - a torn record at the end of the last segment (a batch cut short by the crash, never
//!   acknowledged): the segment is cut back to its last whole record.
//!
//! Anything else that does not check out is `Corrupt`, and nothing is deleted to hide it.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use proto::doc::contains_break;
use proto::{Coordinate, Doc, PhextName};

use super::ballots::Ballots;
use super::error::StoreError;
use super::tenant::{apply, PhextDoc, Tenant, TenantPaths, TEMP_SUFFIX};
use super::vfs::Vfs;
use super::wal::{decode_next, list_segments, read_base, segment_name, Next, Op, Record, Wal};

/// The suffix of a phext file: `<name>.phext`.
const PHEXT_SUFFIX: &str = ".phext";

/// What a load brings into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Load {
    /// The documents, from the phext files with the log replayed on top: what a request needs.
    Docs,
    /// The log's end and the ballots alone, every record checked but none applied: what a backup
    /// needs to take a primary's records, so a copy that is never primary never holds its
    /// documents in memory (docs/REPLICATION.md, "Writes").
    Log,
}

/// Loads tenant `id`. A tenant with no directory loads empty and creates nothing; its
/// directories appear with its first write.
pub(crate) fn load(
    id: &str,
    paths: TenantPaths,
    vfs: Arc<dyn Vfs>,
    store_memory: Arc<AtomicU64>,
    now_ms: u64,
    what: Load,
) -> Result<Tenant, StoreError> {
    let exists = vfs.exists(&paths.root).map_err(StoreError::io("stat tenant dir", &paths.root))?;
    let mut docs = HashMap::new();
    let (mut next_lsn, mut log_bytes) = (1, 0);
    let mut ballots = Ballots::default();
    if exists {
        ballots = super::ballots::read(vfs.as_ref(), &paths.root)?;
        let last_lsn;
        if what == Load::Docs {
            docs = load_phexts(vfs.as_ref(), &paths.phexts)?;
            (last_lsn, log_bytes) = replay_log(vfs.as_ref(), &paths.wal, Some(&mut docs))?;
        } else {
            (last_lsn, log_bytes) = replay_log(vfs.as_ref(), &paths.wal, None)?;
        }
        // A checkpoint that deleted every segment left the log's next lsn in the base file.
        next_lsn = (last_lsn + 1).max(read_base(vfs.as_ref(), &paths.root)?);
    }
    let wal = Wal::new(paths.wal.clone(), vfs.clone(), next_lsn, log_bytes);
    let t = Tenant::new(id.to_string(), paths, vfs, wal, docs, store_memory, now_ms)
        .with_ballots(ballots);
    Ok(if what == Load::Log { t.log_only() } else { t })
}

/// The documents of a tenant whose log is quiet and durable: its phext files with every log
/// segment in `wal` replayed on top, changing no file. What folding a log-only copy's log into
/// its phext files starts from (`Tenant::fold_log_locked`). A segment that does not end in a
/// whole record is corrupt here: every one was synced whole.
pub(crate) fn docs_of(
    vfs: &dyn Vfs,
    paths: &TenantPaths,
) -> Result<HashMap<PhextName, PhextDoc>, StoreError> {
    let mut docs = read_phexts(vfs, &paths.phexts)?;
    let (starts, _) = list_segments(vfs, &paths.wal)?;
    let mut last_lsn = 0;
    for start in starts {
        let path = paths.wal.join(segment_name(start));
        let bytes = vfs.read(&path).map_err(StoreError::io("read log segment", &path))?;
        let valid = replay_segment(&path, &bytes, start, &mut last_lsn, Some(&mut docs))?;
        if valid < bytes.len() {
            return Err(StoreError::corrupt(&path, format!("bad record at byte {valid}")));
        }
    }
    Ok(docs)
}

/// Entries of `dir`, or none if it does not exist.
fn list_or_empty(vfs: &dyn Vfs, dir: &Path) -> Result<Vec<String>, StoreError> {
    match vfs.list(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        other => other.map_err(StoreError::io("list dir", dir)),
    }
}

/// The phext files of `dir`, removing the temp files of an unfinished checkpoint.
fn load_phexts(vfs: &dyn Vfs, dir: &Path) -> Result<HashMap<PhextName, PhextDoc>, StoreError> {
    for file in list_or_empty(vfs, dir)? {
        if file.ends_with(TEMP_SUFFIX) {
            let path = dir.join(&file);
            tracing::info!(path = ?path, "removing the temp file of an unfinished checkpoint");
            vfs.remove_file(&path).map_err(StoreError::io("remove temp phext", &path))?;
        }
    }
    read_phexts(vfs, dir)
}

/// The phext files of `dir`, read; temp files are passed over.
fn read_phexts(vfs: &dyn Vfs, dir: &Path) -> Result<HashMap<PhextName, PhextDoc>, StoreError> {
    let mut docs = HashMap::new();
    for file in list_or_empty(vfs, dir)? {
        let path = dir.join(&file);
        if file.ends_with(TEMP_SUFFIX) {
            continue;
        }
        let Some(stem) = file.strip_suffix(PHEXT_SUFFIX) else {
            tracing::warn!(path = ?path, "ignoring a file the store did not write");
            continue;
        };
        let name = PhextName::parse(stem)
            .map_err(|_| StoreError::corrupt(&path, "not a valid phext name"))?;
        let bytes = vfs.read(&path).map_err(StoreError::io("read phext", &path))?;
        let doc = Doc::parse(&bytes).map_err(|e| StoreError::corrupt(&path, e.to_string()))?;
        docs.insert(name, PhextDoc { doc, applied_lsn: 0, dirty: false });
    }
    Ok(docs)
}

/// Replays every segment in LSN order into `docs` (checks each record and applies none without
/// them). Returns the last LSN and the log's bytes.
fn replay_log(
    vfs: &dyn Vfs,
    dir: &Path,
    mut docs: Option<&mut HashMap<PhextName, PhextDoc>>,
) -> Result<(u64, u64), StoreError> {
    let (starts, others) = list_segments(vfs, dir)?;
    for file in others {
        tracing::warn!(path = ?dir.join(&file), "ignoring a file the store did not write");
    }
    let (mut last_lsn, mut log_bytes) = (0u64, 0u64);
    for (i, &start) in starts.iter().enumerate() {
        let path = dir.join(segment_name(start));
        let bytes = vfs.read(&path).map_err(StoreError::io("read log segment", &path))?;
        let valid = replay_segment(&path, &bytes, start, &mut last_lsn, docs.as_deref_mut())?;
        if valid < bytes.len() {
            // Segments before the last were synced whole before the log rotated past them.
            if i + 1 != starts.len() {
                return Err(StoreError::corrupt(
                    &path,
                    format!("bad record at byte {valid} before the last segment"),
                ));
            }
            tracing::warn!(path = ?path, at = valid, dropped = bytes.len() - valid, "cutting a torn log tail");
            vfs.truncate(&path, valid as u64)
                .map_err(StoreError::io("truncate log segment", &path))?;
        }
        if valid == 0 {
            vfs.remove_file(&path).map_err(StoreError::io("remove empty log segment", &path))?;
            vfs.sync_dir(dir).map_err(StoreError::io("sync log dir", dir))?;
            continue;
        }
        // What was read may sit only in the page cache of a process that died before its sync;
        // answering from it is safe only once it is durable.
        let mut file = vfs.open_append(&path).map_err(StoreError::io("open log segment", &path))?;
        file.sync_data().map_err(StoreError::io("sync log segment", &path))?;
        log_bytes += valid as u64;
    }
    Ok((last_lsn, log_bytes))
}

/// Applies the whole records at the start of `bytes` to `docs` (checks them, without); returns
/// how many bytes they span.
pub(crate) fn replay_segment(
    path: &Path,
    bytes: &[u8],
    start: u64,
    last_lsn: &mut u64,
    mut docs: Option<&mut HashMap<PhextName, PhextDoc>>,
) -> Result<usize, StoreError> {
    let mut at = 0;
    loop {
        let (record, len) = match decode_next(&bytes[at..], path)? {
            Next::End => return Ok(at),
            Next::Torn(why) => {
                tracing::warn!(path = ?path, at, why, "log ends in a torn record");
                return Ok(at);
            }
            Next::Record { record, len } => (record, len),
        };
        let expected = if at == 0 { start } else { *last_lsn + 1 };
        let follows = *last_lsn == 0 || record.lsn == *last_lsn + 1;
        if record.lsn != expected || !follows {
            let detail =
                format!("record {} where {expected} was due after {}", record.lsn, *last_lsn);
            return Err(StoreError::corrupt(path, detail));
        }
        match docs.as_deref_mut() {
            Some(docs) => apply_record(path, &record, docs)?,
            None => {
                check_record(path, &record)?;
            }
        }
        *last_lsn = record.lsn;
        at += len;
    }
}

/// Checks a record as a request would be checked (a valid phext name and coordinate, no
/// dimension break in its text), and returns its phext's name. `path` names where it came from.
pub(crate) fn check_record(path: &Path, record: &Record<String>) -> Result<PhextName, StoreError> {
    let name = PhextName::parse(&record.phext)
        .map_err(|_| StoreError::corrupt(path, "record names an invalid phext"))?;
    let (c, text) = match &record.op {
        Op::Set { c, text } | Op::TruncateAppend { c, text, .. } => (c, text),
    };
    if Coordinate::from_components(c.components()).is_err() || contains_break(text) {
        return Err(StoreError::corrupt(
            path,
            format!("record {} holds an invalid change", record.lsn),
        ));
    }
    Ok(name)
}

/// Checks a record as a request would be checked, then applies it.
fn apply_record(
    path: &Path,
    record: &Record<String>,
    docs: &mut HashMap<PhextName, PhextDoc>,
) -> Result<(), StoreError> {
    let name = check_record(path, record)?;
    let d = docs.entry(name).or_default();
    apply(&mut d.doc, &record.op);
    d.applied_lsn = record.lsn;
    d.dirty = true;
    Ok(())
}
