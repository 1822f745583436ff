//! Every route the gateway serves, in one table, and the OpenAPI document that describes them.
//! SQ's routes come from [`proto::Route`]; the others are listed here.
//!
//! The dispatchers ([`crate::api`] for SQ's routes, [`crate::admin`] for the admin API) match
//! requests themselves, in SQ's order of checks; this table is what they must agree with. The
//! tests below hold all three together: each route here is in `openapi.json` and the other way
//! round, and each is answered by the router (not 404), while paths that are not here are 404.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The OpenAPI 3 document for the public and admin API, served at [`OPENAPI_PATH`] without a
/// key: it says nothing a client could not learn from SQ's own documentation.
pub const OPENAPI_JSON: &str = include_str!("../openapi.json");

/// Where [`OPENAPI_JSON`] is served.
pub const OPENAPI_PATH: &str = "/api/v2/openapi.json";

/// The answer to `GET /api/v2/openapi.json`.
pub fn openapi_response() -> Response {
    let mut r = (StatusCode::OK, OPENAPI_JSON).into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    r.headers_mut().insert("access-control-allow-origin", HeaderValue::from_static("*"));
    r
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: no key is checked.
    Open,
    /// A tenant key.
    Tenant,
    /// The admin key.
    Admin,
}

/// One route: method, path as OpenAPI writes it (`{id}` for a path parameter), and access.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub method: &'static str,
    pub path: String,
    pub access: Access,
}

/// Every route served: SQ's, from [`proto::Route`] (`GET` and `POST` as SQ 0.6.0 answers each),
/// then [`OTHER_ROUTES`]. `OPTIONS` on any path answers the CORS preflight and is not
/// listed.
pub fn endpoints() -> Vec<Endpoint> {
    let sq = proto::Route::ALL.iter().flat_map(|r| {
        let methods = [("GET", r.takes_get()), ("POST", r.takes_post())];
        methods.into_iter().filter(|(_, served)| *served).map(|(method, _)| Endpoint {
            method,
            path: r.path(),
            access: Access::Tenant,
        })
    });
    let other = OTHER_ROUTES.iter().map(|&(method, path, access)| Endpoint {
        method,
        path: path.to_string(),
        access,
    });
    sq.chain(other).collect()
}

/// Every route served besides SQ's: method, path, access.
pub const OTHER_ROUTES: &[(&str, &str, Access)] = &[
    ("GET", OPENAPI_PATH, Access::Open),
    ("POST", "/api/v2/admin/tenants/add", Access::Admin),
    ("GET", "/api/v2/admin/tenants", Access::Admin),
    ("GET", "/api/v2/admin/tenants/{id}", Access::Admin),
    ("PATCH", "/api/v2/admin/tenants/{id}", Access::Admin),
    ("DELETE", "/api/v2/admin/tenants/{id}", Access::Admin),
    ("POST", "/api/v2/admin/tenants/{id}/purge", Access::Admin),
    ("GET", "/api/v2/admin/tenants/{id}/stats", Access::Admin),
    ("POST", "/api/v2/admin/tenants/{id}/rotate-key", Access::Admin),
    ("GET", "/api/v2/admin/health", Access::Admin),
    ("GET", "/api/v2/admin/nodes", Access::Admin),
    ("POST", "/api/v2/admin/nodes", Access::Admin),
    ("POST", "/api/v2/admin/nodes/{id}/drain", Access::Admin),
    ("DELETE", "/api/v2/admin/nodes/{id}", Access::Admin),
    ("POST", "/api/v2/admin/replicas", Access::Admin),
    ("GET", "/api/v2/metrics", Access::Admin),
];

#[cfg(test)]
mod tests;
