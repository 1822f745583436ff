//! A disk that fails or stalls on command, for what a real disk does rarely: group commit
//! batching under a slow fsync, and a failing fsync.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::super::VfsFile;
use super::*;

/// How long a test waits for a condition another thread will make true, before failing.
const CONDITION_WAIT_MAX: Duration = Duration::from_secs(30);

/// Waits until `cond` holds, polling; fails the test after [`CONDITION_WAIT_MAX`].
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + CONDITION_WAIT_MAX;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[derive(Default)]
struct Faults {
    fail_sync: AtomicBool,
    /// While true, file syncs wait at `held` until it turns false.
    hold_sync: Mutex<bool>,
    released: Condvar,
    syncs_started: AtomicUsize,
    /// Microseconds every sync (of a file or a directory) takes on top of the real one.
    sync_delay_us: std::sync::atomic::AtomicU64,
}

impl Faults {
    fn delay(&self) {
        let us = self.sync_delay_us.load(Ordering::SeqCst);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
    }
}

struct FaultVfs {
    faults: Arc<Faults>,
}

struct FaultFile {
    inner: Box<dyn VfsFile>,
    faults: Arc<Faults>,
}

impl VfsFile for FaultFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.faults.syncs_started.fetch_add(1, Ordering::SeqCst);
        let mut held = self.faults.hold_sync.lock().expect("hold lock");
        while *held {
            held = self.faults.released.wait(held).expect("hold lock");
        }
        drop(held);
        self.faults.delay();
        if self.faults.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected sync failure"));
        }
        self.inner.sync_data()
    }
}

impl FaultVfs {
    fn wrap(&self, inner: Box<dyn VfsFile>) -> Box<dyn VfsFile> {
        Box::new(FaultFile { inner, faults: self.faults.clone() })
    }
}

impl Vfs for FaultVfs {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        RealVfs.create_dir(path)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        RealVfs.exists(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        RealVfs.list(dir)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        RealVfs.read(path)
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        Ok(self.wrap(RealVfs.create_new(path)?))
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        Ok(self.wrap(RealVfs.create(path)?))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        Ok(self.wrap(RealVfs.open_append(path)?))
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        RealVfs.truncate(path, len)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealVfs.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        RealVfs.remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.faults.delay();
        RealVfs.sync_dir(dir)
    }
}

fn faulty_store(dir: &Path) -> (Store, Arc<Faults>) {
    faulty_store_with(config(dir))
}

fn faulty_store_with(config: StoreConfig) -> (Store, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let vfs = Arc::new(FaultVfs { faults: faults.clone() });
    (open_with(config, vfs, Arc::new(ManualClock::new(0))), faults)
}

// Goal: the loaded-tenant cap (which bounds the log files a node holds open) holds while many
// threads load new tenants faster than one thread can unload them. Each unload checkpoints
// (several syncs, slowed to 2 ms each here); with eviction after requests alone, 8 writers to
// fresh tenants kept far more than the cap loaded (a node ran out of file descriptors this
// way). Each load at the cap now unloads one tenant first, so the cap is passed by at most the
// loads in progress; and every write is still there.
#[test]
fn loads_on_many_threads_keep_the_loaded_tenant_cap() {
    const CAP: usize = 16;
    const THREADS: usize = 8;
    const TENANTS_EACH: usize = 30;
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, faults) =
        faulty_store_with(StoreConfig { loaded_tenants_max: CAP, ..config(dir.path()) });
    faults.sync_delay_us.store(2_000, Ordering::SeqCst);
    let most = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (store, most) = (&store, &most);
            scope.spawn(move || {
                for i in 0..TENANTS_EACH {
                    let tenant = format!("t{thread}-{i}");
                    get(store, &tenant, &format!("update?p=doc&c=1.1.1/1.1.1/1.1.1&s={tenant}"));
                    most.fetch_max(store.loaded_tenants().len(), Ordering::SeqCst);
                }
            });
        }
    });
    let most = most.load(Ordering::SeqCst);
    assert!(most <= CAP + THREADS, "{most} tenants loaded at once, over the cap of {CAP}");
    faults.sync_delay_us.store(0, Ordering::SeqCst);
    for thread in 0..THREADS {
        for i in 0..TENANTS_EACH {
            let tenant = format!("t{thread}-{i}");
            assert_eq!(get(&store, &tenant, "select?p=doc&c=1.1.1/1.1.1/1.1.1"), tenant);
        }
    }
}

// Goal: writers that arrive while an fsync is under way share the next one. One write is held
// inside its fsync; nine more are appended meanwhile; when the disk is released, all nine are
// made durable by exactly one more fsync, and every write is acknowledged.
#[test]
fn group_commit_batches_writers_waiting_on_a_sync() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, faults) = faulty_store(dir.path());
    get(&store, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=warm"); // creates the segment
    let tenant = store.tenant("acme").expect("loaded");
    let base_syncs = faults.syncs_started.load(Ordering::SeqCst);
    *faults.hold_sync.lock().expect("hold lock") = true;
    std::thread::scope(|scope| {
        let store = &store;
        let first =
            scope.spawn(move || get(store, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.2&s=first"));
        wait_until("the first write to reach its fsync", || {
            faults.syncs_started.load(Ordering::SeqCst) > base_syncs
        });
        let lsn_before = tenant.last_lsn();
        let rest: Vec<_> = (3..12)
            .map(|i| {
                scope.spawn(move || {
                    get(store, "acme", &format!("update?p=doc&c=1.1.1/1.1.1/1.1.{i}&s=w{i}"))
                })
            })
            .collect();
        wait_until("nine more writes to be appended", || tenant.last_lsn() == lsn_before + 9);
        *faults.hold_sync.lock().expect("hold lock") = false;
        faults.released.notify_all();
        assert_eq!(first.join().expect("first writer"), "Updated 5 bytes");
        for handle in rest {
            assert!(handle.join().expect("writer").starts_with("Updated"));
        }
    });
    assert_eq!(
        faults.syncs_started.load(Ordering::SeqCst),
        base_syncs + 2,
        "one sync for the held write, one for the batch"
    );
    drop(store);
    let store = open(dir.path());
    for i in 3..12 {
        assert_eq!(
            get(&store, "acme", &format!("select?p=doc&c=1.1.1/1.1.1/1.1.{i}")),
            format!("w{i}")
        );
    }
}

// Goal: a failed log sync fails the write (nothing acknowledged), unloads the tenant so its
// possibly-undurable memory is forgotten, and the next request reloads it from disk with every
// acknowledged write intact and writing again.
#[test]
fn failed_log_sync_fails_the_write_and_reloads_the_tenant() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, faults) = faulty_store(dir.path());
    get(&store, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=kept");
    faults.fail_sync.store(true, Ordering::SeqCst);
    let failed = run(&store, "acme", NO_QUOTA, "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=lost", "");
    assert!(matches!(failed, Err(StoreError::Io { .. })), "{failed:?}");
    assert!(store.loaded_tenants().is_empty(), "the failed tenant is unloaded");
    faults.fail_sync.store(false, Ordering::SeqCst);
    // The failed write reached the file before its sync failed, so it may be there; the write
    // acknowledged before it must be, one way or the other.
    let now = get(&store, "acme", "select?p=doc&c=1.1.1/1.1.1/1.1.1");
    assert!(now == "kept" || now == "lost", "{now:?}");
    get(&store, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.2&s=again");
    drop(store);
    let store = open(dir.path());
    assert_eq!(get(&store, "acme", "select?p=doc&c=1.1.1/1.1.1/1.1.2"), "again");
}

// Goal: `execute_now` answers a select inline only when that needs neither the disk nor a wait:
// not for a tenant that is not loaded (and it loads nothing), not for a write, and not while the
// phext holds a change whose fsync is still under way; otherwise with the bytes `execute` gives.
#[test]
fn inline_select_never_waits_and_never_sees_undurable_data() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, faults) = faulty_store(dir.path());
    let select = parse(Method::Get, "select", "p=doc&c=1.1.1/1.1.1/1.1.1", b"").expect("parses");
    let update =
        parse(Method::Get, "update", "p=doc&c=1.1.1/1.1.1/1.1.1&s=x", b"").expect("parses");
    assert!(store.execute_now("acme", &select).is_none(), "not loaded: the blocking path loads it");
    assert!(store.loaded_tenants().is_empty(), "an inline read loads nothing");
    get(&store, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=durable");
    let inline = store.execute_now("acme", &select).expect("loaded and durable").expect("answers");
    assert_eq!(inline.body, b"durable");
    assert!(store.execute_now("acme", &update).is_none(), "writes go to the blocking path");

    let base_syncs = faults.syncs_started.load(Ordering::SeqCst);
    *faults.hold_sync.lock().expect("hold lock") = true;
    std::thread::scope(|scope| {
        let store = &store;
        let writer =
            scope.spawn(move || get(store, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=pending"));
        wait_until("the write to reach its fsync", || {
            faults.syncs_started.load(Ordering::SeqCst) > base_syncs
        });
        assert!(
            store.execute_now("acme", &select).is_none(),
            "the change is applied but not durable yet"
        );
        *faults.hold_sync.lock().expect("hold lock") = false;
        faults.released.notify_all();
        assert_eq!(writer.join().expect("writer"), "Updated 7 bytes");
    });
    let inline = store.execute_now("acme", &select).expect("durable again").expect("answers");
    assert_eq!(inline.body, b"pending");
}
