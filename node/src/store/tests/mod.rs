//! Unit tests of the store, on a real temp directory. A "crash" is dropping the store without
//! `flush_all`: everything it wrote is then in the files exactly as a SIGKILL would leave it.

mod durability;
mod faults;
mod log_only;
mod reads;
mod replication;
mod tenancy;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::request::{parse, Method};

use super::{ManualClock, RealVfs, Store, StoreConfig, StoreError, Vfs};

/// Quota large enough never to matter, in bytes.
const NO_QUOTA: u64 = u64::MAX;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig { data_dir: dir.to_path_buf(), ..StoreConfig::default() }
}

fn open(dir: &Path) -> Store {
    open_with(config(dir), Arc::new(RealVfs), Arc::new(ManualClock::new(0)))
}

fn open_with(config: StoreConfig, vfs: Arc<dyn Vfs>, clock: Arc<ManualClock>) -> Store {
    Store::open(config, vfs, clock).expect("store opens")
}

/// Runs `GET /api/v2/<path>` (or POST with a body) for `tenant` and returns the body as text.
fn run(
    store: &Store,
    tenant: &str,
    quota: u64,
    path: &str,
    body: &str,
) -> Result<String, StoreError> {
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    let method = if body.is_empty() { Method::Get } else { Method::Post };
    let request = parse(method, route, query, body.as_bytes()).expect("test requests parse");
    let response = store.execute(tenant, quota, &request)?;
    Ok(String::from_utf8(response.body).expect("answers are UTF-8"))
}

fn get(store: &Store, tenant: &str, path: &str) -> String {
    run(store, tenant, NO_QUOTA, path, "").expect("request succeeds")
}

fn post(store: &Store, tenant: &str, path: &str, body: &str) -> String {
    run(store, tenant, NO_QUOTA, path, body).expect("request succeeds")
}

fn wal_dir(dir: &Path, tenant: &str) -> PathBuf {
    dir.join("tenants").join(tenant).join("wal")
}

fn phexts_dir(dir: &Path, tenant: &str) -> PathBuf {
    dir.join("tenants").join(tenant).join("phexts")
}

/// The log segments of a tenant, oldest first.
fn segments(dir: &Path, tenant: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(wal_dir(dir, tenant)) {
        Ok(entries) => entries.map(|e| e.expect("dir entry").path()).collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, at: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(at).expect("readable dir") {
            let path = entry.expect("dir entry").path();
            out.push(path.strip_prefix(base).expect("under base").display().to_string());
            if path.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
