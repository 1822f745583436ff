//! The state machine (openraft `RaftStateMachine` + `RaftSnapshotBuilder`).
//!
//! Applied state lives in memory. Snapshots are written to `snapshot` atomically and loaded at
//! open; openraft then re-applies the log from the snapshot up to the persisted committed id. After
//! every applied batch the new state is published on a watch channel as `(applied index, state)`.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::changes::{self, ChangeLog};
use crate::command::{self, ApplyReply, Command};
use crate::disk::{self, Fs, StoreError};
use crate::state::{Handoff, NodeRecord, NodeState, RegistryState, TenantRecord, ACTIVE_NODES_MAX};
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// File name of the current snapshot.
pub const SNAPSHOT_FILE: &str = "snapshot";

/// Version of the snapshot image format (on disk and between nodes). Version 3 added the
/// purged tenant ids; a version 2 image (none purged) is still read.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 3;

/// What a watcher sees: the last applied log index and the state after it.
pub type Published = (u64, Arc<RegistryState>);

/// The serialised registry as format 2 wrote it. A snapshot of this format is this image
/// followed by the purged tenant ids: `(StateImage, Vec<String>)`, so format 2 is still read.
#[derive(Serialize, Deserialize)]
struct StateImage {
    format_version: u32,
    tenants: Vec<TenantRecord>,
    admin_key_hash: Option<String>,
    nodes: Vec<NodeRecord>,
    placement_epoch: u64,
    handoffs: Vec<Handoff>,
}

/// A snapshot as kept on disk and in memory.
#[derive(Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

pub(crate) fn encode_state(state: &RegistryState) -> Result<Vec<u8>, StoreError> {
    let image = StateImage {
        format_version: SNAPSHOT_FORMAT_VERSION,
        tenants: state.tenants().cloned().collect(),
        admin_key_hash: state.admin_key_hash().map(str::to_string),
        nodes: state.nodes().cloned().collect(),
        placement_epoch: state.placement_epoch(),
        handoffs: state.handoffs().cloned().collect(),
    };
    let purged: Vec<String> = state.purged().cloned().collect();
    disk::encode("snapshot image", &(image, purged))
}

pub(crate) fn decode_state(origin: &Path, data: &[u8]) -> Result<RegistryState, StoreError> {
    // Every format starts with its version (a varint), so it is read first.
    let (version, _): (u32, usize) =
        bincode::serde::decode_from_slice(data, disk::bincode_config()).map_err(|e| {
            StoreError::Corrupt { path: origin.to_path_buf(), reason: e.to_string() }
        })?;
    let (image, purged) = match version {
        SNAPSHOT_FORMAT_VERSION => disk::decode::<(StateImage, Vec<String>)>(origin, data)?,
        2 => (disk::decode::<StateImage>(origin, data)?, Vec::new()),
        other => {
            let reason =
                format!("snapshot format {other} (we read 2 and {SNAPSHOT_FORMAT_VERSION})");
            return Err(StoreError::Corrupt { path: origin.to_path_buf(), reason });
        }
    };
    let active = image.nodes.iter().filter(|n| n.state == NodeState::Active).count();
    if active > ACTIVE_NODES_MAX {
        let reason = format!("{active} active nodes, more than {ACTIVE_NODES_MAX}");
        return Err(StoreError::Corrupt { path: origin.to_path_buf(), reason });
    }
    Ok(RegistryState::from_parts(
        image.tenants,
        image.admin_key_hash,
        image.nodes,
        image.placement_epoch,
        image.handoffs,
        purged,
    ))
}

/// The current snapshot, shared between the state machine and its snapshot builders.
#[derive(Clone)]
struct SnapshotSlot {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
}

impl SnapshotSlot {
    fn lock(&self) -> MutexGuard<'_, Option<StoredSnapshot>> {
        // Poisoned only if a previous holder panicked, i.e. a broken invariant already aborted us.
        self.current.lock().unwrap_or_else(|p| panic!("snapshot mutex poisoned: {p}"))
    }

    /// Persists `snap` and makes it current, unless a newer one is already current (a slow build
    /// racing an install must not roll the snapshot back).
    fn store(&self, snap: StoredSnapshot) -> Result<(), StoreError> {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|c| c.meta.last_log_id > snap.meta.last_log_id) {
            return Ok(());
        }
        disk::write_record_file(self.fs.as_ref(), &self.dir, SNAPSHOT_FILE, &snap)?;
        *current = Some(snap);
        Ok(())
    }
}

/// The registry state machine.
pub struct StateMachineStore {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    state: RegistryState,
    slot: SnapshotSlot,
    publish: watch::Sender<Published>,
    /// What each applied entry changed, for gateways that follow by changes; shared with
    /// [`crate::Registry`], which reads it.
    changes: Arc<Mutex<ChangeLog>>,
    /// Snapshots built by this process, to make snapshot ids unique.
    builds: u64,
}

/// The state machine's change log, as the registry handle reads it.
pub(crate) type SharedChanges = Arc<Mutex<ChangeLog>>;

/// Locks the change log. A panic while holding it may leave its count and entries apart, so a
/// poisoned lock panics too (see ARCHITECTURE.md, locks and panics).
pub(crate) fn lock_changes(changes: &SharedChanges) -> MutexGuard<'_, ChangeLog> {
    changes.lock().unwrap_or_else(|p| panic!("change log mutex poisoned: {p}"))
}

impl StateMachineStore {
    /// Opens the state machine in `dir`, starting from the stored snapshot if there is one.
    pub fn open(dir: &Path) -> Result<(StateMachineStore, watch::Receiver<Published>), StoreError> {
        StateMachineStore::open_on(disk::std_fs(), dir)
    }

    /// The log of what each applied entry changed.
    pub(crate) fn changes(&self) -> SharedChanges {
        self.changes.clone()
    }

    /// Opens the state machine in `dir` on `fs`.
    pub fn open_on(
        fs: Arc<dyn Fs>,
        dir: &Path,
    ) -> Result<(StateMachineStore, watch::Receiver<Published>), StoreError> {
        disk::create_dir_durable(fs.as_ref(), dir)?;
        let path = dir.join(SNAPSHOT_FILE);
        let stored: Option<StoredSnapshot> = disk::read_record_file(fs.as_ref(), &path)?;
        let (last_applied, last_membership, state) = match &stored {
            Some(s) => {
                (s.meta.last_log_id, s.meta.last_membership.clone(), decode_state(&path, &s.data)?)
            }
            None => (None, StoredMembership::default(), RegistryState::default()),
        };
        let index = last_applied.map_or(0, |l| l.index);
        let (publish, rx) = watch::channel((index, Arc::new(state.clone())));
        let slot =
            SnapshotSlot { fs, dir: dir.to_path_buf(), current: Arc::new(Mutex::new(stored)) };
        let changes = Arc::new(Mutex::new(ChangeLog::starting_at(index)));
        let sm = StateMachineStore {
            last_applied,
            last_membership,
            state,
            slot,
            publish,
            changes,
            builds: 0,
        };
        Ok((sm, rx))
    }

    fn publish(&self) {
        let index = self.last_applied.map_or(0, |l| l.index);
        self.publish.send_replace((index, Arc::new(self.state.clone())));
    }

    fn apply_one(&mut self, entry: Entry) -> ApplyReply {
        self.last_applied = Some(entry.log_id);
        let index = entry.log_id.index;
        let mut batch = Vec::new();
        let outcome = match entry.payload {
            EntryPayload::Blank => Ok(()),
            EntryPayload::Normal(Command::Batch(commands)) => {
                if command::valid_batch(&commands) {
                    batch = commands.into_iter().map(|c| self.apply_command(index, c)).collect();
                    Ok(())
                } else {
                    Err(command::Rejection::InvalidBatch)
                }
            }
            EntryPayload::Normal(cmd) => self.apply_command(index, cmd),
            EntryPayload::Membership(m) => {
                self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                Ok(())
            }
        };
        ApplyReply { outcome, placement_epoch: self.state.placement_epoch(), batch }
    }

    /// Applies one command of the entry at `index`, recording what it changed.
    fn apply_command(&mut self, index: u64, cmd: Command) -> Result<(), command::Rejection> {
        let touched = changes::touched(&cmd);
        let outcome = command::apply(&mut self.state, cmd);
        if let (Ok(()), Some(touched)) = (&outcome, touched) {
            lock_changes(&self.changes).record(index, touched);
        }
        outcome
    }
}

/// Builds one snapshot from a frozen copy of the state.
pub struct SnapshotBuilder {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    state: RegistryState,
    slot: SnapshotSlot,
    snapshot_id: String,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let write_err = |e: StoreError| {
            StorageError::from(StorageIOError::write_snapshot(None, AnyError::new(&e)))
        };
        let data = encode_state(&self.state).map_err(write_err)?;
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id: self.snapshot_id.clone(),
        };
        self.slot
            .store(StoredSnapshot { meta: meta.clone(), data: data.clone() })
            .map_err(write_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyReply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let replies: Vec<ApplyReply> = entries.into_iter().map(|e| self.apply_one(e)).collect();
        self.publish();
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.builds += 1;
        let at = self
            .last_applied
            .map_or_else(|| "none".to_string(), |l| format!("{}-{}", l.leader_id.term, l.index));
        SnapshotBuilder {
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
            state: self.state.clone(),
            slot: self.slot.clone(),
            snapshot_id: format!("{at}-{}", self.builds),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let origin = Path::new("received snapshot");
        let state = decode_state(origin, &data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        self.slot.store(StoredSnapshot { meta: meta.clone(), data }).map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        self.state = state;
        lock_changes(&self.changes).reset(meta.last_log_id.map_or(0, |l| l.index));
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self
            .slot
            .lock()
            .clone()
            .map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::command::Command;
    use crate::state::{key_hash, Tier};

    fn entry(index: u64, cmd: Command) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    #[tokio::test]
    async fn snapshot_survives_restart_and_publishes() -> anyhow::Result<()> {
        // Goal: applied state is published to watchers; a built snapshot is reloaded at open with
        // the same state and last applied id, and holds no clear-text key.
        let dir = tempfile::tempdir()?;
        let key = "pmb-v1-ffeeddccbbaa99887766554433221100";
        let (mut sm, rx) = StateMachineStore::open(dir.path())?;
        let mut tenant = TenantRecord::new("acme".into(), Tier::Pro, key_hash(key), 5);
        tenant.admin_email = Some("ops@example.com".into());
        let add = Command::AddTenant(tenant);
        let replies = sm
            .apply([entry(1, Command::NodeJoin { id: 1, addr: "a:1".into() }), entry(2, add)])
            .await?;
        assert!(replies.iter().all(|r| r.outcome.is_ok()));
        assert_eq!(rx.borrow().0, 2);
        assert!(rx.borrow().1.tenant("acme").is_some());

        let snap = sm.get_snapshot_builder().await.build_snapshot().await?;
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2));
        let bytes = std::fs::read(dir.path().join(SNAPSHOT_FILE))?;
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "clear-text key in snapshot"
        );
        drop(sm);

        let (mut sm, rx) = StateMachineStore::open(dir.path())?;
        let (applied, _) = sm.applied_state().await?;
        assert_eq!(applied.map(|l| l.index), Some(2));
        assert_eq!(
            rx.borrow().1.tenant_by_key_hash(&key_hash(key)).map(|t| t.tier),
            Some(Tier::Pro)
        );
        assert_eq!(rx.borrow().1.node(1).map(|n| n.addr.as_str()), Some("a:1"));
        Ok(())
    }

    #[test]
    fn snapshot_images_of_both_formats_are_read() {
        // Goal: an image of this format keeps the purged ids; a format 2 image (written before
        // purges existed) still loads, with none purged; any other format is refused.
        let origin = Path::new("snapshot");
        let mut state = RegistryState::default();
        let add =
            Command::AddTenant(TenantRecord::new("live".into(), Tier::Free, key_hash("k"), 1));
        crate::command::apply(&mut state, add).expect("add");
        state.purged.insert("gone".to_string());
        let decoded = decode_state(origin, &encode_state(&state).expect("encode")).expect("decode");
        assert_eq!(decoded, state);
        assert!(decoded.is_purged("gone") && decoded.tenant("live").is_some());

        let tenants: Vec<TenantRecord> = state.tenants().cloned().collect();
        let v2 = |format_version| StateImage {
            format_version,
            tenants: tenants.clone(),
            admin_key_hash: None,
            nodes: Vec::new(),
            placement_epoch: 7,
            handoffs: Vec::new(),
        };
        let old = decode_state(origin, &disk::encode("v2", &v2(2)).expect("encode"))
            .expect("format 2 loads");
        assert_eq!(
            (old.tenant("live").map(|t| t.id.as_str()), old.placement_epoch()),
            (Some("live"), 7)
        );
        assert_eq!(old.purged().count(), 0);
        let unknown = decode_state(origin, &disk::encode("v9", &v2(9)).expect("encode"));
        assert!(unknown.is_err_and(|e| e.to_string().contains("snapshot format 9")));
    }
}
