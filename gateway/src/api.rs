//! The public `/api/v2` surface: SQ's order of checks, then forwarding to the owning node.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use proto::cluster::{NodeRequest, NodeResponse};
use proto::error::UNAVAILABLE_RETRY_AFTER_S;
use proto::request::{self, BODY_BYTES_MAX};
use proto::{ApiError, SqRequest, SqResponse};

use crate::error::error_response;
use crate::forward::{refresh, CallError, FORWARD_TIMEOUT};
use crate::view::key_hash;
use crate::Gateway;

/// Where the API lives; everything else answers like an unknown route.
pub const API_PREFIX: &str = "/api/v2/";

/// The key a request carries: `Authorization: Bearer <key>`, `Authorization: <key>`, or
/// `X-SQ-API-Key: <key>`. Authorization wins when both are present.
pub fn request_key(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        let key = match v.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => v[7..].trim(),
            _ => v,
        };
        return Some(key.to_string());
    }
    headers.get("x-sq-api-key").and_then(|v| v.to_str().ok()).map(|v| v.trim().to_string())
}

fn with_cors(mut response: Response) -> Response {
    response.headers_mut().insert("access-control-allow-origin", HeaderValue::from_static("*"));
    response
}

/// The CORS preflight answer: 204 before any key is checked. On SQ's routes it allows what SQ
/// 0.6.0 allows (GET, POST; `Authorization`, `Content-Type`) plus `X-SQ-API-Key`, the key header
/// SQ accepts (phext-notepad sends it) but leaves out of its preflight, so a browser client
/// could not send it to SQ; the admin API also allows its PATCH and DELETE.
pub fn preflight(path: &str) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    let methods = if is_admin_path(path) {
        "GET, POST, PATCH, DELETE, OPTIONS"
    } else {
        "GET, POST, OPTIONS"
    };
    h.insert("access-control-allow-methods", HeaderValue::from_static(methods));
    h.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("Authorization, Content-Type, X-SQ-API-Key"),
    );
    h.insert("access-control-max-age", HeaderValue::from_static("86400"));
    r
}

/// The admin API and the cluster's metrics (admin key).
fn is_admin_path(path: &str) -> bool {
    path.starts_with("/api/v2/admin/") || path == "/api/v2/admin" || path == "/api/v2/metrics"
}

/// Reads the body up to the named limit.
pub async fn read_body(body: Body) -> Result<bytes::Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, BODY_BYTES_MAX);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge { limit_bytes: BODY_BYTES_MAX as u64 })
        }
        Err(e) => match body_timeout(e.as_ref()) {
            Some(t) => Err(ApiError::RequestTimeout {
                limit_ms: u64::try_from(t.limit.as_millis()).unwrap_or(u64::MAX),
            }),
            None => Err(ApiError::bad_request(format!("cannot read body: {e}"))),
        },
    }
}

/// The body-read timeout behind a body error, if that is what ended the read.
fn body_timeout<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a crate::conn::BodyTimeout> {
    std::iter::successors(Some(e), |e| e.source())
        .find_map(|e| e.downcast_ref::<crate::conn::BodyTimeout>())
}

/// Every request lands here; admin routes branch off after OPTIONS and the method check.
pub async fn handle(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = dispatch(&gw, request).await;
    crate::metering::record(&method, &path, response.status(), started.elapsed());
    response
}

async fn dispatch(gw: &Arc<Gateway>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    if request.method() == Method::OPTIONS {
        return preflight(&path);
    }
    // The API's description needs no key (crate::routes lists every route served).
    if path == crate::routes::OPENAPI_PATH && request.method() == Method::GET {
        return crate::routes::openapi_response();
    }
    if is_admin_path(&path) {
        return crate::admin::handle(gw, request).await;
    }
    let method = match *request.method() {
        Method::GET => request::Method::Get,
        Method::POST => request::Method::Post,
        _ => return error_response(&ApiError::bad_request("")),
    };
    match public(gw, method, request).await {
        Ok(answer) => answer_response(answer),
        Err(e) => error_response(&e),
    }
}

/// An answer from the owner: whole, or its length and a body still arriving in frames.
pub enum Answer {
    Whole(SqResponse),
    Streamed { len: u64, json: bool, body: transport::BodyReader },
}

/// A streamed answer as HTTP: `Content-Length` from the head, then the body frames as they
/// arrive, one at a time (the node sends the next only as QUIC's window opens). A body that
/// stalls, ends short or runs long is cut, so the client sees a truncated answer, never a
/// wrong one.
fn streamed_response(len: u64, json: bool, body: transport::BodyReader) -> Response {
    let pieces = futures::stream::unfold(Some((body, 0u64)), move |state| async move {
        let (mut body, got) = state?;
        let cut = |why: String| {
            tracing::warn!(len, got, "streamed answer cut: {why}");
            Some((Err(std::io::Error::other(why)), None))
        };
        match body.next(FORWARD_TIMEOUT).await {
            Ok(Some(piece)) if got + piece.len() as u64 <= len => {
                let got = got + piece.len() as u64;
                Some((Ok(piece), Some((body, got))))
            }
            Ok(None) if got == len => None,
            Ok(Some(_)) => cut("the node sent more than it announced".into()),
            Ok(None) => cut("the node's answer ended early".into()),
            Err(e) => cut(e.to_string()),
        }
    });
    let mut r = Response::new(Body::from_stream(pieces));
    let content_type = if json { "application/json" } else { "text/plain; charset=utf-8" };
    r.headers_mut().insert("content-type", HeaderValue::from_static(content_type));
    r.headers_mut().insert("content-length", HeaderValue::from(len));
    with_cors(r)
}

fn answer_response(answer: Answer) -> Response {
    match answer {
        Answer::Whole(r) => ok_response(r),
        Answer::Streamed { len, json, body } => streamed_response(len, json, body),
    }
}

fn ok_response(answer: SqResponse) -> Response {
    let content_type = if answer.json { "application/json" } else { "text/plain; charset=utf-8" };
    let mut r = (StatusCode::OK, answer.body).into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static(content_type));
    with_cors(r)
}

async fn public(
    gw: &Arc<Gateway>,
    method: request::Method,
    request: Request,
) -> Result<Answer, ApiError> {
    let key = request_key(request.headers()).ok_or(ApiError::Unauthorized)?;
    let caller = authenticate(gw, &key)?;
    let route = request.uri().path().strip_prefix(API_PREFIX).map(str::to_string);
    let query = request.uri().query().unwrap_or("").to_string();
    let body = read_body(request.into_body()).await?;
    let route = route.ok_or(ApiError::NotFound)?;
    let sq = request::parse(method, &route, &query, &body)?;
    if matches!(sq, SqRequest::Version) {
        return Ok(Answer::Whole(SqResponse::text(request::SQ_API_VERSION)));
    }
    forward(gw, &caller.tenant, &caller.key_hash, sq, true).await
}

/// A tenant authenticated by its key in this gateway's view.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub key_hash: String,
}

/// The tenant a key belongs to: 401 for a key the view does not know, 403 for a disabled tenant.
pub fn authenticate(gw: &Gateway, key: &str) -> Result<Caller, ApiError> {
    let hash = key_hash(key);
    let view = gw.views.current();
    let tenant = view.tenant_by_key_hash(&hash).ok_or(ApiError::Unauthorized)?;
    if !tenant.enabled {
        return Err(ApiError::Forbidden("tenant is disabled".into()));
    }
    Ok(Caller { tenant: tenant.id.to_string(), key_hash: hash })
}

/// The HTTP-free core of a public request after its key: parse `/api/v2/<route>?<query>` with
/// `body`, then run it on the tenant's owner. The simulator enters the gateway here.
pub async fn serve(
    gw: &Arc<Gateway>,
    caller: &Caller,
    method: request::Method,
    route: &str,
    query: &str,
    body: &[u8],
) -> Result<SqResponse, ApiError> {
    let sq = request::parse(method, route, query, body)?;
    if matches!(sq, SqRequest::Version) {
        return Ok(SqResponse::text(request::SQ_API_VERSION));
    }
    match forward(gw, &caller.tenant, &caller.key_hash, sq, false).await? {
        Answer::Whole(r) => Ok(r),
        Answer::Streamed { .. } => {
            Err(ApiError::Internal("a streamed answer was not asked for".into()))
        }
    }
}

/// Sends the request to the tenant's owner; on "not owner" refreshes the view and tries once more.
/// With `stream`, the owner may answer a large document as a stream.
///
/// A read whose owner the view replaces while it waits (the owner marked down, its tenants
/// given new primaries) is sent to the new owner at once, once: a frozen or dead owner would
/// leave it to [`FORWARD_TIMEOUT`] and a 503 though a primary is available. A read changes
/// nothing, so sending it twice is safe; a write is not sent again (the old owner may have
/// committed it) and waits for its owner's answer or the timeout, as before.
async fn forward(
    gw: &Arc<Gateway>,
    tenant: &str,
    hash: &str,
    sq: SqRequest,
    stream: bool,
) -> Result<Answer, ApiError> {
    let mut refreshed = false;
    let mut rerouted = sq.is_write();
    loop {
        let view = gw.views.current();
        let unavailable = |reason: String| ApiError::Unavailable {
            reason,
            retry_after_s: UNAVAILABLE_RETRY_AFTER_S,
        };
        let owner = view
            .tenant(tenant)
            .and_then(|t| t.owner)
            .ok_or_else(|| unavailable("no node serves this tenant".into()))?;
        // Node ids and addresses go to the log; the client learns only that its node is away.
        if view.is_dead(owner) {
            tracing::debug!(tenant, owner, "owner is down");
            return Err(unavailable("the tenant's node is down".into()));
        }
        let Some(addr) = view.node_addr(owner) else {
            tracing::warn!(tenant, owner, "owner has no address in the view");
            return Err(unavailable("the tenant's node is unreachable".into()));
        };
        let request = NodeRequest::Sq {
            tenant: tenant.to_string(),
            key_hash: hash.to_string(),
            epoch: view.view.epoch,
            request: sq.clone(),
        };
        let call = async {
            if stream {
                gw.client.call_answer(addr, request, FORWARD_TIMEOUT).await
            } else {
                gw.client
                    .call(addr, request, FORWARD_TIMEOUT)
                    .await
                    .map(|r| (r, transport::BodyReader::empty()))
            }
        };
        let answer = if rerouted {
            call.await
        } else {
            // Biased: an answer that is ready wins over a view change seen in the same poll.
            tokio::select! {
                biased;
                answer = call => answer,
                () = routed_elsewhere(&gw.views, tenant, owner) => {
                    tracing::debug!(tenant, owner, "owner replaced while a read waited; resent");
                    rerouted = true;
                    continue;
                }
            }
        };
        match answer {
            Ok((NodeResponse::SqStreamed { len, json }, body)) => {
                return Ok(Answer::Streamed { len, json, body })
            }
            Ok((NodeResponse::Sq(Err(ApiError::NotOwner { epoch })), body)) if !refreshed => {
                body.close();
                tracing::debug!(tenant, owner, epoch, "not the owner; refreshing the view");
                refresh(gw.client.as_ref(), &gw.views, &gw.seeds).await;
                refreshed = true;
            }
            Ok((NodeResponse::Sq(result), body)) => {
                body.close();
                return result.map(Answer::Whole);
            }
            Ok((other, _)) => {
                return Err(ApiError::Internal(format!(
                    "unexpected answer from node {owner}: {other:?}"
                )))
            }
            Err(CallError::Unreachable(e)) => {
                tracing::info!(tenant, owner, error = %e, "owner unreachable");
                // The node may have taken a write before it stopped answering (or answered
                // after the wait ended): the client must not take the 503 as "not written".
                let reason = if sq.is_write() {
                    "the tenant's node did not answer; the write's outcome is unknown"
                } else {
                    "the tenant's node is unreachable"
                };
                return Err(unavailable(reason.into()));
            }
            // Final: the same request would fail the same way, so no Retry-After.
            Err(e @ CallError::Protocol(_)) => {
                return Err(ApiError::Internal(format!("node {owner}: {e}")))
            }
        }
    }
}

/// Resolves once the view no longer routes `tenant` to `owner`: another node owns it, or gossip
/// says `owner` is dead. Never resolves while the view keeps routing there.
async fn routed_elsewhere(views: &crate::view::ViewHandle, tenant: &str, owner: u64) {
    // Subscribed before the first look, so a change between the two is not missed.
    let mut changes = views.subscribe();
    loop {
        let view = views.current();
        if view.tenant(tenant).and_then(|t| t.owner) != Some(owner) || view.is_dead(owner) {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the preflight of SQ's routes allows SQ's methods (and the X-SQ-API-Key header SQ
    // reads keys from); only the admin API allows PATCH and DELETE.
    #[test]
    fn preflight_matches_sq_on_public_routes() {
        let public = preflight("/api/v2/select");
        assert_eq!(public.status(), StatusCode::NO_CONTENT);
        let h = public.headers();
        assert_eq!(h["access-control-allow-methods"], "GET, POST, OPTIONS");
        assert_eq!(h["access-control-allow-headers"], "Authorization, Content-Type, X-SQ-API-Key");
        assert_eq!(h["access-control-allow-origin"], "*");
        assert_eq!(h["access-control-max-age"], "86400");
        let admin = preflight("/api/v2/admin/tenants");
        assert_eq!(
            admin.headers()["access-control-allow-methods"],
            "GET, POST, PATCH, DELETE, OPTIONS"
        );
    }
}
