//! Every route the gateway serves, in one table, and the OpenAPI document that describes them.
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
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
}

const fn route(method: &'static str, path: &'static str, access: Access) -> Route {
    Route { method, path, access }
}

/// Every route served. `OPTIONS` on any path answers the CORS preflight and is not listed.
pub const ROUTES: &[Route] = &[
    route("GET", OPENAPI_PATH, Access::Open),
    route("GET", "/api/v2/version", Access::Tenant),
    route("GET", "/api/v2/select", Access::Tenant),
    route("GET", "/api/v2/insert", Access::Tenant),
    route("POST", "/api/v2/insert", Access::Tenant),
    route("GET", "/api/v2/update", Access::Tenant),
    route("POST", "/api/v2/update", Access::Tenant),
    route("GET", "/api/v2/delete", Access::Tenant),
    route("GET", "/api/v2/toc", Access::Tenant),
    route("GET", "/api/v2/get", Access::Tenant),
    route("GET", "/api/v2/checksum", Access::Tenant),
    route("GET", "/api/v2/delta", Access::Tenant),
    route("POST", "/api/v2/delta", Access::Tenant),
    route("GET", "/api/v2/query", Access::Tenant),
    route("POST", "/api/v2/query", Access::Tenant),
    route("POST", "/api/v2/admin/tenants/add", Access::Admin),
    route("GET", "/api/v2/admin/tenants", Access::Admin),
    route("GET", "/api/v2/admin/tenants/{id}", Access::Admin),
    route("PATCH", "/api/v2/admin/tenants/{id}", Access::Admin),
    route("DELETE", "/api/v2/admin/tenants/{id}", Access::Admin),
    route("POST", "/api/v2/admin/tenants/{id}/purge", Access::Admin),
    route("GET", "/api/v2/admin/tenants/{id}/stats", Access::Admin),
    route("POST", "/api/v2/admin/tenants/{id}/rotate-key", Access::Admin),
    route("GET", "/api/v2/admin/health", Access::Admin),
    route("GET", "/api/v2/admin/nodes", Access::Admin),
    route("POST", "/api/v2/admin/nodes", Access::Admin),
    route("POST", "/api/v2/admin/nodes/{id}/drain", Access::Admin),
    route("DELETE", "/api/v2/admin/nodes/{id}", Access::Admin),
    route("GET", "/api/v2/metrics", Access::Admin),
];

#[cfg(test)]
mod tests;
