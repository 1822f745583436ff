//! Black-box: the declarative tenants file, given to `sq-cloud dev --tenants-file`.

mod common;
mod ops_common;

use std::path::Path;
use std::time::Duration;

use common::{free_tcp_port, get, DevCluster};
use ops_common::{admin, node_log_lines, wait_for};

/// PRODUCT.md §2: a change to the file is applied to the registry within 5 s.
const APPLY_BOUND: Duration = Duration::from_secs(5);

/// How long the first application after the cluster starts may take (a leader must be elected).
const FIRST_APPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a refused file may take to show its log line.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The line the watcher logs when it refuses a file.
const REFUSED_LINE: &str = "tenants file refused; registry unchanged";

const KEY_A: &str = "pmb-v1-0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";
const KEY_B: &str = "pmb-v1-0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";
const KEY_C: &str = "pmb-v1-0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c";

/// Replaces the file at once (temp file and rename), as an operator's deploy tool would, so the
/// watcher never reads half a file.
fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn works(base: &str, key: &str) -> Option<()> {
    (get(base, key, "/update?p=doc&c=1.1.1/1.1.1/1.1.1&s=hi").0 == 200).then_some(())
}

// Goal: a tenant added to the tenants file works within 5 s; a malformed file (broken JSON, or
// valid JSON listing a tenant twice) is refused with its log line and leaves the registry as it
// was, and a good file after it is applied again.
#[test]
fn tenants_file_applies_within_5s_and_refuses_malformed() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tenants.json");
    let a = format!(r#"{{"id": "file-a", "api_key": "{KEY_A}", "quota_mb": 5, "enabled": true}}"#);
    let b = format!(
        r#"{{"id": "file-b", "api_key": "{KEY_B}", "quota_mb": 7, "enabled": true, "tier": "pro"}}"#
    );
    let c = format!(r#"{{"id": "file-c", "api_key": "{KEY_C}", "quota_mb": 9}}"#);
    write_file(&file, &format!(r#"{{"tenants": [{a}]}}"#));
    let dir = tmp.path().join("cluster");
    std::fs::create_dir_all(&dir).unwrap();
    let listen = format!("127.0.0.1:{}", free_tcp_port());
    let cluster =
        DevCluster::start_with(&dir, 3, &listen, &["--tenants-file", file.to_str().unwrap()]);
    let base = cluster.url();
    wait_for(FIRST_APPLY_TIMEOUT, "the key of file-a works", || works(&base, KEY_A));

    write_file(&file, &format!(r#"{{"tenants": [{a}, {b}]}}"#));
    let (_, took) = wait_for(APPLY_BOUND * 3, "the key of file-b works", || works(&base, KEY_B));
    eprintln!("a tenant added to the file worked after {took:?}");
    assert!(took <= APPLY_BOUND, "file-b worked only after {took:?}");
    let (_, listed) = admin(&cluster, "GET", "/admin/tenants/file-b", None);
    assert_eq!(
        (listed["quota_mb"].as_u64(), listed["tier"].as_str()),
        (Some(7), Some("pro")),
        "{listed}"
    );
    let (_, before) = admin(&cluster, "GET", "/admin/tenants", None);

    // Valid JSON, but file-a twice: refused whole, so neither file-c nor file-b's new quota lands.
    let b_bigger = b.replace("\"quota_mb\": 7", "\"quota_mb\": 70");
    let malformed = [
        format!(r#"{{"tenants": [{a}, {b_bigger}, {c}, {a}]}}"#),
        format!(r#"{{"tenants": [{a}, {b}, {c}"#),
    ];
    for text in malformed {
        let refusals = node_log_lines(&dir, REFUSED_LINE);
        write_file(&file, &text);
        wait_for(REFUSAL_TIMEOUT, "the malformed file is refused in the log", || {
            (node_log_lines(&dir, REFUSED_LINE) > refusals).then_some(())
        });
        assert_eq!(
            admin(&cluster, "GET", "/admin/tenants", None).1,
            before,
            "a refused file changed the registry"
        );
        assert_eq!(
            get(&base, KEY_C, "/select?p=doc&c=1.1.1/1.1.1/1.1.1").0,
            401,
            "file-c came from a refused file"
        );
        assert!(works(&base, KEY_A).is_some() && works(&base, KEY_B).is_some());
    }

    write_file(&file, &format!(r#"{{"tenants": [{a}, {b}, {c}]}}"#));
    let (_, took) = wait_for(APPLY_BOUND * 3, "the key of file-c works", || works(&base, KEY_C));
    assert!(took <= APPLY_BOUND, "file-c worked only after {took:?}");
}

// Goal: the registry exported in phext form (`sq-cloud admin tenants export --phext`) holds key
// hashes and no key, and given to another cluster as its tenants file it makes the same keys work
// there: the phext form round-trips through the real binary.
#[test]
fn phext_export_is_a_tenants_file() {
    let source = DevCluster::start(1);
    let key = source.add_tenant("phx", serde_json::json!({ "tier": "pro", "quota_mb": 3 }));
    // Archived tenants are not exported; the other cluster makes a demo tenant of its own.
    let (status, _) = admin(&source, "DELETE", "/admin/tenants/demo", None);
    assert_eq!(status, 200);
    let out = std::process::Command::new(common::bin())
        .args(["admin", "--dev", source.dir.to_str().unwrap(), "tenants", "export", "--phext"])
        .env_remove("SQ_CLOUD_URL")
        .env_remove("SQ_CLOUD_ADMIN_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.contains(&key) && !text.contains(&source.demo_key()), "no key in:\n{text}");
    assert!(text.contains(&proto::auth::key_hash(&key)), "the key's hash is in:\n{text}");
    assert!(text.contains('\u{17}'), "one scroll per tenant:\n{text}");

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tenants.phext");
    write_file(&file, &text);
    let dir = tmp.path().join("cluster");
    std::fs::create_dir_all(&dir).unwrap();
    let listen = format!("127.0.0.1:{}", free_tcp_port());
    let target =
        DevCluster::start_with(&dir, 1, &listen, &["--tenants-file", file.to_str().unwrap()]);
    let base = target.url();
    wait_for(FIRST_APPLY_TIMEOUT, "the exported key works on the other cluster", || {
        works(&base, &key)
    });
    let (status, tenant) = admin(&target, "GET", "/admin/tenants/phx", None);
    assert_eq!(status, 200, "{tenant}");
    assert_eq!((tenant["tier"].as_str(), tenant["quota_mb"].as_u64()), (Some("pro"), Some(3)));
}
