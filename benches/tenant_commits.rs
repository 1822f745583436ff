//! Commit latency and commits per second of tenant creation on a 3-node loopback cluster:
//! `POST /api/v2/admin/tenants/add` through the gateway, a Raft commit on the registry leader, and
//! the gateway seeing the new tenant in its view. Run with `cargo bench --bench tenant_commits`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http, DevCluster};

/// Tenants created one after another, for the latency figures.
const SEQUENTIAL: usize = 300;
/// Concurrent creators, and how many tenants each creates, for the throughput figure.
const CONCURRENCY: usize = 8;
const PER_CREATOR: usize = 100;

fn add(base: &str, admin: &str, id: &str) -> Duration {
    let started = Instant::now();
    let r = http()
        .post(format!("{base}/admin/tenants/add"))
        .bearer_auth(admin)
        .json(&serde_json::json!({"tenant_id": id}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{id}");
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let cluster = DevCluster::start(3);
    let (base, admin) = (cluster.url(), cluster.admin_key());
    for i in 0..20 {
        add(&base, &admin, &format!("warm{i}"));
    }
    let mut lat: Vec<Duration> =
        (0..SEQUENTIAL).map(|i| add(&base, &admin, &format!("seq{i}"))).collect();
    lat.sort();
    println!(
        "tenant creation, one at a time ({SEQUENTIAL}): p50 {:?}, p90 {:?}, p99 {:?}, {:.0} commits/s",
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        SEQUENTIAL as f64 / lat.iter().sum::<Duration>().as_secs_f64()
    );
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..CONCURRENCY)
        .map(|c| {
            let (base, admin, done) = (base.clone(), admin.clone(), done.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                for i in 0..PER_CREATOR {
                    lat.push(add(&base, &admin, &format!("c{c}-{i}")));
                    done.fetch_add(1, Ordering::SeqCst);
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let elapsed = started.elapsed();
    lat.sort();
    println!(
        "tenant creation, {CONCURRENCY} concurrent creators ({} tenants): {:.0} commits/s, p50 {:?}, p99 {:?}",
        lat.len(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
}
