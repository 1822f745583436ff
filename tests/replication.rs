//! Black-box: a 3-node cluster with R = 3 (`sq-cloud dev --replicas 3`). Every write is on a
//! majority of its tenant's nodes before it is answered: with both backups frozen a write is
//! refused (503, never a hang) rather than acknowledged on one copy; with one frozen, writes go
//! on; the backups catch up by themselves; a node whose disk is wiped comes back with its
//! copies rebuilt and nothing lost; and after a clean stop the three copies of every tenant are
//! byte for byte the same.

mod common;
#[path = "replication/cycles.rs"]
mod cycles;
#[path = "replication/membership.rs"]
mod membership;

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

/// A read sent again a second later while the tenant's rate limit refuses it (429), at most 10
/// times: reading back tens of thousands of writes one after another can run past the 1,000
/// requests a second a tenant may send.
fn read_within_rate_limit(cluster: &DevCluster, key: &str, path: &str) -> (u16, String) {
    let mut answer = get(&cluster.url(), key, path);
    for _ in 0..10 {
        if answer.0 != 429 {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        answer = get(&cluster.url(), key, path);
    }
    answer
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

/// A wait between two acknowledged writes that a [`paced_writer`] reports, with its attempts.
const LONG_WAIT: Duration = Duration::from_secs(1);

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
        let started = Instant::now();
        let (mut acked, mut longest, mut last_ack) = (Vec::new(), Duration::ZERO, Instant::now());
        // The refused or unanswered attempts since the last acknowledgement: status, time taken,
        // answer.
        let mut refused: Vec<(Option<u16>, Duration, String)> = Vec::new();
        let mut i = 0u32;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            i += 1;
            let url = format!("{url}/update?p=log&c={}&s=w{i}", log_coordinate(i));
            let sent = Instant::now();
            let answer = client.get(&url).bearer_auth(&key).send().ok();
            let status = answer.as_ref().map(|r| r.status().as_u16());
            let body = match answer {
                Some(r) if status != Some(200) => r.text().unwrap_or_default(),
                _ => String::new(),
            };
            // Only an outage may refuse a write: a refusal of the request itself is a defect.
            if let Some(s) = status {
                assert!(s == 200 || s >= 500, "write {i} answered {s}");
            }
            if status == Some(200) {
                acked.push(i);
                let waited = last_ack.elapsed();
                longest = longest.max(waited);
                if waited > LONG_WAIT {
                    refused.push((status, sent.elapsed(), body));
                    eprintln!(
                        "writer: {waited:?} between two acknowledgements, the second {:?} after \
                         the writer started; attempts (status, time taken, answer): {refused:?}",
                        started.elapsed()
                    );
                }
                refused.clear();
                last_ack = Instant::now();
                std::thread::sleep(pause);
            } else {
                refused.push((status, sent.elapsed(), body));
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
            let path = format!("/select?p=log&c={}", log_coordinate(*i));
            let (status, body) = read_within_rate_limit(cluster, key, &path);
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
