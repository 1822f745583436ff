//! One loaded tenant: its phexts in memory, its log, its quota count, and its checkpoints.
//!
//! Concurrency, from the outside in:
//! - `gate`: writers share it, a checkpoint or unload takes it alone. Writers never wait for the
//!   disk while holding it, so a checkpoint waits at most for in-memory work.
//! - each phext's `RwLock`: a write appends its log record and applies the change in one critical
//!   section, so each phext's log order is its apply order; readers share it.
//! - the log's own mutex, held only to append bytes or hand a batch to a flusher.
//!
//! Readers never take the gate, and different phexts and tenants never share a lock on the hot
//! path.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use proto::streamed::OrderedRead;
use proto::{ops, Coordinate, Doc, PhextName};

use super::ballots::{self, Ballots, LogPosition};
use super::error::StoreError;
use super::replica::AppendRefusal;
use super::vfs::{create_dir_durable, Vfs};
use super::wal::{
    decode_next, parse_segment_name, read_base, segment_name, write_base, Next, Op, Record, Wal,
};
use super::{tried, FileAnswer, Opened};

/// Suffix of a phext file being written by a checkpoint. A phext file's own name ends in
/// `.phext`, so the two never collide; recovery deletes leftovers.
pub(crate) const TEMP_SUFFIX: &str = ".tmp";

/// Estimated bytes a loaded tenant costs beyond its documents: its structs, maps, log state and
/// open segment. Measured with `examples/idle_memory.rs` and rounded up.
pub const TENANT_MEMORY_OVERHEAD_BYTES: u64 = 2048;
/// Estimated bytes one loaded phext costs beyond its scrolls: map entry, locks, `Doc`.
pub const PHEXT_MEMORY_OVERHEAD_BYTES: u64 = 256;
/// Estimated bytes one scroll costs beyond its text: B-tree slot, key and `String` header.
pub const SCROLL_MEMORY_OVERHEAD_BYTES: u64 = 96;

/// Bytes gathered before each write of a phext file: 1 MiB, so writing a document costs one
/// buffer, not a copy of the document.
const PHEXT_WRITE_BUFFER_BYTES: usize = 1 << 20;

/// The most bytes of records a primary keeps in memory for its backups, per tenant (1 MiB): the
/// records its slowest backup has not yet taken. Older ones are read back from the log, as long
/// as no checkpoint folded them ([`super::Store::shipment`]).
pub const REPLICA_TAIL_BYTES_MAX: usize = 1 << 20;

/// Writes at or above this share of the quota, in percent, log a warning (PRODUCT §3).
pub const QUOTA_WARN_PERCENT: u64 = 90;

/// Where a tenant's files live: `<data>/tenants/<id>/{phexts,wal}`.
#[derive(Debug, Clone)]
pub(crate) struct TenantPaths {
    pub root: PathBuf,
    pub phexts: PathBuf,
    pub wal: PathBuf,
}

impl TenantPaths {
    pub(crate) fn new(tenants_dir: &Path, id: &str) -> TenantPaths {
        let root = tenants_dir.join(id);
        TenantPaths { phexts: root.join("phexts"), wal: root.join("wal"), root }
    }
}

/// One phext in memory.
#[derive(Debug, Default)]
pub(crate) struct PhextDoc {
    pub doc: Doc,
    /// The LSN of the last change applied; a reader waits for it to be durable.
    pub applied_lsn: u64,
    /// Changed since its file was last written.
    pub dirty: bool,
}

/// A change a client asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Edit<'a> {
    Insert(&'a str),
    Update(&'a str),
    Delete,
}

impl Edit<'_> {
    /// True when the edit changes nothing in an empty document.
    fn is_noop_on_empty(&self) -> bool {
        match self {
            Edit::Insert(t) | Edit::Update(t) => t.is_empty(),
            Edit::Delete => true,
        }
    }
}

/// The answer to `edit` on `doc`, and the change to log and apply with the scroll's new length,
/// or `None` when nothing would change.
fn plan<'a>(doc: &Doc, c: Coordinate, edit: Edit<'a>) -> (String, Option<(Op<&'a str>, usize)>) {
    let old_len = doc.get(&c).len();
    match edit {
        Edit::Insert(text) => {
            let change = (!text.is_empty()).then(|| {
                (Op::TruncateAppend { c, len_before: old_len as u64, text }, old_len + text.len())
            });
            (ops::inserted(text.len()), change)
        }
        Edit::Update(text) => {
            let change = (doc.get(&c) != text).then_some((Op::Set { c, text }, text.len()));
            (ops::updated(text.len()), change)
        }
        Edit::Delete => {
            (ops::removed(old_len), (old_len > 0).then_some((Op::Set { c, text: "" }, 0)))
        }
    }
}

/// Applies a logged change; used by replay, where it may land on a state that already has it.
pub(crate) fn apply(doc: &mut Doc, op: &Op<String>) {
    match op {
        Op::Set { c, text } => {
            doc.set(*c, text.clone());
        }
        Op::TruncateAppend { c, len_before, text } => {
            let len = usize::try_from(*len_before).unwrap_or(usize::MAX);
            doc.truncate_append(*c, len, text);
        }
    }
}

/// Estimated memory one loaded document holds.
pub(crate) fn doc_memory(doc: &Doc) -> u64 {
    PHEXT_MEMORY_OVERHEAD_BYTES
        + doc.canonical_len()
        + doc.scroll_count() as u64 * SCROLL_MEMORY_OVERHEAD_BYTES
}

type Entry = Arc<RwLock<PhextDoc>>;

pub(crate) struct Tenant {
    pub(crate) id: String,
    paths: TenantPaths,
    vfs: Arc<dyn Vfs>,
    wal: Wal,
    /// The promise and ballot history of this replica (docs/REPLICATION.md); its file is
    /// rewritten, under the gate, before anything that changed it is acknowledged.
    ballots: Mutex<Ballots>,
    gate: RwLock<()>,
    /// Set once the tenant is unloaded or discarded; a writer that finds it set goes back to the
    /// store for the tenant's current incarnation.
    closed: AtomicBool,
    phexts: RwLock<HashMap<PhextName, Entry>>,
    /// Sum of the canonical lengths of the phexts, counting reserved growth of writes in flight.
    used_bytes: AtomicU64,
    /// This tenant's estimated memory, and the store-wide sum it contributes to.
    memory_bytes: AtomicU64,
    store_memory: Arc<AtomicU64>,
    last_used_ms: AtomicU64,
    /// Set when the node replicates this tenant as its primary: every record logged is kept in
    /// `tail` too, for the backups.
    keeps_tail: Arc<AtomicBool>,
    tail: Mutex<Tail>,
}

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

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().expect("tenant lock poisoned: a thread panicked while holding it")
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().expect("tenant lock poisoned: a thread panicked while holding it")
}

impl Tenant {
    /// A loaded tenant holding `docs` (from recovery), counted into `store_memory`.
    pub(crate) fn new(
        id: String,
        paths: TenantPaths,
        vfs: Arc<dyn Vfs>,
        wal: Wal,
        docs: HashMap<PhextName, PhextDoc>,
        store_memory: Arc<AtomicU64>,
        now_ms: u64,
    ) -> Tenant {
        let used: u64 = docs.values().map(|d| d.doc.canonical_len()).sum();
        let memory =
            TENANT_MEMORY_OVERHEAD_BYTES + docs.values().map(|d| doc_memory(&d.doc)).sum::<u64>();
        store_memory.fetch_add(memory, Ordering::SeqCst);
        let phexts = docs.into_iter().map(|(n, d)| (n, Arc::new(RwLock::new(d)))).collect();
        Tenant {
            id,
            paths,
            vfs,
            wal,
            ballots: Mutex::new(Ballots::default()),
            gate: RwLock::new(()),
            closed: AtomicBool::new(false),
            phexts: RwLock::new(phexts),
            used_bytes: AtomicU64::new(used),
            memory_bytes: AtomicU64::new(memory),
            store_memory,
            last_used_ms: AtomicU64::new(now_ms),
            keeps_tail: Arc::new(AtomicBool::new(false)),
            tail: Mutex::new(Tail::default()),
        }
    }

    /// The tenant keeping its records for backups whenever `keeps_tail` is set (the store's
    /// switch, on while the cluster replicates).
    pub(crate) fn with_tail_switch(mut self, keeps_tail: Arc<AtomicBool>) -> Tenant {
        self.keeps_tail = keeps_tail;
        self
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
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
    fn keep_for_backups(&self, lsn: u64, phext: &str, op: Op<&str>) {
        let ballot = self.ballots().position(lsn).ballot;
        let mut framed = Vec::new();
        super::wal::encode_record(&mut framed, &Record { lsn, phext, op });
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

    pub(crate) fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::SeqCst)
    }

    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::SeqCst)
    }

    pub(crate) fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn touch(&self, now_ms: u64) {
        self.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The LSN of the newest record logged.
    #[cfg(test)]
    pub(crate) fn last_lsn(&self) -> u64 {
        self.wal.last_lsn()
    }

    /// The LSN of the newest durable record (records logged after it may still fail).
    pub(crate) fn durable_lsn(&self) -> u64 {
        self.wal.durable_lsn()
    }

    /// [`Self::durable_lsn`], or `None` if another thread holds the log's lock now.
    pub(crate) fn try_durable_lsn(&self) -> Option<u64> {
        self.wal.try_durable_lsn()
    }

    /// True once a log write failed: the tenant's memory may hold changes that are not durable.
    pub(crate) fn log_failed(&self) -> bool {
        self.wal.failed()
    }

    fn entry(&self, p: &PhextName) -> Option<Entry> {
        read_lock(&self.phexts).get(p).cloned()
    }

    /// Runs `f` on the phext (an empty document if it does not exist) and returns its result once
    /// every change `f` saw is durable. Creates nothing.
    pub(crate) fn read<R>(
        &self,
        p: &PhextName,
        f: impl FnOnce(&Doc) -> R,
    ) -> Result<R, StoreError> {
        let Some(entry) = self.entry(p) else { return Ok(f(&Doc::new())) };
        let d = read_lock(&entry);
        let out = f(&d.doc);
        let lsn = d.applied_lsn;
        drop(d);
        self.wal.wait_durable(lsn)?;
        Ok(out)
    }

    /// Like [`Self::read`], but never waits: `None` if a lock it needs is taken (a checkpoint
    /// or a writer is at work) or what `f` saw is not durable yet.
    pub(crate) fn read_now<R>(&self, p: &PhextName, f: impl FnOnce(&Doc) -> R) -> Option<R> {
        let entry = tried(self.phexts.try_read())?.get(p).cloned();
        let Some(entry) = entry else { return Some(f(&Doc::new())) };
        let d = tried(entry.try_read())?;
        let out = f(&d.doc);
        let lsn = d.applied_lsn;
        drop(d);
        self.wal.is_durable_now(lsn).then_some(out)
    }

    /// A read's answer (`get`, `toc`, `query`, `json-export`) of a phext as it is now: built
    /// whole from memory up to `stream_above` bytes; past it, the phext's file opened for
    /// reading in ranges, from which the answer is made a piece at a time. The file is brought
    /// up to date first if the phext changed since the last checkpoint (written like one, in
    /// pieces; the log keeps its records, which replay harmlessly over the newer file). The
    /// reader keeps the file it opened even if a later checkpoint replaces it, so the answer is
    /// the phext at one moment whatever is written meanwhile. Returns once everything it holds
    /// is durable; `Ok(None)` if the tenant was closed first.
    pub(crate) fn open_read(
        &self,
        p: &PhextName,
        read: &OrderedRead,
        stream_above: u64,
    ) -> Result<Option<Opened>, StoreError> {
        let Some(entry) = self.entry(p) else {
            return Ok(Some(Opened::Whole(read.answer(&Doc::new()))));
        };
        let (sized_len, sized_lsn) = {
            let d = read_lock(&entry);
            let len = read.answer_len(&d.doc);
            if len <= stream_above {
                let out = read.answer(&d.doc);
                let lsn = d.applied_lsn;
                drop(d);
                self.wal.wait_durable(lsn)?;
                return Ok(Some(Opened::Whole(out)));
            }
            (len, d.applied_lsn)
        };
        // The gate keeps checkpoints (which write the same file) out; writers wait on the lock.
        let gate = read_lock(&self.gate);
        if self.is_closed() {
            return Ok(None);
        }
        let mut d = write_lock(&entry);
        // Sized again only if a write came between the two locks (sizing reads every scroll).
        let len = if d.applied_lsn == sized_lsn { sized_len } else { read.answer_len(&d.doc) };
        let file_len = d.doc.canonical_len();
        if len <= stream_above || file_len == 0 {
            let out = read.answer(&d.doc);
            let lsn = d.applied_lsn;
            drop(d);
            drop(gate);
            self.wal.wait_durable(lsn)?;
            return Ok(Some(Opened::Whole(out)));
        }
        let dir = &self.paths.phexts;
        if d.dirty {
            create_dir_durable(self.vfs.as_ref(), dir)
                .map_err(StoreError::io("create phexts dir", dir))?;
            self.write_phext(p, &d.doc)?;
            self.vfs.sync_dir(dir).map_err(StoreError::io("sync phexts dir", dir))?;
            d.dirty = false;
        }
        let path = dir.join(p.file_name());
        let reader = self.vfs.open_read(&path).map_err(StoreError::io("open phext", &path))?;
        if reader.file_len() != file_len {
            let detail = format!("holds {} bytes, not {file_len}", reader.file_len());
            return Err(StoreError::corrupt(&path, detail));
        }
        let lsn = d.applied_lsn;
        drop(d);
        drop(gate);
        self.wal.wait_durable(lsn)?;
        Ok(Some(Opened::Stream {
            len,
            json: read.is_json(),
            file: Box::new(FileAnswer::new(path, reader, read.stream())),
        }))
    }

    /// The first half of a write: applies `edit` at `c` in memory and adds its record to the
    /// log's pending batch, under the gate and the phext's lock. Returns SQ's answer, the LSN
    /// that must be durable before it is given ([`Self::wait_durable`]) and whether the write
    /// logged a record (one that changed nothing waits for what it saw), or `Ok(None)` if the
    /// tenant was closed first (nothing done). Growth past `quota_bytes` is refused before
    /// anything is logged, and so is a change by a primary that leads under `led` once this
    /// replica promised a newer ballot (under the gate, so no newer primary's records come
    /// between the check and the record).
    pub(crate) fn write_logged(
        &self,
        p: &PhextName,
        c: Coordinate,
        edit: Edit<'_>,
        quota_bytes: u64,
        led: Option<u64>,
    ) -> Result<Option<(String, u64, bool)>, StoreError> {
        let gate = read_lock(&self.gate);
        if self.is_closed() {
            return Ok(None);
        }
        let entry = match self.entry(p) {
            Some(e) => e,
            None if edit.is_noop_on_empty() => {
                return Ok(Some((plan(&Doc::new(), c, edit).0, 0, false)))
            }
            None => write_lock(&self.phexts).entry(p.clone()).or_default().clone(),
        };
        let mut d = write_lock(&entry);
        let (answer, change) = plan(&d.doc, c, edit);
        if let (Some(ballot), Some(_)) = (led, &change) {
            let promised = self.ballots().promised();
            if promised != ballot {
                return Err(StoreError::NotLeading { ballot, promised });
            }
        }
        let (lsn, changed) = match change {
            None => (d.applied_lsn, false),
            Some((op, new_len)) => (self.log_and_apply(p, &mut d, op, new_len, quota_bytes)?, true),
        };
        drop(d);
        drop(gate);
        Ok(Some((answer, lsn, changed)))
    }

    /// Logs a record that changes nothing under `ballot` when the log's last record was written
    /// under an earlier one: the barrier a new primary writes once it prepared (Raft's no-op of
    /// a new term). Records of earlier ballots it adopted are shown by a read only once this
    /// one is on a majority, whose logs then compare above any log of an earlier ballot, so no
    /// later primary cuts what a read showed. Returns its lsn once durable (to be replicated),
    /// `Some(None)` when no barrier is needed, `None` if the tenant was closed.
    pub(crate) fn barrier(&self, ballot: u64) -> Result<Option<Option<u64>>, StoreError> {
        let gate = read_lock(&self.gate);
        if self.is_closed() {
            return Ok(None);
        }
        let last = self.wal.last_lsn();
        if last == 0 || self.ballots().position(last).ballot >= ballot {
            return Ok(Some(None));
        }
        // The first phext by name (a log with records names at least one), its first scroll cut
        // to the length it has and nothing appended.
        let named = read_lock(&self.phexts)
            .iter()
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(p, e)| (p.clone(), e.clone()));
        let Some((p, entry)) = named else { return Ok(Some(None)) };
        let mut d = write_lock(&entry);
        let c = Coordinate::ORIGIN;
        let len = d.doc.get(&c).len();
        let op = Op::TruncateAppend { c, len_before: len as u64, text: "" };
        let lsn = self.log_and_apply(&p, &mut d, op, len, u64::MAX)?;
        drop(d);
        drop(gate);
        self.wait_durable(lsn)?;
        Ok(Some(Some(lsn)))
    }

    /// Returns once every log record up to `lsn` is durable: the second half of a write. The
    /// tenant may have been checkpointed or closed since; its log still answers.
    pub(crate) fn wait_durable(&self, lsn: u64) -> Result<(), StoreError> {
        self.wal.wait_durable(lsn)
    }

    /// Reserves quota, logs `op` and applies it to `d`; returns its LSN. Called with the phext's
    /// write lock held, so the log order is the apply order.
    fn log_and_apply(
        &self,
        p: &PhextName,
        d: &mut PhextDoc,
        op: Op<&str>,
        new_len: usize,
        quota_bytes: u64,
    ) -> Result<u64, StoreError> {
        let c = match op {
            Op::Set { c, .. } | Op::TruncateAppend { c, .. } => c,
        };
        let before = d.doc.canonical_len();
        let after = d.doc.canonical_len_after(&c, new_len);
        let grow = after.saturating_sub(before);
        if grow > 0 {
            self.reserve(grow, quota_bytes)?;
        }
        let lsn = match self.wal.append(p.as_str(), op) {
            Ok(lsn) => lsn,
            Err(e) => {
                self.used_bytes.fetch_sub(grow, Ordering::SeqCst);
                return Err(e);
            }
        };
        if self.keeps_tail.load(Ordering::Relaxed) {
            self.keep_for_backups(lsn, p.as_str(), op);
        }
        let memory_before = doc_memory(&d.doc);
        match op {
            Op::Set { c, text } => {
                d.doc.set(c, text.to_string());
            }
            // The scroll holds exactly `len_before` bytes under this lock, so no cut is needed.
            Op::TruncateAppend { c, text, .. } => d.doc.append(c, text),
        }
        assert_eq!(
            d.doc.canonical_len(),
            after,
            "canonical_len_after disagrees with the applied change"
        );
        d.applied_lsn = lsn;
        d.dirty = true;
        if after < before {
            self.used_bytes.fetch_sub(before - after, Ordering::SeqCst);
        }
        self.add_memory(doc_memory(&d.doc) as i64 - memory_before as i64);
        Ok(lsn)
    }

    /// Takes `grow` bytes of quota atomically, so writes to different phexts cannot overshoot
    /// together.
    fn reserve(&self, grow: u64, quota_bytes: u64) -> Result<(), StoreError> {
        let mut used = self.used_bytes.load(Ordering::SeqCst);
        loop {
            let after = used.saturating_add(grow);
            if after > quota_bytes {
                return Err(StoreError::QuotaExceeded {
                    needed_bytes: grow,
                    free_bytes: quota_bytes.saturating_sub(used),
                    quota_bytes,
                });
            }
            match self.used_bytes.compare_exchange(used, after, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    if after.saturating_mul(100) >= quota_bytes.saturating_mul(QUOTA_WARN_PERCENT) {
                        tracing::warn!(tenant = %self.id, used_bytes = after, quota_bytes, "tenant at or over 90% of its quota");
                    }
                    return Ok(());
                }
                Err(now) => used = now,
            }
        }
    }

    fn add_memory(&self, delta: i64) {
        if delta >= 0 {
            self.memory_bytes.fetch_add(delta as u64, Ordering::SeqCst);
            self.store_memory.fetch_add(delta as u64, Ordering::SeqCst);
        } else {
            self.memory_bytes.fetch_sub(delta.unsigned_abs(), Ordering::SeqCst);
            self.store_memory.fetch_sub(delta.unsigned_abs(), Ordering::SeqCst);
        }
    }

    fn ballots(&self) -> MutexGuard<'_, Ballots> {
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
            let entry = write_lock(&self.phexts).entry(name.clone()).or_default().clone();
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
        let mut starts: Vec<u64> = match self.vfs.list(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            other => other
                .map_err(StoreError::io("list log dir", dir))?
                .iter()
                .filter_map(|n| parse_segment_name(n))
                .collect(),
        };
        starts.sort_unstable();
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
    /// every acknowledged write is then still in the log, and the next load replays it.
    pub(crate) fn close(&self) -> Result<(), StoreError> {
        let _gate = write_lock(&self.gate);
        if self.is_closed() {
            return Ok(());
        }
        let result = self.checkpoint_locked();
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

    fn retire(&self) {
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
    fn checkpoint_locked(&self) -> Result<(), StoreError> {
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

    /// Replaces a phext's file atomically with `doc`'s canonical bytes, written in pieces of
    /// about [`PHEXT_WRITE_BUFFER_BYTES`], or removes it for an empty document. The caller
    /// syncs the directory.
    fn write_phext(&self, name: &PhextName, doc: &Doc) -> Result<(), StoreError> {
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
    fn remove_segments_before(&self, lsn: u64) -> Result<(), StoreError> {
        let dir = self.wal.dir();
        let names = match self.vfs.list(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other.map_err(StoreError::io("list log dir", dir))?,
        };
        let mut old: Vec<u64> =
            names.iter().filter_map(|n| parse_segment_name(n)).filter(|&s| s < lsn).collect();
        old.sort_unstable();
        for start in old {
            let path = dir.join(super::wal::segment_name(start));
            self.vfs.remove_file(&path).map_err(StoreError::io("remove log segment", &path))?;
            self.vfs.sync_dir(dir).map_err(StoreError::io("sync log dir", dir))?;
        }
        Ok(())
    }
}
