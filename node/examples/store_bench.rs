//! The node's store alone, in process: `select` and `update` on a 1 MB document (1,000 scrolls
//! of 1 KB) from 1 and from 16 threads, every write fsynced as the node does it. Set beside
//! `sq-cloud bench` through gateway → QUIC → node, the ratio is the cost of the two hops.
//!
//! Run: `cargo run --release -p node --example store_bench -- [SECONDS_PER_CASE]` (default 5).
//! It prints one line per case: operations per second and latency percentiles in µs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use node::store::{ManualClock, RealVfs, Store, StoreConfig};
use proto::{Coordinate, Doc, PhextName, SqRequest};

/// Scrolls in the document and bytes per scroll: 1 MB, as in PRODUCT §9.
const SCROLLS: usize = 1000;
const SCROLL_BYTES: usize = 1000;

/// Thread counts measured: one, and the `sq-cloud bench` concurrency of PRODUCT §9.
const THREADS: [usize; 2] = [1, 16];

/// The coordinate of scroll `i`, as `sq-cloud bench` lays its documents out.
fn coord(i: usize) -> Coordinate {
    Coordinate::parse(&format!("1.1.1/1.1.1/1.{}.{}", i / 100 + 1, i % 100 + 1))
        .expect("valid coordinate")
}

/// A store over `dir` whose tenant `bench` holds the document as phext `doc`, loaded.
fn store(dir: &Path) -> Store {
    let mut doc = Doc::new();
    for i in 0..SCROLLS {
        doc.set(coord(i), format!("scroll {i} ").chars().cycle().take(SCROLL_BYTES).collect());
    }
    let phexts = dir.join("tenants/bench/phexts");
    std::fs::create_dir_all(&phexts).expect("bench dir");
    std::fs::write(phexts.join("doc.phext"), doc.to_canonical()).expect("bench doc");
    let config = StoreConfig { data_dir: dir.to_path_buf(), ..StoreConfig::default() };
    let store =
        Store::open(config, Arc::new(RealVfs), Arc::new(ManualClock::new(0))).expect("store opens");
    store
        .execute("bench", u64::MAX, &SqRequest::Select { p: name(), c: coord(0) })
        .expect("bench doc loads");
    store
}

fn name() -> PhextName {
    PhextName::parse("doc").expect("valid name")
}

/// A small xorshift: the benchmark needs spread, not quality, and no shared state.
fn next(state: &mut u64) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state % SCROLLS as u64) as usize
}

/// Runs `op` from `threads` threads for `length`; returns every latency in ns and the time taken.
fn run(store: &Store, op: &str, threads: usize, length: Duration) -> (Vec<u64>, Duration) {
    let started = Instant::now();
    let deadline = started + length;
    let mut all = Vec::new();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                    let mut latencies = Vec::new();
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let c = coord(next(&mut rng));
                        n += 1;
                        let request = match op {
                            "select" => SqRequest::Select { p: name(), c },
                            // New text every time: an update to the text a scroll already holds
                            // is answered without a write.
                            _ => SqRequest::Update {
                                p: name(),
                                c,
                                text: format!("{t}.{n:0>w$}", w = SCROLL_BYTES - 4),
                            },
                        };
                        let sent = Instant::now();
                        store.execute("bench", u64::MAX, &request).expect("request succeeds");
                        latencies.push(sent.elapsed().as_nanos() as u64);
                    }
                    latencies
                })
            })
            .collect();
        for w in workers {
            all.extend(w.join().expect("worker finished"));
        }
    });
    (all, started.elapsed())
}

fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let seconds: f64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store(dir.path());
    println!("store in process, 1 MB document ({SCROLLS} scrolls x {SCROLL_BYTES} B), fsync on every write, {seconds} s per case");
    println!(
        "{:<8} {:>7} {:>10} {:>9} {:>9} {:>9}",
        "op", "threads", "ops/s", "p50 µs", "p99 µs", "p99.9 µs"
    );
    for op in ["select", "update"] {
        for threads in THREADS {
            let (mut latencies, took) = run(&store, op, threads, Duration::from_secs_f64(seconds));
            latencies.sort_unstable();
            println!(
                "{op:<8} {threads:>7} {:>10.0} {:>9.1} {:>9.1} {:>9.1}",
                latencies.len() as f64 / took.as_secs_f64(),
                percentile_us(&latencies, 0.50),
                percentile_us(&latencies, 0.99),
                percentile_us(&latencies, 0.999)
            );
        }
    }
}
