//! Replica sets that change under writes: a join and a drain, R raised, a cluster grown from
//! one node to three copies.

use super::*;

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
