//! Black-box: a 3-node cluster with R = 3 (`sq-cloud dev --replicas 3`). Every write is on a
//! majority of its tenant's nodes before it is answered: with both backups frozen a write is
//! refused (503, never a hang) rather than acknowledged on one copy; with one frozen, writes go
//! on; the backups catch up by themselves; a node whose disk is wiped comes back with its
//! copies rebuilt and nothing lost; and after a clean stop the three copies of every tenant are
//! byte for byte the same.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{admin, get, wait_for, DevCluster};
use reqwest::Method;

/// A write refused for want of backups is answered within the wait for acknowledgements (2 s)
/// and this much slack on a loaded machine.
const REFUSAL_BOUND: Duration = Duration::from_secs(10);

/// Frozen processes, continued on every path out of the test (a stopped process would outlive
/// it: the cluster's SIGTERM waits until it runs again).
struct Frozen(Vec<i32>);

impl Frozen {
    fn freeze(pids: &[i32]) -> Frozen {
        for &pid in pids {
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        Frozen(pids.to_vec())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

fn pid(cluster: &DevCluster, node: u64) -> i32 {
    let nodes = cluster.json["nodes"].as_array().expect("nodes in dev.json");
    let n = nodes.iter().find(|n| n["id"] == node).expect("the node is in dev.json");
    n["pid"].as_i64().expect("a pid") as i32
}

/// The tenant's stats, or `None` when they do not come within a few seconds (its primary is
/// frozen, or the answer is an error).
fn stats_now(cluster: &DevCluster, tenant: &str) -> Option<serde_json::Value> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("a client");
    let r = client
        .get(format!("{}/admin/tenants/{tenant}/stats", cluster.url()))
        .bearer_auth(cluster.admin_key())
        .send()
        .ok()?;
    if r.status().as_u16() != 200 {
        return None;
    }
    r.json().ok()
}

fn stats(cluster: &DevCluster, tenant: &str) -> serde_json::Value {
    let (status, body) =
        admin(cluster, Method::GET, &format!("/admin/tenants/{tenant}/stats"), None);
    assert_eq!(status, 200, "{body}");
    body
}

/// The tenant's stats once every backup holds every record of its primary. A backup's state
/// is what the primary heard at the tenant's last request; a primary that took the tenant over
/// by a placement change hears from its backups at its first: each look reads the tenant
/// first (with `key`).
fn in_sync(cluster: &DevCluster, tenant: &str, key: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        get(&cluster.url(), key, "/select?p=notes&c=1.1.1/1.1.1/1.1.1");
        let s = stats(cluster, tenant);
        let synced = s["backups"].as_array().is_some_and(|backups| {
            backups.len() == 2 && backups.iter().all(|b| b["state"] == "in-sync" && b["lag"] == 0)
        });
        if synced {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "every backup of {tenant} in sync: not within 20 s: {s}"
        );
        std::thread::sleep(common::POLL_INTERVAL);
    }
}

/// [`update`] until it is not a 503 (a cluster just started, whose leases and first rounds are
/// still being made, asks clients to retry), within 20 s.
fn update_retrying(cluster: &DevCluster, key: &str, p: &str, i: u32, text: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body, _) = update(cluster, key, p, i, text);
        if status != 503 || Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn update(cluster: &DevCluster, key: &str, p: &str, i: u32, text: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let r = common::http()
        .get(format!("{}/update?p={p}&c=1.1.1/1.1.1/1.1.{i}&s={text}", cluster.url()))
        .bearer_auth(key)
        .send()
        .expect("an answer");
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").is_some();
    let body = r.text().expect("a body");
    assert!(status != 503 || retry_after, "a 503 names when to retry");
    (status, body, started.elapsed())
}

/// Every file of the tenant's directory on a node, by path, but its usage roll-up (kept by the
/// primary only), its ballots (a replica's own promise: the last primary's ballot, which a
/// replica that took no records under it has not promised) and the marker of a copy rebuilt
/// after a lost disk.
fn tenant_files(node_dir: &Path, tenant: &str) -> BTreeMap<String, Vec<u8>> {
    let root = node_dir.join("store/tenants").join(tenant);
    let mut files = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("a tenant directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .file_name()
                .is_some_and(|n| n != "usage.json" && n != "ballots" && n != "caught-up")
            {
                let name = path.strip_prefix(&root).expect("inside").display().to_string();
                files.insert(name, std::fs::read(&path).expect("readable"));
            }
        }
    }
    files
}

/// Held by each test while its cluster runs: three clusters of four processes at once, debug
/// builds with three copies of every write, did not all come up within the start limit on a
/// 2-core machine.
static ONE_CLUSTER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A 3-node `sq-cloud dev` in `dir` with R = 3.
fn three_copies(dir: &Path) -> DevCluster {
    cluster_with(dir, 3, 3)
}

/// An `sq-cloud dev` of `nodes` nodes in `dir` with R = `replicas`.
fn cluster_with(dir: &Path, nodes: usize, replicas: u8) -> DevCluster {
    let listen = format!("127.0.0.1:{}", common::free_tcp_port());
    DevCluster::start_with(dir, nodes, &listen, &["--replicas", &replicas.to_string()])
}

/// After a clean stop: the tenant's files are the same on the three nodes, byte for byte, and
/// hold its documents.
fn same_copies(cluster: &DevCluster, tenant: &str) {
    let copies: Vec<_> =
        (1..=3).map(|n| tenant_files(&cluster.dir.join(format!("node-{n}")), tenant)).collect();
    assert!(copies[0].keys().any(|k| k.starts_with("phexts/")), "{:?}", copies[0].keys());
    for (n, copy) in copies.iter().enumerate().skip(1) {
        assert_eq!(copy.keys().collect::<Vec<_>>(), copies[0].keys().collect::<Vec<_>>());
        for (name, bytes) in copy {
            assert!(
                bytes == &copies[0][name],
                "{tenant}/{name} differs on node {}: {:?} against node 1's {:?}",
                n + 1,
                &bytes[..bytes.len().min(32)],
                &copies[0][name][..copies[0][name].len().min(32)]
            );
        }
    }
}

// Goal: writes wait for a majority of their tenant's three copies. Both backups frozen: a write
// is refused with 503 within the bound and acknowledged nowhere; one frozen: writes are
// acknowledged, reads too (under the primary's lease), and the frozen node is marked down, then
// up once it runs again; both back: the stats show them caught up; changing R by two at once with
// tenants is refused by name; and after a clean stop every tenant's files are identical on all
// three nodes.
#[test]
fn writes_wait_for_a_majority_of_three_copies() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("dir");
    let mut cluster = three_copies(tmp.path());
    let demo = cluster.demo_key();
    let other = cluster.add_tenant("other", serde_json::json!({}));
    for i in 1..=20 {
        for (key, p) in [(&demo, "notes"), (&demo, "todo"), (&other, "log")] {
            let (status, body) = update_retrying(&cluster, key, p, i, &format!("v{i}"));
            assert_eq!(status, 200, "{body}");
        }
    }
    let s = in_sync(&cluster, "demo", &demo);
    let set: Vec<u64> =
        s["replica_set"].as_array().expect("a set").iter().filter_map(|n| n.as_u64()).collect();
    assert_eq!(set.len(), 3, "{s}");
    assert_eq!(s["node"], set[0], "the owner is the primary, first of the set");
    // 40 writes, and a barrier record per prepare round that found its log ending in an
    // earlier ballot (a node marked down and up as the cluster starts moves the ballot).
    let written = s["last_lsn"].as_u64().expect("an lsn");
    assert!(written >= 40, "{s}");
    in_sync(&cluster, "other", &other);

    // Both backups frozen: no majority, so no acknowledgement. The primary logs the write and
    // waits for its backups; or, if the placement epoch moved since its last request (a node
    // marked down and up as the cluster starts), it must prepare again first, which no backup
    // answers, and logs nothing.
    let logged = {
        let _frozen = Frozen::freeze(&[pid(&cluster, set[1]), pid(&cluster, set[2])]);
        let (status, body, took) = update(&cluster, &demo, "notes", 30, "alone");
        assert_eq!(status, 503, "{body}");
        let logged = body.contains("backups hold the write");
        assert!(logged || body.contains("promised its new primary"), "{body}");
        assert!(took < REFUSAL_BOUND, "refused after {took:?}");
        eprintln!("both backups frozen: 503 after {took:?} (logged: {logged}): {body}");
        logged
    };
    // Silent past the down time while both were frozen, they may have been marked down: wait
    // until every node is up again, and the primary reads again: it holds its lease (a voter
    // back from a pause grants nothing for the down time: node::lease), and a backup holds the
    // refused write, which a read waits for.
    let all_up = || {
        wait_for(Duration::from_secs(30), "every node up", || {
            let (_, h) = admin(&cluster, Method::GET, "/admin/health", None);
            (h["down"] == serde_json::json!([]) && h["under_replicated"] == 0).then_some(())
        });
        wait_for(Duration::from_secs(30), "the primary reads again", || {
            let (status, _) = get(&cluster.url(), &demo, "/select?p=notes&c=1.1.1/1.1.1/1.1.1");
            (status == 200).then_some(())
        })
    };
    all_up();
    // One backup frozen: the other makes a majority. Silent past the down time, it is marked
    // down by the registry; back, it is marked up.
    {
        let frozen_at = Instant::now();
        let _frozen = Frozen::freeze(&[pid(&cluster, set[2])]);
        for i in 1..=5 {
            let (status, body, took) = update(&cluster, &demo, "todo", i, &format!("w{i}"));
            assert_eq!(status, 200, "{body}");
            assert!(took < REFUSAL_BOUND, "{took:?}");
        }
        wait_for(Duration::from_secs(30), "the frozen node marked down", || {
            let (_, h) = admin(&cluster, Method::GET, "/admin/health", None);
            (h["down"] == serde_json::json!([set[2]])).then_some(())
        });
        let (_, h) = admin(&cluster, Method::GET, "/admin/health", None);
        assert_eq!(h["under_replicated"], 2, "both tenants have a copy on the node down: {h}");
        eprintln!("frozen node {} marked down {:?} after the freeze", set[2], frozen_at.elapsed());
        // The mark moved the placement epoch: the lease holds once the primary's registry has
        // it too, a moment later (well under a second alone; the bound is for a loaded CI
        // machine running the other clusters of this file beside it).
        let (body, took) =
            wait_for(Duration::from_secs(10), "the primary reads under its lease", || {
                let (status, body) =
                    get(&cluster.url(), &demo, "/select?p=todo&c=1.1.1/1.1.1/1.1.5");
                (status == 200).then_some(body)
            });
        assert_eq!(body, "w5");
        eprintln!("one backup frozen and marked down: the primary read within {took:?}");
    }
    all_up();
    let s = in_sync(&cluster, "demo", &demo);
    assert!(
        s["last_lsn"].as_u64().expect("an lsn") >= written + 5 + u64::from(logged),
        "the 5 writes, and the refused write if it was logged, are now on every copy: {s}"
    );
    // A write refused once logged is on every copy now; one refused before, nowhere. Asked again
    // while the gateway answers 503: a node just thawed may hold its peers dead by gossip for a
    // moment (its own pause counts as their silence), and the gateway may take that view.
    let (status, body) = read_through_503(&cluster, &demo, "/select?p=notes&c=1.1.1/1.1.1/1.1.30");
    assert_eq!((status, body.as_str()), (200, if logged { "alone" } else { "" }));

    let (status, body) =
        admin(&cluster, Method::POST, "/admin/replicas", Some(serde_json::json!({"replicas": 5})));
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("R changes by one at a time"), "{body}");
    let (status, body) =
        admin(&cluster, Method::POST, "/admin/replicas", Some(serde_json::json!({"replicas": 3})));
    assert_eq!((status, &body["replicas"]), (200, &serde_json::json!(3)), "{body}");

    cluster.stop();
    for tenant in ["demo", "other"] {
        same_copies(&cluster, tenant);
    }
}

/// A read through the gateway, asked again while it answers 503 (with Retry-After: no primary
/// for the moment), for up to 30 s; any other answer is returned at once.
fn read_through_503(cluster: &DevCluster, key: &str, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get(&cluster.url(), key, path);
        if status != 503 || Instant::now() >= deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where the writer puts its `i`th write (from 1): a scroll of its own, 999 to a section (a
/// coordinate's parts run to 999).
fn log_coordinate(i: u32) -> String {
    let (section, scroll) = ((i - 1) / 999 + 1, (i - 1) % 999 + 1);
    format!("1.1.1/1.1.1/1.{section}.{scroll}")
}

/// Writes `log` scroll after scroll until told to stop; returns each acknowledged scroll, and
/// the longest time between two acknowledgements.
fn writer(
    url: String,
    key: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Vec<u32>, Duration)> {
    paced_writer(url, key, stop, Duration::ZERO)
}

/// A [`writer`] that waits `pause` after each acknowledged write.
fn paced_writer(
    url: String,
    key: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pause: Duration,
) -> std::thread::JoinHandle<(Vec<u32>, Duration)> {
    std::thread::spawn(move || {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("a client");
        let (mut acked, mut longest, mut last_ack) = (Vec::new(), Duration::ZERO, Instant::now());
        let mut i = 0u32;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            i += 1;
            let url = format!("{url}/update?p=log&c={}&s=w{i}", log_coordinate(i));
            let status =
                client.get(&url).bearer_auth(&key).send().ok().map(|r| r.status().as_u16());
            // Only an outage may refuse a write: a refusal of the request itself is a defect.
            if let Some(s) = status {
                assert!(s == 200 || s >= 500, "write {i} answered {s}");
            }
            if status == Some(200) {
                acked.push(i);
                longest = longest.max(last_ack.elapsed());
                last_ack = Instant::now();
                std::thread::sleep(pause);
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        (acked, longest)
    })
}

/// A [`writer`] running.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: std::thread::JoinHandle<(Vec<u32>, Duration)>,
}

impl Load {
    /// Stops the writer; asserts it had more than 20 writes acknowledged, and reads every one
    /// of them back.
    fn stop_and_read_back(self, cluster: &DevCluster, key: &str) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (acked, longest) = self.writer.join().expect("the writer");
        eprintln!(
            "{} writes acknowledged; the longest wait between two was {longest:?}",
            acked.len()
        );
        assert!(acked.len() > 20, "{} writes", acked.len());
        for i in &acked {
            let (status, body) =
                get(&cluster.url(), key, &format!("/select?p=log&c={}", log_coordinate(*i)));
            assert_eq!((status, body.as_str()), (200, format!("w{i}").as_str()), "write {i}");
        }
    }
}

/// Writes `writes` scrolls of `notes`, waits until every backup holds them, then starts a
/// [`writer`]; returns the tenant's primary and the load, half a second in.
fn primary_under_load(cluster: &DevCluster, key: &str, writes: u32) -> (u64, Load) {
    for i in 1..=writes {
        let (status, body) = update_retrying(cluster, key, "notes", i, "x");
        assert_eq!(status, 200, "{body}");
    }
    let primary = in_sync(cluster, "demo", key)["node"].as_u64().expect("a primary");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = writer(cluster.url(), key.to_string(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    (primary, Load { stop, writer })
}

// Goal: the primary of a tenant is frozen under write load: the registry marks it down and the
// next node of the set serves the tenant within the bound, with every acknowledged write; the
// old primary, continued, is marked up, takes the tenant back with those writes too, and after
// a clean stop the three copies are byte for byte the same.
#[test]
fn a_frozen_primary_is_replaced_and_nothing_acknowledged_is_lost() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("dir");
    let mut cluster = three_copies(tmp.path());
    let demo = cluster.demo_key();
    let (old, load) = primary_under_load(&cluster, &demo, 5);
    let frozen_at = Instant::now();
    {
        let _frozen = Frozen::freeze(&[pid(&cluster, old)]);
        let (new, _) = wait_for(Duration::from_secs(30), "a new primary", || {
            stats_now(&cluster, "demo")?["node"].as_u64().filter(|&n| n != old)
        });
        eprintln!("node {new} is primary {:?} after node {old} froze", frozen_at.elapsed());
        // Writes go on under the new primary.
        std::thread::sleep(Duration::from_secs(1));
    }
    // Back, the old primary is marked up and takes the tenant again.
    wait_for(Duration::from_secs(30), "the old primary back", || {
        (stats_now(&cluster, "demo")?["node"] == old).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    load.stop_and_read_back(&cluster, &demo);
    in_sync(&cluster, "demo", &demo);
    cluster.stop();
    same_copies(&cluster, "demo");
}

// Goal: the primary of a tenant loses its disk under write load (its process frozen, its tenant
// store deleted, then killed; `sq-cloud dev` restarts it on the empty store). The node says its
// copies were lost; the tenant is served meanwhile and after; the node's copy is rebuilt from the
// others (its backups in sync again); every acknowledged write reads back; and after a clean stop
// its rebuilt copy is byte for byte the others'.
#[test]
fn a_wiped_node_rebuilds_its_copies_and_nothing_is_lost() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("dir");
    let mut cluster = three_copies(tmp.path());
    let demo = cluster.demo_key();
    let (victim, load) = primary_under_load(&cluster, &demo, 20);
    let old_pid = pid(&cluster, victim);
    {
        let _frozen = Frozen::freeze(&[old_pid]);
        let store = cluster.dir.join(format!("node-{victim}/store/tenants"));
        std::fs::remove_dir_all(&store).expect("the store wiped");
        unsafe { libc::kill(old_pid, libc::SIGKILL) };
    }
    // `sq-cloud dev` writes the restarted node's process id into dev.json.
    wait_for(Duration::from_secs(30), "the node restarted", || {
        cluster.reload_json();
        (pid(&cluster, victim) != old_pid).then_some(())
    });
    let log = cluster.dir.join(format!("node-{victim}.log"));
    wait_for(Duration::from_secs(30), "the node saying its copies were lost", || {
        std::fs::read_to_string(&log).ok()?.contains("its copies were lost").then_some(())
    });
    // Served again by the rebuilt node, with its backups in sync.
    wait_for(Duration::from_secs(60), "the wiped node primary again", || {
        (stats_now(&cluster, "demo")?["node"] == victim).then_some(())
    });
    // The rebuilt primary takes writes, acknowledged by a majority that counts.
    let back = Instant::now();
    for i in 1..=10 {
        let (status, body) = update_retrying(&cluster, &demo, "after", i, "y");
        assert_eq!(status, 200, "{body}");
    }
    eprintln!("10 writes to the rebuilt primary in {:?}", back.elapsed());
    load.stop_and_read_back(&cluster, &demo);
    for i in 1..=10 {
        let (status, body) =
            get(&cluster.url(), &demo, &format!("/select?p=after&c=1.1.1/1.1.1/1.1.{i}"));
        assert_eq!((status, body.as_str()), (200, "y"), "write {i} after the wipe");
    }
    for i in 1..=20 {
        let (status, body) =
            get(&cluster.url(), &demo, &format!("/select?p=notes&c=1.1.1/1.1.1/1.1.{i}"));
        assert_eq!((status, body.as_str()), (200, "x"), "write {i} before the wipe");
    }
    in_sync(&cluster, "demo", &demo);
    // Health, whichever node answers it, shows the wiped node's rebuild, then that it is done.
    let (rebuild, _) =
        wait_for(Duration::from_secs(30), "the rebuild shown done in health", || {
            let (status, h) = admin(&cluster, Method::GET, "/admin/health", None);
            assert_eq!(status, 200, "{h}");
            let rebuilds = h["rebuilds"].as_array().expect("health lists rebuilds").clone();
            assert!(
                rebuilds.iter().all(|r| r["node"] == victim),
                "only node {victim} rebuilt: {h}"
            );
            rebuilds.into_iter().find(|r| r["done"] == true)
        });
    assert_eq!(rebuild["copies_left"], 0, "{rebuild}");
    assert!(rebuild["copies_total"].as_u64() >= Some(1), "{rebuild}");
    cluster.stop();
    same_copies(&cluster, "demo");
    assert!(
        cluster.dir.join(format!("node-{victim}/store/tenants/demo/caught-up")).exists(),
        "the rebuilt copy was caught up by a primary"
    );
}

/// The replica set of `tenant`, as its stats show it.
fn replica_set(cluster: &DevCluster, tenant: &str) -> Vec<u64> {
    let s = stats(cluster, tenant);
    s["replica_set"].as_array().expect("a set").iter().filter_map(|n| n.as_u64()).collect()
}

// Goal: with R = 3, a 4th node joins and is then drained and removed while a client writes.
// Each changes the sets it touches by one node in and one out with no operator step beyond the
// join and the drain: the entering node is caught up, then the change is committed, and the
// node that left holds no copy in any set. Writes are acknowledged throughout (the longest wait
// between two is shown), every one reads back, and the tenant's backups end in sync.
#[test]
fn a_join_and_a_drain_swap_one_copy_each_and_lose_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("dir");
    let cluster = three_copies(tmp.path());
    let demo = cluster.demo_key();
    let tenants: Vec<String> = (0..12).map(|i| format!("r{i:02}")).collect();
    let mut keys = Vec::new();
    for t in &tenants {
        let key = cluster.add_tenant(t, serde_json::json!({}));
        let (status, body) = update_retrying(&cluster, &key, "notes", 1, t);
        assert_eq!(status, 200, "{body}");
        keys.push(key);
    }
    let (_, load) = primary_under_load(&cluster, &demo, 5);

    let port4 = common::free_udp_port();
    let mut node4 = common::start_node(&cluster, 4, port4);
    let joined = Instant::now();
    let (status, body) = admin(
        &cluster,
        Method::POST,
        "/admin/nodes",
        Some(serde_json::json!({"id": 4, "addr": format!("127.0.0.1:{port4}")})),
    );
    assert_eq!(status, 200, "{body}");
    let took = common::settle(&cluster, "join");
    eprintln!("join: every set change committed {took:?} after the join began");
    let sets: Vec<Vec<u64>> = tenants.iter().map(|t| replica_set(&cluster, t)).collect();
    assert!(sets.iter().all(|s| s.len() == 3), "{sets:?}");
    let entered = sets.iter().filter(|s| s.contains(&4)).count();
    assert!(entered > 0, "node 4 entered no set: {sets:?}");
    eprintln!("join: node 4 entered {entered} of {} sets; {:?}", tenants.len(), joined.elapsed());

    let (status, body) = admin(&cluster, Method::POST, "/admin/nodes/4/drain", None);
    assert_eq!(status, 200, "{body}");
    let took = common::settle(&cluster, "drain");
    eprintln!("drain: every set change committed in {took:?}");
    for t in tenants.iter().chain(["demo".to_string()].iter()) {
        let set = replica_set(&cluster, t);
        assert!(set.len() == 3 && !set.contains(&4), "{t}: {set:?}");
    }
    let (status, body) = admin(&cluster, Method::DELETE, "/admin/nodes/4", None);
    assert_eq!(status, 200, "{body}");
    let _ = node4.kill();
    let _ = node4.wait();

    load.stop_and_read_back(&cluster, &demo);
    in_sync(&cluster, "demo", &demo);
    for (t, key) in tenants.iter().zip(&keys) {
        let (status, body) = get(&cluster.url(), key, "/select?p=notes&c=1.1.1/1.1.1/1.1.1");
        assert_eq!((status, body.as_str()), (200, t.as_str()), "{t}'s write before the join");
    }
}

// Goal: R is raised from 2 to 3 over a cluster of three nodes that holds tenants, while a client
// writes. Every tenant's set gains its third node, which is caught up before the change is
// committed; writes are acknowledged throughout and every one reads back; the two backups of
// each tenant end in sync, and after a clean stop the three copies are byte for byte the same.
#[test]
fn raising_r_adds_a_third_copy_of_every_tenant() {
    raise_r_under_writes(2);
}

// Goal: as above, from R = 1: tenants written with one copy each (no ballots, no leases) gain a
// second copy, then a third, one raise at a time, while a client writes; nothing written before
// or during the raises is lost, and the copies end the same. Each raise goes through
// `sq-cloud admin cluster replicas`, which returns only once no set change is pending.
#[test]
fn raising_r_from_one_replicates_tenants_written_with_one_copy() {
    raise_r_under_writes(1);
}

/// The placement epoch in the registry, from `admin cluster health`.
fn placement_epoch(cluster: &DevCluster) -> u64 {
    let (status, health) = admin(cluster, Method::GET, "/admin/health", None);
    assert_eq!(status, 200, "{health}");
    health["placement_epoch"].as_u64().expect("the health report has the placement epoch")
}

/// A three-node cluster formed with R = `from`, holding tenants, has R raised to 3 one step at
/// a time while a client writes (the goals above).
fn raise_r_under_writes(from: u8) {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("dir");
    let mut cluster = cluster_with(tmp.path(), 3, from);
    let demo = cluster.demo_key();
    let mut tenants = vec![("demo".to_string(), demo.clone())];
    for i in 0..6 {
        let t = format!("g{i}");
        let key = cluster.add_tenant(&t, serde_json::json!({}));
        tenants.push((t, key));
    }
    for (t, key) in &tenants {
        for i in 1..=3 {
            let (status, body) = update_retrying(&cluster, key, "notes", i, t);
            assert_eq!(status, 200, "{body}");
        }
        assert_eq!(replica_set(&cluster, t).len(), usize::from(from), "{t}: {from} copies");
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = Load { stop: stop.clone(), writer: writer(cluster.url(), demo.clone(), stop) };
    std::thread::sleep(Duration::from_millis(500));

    for r in from + 1..=3 {
        let raised = Instant::now();
        let epoch_before = placement_epoch(&cluster);
        if from == 1 {
            // Through the CLI, which shows the raise's progress until it is done.
            let (ok, out, err) =
                common::admin_cli(&cluster, &["cluster", "replicas", &r.to_string()]);
            assert!(ok, "{err}");
            let last = err.lines().last().unwrap_or_default();
            assert!(last.contains("replica set changes pending: 0"), "ends when done: {err}");
            assert!(out.contains(&format!("replicas {r},")), "{out}");
            assert_eq!(common::pending_handoffs(&cluster), Some(0), "the CLI waited");
        } else {
            let body = serde_json::json!({ "replicas": r });
            let (status, answer) = admin(&cluster, Method::POST, "/admin/replicas", Some(body));
            assert_eq!((status, &answer["replicas"]), (200, &serde_json::json!(r)), "{answer}");
        }
        let took = common::settle(&cluster, "raise R");
        eprintln!(
            "R {} -> {r}: every set change committed {took:?} after the raise ({:?})",
            r - 1,
            raised.elapsed()
        );
        for (t, _) in &tenants {
            assert_eq!(replica_set(&cluster, t).len(), usize::from(r), "{t} with R = {r}");
        }
        // The raise moves the placement epoch once; a node marked down and up moves it twice
        // more (a loaded machine may stall one node's lease renewals for the down time). Raised
        // from 1, every node had gone without a lease since it started, and all three were
        // marked down at once.
        let moved = placement_epoch(&cluster) - epoch_before;
        eprintln!("R {} -> {r} moved the placement epoch by {moved}", r - 1);
        assert!(moved <= 3, "R {} -> {r} moved the placement epoch by {moved}", r - 1);
    }
    load.stop_and_read_back(&cluster, &demo);
    for (t, key) in &tenants {
        let set = replica_set(&cluster, t);
        assert_eq!(set.len(), 3, "{t}: {set:?}");
        in_sync(&cluster, t, key);
        for i in 1..=3 {
            let (status, body) =
                get(&cluster.url(), key, &format!("/select?p=notes&c=1.1.1/1.1.1/1.1.{i}"));
            assert_eq!((status, body.as_str()), (200, t.as_str()), "{t}: a write before the raise");
        }
    }
    cluster.stop();
    for (t, _) in &tenants {
        same_copies(&cluster, t);
    }
}

// Goal: with R = 3 set on a one-node cluster, two nodes join one after the other while a client
// writes; each join adds the node to every tenant's set once it is caught up, so the tenant
// ends on three nodes with its backups in sync, every acknowledged write reads back, and after
// a clean stop the three copies are byte for byte the same.
#[test]
fn a_cluster_grows_from_one_node_to_three_copies() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("dir");
    let mut cluster = cluster_with(tmp.path(), 1, 3);
    let demo = cluster.demo_key();
    for i in 1..=5 {
        let (status, body) = update_retrying(&cluster, &demo, "notes", i, "x");
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(replica_set(&cluster, "demo"), vec![1], "one copy while one node is active");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = Load { stop: stop.clone(), writer: writer(cluster.url(), demo.clone(), stop) };
    let mut joined = Vec::new();
    for id in [2, 3] {
        let port = common::free_udp_port();
        joined.push(common::start_node(&cluster, id, port));
        let body = serde_json::json!({"id": id, "addr": format!("127.0.0.1:{port}")});
        let (status, answer) = admin(&cluster, Method::POST, "/admin/nodes", Some(body));
        assert_eq!(status, 200, "{answer}");
        let took = common::settle(&cluster, "join");
        eprintln!("node {id} joined: every set holds it {took:?} after its join was accepted");
        assert_eq!(replica_set(&cluster, "demo").len() as u64, id);
    }
    load.stop_and_read_back(&cluster, &demo);
    in_sync(&cluster, "demo", &demo);
    // A clean stop of every node, as `cluster.stop` does for dev's own.
    for node in &mut joined {
        unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
        let _ = node.wait();
    }
    cluster.stop();
    same_copies(&cluster, "demo");
}

// Goal: two nodes are killed (SIGKILL) in turn under write load, the second only once the
// first is back and the tenant's backups are in sync again; each time the tenant is served
// again, every acknowledged write reads back, and after a clean stop the three copies are byte
// for byte the same.
#[test]
fn two_nodes_killed_in_turn_lose_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("dir");
    let mut cluster = three_copies(tmp.path());
    let demo = cluster.demo_key();
    let (primary, load) = primary_under_load(&cluster, &demo, 5);
    let second = (1..=3).find(|&n| n != primary).expect("another node");
    for victim in [primary, second] {
        let old_pid = pid(&cluster, victim);
        let killed = Instant::now();
        unsafe { libc::kill(old_pid, libc::SIGKILL) };
        wait_for(Duration::from_secs(30), "the node restarted", || {
            cluster.reload_json();
            (pid(&cluster, victim) != old_pid).then_some(())
        });
        in_sync(&cluster, "demo", &demo);
        eprintln!(
            "node {victim} killed; back, and every copy in sync {:?} later",
            killed.elapsed()
        );
    }
    load.stop_and_read_back(&cluster, &demo);
    in_sync(&cluster, "demo", &demo);
    cluster.stop();
    same_copies(&cluster, "demo");
}

/// Fault cycles run by [`kill_freeze_and_wipe_cycles_lose_nothing`]: `SQ_CLOUD_FAULT_CYCLES`, or
/// two of each kind. docs/BENCHMARKS.md has a run of 200.
const FAULT_CYCLES_DEFAULT: usize = 6;

/// Tenants written throughout the cycles, each by its own client.
const CYCLE_TENANTS: usize = 3;

/// Each cycle writer's pause after an acknowledged write: a steady load whose documents do not
/// grow so fast that a long run measures mostly their size.
const CYCLE_WRITE_PAUSE: Duration = Duration::from_millis(10);

/// How long a frozen node stays stopped: past the lease's down time, so its tenants move.
const FREEZE_FOR: Duration = Duration::from_secs(3);

/// The fault of one cycle.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL; `sq-cloud dev` starts the node again.
    Kill,
    /// SIGSTOP for [`FREEZE_FOR`], then SIGCONT.
    Freeze,
    /// Frozen, its tenant store deleted, then SIGKILL: the node restarts on an empty store.
    Wipe,
}

/// Waits until every tenant in `tenants` (id, key) has its primary and both backups in sync,
/// within 120 s; returns how long that took.
fn all_in_sync(cluster: &DevCluster, tenants: &[(String, String)]) -> Duration {
    let started = Instant::now();
    for (tenant, key) in tenants {
        wait_for(Duration::from_secs(120), &format!("every copy of {tenant} in sync"), || {
            // The primary hears its backups at a request; one not answered yet looks again.
            let look = common::http()
                .get(format!("{}/select?p=log&c=1.1.1/1.1.1/1.1.1", cluster.url()))
                .bearer_auth(key)
                .send();
            if let Err(e) = look {
                eprintln!("a read of {tenant} while waiting for its copies: {e}");
            }
            let s = stats_now(cluster, tenant)?;
            let backups = s["backups"].as_array()?;
            let synced = backups.len() == 2
                && backups.iter().all(|b| b["state"] == "in-sync" && b["lag"] == 0);
            synced.then_some(())
        });
    }
    started.elapsed()
}

/// The median and the largest of `times`.
fn median_and_max(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    (
        times.get(times.len() / 2).copied().unwrap_or_default(),
        times.last().copied().unwrap_or_default(),
    )
}

// Goal: the cycles of faults with real processes. Under a write load on several tenants,
// each cycle kills, freezes or wipes one node (in turn over the nodes and the kinds), then waits
// until every tenant has all three copies in sync again before the next. Every acknowledged
// write reads back at the end, and after a clean stop the three copies of every tenant are byte
// for byte the same. Prints, per kind, the median and largest time until back in sync.
#[test]
fn kill_freeze_and_wipe_cycles_lose_nothing() {
    let cycles = std::env::var("SQ_CLOUD_FAULT_CYCLES")
        .ok()
        .map(|v| v.parse::<usize>().expect("SQ_CLOUD_FAULT_CYCLES is a number"))
        .unwrap_or(FAULT_CYCLES_DEFAULT);
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("dir");
    let mut cluster = three_copies(tmp.path());
    let mut tenants = vec![("demo".to_string(), cluster.demo_key())];
    for i in 1..CYCLE_TENANTS {
        let id = format!("cycle{i}");
        let key = cluster.add_tenant(&id, serde_json::json!({"tier": "team"}));
        tenants.push((id, key));
    }
    for (tenant, key) in &tenants {
        // A long run makes more calls than a tier's daily limit allows.
        let raised = serde_json::json!({"daily_limit": 100_000_000u64});
        let (status, body) =
            admin(&cluster, Method::PATCH, &format!("/admin/tenants/{tenant}"), Some(raised));
        assert_eq!(status, 200, "{body}");
        let (status, body) = update_retrying(&cluster, key, "log", 1, "first");
        assert_eq!(status, 200, "{body}");
    }
    all_in_sync(&cluster, &tenants);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads: Vec<Load> = tenants
        .iter()
        .map(|(_, key)| Load {
            stop: stop.clone(),
            writer: paced_writer(cluster.url(), key.clone(), stop.clone(), CYCLE_WRITE_PAUSE),
        })
        .collect();
    let mut times: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let started = Instant::now();
    for cycle in 0..cycles {
        // Every kind in turn; each three cycles shift the nodes by one, so nine cycles give
        // every node every kind.
        let fault = [Fault::Kill, Fault::Freeze, Fault::Wipe][cycle % 3];
        let victim = ((cycle + cycle / 3) % 3) as u64 + 1;
        let old_pid = pid(&cluster, victim);
        let at = Instant::now();
        match fault {
            Fault::Kill => unsafe {
                libc::kill(old_pid, libc::SIGKILL);
            },
            Fault::Freeze => {
                let _frozen = Frozen::freeze(&[old_pid]);
                std::thread::sleep(FREEZE_FOR);
            }
            Fault::Wipe => {
                let _frozen = Frozen::freeze(&[old_pid]);
                let store = cluster.dir.join(format!("node-{victim}/store/tenants"));
                std::fs::remove_dir_all(&store).expect("the store wiped");
                unsafe { libc::kill(old_pid, libc::SIGKILL) };
            }
        }
        if !matches!(fault, Fault::Freeze) {
            wait_for(Duration::from_secs(30), "the node restarted", || {
                cluster.reload_json();
                (pid(&cluster, victim) != old_pid).then_some(())
            });
        }
        all_in_sync(&cluster, &tenants);
        let took = at.elapsed();
        eprintln!("cycle {cycle}: {fault:?} node {victim}; every copy in sync {took:?} later");
        times.entry(format!("{fault:?}")).or_default().push(took);
    }
    for (kind, t) in &mut times {
        let (median, max) = median_and_max(t);
        eprintln!("{kind}: {} cycles, in sync again after median {median:?}, max {max:?}", t.len());
    }
    eprintln!("{cycles} cycles in {:?}", started.elapsed());
    for (load, (_, key)) in loads.into_iter().zip(&tenants) {
        load.stop_and_read_back(&cluster, key);
    }
    all_in_sync(&cluster, &tenants);
    cluster.stop();
    for (tenant, _) in &tenants {
        same_copies(&cluster, tenant);
    }
}
