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

/// The live heap: bytes allocated and not yet freed, from glibc's `mallinfo2` (main arena,
/// thread arenas and mmapped chunks). `None` where the allocator cannot tell.
pub fn heap_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and only reads the allocator's own counters.
        let info = unsafe { libc::mallinfo2() };
        Some(u64::try_from(info.uordblks.saturating_add(info.hblkhd)).unwrap_or(u64::MAX))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Returns the allocator's free pages to the operating system (glibc's `malloc_trim`), after
/// idle tenants were unloaded or forgotten: without it the resident set keeps what the busiest
/// moment used. A no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a padding size and touches only the allocator's free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    // Goal: the heap counter sees an allocation that is held. Half a GiB of zeroes is mapped
    // but never touched (no resident memory), and dwarfs what tests running beside this one
    // could free meanwhile.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_heap_counter_sees_a_held_allocation() {
        let before = heap_bytes().unwrap();
        let held = vec![0u8; 512 << 20];
        let during = heap_bytes().unwrap();
        assert!(during >= before + (256 << 20), "{before} then {during}");
        drop(held);
        release_free_memory();
    }
}
