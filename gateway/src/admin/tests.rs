//! An admin write sent again after its first send went quiet: answered by what the registry
//! holds, not by the 409 the second send gets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::admin::{AdminAnswer, TenantInfo, TenantStatus};
use proto::cluster::{
    AdminOp, NodeHealth, NodeRequest, NodeResponse, NodeState, NodeView, RegistryView, Tier,
};
use proto::ApiError;

use super::send_admin;
use crate::forward::{BoxFuture, CallError, NodeClient};
use crate::view::ViewHandle;
use crate::Gateway;

/// A registry leader whose answer to the first add is lost on the way back, though the add is
/// applied: the tenant then holds `held_key_hash`.
struct LostAnswer {
    held_key_hash: String,
    adds: Mutex<u32>,
}

impl NodeClient for LostAnswer {
    fn call(
        &self,
        _addr: SocketAddr,
        request: NodeRequest,
        _t: Duration,
    ) -> BoxFuture<'_, Result<NodeResponse, CallError>> {
        Box::pin(async move {
            let NodeRequest::Admin { op, .. } = request else {
                return Ok(NodeResponse::Refused("admin only".into()));
            };
            let result = match op {
                AdminOp::AddTenant { tenant_id, .. } => {
                    let mut adds = self.adds.lock().unwrap_or_else(|p| p.into_inner());
                    *adds += 1;
                    if *adds == 1 {
                        return Err(CallError::Unreachable("no answer within the deadline".into()));
                    }
                    Err(ApiError::Conflict(format!("tenant {tenant_id} exists")))
                }
                AdminOp::GetTenant { tenant_id } => Ok(AdminAnswer::Tenant(TenantInfo {
                    tenant_id,
                    tier: Tier::Free,
                    quota_bytes: 1 << 20,
                    daily_limit: 1_000,
                    status: TenantStatus::Active,
                    created_at_ms: 0,
                    admin_email: None,
                    key_hashes: vec![self.held_key_hash.clone()],
                })),
                other => Err(ApiError::Internal(format!("unexpected {other:?}"))),
            };
            Ok(NodeResponse::Admin { result, applied_index: 8 })
        })
    }
}

fn gateway(held_key_hash: &str) -> Arc<Gateway> {
    let views = ViewHandle::default();
    views.replace(RegistryView {
        leader: Some(1),
        term: 1,
        applied_index: 7,
        epoch: 1,
        admin_key_hash: None,
        tenants: Vec::new(),
        nodes: vec![NodeView {
            id: 1,
            addr: "127.0.0.1:9".into(),
            state: NodeState::Active,
            health: NodeHealth::Alive,
            heartbeat: 0,
        }],
    });
    let client =
        Arc::new(LostAnswer { held_key_hash: held_key_hash.to_string(), adds: Mutex::new(0) });
    Arc::new(Gateway { views, client, seeds: Vec::new() })
}

fn add(key_hash: &str) -> AdminOp {
    AdminOp::AddTenant {
        tenant_id: "acme".into(),
        tier: None,
        quota_mb: None,
        admin_email: None,
        key_hash: key_hash.into(),
    }
}

// Goal: an add whose first answer was lost and whose second send gets 409 is answered as done
// when the tenant holds the key this add gave it; when the tenant holds another key (someone
// else's add), the 409 stands.
#[tokio::test]
async fn an_add_sent_again_that_had_landed_is_done() {
    let gw = gateway("hash-of-this-add");
    let done = send_admin(&gw, "admin".into(), add("hash-of-this-add"), true).await;
    match done {
        Ok((AdminAnswer::Tenant(info), _, _)) => {
            assert_eq!(info.tenant_id, "acme");
            assert_eq!(info.key_hashes, vec!["hash-of-this-add".to_string()]);
        }
        other => panic!("expected the tenant, got {other:?}"),
    }

    let gw = gateway("hash-of-another-add");
    let refused = send_admin(&gw, "admin".into(), add("hash-of-this-add"), true).await;
    assert!(matches!(refused, Err(ApiError::Conflict(_))), "{refused:?}");
}
