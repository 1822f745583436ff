//! The durable tenant store: every tenant's phexts on this node, and the executor that runs a
//! `proto::SqRequest` against them.
//!
//! Why it is shaped this way (PRODUCT §4):
//! - An acknowledged write survives `kill -9` and a power cut, yet a write must not cost more on
//!   a large document than on a small one. So a write is one record appended to the tenant's log
//!   ([`wal`]) and one O(log n) change to the document in memory; concurrent writers share one
//!   fsync (group commit). Whole documents are rewritten only by checkpoints, amortised over
//!   [`StoreConfig::checkpoint_wal_bytes`] of log.
//! - Thousands of active tenants among 100,000: a tenant is loaded on first use and unloaded
//!   (checkpointed, files closed) when idle or when the memory budget is exceeded.
//!
//! On disk: `<data_dir>/tenants/<tenant>/phexts/<name>.phext` (canonical bytes) and
//! `<data_dir>/tenants/<tenant>/wal/<first lsn:020>.log`. All disk access goes through [`Vfs`]
//! and all time through [`Clock`], so the simulator can run the store on a faulty in-memory disk.
//!
//! The API is blocking; the node calls it from `spawn_blocking`.

mod clock;
mod error;
mod handoff;
mod recovery;
mod tenant;
mod vfs;
mod wal;

#[cfg(test)]
mod prop_decoders;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::time::Duration;

use proto::request::{Selector, BODY_BYTES_MAX, DELTA_LINES_MAX, QUERY_SET_MAX, SQ_API_VERSION};
use proto::streamed::{AnswerStream, OrderedRead};
use proto::{ops, Coordinate, PhextName, SqRequest, SqResponse};

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{StoreError, IO_RETRY_AFTER_S};
pub use handoff::is_tenant_file_path;
pub use tenant::{
    PHEXT_MEMORY_OVERHEAD_BYTES, QUOTA_WARN_PERCENT, SCROLL_MEMORY_OVERHEAD_BYTES,
    TENANT_MEMORY_OVERHEAD_BYTES,
};
pub(crate) use vfs::create_dir_durable;
pub use vfs::{RealVfs, UnsyncedVfs, Vfs, VfsFile, VfsReader};

use tenant::{Edit, Tenant, TenantPaths};

/// How many times one request goes back for a tenant that was unloaded under it before giving up
/// with `Busy`. Each retry follows a completed unload, so more than two means an unload storm.
const CLOSED_RETRIES_MAX: usize = 8;

/// Eviction unloads down to this share of each limit, in percent, so it runs in batches rather
/// than on every request once the store is full.
const EVICT_LOW_WATER_PERCENT: u64 = 90;

/// The store's settings. Every field has a default, given in its comment.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The node's data directory; tenants live under `<data_dir>/tenants/`. Default: `data`.
    pub data_dir: PathBuf,
    /// Estimated memory, in bytes, that loaded tenants may hold (document bytes plus the
    /// per-tenant, per-phext and per-scroll overheads exported by this module). Above it the least
    /// recently used tenants are unloaded. Default: 1 GiB.
    pub memory_budget_bytes: u64,
    /// The most tenants loaded at once. Each loaded tenant that has written holds one open log
    /// file, so this bounds file descriptors as well as memory; the node's `RLIMIT_NOFILE` must
    /// exceed it. Default: 8192.
    pub loaded_tenants_max: usize,
    /// A tenant with no request for this long is unloaded by [`Store::unload_idle`].
    /// Default: 60 s.
    pub idle_unload_after: Duration,
    /// Log bytes after which a tenant is checkpointed (its changed phexts rewritten, its log
    /// emptied). Bounds both disk use and the replay time of a load. Default: 64 MiB.
    pub checkpoint_wal_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            data_dir: PathBuf::from("data"),
            memory_budget_bytes: 1 << 30,
            loaded_tenants_max: 8192,
            idle_unload_after: Duration::from_secs(60),
            checkpoint_wal_bytes: 64 << 20,
        }
    }
}

/// One tenant's place in the store: its loaded incarnation, if any, and otherwise its storage
/// use when last known. Slots stay for the life of the store (about 150 bytes each with the map
/// entry), which is what lets [`Store::storage_bytes`] answer for unloaded tenants cheaply. Its
/// mutex serialises loading and unloading of that one tenant; it is never held across a request.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    tenant: Option<Arc<Tenant>>,
    storage_bytes: Option<u64>,
}

fn lock_slot(slot: &Slot) -> MutexGuard<'_, SlotState> {
    slot.state.lock().expect("slot lock poisoned: a thread panicked while holding it")
}

/// A store lock tried without waiting: `None` when another thread holds it. A poisoned one
/// panics like every store lock (ARCHITECTURE.md, "Locks and panics"): a try must not pass for
/// "busy" over data a panic may have left half-changed.
pub(crate) fn tried<G>(attempt: Result<G, TryLockError<G>>) -> Option<G> {
    match attempt {
        Ok(guard) => Some(guard),
        Err(TryLockError::WouldBlock) => None,
        Err(TryLockError::Poisoned(_)) => {
            panic!("store lock poisoned: a thread panicked while holding it")
        }
    }
}

pub struct Store {
    config: StoreConfig,
    tenants_dir: PathBuf,
    vfs: Arc<dyn Vfs>,
    clock: Arc<dyn Clock>,
    /// Ordered, so that unloading and eviction visit tenants in one order on every run (the
    /// simulator replays a seed event for event; a hash order would differ per process).
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    /// Estimated memory of all loaded tenants; each tenant adds and removes its own share.
    memory_bytes: Arc<AtomicU64>,
    loaded_count: AtomicUsize,
    /// Held by the one thread that evicts at a time.
    evicting: Mutex<()>,
}

pub use proto::auth::valid_tenant_id;

fn check_tenant_id(id: &str) -> Result<(), StoreError> {
    if valid_tenant_id(id) {
        Ok(())
    } else {
        Err(StoreError::InvalidTenant(id.to_string()))
    }
}

impl Store {
    /// Opens the store over `config.data_dir`, creating `<data_dir>/tenants` if needed. Tenants
    /// are loaded lazily, on first use.
    pub fn open(
        config: StoreConfig,
        vfs: Arc<dyn Vfs>,
        clock: Arc<dyn Clock>,
    ) -> Result<Store, StoreError> {
        let tenants_dir = config.data_dir.join("tenants");
        vfs::create_dir_durable(vfs.as_ref(), &tenants_dir)
            .map_err(StoreError::io("create dir", &tenants_dir))?;
        Ok(Store {
            config,
            tenants_dir,
            vfs,
            clock,
            slots: RwLock::new(BTreeMap::new()),
            memory_bytes: Arc::new(AtomicU64::new(0)),
            loaded_count: AtomicUsize::new(0),
            evicting: Mutex::new(()),
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Runs one request for `tenant`, whose quota is `quota_bytes`. A write is answered only once
    /// it is durable; a read only once everything it saw is durable. Reads create nothing.
    pub fn execute(
        &self,
        tenant: &str,
        quota_bytes: u64,
        req: &SqRequest,
    ) -> Result<SqResponse, StoreError> {
        match self.execute_begin(tenant, quota_bytes, req) {
            Begun::Done(result) => result,
            Begun::Logged(logged) => self.execute_finish(logged),
        }
    }

    /// [`Self::execute`] in two halves. This one runs the request up to its effect: a read or a
    /// refusal is answered; a write is applied in memory and its record added to the log's
    /// pending batch, and [`Self::execute_finish`] answers it once the record is durable. Other
    /// writers' records may join the batch meanwhile, and a checkpoint may flush it.
    pub fn execute_begin(&self, tenant: &str, quota_bytes: u64, req: &SqRequest) -> Begun {
        let result = check_tenant_id(tenant)
            .and_then(|()| validate(req))
            .and_then(|()| self.execute_valid(tenant, quota_bytes, req));
        match result {
            Ok(Ran::Answered(response)) => Begun::Done(Ok(response)),
            Ok(Ran::Logged(logged)) => Begun::Logged(logged),
            Err(e) => Begun::Done(Err(failed(tenant, req.route().name(), e))),
        }
    }

    /// The second half of a write begun by [`Self::execute_begin`]: its answer, once its log
    /// record is durable.
    pub fn execute_finish(&self, logged: Logged) -> Result<SqResponse, StoreError> {
        let Logged { tenant: t, lsn, answer, route } = logged;
        match t.wait_durable(lsn) {
            Ok(()) => {
                self.after_request(&t);
                Ok(SqResponse::text(answer))
            }
            Err(e) => {
                if matches!(e, StoreError::Io { .. }) {
                    self.discard(&t.id, &t);
                }
                Err(failed(&t.id, route, e))
            }
        }
    }

    /// Answers a `select` or `version` at once, from memory, if it needs neither the disk nor a
    /// wait: the tenant is loaded, no lock it needs is taken, its log is healthy, and what the
    /// read sees is durable. `None`
    /// otherwise, and for every other request: run those with [`Self::execute`], off the async
    /// threads. Selects are the hot read path and cost one scroll, so they may run inline.
    pub fn execute_now(
        &self,
        tenant: &str,
        req: &SqRequest,
    ) -> Option<Result<SqResponse, StoreError>> {
        let (p, c) = match req {
            SqRequest::Version => return Some(Ok(SqResponse::text(SQ_API_VERSION))),
            SqRequest::Select { p, c } => (p, c),
            _ => return None,
        };
        if let Err(e) = validate(req) {
            return Some(Err(e));
        }
        // Every lock is only tried: a tenant being loaded or unloaded holds its slot for as long
        // as the disk takes, and this runs on an async thread.
        let slot = tried(self.slots.try_read())?.get(tenant).cloned()?;
        let t = tried(slot.state.try_lock())?.tenant.clone()?;
        if t.is_closed() || t.log_failed() {
            return None;
        }
        let body = t.read_now(p, |d| d.get(c).as_bytes().to_vec())?;
        t.touch(self.clock.now_ms());
        Some(Ok(SqResponse::text(body)))
    }

    /// A `get`, `toc`, `query` or `json-export` that streams a large answer: built whole up to
    /// `stream_above` bytes; past it, its length and the document's file as it is now, from
    /// which the answer is made while the file is read in ranges ([`FileAnswer`]), so no copy
    /// of the document or the answer is built whatever its size. Later writes do not show in it.
    /// Any other request is refused.
    pub fn open_read(
        &self,
        id: &str,
        req: &SqRequest,
        stream_above: u64,
    ) -> Result<Opened, StoreError> {
        check_tenant_id(id)?;
        validate(req)?;
        let Some((p, read)) = OrderedRead::of(req) else {
            return Err(StoreError::InvalidRequest(format!(
                "{} is not answered in pieces",
                req.route().name()
            )));
        };
        for _ in 0..CLOSED_RETRIES_MAX {
            let t = self.tenant(id)?;
            t.touch(self.clock.now_ms());
            match t.open_read(p, &read, stream_above) {
                Ok(Some(opened)) => return Ok(opened),
                Ok(None) => continue,
                Err(e @ StoreError::Io { .. }) => {
                    self.discard(id, &t);
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Busy(id.to_string()))
    }

    fn execute_valid(
        &self,
        id: &str,
        quota_bytes: u64,
        req: &SqRequest,
    ) -> Result<Ran, StoreError> {
        if req.phext().is_none() {
            return Ok(Ran::Answered(SqResponse::text(SQ_API_VERSION)));
        }
        for _ in 0..CLOSED_RETRIES_MAX {
            let t = self.tenant(id)?;
            t.touch(self.clock.now_ms());
            match run(&t, quota_bytes, req) {
                Ok(Some(Ran::Logged(logged))) => return Ok(Ran::Logged(logged)),
                Ok(Some(ran)) => {
                    self.after_request(&t);
                    return Ok(ran);
                }
                Ok(None) => continue,
                Err(e @ StoreError::Io { .. }) => {
                    self.discard(id, &t);
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Busy(id.to_string()))
    }

    /// Upkeep after a request: a checkpoint if the tenant's log is long, eviction if the store is
    /// over its limits. Failures here are logged, not returned: the request itself succeeded.
    fn after_request(&self, t: &Arc<Tenant>) {
        if let Err(e) = t.checkpoint_if_over(self.config.checkpoint_wal_bytes) {
            tracing::warn!(tenant = %t.id, error = %e, "checkpoint failed; the log keeps every change");
        }
        if self.over_limits() {
            self.evict(Some(&t.id));
        }
    }

    /// The tenant's storage use: the canonical bytes of all its phexts. Answers from memory for
    /// loaded tenants and tenants seen since the store opened; otherwise loads the tenant. A
    /// tenant with no data is 0, and nothing is created for it.
    pub fn storage_bytes(&self, tenant: &str) -> Result<u64, StoreError> {
        check_tenant_id(tenant)?;
        let slot = self.slots.read().expect("slot map lock poisoned").get(tenant).cloned();
        if let Some(slot) = slot {
            let s = lock_slot(&slot);
            match (&s.tenant, s.storage_bytes) {
                (Some(t), _) if !t.is_closed() => return Ok(t.used_bytes()),
                (None, Some(bytes)) => return Ok(bytes),
                _ => {}
            }
        }
        let paths = TenantPaths::new(&self.tenants_dir, tenant);
        if !self.vfs.exists(&paths.root).map_err(StoreError::io("stat tenant dir", &paths.root))? {
            return Ok(0);
        }
        let bytes = self.tenant(tenant)?.used_bytes();
        if self.over_limits() {
            self.evict(Some(tenant));
        }
        Ok(bytes)
    }

    /// The ids of the tenants loaded now, sorted.
    pub fn loaded_tenants(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .all_slots()
            .into_iter()
            .filter(|(_, slot)| lock_slot(slot).tenant.is_some())
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        ids
    }

    /// Estimated memory held by loaded tenants, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::SeqCst)
    }

    /// Unloads every tenant idle for [`StoreConfig::idle_unload_after`], then the least recently
    /// used ones while the store is over its limits. Returns how many were unloaded. Call it
    /// periodically.
    pub fn unload_idle(&self) -> usize {
        let idle_ms = u64::try_from(self.config.idle_unload_after.as_millis()).unwrap_or(u64::MAX);
        // Before the clock has run for a whole idle period, no tenant can have been idle that long.
        let Some(cutoff) = self.clock.now_ms().checked_sub(idle_ms) else {
            return self.evict(None);
        };
        let mut unloaded = 0;
        for (id, slot) in self.all_slots() {
            match self.unload_slot(&slot, Some(cutoff)) {
                Ok(true) => unloaded += 1,
                Ok(false) => {}
                Err(e) => {
                    unloaded += 1;
                    tracing::warn!(tenant = %id, error = %e, "checkpoint on unload failed; the log keeps every change");
                }
            }
        }
        unloaded + self.evict(None)
    }

    /// Checkpoints and unloads one tenant. Returns whether it was loaded. Unloaded even when
    /// the checkpoint fails (the error is returned): the log still holds every change.
    pub fn unload(&self, tenant: &str) -> Result<bool, StoreError> {
        check_tenant_id(tenant)?;
        let slot = self.slots.read().expect("slot map lock poisoned").get(tenant).cloned();
        match slot {
            Some(slot) => self.unload_slot(&slot, None),
            None => Ok(false),
        }
    }

    /// Checkpoints every loaded tenant, for a clean shutdown: the next start replays no log.
    /// Tenants stay loaded. Returns the first failure after trying them all.
    pub fn flush_all(&self) -> Result<(), StoreError> {
        let mut first_error = None;
        for (id, slot) in self.all_slots() {
            let tenant = lock_slot(&slot).tenant.clone();
            if let Some(Err(e)) = tenant.map(|t| t.checkpoint()) {
                tracing::warn!(tenant = %id, error = %e, "checkpoint at shutdown failed; the log keeps every change");
                first_error.get_or_insert(e);
            }
        }
        // A tenant not loaded can hold a log too: one a crash left (tenants load on first use)
        // or one whose checkpoint failed at unload. Fold those as well, one tenant in memory at
        // a time, so a clean stop leaves every tenant as `.phext` files alone.
        for id in self.local_tenants()? {
            if let Err(e) = self.fold_log_if_unloaded(&id) {
                tracing::warn!(tenant = %id, error = %e, "folding the log at shutdown failed; the log keeps every change");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Loads a tenant that is not loaded but has log segments on disk, and unloads it again,
    /// which checkpoints it: its log is folded into its `.phext` files.
    fn fold_log_if_unloaded(&self, id: &str) -> Result<(), StoreError> {
        if lock_slot(&self.slot(id)).tenant.is_some() {
            return Ok(());
        }
        let wal = TenantPaths::new(&self.tenants_dir, id).wal;
        let segments = match self.vfs.list(&wal) {
            Ok(names) => names.iter().filter(|n| wal::parse_segment_name(n).is_some()).count(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(StoreError::io("list log dir", &wal)(e)),
        };
        if segments == 0 {
            return Ok(());
        }
        self.tenant(id)?;
        self.unload(id).map(|_| ())
    }

    fn slot(&self, id: &str) -> Arc<Slot> {
        if let Some(slot) = self.slots.read().expect("slot map lock poisoned").get(id) {
            return slot.clone();
        }
        self.slots
            .write()
            .expect("slot map lock poisoned")
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn all_slots(&self) -> Vec<(String, Arc<Slot>)> {
        let slots = self.slots.read().expect("slot map lock poisoned");
        slots.iter().map(|(id, s)| (id.clone(), s.clone())).collect()
    }

    /// The tenant's loaded incarnation, loading it from disk if needed. Holds only this tenant's
    /// slot while loading.
    fn tenant(&self, id: &str) -> Result<Arc<Tenant>, StoreError> {
        let slot = self.slot(id);
        let mut s = lock_slot(&slot);
        if let Some(t) = s.tenant.clone() {
            assert!(!t.is_closed(), "a closed tenant stayed in its slot");
            if !t.log_failed() {
                return Ok(t);
            }
            // Its log failed after its last request; start over from what is on disk.
            t.discard();
            s.tenant = None;
            self.loaded_count.fetch_sub(1, Ordering::SeqCst);
        }
        let paths = TenantPaths::new(&self.tenants_dir, id);
        let t = recovery::load(
            id,
            paths,
            self.vfs.clone(),
            self.memory_bytes.clone(),
            self.clock.now_ms(),
        )?;
        let t = Arc::new(t);
        s.tenant = Some(t.clone());
        s.storage_bytes = None;
        self.loaded_count.fetch_add(1, Ordering::SeqCst);
        Ok(t)
    }

    /// Unloads the slot's tenant if it is loaded and, given a cutoff, unused since then.
    fn unload_slot(&self, slot: &Slot, idle_since_ms: Option<u64>) -> Result<bool, StoreError> {
        let mut s = lock_slot(slot);
        let Some(t) = s.tenant.clone() else { return Ok(false) };
        if idle_since_ms.is_some_and(|cutoff| t.last_used_ms() > cutoff) {
            return Ok(false);
        }
        let result = t.close();
        s.storage_bytes = Some(t.used_bytes());
        s.tenant = None;
        self.loaded_count.fetch_sub(1, Ordering::SeqCst);
        result.map(|()| true)
    }

    /// Forgets a tenant whose log failed, so its next request reloads it from disk.
    fn discard(&self, id: &str, t: &Arc<Tenant>) {
        let slot = self.slot(id);
        let mut s = lock_slot(&slot);
        if s.tenant.as_ref().is_some_and(|current| Arc::ptr_eq(current, t)) {
            t.discard();
            s.tenant = None;
            self.loaded_count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn over_limits(&self) -> bool {
        self.memory_bytes() > self.config.memory_budget_bytes
            || self.loaded_count.load(Ordering::SeqCst) > self.config.loaded_tenants_max
    }

    /// Unloads least recently used tenants (never `keep`) until the store is below the low-water
    /// mark of both limits. One thread evicts at a time; others go on. Returns how many went.
    fn evict(&self, keep: Option<&str>) -> usize {
        // It guards no data, so a panic while evicting leaves nothing to distrust: recovered.
        let _evicting = match self.evicting.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return 0,
        };
        if !self.over_limits() {
            return 0;
        }
        let mut loaded: Vec<(u64, String, Arc<Slot>)> = Vec::new();
        for (id, slot) in self.all_slots() {
            // A slot busy loading or unloading is skipped rather than waited for.
            let last_used = tried(slot.state.try_lock())
                .and_then(|s| s.tenant.as_ref().map(|t| t.last_used_ms()));
            if let Some(last_used) = last_used.filter(|_| Some(id.as_str()) != keep) {
                loaded.push((last_used, id, slot));
            }
        }
        loaded.sort_unstable_by_key(|(last_used, _, _)| *last_used);
        let memory_target = self.config.memory_budget_bytes / 100 * EVICT_LOW_WATER_PERCENT;
        let count_target =
            self.config.loaded_tenants_max.saturating_mul(EVICT_LOW_WATER_PERCENT as usize) / 100;
        let mut unloaded = 0;
        for (_, id, slot) in loaded {
            if self.memory_bytes() <= memory_target
                && self.loaded_count.load(Ordering::SeqCst) <= count_target
            {
                break;
            }
            match self.unload_slot(&slot, None) {
                Ok(true) => unloaded += 1,
                Ok(false) => {}
                Err(e) => {
                    unloaded += 1;
                    tracing::warn!(tenant = %id, error = %e, "checkpoint on eviction failed; the log keeps every change");
                }
            }
        }
        unloaded
    }
}

/// Logs a store failure other than a quota refusal (the client's doing), and returns it.
fn failed(tenant: &str, route: &str, e: StoreError) -> StoreError {
    if !matches!(e, StoreError::QuotaExceeded { .. }) {
        tracing::warn!(tenant, route, error = %e, "store request failed");
    }
    e
}

/// What [`Store::execute_begin`] did.
pub enum Begun {
    /// The request is answered (or refused).
    Done(Result<SqResponse, StoreError>),
    /// A write is applied in memory and logged, not yet durable: [`Store::execute_finish`].
    Logged(Logged),
}

/// A write whose log record is not yet known to be durable, and its answer.
pub struct Logged {
    tenant: Arc<Tenant>,
    lsn: u64,
    answer: String,
    route: &'static str,
}

/// What [`run`] did on a loaded tenant.
enum Ran {
    Answered(SqResponse),
    Logged(Logged),
}

/// A read's answer: whole, or a large answer's length and the file it is made from.
pub enum Opened {
    Whole(SqResponse),
    Stream { len: u64, json: bool, file: Box<FileAnswer> },
}

/// A large answer still to be made: the document's file, opened at one moment, and the maker of
/// the answer from its bytes. [`FileAnswer::next_piece`] reads the file in ranges and gives the
/// answer a piece at a time, so it holds one range and one piece whatever the sizes.
pub struct FileAnswer {
    path: PathBuf,
    reader: Box<dyn VfsReader>,
    answer: AnswerStream,
    /// The next file offset to read.
    offset: u64,
    /// Bytes read from the file, used up to `used`.
    pending: Vec<u8>,
    used: usize,
    finished: bool,
}

/// Bytes a piece of a [`FileAnswer`] may run over the size asked for: one row's opening.
const PIECE_SLACK_BYTES: usize = 256;

impl FileAnswer {
    fn new(path: PathBuf, reader: Box<dyn VfsReader>, answer: AnswerStream) -> FileAnswer {
        FileAnswer {
            path,
            reader,
            answer,
            offset: 0,
            pending: Vec::new(),
            used: 0,
            finished: false,
        }
    }

    /// The next piece of the answer, `piece_bytes` long or a little more (the last may be
    /// shorter), reading the file at most `piece_bytes` at a time; `None` once the answer is
    /// complete. A file that ends early or does not read as a phext is an error: the answer
    /// cannot be finished.
    pub fn next_piece(&mut self, piece_bytes: usize) -> Result<Option<Vec<u8>>, StoreError> {
        let piece_bytes = piece_bytes.max(1);
        let file_len = self.reader.file_len();
        let mut out = Vec::with_capacity(piece_bytes + PIECE_SLACK_BYTES);
        while out.len() < piece_bytes && !self.finished {
            let drained = self.used == self.pending.len();
            if self.answer.done() || (drained && self.offset >= file_len) {
                self.finished = self.answer.finish(&mut out, piece_bytes);
                break;
            }
            if drained {
                let want = (file_len - self.offset).min(piece_bytes as u64) as usize;
                self.pending = self
                    .reader
                    .read_at(self.offset, want)
                    .map_err(StoreError::io("read phext", &self.path))?;
                self.used = 0;
                if self.pending.is_empty() {
                    let detail = format!("ended at {} of {file_len} bytes", self.offset);
                    return Err(StoreError::corrupt(&self.path, detail));
                }
                self.offset += self.pending.len() as u64;
            }
            self.used += self
                .answer
                .feed(&self.pending[self.used..], &mut out, piece_bytes)
                .map_err(|e| StoreError::corrupt(&self.path, e.to_string()))?;
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

/// The largest answer that travels whole, in one message to the gateway: a message's limit less
/// room for its envelope. `get`, `toc` and `query` answers are sized before they are built, and
/// one past this is refused with a final error rather than built and then failing to send.
const WHOLE_ANSWER_BYTES_MAX: u64 = (proto::wire::MESSAGE_BYTES_MAX - (1 << 20)) as u64;

/// Checks a sized answer against [`WHOLE_ANSWER_BYTES_MAX`] before it is built.
fn sized(answer_bytes: u64) -> Result<(), StoreError> {
    if answer_bytes > WHOLE_ANSWER_BYTES_MAX {
        return Err(StoreError::AnswerTooLarge {
            answer_bytes,
            limit_bytes: WHOLE_ANSWER_BYTES_MAX,
        });
    }
    Ok(())
}

/// Runs a validated request on a loaded tenant; `Ok(None)` when the tenant closed under a write.
fn run(t: &Arc<Tenant>, quota_bytes: u64, req: &SqRequest) -> Result<Option<Ran>, StoreError> {
    let plain = |body: Vec<u8>| SqResponse::text(body);
    let response = match req {
        SqRequest::Version => return Ok(Some(Ran::Answered(SqResponse::text(SQ_API_VERSION)))),
        SqRequest::Select { p, c } => t.read(p, |d| plain(d.get(c).as_bytes().to_vec()))?,
        SqRequest::Toc { p } => {
            t.read(p, |d| sized(ops::toc_len(d)).map(|_| plain(ops::toc(d).into_bytes())))??
        }
        SqRequest::Get { p } => {
            t.read(p, |d| sized(d.canonical_len()).map(|_| plain(d.to_canonical())))??
        }
        SqRequest::Checksum { p } => t.read(p, |d| plain(ops::doc_checksum(d).into_bytes()))?,
        SqRequest::Delta { p, manifest } => t.read(p, |d| {
            // Sized first: a few listed coordinates far from the origin cost megabytes each.
            let answer_bytes = ops::delta_len(d, manifest);
            if answer_bytes > ops::ANSWER_BYTES_MAX {
                return Err(StoreError::AnswerTooLarge {
                    answer_bytes,
                    limit_bytes: ops::ANSWER_BYTES_MAX,
                });
            }
            Ok(plain(ops::delta(d, manifest)))
        })??,
        SqRequest::Query { p, selector, limit } => t.read(p, |d| {
            sized(ops::query_len(d, selector, *limit))
                .map(|_| SqResponse { body: ops::query(d, selector, *limit), json: true })
        })??,
        SqRequest::Status { p } => t.read(p, |d| plain(ops::status(p.as_str(), d).into_bytes()))?,
        SqRequest::Load { p } => t.read(p, |_| plain(ops::loaded(p.as_str()).into_bytes()))?,
        SqRequest::JsonExport { p } => t.read(p, |d| {
            sized(ops::json_export_len(d))
                .map(|_| SqResponse { body: ops::json_export(d).into_bytes(), json: true })
        })??,
        SqRequest::Where { text, algo, limit, .. } => {
            plain(ops::where_(text, *algo, *limit).into_bytes())
        }
        SqRequest::Insert { p, c, text } => {
            return write(t, p, *c, Edit::Insert(text), quota_bytes, req.route().name())
        }
        SqRequest::Update { p, c, text } => {
            return write(t, p, *c, Edit::Update(text), quota_bytes, req.route().name())
        }
        SqRequest::Delete { p, c } => {
            return write(t, p, *c, Edit::Delete, quota_bytes, req.route().name())
        }
    };
    Ok(Some(Ran::Answered(response)))
}

fn write(
    t: &Arc<Tenant>,
    p: &PhextName,
    c: Coordinate,
    edit: Edit<'_>,
    quota: u64,
    route: &'static str,
) -> Result<Option<Ran>, StoreError> {
    Ok(t.write_logged(p, c, edit, quota)?
        .map(|(answer, lsn)| Ran::Logged(Logged { tenant: t.clone(), lsn, answer, route })))
}

/// Refuses what `proto::request::parse` would have refused. Requests reach the node over the
/// wire, where serde builds names and coordinates without their checks; one that slipped through
/// could name a file outside the tenant or trip the document's invariants.
fn validate(req: &SqRequest) -> Result<(), StoreError> {
    let bad = |detail: String| Err(StoreError::InvalidRequest(detail));
    if let Some(p) = req.phext() {
        if PhextName::parse(p.as_str()).is_err() {
            return bad("invalid phext name".into());
        }
    }
    let coord = |c: &Coordinate| {
        Coordinate::from_components(c.components())
            .map(|_| ())
            .map_err(|e| StoreError::InvalidRequest(e.to_string()))
    };
    match req {
        SqRequest::Select { c, .. } | SqRequest::Delete { c, .. } => coord(c),
        SqRequest::Insert { c, text, .. } | SqRequest::Update { c, text, .. } => {
            coord(c)?;
            if text.len() > BODY_BYTES_MAX {
                return bad(format!("text exceeds {BODY_BYTES_MAX} bytes"));
            }
            if proto::doc::contains_break(text) {
                return bad("text contains phext dimension breaks".into());
            }
            Ok(())
        }
        SqRequest::Delta { manifest, .. } if manifest.len() > DELTA_LINES_MAX => {
            bad("delta manifest too long".into())
        }
        SqRequest::Delta { manifest, .. } => manifest.iter().try_for_each(|(c, _)| coord(c)),
        SqRequest::Query { selector: Selector { set, .. }, .. } if set.len() > QUERY_SET_MAX => {
            bad("query set too long".into())
        }
        SqRequest::Query { selector: Selector { set, .. }, .. }
            if set.windows(2).any(|w| w[0] >= w[1]) =>
        {
            bad("query set not sorted".into())
        }
        SqRequest::Query { selector: Selector { range, set }, .. } => {
            range.iter().try_for_each(|(from, to)| coord(from).and_then(|_| coord(to)))?;
            set.iter().try_for_each(coord)
        }
        SqRequest::Where { text, .. } if text.len() > BODY_BYTES_MAX => {
            bad(format!("text exceeds {BODY_BYTES_MAX} bytes"))
        }
        SqRequest::Version
        | SqRequest::Toc { .. }
        | SqRequest::Get { .. }
        | SqRequest::Checksum { .. }
        | SqRequest::Status { .. }
        | SqRequest::Load { .. }
        | SqRequest::JsonExport { .. }
        | SqRequest::Where { .. } => Ok(()),
    }
}
