//! Black-box: a node's whole life through `sq-cloud admin nodes`: added (a learner, then an
//! active voter), drained (until no handoff is pending), removed. The removed node learns it,
//! stops by itself with the exit status the systemd unit does not restart, and the gateway stops
//! asking it anything: it leaves `/api/v2/metrics`. Every tenant keeps its data throughout.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, free_udp_port, get, start_node, DevCluster};

/// How long a removed node may take to notice and stop.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// `sq-cloud admin --dev DIR ARGS`; returns success, stdout and stderr.
fn admin_cli(c: &DevCluster, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(["admin", "--dev", c.dir.to_str().unwrap()])
        .args(args)
        .env_remove("SQ_CLOUD_URL")
        .env_remove("SQ_CLOUD_ADMIN_KEY")
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

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
