//! [`Registry`]: one node's handle on the replicated registry.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::BasicNode;
use tokio::sync::watch;

use crate::changes::Since;
use crate::command::Command;
use crate::config::RegistryConfig;
use crate::error::RegistryError;
use crate::log_store::LogStore;
use crate::network::{self, NetworkFactory, RaftTransport};
use crate::state::{NodeState, RegistryState};
use crate::state_machine::{lock_changes, Published, SharedChanges, StateMachineStore};
use crate::types::{NodeId, Raft};

/// What a committed command produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandResult {
    /// Log index of the command; a watcher whose applied index reaches it sees its effect.
    pub log_index: u64,
    /// The placement epoch after the command.
    pub placement_epoch: u64,
}

/// How long a stopping node waits for its closing snapshot ([`Registry::close`]): building
/// and writing one takes 0.06 s at 100,000 tenants and 0.8 s at 1,000,000 (docs/BENCHMARKS.md);
/// a node that cannot write one in this time stops without it.
const CLOSING_SNAPSHOT_WAIT: Duration = Duration::from_secs(10);

/// How long a stopping node waits for the log its closing snapshot covers to be dropped: the
/// purge rewrites only the log's tail, but a leader purges only once no replication reads the
/// entries. A node that cannot purge in this time stops with the log it has.
const CLOSING_PURGE_WAIT: Duration = Duration::from_secs(2);

/// A point-in-time view of this node's Raft state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub leader: Option<u64>,
    /// The leader's address, when it is in the membership this node knows.
    pub leader_addr: Option<String>,
    pub is_leader: bool,
    pub term: u64,
    /// Index of the last log entry on this node.
    pub last_log_index: Option<u64>,
    /// Index of the last entry applied here (≤ the cluster's commit index).
    pub last_applied_index: Option<u64>,
    /// Last index covered by this node's current snapshot.
    pub snapshot_index: Option<u64>,
    /// Last index purged from this node's log.
    pub purged_index: Option<u64>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// One node's member of the registry cluster.
///
/// Open one per data directory per process (nothing locks the directory).
pub struct Registry {
    pub(crate) id: NodeId,
    pub(crate) raft: Raft,
    state_rx: watch::Receiver<Published>,
    changes: SharedChanges,
    /// Writes waiting for the next commit round ([`crate::batch`]).
    writes: tokio::sync::mpsc::Sender<crate::batch::Pending>,
    /// Serialises `join_node` / `remove_node` on this node.
    pub(crate) membership_lock: tokio::sync::Mutex<()>,
    /// The node whose join holds `membership_lock`, and how to cancel it (`remove_node` does).
    pub(crate) joining: std::sync::Mutex<Option<(u64, Arc<tokio::sync::Notify>)>>,
    pub(crate) config: RegistryConfig,
    /// When this node last heard a leader; its election timer ([`crate::elect`]) reads it.
    pub(crate) heard: Arc<crate::elect::Heard>,
    /// The election timer's task, stopped by [`Registry::shutdown`].
    elect_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Stops new write rounds during a leadership transfer ([`crate::transfer`]).
    pub(crate) write_gate: crate::batch::Gate,
    /// What carries Raft RPCs, for a leadership transfer's `TimeoutNow`.
    pub(crate) transport: Arc<dyn RaftTransport>,
}

/// Runs `fut` with a time limit, reporting `op` on expiry.
pub(crate) async fn bounded<T>(
    op: &'static str,
    limit: Duration,
    fut: impl Future<Output = T>,
) -> Result<T, RegistryError> {
    tokio::time::timeout(limit, fut).await.map_err(|_| RegistryError::timeout(op, limit))
}

impl Registry {
    /// Opens the registry stored in `dir` (created if missing) as node `node_id` and starts Raft.
    /// Log, vote and snapshot are recovered from `dir`; a fresh directory starts uninitialized.
    pub async fn open(
        dir: &Path,
        node_id: u64,
        config: RegistryConfig,
        transport: Arc<dyn RaftTransport>,
    ) -> Result<Registry, RegistryError> {
        Registry::open_on(crate::disk::std_fs(), dir, node_id, config, transport).await
    }

    /// [`Registry::open`] on the disk `fs` (the simulator's, in simulation).
    pub async fn open_on(
        fs: Arc<dyn crate::disk::Fs>,
        dir: &Path,
        node_id: u64,
        config: RegistryConfig,
        transport: Arc<dyn RaftTransport>,
    ) -> Result<Registry, RegistryError> {
        let raft_config = Arc::new(config.to_openraft()?);
        crate::format::check_or_name(fs.as_ref(), dir)?;
        let log = LogStore::open_on(fs.clone(), dir)?;
        let (sm, state_rx) = StateMachineStore::open_on(fs, dir)?;
        let changes = sm.changes();
        let heard = crate::elect::Heard::now();
        let network =
            NetworkFactory { my_id: node_id, transport: transport.clone(), heard: heard.clone() };
        let raft = Raft::new(node_id, raft_config, network, log, sm).await?;
        let write_gate = crate::batch::Gate::default();
        let writes = crate::batch::start(raft.clone(), config.write_timeout(), write_gate.clone());
        let elect_task = tokio::spawn({
            let elect =
                crate::elect::run(raft.clone(), node_id, config.election_timing(), heard.clone());
            let log = crate::elect::log_leaders(raft.clone());
            async move {
                tokio::join!(elect, log);
            }
        });
        Ok(Registry {
            id: node_id,
            raft,
            state_rx,
            changes,
            writes,
            membership_lock: tokio::sync::Mutex::new(()),
            joining: std::sync::Mutex::new(None),
            config,
            heard,
            elect_task: std::sync::Mutex::new(Some(elect_task)),
            write_gate,
            transport,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Makes this node a one-node cluster if it was never initialized, sets R to `replicas`
    /// while no node is active yet, then records it as an Active node at `addr`. Idempotent: on
    /// restart it only finishes what a crash interrupted. Call it on the first node of a new
    /// cluster; other nodes join through [`Self::join_node`] on the leader.
    pub async fn bootstrap(&self, addr: String, replicas: u8) -> Result<(), RegistryError> {
        // On restart the local state already holds everything committed before the stop (openraft
        // re-applies the log up to the saved committed id while opening), so a node that restarts
        // alone needs no quorum here.
        let recorded = self.state().node(self.id).map(|n| n.state);
        if recorded.is_some_and(|s| s != NodeState::Joining) {
            return Ok(());
        }
        if !self.raft.is_initialized().await? {
            let members = BTreeMap::from([(self.id, BasicNode::new(addr.clone()))]);
            match self.raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(RegistryError::Raft(e.to_string())),
            }
        }
        if self.wait_for_leader().await? != self.id {
            tracing::info!(id = self.id, "bootstrap: cluster already formed with another leader");
            return Ok(());
        }
        let state = self.read_linearizable().await?;
        if state.node(self.id).is_none() {
            self.write(Command::NodeJoin { id: self.id, addr }).await?;
        }
        let state = self.read_linearizable().await?;
        if state.node(self.id).map(|n| n.state) == Some(NodeState::Joining) {
            // The cluster is being formed: it has no active node, so no tenant is placed yet and
            // R may still be anything. A restart between the two writes sets the same R again.
            if state.replicas() != usize::from(replicas) {
                self.write(Command::ChangeReplicas { replicas }).await?;
            }
            self.write(Command::NodeActivate { id: self.id }).await?;
        }
        Ok(())
    }

    /// Proposes `cmd` and waits until it is committed and applied. On a follower it returns
    /// [`RegistryError::NotLeader`] with the leader to forward to. Concurrent writes are
    /// committed together, one log entry per round ([`crate::batch`]); each gets its own
    /// outcome.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, RegistryError> {
        let mut outcomes = self.write_all(vec![cmd]).await;
        outcomes.pop().unwrap_or(Err(RegistryError::Shutdown))
    }

    /// [`Self::write`] of every command, in order, in as few rounds as they fit: a whole list
    /// (a tenants file) is committed [`crate::BATCH_COMMANDS_MAX`] commands per log entry. Each
    /// command gets its own outcome; a refusal stops none of the others.
    pub async fn write_all(
        &self,
        commands: Vec<Command>,
    ) -> Vec<Result<CommandResult, RegistryError>> {
        // Queued behind at most a queue's worth of rounds, each bounded by the write timeout.
        let rounds_ahead = (crate::batch::WRITES_QUEUED_MAX / crate::BATCH_COMMANDS_MAX) as u32;
        let limit = self.config.write_timeout() * (rounds_ahead + 1);
        let mut waiting = Vec::with_capacity(commands.len());
        for cmd in commands {
            let (reply, outcome) = tokio::sync::oneshot::channel();
            if self.writes.send((cmd, reply)).await.is_err() {
                waiting.push(None);
                continue;
            }
            waiting.push(Some(outcome));
        }
        let mut outcomes = Vec::with_capacity(waiting.len());
        for w in waiting {
            let Some(outcome) = w else {
                outcomes.push(Err(RegistryError::Shutdown));
                continue;
            };
            outcomes.push(match bounded("write", limit, outcome).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(RegistryError::Shutdown),
                Err(e) => Err(e),
            });
        }
        outcomes
    }

    /// The state as of a read index confirmed by a quorum: it reflects every write committed
    /// before the call. Only the leader can serve it; followers get `NotLeader`.
    pub async fn read_linearizable(&self) -> Result<Arc<RegistryState>, RegistryError> {
        let limit = self.config.read_timeout();
        let read_log_id =
            bounded("linearizable read", limit, self.raft.ensure_linearizable()).await??;
        // The read index is applied by now, and apply publishes before it returns; waiting on the
        // watch makes that ordering explicit rather than assumed.
        let want = read_log_id.map_or(0, |l| l.index);
        let mut rx = self.state_rx.clone();
        let published =
            bounded("linearizable read", limit, rx.wait_for(|(index, _)| *index >= want)).await?;
        let state = published.map_err(|_| RegistryError::Shutdown)?.1.clone();
        Ok(state)
    }

    /// The local, possibly stale, view of the registry.
    pub fn state(&self) -> Arc<RegistryState> {
        self.state_rx.borrow().1.clone()
    }

    /// Watches `(applied index, state)`; a new value is published after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.state_rx.clone()
    }

    /// What a reader holding the state at applied index `known` must take to hold the state
    /// at `upto` (an index this node has applied): the tenants that changed in between, or
    /// everything when this node's change log does not reach back to `known`.
    pub fn changes_since(&self, known: u64, upto: u64) -> Since {
        lock_changes(&self.changes).since(known, upto)
    }

    /// This node's Raft status.
    pub fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let leader_addr =
            m.current_leader.and_then(|l| membership.get_node(&l)).map(|n| n.addr.clone());
        RaftStatus {
            id: self.id,
            leader: m.current_leader,
            leader_addr,
            is_leader: m.current_leader == Some(self.id),
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
        }
    }

    /// Waits (up to `leader_wait_timeout_ms`) until some leader is known; returns its id.
    pub async fn wait_for_leader(&self) -> Result<u64, RegistryError> {
        let limit = self.config.leader_wait_timeout();
        let metrics = self
            .raft
            .wait(Some(limit))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map_err(|e| match e {
                openraft::metrics::WaitError::Timeout(..) => {
                    RegistryError::timeout("wait for leader", limit)
                }
                openraft::metrics::WaitError::ShuttingDown => RegistryError::Shutdown,
            })?;
        metrics
            .current_leader
            .ok_or(RegistryError::NotLeader { leader_id: None, leader_addr: None })
    }

    /// Answers one Raft RPC received from a peer (bytes produced by this crate's network layer
    /// on the sending node). Never fails: a malformed request gets a refusal reply.
    pub async fn handle_rpc(&self, payload: &[u8]) -> Vec<u8> {
        network::serve(&self.raft, self.id(), &self.heard, payload).await
    }

    /// Waits until Raft has stopped for good on this node (a storage error is fatal to openraft,
    /// and so is a shutdown) and says why. The node then exits so that its supervisor restarts
    /// it from the disk, rather than serve a registry that no longer moves.
    pub async fn failed(&self) -> String {
        let mut rx = self.raft.metrics();
        loop {
            if let Err(fatal) = &rx.borrow_and_update().running_state {
                return fatal.to_string();
            }
            if rx.changed().await.is_err() {
                return "raft stopped".to_string();
            }
        }
    }

    /// Stops Raft at once. Pending operations fail with `Shutdown`. What a process that dies
    /// does (the simulator's kills); a clean stop is [`Self::close`].
    pub async fn shutdown(&self) -> Result<(), RegistryError> {
        let elect_task = self.elect_task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = elect_task {
            task.abort();
            let _ = task.await;
        }
        self.raft.shutdown().await.map_err(|e| RegistryError::Raft(format!("shutdown: {e}")))
    }

    /// A clean stop: snapshots what was applied since the last snapshot and drops the log it
    /// covers ([`Self::closing_snapshot`]), then [`Self::shutdown`]. Pending operations fail with
    /// `Shutdown`.
    pub async fn close(&self) -> Result<(), RegistryError> {
        if let Err(e) = self.closing_snapshot().await {
            // Nothing is lost: the next start reads the log the snapshot does not cover, only
            // slower.
            tracing::warn!(error = %e, "no closing snapshot and purge; the next start reads the log");
        }
        self.shutdown().await
    }

    /// Snapshots everything applied, unless the last snapshot already covers it, and drops the
    /// log it covers, so the next start reads the state from the snapshot alone instead of
    /// reading up to `logs_to_keep_after_snapshot` entries and applying up to
    /// `snapshot_logs_since_last` entries again: the log's commands are decoded, validated and
    /// applied one by one (580 entries of 64 adds took each node 0.5 s on a quiet 2-core
    /// machine, 9 s on a loaded one), on top of reading the snapshot (docs/BENCHMARKS.md, the
    /// stop and start at 100,000 tenants). A follower that needs the dropped entries is sent the
    /// snapshot instead.
    async fn closing_snapshot(&self) -> Result<(), RegistryError> {
        let m = self.raft.metrics().borrow().clone();
        let Some(applied) = m.last_applied else { return Ok(()) };
        let covered = |m: &openraft::RaftMetrics<NodeId, BasicNode>| {
            m.snapshot.is_some_and(|s| s.index >= applied.index)
        };
        if !covered(&m) {
            self.raft.trigger().snapshot().await.map_err(|e| RegistryError::Raft(e.to_string()))?;
            self.raft
                .wait(Some(CLOSING_SNAPSHOT_WAIT))
                .metrics(covered, "closing snapshot")
                .await
                .map_err(|_| RegistryError::timeout("closing snapshot", CLOSING_SNAPSHOT_WAIT))?;
        }
        let raft_err = |e: openraft::error::Fatal<NodeId>| RegistryError::Raft(e.to_string());
        self.raft.trigger().purge_log(applied.index).await.map_err(raft_err)?;
        self.raft
            .wait(Some(CLOSING_PURGE_WAIT))
            .metrics(|m| m.purged.is_some_and(|p| p.index >= applied.index), "closing purge")
            .await
            .map_err(|_| RegistryError::timeout("closing purge", CLOSING_PURGE_WAIT))?;
        tracing::info!(index = applied.index, "snapshot at shutdown, log purged up to it");
        Ok(())
    }
}
