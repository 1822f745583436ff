//! Admin reads that gather facts from several nodes: tenant stats, health, the node list.

use proto::cluster::{NodeRequest, NodeResponse, TenantUsage};
use proto::ApiError;
use raft_registry::RegistryState;
use serde_json::json;

use crate::service::{Service, PEER_CALL_TIMEOUT};

const MIB: f64 = proto::cluster::MIB as f64;

/// Usage of one tenant, asked of its owner (this node or a peer).
async fn usage(
    svc: &Service,
    state: &RegistryState,
    tenant: &str,
) -> Result<(u64, TenantUsage), ApiError> {
    let owner = state.owner_of(tenant).ok_or_else(|| ApiError::unavailable("no active node"))?;
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
) -> Result<String, ApiError> {
    let record = crate::admin::known(state, tenant)?;
    let (node, u) = usage(svc, state, tenant).await?;
    Ok(json!({
        "tenant_id": record.id,
        "tier": record.tier.as_str(),
        "storage_used_mb": u.storage_bytes as f64 / MIB,
        "storage_used_bytes": u.storage_bytes,
        "quota_mb": record.quota_bytes / proto::cluster::MIB,
        "api_calls_today": u.api_calls_today,
        "bytes_out_today": u.bytes_out_today,
        // RFC 3339 as in the seeds' stats, and the same instant in ms for scripts; null until
        // the tenant's first request.
        "last_active": u.last_active_ms.map(crate::clock::rfc3339_utc),
        "last_active_ms": u.last_active_ms,
        "node": node,
    })
    .to_string())
}

/// Pending handoffs (from the registry) and the ones this node is pulling now, with progress.
pub fn handoffs(svc: &Service, state: &RegistryState) -> serde_json::Value {
    let pending: Vec<_> = state
        .handoffs()
        .map(|h| json!({"tenant": h.tenant, "from": h.from, "to": h.to, "epoch": h.epoch}))
        .collect();
    let incoming = svc.handoffs.incoming.lock().unwrap_or_else(|p| p.into_inner()).clone();
    json!({ "pending": pending.len(), "pending_list": pending, "pulling_here": incoming })
}

pub fn nodes(svc: &Service, state: &RegistryState) -> serde_json::Value {
    let mut counts = std::collections::HashMap::new();
    for t in state.tenants() {
        if let Some(o) = state.owner_of(&t.id) {
            *counts.entry(o).or_insert(0u64) += 1;
        }
    }
    let status = svc.registry.status();
    // The node's part in Raft as this node's membership config has it.
    let raft_role = |id: u64| {
        if status.voters.contains(&id) {
            "voter"
        } else if status.learners.contains(&id) {
            "learner"
        } else {
            "none"
        }
    };
    json!(state
        .nodes()
        .map(|n| json!({
            "id": n.id,
            "addr": n.addr,
            "state": n.state.as_str(),
            "raft": raft_role(n.id),
            "health": svc.health.of(n.id).as_str(),
            "tenants": counts.get(&n.id).copied().unwrap_or(0),
            "handoffs_in": state.handoffs().filter(|h| h.to == n.id).count(),
            "handoffs_out": state.handoffs().filter(|h| h.from == n.id).count(),
        }))
        .collect::<Vec<_>>())
}

pub fn health(svc: &Service, state: &RegistryState) -> serde_json::Value {
    let status = svc.registry.status();
    json!({
        "node": svc.id,
        "raft": {
            "leader": status.leader,
            "term": status.term,
            "commit_index": status.last_applied_index,
            "last_log_index": status.last_log_index,
            "applied_index": svc.registry.subscribe().borrow().0,
        },
        "placement_epoch": state.placement_epoch(),
        "ring": state.active_nodes(),
        "nodes": nodes(svc, state),
        "gossip": svc.health.snapshot().into_iter().map(|(id, s)| json!({"id": id, "state": s.as_str()})).collect::<Vec<_>>(),
        "handoffs": handoffs(svc, state),
    })
}
