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
//!
//! This file holds the store itself: its tenants' slots and their loading; [`evict`] unloads them.
//! [`execute`] runs a request on a loaded tenant, and [`streamed`] answers large reads in pieces.

mod ballots;
mod clock;
mod error;
mod evict;
mod execute;
mod handoff;
mod recovery;
mod replica;
mod slots;
mod snapshot;
mod streamed;
mod tenant;
mod vfs;
mod wal;

#[cfg(test)]
mod prop_decoders;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::time::Duration;

pub use ballots::{
    common_prefix, BallotError, BallotStart, Ballots, LogPosition, Shared, BALLOT_HISTORY_MAX,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{StoreError, IO_RETRY_AFTER_S};
pub use execute::{Begun, Logged};
pub use handoff::is_tenant_file_path;
pub use replica::{AppendRefusal, LogTail, ReplicaState, Shipment, REPLICA_BATCH_BYTES_MAX};
pub use snapshot::SnapshotImage;
pub use streamed::{FileAnswer, Opened};
pub use tenant::{
    PHEXT_MEMORY_OVERHEAD_BYTES, QUOTA_WARN_PERCENT, REPLICA_TAIL_BYTES_MAX,
    SCROLL_MEMORY_OVERHEAD_BYTES, TENANT_MEMORY_OVERHEAD_BYTES,
};
pub(crate) use vfs::create_dir_durable;
pub use vfs::{RealVfs, UnsyncedVfs, Vfs, VfsFile, VfsReader};

use recovery::Load;
use slots::{SlotRef, Slots};
use tenant::{Tenant, TenantPaths};

/// How many times one request goes back for a tenant that was unloaded under it before giving up
/// with `Busy`. Each retry follows a completed unload, so more than two means an unload storm.
const CLOSED_RETRIES_MAX: usize = 8;

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
    /// exceed it. A load at the cap first unloads the least recently used tenant, so it is
    /// exceeded by at most the loads in progress. Default: 8192.
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
            loaded_tenants_max: crate::config::DEFAULT_LOADED_TENANTS_MAX,
            idle_unload_after: Duration::from_secs(60),
            checkpoint_wal_bytes: 64 << 20,
        }
    }
}

/// One tenant's place in the store: its loaded incarnation, if any, and otherwise its storage
/// use when last known. Slots stay for the life of the store (about 57 bytes each with the id and
/// the index entry, in chunks shared by a thousand slots: what an idle copy of a tenant costs
/// the store; [`slots`]), which is what lets [`Store::storage_bytes`] answer for unloaded
/// tenants cheaply. Its mutex serialises loading and unloading of that one tenant; it is never
/// held across a request.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    tenant: Option<Arc<Tenant>>,
    storage_bytes: KnownBytes,
}

// The size the slot's comment and docs/BENCHMARKS.md count on: a mutex word, the tenant, its
// bytes (with the Arc's two counts, 40 bytes).
const _: () = assert!(std::mem::size_of::<Slot>() <= 24);

/// A tenant's storage use when last known, or unknown, in 8 bytes where `Option<u64>` takes 16:
/// there is a slot per tenant copy, and this keeps the slot in the allocator's 48-byte class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KnownBytes(u64);

impl KnownBytes {
    const UNKNOWN: KnownBytes = KnownBytes(u64::MAX);

    /// Known bytes; a use of 2^64 - 1 bytes (never reached) is kept as one less.
    fn of(bytes: u64) -> KnownBytes {
        KnownBytes(bytes.min(u64::MAX - 1))
    }

    fn get(self) -> Option<u64> {
        (self != KnownBytes::UNKNOWN).then_some(self.0)
    }
}

impl Default for KnownBytes {
    fn default() -> KnownBytes {
        KnownBytes::UNKNOWN
    }
}

impl SlotState {
    /// The tenant's storage use where it is known without loading anything: from the loaded
    /// tenant, or as it was when last unloaded.
    fn known_bytes(&self) -> Option<u64> {
        match (&self.tenant, self.storage_bytes.get()) {
            (Some(t), _) if !t.is_closed() && !t.is_log_only() => Some(t.used_bytes()),
            (None, bytes) => bytes,
            _ => None,
        }
    }
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
    /// Listed in the order they were made, so that unloading and eviction visit tenants in one
    /// order on every run (the simulator replays a seed event for event).
    slots: RwLock<Slots>,
    /// Estimated memory of all loaded tenants; each tenant adds and removes its own share.
    memory_bytes: Arc<AtomicU64>,
    loaded_count: AtomicUsize,
    /// Held by the one thread that evicts at a time.
    evicting: Mutex<()>,
    /// The slot numbers of the next tenants unloaded to make room for loads at the cap
    /// ([`Store::make_room`]). Numbers rather than ids: the list outlives the burst of loads
    /// that made it, and ids allocated then would pin the allocator's pages that burst filled.
    victims: Mutex<Vec<u32>>,
    /// On while the node replicates its tenants: every loaded tenant keeps its newest records
    /// in memory for its backups ([`Store::shipment`]).
    keeps_tails: Arc<std::sync::atomic::AtomicBool>,
    /// Snapshots taken for replicas that lag, while they read them ([`snapshot`]).
    snapshots: Mutex<snapshot::Snapshots>,
    /// The tenants directory was empty at this open: the store holds nothing, and no start
    /// before this one decided what that means.
    fresh: bool,
    /// The store lost the copies it held (a wiped disk, [`Store::start_rebuilding`]): a tenant
    /// counts toward a majority only once a primary has caught it up.
    rebuilding: std::sync::atomic::AtomicBool,
    /// While rebuilding, the placement epoch the loss was found at (`Store::lost_at_epoch`).
    lost_at_epoch: std::sync::atomic::AtomicU64,
    /// Whether each tenant asked about was caught up, while rebuilding (its marker file).
    caught_up: Mutex<std::collections::HashMap<String, bool>>,
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
        // Empty until the node decides what a new store means (`Store::start_rebuilding` or
        // `Store::settle_new` leave a marker): a start that stopped before is fresh again.
        let fresh =
            vfs.list(&tenants_dir).map_err(StoreError::io("list dir", &tenants_dir))?.is_empty();
        let rebuilding = replica::rebuilding_since_open(vfs.as_ref(), &tenants_dir)?;
        Ok(Store {
            config,
            tenants_dir,
            vfs,
            clock,
            slots: RwLock::new(Slots::default()),
            memory_bytes: Arc::new(AtomicU64::new(0)),
            loaded_count: AtomicUsize::new(0),
            evicting: Mutex::new(()),
            victims: Mutex::new(Vec::new()),
            keeps_tails: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            snapshots: Mutex::new(snapshot::Snapshots::default()),
            fresh,
            rebuilding: std::sync::atomic::AtomicBool::new(rebuilding.is_some()),
            lost_at_epoch: std::sync::atomic::AtomicU64::new(rebuilding.unwrap_or(0)),
            caught_up: Mutex::new(std::collections::HashMap::new()),
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The tenant's storage use: the canonical bytes of all its phexts. Answers from memory for
    /// loaded tenants and tenants seen since the store opened; otherwise loads the tenant. A
    /// tenant with no data is 0, and nothing is created for it.
    pub fn storage_bytes(&self, tenant: &str) -> Result<u64, StoreError> {
        check_tenant_id(tenant)?;
        let slot = self.slots.read().expect("slot map lock poisoned").get(tenant);
        if let Some(slot) = slot {
            if let Some(bytes) = lock_slot(&slot).known_bytes() {
                return Ok(bytes);
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

    /// The storage use of each tenant `keep` accepts, where the store knows it without loading
    /// anything (the tenant is loaded, or was since the store opened), in id order. Never waits:
    /// a tenant being loaded or unloaded right now is left out (a metrics scrape calls this on
    /// an async thread, and a large tenant takes a while to load).
    pub fn known_storage(&self, mut keep: impl FnMut(&str) -> bool) -> Vec<(String, u64)> {
        let mut known: Vec<(String, u64)> = {
            let slots = self.slots.read().expect("slot map lock poisoned");
            slots
                .iter()
                .filter(|(_, id, _)| keep(id))
                .filter_map(|(_, id, slot)| {
                    Some((id.to_string(), tried(slot.state.try_lock())?.known_bytes()?))
                })
                .collect()
        };
        known.sort_unstable();
        known
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

    /// How many tenants are loaded now.
    pub fn loaded_count(&self) -> usize {
        self.loaded_count.load(Ordering::SeqCst)
    }

    /// Estimated memory held by loaded tenants, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::SeqCst)
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
        if wal::list_segments(self.vfs.as_ref(), &wal)?.0.is_empty() {
            return Ok(());
        }
        self.tenant(id)?;
        self.unload(id).map(|_| ())
    }

    /// Runs `f` on tenant `id`, loaded, and again on a fresh load (up to [`CLOSED_RETRIES_MAX`]
    /// times) while it finds the tenant unloaded under it (`Ok(None)`). A disk error drops the
    /// tenant's loaded state, so the next request reloads it from what is durable.
    fn on_loaded<R>(
        &self,
        id: &str,
        f: impl FnMut(&Arc<Tenant>) -> Result<Option<R>, StoreError>,
    ) -> Result<R, StoreError> {
        self.on_loaded_as(id, Load::Docs, f)
    }

    /// [`Self::on_loaded`], with the tenant loaded at least as `what` says: `Load::Log` takes a
    /// tenant loaded whole as it is, and loads one that is not loaded with its log alone.
    fn on_loaded_as<R>(
        &self,
        id: &str,
        what: Load,
        mut f: impl FnMut(&Arc<Tenant>) -> Result<Option<R>, StoreError>,
    ) -> Result<R, StoreError> {
        for _ in 0..CLOSED_RETRIES_MAX {
            let t = self.tenant_as(id, what)?;
            t.touch(self.clock.now_ms());
            match f(&t) {
                Ok(Some(done)) => return Ok(done),
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

    /// The tenant's loaded incarnation, if it is loaded now; loads nothing.
    fn loaded(&self, id: &str) -> Option<Arc<Tenant>> {
        let slot = self.slots.read().expect("slot map lock poisoned").get(id)?;
        let t = lock_slot(&slot).tenant.clone()?;
        (!t.is_closed()).then_some(t)
    }

    /// The tenant's incarnation loaded whole (a backup's copy loaded with its log alone is not)
    /// and open, if it is now. Every lock is only tried, so it never waits: for callers on async
    /// threads, while a load or unload holds the slot for as long as the disk takes.
    fn try_loaded_whole(&self, id: &str) -> Option<Arc<Tenant>> {
        let slot = tried(self.slots.try_read())?.get(id)?;
        let t = tried(slot.state.try_lock())?.tenant.clone()?;
        (!t.is_closed() && !t.is_log_only()).then_some(t)
    }

    /// The tenant's number on this node: its slot's, the slot made (empty) if it has none.
    /// Numbers are dense and stay the tenant's while the store is open (slots are never
    /// removed), so a table with an entry per tenant can key by them in 4 bytes rather than by
    /// the id (`metrics::Calls`).
    pub fn number(&self, id: &str) -> u32 {
        if let Some(n) = self.slots.read().expect("slot map lock poisoned").number(id) {
            return n;
        }
        self.slots.write().expect("slot map lock poisoned").number_or_make(id)
    }

    /// The tenant's number on this node ([`Self::number`]), if it has one; makes none.
    pub fn number_of(&self, id: &str) -> Option<u32> {
        self.slots.read().expect("slot map lock poisoned").number(id)
    }

    /// The ids of tenant numbers `numbers`, in their order.
    pub fn ids_of(&self, numbers: impl IntoIterator<Item = u32>) -> Vec<String> {
        let slots = self.slots.read().expect("slot map lock poisoned");
        numbers.into_iter().map(|n| slots.id_at(n as usize).to_string()).collect()
    }

    fn slot(&self, id: &str) -> SlotRef {
        if let Some(slot) = self.slots.read().expect("slot map lock poisoned").get(id) {
            return slot;
        }
        self.slots.write().expect("slot map lock poisoned").get_or_make(id)
    }

    /// The slots that hold a loaded tenant now, with their ids: what an idle sweep looks at.
    /// Only those are copied out, so a sweep over many idle tenants allocates next to nothing
    /// (it runs every few seconds). A slot busy this instant is left out: it is in use.
    fn loaded_slots(&self) -> Vec<(String, SlotRef)> {
        let slots = self.slots.read().expect("slot map lock poisoned");
        slots
            .iter()
            .filter(|(_, _, slot)| tried(slot.state.try_lock()).is_some_and(|s| s.tenant.is_some()))
            .map(|(n, id, _)| (id.to_string(), slots.ref_at(n)))
            .collect()
    }

    fn all_slots(&self) -> Vec<(String, SlotRef)> {
        let slots = self.slots.read().expect("slot map lock poisoned");
        slots.iter().map(|(n, id, _)| (id.to_string(), slots.ref_at(n))).collect()
    }

    /// The tenant's loaded incarnation with its documents, loading it from disk if needed.
    /// Holds only this tenant's slot while loading.
    fn tenant(&self, id: &str) -> Result<Arc<Tenant>, StoreError> {
        self.tenant_as(id, Load::Docs)
    }

    /// [`Self::tenant`], loaded at least as `what` says (`Load::Log`: a backup taking records).
    fn tenant_as(&self, id: &str, what: Load) -> Result<Arc<Tenant>, StoreError> {
        let slot = self.slot(id);
        if let Some(t) = self.loaded_in(&mut lock_slot(&slot), what) {
            return Ok(t);
        }
        // Before this slot is locked: a load never waits on another slot while it holds one.
        self.make_room(id);
        let mut s = lock_slot(&slot);
        // Another thread may have loaded it meanwhile.
        if let Some(t) = self.loaded_in(&mut s, what) {
            return Ok(t);
        }
        let paths = TenantPaths::new(&self.tenants_dir, id);
        let t = recovery::load(
            id,
            paths,
            self.vfs.clone(),
            self.memory_bytes.clone(),
            self.clock.now_ms(),
            what,
        )?
        .with_tail_switch(self.keeps_tails.clone());
        let t = Arc::new(t);
        s.tenant = Some(t.clone());
        s.storage_bytes = KnownBytes::UNKNOWN;
        self.loaded_count.fetch_add(1, Ordering::SeqCst);
        Ok(t)
    }

    /// The slot's loaded tenant, if it has one whose log has not failed, loaded as `what` needs.
    /// One whose log failed since its last request is dropped, so it is loaded again from what
    /// is on disk; one loaded with its log alone when its documents are needed is closed (its
    /// log made durable), so it is loaded again whole.
    fn loaded_in(&self, s: &mut SlotState, what: Load) -> Option<Arc<Tenant>> {
        let t = s.tenant.clone()?;
        assert!(!t.is_closed(), "a closed tenant stayed in its slot");
        if t.log_failed() {
            t.discard();
        } else if t.is_log_only() && what == Load::Docs {
            if let Err(e) = t.close() {
                tracing::warn!(tenant = %t.id, error = %e, "making a backup's log durable before loading its documents failed");
            }
        } else {
            return Some(t);
        }
        s.tenant = None;
        self.loaded_count.fetch_sub(1, Ordering::SeqCst);
        None
    }
}
