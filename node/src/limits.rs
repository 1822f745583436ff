//! Rate limits and metering, enforced on the owning node: the one place that sees all of a
//! tenant's traffic, so counts stay exact however many gateways send.
//!
//! - A daily request limit per tenant (its tier's, or an admin override) answers 429 with
//!   `Retry-After` until the UTC day turns.
//! - A token bucket per tenant ([`BURST_PER_SECOND`], [`BURST_CAPACITY`]) answers 429 when a
//!   tenant bursts past what one node should give one tenant.
//! - Every served request adds to the tenant's daily roll-up (calls by route, bytes out, last
//!   active), persisted beside the tenant's data by [`Limits::persist`] so it survives restarts
//!   and moves with the tenant. A crash can lose at most the counts since the last persist
//!   ([`PERSIST_INTERVAL`]).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::ApiError;
use serde::{Deserialize, Serialize};

use crate::clock::{seconds_to_next_utc_day, utc_day, WallClock};
use crate::store::Vfs;

/// Sustained requests per second one tenant may send to its node.
pub const BURST_PER_SECOND: f64 = 1000.0;

/// Requests a tenant may send at once after being quiet: two seconds' worth.
pub const BURST_CAPACITY: f64 = 2000.0;

/// Seconds a client is told to wait after a burst refusal: a token comes back within
/// 1 / [`BURST_PER_SECOND`] s, and `Retry-After` counts whole seconds.
const BURST_RETRY_AFTER_S: u64 = 1;

/// How often dirty roll-ups are written to disk.
pub const PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes moved (request plus answer) that cost one more request against the daily limit and
/// the token bucket: 1 MiB. A request costs one unit, plus one per whole MiB it moved, so that
/// the limits weigh what a tenant makes the node do: a 16 MiB `delta` answer counts as 17
/// requests, a 1 GB `get` as about a thousand (1% of the team tier's day). A refused answer
/// moved nothing and was only sized, so it costs its request bytes alone.
pub const REQUEST_UNIT_BYTES: u64 = 1 << 20;

/// The roll-up file, inside the tenant's directory.
const ROLLUP_FILE: &str = "usage.json";

/// One tenant's counts for one UTC day.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollup {
    /// Days since the Unix epoch, UTC.
    pub day: u64,
    pub calls: BTreeMap<String, u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Units charged beyond one per call, for the bytes calls moved ([`REQUEST_UNIT_BYTES`]).
    #[serde(default)]
    pub extra_units: u64,
    /// The tenant's last request ever, not only today's: carried over when the day turns.
    pub last_active_ms: Option<u64>,
}

impl Rollup {
    /// An empty roll-up for `day` that keeps this one's last activity.
    fn next_day(&self, day: u64) -> Rollup {
        Rollup { day, last_active_ms: self.last_active_ms, ..Rollup::default() }
    }

    /// Calls of the day, all routes. Saturating: the counts come from a file that may have been
    /// damaged or handed over by another node, and must not overflow.
    pub fn total_calls(&self) -> u64 {
        self.calls.values().fold(0, |sum, &n| sum.saturating_add(n))
    }

    /// What counts against the daily limit: one unit per call plus the extra units.
    pub fn units(&self) -> u64 {
        self.total_calls().saturating_add(self.extra_units)
    }
}

struct TenantLimits {
    rollup: Rollup,
    tokens: f64,
    tokens_at_ms: u64,
    /// Admitted requests not yet recorded: counted against the daily limit so concurrent
    /// requests cannot all pass it.
    in_flight: u64,
    dirty: bool,
}

pub struct Limits {
    clock: Arc<dyn WallClock>,
    vfs: Arc<dyn Vfs>,
    tenants_dir: PathBuf,
    tenants: Mutex<HashMap<String, TenantLimits>>,
}

impl Limits {
    pub fn new(clock: Arc<dyn WallClock>, vfs: Arc<dyn Vfs>, tenants_dir: PathBuf) -> Limits {
        Limits { clock, vfs, tenants_dir, tenants: Mutex::new(HashMap::new()) }
    }

    fn path(&self, tenant: &str) -> PathBuf {
        self.tenants_dir.join(tenant).join(ROLLUP_FILE)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TenantLimits>> {
        self.tenants.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self, tenant: &str, today: u64, now_ms: u64) -> TenantLimits {
        let rollup = self
            .vfs
            .read(&self.path(tenant))
            .ok()
            .and_then(|b| serde_json::from_slice::<Rollup>(&b).ok())
            .map(|r| if r.day == today { r } else { r.next_day(today) })
            .unwrap_or(Rollup { day: today, ..Rollup::default() });
        TenantLimits {
            rollup,
            tokens: BURST_CAPACITY,
            tokens_at_ms: now_ms,
            in_flight: 0,
            dirty: false,
        }
    }

    /// Admits one request of `tenant` or says why not. Counts nothing: see [`Limits::record`].
    pub fn admit(&self, tenant: &str, daily_limit: u64) -> Result<(), ApiError> {
        let now = self.clock.unix_ms();
        let today = utc_day(now);
        let mut tenants = self.lock();
        let t = tenants.entry(tenant.to_string()).or_insert_with(|| self.load(tenant, today, now));
        if t.rollup.day != today {
            t.rollup = t.rollup.next_day(today);
            t.dirty = true;
        }
        if t.rollup.units().saturating_add(t.in_flight) >= daily_limit {
            return Err(ApiError::RateLimited {
                reason: format!("daily limit of {daily_limit} requests reached"),
                retry_after_s: seconds_to_next_utc_day(now),
            });
        }
        let elapsed_s = now.saturating_sub(t.tokens_at_ms) as f64 / 1000.0;
        t.tokens = (t.tokens + elapsed_s * BURST_PER_SECOND).min(BURST_CAPACITY);
        t.tokens_at_ms = now;
        if t.tokens < 1.0 {
            return Err(ApiError::RateLimited {
                reason: format!("more than {BURST_PER_SECOND} requests per second"),
                retry_after_s: BURST_RETRY_AFTER_S,
            });
        }
        t.tokens -= 1.0;
        t.in_flight += 1;
        Ok(())
    }

    /// Records a request admitted by [`Limits::admit`], whatever its outcome.
    pub fn record(&self, tenant: &str, route: &str, bytes_in: u64, bytes_out: u64) {
        let now = self.clock.unix_ms();
        let mut tenants = self.lock();
        let Some(t) = tenants.get_mut(tenant) else { return };
        t.in_flight = t.in_flight.saturating_sub(1);
        let calls = t.rollup.calls.entry(route.to_string()).or_default();
        *calls = calls.saturating_add(1);
        t.rollup.bytes_in = t.rollup.bytes_in.saturating_add(bytes_in);
        t.rollup.bytes_out = t.rollup.bytes_out.saturating_add(bytes_out);
        let extra = bytes_in.saturating_add(bytes_out) / REQUEST_UNIT_BYTES;
        t.rollup.extra_units = t.rollup.extra_units.saturating_add(extra);
        // The bucket may go below zero: the tenant then waits until it refills.
        t.tokens -= extra as f64;
        t.rollup.last_active_ms = Some(now);
        t.dirty = true;
    }

    /// Drops a tenant's roll-up from memory; its next request reads it from the tenant's file.
    /// Called when the tenant's data leaves this node or arrives from another: the file that
    /// moved with the data is then the truth, and a copy kept here from an earlier stay on the
    /// same day would meter the tenant from stale counts. Persist first to keep this node's.
    pub fn forget(&self, tenant: &str) {
        self.lock().remove(tenant);
    }

    /// Today's roll-up of a tenant (from memory, or its file).
    pub fn rollup(&self, tenant: &str) -> Rollup {
        let now = self.clock.unix_ms();
        let today = utc_day(now);
        let tenants = self.lock();
        match tenants.get(tenant) {
            Some(t) if t.rollup.day == today => t.rollup.clone(),
            Some(t) => t.rollup.next_day(today),
            None => self.load(tenant, today, now).rollup,
        }
    }

    /// Writes every changed roll-up atomically: temp file, sync, rename, sync the directory.
    pub fn persist(&self) {
        let mut dirty: Vec<(String, Rollup)> = {
            let mut tenants = self.lock();
            tenants
                .iter_mut()
                .filter(|(_, t)| t.dirty)
                .map(|(id, t)| {
                    t.dirty = false;
                    (id.clone(), t.rollup.clone())
                })
                .collect()
        };
        // In id order, not hash order: a failing disk then stops at the same tenant every run.
        dirty.sort_by(|(a, _), (b, _)| a.cmp(b));
        for (tenant, rollup) in dirty {
            if let Err(e) = self.write(&tenant, &rollup) {
                tracing::warn!(tenant, error = %e, "cannot persist usage roll-up");
                // Written at the next persist; until then it is not forgotten either.
                if let Some(t) = self.lock().get_mut(&tenant) {
                    t.dirty = true;
                }
            }
        }
    }

    /// Drops from memory the roll-up and bucket of every tenant with no request for `idle_ms`,
    /// nothing in flight and nothing unwritten (call it after [`Limits::persist`]); its next
    /// request reads the roll-up from its file, and finds its bucket full, as it would be by
    /// then anyway. Idle tenants then cost the limits nothing. Returns how many were dropped.
    pub fn forget_idle(&self, idle_ms: u64) -> usize {
        let now = self.clock.unix_ms();
        let mut tenants = self.lock();
        let before = tenants.len();
        tenants.retain(|_, t| {
            let idle = now.saturating_sub(t.tokens_at_ms);
            let refilled = t.tokens + idle as f64 / 1000.0 * BURST_PER_SECOND >= BURST_CAPACITY;
            t.dirty || t.in_flight > 0 || idle < idle_ms || !refilled
        });
        crate::memory::shrink(&mut tenants);
        before - tenants.len()
    }

    fn write(&self, tenant: &str, rollup: &Rollup) -> std::io::Result<()> {
        let dir = self.tenants_dir.join(tenant);
        // Durably: the store puts the tenant's log in this directory too, and finds it existing.
        crate::store::create_dir_durable(self.vfs.as_ref(), &dir)?;
        let tmp = dir.join(format!("{ROLLUP_FILE}.tmp"));
        let mut f = self.vfs.create(&tmp)?;
        f.write_all(&serde_json::to_vec(rollup).map_err(std::io::Error::other)?)?;
        f.sync_data()?;
        self.vfs.rename(&tmp, &self.path(tenant))?;
        self.vfs.sync_dir(&dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Manual(AtomicU64);
    impl WallClock for Manual {
        fn unix_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn limits(dir: &std::path::Path, start_ms: u64) -> (Limits, Arc<Manual>) {
        let clock = Arc::new(Manual(AtomicU64::new(start_ms)));
        (Limits::new(clock.clone(), Arc::new(crate::store::RealVfs), dir.to_path_buf()), clock)
    }

    // Goal: exactly `limit` requests pass in a day, the next gets 429 with the seconds to UTC
    // midnight, and the count resets when the day turns.
    #[test]
    fn daily_limit_is_exact_and_turns_with_the_day() {
        let tmp = tempfile::tempdir().unwrap();
        let day0 = 20_000 * crate::clock::DAY_MS;
        let (l, clock) = limits(tmp.path(), day0 + crate::clock::DAY_MS - 10_000);
        for _ in 0..5 {
            l.admit("t", 5).unwrap();
            l.record("t", "select", 1, 2);
        }
        match l.admit("t", 5) {
            Err(ApiError::RateLimited { retry_after_s, .. }) => assert_eq!(retry_after_s, 10),
            other => panic!("expected 429, got {other:?}"),
        }
        clock.0.fetch_add(10_000, Ordering::SeqCst);
        l.admit("t", 5).unwrap();
        let r = l.rollup("t");
        assert_eq!(r.total_calls(), 0, "a new day starts from zero");
        assert_eq!(
            r.last_active_ms,
            Some(day0 + crate::clock::DAY_MS - 10_000),
            "last activity outlives its day"
        );
    }

    // Goal: the token bucket lets BURST_CAPACITY requests through at once, then refuses with
    // Retry-After 1 s, and refills at BURST_PER_SECOND.
    #[test]
    fn token_bucket_refuses_bursts_and_refills() {
        let tmp = tempfile::tempdir().unwrap();
        let (l, clock) = limits(tmp.path(), 20_000 * crate::clock::DAY_MS);
        let no_daily_limit = u64::MAX;
        for _ in 0..BURST_CAPACITY as u64 {
            l.admit("t", no_daily_limit).unwrap();
            l.record("t", "select", 0, 0);
        }
        match l.admit("t", no_daily_limit) {
            Err(ApiError::RateLimited { retry_after_s, .. }) => assert_eq!(retry_after_s, 1),
            other => panic!("expected 429, got {other:?}"),
        }
        clock.0.fetch_add(10, Ordering::SeqCst);
        let refilled = (BURST_PER_SECOND / 100.0) as u64;
        for _ in 0..refilled {
            l.admit("t", no_daily_limit).unwrap();
        }
        assert!(l.admit("t", no_daily_limit).is_err(), "only {refilled} tokens come back in 10 ms");
    }

    // Goal: a request that moves megabytes counts as many against the daily limit, and one that
    // moves little as one.
    #[test]
    fn large_answers_cost_more_units() {
        let tmp = tempfile::tempdir().unwrap();
        let (l, _) = limits(tmp.path(), 20_000 * crate::clock::DAY_MS);
        l.admit("t", 10).unwrap();
        l.record("t", "get", 100, 5 * REQUEST_UNIT_BYTES + 7);
        assert_eq!(l.rollup("t").units(), 6);
        for _ in 0..4 {
            l.admit("t", 10).unwrap();
            l.record("t", "select", 10, 10);
        }
        assert_eq!(l.rollup("t").units(), 10);
        assert!(matches!(l.admit("t", 10), Err(ApiError::RateLimited { .. })));
    }

    // Goal: a tenant that comes back to a node on the same day is metered from the roll-up that
    // came with it, not from the one this node kept from its earlier stay.
    #[test]
    fn forgotten_rollup_is_read_again_from_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let now = 20_000 * crate::clock::DAY_MS + 5;
        let (here, _) = limits(tmp.path(), now);
        here.admit("t", 100).unwrap();
        here.record("t", "select", 0, 0);
        here.persist();
        here.forget("t");
        // Meanwhile another node served the tenant and its roll-up came back with the data.
        let (there, _) = limits(tmp.path(), now);
        for _ in 0..3 {
            there.admit("t", 100).unwrap();
            there.record("t", "select", 0, 0);
        }
        there.persist();
        here.admit("t", 100).unwrap();
        here.record("t", "select", 0, 0);
        assert_eq!(here.rollup("t").total_calls(), 5);
    }

    // Goal: an idle tenant's counts leave memory only once written, idle and with nothing in
    // flight, and its daily limit is as exact after it came back from its file as before.
    #[test]
    fn idle_tenants_are_forgotten_once_written_and_still_metered_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let (l, clock) = limits(tmp.path(), 20_000 * crate::clock::DAY_MS + 5);
        for _ in 0..3 {
            l.admit("idle", 5).unwrap();
            l.record("idle", "select", 0, 0);
        }
        l.admit("busy", 5).unwrap();
        clock.0.fetch_add(60_000, Ordering::SeqCst);
        assert_eq!(l.forget_idle(60_000), 0, "unwritten counts stay in memory");
        l.persist();
        assert_eq!(l.forget_idle(60_001), 0, "not idle for long enough yet");
        assert_eq!(
            l.forget_idle(60_000),
            1,
            "the written, idle tenant goes; the one in flight stays"
        );
        assert_eq!(l.lock().len(), 1);
        assert_eq!(l.rollup("idle").total_calls(), 3, "read again from its file");
        l.admit("idle", 5).unwrap();
        l.record("idle", "select", 0, 0);
        l.admit("idle", 5).unwrap();
        assert!(matches!(l.admit("idle", 5), Err(ApiError::RateLimited { .. })));
    }

    // Goal: the roll-up survives a restart (a new Limits over the same directory).
    #[test]
    fn rollup_persists() {
        let tmp = tempfile::tempdir().unwrap();
        let now = 20_000 * crate::clock::DAY_MS + 5;
        let (l, _) = limits(tmp.path(), now);
        l.admit("t", 100).unwrap();
        l.record("t", "update", 10, 20);
        l.persist();
        let (again, _) = limits(tmp.path(), now + 1);
        let r = again.rollup("t");
        assert_eq!(r.calls.get("update"), Some(&1));
        assert_eq!(r.bytes_out, 20);
        assert_eq!(r.total_calls(), 1);
    }
}
