//! A tenant replica's ballots (docs/REPLICATION.md): the highest ballot it promised, and the
//! ballot history of its log, one entry per ballot its records were written under with the lsn of
//! the first such record (Kafka's leader-epoch checkpoint, KIP-101).
//!
//! Two replicas find the last record they share from their histories alone
//! ([`common_prefix`]), never from a commit point or high-watermark: a new primary adopts the most
//! advanced log ([`LogPosition`]: ballot of the last record, then lsn) and every other replica
//! truncates to what it shares with it.
//!
//! On disk the file `ballots` in the tenant's directory is one record, framed as the log's records
//! are (`[len u32][crc32c u32][payload]`), replaced atomically (temp file, fsync, rename, fsync of
//! the directory) before a promise or a first record under a new ballot is acknowledged.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::StoreError;
use super::vfs::Vfs;
use super::wal::RECORD_HEADER_BYTES;

/// The file name of a tenant's ballots, in its directory.
pub(crate) const BALLOTS_FILE: &str = "ballots";

/// The most ballot starts a history keeps. A start is added only when a tenant is written under a
/// new ballot (after a failover or a placement change), and the starts below the last checkpoint
/// are dropped ([`Ballots::forget_below`]), so a history past this is corrupt.
pub const BALLOT_HISTORY_MAX: usize = 1_024;

/// The largest payload of a ballots file: its promise, its floor, and [`BALLOT_HISTORY_MAX`]
/// starts of two integers each, at most 10 bytes apiece in bincode's varint encoding.
const BALLOTS_PAYLOAD_BYTES_MAX: usize = 64 + BALLOT_HISTORY_MAX * 20;

/// Where a log ends: the ballot its last record was written under and that record's lsn. Logs
/// compare by ballot first, then lsn; the greater is the more advanced (the comparison Raft
/// makes of logs). An empty log is `(0, 0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogPosition {
    pub ballot: u64,
    pub lsn: u64,
}

/// The first record of a log written under `ballot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BallotStart {
    pub ballot: u64,
    pub first_lsn: u64,
}

/// Why a ballot or a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BallotError {
    #[error("ballot {ballot} is below the ballot {promised} this replica promised")]
    Stale { ballot: u64, promised: u64 },
    #[error("record {lsn} under ballot {ballot} does not follow the log's ballot {last_ballot} from record {last_first_lsn}")]
    OutOfOrder { ballot: u64, lsn: u64, last_ballot: u64, last_first_lsn: u64 },
    #[error("the ballot history is full ({BALLOT_HISTORY_MAX} starts above the last checkpoint)")]
    HistoryFull,
    #[error("a snapshot ending at {snapshot:?} is not ahead of this replica's log, which ends at {mine:?}")]
    SnapshotNotAhead { snapshot: LogPosition, mine: LogPosition },
}

/// A replica's promise and its log's ballot history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ballots {
    /// The highest ballot this replica promised: it refuses anything from a lower one.
    promised: u64,
    /// Records below this lsn are no longer described (they are below a checkpoint: committed,
    /// and the same on every member). 0 when nothing was forgotten.
    floor: u64,
    /// Ascending in ballot and in first lsn. Records before the first start were written before
    /// any ballot (ballot 0: a tenant from before replication).
    history: Vec<BallotStart>,
}

impl Ballots {
    /// The highest ballot promised.
    pub fn promised(&self) -> u64 {
        self.promised
    }

    /// The history, oldest first.
    pub fn history(&self) -> &[BallotStart] {
        &self.history
    }

    /// Promises `ballot`: from now on lower ballots are refused. `Ok(true)` when the promise
    /// changed (and must be made durable before it is answered), `Ok(false)` when it already held.
    pub fn promise(&mut self, ballot: u64) -> Result<bool, BallotError> {
        if ballot < self.promised {
            return Err(BallotError::Stale { ballot, promised: self.promised });
        }
        let changed = ballot > self.promised;
        self.promised = ballot;
        Ok(changed)
    }

    /// Records that the log's next record, `lsn` (its end + 1), is written under `ballot`,
    /// promising it too. `Ok(true)` when the history changed (the first record under a new
    /// ballot; durable before the record is acknowledged). Refused for a ballot below the
    /// promise or below the log's last ballot, or a new ballot that does not start after the last
    /// one's first record. A start at `lsn` or later is a run with no record (see
    /// [`Self::lead`]): the records of any ballot that fill the log from `lsn` take its place.
    pub fn accept(&mut self, ballot: u64, lsn: u64) -> Result<bool, BallotError> {
        if ballot < self.promised {
            return Err(BallotError::Stale { ballot, promised: self.promised });
        }
        // A start at or past `lsn` is a run with no record (a primary that led and wrote nothing
        // before another took over): it describes nothing, and must not refuse the records of
        // an earlier ballot that a later primary sends to fill the log from `lsn`.
        while self.history.last().is_some_and(|s| s.first_lsn >= lsn && s.ballot != ballot) {
            self.history.pop();
        }
        let last = self.history.last().copied();
        let (last_ballot, last_first_lsn) = last.map_or((0, 0), |s| (s.ballot, s.first_lsn));
        let out_of_order = BallotError::OutOfOrder { ballot, lsn, last_ballot, last_first_lsn };
        if ballot < last_ballot || lsn < self.floor {
            return Err(out_of_order);
        }
        let starts_a_run = ballot != last_ballot || (last.is_none() && ballot != 0);
        if starts_a_run {
            if last.is_some() && lsn < last_first_lsn {
                return Err(out_of_order);
            }
            if last.is_some() && lsn == last_first_lsn {
                self.history.pop();
            }
            if self.history.len() >= BALLOT_HISTORY_MAX {
                return Err(BallotError::HistoryFull);
            }
            self.history.push(BallotStart { ballot, first_lsn: lsn });
        }
        self.promised = ballot;
        Ok(starts_a_run)
    }

    /// A primary starts writing under `ballot`, its log's next record being `next_lsn`: promises
    /// it and starts its run now, so that the writes that follow need no change here. `Ok(true)`
    /// when the history changed (durable before the first write under it is acknowledged).
    pub fn lead(&mut self, ballot: u64, next_lsn: u64) -> Result<bool, BallotError> {
        self.accept(ballot, next_lsn)
    }

    /// A replica takes records written under `records` from a primary that leads under `sender`
    /// (a new primary sends records of the ballots before its own): refused when `sender` is below
    /// the promise; otherwise the records' run is recorded as [`Self::accept`] records it, and
    /// `sender` is promised. `Ok(true)` when the history or the promise changed (durable before
    /// the records are acknowledged: a replica that took a newer primary's records refuses the
    /// older primary's after a crash too).
    pub fn follow(&mut self, sender: u64, records: u64, lsn: u64) -> Result<bool, BallotError> {
        if sender < self.promised {
            return Err(BallotError::Stale { ballot: sender, promised: self.promised });
        }
        if records > sender {
            let (last_ballot, last_first_lsn) =
                self.history.last().map_or((0, 0), |s| (s.ballot, s.first_lsn));
            return Err(BallotError::OutOfOrder {
                ballot: records,
                lsn,
                last_ballot,
                last_first_lsn,
            });
        }
        let promised = self.promised;
        // The promise is checked against `sender` above; the run is checked as `accept` checks it.
        self.promised = promised.min(records);
        match self.accept(records, lsn) {
            Ok(changed) => {
                self.promised = promised.max(sender);
                Ok(changed || self.promised != promised)
            }
            Err(refused) => {
                self.promised = promised;
                Err(refused)
            }
        }
    }

    /// The ballots as another node reads them ([`Self::from_wire`]): the bytes of a ballots
    /// file, checksummed.
    pub fn to_wire(&self) -> Vec<u8> {
        encode(self)
    }

    /// Ballots another node sent, checked as a ballots file is.
    pub fn from_wire(bytes: &[u8]) -> Result<Ballots, String> {
        decode(bytes)
    }

    /// The ballot record `lsn` was written under, or `None` below the floor (forgotten).
    pub fn ballot_of(&self, lsn: u64) -> Option<u64> {
        if lsn < self.floor {
            return None;
        }
        let after = self.history.partition_point(|s| s.first_lsn <= lsn);
        Some(after.checked_sub(1).map_or(0, |i| self.history[i].ballot))
    }

    /// The first lsn of the run of records under one ballot that holds `lsn` (at least the floor,
    /// and 1 for records before any start).
    fn run_start(&self, lsn: u64) -> u64 {
        let after = self.history.partition_point(|s| s.first_lsn <= lsn);
        let start = after.checked_sub(1).map_or(1, |i| self.history[i].first_lsn);
        start.max(self.floor).max(1)
    }

    /// The position of a log whose last record is `end_lsn` (0: empty).
    pub fn position(&self, end_lsn: u64) -> LogPosition {
        let ballot = if end_lsn == 0 { 0 } else { self.ballot_of(end_lsn).unwrap_or(0) };
        LogPosition { ballot, lsn: end_lsn }
    }

    /// After the log was cut to end at `end_lsn`: drops the starts of records that are gone.
    pub fn truncate_after(&mut self, end_lsn: u64) {
        self.history.retain(|s| s.first_lsn <= end_lsn);
    }

    /// After a checkpoint at `lsn` (everything up to it committed and written to the phext
    /// files): forgets the starts wholly below it, keeping the one that holds `lsn`.
    pub fn forget_below(&mut self, lsn: u64) {
        let holding = self.history.partition_point(|s| s.first_lsn <= lsn);
        let keep_from = holding.saturating_sub(1);
        self.history.drain(..keep_from);
        self.floor = self.floor.max(lsn);
    }
}

/// What two logs share, from their ballot histories and their last lsns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// Both logs hold records 1..=lsn identically (0: nothing in common is known).
    Through(u64),
    /// The logs differ at or below a record one of them no longer describes: the replica behind
    /// needs a snapshot, not a truncation.
    Unknown,
}

/// The last record two logs share: the highest lsn both hold under the same ballot. Records
/// under one ballot at one lsn are the same record (one primary per ballot orders them), and a
/// log's ballots never go down as its lsns go up, so the logs agree up to that record and differ
/// after it. This is what a replica truncates to before it follows a primary (KIP-101: by ballot
/// history, never by high-watermark, which lost acknowledged writes).
pub fn common_prefix(mine: &Ballots, my_end: u64, theirs: &Ballots, their_end: u64) -> Shared {
    let mut lsn = my_end.min(their_end);
    while lsn > 0 {
        let (Some(a), Some(b)) = (mine.ballot_of(lsn), theirs.ballot_of(lsn)) else {
            return Shared::Unknown;
        };
        if a == b {
            return Shared::Through(lsn);
        }
        // The log with the higher ballot at `lsn` wrote its whole run under that ballot, which
        // the other log does not hold there: none of that run is shared.
        let run_start = if a > b { mine.run_start(lsn) } else { theirs.run_start(lsn) };
        lsn = run_start - 1;
    }
    Shared::Through(0)
}

/// Encodes `ballots` as the framed record of a ballots file.
pub(crate) fn encode(ballots: &Ballots) -> Vec<u8> {
    let mut out = vec![0; RECORD_HEADER_BYTES];
    bincode::serde::encode_into_std_write(ballots, &mut out, bincode::config::standard())
        .expect("ballots encode into memory");
    let payload_len = out.len() - RECORD_HEADER_BYTES;
    let crc = crc32c::crc32c(&out[RECORD_HEADER_BYTES..]);
    out[..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a ballots file, checking its frame, its checksum, its bound and its order.
pub(crate) fn decode(bytes: &[u8]) -> Result<Ballots, String> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(format!("{} bytes, shorter than a record header", bytes.len()));
    }
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let payload = &bytes[RECORD_HEADER_BYTES..];
    if len != payload.len() || len > BALLOTS_PAYLOAD_BYTES_MAX {
        return Err(format!("payload of {} bytes, header says {len}", payload.len()));
    }
    if crc32c::crc32c(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let (ballots, used) =
        proto::wire::decode_bounded::<Ballots, BALLOTS_PAYLOAD_BYTES_MAX>(payload)
            .map_err(|e| e.to_string())?;
    if used != payload.len() {
        return Err(format!("{} bytes after the record", payload.len() - used));
    }
    let h = &ballots.history;
    if h.len() > BALLOT_HISTORY_MAX {
        return Err(format!("{} ballot starts, over {BALLOT_HISTORY_MAX}", h.len()));
    }
    if h.windows(2).any(|w| w[0].ballot >= w[1].ballot || w[0].first_lsn >= w[1].first_lsn) {
        return Err("ballot starts out of order".into());
    }
    if h.last().is_some_and(|s| s.ballot > ballots.promised) {
        return Err("a record's ballot above the promise".into());
    }
    Ok(ballots)
}

/// Reads `dir`'s ballots; a tenant without the file has promised nothing and written under no
/// ballot.
pub fn read(vfs: &dyn Vfs, dir: &Path) -> Result<Ballots, StoreError> {
    let path = dir.join(BALLOTS_FILE);
    if !vfs.exists(&path).map_err(StoreError::io("stat ballots", &path))? {
        return Ok(Ballots::default());
    }
    let bytes = vfs.read(&path).map_err(StoreError::io("read ballots", &path))?;
    decode(&bytes).map_err(|detail| StoreError::Corrupt { path, detail })
}

/// Replaces `dir`'s ballots atomically and durably.
pub fn write(vfs: &dyn Vfs, dir: &Path, ballots: &Ballots) -> Result<(), StoreError> {
    let path = dir.join(BALLOTS_FILE);
    let temp: PathBuf = dir.join(format!("{BALLOTS_FILE}.tmp"));
    let mut file = vfs.create(&temp).map_err(StoreError::io("create ballots", &temp))?;
    file.write_all(&encode(ballots)).map_err(StoreError::io("write ballots", &temp))?;
    file.sync_data().map_err(StoreError::io("sync ballots", &temp))?;
    drop(file);
    vfs.rename(&temp, &path).map_err(StoreError::io("rename ballots", &path))?;
    vfs.sync_dir(dir).map_err(StoreError::io("sync tenant dir", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A history written by accepting `(ballot, lsn)` pairs in order.
    fn log(records: &[(u64, u64)]) -> Ballots {
        let mut b = Ballots::default();
        for &(ballot, lsn) in records {
            b.accept(ballot, lsn).expect("in order");
        }
        b
    }

    #[test]
    fn a_replica_follows_a_newer_primary_sending_older_records() {
        // Goal: records of an older ballot are taken from a primary leading under a newer one
        // (the promise rises to the sender's ballot), never from a sender below the promise, and
        // never records newer than their sender or out of order.
        let mut b = Ballots::default();
        assert_eq!(b.promise(6), Ok(true));
        assert_eq!(b.follow(6, 3, 1), Ok(true));
        assert_eq!(b.promised(), 6);
        assert_eq!(b.follow(6, 3, 2), Ok(false));
        assert_eq!(b.follow(5, 3, 3), Err(BallotError::Stale { ballot: 5, promised: 6 }));
        assert!(matches!(b.follow(6, 7, 3), Err(BallotError::OutOfOrder { .. })));
        assert!(matches!(b.follow(6, 2, 3), Err(BallotError::OutOfOrder { .. })));
        assert_eq!(b.promised(), 6, "a refusal leaves the promise");
        assert_eq!(b.follow(8, 6, 3), Ok(true));
        assert_eq!((b.promised(), b.ballot_of(2), b.ballot_of(3)), (8, Some(3), Some(6)));
        // A newer primary sending records of the last run: the history stays, the promise rises,
        // and the change is reported, so that it is made durable.
        assert_eq!(b.follow(9, 6, 4), Ok(true));
        assert_eq!((b.promised(), b.ballot_of(4)), (9, Some(6)));
        assert_eq!(b.follow(9, 6, 5), Ok(false));
    }

    #[test]
    fn promises_only_go_up_and_fence_lower_ballots() {
        // Goal: a promise refuses every lower ballot, for promises and records alike.
        let mut b = Ballots::default();
        assert_eq!(b.promise(5), Ok(true));
        assert_eq!(b.promise(5), Ok(false));
        assert_eq!(b.promise(4), Err(BallotError::Stale { ballot: 4, promised: 5 }));
        assert_eq!(b.accept(3, 1), Err(BallotError::Stale { ballot: 3, promised: 5 }));
        assert_eq!(b.accept(5, 1), Ok(true));
        assert_eq!(b.accept(5, 2), Ok(false));
        assert_eq!(b.accept(7, 3), Ok(true));
        assert_eq!(b.promised(), 7);
        assert_eq!(
            b.history(),
            &[BallotStart { ballot: 5, first_lsn: 1 }, BallotStart { ballot: 7, first_lsn: 3 }]
        );
    }

    #[test]
    fn records_keep_ballot_order() {
        // Goal: a record of a lower ballot than the log's last is refused; a run started by
        // `lead` with no record yet gives way to a higher ballot, and to a lower one whose
        // records a later primary sends to fill the log from where the run was to start.
        let mut b = log(&[(2, 3), (4, 5)]);
        assert!(matches!(b.follow(5, 3, 6), Err(BallotError::OutOfOrder { .. })));
        assert_eq!(b.lead(9, 6), Ok(true));
        assert_eq!(b.follow(13, 5, 6), Ok(true), "the empty run of ballot 9 gives way");
        assert_eq!(
            b.history(),
            &[
                BallotStart { ballot: 2, first_lsn: 3 },
                BallotStart { ballot: 4, first_lsn: 5 },
                BallotStart { ballot: 5, first_lsn: 6 }
            ]
        );
        assert_eq!(b.promised(), 13);
        let mut b = log(&[(2, 5)]);
        assert_eq!(b.lead(3, 6), Ok(true));
        assert_eq!(b.accept(4, 6), Ok(true), "the empty run of ballot 3 is replaced");
        assert_eq!(
            b.history(),
            &[BallotStart { ballot: 2, first_lsn: 5 }, BallotStart { ballot: 4, first_lsn: 6 }]
        );
        assert_eq!(b.accept(3, 7), Err(BallotError::Stale { ballot: 3, promised: 4 }));
        let mut b = log(&[(2, 5)]);
        assert_eq!(b.accept(3, 6), Ok(true));
        assert_eq!(b.ballot_of(4), Some(0), "records before any start are ballot 0");
        assert_eq!(b.ballot_of(5), Some(2));
        assert_eq!(b.ballot_of(100), Some(3));
        assert_eq!(b.position(0), LogPosition { ballot: 0, lsn: 0 });
        assert_eq!(b.position(9), LogPosition { ballot: 3, lsn: 9 });
    }

    #[test]
    fn logs_compare_by_ballot_then_lsn() {
        // Goal: the most advanced log is the one with the higher last ballot, whatever its length.
        let short_newer = LogPosition { ballot: 3, lsn: 4 };
        let long_older = LogPosition { ballot: 2, lsn: 40 };
        assert!(short_newer > long_older);
        assert!(LogPosition { ballot: 3, lsn: 5 } > short_newer);
    }

    #[test]
    fn common_prefix_walks_back_over_diverged_runs() {
        // Goal: the example where one round of KIP-101's end-offset exchange is not enough. The
        // follower wrote 8..=9 under ballot 1 and 10..=15 under ballot 3; the primary wrote
        // 8..=11 under 2 and 12..=20 under 4. They share 1..=7 only.
        let follower = log(&[(1, 1), (3, 10)]);
        let primary = log(&[(1, 1), (2, 8), (4, 12)]);
        assert_eq!(common_prefix(&follower, 15, &primary, 20), Shared::Through(7));
        assert_eq!(common_prefix(&primary, 20, &follower, 15), Shared::Through(7));
        // A follower that is only behind shares all it has.
        let behind = log(&[(1, 1), (2, 8)]);
        assert_eq!(common_prefix(&behind, 9, &primary, 20), Shared::Through(9));
        // A returning primary with an unacknowledged tail under its old ballot.
        let old = log(&[(1, 1), (2, 8)]);
        let new = log(&[(1, 1), (2, 8), (5, 11)]);
        assert_eq!(common_prefix(&old, 13, &new, 12), Shared::Through(10));
        // Nothing shared at all.
        assert_eq!(common_prefix(&log(&[(1, 1)]), 3, &log(&[(2, 1)]), 3), Shared::Through(0));
    }

    #[test]
    fn forgotten_records_make_the_prefix_unknown() {
        // Goal: below a checkpoint the history is gone, so a replica that diverges there is
        // sent a snapshot rather than told a truncation point it cannot check.
        let mut primary = log(&[(1, 1), (2, 8), (4, 12)]);
        primary.forget_below(13);
        assert_eq!(primary.history(), &[BallotStart { ballot: 4, first_lsn: 12 }]);
        assert_eq!(primary.ballot_of(12), None);
        assert_eq!(primary.ballot_of(13), Some(4));
        let follower = log(&[(1, 1), (3, 10)]);
        assert_eq!(common_prefix(&follower, 15, &primary, 20), Shared::Unknown);
        let caught_up = log(&[(1, 1), (2, 8), (4, 12)]);
        assert_eq!(common_prefix(&caught_up, 18, &primary, 20), Shared::Through(18));
    }

    #[test]
    fn truncation_drops_the_starts_of_cut_records() {
        let mut b = log(&[(1, 1), (3, 10)]);
        b.truncate_after(7);
        assert_eq!(b.history(), &[BallotStart { ballot: 1, first_lsn: 1 }]);
        assert_eq!(b.accept(5, 8), Ok(true));
    }

    #[test]
    fn the_file_round_trips_and_refuses_damage() {
        // Goal: encode/decode round-trips; a flipped bit, a truncation, an unordered history
        // or a record above the promise is refused with a reason.
        let b = log(&[(1, 1), (2, 8), (4, 12)]);
        let bytes = encode(&b);
        assert_eq!(decode(&bytes), Ok(b.clone()));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad).is_err(), "bit flip at {i} accepted");
        }
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "truncation to {cut} accepted");
        }
        let unordered = Ballots {
            promised: 9,
            floor: 0,
            history: vec![
                BallotStart { ballot: 4, first_lsn: 1 },
                BallotStart { ballot: 2, first_lsn: 8 },
            ],
        };
        assert!(decode(&encode(&unordered)).unwrap_err().contains("order"));
        let over = Ballots {
            promised: 1,
            floor: 0,
            history: vec![BallotStart { ballot: 2, first_lsn: 1 }],
        };
        assert!(decode(&encode(&over)).unwrap_err().contains("promise"));
    }

    #[test]
    fn the_file_is_replaced_durably() {
        // Goal: write then read returns the ballots; a directory without the file has none.
        let dir = tempfile::tempdir().expect("temp dir");
        let vfs = super::super::RealVfs;
        assert_eq!(read(&vfs, dir.path()).expect("read"), Ballots::default());
        let b = log(&[(3, 1)]);
        write(&vfs, dir.path(), &b).expect("write");
        assert_eq!(read(&vfs, dir.path()).expect("read"), b);
        std::fs::write(dir.path().join(BALLOTS_FILE), b"garbage!garbage").expect("damage");
        assert!(matches!(read(&vfs, dir.path()), Err(StoreError::Corrupt { .. })));
    }
}
