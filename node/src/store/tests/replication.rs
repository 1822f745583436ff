//! Replication at the store: a backup takes a primary's records and holds the same documents;
//! ballots fence a deposed primary; a diverged tail is cut to what two logs share.

use super::*;
use crate::store::{
    common_prefix, AppendRefusal, BallotError, LogPosition, LogTail, Shared, Shipment,
};

const T: &str = "acme";

/// Writes `n` updates to `p`, scroll `i` of them set to `<tag><i>`, then inserts ` <tag>` (a
/// `+` in a query is a space) at the end of scroll 1.
fn write(store: &Store, p: &str, tag: &str, n: u32) {
    for i in 1..=n {
        get(store, T, &format!("update?p={p}&c=1.1.1/1.1.1/1.1.{i}&s={tag}{i}"));
    }
    get(store, T, &format!("insert?p={p}&c=1.1.1/1.1.1/1.1.1&s=+{tag}"));
}

/// Ships everything `from` holds after `to`'s log end, under `ballot`, as a primary does: the
/// records after that lsn, with the position the primary's own log has there. Returns where `to`
/// ends then.
fn ship(from: &Store, to: &Store, ballot: u64) -> Result<LogPosition, AppendRefusal> {
    let end = to.replica_state(T).expect("state").last_lsn;
    let prev = from.replica_state(T).expect("state").ballots.position(end);
    let LogTail::Records { bytes, .. } = from.log_from(T, end + 1).expect("log") else {
        panic!("the primary's log still holds what the backup lacks");
    };
    to.append_from_primary(T, ballot, ballot, prev, &bytes).expect("no store error")
}

/// `store` takes the tenant over under `ballot`: it promises it, then leads under it.
fn take_over(store: &Store, ballot: u64) {
    store.promise(T, ballot).expect("store").expect("promise");
    store.lead(T, ballot).expect("store").expect("ballot");
}

/// Both stores answer the same for every phext named.
fn same_documents(a: &Store, b: &Store, phexts: &[&str]) {
    for p in phexts {
        let get_a = get(a, T, &format!("get?p={p}"));
        assert!(!get_a.is_empty(), "{p} holds something");
        assert_eq!(get_a, get(b, T, &format!("get?p={p}")), "{p}");
        assert_eq!(get(a, T, &format!("checksum?p={p}")), get(b, T, &format!("checksum?p={p}")));
    }
}

// Goal: a backup that takes the primary's records holds byte-identical documents, at the same
// log position, also after a crash and reopen; a second batch continues the first.
#[test]
fn a_backup_holds_what_the_primary_wrote() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (primary, backup) = (open(da.path()), open(db.path()));
    primary.lead(T, 1).expect("store").expect("ballot");
    write(&primary, "notes", "a", 5);
    write(&primary, "todo", "b", 3);
    let end = ship(&primary, &backup, 1).expect("taken");
    assert_eq!(end, LogPosition { ballot: 1, lsn: 10 });
    same_documents(&primary, &backup, &["notes", "todo"]);
    write(&primary, "notes", "c", 2);
    assert_eq!(ship(&primary, &backup, 1), Ok(LogPosition { ballot: 1, lsn: 13 }));
    same_documents(&primary, &backup, &["notes", "todo"]);
    drop(backup);
    let backup = open(db.path());
    same_documents(&primary, &backup, &["notes", "todo"]);
    assert_eq!(backup.replica_state(T).expect("state"), primary.replica_state(T).expect("state"));
}

// Goal: a promise fences a deposed primary (its records are refused, nothing changes), records
// that do not continue the log are refused with where it ends, and a damaged batch is refused
// as corrupt.
#[test]
fn a_backup_refuses_a_lower_ballot_a_gap_and_damage() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (primary, backup) = (open(da.path()), open(db.path()));
    primary.lead(T, 3).expect("store").expect("ballot");
    write(&primary, "notes", "a", 2);
    assert!(ship(&primary, &backup, 3).is_ok());
    let before = backup.replica_state(T).expect("state");
    assert_eq!(before.last_lsn, 3);
    // A new primary took ballot 5 from this backup.
    let promised = backup.promise(T, 5).expect("store").expect("promise");
    assert_eq!(promised.ballots.promised(), 5);
    write(&primary, "notes", "late", 1);
    assert_eq!(
        ship(&primary, &backup, 3),
        Err(AppendRefusal::Ballot(BallotError::Stale { ballot: 3, promised: 5 }))
    );
    assert_eq!(
        backup.promise(T, 4).expect("store"),
        Err(BallotError::Stale { ballot: 4, promised: 5 })
    );
    // A batch that skips a record.
    let LogTail::Records { bytes, .. } = primary.log_from(T, 5).expect("log") else { panic!() };
    let gap = backup.append_from_primary(T, 5, 5, LogPosition { ballot: 3, lsn: 4 }, &bytes);
    assert_eq!(gap.expect("store"), Err(AppendRefusal::NotContinuing { have: before.position() }));
    // A damaged batch.
    let LogTail::Records { mut bytes, .. } = primary.log_from(T, 4).expect("log") else { panic!() };
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let damaged = backup.append_from_primary(T, 5, 5, before.position(), &bytes);
    assert!(matches!(damaged, Err(StoreError::Corrupt { .. })), "{damaged:?}");
    let after = backup.replica_state(T).expect("state");
    assert_eq!((after.last_lsn, after.position()), (before.last_lsn, before.position()));
    assert_eq!(get(&backup, T, "select?p=notes&c=1.1.1/1.1.1/1.1.1"), "a1 a");
}

// Goal: an old primary's unacknowledged tail is cut to the last record it shares with the new
// primary (by ballot history, KIP-101), and it then follows the new primary to identical
// documents. A tail below a checkpoint cannot be cut: the replica needs a snapshot.
#[test]
fn a_diverged_tail_is_cut_to_what_the_logs_share() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (old, new) = (open(da.path()), open(db.path()));
    old.lead(T, 1).expect("store").expect("ballot");
    write(&old, "notes", "a", 2);
    assert_eq!(ship(&old, &new, 1), Ok(LogPosition { ballot: 1, lsn: 3 }));
    // Written on the old primary only, never acknowledged; then it fails.
    write(&old, "notes", "lost", 1);
    // The survivor leads ballot 2 and writes on.
    take_over(&new, 2);
    write(&new, "notes", "b", 3);
    let (o, n) = (old.replica_state(T).expect("state"), new.replica_state(T).expect("state"));
    assert_eq!(o.position(), LogPosition { ballot: 1, lsn: 5 });
    assert_eq!(n.position(), LogPosition { ballot: 2, lsn: 7 });
    assert!(n.position() > o.position(), "the new primary's log is the more advanced");
    assert_eq!(common_prefix(&o.ballots, o.last_lsn, &n.ballots, n.last_lsn), Shared::Through(3));
    // Records 4 and 5 of the old primary are not record 4 and 5 of the new one.
    assert!(matches!(ship(&new, &old, 2), Err(AppendRefusal::NotContinuing { .. })));
    assert!(old.truncate_after(T, 3).expect("store"), "the tail is above any checkpoint");
    assert_eq!(old.replica_state(T).expect("state").position(), LogPosition { ballot: 1, lsn: 3 });
    assert_eq!(ship(&new, &old, 2), Ok(LogPosition { ballot: 2, lsn: 7 }));
    same_documents(&new, &old, &["notes"]);
    assert_eq!(get(&old, T, "select?p=notes&c=1.1.1/1.1.1/1.1.1"), "b1 b");
    // After a checkpoint the folded records cannot be cut, and the log no longer has them.
    new.flush_all().expect("checkpoint");
    assert!(!new.truncate_after(T, 5).expect("store"));
    assert_eq!(new.log_from(T, 1).expect("log"), LogTail::Checkpointed);
    assert_eq!(
        new.log_from(T, 8).expect("log"),
        LogTail::Records { bytes: Vec::new(), first_lsn: 8, last_lsn: 7 }
    );
    write(&new, "notes", "c", 1);
    assert_eq!(ship(&new, &old, 2), Ok(LogPosition { ballot: 2, lsn: 9 }));
    same_documents(&new, &old, &["notes"]);
}

/// Takes `shipment` into `to` under its own ballot; returns where `to` ends then.
fn take(to: &Store, shipment: Shipment) -> LogPosition {
    let Shipment::Records { prev, ballot, bytes, .. } = shipment else {
        panic!("records to ship, not {shipment:?}");
    };
    to.append_from_primary(T, ballot, ballot, prev, &bytes).expect("no store error").expect("taken")
}

// Goal: a primary ships what a backup lacks one ballot at a time, from the records it keeps in
// memory and, once they are gone (a reload), from its log on disk, the same either way; what a
// checkpoint folded away is reported as needing a snapshot; the memory kept for backups is
// counted and given back when they hold it.
#[test]
fn a_primary_ships_one_ballot_at_a_time_from_memory_or_disk() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (primary, backup) = (open(da.path()), open(db.path()));
    primary.keep_tails(true);
    write(&primary, "notes", "a", 3); // records 1..=4 under no ballot (0)
    primary.lead(T, 2).expect("store").expect("ballot");
    write(&primary, "todo", "b", 2); // records 5..=7 under ballot 2

    let first = primary.shipment(T, 0, 7).expect("shipment");
    let Shipment::Records { prev, ballot, last_lsn, .. } = &first else { panic!("{first:?}") };
    assert_eq!((*prev, *ballot, *last_lsn), (LogPosition { ballot: 0, lsn: 0 }, 0, 4));
    let upto = primary.shipment(T, 0, 2).expect("shipment");
    assert!(matches!(upto, Shipment::Records { last_lsn: 2, .. }), "none past `upto`: {upto:?}");
    assert_eq!(take(&backup, first.clone()), LogPosition { ballot: 0, lsn: 4 });
    let second = primary.shipment(T, 4, 7).expect("shipment");
    let Shipment::Records { prev, ballot, last_lsn, .. } = &second else { panic!("{second:?}") };
    assert_eq!((*prev, *ballot, *last_lsn), (LogPosition { ballot: 0, lsn: 4 }, 2, 7));
    assert_eq!(take(&backup, second.clone()), LogPosition { ballot: 2, lsn: 7 });
    assert_eq!(primary.shipment(T, 7, 7).expect("shipment"), Shipment::Nothing);
    same_documents(&primary, &backup, &["notes", "todo"]);
    assert_eq!(backup.replica_state(T).expect("state"), primary.replica_state(T).expect("state"));

    let kept = primary.memory_bytes();
    primary.trim_tail(T, 7);
    let trimmed = primary.memory_bytes();
    assert!(trimmed < kept, "the kept records' memory is given back: {trimmed} of {kept}");
    primary.trim_tail(T, 7);
    assert_eq!(primary.memory_bytes(), trimmed);

    // Reopened, nothing is kept in memory: the same shipments come from the log.
    drop(primary);
    let primary = open(da.path());
    assert_eq!(primary.shipment(T, 0, 7).expect("shipment"), first);
    assert_eq!(primary.shipment(T, 4, 7).expect("shipment"), second);

    // A checkpoint folds the log into the phext files: a backup at 0 needs a snapshot.
    primary.unload(T).expect("unload");
    assert_eq!(primary.shipment(T, 0, 7).expect("shipment"), Shipment::Checkpointed);
    assert_eq!(primary.shipment(T, 7, 7).expect("shipment"), Shipment::Nothing);
}

// Goal: the shipment built from memory alone is the one `shipment` builds, while the tenant is
// loaded and its kept records reach back far enough; it answers nothing (so the caller reads on
// the blocking pool) when the tenant is not loaded, the kept records were given back, or
// another thread holds the tenant's slot, and never loads a tenant.
#[test]
fn a_shipment_from_memory_is_the_same_or_none() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (primary, backup) = (open(da.path()), open(db.path()));
    primary.keep_tails(true);
    assert_eq!(primary.shipment_in_memory(T, 0, 1), None, "no such tenant loaded");
    write(&primary, "notes", "a", 3); // records 1..=4 under no ballot (0)
    primary.lead(T, 2).expect("store").expect("ballot");
    write(&primary, "todo", "b", 2); // records 5..=7 under ballot 2
    for (after, upto) in [(0, 7), (0, 2), (4, 7), (2, 9)] {
        let slow = primary.shipment(T, after, upto).expect("shipment");
        assert_eq!(primary.shipment_in_memory(T, after, upto), Some(slow), "{after}..{upto}");
    }
    assert_eq!(primary.shipment_in_memory(T, 7, 7), Some(Shipment::Nothing));
    let first = primary.shipment_in_memory(T, 0, 7).expect("from memory");
    assert_eq!(take(&backup, first), LogPosition { ballot: 0, lsn: 4 });

    {
        let slot = primary.slot(T);
        let _busy = slot.state.lock().expect("slot");
        assert_eq!(primary.shipment_in_memory(T, 4, 7), None, "the slot is busy: no wait");
    }
    primary.trim_tail(T, 5);
    assert_eq!(primary.shipment_in_memory(T, 4, 7), None, "record 5 is no longer kept");
    assert!(primary.shipment_in_memory(T, 5, 7).is_some());
    primary.unload(T).expect("unload");
    assert_eq!(primary.shipment_in_memory(T, 5, 7), None, "not loaded");
    assert_eq!(primary.durable_lsn_if_loaded(T), None, "and not loaded by asking");
}

/// Copies snapshot `image` of `from` into `to`'s staging, as the node copies it between nodes.
fn stage_snapshot(from: &Store, to: &Store, image: &crate::store::SnapshotImage) {
    to.stage_begin(T).expect("staging");
    for file in &image.files {
        let bytes =
            from.snapshot_read(image.id, T, &file.path, 0, file.len as usize).expect("read");
        to.stage_file_part(T, file, 0, &bytes).expect("part");
        to.stage_file_finish(T, file).expect("checked");
    }
}

// Goal: a backup whose log no longer meets the primary's (the primary checkpointed the records it
// lacks, and it holds a tail of its own) takes the primary's snapshot: it then holds the same
// documents and log position, continues with the records written after the snapshot, and keeps
// them across a reopen; the snapshot stays the tenant at one record whatever the primary writes
// later, and is gone once done.
#[test]
fn a_backup_far_behind_takes_a_snapshot() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (primary, backup) = (open(da.path()), open(db.path()));
    primary.lead(T, 2).expect("store").expect("ballot");
    write(&primary, "notes", "a", 4);
    backup.lead(T, 1).expect("store").expect("ballot");
    write(&backup, "notes", "stale", 2);
    assert!(ship(&primary, &backup, 2).is_err(), "the logs differ");
    let image = primary.snapshot_take(T).expect("snapshot");
    assert_eq!(image.lsn, 5);
    assert_eq!(primary.log_from(T, 1).expect("log"), LogTail::Checkpointed);
    write(&primary, "notes", "b", 2);
    stage_snapshot(&primary, &backup, &image);
    backup.snapshot_install(T, image.lsn, &image.ballots, 2).expect("store").expect("installed");
    let state = backup.replica_state(T).expect("state");
    assert_eq!(state.position(), LogPosition { ballot: 2, lsn: 5 });
    assert_eq!(state.ballots.promised(), 2);
    assert!(
        get(&backup, T, "get?p=notes").contains("a4"),
        "the snapshot is the tenant at record 5"
    );
    assert!(!get(&backup, T, "get?p=notes").contains("b1"));
    assert_eq!(ship(&primary, &backup, 2), Ok(LogPosition { ballot: 2, lsn: 8 }));
    same_documents(&primary, &backup, &["notes"]);
    drop(backup);
    let backup = open(db.path());
    same_documents(&primary, &backup, &["notes"]);
    // A checkpoint rewrites the primary's file; the snapshot's stays as it was listed.
    primary.unload(T).expect("checkpoint");
    let file = &image.files[0];
    let kept = primary.snapshot_read(image.id, T, &file.path, 0, file.len as usize + 1);
    assert_eq!(proto::doc::checksum(&kept.expect("read")), file.checksum);
    primary.snapshot_done(image.id, T).expect("dropped");
    assert!(primary.snapshot_read(image.id, T, &image.files[0].path, 0, 1).is_err());
}

// Goal: a snapshot listed before the backup took later records is refused, loaded or not, and the
// backup keeps those records (it may have acknowledged them as a member): a copy never goes back.
#[test]
fn a_snapshot_older_than_the_backups_log_is_refused() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (primary, backup) = (open(da.path()), open(db.path()));
    primary.lead(T, 2).expect("store").expect("ballot");
    write(&primary, "notes", "a", 4);
    assert_eq!(ship(&primary, &backup, 2), Ok(LogPosition { ballot: 2, lsn: 5 }));
    let image = primary.snapshot_take(T).expect("snapshot");
    assert_eq!(image.lsn, 5);
    write(&primary, "notes", "b", 2);
    assert_eq!(ship(&primary, &backup, 2), Ok(LogPosition { ballot: 2, lsn: 8 }));
    let before = backup.replica_state(T).expect("state");
    for unloaded in [false, true] {
        if unloaded {
            backup.unload(T).expect("unload");
        }
        stage_snapshot(&primary, &backup, &image);
        let refused = backup.snapshot_install(T, image.lsn, &image.ballots, 2).expect("store");
        assert_eq!(
            refused,
            Err(BallotError::SnapshotNotAhead {
                snapshot: LogPosition { ballot: 2, lsn: 5 },
                mine: LogPosition { ballot: 2, lsn: 8 },
            }),
            "unloaded: {unloaded}"
        );
        assert_eq!(backup.replica_state(T).expect("state"), before);
        same_documents(&primary, &backup, &["notes"]);
    }
}

// Goal: a replica that promised a higher ballot than the snapshot's sender refuses to install it,
// and keeps what it held.
#[test]
fn a_snapshot_from_a_deposed_primary_is_refused() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (primary, backup) = (open(da.path()), open(db.path()));
    primary.lead(T, 2).expect("store").expect("ballot");
    write(&primary, "notes", "a", 2);
    assert!(ship(&primary, &backup, 2).is_ok());
    backup.promise(T, 7).expect("store").expect("promised");
    let before = backup.replica_state(T).expect("state");
    let image = primary.snapshot_take(T).expect("snapshot");
    stage_snapshot(&primary, &backup, &image);
    let refused = backup.snapshot_install(T, image.lsn, &image.ballots, 2).expect("store");
    assert_eq!(refused, Err(BallotError::Stale { ballot: 2, promised: 7 }));
    assert_eq!(backup.replica_state(T).expect("state"), before);
    same_documents(&primary, &backup, &["notes"]);
}

// Goal: a store whose tenants directory is empty opens fresh, also when a start before made
// the directory and stopped before the node decided what that meant (a registry that failed to
// open); once settled as a new node's, it opens as one that holds nothing lost, and once marked
// rebuilding, it stays rebuilding and is not taken for new again. A store that holds a tenant
// and no marker (made before the markers) is not fresh.
#[test]
fn a_new_store_stays_new_until_the_node_decides_what_it_means() {
    let new_node = tempfile::tempdir().expect("dir");
    assert!(open(new_node.path()).opened_fresh());
    assert!(open(new_node.path()).opened_fresh(), "made, but nothing decided");
    open(new_node.path()).settle_new().expect("settles");
    let s = open(new_node.path());
    assert!(!s.opened_fresh() && !s.rebuilding());
    assert!(s.local_tenants().expect("lists").is_empty(), "the marker is no tenant");

    let wiped = tempfile::tempdir().expect("dir");
    assert_eq!(open(wiped.path()).lost_at_epoch(), None);
    open(wiped.path()).start_rebuilding(17).expect("marks");
    let s = open(wiped.path());
    assert!(!s.opened_fresh() && s.rebuilding());
    assert_eq!(s.lost_at_epoch(), Some(17), "the epoch of the loss is kept with the marker");
    let marker = wiped.path().join("tenants").join(".rebuilding");
    assert_eq!(std::fs::read(&marker).expect("the marker"), b"17\n");
    assert!(!s.lost_epoch_unknown());
    for torn in [&b""[..], b"1", b"\0\0\0", b"x\n", b"\n"] {
        std::fs::write(&marker, torn).expect("writes");
        let s = open(wiped.path());
        assert!(s.rebuilding() && s.lost_epoch_unknown(), "{torn:?} holds no epoch");
        s.start_rebuilding(18).expect("records the epoch anew");
        assert_eq!(open(wiped.path()).lost_at_epoch(), Some(18));
    }

    let older = tempfile::tempdir().expect("dir");
    get(&open(older.path()), T, "update?p=notes&c=1.1.1/1.1.1/1.1.1&s=x");
    assert!(!open(older.path()).opened_fresh(), "a tenant's directory is content");
}

// Goal: a new primary whose log ends in records of an earlier ballot writes a barrier under
// its own (Raft's no-op of a new term), which changes no document. Once a backup holds it, the
// backup's log outranks the log of a primary that led in between and wrote records nobody
// holds: a read the new primary answered (waiting for the barrier on a majority) is never cut
// by a later primary. A log already ending in its ballot needs none; an empty log neither.
#[test]
fn a_new_primary_writes_a_barrier_of_its_ballot() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let (a, b, c) = (open(dirs[0].path()), open(dirs[1].path()), open(dirs[2].path()));
    assert_eq!(a.barrier(T, 1).expect("store"), None, "an empty log");
    a.lead(T, 1).expect("store").expect("ballot");
    write(&a, "notes", "a", 1);
    assert_eq!(ship(&a, &c, 1), Ok(LogPosition { ballot: 1, lsn: 2 }));
    // Records 3 and 4 reach no backup (outcome unknown); then a stops answering.
    write(&a, "notes", "tail", 1);
    // b leads ballot 2 and logs a record only it holds.
    take_over(&b, 2);
    write(&b, "notes", "b", 1);
    // a leads again, under ballot 3, with c's promise; its own log is the most advanced of the
    // two, and it adopts it.
    c.promise(T, 3).expect("store").expect("promise");
    take_over(&a, 3);
    let before = get(&a, T, "checksum?p=notes");
    assert_eq!(a.barrier(T, 3).expect("store"), Some(5));
    assert_eq!(a.barrier(T, 3).expect("store"), None, "the log ends in its ballot now");
    assert_eq!(get(&a, T, "checksum?p=notes"), before, "the barrier changes no document");
    let end = a.replica_state(T).expect("state").last_lsn;
    while c.replica_state(T).expect("state").last_lsn < end {
        let after = c.replica_state(T).expect("state").last_lsn;
        let Shipment::Records { prev, ballot, bytes, .. } = a.shipment(T, after, end).expect("log")
        else {
            panic!("a holds what c lacks");
        };
        c.append_from_primary(T, 3, ballot, prev, &bytes).expect("store").expect("taken");
    }
    let (at_c, at_b) = (c.replica_state(T).expect("state"), b.replica_state(T).expect("state"));
    assert_eq!(at_c.position(), LogPosition { ballot: 3, lsn: 5 });
    assert!(
        at_c.position() > at_b.position(),
        "{:?} outranks {:?}",
        at_c.position(),
        at_b.position()
    );
    same_documents(&a, &c, &["notes"]);
    // Reopened, the barrier replays to the same documents.
    drop(c);
    same_documents(&a, &open(dirs[2].path()), &["notes"]);
}

// Goal: a write logs a record and says so; the same write again, or a delete of nothing,
// changes nothing and says that too, so a primary answers it as a read (under its lease), not
// as a record its backups fence: a deposed primary's stale state once answered such a write.
#[test]
fn a_write_that_changes_nothing_says_so() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(dir.path());
    let changed = |query: &str, route: &str| {
        let req = parse(Method::Get, route, query, b"").expect("parses");
        match store.execute_begin(T, NO_QUOTA, &req) {
            crate::store::Begun::Logged(logged) => {
                let changed = logged.changed();
                store.execute_finish(logged).expect("durable");
                changed
            }
            crate::store::Begun::Done(answer) => panic!("a write is logged: {answer:?}"),
        }
    };
    assert!(changed("p=notes&c=1.1.1/1.1.1/1.1.1&s=x", "update"));
    assert!(!changed("p=notes&c=1.1.1/1.1.1/1.1.1&s=x", "update"), "the same text again");
    assert!(!changed("p=notes&c=1.1.1/1.1.1/1.1.2", "delete"), "an empty scroll");
    assert!(!changed("p=other&c=1.1.1/1.1.1/1.1.1", "delete"), "a phext that does not exist");
    assert!(changed("p=notes&c=1.1.1/1.1.1/1.1.1", "delete"));
    assert_eq!(store.replica_state(T).expect("state").last_lsn, 2, "two records logged");
}

// Goal: a primary ships only records durable on its own disk, and a read's commit point is its
// durable end: a record whose log write is still pending (and may yet fail, to be written again
// differently at the same lsn) reaches no backup.
#[test]
fn a_record_not_yet_durable_is_not_shipped() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(dir.path());
    store.keep_tails(true);
    store.lead(T, 1).expect("store").expect("ballot");
    get(&store, T, "update?p=notes&c=1.1.1/1.1.1/1.1.1&s=a");
    let req = parse(Method::Get, "update", "p=notes&c=1.1.1/1.1.1/1.1.2&s=b", b"").expect("parses");
    let crate::store::Begun::Logged(pending) = store.execute_begin(T, NO_QUOTA, &req) else {
        panic!("a write is logged");
    };
    assert_eq!(pending.lsn(), 2);
    assert_eq!(store.durable_lsn_if_loaded(T), Some(1));
    match store.shipment(T, 0, 2).expect("shipment") {
        Shipment::Records { last_lsn, .. } => assert_eq!(last_lsn, 1, "only the durable record"),
        other => panic!("records expected: {other:?}"),
    }
    assert_eq!(store.shipment(T, 1, 2).expect("shipment"), Shipment::Nothing);
    store.execute_finish(pending).expect("durable");
    assert_eq!(store.durable_lsn_if_loaded(T), Some(2));
    match store.shipment(T, 1, 2).expect("shipment") {
        Shipment::Records { last_lsn, .. } => assert_eq!(last_lsn, 2),
        other => panic!("records expected: {other:?}"),
    }
}

// Goal: a node that led the tenant under one ballot and then took a newer primary's records (so
// promised the newer ballot) has its own writes under the old ballot refused, changing nothing:
// its record would join the newer primary's run at an lsn where that primary wrote another.
#[test]
fn a_deposed_primary_writes_nothing_once_it_follows_a_newer_one() {
    let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (old, new) = (open(da.path()), open(db.path()));
    take_over(&old, 2);
    let update = |store: &Store, text: &str, led: u64| {
        let query = format!("p=notes&c=1.1.1/1.1.1/1.1.1&s={text}");
        let req = parse(Method::Get, "update", &query, b"").expect("parses");
        match store.execute_begin_led(T, NO_QUOTA, &req, Some(led)) {
            crate::store::Begun::Logged(logged) => store.execute_finish(logged).map(|_| ()),
            crate::store::Begun::Done(answer) => answer.map(|_| ()),
        }
    };
    update(&old, "a", 2).expect("the primary writes under its ballot");
    assert_eq!(ship(&old, &new, 2), Ok(LogPosition { ballot: 2, lsn: 1 }));
    take_over(&new, 3);
    update(&new, "b", 3).expect("the new primary writes");
    assert_eq!(ship(&new, &old, 3), Ok(LogPosition { ballot: 3, lsn: 2 }));
    let before = old.replica_state(T).expect("state");
    let refused = update(&old, "c", 2);
    assert!(
        matches!(refused, Err(StoreError::NotLeading { ballot: 2, promised: 3 })),
        "{refused:?}"
    );
    assert_eq!(old.replica_state(T).expect("state"), before, "nothing logged");
    same_documents(&new, &old, &["notes"]);
}

// Goal: a listing of leftover snapshots keeps the directory of a snapshot still being taken
// (created before the take records it), and drops it once a failed take has ended.
#[test]
fn a_snapshot_being_taken_survives_a_listing() {
    let dir = tempfile::tempdir().expect("dir");
    let clock = Arc::new(ManualClock::new(0));
    let store = open_with(config(dir.path()), Arc::new(RealVfs), clock.clone());
    let id = store.snapshot_begin();
    let taking = dir.path().join("tenants").join(format!(".snapshot-{id}-{T}"));
    std::fs::create_dir_all(taking.join("phexts")).expect("snapshot dir");
    clock.advance_ms(10_000);
    assert_eq!(store.drop_idle_snapshots(0, true).expect("sweep"), 0);
    assert!(taking.is_dir(), "a snapshot being taken was dropped");
    store.snapshot_end(id, None);
    assert_eq!(store.drop_idle_snapshots(0, true).expect("sweep"), 1);
    assert!(!taking.exists(), "a failed take's directory stays");
}

// Goal: a sweep that does not list the tenants directory still drops the snapshots this run
// took once they go unread, and leaves alone a directory it does not know of; a sweep that
// lists it drops that leftover too. Tenants' own directories are never touched.
#[test]
fn idle_snapshots_go_with_or_without_a_listing() {
    let dir = tempfile::tempdir().expect("dir");
    let clock = Arc::new(ManualClock::new(0));
    let store = open_with(config(dir.path()), Arc::new(RealVfs), clock.clone());
    store.lead(T, 1).expect("store").expect("ballot");
    write(&store, "notes", "a", 2);
    let tenants = dir.path().join("tenants");
    let snapshots = || {
        let mut names: Vec<String> = std::fs::read_dir(&tenants)
            .expect("tenants dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".snapshot-"))
            .collect();
        names.sort();
        names
    };
    let image = store.snapshot_take(T).expect("snapshot");
    let leftover = tenants.join(".snapshot-999-acme");
    std::fs::create_dir_all(leftover.join("phexts")).expect("leftover");
    let taken = format!(".snapshot-{}-{T}", image.id);
    assert_eq!(snapshots(), vec![taken.clone(), ".snapshot-999-acme".to_string()]);
    assert_eq!(store.drop_idle_snapshots(1_000, false).expect("sweep"), 0, "read just now");
    clock.advance_ms(1_000);
    assert_eq!(store.drop_idle_snapshots(1_000, false).expect("sweep"), 1);
    assert_eq!(snapshots(), vec![".snapshot-999-acme".to_string()], "the unknown one stays");
    assert_eq!(store.drop_idle_snapshots(1_000, true).expect("sweep"), 1);
    assert!(snapshots().is_empty());
    assert!(tenants.join(T).is_dir(), "the tenant's own copy stays");
    assert!(get(&store, T, "get?p=notes").contains("a1"));
}
