//! The registry's one error type.

use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, Fatal, RaftError,
};

use crate::command::Rejection;
use crate::disk::StoreError;
use crate::types::{Node, NodeId};

/// Everything a registry operation can fail with, in variants callers must tell apart.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// This node is not the leader; forward to `leader_addr` (when known) and retry.
    #[error("not the leader; leader is {leader_id:?} at {leader_addr:?}")]
    NotLeader { leader_id: Option<u64>, leader_addr: Option<String> },
    /// The state machine refused the command; nothing changed.
    #[error("rejected: {0}")]
    Rejected(#[from] Rejection),
    /// Another membership change is running (here or not yet committed in Raft).
    #[error("a membership change is already in progress")]
    MembershipChangeInProgress,
    /// The join of this node was cancelled by a request to remove it; its learner was dropped.
    #[error("the join of node {0} was cancelled by its removal")]
    JoinCancelled(u64),
    /// A membership change that openraft refused for another reason.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// The leader could not confirm its leadership with a quorum.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The operation did not finish in time; a write may still commit later.
    #[error("{op} timed out after {timeout_ms} ms")]
    Timeout { op: &'static str, timeout_ms: u64 },
    /// The registry's files could not be read or written.
    #[error("registry storage: {0}")]
    Storage(#[from] StoreError),
    /// Raft stopped with a fatal error (e.g. a storage failure inside openraft).
    #[error("raft: {0}")]
    Raft(String),
    /// The registry was shut down.
    #[error("registry is shut down")]
    Shutdown,
    #[error("invalid registry config: {0}")]
    InvalidConfig(String),
}

impl RegistryError {
    pub(crate) fn timeout(op: &'static str, after: std::time::Duration) -> RegistryError {
        RegistryError::Timeout { op, timeout_ms: after.as_millis().try_into().unwrap_or(u64::MAX) }
    }

    /// The same failure for each writer of a round that failed as a whole (the error holds no
    /// clonable I/O error, so storage failures travel as their text).
    pub(crate) fn for_each_writer(&self) -> RegistryError {
        match self {
            RegistryError::NotLeader { leader_id, leader_addr } => {
                RegistryError::NotLeader { leader_id: *leader_id, leader_addr: leader_addr.clone() }
            }
            RegistryError::Rejected(r) => RegistryError::Rejected(r.clone()),
            RegistryError::MembershipChangeInProgress => RegistryError::MembershipChangeInProgress,
            RegistryError::JoinCancelled(id) => RegistryError::JoinCancelled(*id),
            RegistryError::Membership(m) => RegistryError::Membership(m.clone()),
            RegistryError::NoQuorum(m) => RegistryError::NoQuorum(m.clone()),
            RegistryError::Timeout { op, timeout_ms } => {
                RegistryError::Timeout { op, timeout_ms: *timeout_ms }
            }
            RegistryError::Storage(e) => RegistryError::Raft(format!("storage: {e}")),
            RegistryError::Raft(m) => RegistryError::Raft(m.clone()),
            RegistryError::Shutdown => RegistryError::Shutdown,
            RegistryError::InvalidConfig(m) => RegistryError::InvalidConfig(m.clone()),
        }
    }

    pub(crate) fn not_leader(
        leader_id: Option<NodeId>,
        leader_node: Option<Node>,
    ) -> RegistryError {
        RegistryError::NotLeader { leader_id, leader_addr: leader_node.map(|n| n.addr) }
    }
}

impl From<Fatal<NodeId>> for RegistryError {
    fn from(f: Fatal<NodeId>) -> Self {
        match f {
            Fatal::Stopped => RegistryError::Shutdown,
            other => RegistryError::Raft(other.to_string()),
        }
    }
}

impl From<RaftError<NodeId, ClientWriteError<NodeId, Node>>> for RegistryError {
    fn from(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> Self {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                Self::not_leader(f.leader_id, f.leader_node)
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            )) => RegistryError::MembershipChangeInProgress,
            RaftError::APIError(ClientWriteError::ChangeMembershipError(other)) => {
                RegistryError::Membership(other.to_string())
            }
            RaftError::Fatal(f) => f.into(),
        }
    }
}

impl From<RaftError<NodeId, CheckIsLeaderError<NodeId, Node>>> for RegistryError {
    fn from(e: RaftError<NodeId, CheckIsLeaderError<NodeId, Node>>) -> Self {
        match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
                Self::not_leader(f.leader_id, f.leader_node)
            }
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
                RegistryError::NoQuorum(q.to_string())
            }
            RaftError::Fatal(f) => f.into(),
        }
    }
}
