//! What a registered tenant costs a gateway's view, in heap and in resident memory.
//!
//!     cargo run --release -p gateway --example view_memory -- 100000
//!
//! One size N a run (resident memory is measured from the process's start). The view is built
//! as a gateway builds it: a whole registry of N/2 tenants (`ViewUpdate::Full`, as on first contact) from each of
//! three nodes, then the other N/2 added by deltas of `DELTA_TENANTS` tenants (as batched admin
//! adds arrive), each delta answered by the three nodes. Then one tenant in 100 has its key
//! rotated and one in 100 is removed, by deltas. Tenant ids have the shape of
//! `sq-cloud bench --mode admin-add`'s (19 bytes, numbered in order), one key each, owners
//! spread over three nodes.
//!
//! It prints the live heap the view holds per tenant (a counting global allocator; everything
//! else dropped) and the growth of the process's resident memory per tenant since the start.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use gateway::view::{key_hash, ViewHandle};
use proto::cluster::{NodeState, NodeView, RegistryDelta, RegistryView, TenantView, ViewUpdate};

/// Tenants per delta: a round of batched adds.
const DELTA_TENANTS: usize = 8;
/// The nodes that answer every poll.
const NODES: u64 = 3;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `System` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `System` with layout `l`; the caller's contract, passed on.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn tenant(i: usize, key_round: u32) -> TenantView {
    TenantView {
        id: format!("aa-5eed0001-{i:07}"),
        key_hashes: vec![key_hash(&format!("key-{i}-{key_round}"))],
        enabled: true,
        owner: Some(1 + (i as u64 * 7919) % NODES),
    }
}

fn head(applied_index: u64) -> RegistryView {
    RegistryView {
        applied_index,
        epoch: 1,
        admin_key_hash: Some(key_hash("admin")),
        tenants: Vec::new(),
        nodes: (1..=NODES)
            .map(|id| NodeView {
                id,
                addr: format!("127.0.0.1:{}", 7000 + id),
                state: NodeState::Active,
                health: proto::cluster::NodeHealth::Alive,
                heartbeat: 1,
            })
            .collect(),
        leader: Some(1),
        term: 1,
    }
}

/// One delta, as each of the nodes sends it.
fn deliver(views: &ViewHandle, since: u64, changed: Vec<TenantView>, removed: Vec<String>) -> u64 {
    let index = since + 1;
    for _ in 0..NODES {
        let delta = RegistryDelta {
            since,
            head: head(index),
            changed: changed.clone(),
            removed: removed.clone(),
        };
        views.update(ViewUpdate::Delta(delta));
    }
    index
}

fn measure(n: usize) {
    let rss_start = rss_bytes();
    let live_start = LIVE.load(Ordering::Relaxed);
    let views = ViewHandle::default();
    let full_count = n / 2;
    let mut index = 100;
    // The nodes' whole views arrive at once, so the gateway holds all three decoded.
    let fulls: Vec<RegistryView> = (0..NODES)
        .map(|_| RegistryView {
            tenants: (0..full_count).map(|i| tenant(i, 0)).collect(),
            ..head(index)
        })
        .collect();
    for full in fulls {
        views.update(ViewUpdate::Full(full));
    }
    let live_full = LIVE.load(Ordering::Relaxed) - live_start;
    let mut next = full_count;
    while next < n {
        let end = (next + DELTA_TENANTS).min(n);
        index = deliver(&views, index, (next..end).map(|i| tenant(i, 0)).collect(), Vec::new());
        next = end;
    }
    // One key in 100 rotated, one tenant in 100 removed (and added again under its old key).
    for chunk in (0..n).step_by(100).collect::<Vec<_>>().chunks(DELTA_TENANTS) {
        let rotated = chunk.iter().map(|&i| tenant(i, 1)).collect();
        index = deliver(&views, index, rotated, Vec::new());
        let removed = chunk.iter().map(|&i| tenant(i + 1, 0).id).collect();
        index = deliver(&views, index, Vec::new(), removed);
        let back = chunk.iter().map(|&i| tenant(i + 1, 0)).collect();
        index = deliver(&views, index, back, Vec::new());
    }
    let view = views.current();
    assert_eq!(view.tenant_count(), n, "every tenant is in the view");
    let probe = tenant(n - 1, 0);
    let found = view.tenant_by_key_hash(&probe.key_hashes[0]).map(|t| t.id.to_string());
    assert_eq!(found.as_deref(), Some(probe.id.as_str()), "the last tenant's key finds it");
    drop(view);
    let live = LIVE.load(Ordering::Relaxed) - live_start;
    let rss = rss_bytes().saturating_sub(rss_start);
    println!(
        "{n} tenants: live heap {:.1} MiB, {} B per tenant (after the whole view of {full_count}: \
         {} B per tenant); resident memory grew {:.1} MiB, {} B per tenant",
        live as f64 / 1048576.0,
        live / n,
        live_full / full_count,
        rss as f64 / 1048576.0,
        rss / n,
    );
    drop(views);
}

fn main() {
    let n = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    assert!(n >= 200, "at least 200 tenants");
    measure(n);
}
