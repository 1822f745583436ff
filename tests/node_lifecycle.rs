//! Black-box: a node's whole life through `sq-cloud admin nodes`: added (a learner, then an
//! active voter), drained (until no handoff is pending), removed. The removed node learns it,
//! stops by itself with the exit status the systemd unit does not restart, and the gateway stops
//! asking it anything: it leaves `/api/v2/metrics`. Every tenant keeps its data throughout.

mod common;

use std::time::{Duration, Instant};

use common::{admin_cli, free_udp_port, get, start_node, DevCluster};

/// How long a removed node may take to notice and stop.
const STOP_LIMIT: Duration = Duration::from_secs(30);

fn metrics(c: &DevCluster) -> String {
    let (status, text) = get(&c.url(), &c.admin_key(), "/metrics");
    assert_eq!(status, 200, "{text}");
    text
}

// Goal: add, drain and remove through the CLI each end only when done (handoffs pending 0),
// health shows node 4 as a voter once active, the removed node exits with status 10 on its own,
// node 4 leaves the gateway's metrics, and every tenant's document reads back the same.
#[test]
fn add_drain_remove_through_the_cli() {
    let c = DevCluster::start(3);
    let tenants: Vec<(String, String)> = (0..6)
        .map(|i| {
            let id = format!("life{i}");
            let key = c.add_tenant(&id, serde_json::json!({}));
            let path = format!("/update?p=doc&c=1.1.1/1.1.1/1.1.1&s=value-{i}");
            let (status, body) = get(&c.url(), &key, &path);
            assert_eq!(status, 200, "{body}");
            (id, key)
        })
        .collect();
    let check_data = |when: &str| {
        for (i, (id, key)) in tenants.iter().enumerate() {
            let (status, body) = get(&c.url(), key, "/select?p=doc&c=1.1.1/1.1.1/1.1.1");
            assert_eq!(
                (status, body.as_str()),
                (200, format!("value-{i}").as_str()),
                "{id} {when}"
            );
        }
    };

    let port = free_udp_port();
    let mut node4 = start_node(&c, 4, port);
    let addr = format!("127.0.0.1:{port}");
    // The node may take a moment to listen; the join is refused (nothing recorded) until then.
    let deadline = Instant::now() + Duration::from_secs(30);
    let added = loop {
        let (ok, out, err) = admin_cli(&c, &["nodes", "add", "4", &addr]);
        if ok {
            break out;
        }
        assert!(err.contains("not reachable"), "{err}");
        assert!(Instant::now() < deadline, "node 4 never became reachable: {err}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let row = added.lines().find(|l| l.starts_with("4 ")).unwrap_or_default().to_string();
    assert!(row.contains("active") && row.contains("voter"), "{added}");
    check_data("after the join");

    let (ok, out, err) = admin_cli(&c, &["nodes", "drain", "4"]);
    assert!(ok, "{err}");
    assert!(err.contains("handoffs pending: 0"), "progress ends at 0 pending: {err}");
    assert!(out.lines().any(|l| l.starts_with("4 ") && l.contains("draining")), "{out}");
    check_data("after the drain");

    let (ok, _, err) = admin_cli(&c, &["nodes", "remove", "4"]);
    assert!(ok, "{err}");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = node4.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < STOP_LIMIT, "the removed node is still running");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(10), "exit status of a removed node");
    let log = std::fs::read_to_string(c.dir.join("node-4.log")).unwrap();
    assert!(log.contains("removed from the cluster"), "the node says why it stopped");

    let started = Instant::now();
    while metrics(&c).contains("node=\"4\"") {
        assert!(started.elapsed() < Duration::from_secs(10), "node 4 still in the metrics");
        std::thread::sleep(Duration::from_millis(200));
    }
    check_data("after the removal");
}

/// Waits until `child` exits by itself, at most `limit`; its exit code.
fn exit_code_within(child: &mut std::process::Child, limit: Duration, what: &str) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if started.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The registry leader and term the cluster's health names.
fn leader_and_term(c: &DevCluster) -> (u64, u64) {
    let (status, health) = common::admin(c, reqwest::Method::GET, "/admin/health", None);
    assert_eq!(status, 200, "{health}");
    (health["raft"]["leader"].as_u64().unwrap(), health["raft"]["term"].as_u64().unwrap())
}

// Goal: a node removed while it was down learns it when it comes back, although its own log
// still says it is a voter and no leader sends it the entry that removed it: a peer answers its
// gossip with "removed", the node believes it (the peer's registry is newer than its log), says
// so in its log and exits with status 10 by itself, before it stands for election: the leader
// and term it finds are the leader and term it leaves.
#[test]
fn a_node_removed_while_down_stops_when_it_returns() {
    let c = DevCluster::start(3);
    let port = free_udp_port();
    let mut node4 = start_node(&c, 4, port);
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = serde_json::json!({ "id": 4, "addr": addr });
        let (status, answer) = common::admin(&c, reqwest::Method::POST, "/admin/nodes", Some(body));
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never joined: {status} {answer}");
        std::thread::sleep(Duration::from_millis(300));
    }
    common::settle(&c, "the join of node 4");
    let counts = common::node_counts(&c);
    assert_eq!(counts.get(&4).map(|(s, _)| s.as_str()), Some("active"), "{counts:?}");
    // Node 4 holds no tenant, so its drain needs nothing from it while it is down.
    assert_eq!(counts[&4].1, 0, "node 4 owns a tenant: {counts:?}");
    // This is about a follower removed while it was down. A node that led when it stopped comes
    // back leading in its old term (openraft restores a committed vote) until it hears the newer
    // one: not this case. If an election on a loaded machine made node 4 the leader, it is
    // stopped and started again, and comes back a follower of the leader elected meanwhile.
    let leader = || {
        let (status, health) = common::admin(&c, reqwest::Method::GET, "/admin/health", None);
        (status == 200).then(|| health["raft"]["leader"].as_u64()).flatten()
    };
    if leader() == Some(4) {
        unsafe { libc::kill(node4.id() as i32, libc::SIGTERM) };
        assert_eq!(exit_code_within(&mut node4, STOP_LIMIT, "node 4 stopping"), Some(0));
        let deadline = Instant::now() + Duration::from_secs(30);
        while leader().is_none_or(|l| l == 4) {
            assert!(Instant::now() < deadline, "no leader but node 4");
            std::thread::sleep(Duration::from_millis(100));
        }
        node4 = start_node(&c, 4, port);
        // It starts in well under a second; then a heartbeat of the leader (every 250 ms)
        // makes it take the leader's term.
        std::thread::sleep(Duration::from_secs(2));
    }

    unsafe { libc::kill(node4.id() as i32, libc::SIGTERM) };
    assert_eq!(exit_code_within(&mut node4, STOP_LIMIT, "node 4 stopping"), Some(0));
    let (status, answer) = common::admin(&c, reqwest::Method::POST, "/admin/nodes/4/drain", None);
    assert_eq!(status, 200, "drain of node 4 while it is down: {answer}");
    common::settle(&c, "the drain of node 4");
    let (status, answer) = common::admin(&c, reqwest::Method::DELETE, "/admin/nodes/4", None);
    assert_eq!(status, 200, "removal of node 4 while it is down: {answer}");
    let before = leader_and_term(&c);

    let restarted = Instant::now();
    let mut node4 = start_node(&c, 4, port);
    let code = exit_code_within(&mut node4, STOP_LIMIT, "node 4, removed while it was down");
    eprintln!("node 4 exited {:?} after its start", restarted.elapsed());
    assert_eq!(code, Some(node::EXIT_REMOVED), "exit status of a node removed while it was down");
    let log = std::fs::read_to_string(c.dir.join("node-4.log")).unwrap();
    // A loaded machine may elect node 4 between the check above and its stop: it then comes back
    // leading in its old term, and learns of its removal as a leader does, not from gossip.
    let came_back_leading = log.contains("is_leader: true");
    assert!(
        log.contains("removed from the cluster while it was away")
            || (came_back_leading && log.contains("this node was removed from the cluster")),
        "the node says why it stopped: {log}"
    );
    if !came_back_leading {
        assert_eq!(leader_and_term(&c), before, "the registry's leader or term changed");
    }
    let (_, health) = common::admin(&c, reqwest::Method::GET, "/admin/health", None);
    let row = health["nodes"].as_array().unwrap().iter().find(|n| n["id"] == 4).cloned();
    assert!(
        row.as_ref().is_some_and(|n| n["state"] == "removed" && n["raft"] != "voter"),
        "node 4 in health: {health}"
    );
}
