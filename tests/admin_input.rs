//! Black-box: the admin API checks its input before anything reaches the registry. A join is
//! refused up front when its address does not parse or nobody answers there as the named node,
//! and the registry is left exactly as it was; bodies that are no JSON object, over-long e-mails
//! and unknown tenants get answers that say what was wrong.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{admin, free_udp_port, start_node, DevCluster};
use reqwest::Method;

/// The registry as the admin API shows it: every node with its state and part in Raft.
fn membership(c: &DevCluster) -> Vec<(u64, String, String)> {
    let (status, nodes) = admin(c, Method::GET, "/admin/nodes", None);
    assert_eq!(status, 200, "{nodes}");
    nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let field = |k: &str| n[k].as_str().unwrap_or_default().to_string();
            (n["id"].as_u64().unwrap(), field("state"), field("raft"))
        })
        .collect()
}

fn join(c: &DevCluster, id: u64, addr: &str) -> (u16, serde_json::Value, Duration) {
    let started = Instant::now();
    let (status, body) =
        admin(c, Method::POST, "/admin/nodes", Some(serde_json::json!({"id": id, "addr": addr})));
    (status, body, started.elapsed())
}

// Goal: a join with an unparseable address is a 400 in under 1 s, one with an address where no
// node answers (or where another node id answers) is a 409 that says so; none of them changes the
// registry, and the next valid join proceeds at once and makes the node an active voter.
#[test]
fn a_join_is_checked_before_anything_is_recorded() {
    let c = DevCluster::start(3);
    let before = membership(&c);
    assert_eq!(before.len(), 3, "{before:?}");
    assert!(
        before.iter().all(|(_, state, raft)| state == "active" && raft == "voter"),
        "{before:?}"
    );

    let (status, body, took) = join(&c, 11, "not-an-addr");
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("not-an-addr"), "the answer names the address: {body}");
    assert!(took < Duration::from_secs(1), "a bad address took {took:?}");
    assert_eq!(membership(&c), before);

    let silent = format!("127.0.0.1:{}", free_udp_port());
    let (status, body, took) = join(&c, 12, &silent);
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("not reachable"), "{body}");
    eprintln!("join of a silent address refused in {took:?}");
    assert_eq!(membership(&c), before);

    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let mut node4 = start_node(&c, 4, port);
    // Node 4 answers there, but not as node 5. It may take a moment to start listening.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body, _) = join(&c, 5, &addr);
        assert_eq!(status, 409, "{body}");
        if body.to_string().contains("runs as node 4") {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never answered: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(membership(&c), before);

    let (status, body, took) = join(&c, 4, &addr);
    assert_eq!(status, 200, "{body}");
    eprintln!("valid join answered in {took:?}");
    let after = membership(&c);
    assert!(after.contains(&(4, "active".into(), "voter".into())), "{after:?}");
    let _ = node4.kill();
    let _ = node4.wait();
}

// Goal: admin bodies must be JSON objects (an array of the fields in order is refused), an
// admin_email over 254 bytes is a 400, an unknown tenant's 404 names it, and dev.json, which
// holds the admin key, is readable by its owner only.
#[test]
fn admin_input_errors_say_what_is_wrong() {
    let c = DevCluster::start(1);
    let (status, body) =
        admin(&c, Method::POST, "/admin/tenants/add", Some(serde_json::json!(["t-array"])));
    assert_eq!(status, 400, "{body}");
    let (status, body) = admin(
        &c,
        Method::POST,
        "/admin/tenants/add",
        Some(serde_json::json!({"tenant_id": "t-mail", "admin_email": "a".repeat(255)})),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = admin(&c, Method::POST, "/admin/tenants/nosuchtenant/rotate-key", None);
    assert_eq!(status, 404, "{body}");
    assert!(body.to_string().contains("nosuchtenant"), "{body}");
    let (status, list) = admin(&c, Method::GET, "/admin/tenants", None);
    assert_eq!(status, 200);
    let ids: Vec<_> = list.as_array().unwrap().iter().map(|t| t["tenant_id"].clone()).collect();
    assert!(!ids.contains(&"t-array".into()) && !ids.contains(&"t-mail".into()), "{ids:?}");
    let mode = std::fs::metadata(c.dir.join("dev.json")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "dev.json mode {:o}", mode & 0o777);
}
