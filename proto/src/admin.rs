//! Answers to admin operations ([`crate::cluster::AdminOp`]), as a node sends them to a gateway.
//!
//! They are plain data: the node fills them from its registry, its gossip table and the owning
//! node's usage; the gateway alone renders them as the admin API's JSON. No JSON crosses the wire,
//! so the shape of an admin answer is written in one place (the gateway's `admin::render`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::{NodeHealth, NodeState, TenantUsage, Tier};

/// What an admin operation answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminAnswer {
    /// One tenant: asked for, or as a change (add, patch, key rotation, archive) left it.
    Tenant(TenantInfo),
    /// Every tenant, in id order.
    Tenants(Vec<TenantInfo>),
    /// One page of tenants in id order; `next_after` is the cursor of the next page when more
    /// tenants may follow.
    TenantsPage {
        tenants: Vec<TenantInfo>,
        next_after: Option<String>,
    },
    TenantStats(TenantStats),
    /// The tenant's data is destroyed everywhere and its id retired.
    Purged {
        tenant_id: String,
    },
    Health(Box<HealthReport>),
    /// Every node the registry knows, as after a membership change.
    Nodes(Vec<NodeInfo>),
    /// A registry command one node forwarded to the leader is committed.
    Committed,
}

/// A tenant's standing as the admin API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TenantStatus {
    Active,
    Disabled,
    /// Deleted by an admin: refused, its data kept until a purge.
    Archived,
}

impl TenantStatus {
    /// Lower-case name as used by the admin API ("active", "disabled", "archived").
    pub fn as_str(self) -> &'static str {
        match self {
            TenantStatus::Active => "active",
            TenantStatus::Disabled => "disabled",
            TenantStatus::Archived => "archived",
        }
    }

    /// Parses the admin API's lower-case status name.
    pub fn parse(name: &str) -> Option<TenantStatus> {
        [TenantStatus::Active, TenantStatus::Disabled, TenantStatus::Archived]
            .into_iter()
            .find(|s| s.as_str() == name)
    }
}

/// One tenant's registry record, without anything secret (keys are hashes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInfo {
    pub tenant_id: String,
    pub tier: Tier,
    pub quota_bytes: u64,
    pub daily_limit: u64,
    pub status: TenantStatus,
    pub created_at_ms: u64,
    pub admin_email: Option<String>,
    pub key_hashes: Vec<String>,
}

/// One tenant's record and usage, as its owning node counts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantStats {
    pub tenant_id: String,
    pub tier: Tier,
    pub quota_bytes: u64,
    pub usage: TenantUsage,
    /// The node that owns the tenant (its primary) and counted its usage.
    pub node: u64,
    /// Every node that holds the tenant, its primary first.
    pub replica_set: Vec<u64>,
}

/// A node's part in Raft, as the answering node's membership config has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RaftRole {
    Voter,
    Learner,
    /// Not (or no longer) in the membership.
    None,
}

impl RaftRole {
    /// Lower-case name for status pages ("voter", "learner", "none").
    pub fn as_str(self) -> &'static str {
        match self {
            RaftRole::Voter => "voter",
            RaftRole::Learner => "learner",
            RaftRole::None => "none",
        }
    }
}

/// One node as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u64,
    pub addr: String,
    pub state: NodeState,
    pub raft: RaftRole,
    /// Health as the answering node's gossip sees it.
    pub health: NodeHealth,
    /// Tenants the node owns under the current ring.
    pub tenants: u64,
    pub handoffs_in: u64,
    pub handoffs_out: u64,
}

/// The cluster as the answering node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The answering node.
    pub node: u64,
    pub raft: RaftReport,
    pub placement_epoch: u64,
    /// R: how many nodes hold each tenant.
    pub replicas: u64,
    /// Nodes the registry marked down: they stopped renewing their leases.
    pub down: Vec<u64>,
    /// Tenants with fewer usable copies than R (a node of their set down, or fewer active
    /// nodes than R).
    pub under_replicated: u64,
    /// The active nodes, which the ring places tenants on.
    pub ring: Vec<u64>,
    pub nodes: Vec<NodeInfo>,
    /// Every node in the answering node's gossip table, with its verdict.
    pub gossip: Vec<(u64, NodeHealth)>,
    pub handoffs: HandoffsReport,
    /// Nodes rebuilding the copies they lost with their tenant store, or done since they
    /// started: a node reports its own, and the gateway gathers every node's.
    pub rebuilds: Vec<RebuildProgress>,
}

/// How far a node is in rebuilding the copies it lost with its tenant store (docs/REPLICATION.md,
/// "A lost disk").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildProgress {
    pub node: u64,
    /// Copies the node held when the rebuild started (or when a restart of the node started
    /// it again): every one was lost with its store. One whose primary prepared it before the
    /// rebuild's first pass counts already, so is not among `copies_left` at that pass.
    pub copies_total: u64,
    /// Copies that do not count yet (at its last pass, less those rebuilt since): 0 once done.
    pub copies_left: u64,
    /// Bytes of snapshots the node took and installed from the rebuild's start until it was done.
    pub bytes_taken: u64,
    /// Milliseconds since the rebuild started, or that it took once done.
    pub elapsed_ms: u64,
    pub done: bool,
}

/// The registry's Raft state on the answering node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftReport {
    pub leader: Option<u64>,
    pub term: u64,
    /// The last entry applied on the answering node (`None` before its first).
    pub commit_index: Option<u64>,
    pub last_log_index: Option<u64>,
    /// The registry index the answering node's state reflects.
    pub applied_index: u64,
}

/// Handoffs pending in the registry, and the ones the answering node is pulling now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffsReport {
    pub pending: Vec<PendingHandoff>,
    /// By tenant.
    pub pulling_here: BTreeMap<String, HandoffProgress>,
}

/// A tenant whose owner changed in placement epoch `epoch` and whose data is still to move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingHandoff {
    pub tenant: String,
    pub from: u64,
    pub to: u64,
    pub epoch: u64,
}

/// Progress of one tenant a new owner is pulling.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffProgress {
    pub from: u64,
    pub epoch: u64,
    pub files: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub attempts: u32,
    /// Why the last attempt failed, as logged.
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: status names round-trip and unknown ones are refused.
    #[test]
    fn status_names_round_trip() {
        for s in [TenantStatus::Active, TenantStatus::Disabled, TenantStatus::Archived] {
            assert_eq!(TenantStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(TenantStatus::parse("gone"), None);
    }
}
