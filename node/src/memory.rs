//! What the process holds in memory, and giving back what it no longer holds.
//!
//! An idle tenant should cost the node only its store slot (docs/BENCHMARKS.md, "Idle tenants
//! with three copies"). Two things keep memory after a tenant goes idle besides what the node
//! holds for it: maps that keep the capacity they grew to while the tenant was busy ([`shrink`]),
//! and the allocator, which keeps freed pages for reuse ([`release_free_memory`]).

use std::collections::HashMap;
use std::hash::Hash;

/// Shrinks a map that holds under a quarter of its capacity, so that forgetting idle entries
/// gives their memory back. A small map is left alone (its table costs little).
pub fn shrink<K: Eq + Hash, V>(map: &mut HashMap<K, V>) {
    const SMALL: usize = 64;
    if map.capacity() > SMALL && map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

/// The allocator of every `sq-cloud` process: the binary makes it the global allocator, with
/// [`ALLOCATOR_OPTIONS`]. jemalloc keeps the small allocations of one size class together in
/// their own pages, so the slots and entries idle tenants keep do not pin the pages that loading
/// a tenant used and freed: with glibc's malloc, 100,000 idle copies of about 185 B live each
/// kept 2.2 to 2.6 KB resident each (docs/BENCHMARKS.md, "Idle tenants with three copies").
pub use tikv_jemallocator::Jemalloc as Allocator;

/// jemalloc's options, read once before `main` from the binary's `malloc_conf` symbol:
/// - one arena for the whole process (a process runs a few threads on a share of the cores,
///   and each further arena keeps its own partly used pages);
/// - slabs of one page for the size classes up to 1 KiB (`slab_sizes:1-1024:1`), where
///   jemalloc makes them up to five pages ([`slab_pages`] tells). Loading thousands of tenants
///   at once fills slabs of these classes, and when they are unloaded a slab stays as long as
///   one allocation in it does: after 30,000 tenants were loaded and unloaded a node kept 17
///   to 25 MB of such room with five-page slabs, and 6.6 to 8.1 MB with one-page slabs
///   (docs/BENCHMARKS.md, "Idle copies in fewer, fuller pages").
pub const ALLOCATOR_OPTIONS: &[u8] = b"narenas:1,slab_sizes:1-1024:1\0";

/// The pages of one slab of the allocator's size class for `size` bytes, as the process runs
/// it: `None` if jemalloc cannot tell or `size` is not a small class.
pub fn slab_pages(size: usize) -> Option<usize> {
    use tikv_jemalloc_ctl::raw;
    // SAFETY: each name is NUL-terminated and names a read-only control of the type read.
    unsafe {
        let page: usize = raw::read(b"arenas.page\0").ok()?;
        let bins: u32 = raw::read(b"arenas.nbins\0").ok()?;
        for bin in 0..bins {
            let class: usize = raw::read(format!("arenas.bin.{bin}.size\0").as_bytes()).ok()?;
            if class == size {
                let slab: usize =
                    raw::read(format!("arenas.bin.{bin}.slab_size\0").as_bytes()).ok()?;
                return Some(slab / page);
            }
        }
    }
    None
}

/// Where the process's memory sits, as the allocator counts it (jemalloc's `stats.*`, one
/// snapshot): what it handed out (`allocated`), the pages holding those allocations (`active`,
/// so `active - allocated` is room inside partly used pages), its own bookkeeping
/// (`metadata`), and the pages it holds resident (`resident`: active, metadata, and free pages
/// not yet given back). Resident memory of the process beyond `resident` is not the heap's:
/// thread stacks and the mapped binary. `allocated` is the live heap (`sq_node_heap_bytes`).
/// Empty if jemalloc cannot tell.
pub fn allocator_bytes() -> Vec<(&'static str, u64)> {
    use tikv_jemalloc_ctl::stats;
    if tikv_jemalloc_ctl::epoch::advance().is_err() {
        return Vec::new();
    }
    let read = [
        ("allocated", stats::allocated::read()),
        ("active", stats::active::read()),
        ("metadata", stats::metadata::read()),
        ("resident", stats::resident::read()),
        ("mapped", stats::mapped::read()),
        ("retained", stats::retained::read()),
    ];
    read.into_iter().filter_map(|(state, bytes)| Some((state, bytes.ok()? as u64))).collect()
}

/// The most arenas jemalloc runs for the process's threads: 1 in the binary
/// ([`ALLOCATOR_OPTIONS`]). `None` if it cannot tell.
pub fn arenas() -> Option<u32> {
    tikv_jemalloc_ctl::opt::narenas::read().ok()
}

/// Returns the allocator's free pages to the operating system at once (every arena's purge),
/// after idle tenants were unloaded or forgotten: otherwise they go only as jemalloc's decay
/// finds them, while the process allocates.
pub fn release_free_memory() {
    // `arena.<MALLCTL_ARENAS_ALL>.purge`: 4096 names every arena.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: a NUL-terminated name of a control that reads and writes nothing, so every
    // pointer passed is null and every length 0, as jemalloc requires of it.
    let _ = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
}

/// Free pages the allocator may keep while nothing is loaded before they are given back at
/// once ([`release_free_pages_over`]).
pub const FREE_PAGES_KEPT_IDLE_BYTES: u64 = 1 << 20;

/// Free pages the allocator holds and has not given back (every arena's dirty pages), in bytes.
/// `None` if jemalloc cannot tell.
pub fn free_page_bytes() -> Option<u64> {
    use tikv_jemalloc_ctl::raw;
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    // SAFETY: NUL-terminated names of read-only controls of the type read; 4096 names every
    // arena.
    let (pages, page): (usize, usize) = unsafe {
        (raw::read(b"stats.arenas.4096.pdirty\0").ok()?, raw::read(b"arenas.page\0").ok()?)
    };
    Some(pages as u64 * page as u64)
}

/// Gives the allocator's free pages back ([`release_free_memory`]) if they exceed `bytes`;
/// returns whether it did. For a node with nothing loaded: jemalloc gives free pages back as
/// the process allocates, so one that allocates little (its tenants idle) would keep what the
/// last work left (a metrics scrape renders megabytes) for long after.
pub fn release_free_pages_over(bytes: u64) -> bool {
    if free_page_bytes().is_none_or(|free| free <= bytes) {
        return false;
    }
    release_free_memory();
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by each test that purges the process allocator or counts its free pages.
    static ALLOCATOR_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The live heap, as `sq_node_heap_bytes` reports it.
    fn heap_bytes() -> Option<u64> {
        allocator_bytes().into_iter().find(|(kind, _)| *kind == "allocated").map(|(_, b)| b)
    }

    // Goal: a map emptied of most of its entries gives its table back; a small one is kept.
    #[test]
    fn an_emptied_map_shrinks_and_a_small_one_is_kept() {
        let mut map: HashMap<u64, u64> = (0..10_000).map(|i| (i, i)).collect();
        map.retain(|&k, _| k < 100);
        shrink(&mut map);
        assert!(map.capacity() < 1_000, "capacity {} after shrinking", map.capacity());
        assert_eq!(map.len(), 100, "no entry is lost");
        let mut small: HashMap<u64, u64> = HashMap::with_capacity(50);
        small.insert(1, 1);
        let cap = small.capacity();
        shrink(&mut small);
        assert_eq!(small.capacity(), cap);
    }

    // Goal: pages freed by a large allocation count as free pages until they are given back,
    // and are given back only above the threshold asked for. The allocation is made through
    // the process allocator directly (this test binary's global allocator is another) and
    // written, so its pages are resident. The allocator's tests run one at a time: another's
    // purge would give these pages back.
    #[test]
    fn free_pages_over_a_threshold_are_given_back() {
        use std::alloc::{GlobalAlloc, Layout};
        let _alone = ALLOCATOR_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        release_free_memory();
        // Under jemalloc's `oversize_threshold` (8 MiB), past which freed pages go back at once.
        let layout = Layout::from_size_align(6 << 20, 4096).unwrap();
        // SAFETY: the layout's size is not zero; the pointer is written within its size and
        // freed below with that layout.
        unsafe {
            let p = Allocator.alloc(layout);
            assert!(!p.is_null());
            std::ptr::write_bytes(p, 1, layout.size());
            Allocator.dealloc(p, layout);
        }
        let free = free_page_bytes().unwrap();
        assert!(free >= 4 << 20, "{free} bytes of free pages after freeing 6 MiB");
        assert!(!release_free_pages_over(free + (64 << 20)), "under the threshold: kept");
        assert!(free_page_bytes().unwrap() >= 4 << 20, "still kept");
        assert!(release_free_pages_over(FREE_PAGES_KEPT_IDLE_BYTES), "over it: given back");
        let after = free_page_bytes().unwrap();
        assert!(after < FREE_PAGES_KEPT_IDLE_BYTES, "{after} bytes of free pages left");
    }

    // Goal: the heap counter sees an allocation held through the process allocator (this test
    // binary's global allocator is another, so the allocation is made through it directly),
    // and a purge after it is freed leaves the counter where it was. Half a GiB is mapped but
    // never touched (no resident memory), and dwarfs anything else allocated meanwhile.
    #[test]
    fn the_heap_counter_sees_a_held_allocation() {
        use std::alloc::{GlobalAlloc, Layout};
        let _alone = ALLOCATOR_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let before = heap_bytes().unwrap();
        let layout = Layout::from_size_align(512 << 20, 4096).unwrap();
        // SAFETY: the layout's size is not zero; the pointer is freed below with that layout.
        let held = unsafe { Allocator.alloc(layout) };
        assert!(!held.is_null());
        let during = heap_bytes().unwrap();
        assert!(during >= before + (256 << 20), "{before} then {during}");
        // SAFETY: allocated above by the same allocator with the same layout.
        unsafe { Allocator.dealloc(held, layout) };
        release_free_memory();
        let after = heap_bytes().unwrap();
        let states: std::collections::HashMap<_, _> = allocator_bytes().into_iter().collect();
        assert_eq!(states.len(), 6, "{states:?}");
        assert!(states["active"] >= states["allocated"], "{states:?}");
        assert!(states["resident"] >= states["metadata"], "{states:?}");
        assert!(after < before + (256 << 20), "{before}, {during}, then {after}");
    }
}
