//! The admin API: tenants and nodes, checked against the admin key's hash, applied through the
//! registry by whichever node answers. Nodes answer typed ([`AdminAnswer`]); the JSON the API
//! answers is written here alone ([`render`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use proto::admin::{AdminAnswer, RebuildProgress};
use proto::cluster::{AdminOp, NodeRequest, NodeResponse};
use proto::ApiError;
use rand::RngCore;
use serde::Deserialize;
use serde_json::Value;

use crate::api::{read_body, request_key};
use crate::error::error_response;
use crate::forward::fetch_update;

mod health;
mod render;
use health::{alive_in, heard_from, own_rebuilds};
pub use render::render;
#[cfg(test)]
mod tests;

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetReplicas {
    replicas: u64,
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
        Ok((status, json, next_after)) => {
            let mut r = (status, json).into_response();
            if let Some(next) = next_after.and_then(|n| HeaderValue::from_str(&n).ok()) {
                r.headers_mut().insert(NEXT_AFTER_HEADER, next);
            }
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

/// An admin answer: its status, its JSON, and for a page of tenants the cursor of the next.
type HttpAnswer = (StatusCode, String, Option<String>);

async fn admin(gw: &Arc<Gateway>, request: Request) -> Result<HttpAnswer, ApiError> {
    let admin_hash = check_admin(gw, &request)?;
    let method = request.method().clone();
    let query = request.uri().query().unwrap_or_default().to_string();
    let path = request.uri().path().trim_end_matches('/').to_string();
    let body = read_body(request.into_body()).await?;
    if path == "/api/v2/metrics" && method == Method::GET {
        return Ok((StatusCode::OK, crate::metering::cluster_metrics(gw).await, None));
    }
    let parts: Vec<&str> = path.trim_start_matches("/api/v2/admin/").split('/').collect();
    let (op, new_key) = admin_op(&method, &parts, &query, &body)?;
    let (mut json, next_after) = render(apply_op(gw, admin_hash, op).await?);
    if let (Some(key), Some(obj)) = (new_key, json.as_object_mut()) {
        // The freshly made key: the only time it is ever shown.
        obj.insert("api_key".into(), Value::String(key));
    }
    let status = if method == Method::POST && parts.as_slice() == ["tenants", "add"] {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, json.to_string(), next_after))
}

/// The operation an admin request asks for, from its method, its path's parts after
/// `/api/v2/admin/`, its query and its body; with the tenant key it makes, if it makes one.
fn admin_op(
    method: &Method,
    parts: &[&str],
    query: &str,
    body: &[u8],
) -> Result<(AdminOp, Option<String>), ApiError> {
    let mut new_key = None;
    let op = match (method, parts) {
        (&Method::POST, ["tenants", "add"]) => {
            let add: AddTenant = json_body(body)?;
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
        (&Method::GET, ["tenants"]) => tenants_page_op(query)?.unwrap_or(AdminOp::ListTenants),
        (&Method::GET, ["tenants", id]) => AdminOp::GetTenant { tenant_id: id.to_string() },
        (&Method::GET, ["tenants", id, "stats"]) => {
            AdminOp::TenantStats { tenant_id: id.to_string() }
        }
        (&Method::PATCH, ["tenants", id]) => {
            let p: PatchTenant = json_body(body)?;
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
            let n: AddNode = json_body(body)?;
            AdminOp::AddNode { id: n.id, addr: n.addr }
        }
        (&Method::POST, ["nodes", id, "drain"]) => AdminOp::DrainNode { id: parse_node_id(id)? },
        (&Method::POST, ["replicas"]) => {
            let r: SetReplicas = json_body(body)?;
            AdminOp::SetReplicas { replicas: r.replicas }
        }
        (&Method::DELETE, ["nodes", id]) => AdminOp::RemoveNode { id: parse_node_id(id)? },
        _ => return Err(ApiError::NotFound),
    };
    Ok((op, new_key))
}

/// The header naming the cursor of the next page of tenants (`after=` of the next request);
/// absent on the last page.
pub const NEXT_AFTER_HEADER: &str = "x-next-after";

/// Tenants per page when `limit` is not given but another paging parameter is.
const TENANTS_PAGE_DEFAULT: u64 = 1_000;

/// The paged listing asked for by `query` (`limit`, `after`, `tier`, `status`, `node`); `None`
/// for none of them (the whole list at once, as before paging existed). The node checks the
/// values; a parameter of another name is refused here.
fn tenants_page_op(query: &str) -> Result<Option<AdminOp>, ApiError> {
    let params = proto::request::Params::parse(query);
    if let Some(other) =
        params.names().find(|n| !["limit", "after", "tier", "status", "node"].contains(n))
    {
        return Err(ApiError::bad_request(format!(
            "unknown parameter {other:?}: use limit, after, tier, status or node"
        )));
    }
    if params.names().next().is_none() {
        return Ok(None);
    }
    let text = |name: &str| -> Result<Option<String>, ApiError> {
        params
            .get(name)
            .map(|v| {
                String::from_utf8(v.to_vec())
                    .map_err(|_| ApiError::bad_request(format!("{name} is not UTF-8")))
            })
            .transpose()
    };
    let number = |name: &str| -> Result<Option<u64>, ApiError> {
        text(name)?
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::bad_request(format!("{name} must be a whole number, not {v:?}"))
                })
            })
            .transpose()
    };
    Ok(Some(AdminOp::ListTenantsPage {
        limit: number("limit")?.unwrap_or(TENANTS_PAGE_DEFAULT),
        after: text("after")?,
        tier: text("tier")?,
        status: text("status")?,
        node: number("node")?,
    }))
}

/// The HTTP-free core of an admin request: sends `op` to the first node that answers and, for a
/// change, waits (bounded) until this gateway's view shows it. The simulator enters here.
pub async fn apply_op(
    gw: &Arc<Gateway>,
    admin_hash: String,
    op: AdminOp,
) -> Result<AdminAnswer, ApiError> {
    let mutates = !matches!(
        op,
        AdminOp::ListTenants
            | AdminOp::ListTenantsPage { .. }
            | AdminOp::GetTenant { .. }
            | AdminOp::TenantStats { .. }
            | AdminOp::Health
            | AdminOp::ListNodes
    );
    let (answer, addr, applied_index) = send_admin(gw, admin_hash, op, mutates).await?;
    if mutates {
        // The answering node has applied the change; take its view so this gateway's next
        // request already sees it (a rotated key is refused here at once).
        see_index(gw, addr, applied_index).await;
    }
    Ok(answer)
}

fn parse_node_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| ApiError::bad_request(format!("invalid node id {raw:?}")))
}

/// Takes the view from `addr` until this gateway has seen registry index `index`, within a bound.
async fn see_index(gw: &Arc<Gateway>, addr: SocketAddr, index: u64) {
    for _ in 0..SEE_INDEX_ATTEMPTS {
        if gw.views.current().view.applied_index >= index {
            return;
        }
        let known_index = gw.views.current().view.applied_index;
        if let Ok(Some(update)) = fetch_update(gw.client.as_ref(), addr, known_index).await {
            gw.views.update(update);
        }
    }
    tracing::warn!(index, "view did not reach the admin change's index; the poller will bring it");
}

/// How long an admin request may take in all before the gateway answers 503: an election
/// (a few seconds) and a write, with room to spare.
const ADMIN_DEADLINE: Duration = Duration::from_secs(15);

/// Pause before trying again when no node could take an admin write (no leader yet); a change
/// of the view (a new leader) ends it early.
const ADMIN_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The nodes to ask, not removed and not dead by gossip, then the seeds.
fn admin_candidates(gw: &Gateway) -> Vec<SocketAddr> {
    let view = gw.views.current();
    let mut addrs: Vec<_> = view
        .node_addrs()
        .into_iter()
        .filter(|(id, _)| !view.is_dead(*id))
        .map(|(_, a)| a)
        .collect();
    let removed = view.removed_addrs();
    for s in &gw.seeds {
        if !addrs.contains(s) && !removed.contains(s) {
            addrs.push(*s);
        }
    }
    addrs
}

/// An admin answer, the node that gave it, and the registry index that node had applied.
type Answered = (AdminAnswer, SocketAddr, u64);

/// What one node's answer means for an admin request.
enum Settled {
    /// Done, either way: the answer, or a refusal that stands.
    Done(Result<Answered, ApiError>),
    /// Another node may answer; why this one did not, for the 503 if none does.
    Elsewhere(Elsewhere),
}

/// Why one node's answer leaves an admin request to another node.
#[derive(Debug, thiserror::Error)]
enum Elsewhere {
    #[error("node at {addr} is behind (index {applied_index} < {min_index}): {error}")]
    Behind { addr: SocketAddr, applied_index: u64, min_index: u64, error: ApiError },
    /// That node cannot reach the registry leader (partitioned, lagging, no leader yet).
    #[error("{0}")]
    NoLeader(ApiError),
    #[error("node at {addr}: {error}")]
    Unreachable { addr: SocketAddr, error: crate::forward::CallError },
}

/// What one node's answer means for the request: done (either way), or try again elsewhere.
/// A node whose registry is behind `min_index` (this gateway's view when the request came; a
/// node still joining has no registry at all) does not get to refuse: another node may know.
fn settle(
    addr: SocketAddr,
    answer: Result<NodeResponse, crate::forward::CallError>,
    min_index: u64,
) -> Settled {
    match answer {
        Ok(NodeResponse::Admin { result: Err(error), applied_index })
            if applied_index < min_index =>
        {
            Settled::Elsewhere(Elsewhere::Behind { addr, applied_index, min_index, error })
        }
        Ok(NodeResponse::Admin { result: Err(e @ ApiError::Unavailable { .. }), .. }) => {
            Settled::Elsewhere(Elsewhere::NoLeader(e))
        }
        Ok(NodeResponse::Admin { result, applied_index }) => {
            Settled::Done(result.map(|answer| (answer, addr, applied_index)))
        }
        Ok(other) => {
            Settled::Done(Err(ApiError::Internal(format!("unexpected answer: {other:?}"))))
        }
        Err(error) => Settled::Elsewhere(Elsewhere::Unreachable { addr, error }),
    }
}

/// Sends an admin operation and returns the answer, the node that gave it, and the registry
/// index that node had applied.
///
/// A read goes to every candidate node at once and the first answer wins: one frozen node never
/// holds it up. A write goes to the registry leader the view names (any node when it names
/// none); when the view learns of a new leader while the write waits, the write goes to the new
/// one at once. There is no fixed per-node timeout: only [`ADMIN_DEADLINE`] for the whole.
async fn send_admin(
    gw: &Arc<Gateway>,
    admin_key_hash: String,
    op: AdminOp,
    mutates: bool,
) -> Result<Answered, ApiError> {
    let request = NodeRequest::Admin { admin_key_hash: admin_key_hash.clone(), op: op.clone() };
    let min_index = gw.views.current().view.applied_index;
    let deadline = tokio::time::Instant::now() + ADMIN_DEADLINE;
    if mutates {
        write_admin(gw, request, admin_key_hash, &op, min_index, deadline).await
    } else {
        read_admin(gw, request, matches!(op, AdminOp::Health), min_index, deadline).await
    }
}

/// No node answered an admin request before its deadline; `last` is the last reason heard.
fn no_answer(last: String) -> ApiError {
    ApiError::Unavailable {
        reason: format!("no node could answer the admin request: {last}"),
        retry_after_s: 1,
    }
}

/// [`send_admin`] for a read: every candidate node at once, the first current answer wins
/// (with `health`, every node's rebuild progress heard within the round is gathered).
async fn read_admin(
    gw: &Arc<Gateway>,
    request: NodeRequest,
    health: bool,
    min_index: u64,
    deadline: tokio::time::Instant,
) -> Result<Answered, ApiError> {
    let candidates = admin_candidates(gw);
    let mut asks: futures::stream::FuturesUnordered<_> = candidates
        .iter()
        .map(|&addr| {
            let request = request.clone();
            async move { (addr, gw.client.call(addr, request, ADMIN_DEADLINE).await) }
        })
        .collect();
    let mut heard = Vec::new();
    let mut last = String::from("no node known");
    // An answer from a node behind this gateway's view, kept in case no node is current.
    let mut behind: Option<Answered> = None;
    // A node reports only its own rebuild after a lost tenant store: for `Health`, every
    // node's, from the answers of this one round.
    let mut rebuilds = Vec::new();
    let mut answered = loop {
        let next = tokio::select! {
            n = futures::StreamExt::next(&mut asks) => n,
            _ = tokio::time::sleep_until(deadline) => break behind.ok_or_else(|| no_answer(last)),
        };
        let Some((addr, answer)) = next else {
            break behind.ok_or_else(|| no_answer(last));
        };
        heard.push(addr);
        if health {
            own_rebuilds(&answer, &mut rebuilds);
        }
        match settle(addr, answer, min_index) {
            Settled::Done(Ok(done)) if done.2 < min_index => {
                if behind.as_ref().is_none_or(|b| b.2 < done.2) {
                    behind = Some(done);
                }
            }
            Settled::Done(done) => break done,
            Settled::Elsewhere(why) => last = why.to_string(),
        }
    };
    if let Ok((AdminAnswer::Health(report), ..)) = &mut answered {
        // The nodes not heard yet have a forward's time more, as a silent node costs any
        // other request; but not a node the answer's gossip holds suspect or dead (the
        // gateway's own view leaves out only the ones it holds dead), which would make every
        // health read wait the whole time while a node dies, and show its death that late.
        let awaited: Vec<SocketAddr> = candidates
            .into_iter()
            .filter(|addr| !heard.contains(addr) && alive_in(report, *addr))
            .collect();
        heard_from(&mut asks, awaited, &mut rebuilds).await;
        rebuilds.sort_by_key(|r: &RebuildProgress| r.node);
        rebuilds.dedup_by_key(|r| r.node);
        report.rebuilds = rebuilds;
    }
    answered
}

/// [`send_admin`] for a write: to the registry leader the view names, again to a new one the
/// view learns of while it waits.
async fn write_admin(
    gw: &Arc<Gateway>,
    request: NodeRequest,
    admin_key_hash: String,
    op: &AdminOp,
    min_index: u64,
    deadline: tokio::time::Instant,
) -> Result<Answered, ApiError> {
    let mut changes = gw.views.subscribe();
    let mut turn = 0usize;
    let mut last = String::from("no node known");
    // Whether an earlier send of this write may have been applied: it was given up on while it
    // waited, or its node went quiet after the request left.
    let mut maybe_applied = false;
    loop {
        let leader = gw.views.current().leader_addr();
        let Some(target) = leader.or_else(|| next_candidate(gw, &mut turn)) else {
            return Err(no_answer(last));
        };
        changes.borrow_and_update();
        let call = gw.client.call(target, request.clone(), ADMIN_DEADLINE);
        tokio::pin!(call);
        // Waits for the answer; gives up on it when the view names another leader (the node
        // asked is frozen or deposed) and asks that one instead.
        let outcome = loop {
            tokio::select! {
                answer = &mut call => break Some(settle(target, answer, min_index)),
                changed = changes.changed() => {
                    if changed.is_err() || gw.views.current().leader_addr() != leader {
                        break None;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Err(no_answer(last)),
            }
        };
        match outcome {
            Some(Settled::Done(Err(ApiError::Conflict(why)))) if maybe_applied => {
                return landed_before(gw, admin_key_hash, op)
                    .await
                    .unwrap_or(Err(ApiError::Conflict(why)));
            }
            Some(Settled::Done(done)) => return done,
            Some(Settled::Elsewhere(why)) => {
                maybe_applied |= matches!(why, Elsewhere::Unreachable { .. });
                last = why.to_string();
                // No leader there yet: wait for the view to name one (or a short pause).
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(ADMIN_RETRY_PAUSE) => {}
                    _ = tokio::time::sleep_until(deadline) => return Err(no_answer(last)),
                }
            }
            None => {
                maybe_applied = true;
                tracing::info!(
                    from = %target,
                    "the registry leader changed while an admin write waited; sending it to the new one"
                )
            }
        }
    }
}

/// With no registry leader known, the node to ask next, turn by turn: in id order from the
/// first, so the bootstrap node (the one that surely has the registry while a cluster forms) is
/// asked first. `None` when no node is known.
fn next_candidate(gw: &Gateway, turn: &mut usize) -> Option<SocketAddr> {
    let candidates = admin_candidates(gw);
    let pick = *candidates.get(*turn % candidates.len().max(1))?;
    *turn += 1;
    Some(pick)
}

/// A write sent again after an earlier send of it may have been applied, and refused with 409:
/// whether the earlier send is what the registry holds. An add whose tenant now holds the key
/// this add gave it did land: the answer is that tenant, as the add's own answer would have been.
/// `None` when the write is of another kind or the registry holds something else; the 409 stands.
async fn landed_before(
    gw: &Arc<Gateway>,
    admin_key_hash: String,
    op: &AdminOp,
) -> Option<Result<Answered, ApiError>> {
    let AdminOp::AddTenant { tenant_id, key_hash, .. } = op else {
        return None;
    };
    let get = AdminOp::GetTenant { tenant_id: tenant_id.clone() };
    match Box::pin(send_admin(gw, admin_key_hash, get, false)).await {
        Ok((AdminAnswer::Tenant(info), addr, index)) if info.key_hashes.contains(key_hash) => {
            tracing::info!(tenant = %tenant_id, "an add sent again had landed the first time");
            Some(Ok((AdminAnswer::Tenant(info), addr, index)))
        }
        _ => None,
    }
}
