//! openraft's own storage test suite against the registry's on-disk log and state machine.

use openraft::testing::{StoreBuilder, Suite};
use raft_registry::log_store::LogStore;
use raft_registry::state_machine::StateMachineStore;
use raft_registry::types::{StorageError, TypeConfig};
use tempfile::TempDir;

/// Builds a fresh store in its own temporary directory (dropped with the guard).
struct DiskStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for DiskStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let io = |e: std::io::Error| {
            StorageError::from_io_error(
                openraft::ErrorSubject::Store,
                openraft::ErrorVerb::Write,
                e,
            )
        };
        let dir = tempfile::tempdir().map_err(io)?;
        let log = LogStore::open(dir.path())?;
        let (sm, _watch) = StateMachineStore::open(dir.path())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> anyhow::Result<()> {
    // Goal: the disk-backed log store and state machine pass every check of openraft 0.9's
    // storage suite (log state, vote, truncate, purge, apply, snapshot build/transfer/install).
    Suite::test_all(DiskStoreBuilder).map_err(|e| anyhow::anyhow!("storage suite: {e}"))
}
