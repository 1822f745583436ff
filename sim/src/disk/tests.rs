use super::*;

fn disk() -> (Arc<SimDisk>, ProcessDisk) {
    let d = SimDisk::new(Rng::new(1));
    d.provision_dir(Path::new("/data")).unwrap();
    let p = d.process();
    (d, p)
}

// Goal: after a crash, a synced file in a synced directory keeps exactly its synced bytes (or
// a prefix-extension of them), and a file whose directory entry was never synced may vanish;
// handles of the dead process fail.
#[test]
fn crash_keeps_what_was_synced() {
    for seed in 0..64 {
        let d = SimDisk::new(Rng::new(seed));
        d.provision_dir(Path::new("/data")).unwrap();
        let p = d.process();
        let mut f = p.open(Path::new("/data/log"), true, true, false).unwrap();
        f.write_all(b"hello ").unwrap();
        f.sync().unwrap();
        p.sync_dir(Path::new("/data")).unwrap();
        f.write_all(b"world").unwrap();
        let mut g = p.open(Path::new("/data/new"), true, true, false).unwrap();
        g.write_all(b"x").unwrap();
        g.sync().unwrap();
        d.crash(true);
        assert!(f.write_all(b"!").is_err(), "a dead process's handle must fail");
        d.restart();
        let p = d.process();
        let log = p.read(Path::new("/data/log")).unwrap();
        let text_len = log.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        assert!(log.starts_with(b"hello "), "seed {seed}: {log:?}");
        assert!(b"hello world".starts_with(&log[..text_len]), "seed {seed}: {log:?}");
        let new = p.exists(Path::new("/data/new")).unwrap();
        if new {
            assert_eq!(p.read(Path::new("/data/new")).unwrap(), b"x");
        }
    }
}

// Goal: once a new process started on the disk, the dead one's view refuses every operation
// (its tasks still finishing must not write the new process's files), and the new one's
// works.
#[test]
fn a_dead_process_never_writes_after_a_restart() {
    let (d, dead) = disk();
    d.crash(false);
    d.restart();
    let alive = d.process();
    assert!(dead.create_dir(Path::new("/data/t1")).is_err());
    assert!(dead.open(Path::new("/data/f"), true, true, false).is_err());
    assert!(dead.exists(Path::new("/data")).is_err());
    assert!(!alive.exists(Path::new("/data/t1")).unwrap(), "the dead process wrote");
    alive.create_dir(Path::new("/data/t1")).unwrap();
    assert!(dead.rename(Path::new("/data/t1"), Path::new("/data/t2")).is_err());
    assert!(alive.exists(Path::new("/data/t1")).unwrap());
}

// Goal: a directory renamed and synced keeps its files under the new name across a crash; an
// unsynced truncation is undone.
#[test]
fn renames_and_cuts_follow_the_syncs() {
    let (d, p) = disk();
    p.create_dir(Path::new("/data/stage")).unwrap();
    let mut f = p.open(Path::new("/data/stage/a"), true, true, false).unwrap();
    f.write_all(b"abc").unwrap();
    f.sync().unwrap();
    p.sync_dir(Path::new("/data/stage")).unwrap();
    p.rename(Path::new("/data/stage"), Path::new("/data/t1")).unwrap();
    p.sync_dir(Path::new("/data")).unwrap();
    p.truncate(Path::new("/data/t1/a"), 1).unwrap();
    d.crash(true);
    d.restart();
    let p = d.process();
    assert_eq!(p.read(Path::new("/data/t1/a")).unwrap(), b"abc");
    assert!(!p.exists(Path::new("/data/stage")).unwrap());
}

// Goal: a full disk refuses a write after taking part of it.
#[test]
fn full_disk_refuses_writes() {
    let (d, p) = disk();
    let mut f = p.open(Path::new("/data/f"), true, true, false).unwrap();
    d.set_faults(DiskFaults { full: true, slow_ms: 7 });
    let err = f.write_all(b"0123456789").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::StorageFull);
    assert!(p.read(Path::new("/data/f")).unwrap().len() <= 10);
    assert!(take_debt_ms() >= 14, "slow operations charge time");
}
