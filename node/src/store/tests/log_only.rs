//! A backup's copy loaded with its log alone: it takes a primary's records without its documents
//! in memory, folds its log into its files as a loaded copy does, and is loaded whole, with
//! every record it took, as soon as a request needs the documents.

use super::*;
use crate::store::{LogPosition, LogTail, TENANT_MEMORY_OVERHEAD_BYTES};

const T: &str = "acme";

/// Writes `n` updates of about 100 bytes to scrolls of `notes` on `primary`, tagged `tag`.
fn write(primary: &Store, tag: &str, n: u32) {
    let pad = "x".repeat(100);
    for i in 1..=n {
        get(primary, T, &format!("update?p=notes&c=1.1.1/1.1.1/1.1.{}&s={tag}{i}{pad}", i % 7 + 1));
    }
}

/// Ships what `backup` lacks of `primary`'s log under ballot 1; where the backup's log ends.
fn ship(primary: &Store, backup: &Store) -> LogPosition {
    let end = backup.replica_state(T).expect("state").last_lsn;
    let prev = primary.replica_state(T).expect("state").ballots.position(end);
    let LogTail::Records { bytes, .. } = primary.log_from(T, end + 1).expect("log") else {
        panic!("the primary's log holds what the backup lacks");
    };
    backup.append_from_primary(T, 1, 1, prev, &bytes).expect("store").expect("taken")
}

fn same_notes(primary: &Store, backup: &Store) {
    let want = get(primary, T, "get?p=notes");
    assert!(want.len() > 100, "the primary holds the writes");
    assert_eq!(get(backup, T, "get?p=notes"), want);
    assert_eq!(get(backup, T, "checksum?p=notes"), get(primary, T, "checksum?p=notes"));
}

// Goal: records taken by a copy no request has used leave its documents on disk, not in memory
// (the store counts the tenant's overhead alone, and its storage as unknown); the first request
// loads it whole and sees every record; records taken then apply to the loaded documents.
#[test]
fn a_backup_takes_records_without_its_documents_in_memory() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (primary, backup) = (open(da.path()), open(db.path()));
    primary.lead(T, 1).expect("store").expect("ballot");
    write(&primary, "a", 20);
    assert_eq!(ship(&primary, &backup), LogPosition { ballot: 1, lsn: 20 });
    assert_eq!(backup.loaded_count(), 1);
    assert_eq!(backup.memory_bytes(), TENANT_MEMORY_OVERHEAD_BYTES, "no document in memory");
    assert!(primary.memory_bytes() > TENANT_MEMORY_OVERHEAD_BYTES + 700);
    assert_eq!(backup.known_storage(|_| true), vec![], "a log-only copy's size is not known");

    same_notes(&primary, &backup);
    assert_eq!(backup.memory_bytes(), primary.memory_bytes(), "loaded whole by the read");
    assert_eq!(backup.storage_bytes(T).expect("bytes"), primary.storage_bytes(T).expect("bytes"));
    write(&primary, "b", 5);
    assert_eq!(ship(&primary, &backup), LogPosition { ballot: 1, lsn: 25 });
    same_notes(&primary, &backup);
    assert_eq!(backup.replica_state(T).expect("state"), primary.replica_state(T).expect("state"));
}

// Goal: a log-only copy whose log grows past `checkpoint_wal_bytes` folds it into its phext
// files without keeping its documents, as a loaded copy would; unloaded, it keeps its log for
// the next load; after a crash it reloads to the primary's documents at the primary's position.
#[test]
fn a_log_only_copy_folds_its_log_and_keeps_it_when_unloaded() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let primary = open(da.path());
    let small = || StoreConfig { checkpoint_wal_bytes: 2048, ..config(db.path()) };
    let backup = open_with(small(), Arc::new(RealVfs), Arc::new(ManualClock::new(0)));
    primary.lead(T, 1).expect("store").expect("ballot");
    write(&primary, "a", 30);
    ship(&primary, &backup);
    // 30 records of over 100 bytes pass 2 KiB: folded, the log emptied, the file written.
    assert_eq!(segments(db.path(), T), Vec::<PathBuf>::new(), "the log was folded");
    let file = std::fs::read(phexts_dir(db.path(), T).join("notes.phext")).expect("phext file");
    assert_eq!(String::from_utf8(file).expect("text"), get(&primary, T, "get?p=notes"));
    assert_eq!(backup.memory_bytes(), TENANT_MEMORY_OVERHEAD_BYTES, "still no document");

    write(&primary, "b", 3);
    ship(&primary, &backup);
    assert!(backup.unload(T).expect("unloaded"));
    assert_eq!(segments(db.path(), T).len(), 1, "an unloaded log-only copy keeps its log");
    write(&primary, "c", 2);
    assert_eq!(ship(&primary, &backup), LogPosition { ballot: 1, lsn: 35 });
    drop(backup);
    let backup = open(db.path());
    same_notes(&primary, &backup);
    assert_eq!(backup.replica_state(T).expect("state"), primary.replica_state(T).expect("state"));
}
