//! A tenant's write-ahead log, with group commit.
//!
//! Every change to a tenant's phexts is first a record in its log; an answer goes out only once
//! its record is fsynced. Records are framed as `[len u32][crc32c u32][payload]` (little-endian;
//! the CRC covers the payload) and the payload is the bincode-2 (serde) encoding of
//! [`Record`]. A record whose frame is short, zero-length or fails its CRC marks the end of the
//! log: it is a write torn by a crash, never applied.
//!
//! The log is a run of segment files `<first lsn:020>.log`; a checkpoint starts a new one and
//! deletes the older ones once the phexts they changed are rewritten.
//!
//! Group commit is leader/follower on one mutex and condvar, with no thread of its own: a writer
//! appends its record to the pending buffer and takes an LSN; whoever then waits for an LSN that
//! is neither synced nor being synced becomes the flusher, writes and syncs the whole buffer
//! outside the lock, and wakes everyone. While one batch syncs, the next one gathers. The pending
//! buffer holds at most one record per writer still waiting for its answer, so it is bounded by
//! the node's blocking-thread pool times [`RECORD_PAYLOAD_BYTES_MAX`].

use std::mem;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use proto::Coordinate;
use serde::{Deserialize, Serialize};

use super::error::StoreError;
use super::vfs::{create_dir_durable, Vfs, VfsFile};

/// Bytes before each record's payload: its length and CRC-32C, as little-endian `u32`s.
pub(crate) const RECORD_HEADER_BYTES: usize = 8;

/// The largest payload a record may have, in bytes: a scroll as large as the largest request
/// body, plus 64 KiB for its phext name and encoding. A longer length field is a torn write.
pub(crate) const RECORD_PAYLOAD_BYTES_MAX: usize = proto::request::BODY_BYTES_MAX + 64 * 1024;

/// The file name suffix of a log segment. Its stem is the segment's first LSN in 20 digits, so
/// that names sort in LSN order.
pub(crate) const SEGMENT_SUFFIX: &str = ".log";

/// A change to one scroll. `S` is `&str` when writing and `String` when reading back; both
/// encode the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Op<S> {
    /// Replace the scroll at `c`; empty text deletes it (an update or a delete).
    Set { c: Coordinate, text: S },
    /// Cut the scroll at `c` to `len_before` bytes, then append `text` (an insert). Replaying it
    /// over a state that already holds it changes nothing.
    TruncateAppend { c: Coordinate, len_before: u64, text: S },
}

impl Op<String> {
    /// The same change, borrowing its text: what [`Wal::append`] takes.
    pub(crate) fn as_borrowed(&self) -> Op<&str> {
        match self {
            Op::Set { c, text } => Op::Set { c: *c, text },
            Op::TruncateAppend { c, len_before, text } => {
                Op::TruncateAppend { c: *c, len_before: *len_before, text }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record<S> {
    pub lsn: u64,
    pub phext: S,
    pub op: Op<S>,
}

fn encode_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Appends one framed record to `out`, returning its size in bytes.
pub(crate) fn encode_record(out: &mut Vec<u8>, record: &Record<&str>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    // Serialising integers and strings into a Vec cannot fail.
    bincode::serde::encode_into_std_write(record, out, encode_config())
        .expect("a record encodes into memory");
    let payload_len = out.len() - start - RECORD_HEADER_BYTES;
    assert!(
        payload_len <= RECORD_PAYLOAD_BYTES_MAX,
        "record of {payload_len} bytes: request validation let it through"
    );
    let crc = crc32c::crc32c(&out[start + RECORD_HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// What the bytes at the start of a segment's remainder hold.
#[derive(Debug)]
pub(crate) enum Next {
    /// Nothing: the segment ends cleanly.
    End,
    /// A whole record, `len` bytes with its frame.
    Record { record: Record<String>, len: usize },
    /// A torn or garbled frame: the log ends here.
    Torn(&'static str),
}

/// Reads the record at the start of `buf`. A frame that checks out but does not decode is not a
/// torn write but a file the store did not write: that is `Corrupt`.
pub(crate) fn decode_next(buf: &[u8], path: &Path) -> Result<Next, StoreError> {
    if buf.is_empty() {
        return Ok(Next::End);
    }
    let Some(header) = buf.get(..RECORD_HEADER_BYTES) else {
        return Ok(Next::Torn("short header"));
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    // A zero-filled tail (space the file system allocated but never wrote) reads as an empty
    // payload with a matching CRC of 0; no real record is empty.
    if len == 0 || len > RECORD_PAYLOAD_BYTES_MAX {
        return Ok(Next::Torn("bad length"));
    }
    let Some(payload) = buf.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len) else {
        return Ok(Next::Torn("short payload"));
    };
    if crc32c::crc32c(payload) != crc {
        return Ok(Next::Torn("bad checksum"));
    }
    // Claims (allocates) at most `proto::wire::decode_claim_budget` of the payload's length: a
    // damaged length prefix inside a record must not allocate up to the whole record limit.
    match proto::wire::decode_bounded::<Record<String>, RECORD_PAYLOAD_BYTES_MAX>(payload) {
        Ok((record, used)) if used == len => {
            Ok(Next::Record { record, len: RECORD_HEADER_BYTES + len })
        }
        Ok(_) => Err(StoreError::corrupt(path, "record has trailing bytes")),
        Err(e) => Err(StoreError::corrupt(path, format!("record does not decode: {e}"))),
    }
}

/// The file, in a tenant's directory, that holds the LSN its log continues from after a
/// checkpoint deleted every segment: lsns never restart, so a record's lsn names it for the
/// tenant's whole life (what replicas compare, docs/REPLICATION.md).
pub(crate) const LOG_BASE_FILE: &str = "log-base";

/// The bytes of a log-base file: the LSN (u64, little-endian) and its CRC-32C.
fn encode_base(next_lsn: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&next_lsn.to_le_bytes());
    let crc = crc32c::crc32c(&out[..8]);
    out[8..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The LSN a log-base file's bytes hold, or why they are not one.
fn decode_base(bytes: &[u8]) -> Result<u64, &'static str> {
    let bytes: &[u8; 12] = bytes.try_into().map_err(|_| "not 12 bytes")?;
    let (lsn, crc) = bytes.split_at(8);
    if crc32c::crc32c(lsn).to_le_bytes() != crc {
        return Err("checksum mismatch");
    }
    Ok(u64::from_le_bytes(lsn.try_into().expect("8 bytes")))
}

/// The LSN the log of the tenant at `root` continues from when no segment is left: 1 for a
/// tenant never checkpointed.
pub(crate) fn read_base(vfs: &dyn Vfs, root: &Path) -> Result<u64, StoreError> {
    let path = root.join(LOG_BASE_FILE);
    if !vfs.exists(&path).map_err(StoreError::io("stat log base", &path))? {
        return Ok(1);
    }
    let bytes = vfs.read(&path).map_err(StoreError::io("read log base", &path))?;
    decode_base(&bytes).map_err(|detail| StoreError::corrupt(&path, detail))
}

/// Records durably that the log of the tenant at `root` continues from `next_lsn`: written by a
/// checkpoint before it deletes the segments below it.
pub(crate) fn write_base(vfs: &dyn Vfs, root: &Path, next_lsn: u64) -> Result<(), StoreError> {
    let path = root.join(LOG_BASE_FILE);
    let temp = root.join(format!("{LOG_BASE_FILE}.tmp"));
    let mut file = vfs.create(&temp).map_err(StoreError::io("create log base", &temp))?;
    file.write_all(&encode_base(next_lsn)).map_err(StoreError::io("write log base", &temp))?;
    file.sync_data().map_err(StoreError::io("sync log base", &temp))?;
    drop(file);
    vfs.rename(&temp, &path).map_err(StoreError::io("rename log base", &path))?;
    vfs.sync_dir(root).map_err(StoreError::io("sync tenant dir", root))
}

pub(crate) fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}{SEGMENT_SUFFIX}")
}

/// The first LSN a segment file name stands for; `None` for any other name.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// The log segments of `dir`: their first LSNs in ascending order, and the names of any other
/// entries (files the store did not write). A missing directory holds none.
pub(crate) fn list_segments(
    vfs: &dyn Vfs,
    dir: &Path,
) -> Result<(Vec<u64>, Vec<String>), StoreError> {
    let names = match vfs.list(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        other => other.map_err(StoreError::io("list log dir", dir))?,
    };
    let (mut starts, mut others) = (Vec::new(), Vec::new());
    for name in names {
        match parse_segment_name(&name) {
            Some(start) => starts.push(start),
            None => others.push(name),
        }
    }
    starts.sort_unstable();
    Ok((starts, others))
}

pub(crate) struct Wal {
    dir: PathBuf,
    vfs: Arc<dyn Vfs>,
    state: Mutex<WalState>,
    synced: Condvar,
}

struct WalState {
    /// The LSN the next record gets.
    next_lsn: u64,
    /// Every record up to here is durable.
    synced_lsn: u64,
    /// Framed records not yet handed to a flusher, from `pending_first_lsn` to `next_lsn - 1`.
    pending: Vec<u8>,
    pending_first_lsn: u64,
    /// A flusher is writing a batch outside the lock.
    flushing: bool,
    /// Set by a failed flush; the log takes no more records and every waiter gets this.
    failed: Option<StoreError>,
    /// The open segment; `None` until the first flush after opening or rotating the log. The
    /// flusher takes it out while it writes.
    file: Option<(PathBuf, Box<dyn VfsFile>)>,
    /// Bytes in all segments, counting pending records: what a checkpoint would free.
    log_bytes: u64,
}

impl Wal {
    /// A log over `dir` whose next record gets `next_lsn`; `log_bytes` are already on disk there.
    pub(crate) fn new(dir: PathBuf, vfs: Arc<dyn Vfs>, next_lsn: u64, log_bytes: u64) -> Wal {
        assert!(next_lsn >= 1, "LSNs start at 1");
        let state = WalState {
            next_lsn,
            synced_lsn: next_lsn - 1,
            pending: Vec::new(),
            pending_first_lsn: next_lsn,
            flushing: false,
            failed: None,
            file: None,
            log_bytes,
        };
        Wal { dir, vfs, state: Mutex::new(state), synced: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, WalState> {
        self.state.lock().expect("wal lock poisoned: a thread panicked while holding it")
    }

    /// Adds a record to the pending batch and returns its LSN. Not durable until
    /// [`Wal::wait_durable`] returns for it.
    pub(crate) fn append(&self, phext: &str, op: Op<&str>) -> Result<u64, StoreError> {
        let mut st = self.lock();
        if let Some(e) = &st.failed {
            return Err(e.clone());
        }
        let lsn = st.next_lsn;
        if st.pending.is_empty() {
            st.pending_first_lsn = lsn;
        }
        let bytes = encode_record(&mut st.pending, &Record { lsn, phext, op });
        st.next_lsn += 1;
        st.log_bytes += bytes as u64;
        Ok(lsn)
    }

    /// Returns once every record up to `lsn` is durable, flushing the pending batch itself if no
    /// one else is. Fails if the log failed before `lsn` was synced.
    /// True if every record up to `lsn` is durable now; false too if the log's lock is taken.
    /// Never waits and never writes.
    pub(crate) fn is_durable_now(&self, lsn: u64) -> bool {
        super::tried(self.state.try_lock()).is_some_and(|st| st.synced_lsn >= lsn)
    }

    pub(crate) fn wait_durable(&self, lsn: u64) -> Result<(), StoreError> {
        let mut st = self.lock();
        loop {
            if st.synced_lsn >= lsn {
                return Ok(());
            }
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            if st.flushing {
                st = self
                    .synced
                    .wait(st)
                    .expect("wal lock poisoned: a thread panicked while holding it");
                continue;
            }
            assert!(
                lsn < st.next_lsn && !st.pending.is_empty(),
                "lsn {lsn} is neither synced nor pending"
            );
            st.flushing = true;
            let batch = mem::take(&mut st.pending);
            let (first, last) = (st.pending_first_lsn, st.next_lsn - 1);
            let file = st.file.take();
            drop(st);
            let result = self.write_batch(file, first, &batch);
            st = self.lock();
            st.flushing = false;
            match result {
                Ok(file) => {
                    st.file = Some(file);
                    st.synced_lsn = last;
                }
                Err(e) => {
                    tracing::error!(error = %e, dir = ?self.dir, "log write failed; the tenant will be reloaded");
                    st.failed = Some(e);
                }
            }
            self.synced.notify_all();
        }
    }

    fn write_batch(
        &self,
        file: Option<(PathBuf, Box<dyn VfsFile>)>,
        first_lsn: u64,
        batch: &[u8],
    ) -> Result<(PathBuf, Box<dyn VfsFile>), StoreError> {
        let (path, mut file) = match file {
            Some(open) => open,
            None => self.open_segment(first_lsn)?,
        };
        file.write_all(batch).map_err(StoreError::io("append to log", &path))?;
        file.sync_data().map_err(StoreError::io("sync log", &path))?;
        Ok((path, file))
    }

    /// Creates the segment whose first record is `first_lsn`, and the directories above it,
    /// durably: a synced record in a file whose directory entry is lost would be lost too.
    fn open_segment(&self, first_lsn: u64) -> Result<(PathBuf, Box<dyn VfsFile>), StoreError> {
        create_dir_durable(self.vfs.as_ref(), &self.dir)
            .map_err(StoreError::io("create log dir", &self.dir))?;
        let path = self.dir.join(segment_name(first_lsn));
        let file =
            self.vfs.create_new(&path).map_err(StoreError::io("create log segment", &path))?;
        self.vfs.sync_dir(&self.dir).map_err(StoreError::io("sync log dir", &self.dir))?;
        Ok((path, file))
    }

    /// The LSN of the newest record, 0 if none was ever written.
    pub(crate) fn last_lsn(&self) -> u64 {
        self.lock().next_lsn - 1
    }

    /// The LSN of the newest durable record: every record up to it is synced.
    pub(crate) fn durable_lsn(&self) -> u64 {
        self.lock().synced_lsn
    }

    /// [`Self::durable_lsn`], or `None` if another thread holds the log's lock now.
    pub(crate) fn try_durable_lsn(&self) -> Option<u64> {
        super::tried(self.state.try_lock()).map(|st| st.synced_lsn)
    }

    pub(crate) fn failed(&self) -> bool {
        self.lock().failed.is_some()
    }

    pub(crate) fn log_bytes(&self) -> u64 {
        self.lock().log_bytes
    }

    /// Closes the current segment so that the next record starts a new one, and returns that
    /// record's LSN: every segment named below it may be deleted once the phexts are rewritten.
    /// The caller keeps writers out and has waited for every record to be durable.
    pub(crate) fn rotate(&self) -> u64 {
        let mut st = self.lock();
        assert!(
            !st.flushing && st.pending.is_empty() && st.synced_lsn + 1 == st.next_lsn,
            "rotate needs a quiet, synced log"
        );
        st.file = None;
        st.log_bytes = 0;
        st.next_lsn
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: every prefix of a log decodes to exactly the whole records it holds, then a clean end
    // or a torn record, never a wrong record; segment names round-trip and others are refused.
    #[test]
    fn every_cut_of_the_log_decodes_to_its_whole_records() {
        let c = Coordinate::ORIGIN;
        let records = [
            Record { lsn: 7, phext: "a", op: Op::Set { c, text: "hello" } },
            Record {
                lsn: 8,
                phext: "b",
                op: Op::TruncateAppend { c, len_before: 5, text: " wörld" },
            },
            Record { lsn: 9, phext: "a", op: Op::Set { c, text: "" } },
        ];
        let mut log = Vec::new();
        let ends: Vec<usize> = records
            .iter()
            .map(|r| encode_record(&mut log, r))
            .scan(0, |at, n| {
                *at += n;
                Some(*at)
            })
            .collect();
        let path = Path::new("test.log");
        for cut in 0..=log.len() {
            let (mut at, mut seen) = (0, 0);
            loop {
                match decode_next(&log[at..cut], path).expect("our own bytes never look corrupt") {
                    Next::Record { record, len } => {
                        let want = &records[seen];
                        assert_eq!(record.lsn, want.lsn);
                        assert_eq!(record.phext, want.phext);
                        seen += 1;
                        at += len;
                    }
                    Next::End => {
                        assert_eq!(at, cut);
                        break;
                    }
                    Next::Torn(_) => break,
                }
            }
            assert_eq!(seen, ends.iter().filter(|&&e| e <= cut).count(), "cut at {cut}");
        }
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        for bad in ["42.log", "0000000000000000004x.log", "00000000000000000042.tmp"] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    // Goal: a log base round-trips, and any damage to its bytes is refused.
    #[test]
    fn a_log_base_refuses_damage() {
        let bytes = encode_base(1_234_567);
        assert_eq!(decode_base(&bytes), Ok(1_234_567));
        for i in 0..bytes.len() {
            let mut bad = bytes;
            bad[i] ^= 0x01;
            assert!(decode_base(&bad).is_err(), "bit flip at {i} accepted");
        }
        assert!(decode_base(&bytes[..11]).is_err());
    }
}
