//! `sq-cloud import` against a real cluster: an SQ data directory brought into a tenant, again
//! (idempotent, and repairing what changed), and refused whole when one file is not phext.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{get, http, DevCluster};

fn import(args: &[&str]) -> Output {
    Command::new(common::bin()).arg("import").args(args).output().expect("run sq-cloud import")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The tenant's copy of phext `p`, byte for byte.
fn remote(base: &str, key: &str, p: &str) -> Vec<u8> {
    let r = http().get(format!("{base}/get?p={p}")).bearer_auth(key).send().expect("GET get");
    assert_eq!(r.status().as_u16(), 200);
    r.bytes().expect("body").to_vec()
}

/// What the tenant must hold after importing `file`: its canonical bytes.
fn canonical(file: &Path) -> Vec<u8> {
    proto::Doc::parse(&std::fs::read(file).expect("read")).expect("valid phext").to_canonical()
}

/// An SQ data directory: a one-scroll note, a document using every dimension break, a larger
/// one, and a file that is not a phext (ignored).
fn data_dir(dir: &Path) {
    std::fs::write(dir.join("notes.phext"), "hello\nworld").unwrap();
    std::fs::write(
        dir.join("multi.phext"),
        b"a\x17b\x18c\x19d\x1ae\x1cf\x1dg\x1eh\x1fi\x01j\x17\x17k",
    )
    .unwrap();
    let big: Vec<String> = (0..150).map(|i| format!("scroll {i}: {}", "x".repeat(i))).collect();
    std::fs::write(dir.join("big doc.phext"), big.join("\x17")).unwrap();
    std::fs::write(dir.join("README.txt"), "not a phext").unwrap();
}

// Goal: an import lands every document byte for byte (checksums verified by the tool and here);
// a second run writes nothing; a run after the tenant's copy drifted puts it back; a directory
// with one non-UTF-8 file is refused naming that file, and nothing of any file is written.
#[test]
fn import_is_exact_idempotent_and_all_or_nothing() {
    let cluster = DevCluster::start(1);
    let base = cluster.url();
    let url = cluster.json["gateway_url"].as_str().unwrap().to_string();
    let key = cluster.add_tenant("imp", serde_json::json!({"tier": "team"}));
    let src = tempfile::tempdir().unwrap();
    data_dir(src.path());
    let dir = src.path().to_str().unwrap();

    let first = import(&["--url", &url, "--tenant", "imp", "--key", &key, dir]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(text(&first).contains("imported 3 phexts"), "{}", text(&first));
    for (p, file) in
        [("notes", "notes.phext"), ("multi", "multi.phext"), ("big%20doc", "big doc.phext")]
    {
        let want = canonical(&src.path().join(file));
        assert_eq!(remote(&base, &key, p), want, "{p}");
        assert_eq!(
            get(&base, &key, &format!("/checksum?p={p}")),
            (200, proto::doc::checksum(&want))
        );
    }
    assert_eq!(
        get(&base, &key, "/toc?p=multi").1.lines().count(),
        11,
        "every dimension's scroll is there"
    );

    let again = import(&["--url", &url, "--tenant", "imp", "--key", &key, dir]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("imported 0 phexts into tenant imp (3 unchanged)"),
        "{}",
        text(&again)
    );

    // The tenant's copy drifts: one scroll changed, one added. The import puts the file back.
    assert_eq!(get(&base, &key, "/update?p=multi&c=1.1.1/1.1.1/1.1.2&s=changed").0, 200);
    assert_eq!(get(&base, &key, "/update?p=multi&c=9.1.1/1.1.1/1.1.1&s=extra").0, 200);
    let repair = import(&["--url", &url, "--tenant", "imp", "--key", &key, dir]);
    assert!(repair.status.success(), "{}", text(&repair));
    assert!(text(&repair).contains("1 scrolls written, 1 emptied"), "{}", text(&repair));
    assert_eq!(remote(&base, &key, "multi"), canonical(&src.path().join("multi.phext")));

    // A bad file refuses the whole directory, before anything is sent.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(bad.path().join("a-fine.phext"), "fine").unwrap();
    std::fs::write(bad.path().join("broken.phext"), b"ok so far \xff\xfe then not").unwrap();
    let refused =
        import(&["--url", &url, "--tenant", "imp", "--key", &key, bad.path().to_str().unwrap()]);
    assert!(!refused.status.success());
    let message = text(&refused);
    assert!(message.contains("broken.phext") && message.contains("not valid phext"), "{message}");
    assert!(remote(&base, &key, "a-fine").is_empty(), "nothing of the directory was imported");
    assert!(remote(&base, &key, "broken").is_empty(), "nothing of the bad file was imported");

    // With --dev the demo tenant's key comes from dev.json.
    let demo = import(&["--dev", cluster.dir.to_str().unwrap(), "--tenant", "demo", dir]);
    assert!(demo.status.success(), "{}", text(&demo));
    assert_eq!(remote(&base, &cluster.demo_key(), "notes"), b"hello\nworld");
}
