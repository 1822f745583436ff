//! What a tenant costs in memory, loaded and unloaded (PRODUCT §4: 100,000 registered tenants
//! and thousands of active ones within a stated budget).
//!
//! Creates 10,000 tenants with one small phext each, then lets them go idle and unloads them,
//! printing at each stage the process RSS (from /proc/self/statm) and the live heap bytes (from
//! a counting allocator: RSS alone cannot tell memory the store holds from pages the allocator
//! keeps after frees), and the cost per tenant. Syncs are skipped (`UnsyncedVfs`): they cost
//! time, not memory.
//!
//! Run: `cargo run --release -p node --example idle_memory`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use node::store::{ManualClock, RealVfs, Store, StoreConfig, UnsyncedVfs};
use proto::{Coordinate, PhextName, SqRequest};

const TENANTS: usize = 10_000;

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on to `System` as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with this layout (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as for `dealloc`; the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Resident set and live heap, in bytes.
fn measure() -> (u64, u64) {
    (rss_bytes(), LIVE_BYTES.load(Ordering::Relaxed).max(0) as u64)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm is readable");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm has a resident field");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

fn report(stage: &str, (rss, heap): (u64, u64), (rss0, heap0): (u64, u64)) {
    let per = |now: u64, base: u64| (now as i64 - base as i64) / TENANTS as i64;
    println!(
        "{stage:<22} RSS {rss:>10} B ({:>5} B/tenant)   live heap {heap:>10} B ({:>5} B/tenant)",
        per(rss, rss0),
        per(heap, heap0)
    );
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
    let store = Store::open(config, Arc::new(UnsyncedVfs(Arc::new(RealVfs))), clock.clone())
        .expect("store opens");
    let p = PhextName::parse("notes").expect("name");
    let text = "a small note of about one hundred bytes, as a first phext of a new tenant would hold it......";
    let base = measure();
    for i in 0..TENANTS {
        let request =
            SqRequest::Update { p: p.clone(), c: Coordinate::ORIGIN, text: format!("{i} {text}") };
        store.execute(&format!("t{i:05}"), 25 << 20, &request).expect("write");
    }
    let loaded = measure();
    let estimate = store.memory_bytes();
    clock.advance_ms(idle_ms + 1);
    let unloaded_count = store.unload_idle();
    let unloaded = measure();
    // glibc keeps freed memory in its arenas; trimming shows what the store still holds.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    let trimmed = measure();
    // Loading them all again reuses what the allocator kept: RSS barely moves.
    for i in 0..TENANTS {
        let request = SqRequest::Select { p: p.clone(), c: Coordinate::ORIGIN };
        store.execute(&format!("t{i:05}"), 25 << 20, &request).expect("read");
    }
    let reloaded = measure();
    clock.advance_ms(idle_ms + 1);
    store.unload_idle();
    let used: u64 =
        (0..TENANTS).map(|i| store.storage_bytes(&format!("t{i:05}")).expect("usage")).sum();

    println!(
        "tenants: {TENANTS}, unloaded: {unloaded_count}, still loaded: {}",
        store.loaded_tenants().len()
    );
    println!("storage bytes of all tenants (answered while unloaded): {used}");
    println!("store's own estimate while loaded: {} B/tenant", estimate / TENANTS as u64);
    report("before", base, base);
    report("all loaded", loaded, base);
    report("after unload", unloaded, base);
    report("after malloc_trim", trimmed, base);
    report("all reloaded", reloaded, base);
}
