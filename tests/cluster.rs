//! Black-box tests of a whole cluster: `sq-cloud dev` with real node and gateway processes on
//! loopback, driven over HTTP as tenants and operators drive it.

mod common;

use std::time::{Duration, Instant};

use common::{get, http, run_conformance, tool_present, DevCluster};

fn cases() -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/conformance-public.json"
        ))
        .unwrap(),
    )
    .unwrap()
}

// Goal: every public SQ conformance case passes through gateway → QUIC → node, with a fresh
// tenant; and the shared sqconf.py runner agrees (it needs python3: under CI=true its absence
// fails the test).
#[test]
fn conformance_isolation_and_keys() {
    let cluster = DevCluster::start(3);
    let base = cluster.url();
    // Each node says so (`sq_node_reads_ready`) once it holds its lease; a read sent to one that
    // does not yet is answered 503.
    assert!(cluster.reads_ready, "every node holds its lease once dev says the cluster is up");

    let key = cluster.add_tenant("conf", serde_json::json!({}));
    let (passed, failures) = run_conformance(&base, &key, &cases());
    assert!(failures.is_empty(), "{} passed, failures:\n{}", passed, failures.join("\n"));
    assert!(passed > 60, "only {passed} steps ran");

    let sqconf = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/sq-api/sqconf.py");
    let present = std::path::Path::new(sqconf).exists()
        && std::process::Command::new("python3").arg("--version").output().is_ok();
    let install =
        "python3 from apt-get, as .ci/run does, and ../shared/sq-api/sqconf.py beside the repo";
    if tool_present("python3 with sqconf.py", present, install) {
        let key2 = cluster.add_tenant("conf-py", serde_json::json!({}));
        let fixture =
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/conformance-public.json");
        let out = std::process::Command::new("python3")
            .args([sqconf, "check", &base, &key2, fixture])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "sqconf.py failed:\n{text}");
        assert!(text.contains(" passed, 0 failed"), "{text}");
    }

    // Isolation: two tenants write the same p and c; each reads only its own.
    let a = cluster.add_tenant("iso-a", serde_json::json!({}));
    let b = cluster.add_tenant("iso-b", serde_json::json!({}));
    assert_eq!(
        get(&base, &a, "/update?p=same&c=1.1.1/1.1.1/1.1.1&s=from-a"),
        (200, "Updated 6 bytes".into())
    );
    assert_eq!(
        get(&base, &b, "/update?p=same&c=1.1.1/1.1.1/1.1.1&s=from-b"),
        (200, "Updated 6 bytes".into())
    );
    assert_eq!(get(&base, &a, "/select?p=same&c=1.1.1/1.1.1/1.1.1"), (200, "from-a".into()));
    assert_eq!(get(&base, &b, "/select?p=same&c=1.1.1/1.1.1/1.1.1"), (200, "from-b".into()));
    // Whatever a tenant names, it never reaches the other's files.
    for p in ["../iso-b/same", "..%2Fiso-b%2Fsame", "iso-b/same", "%2E%2E", "/same"] {
        let (status, body) = get(&base, &a, &format!("/select?p={p}&c=1.1.1/1.1.1/1.1.1"));
        assert!(!body.contains("from-b"), "{p}: {status} {body}");
        assert_eq!(status, 403, "{p}");
    }
    // Extra headers naming the other tenant change nothing.
    let r = http()
        .get(format!("{base}/get?p=same"))
        .bearer_auth(&a)
        .header("X-SQ-API-Key", &b)
        .header("X-Tenant", "iso-b")
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), "from-a");

    // A tenant key on admin routes is refused; no key at all is 401.
    for path in ["/admin/tenants", "/admin/health", "/metrics", "/admin/tenants/iso-b/stats"] {
        let (status, _) = get(&base, &a, path);
        assert!(status == 401 || status == 403, "{path}: {status}");
        let r = http().get(format!("{base}{path}")).send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path}");
    }

    // Rotation: the old key is refused at once by this gateway, the new key works.
    let r = http()
        .post(format!("{base}/admin/tenants/iso-a/rotate-key"))
        .bearer_auth(cluster.admin_key())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let rotated: serde_json::Value = r.json().unwrap();
    let new_key = rotated["api_key"].as_str().unwrap().to_string();
    let rotated_at = Instant::now();
    let mut old_refused_after = None;
    while rotated_at.elapsed() < Duration::from_secs(1) {
        if get(&base, &a, "/select?p=same&c=1.1.1/1.1.1/1.1.1").0 == 401 {
            old_refused_after = Some(rotated_at.elapsed());
            break;
        }
    }
    assert!(old_refused_after.is_some(), "the rotated key still worked 1 s after rotation");
    assert_eq!(get(&base, &new_key, "/select?p=same&c=1.1.1/1.1.1/1.1.1"), (200, "from-a".into()));
}

// Goal: stopping `sq-cloud dev` and starting it again on the same directory keeps every tenant
// and every document byte for byte.
#[test]
fn restart_keeps_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_tcp_port());
    let mut cluster = DevCluster::start_in(tmp.path(), 3, &listen);
    let base = cluster.url();
    let mut tenants = Vec::new();
    for i in 0..6 {
        let key = cluster.add_tenant(&format!("keep-{i}"), serde_json::json!({}));
        for s in 1..=5 {
            let (status, body) =
                get(&base, &key, &format!("/update?p=doc&c=1.1.1/1.1.1/1.1.{s}&s=t{i}-s{s}"));
            assert_eq!(status, 200, "{body}");
        }
        let doc = get(&base, &key, "/get?p=doc").1;
        tenants.push((key, doc));
    }
    let demo = cluster.demo_key();
    assert_eq!(get(&base, &demo, "/insert?p=hello&c=1.1.1/1.1.1/1.1.1&s=world").0, 200);
    cluster.stop();
    drop(cluster);

    let cluster = DevCluster::start_in(tmp.path(), 3, &listen);
    assert_eq!(cluster.demo_key(), demo, "the demo key changed across a restart");
    for (key, doc) in &tenants {
        assert_eq!(&get(&base, key, "/get?p=doc").1, doc);
    }
    assert_eq!(get(&base, &demo, "/select?p=hello&c=1.1.1/1.1.1/1.1.1"), (200, "world".into()));
}
