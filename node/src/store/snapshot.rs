//! Catch-up by snapshot (docs/REPLICATION.md, "Catch-up"): a replica whose log no longer meets
//! the one it follows (the records it lacks were folded into the other's phext files, or it must
//! cut records it folded into its own, or its disk was wiped) takes the other's files whole.
//!
//! The giving side checkpoints the tenant and links its phext files into a snapshot directory
//! under the tenant's gate ([`Store::snapshot_take`]): the links are the tenant at one record
//! whatever is written after, since a checkpoint replaces files by renames. The taking side
//! stages the files as a handoff does (checked by length and checksum), then swaps them in with
//! the log starting after that record and the giver's ballot history up to it
//! ([`Store::snapshot_install`]), refused if it promised a higher ballot meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use proto::cluster::HandoffFile;

use super::ballots::{self, BallotError, Ballots};
use super::tenant::TenantPaths;
use super::wal::write_base;
use super::{check_tenant_id, create_dir_durable, lock_slot, recovery, Store, StoreError};

/// Prefix of a snapshot's directory, beside the tenants' directories; not a valid tenant id.
const SNAPSHOT_PREFIX: &str = ".snapshot-";

/// A tenant's snapshot as the giving node lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotImage {
    /// Names the snapshot in the reads that follow.
    pub id: u64,
    /// The last record the files hold; the taker's log continues after it.
    pub lsn: u64,
    /// The giver's ballots when it was taken.
    pub ballots: Ballots,
    /// Every file, relative to the snapshot's directory (`phexts/<name>.phext`).
    pub files: Vec<HandoffFile>,
}

/// The snapshots a node keeps for replicas reading them: id → (tenant, last read, ms).
#[derive(Default)]
pub(crate) struct Snapshots {
    next_id: u64,
    open: BTreeMap<u64, (String, u64)>,
    /// Ids whose directory is being written by [`Store::snapshot_take`]: a listing of leftovers
    /// must not take them for an earlier run's.
    taking: BTreeSet<u64>,
}

impl Store {
    fn snapshot_dir(&self, id: u64, tenant: &str) -> PathBuf {
        self.tenants_dir.join(format!("{SNAPSHOT_PREFIX}{id}-{tenant}"))
    }

    fn snapshots(&self) -> std::sync::MutexGuard<'_, Snapshots> {
        self.snapshots.lock().expect("snapshots lock poisoned: a thread panicked while holding it")
    }

    /// Takes a snapshot of `tenant` (loading it): a checkpoint, then its phext files linked into
    /// a directory of their own, listed with their lengths and checksums. Kept until
    /// [`Self::snapshot_done`], or until unread for a while ([`Self::drop_idle_snapshots`]).
    pub fn snapshot_take(&self, tenant: &str) -> Result<SnapshotImage, StoreError> {
        check_tenant_id(tenant)?;
        let id = self.snapshot_begin();
        let taken = self.snapshot_write(id, tenant);
        self.snapshot_end(id, taken.as_ref().ok().map(|_| tenant));
        taken
    }

    /// A new snapshot id, marked as being taken until [`Self::snapshot_end`].
    pub(crate) fn snapshot_begin(&self) -> u64 {
        let mut s = self.snapshots();
        s.next_id += 1;
        let id = s.next_id;
        s.taking.insert(id);
        id
    }

    /// Ends the take of snapshot `id`: kept, as read now, if it was taken of `tenant`, forgotten
    /// if the take failed (it removed its directory).
    pub(crate) fn snapshot_end(&self, id: u64, taken: Option<&str>) {
        let now = self.clock.now_ms();
        let mut s = self.snapshots();
        s.taking.remove(&id);
        if let Some(tenant) = taken {
            s.open.insert(id, (tenant.to_string(), now));
        }
    }

    /// Writes snapshot `id` of `tenant` into its directory and describes it.
    fn snapshot_write(&self, id: u64, tenant: &str) -> Result<SnapshotImage, StoreError> {
        let dir = self.snapshot_dir(id, tenant);
        self.remove_tree(&dir)?;
        for d in [dir.clone(), dir.join("phexts")] {
            self.vfs.create_dir(&d).map_err(StoreError::io("create snapshot dir", &d))?;
        }
        let frozen = self.on_loaded(tenant, |t| t.freeze_into(&dir));
        let (lsn, ballots) = match frozen {
            Ok(frozen) => frozen,
            Err(e) => {
                self.remove_tree(&dir)?;
                return Err(e);
            }
        };
        let mut names = self
            .vfs
            .list(&dir.join("phexts"))
            .map_err(StoreError::io("list snapshot dir", &dir))?;
        names.sort();
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            files.push(self.describe(&dir, &format!("phexts/{name}"))?);
        }
        Ok(SnapshotImage { id, lsn, ballots, files })
    }

    /// The directory of snapshot `id` of `tenant`, marked as read now; an error if there is none.
    fn snapshot_in_use(&self, id: u64, tenant: &str) -> Result<PathBuf, StoreError> {
        check_tenant_id(tenant)?;
        let now = self.clock.now_ms();
        match self.snapshots().open.get_mut(&id) {
            Some((t, used)) if t == tenant => *used = now,
            _ => {
                return Err(StoreError::InvalidRequest(format!(
                    "no snapshot {id} of {tenant} here (it was dropped; take another)"
                )))
            }
        }
        Ok(self.snapshot_dir(id, tenant))
    }

    /// Up to `len` bytes of one file of snapshot `id` from `offset`.
    pub fn snapshot_read(
        &self,
        id: u64,
        tenant: &str,
        rel: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, StoreError> {
        let dir = self.snapshot_in_use(id, tenant)?;
        if !super::is_tenant_file_path(rel) {
            return Err(StoreError::InvalidRequest(format!("not a tenant file: {rel:?}")));
        }
        let path = dir.join(rel);
        self.vfs.read_range(&path, offset, len).map_err(StoreError::io("read snapshot file", &path))
    }

    /// One file of snapshot `id` opened for reading in ranges, for a streamed transfer.
    pub fn snapshot_open(
        &self,
        id: u64,
        tenant: &str,
        rel: &str,
    ) -> Result<Box<dyn super::VfsReader>, StoreError> {
        let dir = self.snapshot_in_use(id, tenant)?;
        if !super::is_tenant_file_path(rel) {
            return Err(StoreError::InvalidRequest(format!("not a tenant file: {rel:?}")));
        }
        let path = dir.join(rel);
        self.vfs.open_read(&path).map_err(StoreError::io("open snapshot file", &path))
    }

    /// Deletes snapshot `id` of `tenant`, once its taker has it (or gave up).
    pub fn snapshot_done(&self, id: u64, tenant: &str) -> Result<(), StoreError> {
        check_tenant_id(tenant)?;
        let known = self.snapshots().open.get(&id).is_some_and(|(t, _)| t == tenant);
        if known {
            self.remove_tree(&self.snapshot_dir(id, tenant))?;
            self.snapshots().open.remove(&id);
        }
        Ok(())
    }

    /// Deletes the snapshots no one has read for `idle_ms`; with `leftovers`, also any on disk
    /// that this run of the node does not know of (left by an earlier run, or by a take that
    /// failed half way), which means listing the tenants directory. Returns how many went.
    pub fn drop_idle_snapshots(&self, idle_ms: u64, leftovers: bool) -> Result<usize, StoreError> {
        let now = self.clock.now_ms();
        if !leftovers {
            let idle: Vec<(u64, String)> = self
                .snapshots()
                .open
                .iter()
                .filter(|(_, (_, used))| now.saturating_sub(*used) >= idle_ms)
                .map(|(&id, (tenant, _))| (id, tenant.clone()))
                .collect();
            for (id, tenant) in &idle {
                self.remove_tree(&self.snapshot_dir(*id, tenant))?;
                self.snapshots().open.remove(id);
            }
            return Ok(idle.len());
        }
        let listed: Vec<String> = self
            .vfs
            .list(&self.tenants_dir)
            .map_err(StoreError::io("list tenants", &self.tenants_dir))?
            .into_iter()
            .filter(|n| n.starts_with(SNAPSHOT_PREFIX))
            .collect();
        let mut dropped = 0;
        for name in listed {
            let id = name[SNAPSHOT_PREFIX.len()..]
                .split_once('-')
                .and_then(|(id, _)| id.parse::<u64>().ok());
            let keep = id.is_some_and(|id| {
                let s = self.snapshots();
                s.taking.contains(&id)
                    || s.open.get(&id).is_some_and(|(_, used)| now.saturating_sub(*used) < idle_ms)
            });
            if !keep {
                self.remove_tree(&self.tenants_dir.join(&name))?;
                if let Some(id) = id {
                    self.snapshots().open.remove(&id);
                }
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Installs the staged copy of `tenant` (every file of a snapshot, staged and checked as a
    /// handoff stages them) as this replica's: its log continues after record `lsn`, its ballot
    /// history is `theirs` up to that record, and it promises `ballot`, the sender's. Refused,
    /// changing nothing but dropping the staged copy, when this replica promised a higher
    /// ballot (a newer primary may have its promise), or when its own log is as advanced as the
    /// snapshot (it took records since the snapshot was listed). Whatever it held of the tenant
    /// is replaced.
    pub fn snapshot_install(
        &self,
        tenant: &str,
        lsn: u64,
        theirs: &Ballots,
        ballot: u64,
    ) -> Result<Result<(), BallotError>, StoreError> {
        check_tenant_id(tenant)?;
        let staging = self.staging(tenant);
        write_base(self.vfs.as_ref(), &staging, lsn + 1)?;
        let slot = self.slot(tenant);
        // Held until the copy is in place: no request loads the tenant half way.
        let mut s = lock_slot(&slot);
        let root = TenantPaths::new(&self.tenants_dir, tenant).root;
        let (mine, my_end) = self.held_copy(&mut s, tenant)?;
        if let Some(refused) = install_refusal((&mine, my_end), (theirs, lsn), ballot) {
            drop(s);
            self.stage_abort(tenant)?;
            return Ok(Err(refused));
        }
        let mut next = theirs.clone();
        next.truncate_after(lsn);
        let promise = mine.promised().max(ballot).max(next.promised());
        if let Err(refused) = next.promise(promise) {
            return Ok(Err(refused));
        }
        create_dir_durable(self.vfs.as_ref(), &staging)
            .map_err(StoreError::io("create staging dir", &staging))?;
        ballots::write(self.vfs.as_ref(), &staging, &next)?;
        // A copy that counted still does: the snapshot holds what its giver (the primary, or
        // the most advanced of a majority) held.
        if self.rebuilding() && self.counts(tenant)? {
            self.copy_caught_up_marker(&root, &staging)?;
        }
        self.swap_staged(tenant)?;
        s.storage_bytes = super::KnownBytes::UNKNOWN;
        drop(s);
        self.remove_replaced(tenant)?;
        Ok(Ok(()))
    }

    /// The ballot history of this node's copy of `tenant` and where its log ends: from the
    /// loaded tenant, taken out of its slot `s` and closed (its files are replaced next), or
    /// else from disk, where a copy that no longer loads counts for its promises alone.
    fn held_copy(
        &self,
        s: &mut super::SlotState,
        tenant: &str,
    ) -> Result<(Ballots, u64), StoreError> {
        let paths = TenantPaths::new(&self.tenants_dir, tenant);
        let root = paths.root.clone();
        Ok(match s.tenant.take() {
            Some(t) => {
                self.loaded_count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                // Its files are replaced next; a failed checkpoint loses nothing that matters.
                if let Err(e) = t.close() {
                    tracing::warn!(tenant, error = %e, "checkpoint before a snapshot install failed");
                }
                t.replica_state()
            }
            None => {
                let now = self.clock.now_ms();
                match recovery::load(
                    tenant,
                    paths,
                    self.vfs.clone(),
                    self.memory_bytes.clone(),
                    now,
                    recovery::Load::Log,
                ) {
                    Ok(t) => {
                        let held = t.replica_state();
                        t.discard();
                        held
                    }
                    // A copy that no longer loads holds nothing to keep.
                    Err(_) => (ballots::read(self.vfs.as_ref(), &root)?, 0),
                }
            }
        })
    }
}

/// Why a snapshot at `lsn` of a copy with ballot history `theirs` may not replace this node's
/// copy (`mine`, its log ending at `my_end`) under `ballot`, if it may not.
fn install_refusal(
    (mine, my_end): (&Ballots, u64),
    (theirs, lsn): (&Ballots, u64),
    ballot: u64,
) -> Option<BallotError> {
    if ballot < mine.promised() {
        Some(BallotError::Stale { ballot, promised: mine.promised() })
    } else if theirs.position(lsn) <= mine.position(my_end) {
        // Records taken since the snapshot was listed (and perhaps acknowledged as a
        // member's) must not be replaced by an older copy.
        Some(BallotError::SnapshotNotAhead {
            snapshot: theirs.position(lsn),
            mine: mine.position(my_end),
        })
    } else {
        None
    }
}
