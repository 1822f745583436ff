//! A loaded tenant's replicated side: the records a primary keeps for its backups (its tail),
//! the ballot each record was written under, records taken from a primary, and a cut of the log
//! back to the prefix it shares with its primary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};

use proto::PhextName;

use super::{apply, doc_memory, read_lock, write_lock, Tenant, REPLICA_TAIL_BYTES_MAX};
use crate::store::ballots::{self, Ballots, LogPosition};
use crate::store::error::StoreError;
use crate::store::replica::AppendRefusal;
use crate::store::tried;
use crate::store::vfs::create_dir_durable;
use crate::store::wal::{decode_next, list_segments, read_base, segment_name, Next, Op, Record};

/// Records a primary logged and its backups may not hold yet, oldest first, each framed as the
/// log frames it, with the ballot it was written under.
#[derive(Default)]
pub(crate) struct Tail {
    pub records: std::collections::VecDeque<TailRecord>,
    pub bytes: usize,
}

pub(crate) struct TailRecord {
    pub lsn: u64,
    pub ballot: u64,
    pub framed: Vec<u8>,
}

impl Tenant {
    /// The tenant keeping its records for backups whenever `keeps_tail` is set (the store's
    /// switch, on while the cluster replicates).
    pub(crate) fn with_tail_switch(mut self, keeps_tail: Arc<AtomicBool>) -> Tenant {
        self.keeps_tail = keeps_tail;
        self
    }

    pub(super) fn tail(&self) -> MutexGuard<'_, Tail> {
        self.tail.lock().expect("tail lock poisoned: a thread panicked while holding it")
    }

    /// Runs `f` on the records kept for backups.
    pub(crate) fn with_tail<R>(&self, f: impl FnOnce(&Tail) -> R) -> R {
        f(&self.tail())
    }

    /// [`Self::with_tail`], or `None` if another thread holds the tail now.
    pub(crate) fn try_with_tail<R>(&self, f: impl FnOnce(&Tail) -> R) -> Option<R> {
        tried(self.tail.try_lock()).map(|tail| f(&tail))
    }

    /// Drops the kept records up to `lsn`: every backup holds them.
    pub(crate) fn trim_tail(&self, lsn: u64) {
        // Under the gate: a closed tenant's memory was already taken out of the store's count.
        let _gate = read_lock(&self.gate);
        if self.is_closed() {
            return;
        }
        let mut tail = self.tail();
        let mut freed = 0;
        while tail.records.front().is_some_and(|r| r.lsn <= lsn) {
            if let Some(r) = tail.records.pop_front() {
                freed += r.framed.len();
            }
        }
        tail.bytes -= freed;
        drop(tail);
        self.add_memory(-(freed as i64));
    }

    /// Keeps a copy of record `lsn` for the backups, dropping the oldest kept ones past
    /// [`REPLICA_TAIL_BYTES_MAX`]. Called with the phext's lock held, so records of one phext
    /// are kept in their log order; records of different phexts may arrive out of order.
    pub(super) fn keep_for_backups(&self, lsn: u64, phext: &str, op: Op<&str>) {
        let ballot = self.ballots().position(lsn).ballot;
        let mut framed = Vec::new();
        crate::store::wal::encode_record(&mut framed, &Record { lsn, phext, op });
        let added = framed.len();
        let mut tail = self.tail();
        let at = tail.records.partition_point(|r| r.lsn < lsn);
        tail.records.insert(at, TailRecord { lsn, ballot, framed });
        tail.bytes += added;
        let mut freed = 0;
        while tail.bytes - freed > REPLICA_TAIL_BYTES_MAX && tail.records.len() > 1 {
            if let Some(r) = tail.records.pop_front() {
                freed += r.framed.len();
            }
        }
        tail.bytes -= freed;
        drop(tail);
        self.add_memory(added as i64 - freed as i64);
    }

    /// The tenant with the ballots its directory holds (none for a tenant never replicated).
    pub(crate) fn with_ballots(self, ballots: Ballots) -> Tenant {
        *self.ballots() = ballots;
        self
    }

    pub(super) fn ballots(&self) -> MutexGuard<'_, Ballots> {
        self.ballots.lock().expect("ballots lock poisoned: a thread panicked while holding it")
    }

    /// The ballot of record `lsn` in this replica's history (`Some(None)`: below what it keeps),
    /// or `None` if another thread holds the gate or the ballots now.
    pub(crate) fn try_ballot_of(&self, lsn: u64) -> Option<Option<u64>> {
        let _gate = tried(self.gate.try_read())?;
        let ballots = tried(self.ballots.try_lock())?;
        Some(ballots.ballot_of(lsn))
    }

    /// This replica's ballots and the lsn of its log's last record.
    pub(crate) fn replica_state(&self) -> (Ballots, u64) {
        let _gate = read_lock(&self.gate);
        (self.ballots().clone(), self.wal.last_lsn())
    }

    /// Changes this replica's ballots with `change` under the gate alone (no write runs
    /// meanwhile), and makes the change durable before it returns. `Ok(None)` if the tenant was
    /// closed first.
    pub(crate) fn change_ballots<R>(
        &self,
        change: impl FnOnce(&mut Ballots, u64) -> Result<(R, bool), ballots::BallotError>,
    ) -> Result<Option<Result<R, ballots::BallotError>>, StoreError> {
        let _gate = write_lock(&self.gate);
        if self.is_closed() {
            return Ok(None);
        }
        let mut b = self.ballots();
        let mut next = b.clone();
        let (out, changed) = match change(&mut next, self.wal.last_lsn()) {
            Ok(done) => done,
            Err(refused) => return Ok(Some(Err(refused))),
        };
        if changed {
            create_dir_durable(self.vfs.as_ref(), &self.paths.root)
                .map_err(StoreError::io("create tenant dir", &self.paths.root))?;
            ballots::write(self.vfs.as_ref(), &self.paths.root, &next)?;
            *b = next;
        }
        Ok(Some(Ok(out)))
    }

    /// Appends records written under `records_ballot` that a primary leading under `ballot`
    /// sent (`Ballots::follow`), continuing its log after `prev`, and
    /// applies them, under the gate alone. Each record was checked as a request would be (its
    /// phext's name beside it) and they follow one another. Refused, changing nothing, when
    /// `ballot` is below this replica's promise or the log does not end at `prev`. The ballot's
    /// start, when it begins a run here, is durable before the records are logged. Returns the
    /// last record's lsn, to be acknowledged once durable ([`Self::wait_durable`]); `Ok(None)` if
    /// the tenant was closed first.
    pub(crate) fn append_replicated(
        &self,
        ballot: u64,
        records_ballot: u64,
        prev: LogPosition,
        records: &[(PhextName, Record<String>)],
    ) -> Result<Option<Result<u64, AppendRefusal>>, StoreError> {
        let gate = write_lock(&self.gate);
        if self.is_closed() {
            return Ok(None);
        }
        let last = self.wal.last_lsn();
        let (promised, have) = {
            let b = self.ballots();
            (b.promised(), b.position(last))
        };
        if ballot < promised {
            let stale = ballots::BallotError::Stale { ballot, promised };
            return Ok(Some(Err(AppendRefusal::Ballot(stale))));
        }
        if have != prev {
            return Ok(Some(Err(AppendRefusal::NotContinuing { have })));
        }
        let Some((_, first)) = records.first() else {
            return Ok(Some(Ok(last)));
        };
        assert_eq!(first.lsn, last + 1, "replicated records are checked to follow `prev`");
        {
            let mut b = self.ballots();
            let mut next = b.clone();
            match next.follow(ballot, records_ballot, first.lsn) {
                Err(refused) => return Ok(Some(Err(AppendRefusal::Ballot(refused)))),
                Ok(false) => {}
                Ok(true) => {
                    create_dir_durable(self.vfs.as_ref(), &self.paths.root)
                        .map_err(StoreError::io("create tenant dir", &self.paths.root))?;
                    ballots::write(self.vfs.as_ref(), &self.paths.root, &next)?;
                }
            }
            *b = next;
        }
        let mut appended = last;
        for (name, record) in records {
            if self.is_log_only() {
                appended = self.wal.append(&record.phext, record.op.as_borrowed())?;
                assert_eq!(
                    appended, record.lsn,
                    "replicated records are checked to follow one another"
                );
                continue;
            }
            let entry = self.entry_or_new(name);
            let mut d = write_lock(&entry);
            let before = d.doc.canonical_len();
            let memory_before = doc_memory(&d.doc);
            let lsn = self.wal.append(&record.phext, record.op.as_borrowed())?;
            assert_eq!(lsn, record.lsn, "replicated records are checked to follow one another");
            apply(&mut d.doc, &record.op);
            d.applied_lsn = lsn;
            d.dirty = true;
            let after = d.doc.canonical_len();
            if after >= before {
                self.used_bytes.fetch_add(after - before, Ordering::SeqCst);
            } else {
                self.used_bytes.fetch_sub(before - after, Ordering::SeqCst);
            }
            self.add_memory(doc_memory(&d.doc) as i64 - memory_before as i64);
            appended = lsn;
        }
        drop(gate);
        Ok(Some(Ok(appended)))
    }

    /// Cuts the log after record `lsn`, under the gate alone, and closes the tenant without a
    /// checkpoint, so that its next load rebuilds it from its files and the log that is left.
    /// Refused (`Ok(Some(false))`) when records above `lsn` are already in the phext files (a
    /// checkpoint passed them): such a replica needs a snapshot. `Ok(None)` if the tenant was
    /// closed first.
    pub(crate) fn truncate_after(&self, lsn: u64) -> Result<Option<bool>, StoreError> {
        let _gate = write_lock(&self.gate);
        if self.is_closed() {
            return Ok(None);
        }
        let last = self.wal.last_lsn();
        if lsn >= last {
            return Ok(Some(true));
        }
        if lsn + 1 < read_base(self.vfs.as_ref(), &self.paths.root)? {
            return Ok(Some(false));
        }
        // No flusher may be writing while the segments are cut.
        self.wal.wait_durable(last)?;
        let dir = self.wal.dir();
        let (starts, _) = list_segments(self.vfs.as_ref(), dir)?;
        // Newest first, so a crash part way leaves a log that is still a prefix.
        for &start in starts.iter().rev() {
            let path = dir.join(segment_name(start));
            if start > lsn {
                self.vfs.remove_file(&path).map_err(StoreError::io("remove log segment", &path))?;
                self.vfs.sync_dir(dir).map_err(StoreError::io("sync log dir", dir))?;
                continue;
            }
            let bytes = self.vfs.read(&path).map_err(StoreError::io("read log segment", &path))?;
            let mut at = 0;
            let mut at_lsn = start;
            while at_lsn <= lsn {
                match decode_next(&bytes[at..], &path)? {
                    Next::Record { len, .. } => {
                        at += len;
                        at_lsn += 1;
                    }
                    Next::End | Next::Torn(_) => break,
                }
            }
            self.vfs
                .truncate(&path, at as u64)
                .map_err(StoreError::io("truncate log segment", &path))?;
            let mut file =
                self.vfs.open_append(&path).map_err(StoreError::io("open log segment", &path))?;
            file.sync_data().map_err(StoreError::io("sync log segment", &path))?;
            break;
        }
        let mut b = self.ballots();
        let mut next = b.clone();
        next.truncate_after(lsn);
        if next != *b {
            ballots::write(self.vfs.as_ref(), &self.paths.root, &next)?;
            *b = next;
        }
        drop(b);
        self.retire();
        Ok(Some(true))
    }
}
