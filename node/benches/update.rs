//! What one scroll update costs on a 10 KB and on a 25 MB phext (PRODUCT §4: the cost of a
//! write must not grow with the document).
//!
//! - `store_nosync`: `Store::execute` over `UnsyncedVfs`, so the figure is the store's own work
//!   (validation, quota, log record, O(log n) apply) without the disk's flush latency;
//! - `libphext_replace`: the baseline SQ pays, `libphext::phext::replace` rewriting the whole
//!   serialised document in memory (its file write not even counted);
//! - `store_fsync`: `Store::execute` over the real disk, fsync included, for reference.
//!
//! Run: `cargo bench -p node --bench update -- --warm-up-time 1 --measurement-time 3`

use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use node::store::{ManualClock, RealVfs, Store, StoreConfig, UnsyncedVfs, Vfs};
use proto::{Coordinate, Doc, PhextName, SqRequest};

/// Bytes of text per scroll in the benchmark documents.
const SCROLL_BYTES: usize = 1000;

/// The coordinate of scroll `i`: a hundred scrolls per section, sections counting up.
fn coord(i: usize) -> Coordinate {
    Coordinate::parse(&format!("1.1.1/1.1.1/1.{}.{}", i / 100 + 1, i % 100 + 1))
        .expect("valid coordinate")
}

/// A document of about `bytes`, in scrolls of [`SCROLL_BYTES`].
fn document(bytes: usize) -> Doc {
    let mut doc = Doc::new();
    for i in 0..bytes / SCROLL_BYTES {
        let text: String = format!("scroll {i} ").chars().cycle().take(SCROLL_BYTES).collect();
        doc.set(coord(i), text);
    }
    doc
}

/// A store over `dir` whose tenant `bench` holds `doc` as phext `doc`, already loaded.
fn store_with(dir: &Path, vfs: Arc<dyn Vfs>, doc: &Doc) -> Store {
    let phexts = dir.join("tenants/bench/phexts");
    std::fs::create_dir_all(&phexts).expect("bench dir");
    std::fs::write(phexts.join("doc.phext"), doc.to_canonical()).expect("bench doc");
    let config = StoreConfig { data_dir: dir.to_path_buf(), ..StoreConfig::default() };
    let store = Store::open(config, vfs, Arc::new(ManualClock::new(0))).expect("store opens");
    let probe = SqRequest::Select { p: PhextName::parse("doc").expect("name"), c: coord(0) };
    store.execute("bench", u64::MAX, &probe).expect("bench doc loads");
    store
}

fn bench_updates(c: &mut Criterion) {
    let mut group = c.benchmark_group("update");
    group.sample_size(20);
    for (label, bytes) in [("10KB", 10_000), ("25MB", 25_000_000)] {
        let doc = document(bytes);
        let middle = coord(doc.scroll_count() / 2);
        let name = PhextName::parse("doc").expect("name");
        let mut i = 0u64;
        let mut next_update = move || {
            i += 1;
            SqRequest::Update {
                p: name.clone(),
                c: middle,
                text: format!("{i:0>width$}", width = SCROLL_BYTES),
            }
        };

        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with(dir.path(), Arc::new(UnsyncedVfs(Arc::new(RealVfs))), &doc);
        group.bench_function(BenchmarkId::new("store_nosync", label), |b| {
            b.iter(|| store.execute("bench", u64::MAX, &next_update()).expect("update"))
        });
        drop(store);

        let serialized = String::from_utf8(doc.to_canonical()).expect("UTF-8 document");
        let location = libphext::phext::to_coordinate(&middle.to_string());
        let text = "x".repeat(SCROLL_BYTES);
        group.bench_function(BenchmarkId::new("libphext_replace", label), |b| {
            b.iter(|| libphext::phext::replace(&serialized, location, &text))
        });

        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with(dir.path(), Arc::new(RealVfs), &doc);
        group.bench_function(BenchmarkId::new("store_fsync", label), |b| {
            b.iter(|| store.execute("bench", u64::MAX, &next_update()).expect("update"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_updates);
criterion_main!(benches);
