//! The admin API: tenants and nodes, checked against the admin key's hash, applied through the
//! registry by whichever node answers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use proto::cluster::{AdminOp, NodeRequest, NodeResponse, NodeState};
use proto::ApiError;
use rand::RngCore;
use serde::Deserialize;

use crate::api::{read_body, request_key};
use crate::error::error_response;
use crate::forward::{fetch_view, FORWARD_TIMEOUT};

/// How many times the gateway fetches a node's view to see its own admin change.
const SEE_INDEX_ATTEMPTS: usize = 5;
use crate::view::key_hash;
use crate::Gateway;

/// A new tenant key: `pmb-v1-` and 128 random bits as 32 lowercase hex digits.
pub fn new_tenant_key() -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("pmb-v1-{}", hex::encode(bytes))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddTenant {
    tenant_id: String,
    tier: Option<String>,
    quota_mb: Option<u64>,
    admin_email: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchTenant {
    tier: Option<String>,
    quota_mb: Option<u64>,
    enabled: Option<bool>,
    daily_limit: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNode {
    id: u64,
    addr: String,
}

/// Prometheus' text exposition format, which `/api/v2/metrics` answers in.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn handle(gw: &Arc<Gateway>, request: Request) -> Response {
    let content_type = if request.uri().path() == "/api/v2/metrics" {
        PROMETHEUS_CONTENT_TYPE
    } else {
        "application/json"
    };
    match admin(gw, request).await {
        Ok((status, json)) => {
            let mut r = (status, json).into_response();
            r.headers_mut().insert("content-type", HeaderValue::from_static(content_type));
            r.headers_mut().insert("access-control-allow-origin", HeaderValue::from_static("*"));
            r
        }
        Err(e) => error_response(&e),
    }
}

/// The body as `T`, which must be a JSON object: serde would also take a struct from an array
/// of its fields in order, which no client means.
fn json_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("invalid JSON body: expected an object"));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Checks the admin key: a missing or unknown key is 401, a tenant's key is 403.
fn check_admin(gw: &Gateway, request: &Request) -> Result<String, ApiError> {
    let key = request_key(request.headers()).ok_or(ApiError::Unauthorized)?;
    let hash = key_hash(&key);
    let view = gw.views.current();
    if view.is_admin(&hash) {
        return Ok(hash);
    }
    if view.tenant_by_key_hash(&hash).is_some() {
        return Err(ApiError::Forbidden("admin key required".into()));
    }
    Err(ApiError::Unauthorized)
}

async fn admin(gw: &Arc<Gateway>, request: Request) -> Result<(StatusCode, String), ApiError> {
    let admin_hash = check_admin(gw, &request)?;
    let method = request.method().clone();
    let path = request.uri().path().trim_end_matches('/').to_string();
    let body = read_body(request.into_body()).await?;
    if path == "/api/v2/metrics" && method == Method::GET {
        return Ok((StatusCode::OK, crate::metering::cluster_metrics(gw).await));
    }
    let parts: Vec<&str> = path.trim_start_matches("/api/v2/admin/").split('/').collect();
    let mut new_key = None;
    let op = match (&method, parts.as_slice()) {
        (&Method::POST, ["tenants", "add"]) => {
            let add: AddTenant = json_body(&body)?;
            let key = new_tenant_key();
            let op = AdminOp::AddTenant {
                tenant_id: add.tenant_id,
                tier: add.tier,
                quota_mb: add.quota_mb,
                admin_email: add.admin_email,
                key_hash: key_hash(&key),
            };
            new_key = Some(key);
            op
        }
        (&Method::GET, ["tenants"]) => AdminOp::ListTenants,
        (&Method::GET, ["tenants", id]) => AdminOp::GetTenant { tenant_id: id.to_string() },
        (&Method::GET, ["tenants", id, "stats"]) => {
            AdminOp::TenantStats { tenant_id: id.to_string() }
        }
        (&Method::PATCH, ["tenants", id]) => {
            let p: PatchTenant = json_body(&body)?;
            AdminOp::PatchTenant {
                tenant_id: id.to_string(),
                tier: p.tier,
                quota_mb: p.quota_mb,
                enabled: p.enabled,
                daily_limit: p.daily_limit,
            }
        }
        (&Method::POST, ["tenants", id, "rotate-key"]) => {
            let key = new_tenant_key();
            let op = AdminOp::RotateKey { tenant_id: id.to_string(), key_hash: key_hash(&key) };
            new_key = Some(key);
            op
        }
        (&Method::DELETE, ["tenants", id]) => AdminOp::DeleteTenant { tenant_id: id.to_string() },
        (&Method::POST, ["tenants", id, "purge"]) => {
            AdminOp::PurgeTenant { tenant_id: id.to_string() }
        }
        (&Method::GET, ["health"]) => AdminOp::Health,
        (&Method::GET, ["nodes"]) => AdminOp::ListNodes,
        (&Method::POST, ["nodes"]) => {
            let n: AddNode = json_body(&body)?;
            AdminOp::AddNode { id: n.id, addr: n.addr }
        }
        (&Method::POST, ["nodes", id, "drain"]) => AdminOp::DrainNode { id: parse_node_id(id)? },
        (&Method::DELETE, ["nodes", id]) => AdminOp::RemoveNode { id: parse_node_id(id)? },
        _ => return Err(ApiError::NotFound),
    };
    let json = apply_op(gw, admin_hash, op).await?;
    let json = match new_key {
        Some(key) => with_api_key(&json, &key)?,
        None => json,
    };
    let status = if method == Method::POST && parts.as_slice() == ["tenants", "add"] {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, json))
}

/// The HTTP-free core of an admin request: sends `op` to the first node that answers and, for a
/// change, waits (bounded) until this gateway's view shows it. The simulator enters here.
pub async fn apply_op(
    gw: &Arc<Gateway>,
    admin_hash: String,
    op: AdminOp,
) -> Result<String, ApiError> {
    let mutates = !matches!(
        op,
        AdminOp::ListTenants
            | AdminOp::GetTenant { .. }
            | AdminOp::TenantStats { .. }
            | AdminOp::Health
            | AdminOp::ListNodes
    );
    let (json, addr, applied_index) = send_admin(gw, admin_hash, op).await?;
    if mutates {
        // The answering node has applied the change; take its view so this gateway's next
        // request already sees it (a rotated key is refused here at once).
        see_index(gw, addr, applied_index).await;
    }
    Ok(json)
}

fn parse_node_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_request(format!("invalid node id {raw:?}")))
}

/// Adds the freshly made key to the node's answer: the only time the key is ever shown.
fn with_api_key(json: &str, key: &str) -> Result<String, ApiError> {
    let mut value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| ApiError::Internal(format!("node answered bad JSON: {e}")))?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert("api_key".into(), serde_json::Value::String(key.to_string()));
    }
    Ok(value.to_string())
}

/// Takes the view from `addr` until this gateway has seen registry index `index`, within a bound.
async fn see_index(gw: &Arc<Gateway>, addr: SocketAddr, index: u64) {
    for _ in 0..SEE_INDEX_ATTEMPTS {
        if gw.views.current().view.applied_index >= index {
            return;
        }
        match fetch_view(gw.client.as_ref(), addr).await {
            Ok(view) if view.applied_index >= gw.views.current().view.applied_index => {
                gw.views.replace(view)
            }
            _ => {}
        }
    }
    tracing::warn!(index, "view did not reach the admin change's index; the poller will bring it");
}

/// Sends an admin operation to the first node that answers. Returns the answer, that node, and
/// the registry index it had applied.
async fn send_admin(
    gw: &Arc<Gateway>,
    admin_key_hash: String,
    op: AdminOp,
) -> Result<(String, SocketAddr, u64), ApiError> {
    let view = gw.views.current();
    // A removed node keeps answering while its process runs, but no longer hears the registry.
    let removed: Vec<SocketAddr> = view
        .view
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Removed)
        .filter_map(|n| view.node_addr(n.id))
        .collect();
    let mut addrs: Vec<_> = view
        .node_addrs()
        .into_iter()
        .filter(|(id, _)| !view.is_dead(*id))
        .map(|(_, a)| a)
        .collect();
    addrs.extend(gw.seeds.iter().filter(|s| !addrs.contains(s)).copied().collect::<Vec<_>>());
    addrs.retain(|a| !removed.contains(a));
    let mut last = String::from("no node known");
    for addr in addrs {
        let request = NodeRequest::Admin { admin_key_hash: admin_key_hash.clone(), op: op.clone() };
        match gw.client.call(addr, request, FORWARD_TIMEOUT * 4).await {
            // That node cannot reach the registry leader (partitioned, lagging): another one may.
            Ok(NodeResponse::Admin { result: Err(e @ ApiError::Unavailable { .. }), .. }) => {
                last = e.to_string()
            }
            Ok(NodeResponse::Admin { result, applied_index }) => {
                return result.map(|json| (json, addr, applied_index))
            }
            Ok(other) => return Err(ApiError::Internal(format!("unexpected answer: {other:?}"))),
            Err(e) => last = e.to_string(),
        }
    }
    Err(ApiError::unavailable(format!("no node answered: {last}")))
}
