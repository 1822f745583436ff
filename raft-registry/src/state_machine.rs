//! The state machine (openraft `RaftStateMachine` + `RaftSnapshotBuilder`).
//!
//! Applied state lives in memory. Snapshots are written to `snapshot` atomically and loaded at
//! open; openraft then re-applies the log from the snapshot up to the persisted committed id. After
//! every applied batch the new state is published on a watch channel as `(applied index, state)`.
//!
//! The snapshot file is one record of the snapshot's meta followed by its image
//! ([`crate::snapshot`], a sequence of records). Only the meta stays in memory: the image is read
//! back from the file when openraft sends it to a follower, so a node does not hold a second
//! copy of its registry, as bytes, between snapshots.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use tokio::sync::watch;

use crate::changes::{self, ChangeLog};
use crate::command::{self, ApplyReply, Command};
use crate::disk::{self, Fs, StoreError};
use crate::snapshot::{decode_state, encode_state};
use crate::state::RegistryState;
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// File name of the current snapshot.
pub const SNAPSHOT_FILE: &str = "snapshot";

/// What a watcher sees: the last applied log index and the state after it.
pub type Published = (u64, Arc<RegistryState>);

/// Reads the snapshot file at `path`: its meta and its image; `Ok(None)` if there is none.
fn read_snapshot_file(
    fs: &dyn Fs,
    path: &Path,
) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StoreError> {
    let mut bytes = match fs.read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(disk::io_err("read", path)(e)),
    };
    let Some((payload, used)) = disk::parse_frame(&bytes) else {
        let reason = "snapshot meta record is torn (cut short, too long or failing its checksum)";
        return Err(StoreError::Corrupt { path: path.to_path_buf(), reason: reason.to_string() });
    };
    let meta: SnapshotMeta = disk::decode(path, payload)?;
    // In place: the image moves to the front of the same buffer.
    bytes.drain(..used);
    Ok(Some((meta, bytes)))
}

/// The current snapshot's meta, shared between the state machine and its snapshot builders;
/// its image is in the file.
#[derive(Clone)]
struct SnapshotSlot {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    current: Arc<Mutex<Option<SnapshotMeta>>>,
}

impl SnapshotSlot {
    fn lock(&self) -> MutexGuard<'_, Option<SnapshotMeta>> {
        // Poisoned only if a previous holder panicked, i.e. a broken invariant already aborted us.
        self.current.lock().unwrap_or_else(|p| panic!("snapshot mutex poisoned: {p}"))
    }

    /// Persists the snapshot of `meta` and `image` and makes it current, unless a newer one is
    /// already current (a slow build racing an install must not roll the snapshot back).
    fn store(&self, meta: &SnapshotMeta, image: &[u8]) -> Result<(), StoreError> {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|c| c.last_log_id > meta.last_log_id) {
            return Ok(());
        }
        let head = disk::frame(&disk::encode("snapshot meta", meta)?);
        disk::write_atomic_parts(self.fs.as_ref(), &self.dir, SNAPSHOT_FILE, &[&head, image])?;
        *current = Some(meta.clone());
        Ok(())
    }

    /// The current snapshot, read back from its file.
    fn read(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StoreError> {
        let current = self.lock();
        if current.is_none() {
            return Ok(None);
        }
        read_snapshot_file(self.fs.as_ref(), &self.dir.join(SNAPSHOT_FILE))
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
        let stored = read_snapshot_file(fs.as_ref(), &path)?;
        let (last_applied, last_membership, state) = match &stored {
            Some((meta, image)) => {
                (meta.last_log_id, meta.last_membership.clone(), decode_state(&path, image)?)
            }
            None => (None, StoredMembership::default(), RegistryState::default()),
        };
        let stored = stored.map(|(meta, _image)| meta);
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
        self.slot.store(&meta, &data).map_err(write_err)?;
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
        self.slot.store(meta, &data).map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        drop(data);
        self.state = state;
        lock_changes(&self.changes).reset(meta.last_log_id.map_or(0, |l| l.index));
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let current = self.slot.read().map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(None, AnyError::new(&e)))
        })?;
        Ok(current.map(|(meta, image)| Snapshot { meta, snapshot: Box::new(Cursor::new(image)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::command::Command;
    use crate::state::{key_hash, TenantRecord, Tier};

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

    #[tokio::test]
    async fn a_torn_snapshot_file_is_refused_by_name() -> anyhow::Result<()> {
        // Goal: a snapshot file of many records reopens whole and is what openraft is given to
        // send; cut short, or with a byte of its image flipped, the node refuses to open, naming
        // the file and the record, rather than starting from a partial registry.
        let dir = tempfile::tempdir()?;
        let (mut sm, _rx) = StateMachineStore::open(dir.path())?;
        let adds = (0..2 * crate::BATCH_COMMANDS_MAX as u64).map(|i| {
            let id = format!("t{i}");
            entry(
                i + 1,
                Command::AddTenant(TenantRecord::new(id.clone(), Tier::Free, key_hash(&id), i)),
            )
        });
        sm.apply(adds.collect::<Vec<_>>()).await?;
        let built = sm.get_snapshot_builder().await.build_snapshot().await?;
        let sent = sm.get_current_snapshot().await?.map(|s| s.snapshot.into_inner());
        assert_eq!(sent.as_ref(), Some(built.snapshot.get_ref()));
        drop(sm);
        let path = dir.path().join(SNAPSHOT_FILE);
        let whole = std::fs::read(&path)?;
        let (_, rx) = StateMachineStore::open(dir.path())?;
        assert_eq!(rx.borrow().1.tenant_count(), 2 * crate::BATCH_COMMANDS_MAX);

        let refused = |bytes: &[u8]| -> anyhow::Result<String> {
            std::fs::write(&path, bytes)?;
            match StateMachineStore::open(dir.path()) {
                Err(e @ StoreError::Corrupt { .. }) => Ok(e.to_string()),
                Err(e) => anyhow::bail!("refused as {e}"),
                Ok(_) => anyhow::bail!("opened"),
            }
        };
        let cut = refused(&whole[..whole.len() - 1])?;
        assert!(cut.contains("snapshot: corrupt: snapshot settings record at byte"), "{cut}");
        // The settings record is 10 bytes (header, R and no marks): these reach into the last
        // tenants.
        let cut = refused(&whole[..whole.len() - 11])?;
        assert!(cut.contains("snapshot: corrupt: snapshot tenants record at byte"), "{cut}");
        let mut flipped = whole.clone();
        flipped[whole.len() - 13] ^= 1;
        assert!(refused(&flipped)?.contains("tenants record at byte"));
        let meta = refused(&whole[..5])?;
        assert!(meta.contains("snapshot meta record is torn"), "{meta}");
        Ok(())
    }
}
