//! Admin reads that gather facts from several nodes: tenant stats, health, the node list.

use proto::admin::{
    HandoffsReport, HealthReport, NodeInfo, PendingHandoff, RaftReport, RaftRole, TenantStats,
};
use proto::cluster::{NodeRequest, NodeResponse, TenantUsage};
use proto::ApiError;
use raft_registry::RegistryState;

use crate::service::{Service, PEER_CALL_TIMEOUT};

/// Usage of one tenant, asked of its owner (this node or a peer).
async fn usage(
    svc: &Service,
    state: &RegistryState,
    tenant: &str,
) -> Result<(u64, TenantUsage), ApiError> {
    let owner = state
        .primary_of(tenant)
        .ok_or_else(|| ApiError::unavailable("no node of the tenant's replica set is up"))?;
    if owner == svc.id {
        let mut v = svc.usage(vec![tenant.to_string()]).await;
        return v.pop().map(|u| (owner, u)).ok_or_else(|| ApiError::Internal("no usage".into()));
    }
    let addr = state
        .node(owner)
        .and_then(|n| n.addr.parse().ok())
        .ok_or_else(|| ApiError::Internal(format!("node {owner} has no address")))?;
    let request =
        proto::wire::encode(&NodeRequest::TenantUsage { tenants: vec![tenant.to_string()] })
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    let answer = svc.peers.call(addr, request.into(), PEER_CALL_TIMEOUT).await.map_err(|e| {
        // The node and its address go to the log; the answer says only what an admin can act on.
        tracing::info!(tenant, owner, error = %e, "tenant's owner unreachable for stats");
        ApiError::unavailable("the tenant's node is unreachable")
    })?;
    match proto::wire::decode(&answer) {
        Ok(NodeResponse::TenantUsage(mut v)) if !v.is_empty() => Ok((owner, v.remove(0))),
        other => Err(ApiError::Internal(format!("node {owner} answered {other:?}"))),
    }
}

pub async fn tenant_stats(
    svc: &Service,
    state: &RegistryState,
    tenant: &str,
) -> Result<TenantStats, ApiError> {
    let record = crate::admin::known(state, tenant)?;
    let (node, usage) = usage(svc, state, tenant).await?;
    Ok(TenantStats {
        tenant_id: record.id.clone(),
        tier: record.tier,
        quota_bytes: record.quota_bytes,
        usage,
        node,
        replica_set: state.replica_set(tenant),
    })
}

/// Pending handoffs (from the registry) and the ones this node is pulling now, with progress.
pub fn handoffs(svc: &Service, state: &RegistryState) -> HandoffsReport {
    let pending = state
        .handoffs()
        .map(|h| PendingHandoff {
            tenant: h.tenant.clone(),
            from: h.from,
            to: h.to,
            epoch: h.epoch,
        })
        .collect();
    let pulling_here = svc.handoffs.incoming.lock().unwrap_or_else(|p| p.into_inner()).clone();
    HandoffsReport { pending, pulling_here }
}

pub fn nodes(svc: &Service, state: &RegistryState) -> Vec<NodeInfo> {
    let mut counts = std::collections::HashMap::new();
    for t in state.tenants() {
        if let Some(o) = state.owner_of(&t.id) {
            *counts.entry(o).or_insert(0u64) += 1;
        }
    }
    let status = svc.registry.status();
    let raft_role = |id: u64| {
        if status.voters.contains(&id) {
            RaftRole::Voter
        } else if status.learners.contains(&id) {
            RaftRole::Learner
        } else {
            RaftRole::None
        }
    };
    let handoffs = |of: &dyn Fn(&raft_registry::Handoff) -> bool| {
        state.handoffs().filter(|h| of(h)).count() as u64
    };
    state
        .nodes()
        .map(|n| NodeInfo {
            id: n.id,
            addr: n.addr.clone(),
            state: n.state,
            raft: raft_role(n.id),
            health: svc.health.of(n.id),
            tenants: counts.get(&n.id).copied().unwrap_or(0),
            handoffs_in: handoffs(&|h| h.to == n.id),
            // A set below R that grows loses no node (`from` = `to`).
            handoffs_out: handoffs(&|h| h.from == n.id && h.to != n.id),
        })
        .collect()
}

pub fn health(svc: &Service, state: &RegistryState) -> HealthReport {
    let status = svc.registry.status();
    HealthReport {
        node: svc.id,
        raft: RaftReport {
            leader: status.leader,
            term: status.term,
            commit_index: status.last_applied_index,
            last_log_index: status.last_log_index,
            applied_index: svc.registry.subscribe().borrow().0,
        },
        placement_epoch: state.placement_epoch(),
        replicas: state.replicas() as u64,
        down: state.liveness_marks().filter(|(_, l)| l.down).map(|(id, _)| id).collect(),
        under_replicated: state.under_replicated() as u64,
        ring: state.active_nodes(),
        nodes: nodes(svc, state),
        gossip: svc.health.snapshot(),
        handoffs: handoffs(svc, state),
        rebuilds: svc
            .catch_ups
            .rebuild_progress(svc.id, svc.mono_ms(), svc.handoffs.snapshot_bytes())
            .into_iter()
            .collect(),
    }
}
