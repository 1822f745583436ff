//! Unloading: tenants idle too long, and the least recently used ones while the store is over
//! its memory budget or its cap on loaded tenants, whether after requests or before a load.

use std::sync::atomic::Ordering;
use std::sync::{Arc, TryLockError};

use super::{check_tenant_id, lock_slot, tried, KnownBytes, Slot, Store, StoreError, Tenant};

/// Eviction unloads down to this share of each limit, in percent, so it runs in batches rather
/// than on every request once the store is full.
const EVICT_LOW_WATER_PERCENT: u64 = 90;

/// The most times one load lists the least recently used tenants to find one to unload
/// ([`Store::make_room`]); past them (every loaded tenant busy, or other threads loading as fast
/// as it unloads) it loads anyway rather than wait. A victim already unloaded (by eviction,
/// which picks the same tenants) costs a look at its slot, and the load takes the next one.
const MAKE_ROOM_SCANS_MAX: usize = 2;

impl Store {
    /// Unloads every tenant idle for [`super::StoreConfig::idle_unload_after`], then the least recently
    /// used ones while the store is over its limits. Returns how many were unloaded. Call it
    /// periodically.
    pub fn unload_idle(&self) -> usize {
        let idle_ms = u64::try_from(self.config.idle_unload_after.as_millis()).unwrap_or(u64::MAX);
        // Before the clock has run for a whole idle period, no tenant can have been idle that long.
        let Some(cutoff) = self.clock.now_ms().checked_sub(idle_ms) else {
            return self.evict(None);
        };
        let mut unloaded = 0;
        for (id, slot) in self.loaded_slots() {
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
        let slot = self.slots.read().expect("slot map lock poisoned").get(tenant);
        match slot {
            Some(slot) => self.unload_slot(&slot, None),
            None => Ok(false),
        }
    }

    /// Before a load, at [`StoreConfig::loaded_tenants_max`] loaded tenants: unloads the least
    /// recently used one (never `loading`), so the cap holds however fast tenants are loaded.
    /// Eviction after requests ([`Self::evict`]) brings the store below the cap on one thread;
    /// when loads on many threads outrun it, each load makes its own room. So loaded tenants,
    /// and the log files they hold open, exceed the cap by at most the loads in progress.
    pub(super) fn make_room(&self, loading: &str) {
        let mut scans = 0;
        while self.loaded_count.load(Ordering::SeqCst) >= self.config.loaded_tenants_max {
            let victim = {
                let mut victims = self.victims.lock().expect("victims lock poisoned");
                if victims.is_empty() {
                    if scans == MAKE_ROOM_SCANS_MAX {
                        return;
                    }
                    scans += 1;
                    // A tenth of the cap at a time (at least one), least recent last (so
                    // `pop` takes it): a burst of loads lists the slots once per many victims.
                    let mut listed = self.loaded_by_last_use(Some(loading));
                    listed.truncate((self.config.loaded_tenants_max / 10).max(1));
                    listed.reverse();
                    listed.shrink_to_fit();
                    *victims = listed;
                }
                victims.pop()
            };
            let Some(n) = victim else { return };
            self.unload_numbered(n);
        }
    }

    /// The slot numbers of the loaded tenants but `keep`, least recently used first: whom
    /// eviction and [`Self::make_room`] unload. A slot busy loading or unloading this instant is
    /// left out rather than waited for.
    fn loaded_by_last_use(&self, keep: Option<&str>) -> Vec<u32> {
        let mut loaded: Vec<(u64, u32)> = {
            let slots = self.slots.read().expect("slot map lock poisoned");
            slots
                .iter()
                .filter(|(_, id, _)| Some(*id) != keep)
                .filter_map(|(n, _, slot)| {
                    let last_used = tried(slot.state.try_lock())?.tenant.as_ref()?.last_used_ms();
                    Some((last_used, n as u32))
                })
                .collect()
        };
        loaded.sort_by_key(|(last_used, _)| *last_used);
        loaded.into_iter().map(|(_, n)| n).collect()
    }

    /// Unloads slot number `n`'s tenant if it is loaded; whether it was.
    fn unload_numbered(&self, n: u32) -> bool {
        let slot = self.slots.read().expect("slot map lock poisoned").ref_at(n as usize);
        match self.unload_slot(&slot, None) {
            Ok(unloaded) => unloaded,
            Err(e) => {
                let slots = self.slots.read().expect("slot map lock poisoned");
                let id = slots.id_at(n as usize);
                tracing::warn!(tenant = %id, error = %e, "checkpoint on eviction failed; the log keeps every change");
                true
            }
        }
    }

    /// Unloads the slot's tenant if it is loaded and, given a cutoff, unused since then.
    fn unload_slot(&self, slot: &Slot, idle_since_ms: Option<u64>) -> Result<bool, StoreError> {
        let mut s = lock_slot(slot);
        let Some(t) = s.tenant.clone() else { return Ok(false) };
        if idle_since_ms.is_some_and(|cutoff| t.last_used_ms() > cutoff) {
            return Ok(false);
        }
        let result = t.close();
        // A log-only tenant never knew its documents' size.
        if !t.is_log_only() {
            s.storage_bytes = KnownBytes::of(t.used_bytes());
        }
        s.tenant = None;
        self.loaded_count.fetch_sub(1, Ordering::SeqCst);
        result.map(|()| true)
    }

    /// Forgets a tenant whose log failed, so its next request reloads it from disk.
    pub(super) fn discard(&self, id: &str, t: &Arc<Tenant>) {
        let slot = self.slot(id);
        let mut s = lock_slot(&slot);
        if s.tenant.as_ref().is_some_and(|current| Arc::ptr_eq(current, t)) {
            t.discard();
            s.tenant = None;
            self.loaded_count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub(super) fn over_limits(&self) -> bool {
        self.memory_bytes() > self.config.memory_budget_bytes
            || self.loaded_count.load(Ordering::SeqCst) > self.config.loaded_tenants_max
    }

    /// Unloads least recently used tenants (never `keep`) until the store is below the low-water
    /// mark of both limits. One thread evicts at a time; others go on. Returns how many went.
    pub(super) fn evict(&self, keep: Option<&str>) -> usize {
        // It guards no data, so a panic while evicting leaves nothing to distrust: recovered.
        let _evicting = match self.evicting.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return 0,
        };
        if !self.over_limits() {
            return 0;
        }
        let loaded = self.loaded_by_last_use(keep);
        let memory_target = self.config.memory_budget_bytes / 100 * EVICT_LOW_WATER_PERCENT;
        let count_target =
            self.config.loaded_tenants_max.saturating_mul(EVICT_LOW_WATER_PERCENT as usize) / 100;
        let mut unloaded = 0;
        for n in loaded {
            if self.memory_bytes() <= memory_target
                && self.loaded_count.load(Ordering::SeqCst) <= count_target
            {
                break;
            }
            if self.unload_numbered(n) {
                unloaded += 1;
            }
        }
        unloaded
    }
}
