//! A counting global allocator for tests: [`peak`] runs one call and tells the most bytes it held
//! on the heap at once. Counting is per thread, so tests running in parallel do not mix. A test
//! binary installs it with
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: alloc_meter::Counting = alloc_meter::Counting;
//! ```
//!
//! The decoders' property tests use it to show that hostile bytes cannot make a decoder claim
//! more than its named limit.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The allocator: the system's, counting while [`peak`] measures on this thread.
pub struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grow(n: usize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            let live = LIVE.get() + n;
            LIVE.set(live);
            PEAK.set(PEAK.get().max(live));
        }
    });
}

fn shrink(n: usize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            // Memory allocated before the measure may be freed during it.
            LIVE.set(LIVE.get().saturating_sub(n));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        shrink(l.size());
        // SAFETY: `p` came from this allocator, that is from `System`, with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // Counted as both blocks at once, as a moving realloc holds them.
        grow(new);
        shrink(l.size());
        // SAFETY: `p` came from `System` with layout `l`; the caller's contract, passed on.
        unsafe { System.realloc(p, l, new) }
    }
}

/// Runs `f` and returns its result with the peak of bytes it held on the heap at once.
pub fn peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LIVE.set(0);
    PEAK.set(0);
    ON.set(true);
    let out = f();
    ON.set(false);
    (out, PEAK.get())
}
