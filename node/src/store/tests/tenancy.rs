//! Tenancy: quotas, isolation, unloading, memory limits, and refusing what must change nothing.

use super::super::{tenant::TENANT_MEMORY_OVERHEAD_BYTES, ManualClock};
use super::*;
use proto::{Coordinate, PhextName, SqRequest};

// Goal: a write that would cross the quota is refused with the exact numbers and changes
// nothing, not in memory and not on disk; shrinking and deleting stay allowed over quota.
#[test]
fn quota_refusal_leaves_state_unchanged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    assert_eq!(
        run(&store, "acme", 20, "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=0123456789", "").unwrap(),
        "Updated 10 bytes"
    );
    let doc_before = get(&store, "acme", "get?p=doc");
    let log_before: Vec<Vec<u8>> =
        segments(dir.path(), "acme").iter().map(|p| std::fs::read(p).unwrap()).collect();

    // Scroll 2 costs one break plus its text: 1 + 10 = 11 bytes, 10 are free.
    let refused = run(&store, "acme", 20, "update?p=doc&c=1.1.1/1.1.1/1.1.2&s=abcdefghij", "");
    assert!(
        matches!(
            refused,
            Err(StoreError::QuotaExceeded { needed_bytes: 11, free_bytes: 10, quota_bytes: 20 })
        ),
        "{refused:?}"
    );
    let refused = run(&store, "acme", 20, "insert?p=other&c=1.1.1/1.1.1/1.1.1&s=abcdefghijk", "");
    assert!(matches!(refused, Err(StoreError::QuotaExceeded { .. })), "{refused:?}");
    assert_eq!(get(&store, "acme", "get?p=doc"), doc_before);
    assert_eq!(get(&store, "acme", "get?p=other"), "");
    assert_eq!(store.storage_bytes("acme").unwrap(), 10);
    let log_after: Vec<Vec<u8>> =
        segments(dir.path(), "acme").iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(log_before, log_after, "nothing was logged");

    // Over a lowered quota, shrinking and deleting still work; growing does not.
    assert!(run(&store, "acme", 5, "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=01234567890", "").is_err());
    assert_eq!(
        run(&store, "acme", 5, "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=0123", "").unwrap(),
        "Updated 4 bytes"
    );
    assert_eq!(
        run(&store, "acme", 5, "delete?p=doc&c=1.1.1/1.1.1/1.1.1", "").unwrap(),
        "Removed 4 bytes"
    );
    assert_eq!(store.storage_bytes("acme").unwrap(), 0);
}

// Goal: concurrent writers on different phexts of one tenant never overshoot its quota
// together, and the usage count equals the documents' real size afterwards.
#[test]
fn concurrent_writes_never_overshoot_quota() {
    const QUOTA: u64 = 1000;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    std::thread::scope(|scope| {
        for t in 0..4 {
            let store = &store;
            scope.spawn(move || {
                for i in 1..=100 {
                    let path = format!("insert?p=p{t}&c=1.1.1/1.1.1/1.1.{i}&s=0123456789");
                    match run(store, "acme", QUOTA, &path, "") {
                        Ok(_) | Err(StoreError::QuotaExceeded { .. }) => {}
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            });
        }
    });
    let real: usize = (0..4).map(|t| get(&store, "acme", &format!("get?p=p{t}")).len()).sum();
    let used = store.storage_bytes("acme").unwrap();
    assert_eq!(used, real as u64);
    assert!(used <= QUOTA, "{used} bytes over a quota of {QUOTA}");
    assert!(used > QUOTA - 11, "the quota was filled, not refused early: {used}");
}

// Goal: two tenants writing the same phext and coordinate each see only their own data, in
// separate directories.
#[test]
fn tenants_are_isolated() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    get(&store, "one", "update?p=notes&c=1.1.1/1.1.1/1.1.1&s=mine");
    get(&store, "two", "update?p=notes&c=1.1.1/1.1.1/1.1.1&s=yours");
    get(&store, "two", "insert?p=notes&c=1.1.1/1.1.1/1.1.2&s=more");
    assert_eq!(get(&store, "one", "select?p=notes&c=1.1.1/1.1.1/1.1.1"), "mine");
    assert_eq!(get(&store, "one", "select?p=notes&c=1.1.1/1.1.1/1.1.2"), "");
    assert_eq!(get(&store, "two", "select?p=notes&c=1.1.1/1.1.1/1.1.1"), "yours");
    assert_eq!(store.storage_bytes("one").unwrap(), 4);
    assert_eq!(store.storage_bytes("two").unwrap(), 5 + 1 + 4);
    store.flush_all().unwrap();
    assert_eq!(std::fs::read(phexts_dir(dir.path(), "one").join("notes.phext")).unwrap(), b"mine");
    assert_eq!(
        std::fs::read(phexts_dir(dir.path(), "two").join("notes.phext")).unwrap(),
        b"yours\x17more"
    );
}

// Goal: idle tenants are unloaded (checkpointed, log emptied) while busy ones stay, their usage
// is still known unloaded, and reloading gives back every byte.
#[test]
fn idle_unload_and_reload_keep_data() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(1_000));
    let config = config(dir.path());
    let idle_ms = config.idle_unload_after.as_millis() as u64;
    let store = open_with(config, Arc::new(RealVfs), clock.clone());
    get(&store, "idle", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=sleepy");
    get(&store, "idle", "insert?p=doc&c=1.1.1/1.1.1/1.1.1&s=+head");
    get(&store, "busy", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=awake");
    clock.advance_ms(idle_ms + 1);
    get(&store, "busy", "select?p=doc&c=1.1.1/1.1.1/1.1.1");
    assert_eq!(store.unload_idle(), 1);
    assert_eq!(store.loaded_tenants(), vec!["busy".to_string()]);
    assert!(segments(dir.path(), "idle").is_empty(), "unloading checkpoints");
    assert_eq!(
        std::fs::read(phexts_dir(dir.path(), "idle").join("doc.phext")).unwrap(),
        b"sleepy head"
    );
    assert_eq!(store.storage_bytes("idle").unwrap(), 11);
    assert_eq!(
        store.loaded_tenants(),
        vec!["busy".to_string()],
        "usage of an unloaded tenant loads nothing"
    );
    assert_eq!(get(&store, "idle", "select?p=doc&c=1.1.1/1.1.1/1.1.1"), "sleepy head");
    assert_eq!(store.loaded_tenants(), vec!["busy".to_string(), "idle".to_string()]);
}

// Goal: past the memory budget or the loaded-tenant cap, least recently used tenants are
// unloaded, the store stays within its limits, and no data is lost.
#[test]
fn limits_unload_least_recently_used() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(0));
    let config = StoreConfig {
        memory_budget_bytes: 6 * TENANT_MEMORY_OVERHEAD_BYTES,
        loaded_tenants_max: 100,
        ..config(dir.path())
    };
    let store = open_with(config.clone(), Arc::new(RealVfs), clock.clone());
    for i in 0..20 {
        clock.advance_ms(1);
        get(&store, &format!("t{i}"), &format!("update?p=doc&c=1.1.1/1.1.1/1.1.1&s=tenant{i}"));
        assert!(store.memory_bytes() <= config.memory_budget_bytes, "over budget after tenant {i}");
    }
    let loaded = store.loaded_tenants();
    assert!(
        loaded.contains(&"t19".to_string()) && !loaded.contains(&"t0".to_string()),
        "{loaded:?}"
    );
    for i in 0..20 {
        assert_eq!(
            get(&store, &format!("t{i}"), "select?p=doc&c=1.1.1/1.1.1/1.1.1"),
            format!("tenant{i}")
        );
    }

    drop(store);
    let capped = StoreConfig { loaded_tenants_max: 3, ..config };
    let store = open_with(capped, Arc::new(RealVfs), clock);
    for i in 0..20 {
        get(&store, &format!("t{i}"), "select?p=doc&c=1.1.1/1.1.1/1.1.1");
        assert!(store.loaded_tenants().len() <= 3);
    }
}

// Goal: reads of tenants and phexts that do not exist answer like empty documents and create no
// file or directory; so do writes that change nothing.
#[test]
fn reads_and_no_op_writes_create_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let empty = tree(dir.path());
    assert_eq!(empty, vec!["tenants".to_string()]);
    assert_eq!(get(&store, "ghost", "select?p=doc&c=1.1.1/1.1.1/1.1.1"), "");
    assert_eq!(get(&store, "ghost", "toc?p=doc"), "* 1.1.1/1.1.1/1.1.1: \n");
    assert_eq!(get(&store, "ghost", "get?p=doc"), "");
    assert_eq!(get(&store, "ghost", "checksum?p=doc"), "99aa06d3014798d86001c324468d497f");
    assert_eq!(
        get(&store, "ghost", "query?p=doc&set=1.1.1/1.1.1/1.1.1"),
        r#"[{"coordinate":"1.1.1/1.1.1/1.1.1","scroll":""}]"#
    );
    assert_eq!(get(&store, "ghost", "delete?p=doc&c=1.1.1/1.1.1/1.1.1"), "Removed 0 bytes");
    assert_eq!(get(&store, "ghost", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s="), "Updated 0 bytes");
    assert_eq!(get(&store, "ghost", "insert?p=doc&c=1.1.1/1.1.1/1.1.1&s="), "Inserted 0 bytes");
    assert_eq!(get(&store, "ghost", "version"), proto::request::SQ_API_VERSION);
    assert_eq!(store.storage_bytes("nobody").unwrap(), 0);
    store.flush_all().unwrap();
    assert_eq!(store.unload_idle(), 0);
    assert_eq!(tree(dir.path()), empty);
    get(&store, "real", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=x");
    assert_eq!(get(&store, "real", "select?p=missing&c=1.1.1/1.1.1/1.1.1"), "");
    store.flush_all().unwrap();
    assert!(!phexts_dir(dir.path(), "real").join("missing.phext").exists());
}

// Goal: a bad tenant id, or a request that could not come from the parser (built by serde on
// the wire without its checks), is refused and creates nothing.
#[test]
fn invalid_tenants_and_requests_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let ok = SqRequest::Get { p: PhextName::parse("doc").unwrap() };
    for bad in ["", "-a", "A", "a/b", "..", "a_b", "é", &"a".repeat(64)] {
        assert!(
            matches!(store.execute(bad, NO_QUOTA, &ok), Err(StoreError::InvalidTenant(_))),
            "{bad:?}"
        );
        assert!(matches!(store.storage_bytes(bad), Err(StoreError::InvalidTenant(_))), "{bad:?}");
    }
    assert!(store.execute(&"a".repeat(63), NO_QUOTA, &ok).is_ok());
    // Names and coordinates re-check themselves when decoded, so these never reach the store.
    assert!(serde_json::from_str::<PhextName>("\"../../etc/passwd\"").is_err());
    assert!(serde_json::from_str::<Coordinate>("[0,1,1,1,1,1,1,1,1]").is_err());
    let good_c = Coordinate::ORIGIN;
    let doc = PhextName::parse("doc").unwrap();
    // Text is checked by the store itself: a scroll with dimension breaks is refused.
    let bad_requests = [
        SqRequest::Insert { p: doc.clone(), c: good_c, text: "a\u{17}b".into() },
        SqRequest::Update { p: doc.clone(), c: good_c, text: "\u{1}".into() },
    ];
    for request in &bad_requests {
        let result = store.execute("acme", NO_QUOTA, request);
        assert!(matches!(result, Err(StoreError::InvalidRequest(_))), "{request:?}: {result:?}");
    }
    assert_eq!(tree(dir.path()), vec!["tenants".to_string()]);
}
