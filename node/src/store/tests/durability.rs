//! Durability: group commit, torn tails, checkpoints interrupted by a crash.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;

use super::*;

// Goal: many threads writing to one tenant at once are all acknowledged, and after a crash
// (drop without flush) and reopen every acknowledged write is there, byte for byte.
#[test]
fn group_commit_concurrent_writers_all_survive() {
    const THREADS: usize = 8;
    const WRITES_PER_THREAD: usize = 40;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let finals: BTreeMap<String, String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = &store;
                scope.spawn(move || {
                    let p = if t % 2 == 0 { "even" } else { "odd" };
                    let mut expected = BTreeMap::new();
                    for i in 0..WRITES_PER_THREAD {
                        let c = format!("1.1.1/1.1.{}/1.1.{}", t + 1, i % 3 + 1);
                        let key = format!("{p} {c}");
                        let text = format!("t{t}w{i}");
                        let scroll: &mut String = expected.entry(key).or_default();
                        if i % 4 == 0 {
                            get(store, "acme", &format!("insert?p={p}&c={c}&s={text}"));
                            scroll.push_str(&text);
                        } else {
                            get(store, "acme", &format!("update?p={p}&c={c}&s={text}"));
                            *scroll = text;
                        }
                    }
                    expected
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("writer thread")).collect()
    });
    let docs_before: Vec<String> =
        ["even", "odd"].iter().map(|p| get(&store, "acme", &format!("get?p={p}"))).collect();
    drop(store);
    let store = open(dir.path());
    for (key, text) in &finals {
        let (p, c) = key.split_once(' ').expect("key has a space");
        assert_eq!(&get(&store, "acme", &format!("select?p={p}&c={c}")), text, "{key}");
    }
    let docs_after: Vec<String> =
        ["even", "odd"].iter().map(|p| get(&store, "acme", &format!("get?p={p}"))).collect();
    assert_eq!(docs_before, docs_after);
    assert_eq!(finals.len(), THREADS * 3);
}

// Goal: a torn record at the end of the log (a partial frame, garbage with a wrong checksum, or
// a zero-filled tail) is cut off on reopen; every earlier record is intact, the segment is back
// to its last whole record, and writing goes on from there across further reopens.
#[test]
fn torn_tail_is_cut_and_earlier_records_survive() {
    let tails: Vec<(&str, Vec<u8>)> = vec![
        ("partial frame", Vec::new()), // filled below with a prefix of a real record
        (
            "bad checksum",
            [&100u32.to_le_bytes()[..], &7u32.to_le_bytes()[..], &[b'x'; 100][..]].concat(),
        ),
        ("zero fill", vec![0; 4096]),
        ("short header", vec![9, 0, 0]),
    ];
    for (what, mut tail) in tails {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(dir.path());
        for i in 1..=5 {
            get(&store, "acme", &format!("update?p=doc&c=1.1.1/1.1.1/1.1.{i}&s=v{i}"));
        }
        get(&store, "acme", "insert?p=doc&c=1.1.1/1.1.1/1.1.1&s=+more");
        drop(store);
        let segs = segments(dir.path(), "acme");
        assert_eq!(segs.len(), 1, "{what}");
        let whole = std::fs::read(&segs[0]).expect("segment");
        if tail.is_empty() {
            tail = whole[..whole.len().min(20)].to_vec();
        }
        OpenOptions::new()
            .append(true)
            .open(&segs[0])
            .and_then(|mut f| f.write_all(&tail))
            .expect("append tail");

        let store = open(dir.path());
        assert_eq!(get(&store, "acme", "select?p=doc&c=1.1.1/1.1.1/1.1.1"), "v1 more", "{what}");
        for i in 2..=5 {
            assert_eq!(
                get(&store, "acme", &format!("select?p=doc&c=1.1.1/1.1.1/1.1.{i}")),
                format!("v{i}"),
                "{what}"
            );
        }
        assert_eq!(
            std::fs::read(&segs[0]).expect("segment"),
            whole,
            "{what}: the torn tail is cut"
        );
        get(&store, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.9&s=after");
        drop(store);
        let store = open(dir.path());
        assert_eq!(get(&store, "acme", "select?p=doc&c=1.1.1/1.1.1/1.1.9"), "after", "{what}");
        assert_eq!(get(&store, "acme", "select?p=doc&c=1.1.1/1.1.1/1.1.3"), "v3", "{what}");
    }
}

/// Inserts and updates whose replay over a newer state would show if records were not
/// idempotent: appends to one scroll, replaced and appended again.
fn write_history(store: &Store, round: u32) {
    get(store, "acme", &format!("insert?p=a&c=1.1.1/1.1.1/1.1.1&s=r{round}x"));
    get(store, "acme", &format!("insert?p=a&c=1.1.1/1.1.1/1.1.1&s=r{round}y"));
    get(store, "acme", &format!("update?p=a&c=1.1.1/1.1.1/1.1.2&s=r{round}u"));
    get(store, "acme", &format!("insert?p=a&c=1.1.1/1.1.1/1.1.2&s=r{round}z"));
    get(store, "acme", &format!("update?p=b&c=2.1.1/1.1.1/1.1.1&s=r{round}b"));
    get(store, "acme", "delete?p=b&c=1.1.1/1.1.1/1.1.1");
    get(store, "acme", &format!("insert?p=b&c=1.1.1/1.1.1/1.1.1&s=r{round}d"));
}

fn snapshot(store: &Store) -> Vec<String> {
    ["a", "b"].iter().map(|p| get(store, "acme", &format!("get?p={p}"))).collect()
}

// Goal: a crash in the middle of a checkpoint loses nothing and duplicates nothing. The state
// such a crash leaves (new phext files written, old log segments not yet deleted, a temp file of
// a phext not yet renamed) reopens to exactly the state before the checkpoint, the temp file is
// cleaned up, and later writes and checkpoints carry on normally.
#[test]
fn crash_mid_checkpoint_gives_the_right_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    write_history(&store, 1);
    store.flush_all().expect("checkpoint");
    write_history(&store, 2);
    let expected = snapshot(&store);
    let old_segments: Vec<(PathBuf, Vec<u8>)> = segments(dir.path(), "acme")
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).expect("segment")))
        .collect();
    assert!(!old_segments.is_empty());
    store.flush_all().expect("checkpoint");
    assert!(segments(dir.path(), "acme").is_empty(), "a checkpoint empties the log");
    drop(store);

    // Put the crash back: old segments still there, plus a half-written temp file.
    for (path, bytes) in &old_segments {
        std::fs::write(path, bytes).expect("restore segment");
    }
    let temp = phexts_dir(dir.path(), "acme").join("a.phext.tmp");
    std::fs::write(&temp, b"half a checkpoi").expect("temp file");

    let store = open(dir.path());
    assert_eq!(snapshot(&store), expected, "replaying the old log over new files changes nothing");
    assert!(!temp.exists(), "the stale temp file is removed");
    write_history(&store, 3);
    let expected = snapshot(&store);
    drop(store);
    let store = open(dir.path());
    assert_eq!(snapshot(&store), expected);
    store.flush_all().expect("checkpoint");
    drop(store);
    assert_eq!(snapshot(&open(dir.path())), expected);
}

// Goal: a log that grows past `checkpoint_wal_bytes` is checkpointed by the write that crosses
// it: the phext file appears, old segments go, and the state survives a crash and reopen.
#[test]
fn checkpoint_runs_when_the_log_is_long() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = StoreConfig { checkpoint_wal_bytes: 2048, ..config(dir.path()) };
    let store = open_with(config.clone(), Arc::new(RealVfs), Arc::new(ManualClock::new(0)));
    let big = "x".repeat(700);
    for i in 1..=10 {
        post(&store, "acme", &format!("update?p=doc&c=1.1.1/1.1.1/1.1.{i}"), &format!("{i}{big}"));
    }
    let expected = get(&store, "acme", "get?p=doc");
    assert!(
        phexts_dir(dir.path(), "acme").join("doc.phext").exists(),
        "a checkpoint wrote the phext"
    );
    let log_bytes: u64 =
        segments(dir.path(), "acme").iter().map(|p| p.metadata().expect("meta").len()).sum();
    assert!(log_bytes <= 2048 + 1024, "the log stays near its threshold, not {log_bytes} bytes");
    drop(store);
    let store = open_with(config, Arc::new(RealVfs), Arc::new(ManualClock::new(0)));
    assert_eq!(get(&store, "acme", "get?p=doc"), expected);
}

// Goal: a clean stop folds every tenant's log, including one that is not loaded (a crash left
// its log, and no request loaded it since): afterwards no segment is left and its data reads the
// same; a loaded tenant's log is folded too, and a tenant without a log is not touched.
#[test]
fn clean_stop_folds_the_logs_of_tenants_not_loaded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    get(&store, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.2&s=kept");
    get(&store, "beta", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=beta");
    drop(store); // a crash: both logs stay
    let store = open(dir.path());
    get(&store, "beta", "update?p=doc&c=1.1.1/1.1.1/1.1.3&s=more");
    assert!(!segments(dir.path(), "acme").is_empty(), "the crash left acme's log");
    store.flush_all().expect("clean stop");
    assert_eq!(segments(dir.path(), "acme"), Vec::<PathBuf>::new(), "acme's log is folded");
    assert_eq!(segments(dir.path(), "beta"), Vec::<PathBuf>::new(), "beta's log is folded");
    assert_eq!(store.loaded_tenants(), vec!["beta".to_string()], "acme is unloaded again");
    drop(store);
    let store = open(dir.path());
    assert_eq!(get(&store, "acme", "select?p=doc&c=1.1.1/1.1.1/1.1.2"), "kept");
    assert_eq!(get(&store, "beta", "select?p=doc&c=1.1.1/1.1.1/1.1.3"), "more");
}

// Goal: lsns never restart. After a checkpoint deleted every segment, the log continues from
// where it stopped, across reopens: the next segment is named for the next lsn, not for 1
// (replicas compare logs by lsn, so an lsn must name one record for the tenant's whole life).
#[test]
fn lsns_continue_after_a_checkpoint_empties_the_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    for i in 1..=3 {
        get(&store, "acme", &format!("update?p=notes&c=1.1.1/1.1.1/1.1.{i}&s=v{i}"));
    }
    store.flush_all().expect("checkpoint");
    assert!(segments(dir.path(), "acme").is_empty(), "a checkpoint empties the log");
    drop(store);
    for round in 0..2 {
        let store = open(dir.path());
        get(&store, "acme", &format!("update?p=notes&c=1.1.1/1.1.1/1.1.1&s=r{round}"));
        let names: Vec<String> = segments(dir.path(), "acme")
            .iter()
            .map(|p| p.file_name().expect("a name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![super::super::wal::segment_name(4 + round)], "round {round}");
        store.flush_all().expect("checkpoint");
        drop(store);
    }
    let store = open(dir.path());
    assert_eq!(get(&store, "acme", "select?p=notes&c=1.1.1/1.1.1/1.1.1"), "r1");
    assert_eq!(get(&store, "acme", "select?p=notes&c=1.1.1/1.1.1/1.1.3"), "v3");
}
