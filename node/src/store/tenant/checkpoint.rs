//! A loaded tenant's checkpoints: its phexts written whole to their files and the log segments
//! they cover removed; a frozen copy for a handoff or snapshot; closing and discarding.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use proto::{Doc, PhextName};

use super::{read_lock, write_lock, Entry, Tenant, TEMP_SUFFIX};
use crate::store::ballots::Ballots;
use crate::store::error::StoreError;
use crate::store::vfs::create_dir_durable;
use crate::store::wal::{list_segments, segment_name, write_base};

/// Bytes gathered before each write of a phext file: 1 MiB, so writing a document costs one
/// buffer, not a copy of the document.
const PHEXT_WRITE_BUFFER_BYTES: usize = 1 << 20;

impl Tenant {
    /// Checkpoints and links every phext file into `into/phexts` (an empty directory), under
    /// the gate alone, so the linked files are the tenant at one record: a snapshot for a replica
    /// that lags (`Store::snapshot_take`). Later checkpoints replace the tenant's files by
    /// renames, which leave the links as they were. Returns that record's lsn and the ballots
    /// then; `Ok(None)` if the tenant was closed first.
    pub(crate) fn freeze_into(&self, into: &Path) -> Result<Option<(u64, Ballots)>, StoreError> {
        let _gate = write_lock(&self.gate);
        if self.is_closed() {
            return Ok(None);
        }
        self.checkpoint_locked()?;
        let names = match self.vfs.list(&self.paths.phexts) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            other => other.map_err(StoreError::io("list phexts dir", &self.paths.phexts))?,
        };
        let dir = into.join("phexts");
        for name in names.iter().filter(|n| !n.ends_with(TEMP_SUFFIX)) {
            let (from, to) = (self.paths.phexts.join(name), dir.join(name));
            self.vfs.link(&from, &to).map_err(StoreError::io("link phext", &to))?;
        }
        Ok(Some((self.wal.last_lsn(), self.ballots().clone())))
    }

    /// Checkpoints if the log has grown past `log_bytes_max`.
    pub(crate) fn checkpoint_if_over(&self, log_bytes_max: u64) -> Result<(), StoreError> {
        if self.wal.log_bytes() <= log_bytes_max {
            return Ok(());
        }
        let _gate = write_lock(&self.gate);
        if self.is_closed() || self.wal.log_bytes() <= log_bytes_max {
            return Ok(());
        }
        self.checkpoint_locked()
    }

    pub(crate) fn checkpoint(&self) -> Result<(), StoreError> {
        let _gate = write_lock(&self.gate);
        if self.is_closed() {
            return Ok(());
        }
        self.checkpoint_locked()
    }

    /// Checkpoints and closes the tenant for unloading. Closed even if the checkpoint fails:
    /// every acknowledged write is then still in the log, and the next load replays it. A
    /// log-only tenant is not checkpointed (that would load its documents): its log is made
    /// durable and stays, for the next load to replay or a later checkpoint to fold.
    pub(crate) fn close(&self) -> Result<(), StoreError> {
        let _gate = write_lock(&self.gate);
        if self.is_closed() {
            return Ok(());
        }
        let result = if self.is_log_only() {
            self.wal.wait_durable(self.wal.last_lsn())
        } else {
            self.checkpoint_locked()
        };
        self.retire();
        result
    }

    /// Closes the tenant without a checkpoint, after its log failed: its memory may hold changes
    /// that never became durable, so it must be forgotten and reloaded from disk.
    pub(crate) fn discard(&self) {
        let _gate = write_lock(&self.gate);
        if !self.is_closed() {
            self.retire();
        }
    }

    pub(super) fn retire(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.store_memory.fetch_sub(self.memory_bytes(), Ordering::SeqCst);
    }

    /// Writes every changed phext to its file and deletes the log segments that led to them.
    ///
    /// Holds the gate alone, so no write runs meanwhile (readers do). The order makes a crash at
    /// any point harmless: the log is durable before it rotates; each phext file is replaced
    /// atomically (temp file, sync, rename) and the directory synced before any segment goes; the
    /// oldest segment goes first, so what is left is always a suffix of the log. Replaying a
    /// suffix over newer phext files changes nothing, because every record is idempotent.
    pub(super) fn checkpoint_locked(&self) -> Result<(), StoreError> {
        if self.is_log_only() {
            return self.fold_log_locked();
        }
        let mut dirty: Vec<(PhextName, Entry)> = read_lock(&self.phexts)
            .iter()
            .filter(|(_, e)| read_lock(e).dirty)
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        // In name order, not hash order: a failing disk then stops at the same file every run.
        dirty.sort_by(|(a, _), (b, _)| a.as_str().cmp(b.as_str()));
        if dirty.is_empty() && self.wal.log_bytes() == 0 {
            return Ok(());
        }
        self.wal.wait_durable(self.wal.last_lsn())?;
        let rotated_at = self.wal.rotate();
        if !dirty.is_empty() {
            let dir = &self.paths.phexts;
            create_dir_durable(self.vfs.as_ref(), dir)
                .map_err(StoreError::io("create phexts dir", dir))?;
            for (name, entry) in &dirty {
                // Written piece by piece under the read lock: no copy of the document is built.
                self.write_phext(name, &read_lock(entry).doc)?;
            }
            self.vfs.sync_dir(dir).map_err(StoreError::io("sync phexts dir", dir))?;
            for (_, entry) in &dirty {
                write_lock(entry).dirty = false;
            }
        }
        // Before any segment goes, so the log continues from `rotated_at` even with none left.
        write_base(self.vfs.as_ref(), &self.paths.root, rotated_at)?;
        self.remove_segments_before(rotated_at)
    }

    /// A log-only tenant's checkpoint: its documents are built from its files and its log
    /// (`recovery::docs_of`), held only while the changed ones are written, and then dropped;
    /// the log segments they cover go as in [`Self::checkpoint_locked`], in the same order. The
    /// documents are not counted in the store's memory: one checkpoint runs per tenant at a
    /// time, under its gate.
    fn fold_log_locked(&self) -> Result<(), StoreError> {
        if self.wal.log_bytes() == 0 {
            return Ok(());
        }
        self.wal.wait_durable(self.wal.last_lsn())?;
        let rotated_at = self.wal.rotate();
        let docs = crate::store::recovery::docs_of(self.vfs.as_ref(), &self.paths)?;
        let mut dirty: Vec<(&PhextName, &Doc)> =
            docs.iter().filter(|(_, d)| d.dirty).map(|(n, d)| (n, &d.doc)).collect();
        dirty.sort_by(|(a, _), (b, _)| a.as_str().cmp(b.as_str()));
        if !dirty.is_empty() {
            let dir = &self.paths.phexts;
            create_dir_durable(self.vfs.as_ref(), dir)
                .map_err(StoreError::io("create phexts dir", dir))?;
            for (name, doc) in dirty {
                self.write_phext(name, doc)?;
            }
            self.vfs.sync_dir(dir).map_err(StoreError::io("sync phexts dir", dir))?;
        }
        write_base(self.vfs.as_ref(), &self.paths.root, rotated_at)?;
        self.remove_segments_before(rotated_at)
    }

    /// Replaces a phext's file atomically with `doc`'s canonical bytes, written in pieces of
    /// about [`PHEXT_WRITE_BUFFER_BYTES`], or removes it for an empty document. The caller
    /// syncs the directory.
    pub(super) fn write_phext(&self, name: &PhextName, doc: &Doc) -> Result<(), StoreError> {
        let path = self.paths.phexts.join(name.file_name());
        if doc.is_empty() {
            return match self.vfs.remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(StoreError::io("remove phext", &path)(e))
                }
                _ => Ok(()),
            };
        }
        let temp = self.paths.phexts.join(format!("{}{TEMP_SUFFIX}", name.file_name()));
        let mut file =
            self.vfs.create(&temp).map_err(StoreError::io("create temp phext", &temp))?;
        let mut buffer = Vec::with_capacity(PHEXT_WRITE_BUFFER_BYTES);
        doc.write_canonical_pieces(|piece| {
            if buffer.len() + piece.len() > PHEXT_WRITE_BUFFER_BYTES {
                file.write_all(&buffer)?;
                buffer.clear();
            }
            if piece.len() > PHEXT_WRITE_BUFFER_BYTES {
                file.write_all(piece)
            } else {
                buffer.extend_from_slice(piece);
                Ok(())
            }
        })
        .and_then(|()| file.write_all(&buffer))
        .map_err(StoreError::io("write temp phext", &temp))?;
        file.sync_data().map_err(StoreError::io("sync temp phext", &temp))?;
        drop(file);
        self.vfs.rename(&temp, &path).map_err(StoreError::io("rename phext", &path))
    }

    /// Deletes the segments whose first LSN is below `lsn`, oldest first, syncing the directory
    /// after each so a crash never leaves a hole in the log.
    pub(super) fn remove_segments_before(&self, lsn: u64) -> Result<(), StoreError> {
        let dir = self.wal.dir();
        let (starts, _) = list_segments(self.vfs.as_ref(), dir)?;
        for start in starts.into_iter().take_while(|&s| s < lsn) {
            let path = dir.join(segment_name(start));
            self.vfs.remove_file(&path).map_err(StoreError::io("remove log segment", &path))?;
            self.vfs.sync_dir(dir).map_err(StoreError::io("sync log dir", dir))?;
        }
        Ok(())
    }
}
