//! The store's side of replication (docs/REPLICATION.md): what a replica promised and where its
//! log ends ([`Store::replica_state`], [`Store::promise`]), a primary starting to write under a
//! ballot ([`Store::lead`]), the records a primary ships ([`Store::log_from`]), a backup taking
//! them ([`Store::append_from_primary`]) and a replica cutting a tail it does not share
//! ([`Store::truncate_after`]).
//!
//! Records travel as the log stores them, framed and checksummed, and a backup checks each one
//! as it checks its own log at recovery and a request at the door: a replica never applies what
//! it could not have written itself.

use std::path::Path;

use super::ballots::{BallotError, Ballots, LogPosition};
use super::error::StoreError;
use super::recovery::{check_record, Load};
use super::tenant::{Tail, TenantPaths};
use super::wal::{decode_next, list_segments, segment_name, Next};
use super::{check_tenant_id, lock_slot, Store};

/// The most bytes of records [`Store::log_from`] returns at once (at least one record, however
/// large): a batch is one message between nodes.
pub const REPLICA_BATCH_BYTES_MAX: usize = 4 << 20;

/// What a replica holds of a tenant: its promise and ballot history, and its log's last record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    pub ballots: Ballots,
    pub last_lsn: u64,
}

impl ReplicaState {
    /// Where the log ends: what a prepare round compares.
    pub fn position(&self) -> LogPosition {
        self.ballots.position(self.last_lsn)
    }
}

/// Why a backup refused a primary's records. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendRefusal {
    #[error(transparent)]
    Ballot(#[from] BallotError),
    /// The records do not continue this replica's log, which ends at `have`: the primary sends
    /// from further back, or the replica truncates to what the two logs share.
    #[error("the records do not continue this log, which ends at record {} of ballot {}", .have.lsn, .have.ballot)]
    NotContinuing { have: LogPosition },
}

/// What a primary sends one backup next for a tenant ([`Store::shipment`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shipment {
    /// Framed records `prev.lsn + 1 ..= last_lsn`, all written under `ballot`.
    Records { prev: LogPosition, ballot: u64, bytes: Vec<u8>, last_lsn: u64 },
    /// No durable record after the backup's end.
    Nothing,
    /// The records after the backup's end are folded into the phext files: it needs a snapshot.
    Checkpointed,
}

/// A run of a tenant's log, as [`Store::log_from`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTail {
    /// Framed records `first_lsn..=last_lsn`, as the log holds them (none when `first_lsn` is
    /// past the durable end: `last_lsn` is then `first_lsn - 1`).
    Records { bytes: Vec<u8>, first_lsn: u64, last_lsn: u64 },
    /// The log no longer holds `from`: a checkpoint folded it into the phext files, so the
    /// replica behind needs a snapshot.
    Checkpointed,
}

/// The records kept in `tail` that follow `prev` under one ballot, up to `upto` and at most
/// [`REPLICA_BATCH_BYTES_MAX`] bytes (at least one record); `None` when the tail no longer
/// holds the record after `prev`.
fn records_from_tail(tail: &Tail, prev: LogPosition, upto: u64) -> Option<Shipment> {
    let after = prev.lsn;
    let start = tail.records.partition_point(|r| r.lsn <= after);
    let first = tail.records.get(start).filter(|r| r.lsn == after + 1)?;
    let (ballot, mut bytes, mut last_lsn) = (first.ballot, Vec::new(), after);
    for r in tail.records.range(start..) {
        let fits = bytes.is_empty() || bytes.len() + r.framed.len() <= REPLICA_BATCH_BYTES_MAX;
        if r.lsn != last_lsn + 1 || r.lsn > upto || r.ballot != ballot || !fits {
            break;
        }
        bytes.extend_from_slice(&r.framed);
        last_lsn = r.lsn;
    }
    Some(Shipment::Records { prev, ballot, bytes, last_lsn })
}

impl Store {
    /// Switches on (or off) keeping every loaded tenant's newest records in memory for its
    /// backups: on while the cluster replicates. Tenants loaded later follow the switch.
    pub fn keep_tails(&self, on: bool) {
        self.keeps_tails.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// What a primary sends a backup whose log ends at record `after`: the durable records up to
    /// `upto` that follow it under one ballot, at most [`REPLICA_BATCH_BYTES_MAX`] bytes of them
    /// (at least one record). From the records kept in memory when they reach back to `after`,
    /// else from the log on disk. Never a record not yet durable here: if its log write failed,
    /// this node would write another record at its lsn under the same ballot, and a backup
    /// holding the first would differ from it at the same position.
    pub fn shipment(&self, tenant: &str, after: u64, upto: u64) -> Result<Shipment, StoreError> {
        check_tenant_id(tenant)?;
        if after >= upto {
            return Ok(Shipment::Nothing);
        }
        let (ballots, kept) = self.on_loaded(tenant, |t| {
            let upto = upto.min(t.durable_lsn());
            if after >= upto {
                return Ok(Some((Ballots::default(), Some(Shipment::Nothing))));
            }
            let ballots = t.replica_state().0;
            let Some(prev_ballot) = ballots.ballot_of(after) else {
                return Ok(Some((ballots, Some(Shipment::Checkpointed))));
            };
            let prev = LogPosition { ballot: prev_ballot, lsn: after };
            let kept = t.with_tail(|tail| records_from_tail(tail, prev, upto));
            Ok(Some((ballots, kept)))
        })?;
        if let Some(shipment) = kept {
            return Ok(shipment);
        }
        let first = after + 1;
        let Some(ballot) = ballots.ballot_of(first) else {
            return Ok(Shipment::Checkpointed);
        };
        // The run of `ballot` ends where the next ballot's records start.
        let run_end = ballots
            .history()
            .iter()
            .find(|s| s.first_lsn > first)
            .map_or(u64::MAX, |s| s.first_lsn - 1);
        let prev = LogPosition { ballot: ballots.ballot_of(after).unwrap_or(0), lsn: after };
        match self.log_from(tenant, first)? {
            LogTail::Checkpointed => Ok(Shipment::Checkpointed),
            LogTail::Records { bytes, first_lsn, last_lsn } => {
                let last = last_lsn.min(upto).min(run_end);
                if last < first_lsn {
                    return Ok(Shipment::Nothing);
                }
                let bytes = leading_records(&bytes, last - first_lsn + 1)?;
                Ok(Shipment::Records { prev, ballot, bytes, last_lsn: last })
            }
        }
    }

    /// [`Self::shipment`] from the records kept in memory alone, without waiting for any lock
    /// another thread holds and without touching the disk, so an async task may call it:
    /// `None` when that cannot answer (the tenant is not loaded or is busy, the records no
    /// longer reach back to `after`, `after` was checkpointed); the caller then asks
    /// [`Self::shipment`] on the blocking pool. Saves a primary's replication a hop to that
    /// pool and back for each message in the common case.
    pub fn shipment_in_memory(&self, tenant: &str, after: u64, upto: u64) -> Option<Shipment> {
        let t = self.try_loaded_whole(tenant)?;
        let upto = upto.min(t.try_durable_lsn()?);
        if after >= upto {
            return Some(Shipment::Nothing);
        }
        let prev = LogPosition { ballot: t.try_ballot_of(after)??, lsn: after };
        let shipment = t.try_with_tail(|tail| records_from_tail(tail, prev, upto))??;
        t.touch(self.clock.now_ms());
        Some(shipment)
    }

    /// Drops the records kept in memory for backups up to `lsn` (every backup holds them), if
    /// the tenant is loaded.
    pub fn trim_tail(&self, tenant: &str, lsn: u64) {
        if let Some(t) = self.loaded(tenant) {
            t.trim_tail(lsn);
        }
    }

    /// The last durable record of the tenant's log, if it is loaded. Everything a read answered
    /// is durable, so up to here; records logged after it may still fail and be written again
    /// differently. A tenant unloaded since a read may have records the read saw: ask
    /// [`Store::durable_state`] then.
    pub fn durable_lsn_if_loaded(&self, tenant: &str) -> Option<u64> {
        self.loaded(tenant).map(|t| t.durable_lsn())
    }

    /// The tenant's promise and ballot history, and the last record of its log once every record
    /// up to it is durable: what a replica reports of itself to a primary.
    pub fn durable_state(&self, tenant: &str) -> Result<ReplicaState, StoreError> {
        check_tenant_id(tenant)?;
        self.on_loaded_as(tenant, Load::Log, |t| {
            let (ballots, last_lsn) = t.replica_state();
            t.wait_durable(last_lsn)?;
            Ok(Some(ReplicaState { ballots, last_lsn }))
        })
    }

    /// The tenant's promise, ballot history and log end, loading it if needed.
    pub fn replica_state(&self, tenant: &str) -> Result<ReplicaState, StoreError> {
        check_tenant_id(tenant)?;
        self.on_loaded_as(tenant, Load::Log, |t| {
            let (ballots, last_lsn) = t.replica_state();
            Ok(Some(ReplicaState { ballots, last_lsn }))
        })
    }

    /// Promises `ballot` for the tenant (durably): lower ballots are refused from now on. Answers
    /// what this replica holds, for the new primary's choice of the most advanced log.
    pub fn promise(
        &self,
        tenant: &str,
        ballot: u64,
    ) -> Result<Result<ReplicaState, BallotError>, StoreError> {
        check_tenant_id(tenant)?;
        let promised = self.on_loaded_as(tenant, Load::Log, |t| {
            t.change_ballots(|b, _| Ok(((), b.promise(ballot)?)))
        })?;
        match promised {
            Err(refused) => Ok(Err(refused)),
            Ok(()) => self.replica_state(tenant).map(Ok),
        }
    }

    /// This replica becomes the tenant's primary under `ballot`: its writes from now on are
    /// records of that ballot. Durable before it returns; refused for a ballot below the promise.
    pub fn lead(&self, tenant: &str, ballot: u64) -> Result<Result<(), BallotError>, StoreError> {
        check_tenant_id(tenant)?;
        self.on_loaded(tenant, |t| t.change_ballots(|b, last| Ok(((), b.lead(ballot, last + 1)?))))
    }

    /// After [`Self::lead`]: logs the tenant's barrier under `ballot` if its log's last record
    /// is of an earlier ballot (`Tenant::barrier`), durably; its lsn, or `None` if none was
    /// needed.
    pub fn barrier(&self, tenant: &str, ballot: u64) -> Result<Option<u64>, StoreError> {
        check_tenant_id(tenant)?;
        self.on_loaded(tenant, |t| t.barrier(ballot))
    }

    /// The tenant's durable records from `from_lsn` on, at most [`REPLICA_BATCH_BYTES_MAX`]
    /// bytes of them (at least one record), as its log holds them.
    pub fn log_from(&self, tenant: &str, from_lsn: u64) -> Result<LogTail, StoreError> {
        check_tenant_id(tenant)?;
        let from_lsn = from_lsn.max(1);
        let durable = self.on_loaded_as(tenant, Load::Log, |t| {
            let last = t.replica_state().1;
            t.wait_durable(last)?;
            Ok(Some(last))
        })?;
        if from_lsn > durable {
            return Ok(LogTail::Records {
                bytes: Vec::new(),
                first_lsn: from_lsn,
                last_lsn: durable,
            });
        }
        let dir = TenantPaths::new(&self.tenants_dir, tenant).wal;
        let (starts, _) = list_segments(self.vfs.as_ref(), &dir)?;
        // The segment holding `from_lsn` is the last one starting at or before it.
        let Some(first_segment) = starts.iter().rposition(|&s| s <= from_lsn) else {
            return Ok(LogTail::Checkpointed);
        };
        let mut bytes = Vec::new();
        let mut next = from_lsn;
        for &start in &starts[first_segment..] {
            let path = dir.join(segment_name(start));
            let segment = match self.vfs.read(&path) {
                // A checkpoint deleted it meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(LogTail::Checkpointed)
                }
                other => other.map_err(StoreError::io("read log segment", &path))?,
            };
            if !take_records(&path, &segment, start, &mut next, durable, &mut bytes)? {
                break;
            }
        }
        if next == from_lsn {
            // The segments hold no record `from_lsn`: it was folded into the phext files.
            return Ok(LogTail::Checkpointed);
        }
        Ok(LogTail::Records { bytes, first_lsn: from_lsn, last_lsn: next - 1 })
    }

    /// Takes records written under `records_ballot` that a primary leading under `ballot` sent
    /// for the tenant, continuing this replica's log after `prev` (framed as [`Self::log_from`]
    /// returns them; a new primary sends records of earlier ballots too). Each is checked as a record
    /// of this node's own log would be; a batch that is damaged or does not run on from `prev`
    /// one lsn at a time is refused as corrupt, changing nothing. Answers the log's end once it
    /// is durable, or why the records were refused.
    pub fn append_from_primary(
        &self,
        tenant: &str,
        ballot: u64,
        records_ballot: u64,
        prev: LogPosition,
        bytes: &[u8],
    ) -> Result<Result<LogPosition, AppendRefusal>, StoreError> {
        check_tenant_id(tenant)?;
        let from = Path::new("records from the primary");
        let mut records = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            match decode_next(&bytes[at..], from)? {
                Next::Record { record, len } => {
                    if record.lsn != prev.lsn + 1 + records.len() as u64 {
                        let detail =
                            format!("record {} out of order after {}", record.lsn, prev.lsn);
                        return Err(StoreError::corrupt(from, detail));
                    }
                    records.push((check_record(from, &record)?, record));
                    at += len;
                }
                Next::End => break,
                Next::Torn(why) => return Err(StoreError::corrupt(from, why)),
            }
        }
        let appended = self.on_loaded_as(tenant, Load::Log, |t| {
            Ok(match t.append_replicated(ballot, records_ballot, prev, &records)? {
                None => None,
                Some(Err(refused)) => Some(Err(refused)),
                Some(Ok(last)) => {
                    t.wait_durable(last)?;
                    let position = t.replica_state().0.position(last);
                    // A backup's log is checkpointed as a primary's is.
                    self.after_request(t);
                    Some(Ok(position))
                }
            })
        })?;
        Ok(appended)
    }

    /// Cuts the tenant's log after record `lsn` (the last one this replica shares with its
    /// primary) and drops the tenant from memory, so its next use loads what is left. `false`,
    /// changing nothing, when a checkpoint already folded records above `lsn` into the phext
    /// files: this replica then needs a snapshot.
    pub fn truncate_after(&self, tenant: &str, lsn: u64) -> Result<bool, StoreError> {
        check_tenant_id(tenant)?;
        // Loaded, then cut under its slot, so no request loads it again half way.
        self.on_loaded_as(tenant, Load::Log, |_| Ok(Some(())))?;
        let slot = self.slot(tenant);
        let mut s = lock_slot(&slot);
        let Some(t) = s.tenant.clone() else {
            return Err(StoreError::Busy(tenant.to_string()));
        };
        let cut = t.truncate_after(lsn)?.ok_or_else(|| StoreError::Busy(tenant.to_string()))?;
        if t.is_closed() {
            s.tenant = None;
            self.loaded_count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(cut)
    }
}

/// The first `count` framed records of `bytes`.
fn leading_records(bytes: &[u8], count: u64) -> Result<Vec<u8>, StoreError> {
    let from = Path::new("the tenant's log");
    let mut at = 0;
    for _ in 0..count {
        match decode_next(&bytes[at..], from)? {
            Next::Record { len, .. } => at += len,
            Next::End | Next::Torn(_) => break,
        }
    }
    Ok(bytes[..at].to_vec())
}

/// Appends to `out` the records of one segment (first lsn `start`) from `*next` up to `durable`,
/// advancing `*next`; false once the batch is full or the durable end is reached.
fn take_records(
    path: &Path,
    segment: &[u8],
    start: u64,
    next: &mut u64,
    durable: u64,
    out: &mut Vec<u8>,
) -> Result<bool, StoreError> {
    let mut at = 0;
    let mut lsn = start;
    while lsn <= durable {
        let len = match decode_next(&segment[at..], path)? {
            Next::Record { len, .. } => len,
            // The tail a flusher is still writing, or the segment's end.
            Next::End | Next::Torn(_) => return Ok(true),
        };
        if lsn >= *next {
            if !out.is_empty() && out.len() + len > REPLICA_BATCH_BYTES_MAX {
                return Ok(false);
            }
            out.extend_from_slice(&segment[at..at + len]);
            *next = lsn + 1;
        }
        at += len;
        lsn += 1;
    }
    Ok(false)
}

/// The file in the tenants directory that marks a store rebuilding its copies after it lost them.
/// It holds the placement epoch the node's registry was at when the loss was found, in decimal
/// and ended by a newline. A marker without that (torn by a crash as it was written, or left by
/// a build that wrote it empty) marks the store rebuilding from an unknown epoch, which the
/// node's next start records anew ([`Store::lost_epoch_unknown`]).
const REBUILDING_FILE: &str = ".rebuilding";

/// `lost_at_epoch` of a store whose marker holds no epoch: no ballot is led until one is recorded.
const UNKNOWN_EPOCH: u64 = u64::MAX;

/// The file in a tenant's directory, while the store rebuilds, that says a primary caught this
/// copy up: it holds everything that primary had when it prepared, so it counts again.
const CAUGHT_UP_FILE: &str = "caught-up";

/// Whether the store in `tenants_dir` is rebuilding (its marker is there), and if so the epoch
/// its loss was found at ([`UNKNOWN_EPOCH`] if the marker holds none).
pub(super) fn rebuilding_since_open(
    vfs: &dyn super::Vfs,
    tenants_dir: &Path,
) -> Result<Option<u64>, StoreError> {
    let path = tenants_dir.join(REBUILDING_FILE);
    if !vfs.exists(&path).map_err(StoreError::io("stat rebuilding marker", &path))? {
        return Ok(None);
    }
    let bytes = vfs.read(&path).map_err(StoreError::io("read rebuilding marker", &path))?;
    let epoch = bytes
        .strip_suffix(b"\n")
        .filter(|digits| !digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
        .and_then(|digits| std::str::from_utf8(digits).ok()?.parse().ok());
    Ok(Some(epoch.unwrap_or(UNKNOWN_EPOCH)))
}

/// Left in a new store's tenants directory by a node that was no member when it began it: the
/// store held nothing to lose ([`Store::settle_new`]).
const BEGUN_FILE: &str = ".begun";

impl Store {
    /// The tenants directory was empty at this open (new, or made by a start that stopped
    /// before it decided what that meant): whatever the store held before is gone, or it never
    /// held anything.
    pub fn opened_fresh(&self) -> bool {
        self.fresh
    }

    /// This new store is a new node's, which held nothing: marked durably, so that a later
    /// start (the node a member by then) finds it not empty and does not take it for a lost
    /// disk.
    pub fn settle_new(&self) -> Result<(), StoreError> {
        self.durable_marker(&self.tenants_dir, BEGUN_FILE)
    }

    /// Creates the empty file `name` in `dir`, durably (the file and its directory entry).
    fn durable_marker(&self, dir: &Path, name: &str) -> Result<(), StoreError> {
        self.durable_file(dir, name, b"")
    }

    /// Creates the file `name` in `dir` holding `bytes`, durably.
    fn durable_file(&self, dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = dir.join(name);
        let mut f = self.vfs.create(&path).map_err(StoreError::io("create marker", &path))?;
        f.write_all(bytes).map_err(StoreError::io("write marker", &path))?;
        f.sync_data().map_err(StoreError::io("sync marker", &path))?;
        drop(f);
        self.vfs.sync_dir(dir).map_err(StoreError::io("sync dir", dir))
    }

    /// This store lost the copies it held (its node was a member of the cluster before, and its
    /// tenants directory is new: a wiped or replaced disk). From now on, durably, a tenant's copy
    /// here is a learner's (docs/REPLICATION.md, "A wiped disk"): it does not count toward a
    /// majority, nor answer a promise as if it held state, until a primary caught it up
    /// ([`Self::mark_caught_up`]). `epoch` is the placement epoch the node's registry is at: the
    /// node may have led tenants under ballots up to it, and leads none again under those
    /// ([`Self::lost_at_epoch`]).
    pub fn start_rebuilding(&self, epoch: u64) -> Result<(), StoreError> {
        let text = format!("{epoch}\n");
        self.durable_file(&self.tenants_dir, REBUILDING_FILE, text.as_bytes())?;
        self.lost_at_epoch.store(epoch, std::sync::atomic::Ordering::SeqCst);
        self.rebuilding.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// If this store is rebuilding, the placement epoch its node's registry was at when the
    /// loss was found. Ballots up to it may have been led by this node before the loss, with
    /// records it no longer has and other replicas may hold: leading under one of them again
    /// would give one (ballot, lsn) two different records.
    pub fn lost_at_epoch(&self) -> Option<u64> {
        self.rebuilding().then(|| self.lost_at_epoch.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The store is rebuilding but its marker holds no epoch (a crash tore it as it was
    /// written, or an older build wrote it empty): until the node records one
    /// ([`Self::start_rebuilding`] again, with its registry's epoch now, which is at or past
    /// the one of the loss), it leads no tenant.
    pub fn lost_epoch_unknown(&self) -> bool {
        self.lost_at_epoch() == Some(UNKNOWN_EPOCH)
    }

    fn caught_up_known(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, bool>> {
        self.caught_up.lock().expect("caught-up lock poisoned: a thread panicked while holding it")
    }

    /// Whether this store is rebuilding the copies it lost.
    pub fn rebuilding(&self) -> bool {
        self.rebuilding.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether this node's copy of `tenant` counts toward a majority: always, unless the store
    /// is rebuilding and no primary has caught the copy up yet.
    pub fn counts(&self, tenant: &str) -> Result<bool, StoreError> {
        check_tenant_id(tenant)?;
        if !self.rebuilding() {
            return Ok(true);
        }
        let mut known = self.caught_up_known();
        if let Some(&caught_up) = known.get(tenant) {
            return Ok(caught_up);
        }
        let path = TenantPaths::new(&self.tenants_dir, tenant).root.join(CAUGHT_UP_FILE);
        let caught_up =
            self.vfs.exists(&path).map_err(StoreError::io("stat caught-up marker", &path))?;
        known.insert(tenant.to_string(), caught_up);
        Ok(caught_up)
    }

    /// A primary found this copy holding everything it had when it prepared (or this node, as
    /// the new primary, adopted the most advanced log of a majority): it counts from now on,
    /// durably. Nothing to do unless the store is rebuilding.
    pub fn mark_caught_up(&self, tenant: &str) -> Result<(), StoreError> {
        if self.counts(tenant)? {
            return Ok(());
        }
        let root = TenantPaths::new(&self.tenants_dir, tenant).root;
        super::create_dir_durable(self.vfs.as_ref(), &root)
            .map_err(StoreError::io("create tenant dir", &root))?;
        self.durable_marker(&root, CAUGHT_UP_FILE)?;
        self.caught_up_known().insert(tenant.to_string(), true);
        Ok(())
    }

    /// Puts the caught-up marker of the copy at `root` into the copy at `into` too.
    pub(super) fn copy_caught_up_marker(&self, root: &Path, into: &Path) -> Result<(), StoreError> {
        let path = into.join(CAUGHT_UP_FILE);
        let from = root.join(CAUGHT_UP_FILE);
        if !self.vfs.exists(&from).map_err(StoreError::io("stat caught-up marker", &from))? {
            return Ok(());
        }
        let mut f =
            self.vfs.create(&path).map_err(StoreError::io("create caught-up marker", &path))?;
        f.sync_data().map_err(StoreError::io("sync caught-up marker", &path))
    }

    /// Forgets whether `tenant` was caught up: its directory was replaced or removed.
    pub(super) fn forget_caught_up(&self, tenant: &str) {
        self.caught_up_known().remove(tenant);
    }
}
