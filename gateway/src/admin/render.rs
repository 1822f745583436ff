//! The admin API's JSON, rendered from the nodes' typed answers: the one place its shape is
//! written (gateway/openapi.json documents it). Object keys come out in sorted order (serde_json's
//! map), so the bytes depend only on the values.

use proto::admin::{AdminAnswer, HealthReport, NodeInfo, TenantInfo, TenantStats};
use proto::cluster::MIB;
use serde_json::{json, Value};

/// An admin answer as the API's JSON, and for a page of tenants the cursor of the next page
/// (sent as [`super::NEXT_AFTER_HEADER`], the body being the page's array). The one place the admin
/// JSON is shaped; gateway/openapi.json documents it.
pub fn render(answer: AdminAnswer) -> (Value, Option<String>) {
    let json = match answer {
        AdminAnswer::Tenant(t) => tenant_json(&t),
        AdminAnswer::Tenants(ts) => Value::Array(ts.iter().map(tenant_json).collect()),
        AdminAnswer::TenantsPage { tenants, next_after } => {
            return (Value::Array(tenants.iter().map(tenant_json).collect()), next_after);
        }
        AdminAnswer::TenantStats(s) => stats_json(&s),
        AdminAnswer::Purged { tenant_id } => json!({ "tenant_id": tenant_id, "status": "purged" }),
        AdminAnswer::Health(h) => health_json(&h),
        AdminAnswer::Nodes(ns) => nodes_json(&ns),
        AdminAnswer::Committed => json!({}),
    };
    (json, None)
}

fn tenant_json(t: &TenantInfo) -> Value {
    json!({
        "tenant_id": t.tenant_id,
        "tier": t.tier.as_str(),
        "quota_mb": t.quota_bytes / MIB,
        "quota_bytes": t.quota_bytes,
        "daily_limit": t.daily_limit,
        "status": t.status.as_str(),
        "created_at_ms": t.created_at_ms,
        "admin_email": t.admin_email,
        "key_hashes": t.key_hashes,
    })
}

fn stats_json(s: &TenantStats) -> Value {
    let u = &s.usage;
    json!({
        "tenant_id": s.tenant_id,
        "tier": s.tier.as_str(),
        "storage_used_mb": u.storage_bytes as f64 / MIB as f64,
        "storage_used_bytes": u.storage_bytes,
        "quota_mb": s.quota_bytes / MIB,
        "api_calls_today": u.api_calls_today,
        "bytes_out_today": u.bytes_out_today,
        // RFC 3339 as in the seeds' stats, and the same instant in ms for scripts; null until
        // the tenant's first request.
        "last_active": u.last_active_ms.map(proto::calendar::rfc3339_utc),
        "last_active_ms": u.last_active_ms,
        "node": s.node,
        "replica_set": s.replica_set,
        "last_lsn": u.last_lsn,
        "backups": u.backups.iter().map(|b| json!({
            "node": b.node,
            "durable_lsn": b.durable_lsn,
            "lag": b.durable_lsn.map(|d| u.last_lsn.saturating_sub(d)),
            "state": b.state,
        })).collect::<Vec<_>>(),
    })
}

fn nodes_json(nodes: &[NodeInfo]) -> Value {
    let node = |n: &NodeInfo| {
        json!({
            "id": n.id,
            "addr": n.addr,
            "state": n.state.as_str(),
            "raft": n.raft.as_str(),
            "health": n.health.as_str(),
            "tenants": n.tenants,
            "handoffs_in": n.handoffs_in,
            "handoffs_out": n.handoffs_out,
        })
    };
    Value::Array(nodes.iter().map(node).collect())
}

fn health_json(h: &HealthReport) -> Value {
    let pending: Vec<Value> = h
        .handoffs
        .pending
        .iter()
        .map(|p| json!({"tenant": p.tenant, "from": p.from, "to": p.to, "epoch": p.epoch}))
        .collect();
    let pulling: serde_json::Map<String, Value> = h
        .handoffs
        .pulling_here
        .iter()
        .map(|(tenant, p)| {
            let progress = json!({
                "from": p.from,
                "epoch": p.epoch,
                "files": p.files,
                "bytes_total": p.bytes_total,
                "bytes_done": p.bytes_done,
                "attempts": p.attempts,
                "last_error": p.last_error,
            });
            (tenant.clone(), progress)
        })
        .collect();
    json!({
        "node": h.node,
        "raft": {
            "leader": h.raft.leader,
            "term": h.raft.term,
            "commit_index": h.raft.commit_index,
            "last_log_index": h.raft.last_log_index,
            "applied_index": h.raft.applied_index,
        },
        "placement_epoch": h.placement_epoch,
        "replicas": h.replicas,
        "down": h.down,
        "under_replicated": h.under_replicated,
        "ring": h.ring,
        "nodes": nodes_json(&h.nodes),
        "gossip": h.gossip.iter().map(|(id, s)| json!({"id": id, "state": s.as_str()})).collect::<Vec<_>>(),
        "handoffs": {
            "pending": h.handoffs.pending.len(),
            "pending_list": pending,
            "pulling_here": pulling,
        },
        "rebuilds": h.rebuilds.iter().map(|r| json!({
            "node": r.node,
            "copies_total": r.copies_total,
            "copies_left": r.copies_left,
            "bytes_taken": r.bytes_taken,
            "elapsed_ms": r.elapsed_ms,
            "done": r.done,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proto::admin::{
        HandoffProgress, HandoffsReport, PendingHandoff, RaftReport, RaftRole, RebuildProgress,
        TenantStatus,
    };
    use proto::cluster::{NodeHealth, NodeState, ReplicaStatus, TenantUsage, Tier};

    use super::*;

    fn check(answer: AdminAnswer, json: &str, next_after: Option<&str>) {
        let (value, next) = render(answer);
        assert_eq!(value.to_string(), json);
        assert_eq!(next.as_deref(), next_after);
    }

    fn acme() -> TenantInfo {
        TenantInfo {
            tenant_id: "acme".into(),
            tier: Tier::Pro,
            quota_bytes: 250 * MIB,
            daily_limit: 10_000,
            status: TenantStatus::Active,
            created_at_ms: 5,
            admin_email: Some("ops@acme.test".into()),
            key_hashes: vec!["ab".into()],
        }
    }

    fn node() -> NodeInfo {
        NodeInfo {
            id: 1,
            addr: "10.0.0.1:7100".into(),
            state: NodeState::Active,
            raft: RaftRole::Voter,
            health: NodeHealth::Alive,
            tenants: 1,
            handoffs_in: 0,
            handoffs_out: 1,
        }
    }

    const ACME: &str = r#"{"admin_email":"ops@acme.test","created_at_ms":5,"daily_limit":10000,"key_hashes":["ab"],"quota_bytes":262144000,"quota_mb":250,"status":"active","tenant_id":"acme","tier":"pro"}"#;
    const NODE: &str = r#"{"addr":"10.0.0.1:7100","handoffs_in":0,"handoffs_out":1,"health":"alive","id":1,"raft":"voter","state":"active","tenants":1}"#;

    // Goal: every kind of admin answer renders to the exact bytes the admin API has always
    // answered (keys sorted, MiB figures derived from bytes, null for what is not known), and a
    // page carries its cursor beside its array.
    #[test]
    fn answers_render_as_the_admin_api_documents() {
        check(AdminAnswer::Tenant(acme()), ACME, None);
        check(AdminAnswer::Tenants(vec![acme()]), &format!("[{ACME}]"), None);
        check(
            AdminAnswer::TenantsPage { tenants: vec![acme()], next_after: Some("acme".into()) },
            &format!("[{ACME}]"),
            Some("acme"),
        );
        check(AdminAnswer::TenantsPage { tenants: vec![], next_after: None }, "[]", None);
        check(
            AdminAnswer::Purged { tenant_id: "acme".into() },
            r#"{"status":"purged","tenant_id":"acme"}"#,
            None,
        );
        check(AdminAnswer::Nodes(vec![node()]), &format!("[{NODE}]"), None);
        check(AdminAnswer::Committed, "{}", None);
        let stats = TenantStats {
            tenant_id: "acme".into(),
            tier: Tier::Free,
            quota_bytes: 25 * MIB,
            usage: TenantUsage {
                tenant_id: "acme".into(),
                storage_bytes: 3 * MIB / 2,
                api_calls_today: 3,
                bytes_out_today: 40,
                last_active_ms: Some(1_770_901_500_999),
                last_lsn: 12,
                backups: vec![
                    ReplicaStatus { node: 3, durable_lsn: Some(10), state: "behind".into() },
                    ReplicaStatus { node: 1, durable_lsn: None, state: "unreachable".into() },
                ],
            },
            node: 2,
            replica_set: vec![2, 3, 1],
        };
        check(
            AdminAnswer::TenantStats(stats.clone()),
            concat!(
                r#"{"api_calls_today":3,"backups":[{"durable_lsn":10,"lag":2,"node":3,"state":"behind"},"#,
                r#"{"durable_lsn":null,"lag":null,"node":1,"state":"unreachable"}],"#,
                r#""bytes_out_today":40,"last_active":"2026-02-12T13:05:00Z","last_active_ms":1770901500999,"#,
                r#""last_lsn":12,"node":2,"quota_mb":25,"replica_set":[2,3,1],"storage_used_bytes":1572864,"#,
                r#""storage_used_mb":1.5,"tenant_id":"acme","tier":"free"}"#
            ),
            None,
        );
        let idle = TenantStats {
            usage: TenantUsage {
                last_active_ms: None,
                storage_bytes: 0,
                last_lsn: 0,
                backups: Vec::new(),
                ..stats.usage
            },
            replica_set: vec![2],
            ..stats
        };
        check(
            AdminAnswer::TenantStats(idle),
            r#"{"api_calls_today":3,"backups":[],"bytes_out_today":40,"last_active":null,"last_active_ms":null,"last_lsn":0,"node":2,"quota_mb":25,"replica_set":[2],"storage_used_bytes":0,"storage_used_mb":0.0,"tenant_id":"acme","tier":"free"}"#,
            None,
        );
    }

    // Goal: the health page renders Raft, ring, gossip, handoffs and rebuilds exactly, progress
    // by tenant and by node.
    #[test]
    fn health_renders_every_part() {
        let progress = HandoffProgress {
            from: 1,
            epoch: 3,
            files: 2,
            bytes_total: 10,
            bytes_done: 0,
            attempts: 1,
            last_error: Some("node 1 is unknown".into()),
        };
        let health = HealthReport {
            node: 2,
            raft: RaftReport {
                leader: Some(1),
                term: 4,
                commit_index: Some(9),
                last_log_index: None,
                applied_index: 9,
            },
            placement_epoch: 3,
            replicas: 3,
            down: vec![2],
            under_replicated: 4,
            ring: vec![1, 2],
            nodes: vec![node()],
            gossip: vec![(1, NodeHealth::Alive), (2, NodeHealth::Dead)],
            handoffs: HandoffsReport {
                pending: vec![PendingHandoff { tenant: "acme".into(), from: 1, to: 2, epoch: 3 }],
                pulling_here: BTreeMap::from([("acme".to_string(), progress)]),
            },
            rebuilds: vec![RebuildProgress {
                node: 2,
                copies_total: 5,
                copies_left: 1,
                bytes_taken: 4096,
                elapsed_ms: 1500,
                done: false,
            }],
        };
        let json = format!(
            concat!(
                r#"{{"down":[2],"gossip":[{{"id":1,"state":"alive"}},{{"id":2,"state":"dead"}}],"#,
                r#""handoffs":{{"pending":1,"pending_list":[{{"epoch":3,"from":1,"tenant":"acme","to":2}}],"#,
                r#""pulling_here":{{"acme":{{"attempts":1,"bytes_done":0,"bytes_total":10,"epoch":3,"#,
                r#""files":2,"from":1,"last_error":"node 1 is unknown"}}}}}},"#,
                r#""node":2,"nodes":[{}],"placement_epoch":3,"#,
                r#""raft":{{"applied_index":9,"commit_index":9,"last_log_index":null,"leader":1,"term":4}},"#,
                r#""rebuilds":[{{"bytes_taken":4096,"copies_left":1,"copies_total":5,"done":false,"#,
                r#""elapsed_ms":1500,"node":2}}],"#,
                r#""replicas":3,"ring":[1,2],"under_replicated":4}}"#
            ),
            NODE
        );
        check(AdminAnswer::Health(Box::new(health)), &json, None);
    }
}
