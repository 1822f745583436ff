//! The route table against the OpenAPI document and against the router itself.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use proto::admin::{AdminAnswer, TenantInfo, TenantStatus};
use proto::cluster::{
    NodeHealth, NodeRequest, NodeResponse, NodeState, NodeView, RegistryView, TenantView, Tier,
    ViewUpdate,
};
use proto::SqResponse;
use tower::ServiceExt;

use super::{endpoints, Access, OPENAPI_JSON};
use crate::forward::{BoxFuture, CallError, NodeClient};
use crate::view::{key_hash, ViewHandle};
use crate::{router, Gateway};

const KEY: &str = "pmb-v1-0123456789abcdef0123456789abcdef";
const ADMIN: &str = "sqa-routes-test-admin-key";
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// A node that answers every request with success, so the status says only whether the
/// gateway routed it.
struct AnswerAll;

impl NodeClient for AnswerAll {
    fn call(
        &self,
        _addr: SocketAddr,
        request: NodeRequest,
        _t: Duration,
    ) -> BoxFuture<'_, Result<NodeResponse, CallError>> {
        Box::pin(async move {
            Ok(match request {
                NodeRequest::Sq { .. } => NodeResponse::Sq(Ok(SqResponse::text("ok"))),
                NodeRequest::ViewSince { .. } => {
                    NodeResponse::ViewUpdate(Some(ViewUpdate::Full(view())))
                }
                NodeRequest::Admin { .. } => NodeResponse::Admin {
                    result: Ok(AdminAnswer::Tenant(TenantInfo {
                        tenant_id: "acme".into(),
                        tier: Tier::Free,
                        quota_bytes: Tier::Free.default_quota_bytes(),
                        daily_limit: Tier::Free.default_daily_limit(),
                        status: TenantStatus::Active,
                        created_at_ms: 0,
                        admin_email: None,
                        key_hashes: Vec::new(),
                    })),
                    applied_index: 7,
                },
                NodeRequest::Metrics => NodeResponse::Metrics(String::new()),
                other => NodeResponse::Refused(format!("{other:?}")),
            })
        })
    }
}

fn view() -> RegistryView {
    RegistryView {
        leader: Some(1),
        term: 1,
        applied_index: 7,
        epoch: 1,
        admin_key_hash: Some(key_hash(ADMIN)),
        tenants: vec![TenantView {
            id: "acme".into(),
            key_hashes: vec![key_hash(KEY)],
            enabled: true,
            owner: Some(1),
        }],
        nodes: vec![NodeView {
            id: 1,
            addr: "127.0.0.1:9".into(),
            state: NodeState::Active,
            health: NodeHealth::Alive,
            heartbeat: 0,
        }],
    }
}

fn gateway() -> Arc<Gateway> {
    let views = ViewHandle::default();
    views.replace(view());
    Arc::new(Gateway {
        views,
        client: Arc::new(AnswerAll),
        seeds: vec![SocketAddr::from(([127, 0, 0, 1], 9))],
    })
}

fn openapi() -> serde_json::Value {
    serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON")
}

/// A request that the route accepts: parameters every public route needs, and a body for the
/// admin routes that read one.
fn request_for(method: &str, path: &str, access: Access) -> Request<Body> {
    let is_node = path.starts_with("/api/v2/admin/nodes");
    let concrete = path.replace("{id}", if is_node { "1" } else { "acme" });
    let query = "?p=doc&c=1.1.1/1.1.1/1.1.1&from=1.1.1/1.1.1/1.1.1&to=1.1.1/1.1.1/1.1.2";
    let uri = if path.starts_with("/api/v2/admin") || path == super::OPENAPI_PATH {
        concrete
    } else {
        format!("{concrete}{query}")
    };
    let body = match (method, path) {
        ("POST", "/api/v2/admin/tenants/add") => r#"{"tenant_id":"fresh","tier":"pro"}"#,
        ("PATCH", _) => r#"{"quota_mb":10}"#,
        ("POST", "/api/v2/admin/nodes") => r#"{"id":2,"addr":"127.0.0.1:10"}"#,
        ("POST", "/api/v2/admin/replicas") => r#"{"replicas":3}"#,
        _ => "",
    };
    let mut builder = Request::builder().method(method).uri(uri);
    match access {
        Access::Open => {}
        Access::Tenant => builder = builder.header("authorization", format!("Bearer {KEY}")),
        Access::Admin => builder = builder.header("authorization", format!("Bearer {ADMIN}")),
    }
    builder.body(Body::from(body)).expect("a valid request")
}

// Goal: the table and openapi.json list the same (method, path) pairs, with matching security.
#[test]
fn table_matches_openapi() {
    let doc = openapi();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "an OpenAPI 3 document");
    let routes = endpoints();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                documented.insert((m.to_uppercase(), path.clone()));
                let route =
                    routes.iter().find(|r| r.method.eq_ignore_ascii_case(m) && r.path == *path);
                let Some(route) = route else { continue };
                let schemes: Vec<&str> = op["security"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .flat_map(|s| {
                                s.as_object().into_iter().flat_map(|o| o.keys().map(String::as_str))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let expected: &[&str] = match route.access {
                    Access::Open => &[],
                    Access::Tenant => &["bearer", "apiKeyHeader"],
                    Access::Admin => &["adminBearer"],
                };
                assert_eq!(schemes, expected, "{m} {path}: security");
            }
        }
    }
    let served: BTreeSet<(String, String)> =
        routes.iter().map(|r| (r.method.to_string(), r.path.clone())).collect();
    assert_eq!(served.len(), routes.len(), "no route is listed twice");
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "served but not in openapi.json: {undocumented:?}");
    assert!(unserved.is_empty(), "in openapi.json but not served: {unserved:?}");
}

// Goal: the router answers every route of the table (with a key of the right kind) with
// success, serves openapi.json without a key, and answers 404 to routes that are not there.
#[tokio::test]
async fn router_serves_exactly_the_table() {
    let gw = gateway();
    for r in endpoints() {
        let response = router(gw.clone())
            .oneshot(request_for(r.method, &r.path, r.access))
            .await
            .expect("infallible");
        assert!(
            response.status().is_success(),
            "{} {} answered {}",
            r.method,
            r.path,
            response.status()
        );
    }
    let absent = [
        ("GET", "/api/v2/nosuch"),
        ("POST", "/api/v2/select"),
        ("POST", "/api/v2/openapi.json"),
        ("GET", "/api/v2/admin/nosuch"),
        ("GET", "/api/v2/admin/tenants/acme/nosuch"),
        ("POST", "/api/v2/admin/tenants"),
        ("PUT", "/api/v2/admin/nodes"),
        ("GET", "/elsewhere"),
    ];
    for (method, path) in absent {
        let access = if path.starts_with("/api/v2/admin") { Access::Admin } else { Access::Tenant };
        let response = router(gw.clone())
            .oneshot(request_for(method, path, access))
            .await
            .expect("infallible");
        assert_eq!(response.status().as_u16(), 404, "{method} {path}");
    }
}

// Goal: the served document is the file in the repo, as JSON, with CORS, to anyone.
#[tokio::test]
async fn openapi_is_served_without_a_key() {
    let request =
        Request::builder().uri(super::OPENAPI_PATH).body(Body::empty()).expect("a valid request");
    let response = router(gateway()).oneshot(request).await.expect("infallible");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    let body =
        http_body_util::BodyExt::collect(response.into_body()).await.expect("body").to_bytes();
    assert_eq!(body, OPENAPI_JSON.as_bytes());
}
