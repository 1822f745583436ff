//! Registry configuration: Raft timing, snapshot policy and the time limits of client operations.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::RegistryError;

/// Snapshot chunk size (1 MiB): a snapshot travels as InstallSnapshot RPCs of at most this many
/// data bytes, so one RPC frame stays small on the QUIC transport.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;

/// Entries per AppendEntries RPC (openraft's default). Registry commands are well under 1 KB, so
/// one RPC stays under ~300 KB.
pub const APPEND_ENTRIES_MAX: u64 = 300;

/// Name of the Raft cluster (appears in openraft's logs).
const CLUSTER_NAME: &str = "sq-cloud-registry";

/// How the registry runs. Every field has a default (see [`RegistryConfig::default`]); all
/// durations are in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryConfig {
    /// Leader heartbeat period; also the time limit of one AppendEntries RPC. Default 250 ms.
    pub heartbeat_interval_ms: u64,
    /// Lower end of the election timeout. A node stands for election after it has heard no
    /// leader for `election_timeout_max_ms` (the lease voters keep for a leader they heard) plus
    /// a fresh random delay of up to `max - min` ([`crate::elect`]). Default 800 ms; must
    /// exceed the heartbeat several times over.
    pub election_timeout_min_ms: u64,
    /// Upper end of the election timeout, and the leader lease. Default 1,300 ms: five
    /// heartbeats, so a leader stalled for over a second loses its followers, and a dead one is
    /// replaced 1.3 to 1.8 s after it was last heard (admin writes resume within 2 s); after a
    /// split vote the candidates stand again 0.25 to 0.75 s later.
    pub election_timeout_max_ms: u64,
    /// Time limit of one InstallSnapshot chunk RPC. Default 5,000 ms.
    pub install_snapshot_timeout_ms: u64,
    /// Build a snapshot after this many entries applied since the last one. Default 1,000.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log after a snapshot, so a briefly lagging follower catches up from
    /// the log rather than by snapshot. Default 1,000.
    pub logs_to_keep_after_snapshot: u64,
    /// Time a write may wait to be committed and applied. Default 5,000 ms. A timed-out write
    /// may still commit later.
    pub write_timeout_ms: u64,
    /// Time a linearizable read may wait to confirm leadership with a quorum. Default 5,000 ms.
    pub read_timeout_ms: u64,
    /// Time a joining node may take to catch up as a learner. Default 60,000 ms.
    pub learner_catchup_timeout_ms: u64,
    /// Time one voter change (joint, then final config) may take. Default 10,000 ms.
    pub membership_change_timeout_ms: u64,
    /// Time `bootstrap` and `wait_for_leader` wait for a leader to be known. Default 10,000 ms.
    pub leader_wait_timeout_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            heartbeat_interval_ms: 250,
            election_timeout_min_ms: 800,
            election_timeout_max_ms: 1_300,
            install_snapshot_timeout_ms: 5_000,
            snapshot_logs_since_last: 1_000,
            logs_to_keep_after_snapshot: 1_000,
            write_timeout_ms: 5_000,
            read_timeout_ms: 5_000,
            learner_catchup_timeout_ms: 60_000,
            membership_change_timeout_ms: 10_000,
            leader_wait_timeout_ms: 10_000,
        }
    }
}

impl RegistryConfig {
    /// The openraft configuration, validated.
    pub fn to_openraft(&self) -> Result<openraft::Config, RegistryError> {
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_interval_ms >= self.election_timeout_min_ms
        {
            return Err(RegistryError::InvalidConfig(
                "heartbeat_interval_ms must be in (0, election_timeout_min_ms)".into(),
            ));
        }
        let config = openraft::Config {
            cluster_name: CLUSTER_NAME.to_string(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            max_payload_entries: APPEND_ENTRIES_MAX,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            max_in_snapshot_log_to_keep: self.logs_to_keep_after_snapshot,
            // Purge as soon as anything is purgeable: each purge rewrites only the kept tail.
            purge_batch_size: 1,
            // Elections are called by `crate::elect`, which draws a fresh delay before each.
            enable_elect: false,
            ..Default::default()
        };
        config.validate().map_err(|e| RegistryError::InvalidConfig(e.to_string()))
    }

    /// When a node stands for election ([`crate::elect`]): the lease voters keep for a leader
    /// they heard (openraft's, `election_timeout_max_ms`), then a fresh random delay of up to
    /// `election_timeout_max_ms - election_timeout_min_ms`; twice `election_timeout_max_ms` more
    /// for a node that heard of a longer log than its own. After its own candidacy, with
    /// nothing heard since, a heartbeat interval in place of the lease.
    pub(crate) fn election_timing(&self) -> crate::elect::Timing {
        crate::elect::Timing {
            lease: Duration::from_millis(self.election_timeout_max_ms),
            jitter: Duration::from_millis(
                self.election_timeout_max_ms.saturating_sub(self.election_timeout_min_ms),
            ),
            // openraft's own figure for a node that saw a longer log (its `smaller_log_timeout`).
            behind: Duration::from_millis(self.election_timeout_max_ms.saturating_mul(2)),
            retry: Duration::from_millis(self.heartbeat_interval_ms),
        }
    }

    pub(crate) fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    pub(crate) fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }

    pub(crate) fn learner_catchup_timeout(&self) -> Duration {
        Duration::from_millis(self.learner_catchup_timeout_ms)
    }

    pub(crate) fn membership_change_timeout(&self) -> Duration {
        Duration::from_millis(self.membership_change_timeout_ms)
    }

    pub(crate) fn leader_wait_timeout(&self) -> Duration {
        Duration::from_millis(self.leader_wait_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_timing_is_refused() {
        // Goal: the defaults make a valid openraft config; a heartbeat not below the election
        // timeout, or an inverted election range, is refused.
        let ok = RegistryConfig::default().to_openraft();
        assert!(ok.is_ok_and(|c| c.snapshot_max_chunk_size == SNAPSHOT_CHUNK_BYTES));
        let slow_heartbeat = RegistryConfig { heartbeat_interval_ms: 1_000, ..Default::default() };
        assert!(matches!(slow_heartbeat.to_openraft(), Err(RegistryError::InvalidConfig(_))));
        let inverted = RegistryConfig { election_timeout_min_ms: 3_000, ..Default::default() };
        assert!(matches!(inverted.to_openraft(), Err(RegistryError::InvalidConfig(_))));
    }
}
