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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use proto::streamed::OrderedRead;
use proto::{ops, Coordinate, Doc, PhextName};

use super::ballots::Ballots;
use super::error::StoreError;
use super::vfs::{create_dir_durable, Vfs};
use super::wal::{Op, Wal};
use super::{tried, FileAnswer, Opened};

mod checkpoint;
mod replicated;

pub(crate) use replicated::Tail;

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
    /// Loaded with its log alone, to take a primary's records (`recovery::Load::Log`): `phexts`
    /// is empty and stays so, and nothing but the replica's side (`replicated`) and closing may
    /// use it. Fixed for the life of this incarnation; the store loads the tenant again, whole,
    /// for anything else.
    log_only: bool,
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
            log_only: false,
        }
    }

    /// This tenant, loaded with its log alone and no documents ([`Self::is_log_only`]).
    pub(crate) fn log_only(mut self) -> Tenant {
        assert!(read_lock(&self.phexts).is_empty(), "a log-only tenant holds no documents");
        self.log_only = true;
        self
    }

    /// Loaded with its log alone: it takes a primary's records, and nothing reads or writes its
    /// documents.
    pub(crate) fn is_log_only(&self) -> bool {
        self.log_only
    }

    /// Every use of the documents goes through here: a log-only tenant has none to use.
    fn assert_docs(&self) {
        assert!(!self.log_only, "a log-only tenant's documents were asked for");
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

    /// The phext's entry, made (an empty document, its overhead counted) if it has none.
    fn entry_or_new(&self, p: &PhextName) -> Entry {
        let mut phexts = write_lock(&self.phexts);
        if let Some(e) = phexts.get(p) {
            return e.clone();
        }
        let e = Entry::default();
        phexts.insert(p.clone(), e.clone());
        drop(phexts);
        self.add_memory(doc_memory(&Doc::new()) as i64);
        e
    }

    /// Runs `f` on the phext (an empty document if it does not exist) and returns its result once
    /// every change `f` saw is durable. Creates nothing.
    pub(crate) fn read<R>(
        &self,
        p: &PhextName,
        f: impl FnOnce(&Doc) -> R,
    ) -> Result<R, StoreError> {
        self.assert_docs();
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
        self.assert_docs();
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
        self.assert_docs();
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
        self.assert_docs();
        let gate = read_lock(&self.gate);
        if self.is_closed() {
            return Ok(None);
        }
        let entry = match self.entry(p) {
            Some(e) => e,
            None if edit.is_noop_on_empty() => {
                return Ok(Some((plan(&Doc::new(), c, edit).0, 0, false)))
            }
            None => self.entry_or_new(p),
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
        self.assert_docs();
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
}
