//! What a tenant costs in memory, loaded and unloaded (PRODUCT §4: 100,000 registered tenants
//! and thousands of active ones within a stated budget).
//!
//! Creates 10,000 tenants with one small phext each, then lets them go idle and unloads them,
//! printing the process RSS (from /proc/self/statm) at each stage and the cost per tenant.
//! Syncs are skipped (`UnsyncedVfs`): they cost time, not memory.
//!
//! Run: `cargo run --release -p node --example idle_memory`

use std::sync::Arc;

use node::store::{ManualClock, RealVfs, Store, StoreConfig, UnsyncedVfs};
use proto::{Coordinate, PhextName, SqRequest};

const TENANTS: usize = 10_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm is readable");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("statm has a resident field");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

fn per_tenant(now: u64, base: u64) -> i64 {
    (now as i64 - base as i64) / TENANTS as i64
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(0));
    let config = StoreConfig {
        data_dir: dir.path().to_path_buf(),
        loaded_tenants_max: 2 * TENANTS,
        ..StoreConfig::default()
    };
    let idle_ms = config.idle_unload_after.as_millis() as u64;
    let store = Store::open(config, Arc::new(UnsyncedVfs(Arc::new(RealVfs))), clock.clone()).expect("store opens");
    let p = PhextName::parse("notes").expect("name");
    let text = "a small note of about one hundred bytes, as a first phext of a new tenant would hold it......";
    let base = rss_bytes();
    for i in 0..TENANTS {
        let request = SqRequest::Update { p: p.clone(), c: Coordinate::ORIGIN, text: format!("{i} {text}") };
        store.execute(&format!("t{i:05}"), 25 << 20, &request).expect("write");
    }
    let loaded = rss_bytes();
    let estimate = store.memory_bytes();
    clock.advance_ms(idle_ms + 1);
    let unloaded_count = store.unload_idle();
    let unloaded = rss_bytes();
    // glibc keeps freed memory in its arenas; trimming shows what the store still holds.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    let trimmed = rss_bytes();
    let used: u64 = (0..TENANTS).map(|i| store.storage_bytes(&format!("t{i:05}")).expect("usage")).sum();

    println!("tenants: {TENANTS}, unloaded: {unloaded_count}, still loaded: {}", store.loaded_tenants().len());
    println!("storage bytes of all tenants (answered unloaded): {used}");
    println!("RSS before:            {:>10} bytes", base);
    println!("RSS all loaded:        {:>10} bytes  ({} per tenant; store's estimate {} per tenant)", loaded, per_tenant(loaded, base), estimate / TENANTS as u64);
    println!("RSS after unload:      {:>10} bytes  ({} per tenant)", unloaded, per_tenant(unloaded, base));
    println!("RSS after malloc_trim: {:>10} bytes  ({} per tenant)", trimmed, per_tenant(trimmed, base));
}
