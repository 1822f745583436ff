//! This node's metrics, through the `metrics` facade and a Prometheus recorder labelled with the
//! node id, so the gateway can concatenate every node's text into one `/api/v2/metrics`.

use std::sync::OnceLock;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use proto::{ApiError, SqResponse};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder once per process, every series labelled `node=<id>`.
pub fn install(node_id: u64) {
    HANDLE.get_or_init(|| {
        match PrometheusBuilder::new().add_global_label("node", node_id.to_string()).install_recorder() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                None
            }
        }
    });
}

pub fn render() -> String {
    HANDLE.get().and_then(|h| h.as_ref()).map(|h| h.render()).unwrap_or_default()
}

/// The status class of a result, as a metric label.
fn outcome(result: &Result<SqResponse, ApiError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(ApiError::QuotaExceeded { .. }) => "507",
        Err(ApiError::RateLimited { .. }) => "429",
        Err(ApiError::Unavailable { .. } | ApiError::NotOwner { .. }) => "503",
        Err(_) => "error",
    }
}

/// Meters one request of a tenant: calls by tenant and method, latency by route, refusals.
pub fn request(tenant: &str, route: &'static str, result: &Result<SqResponse, ApiError>, latency_ms: u64) {
    metrics::counter!("sq_api_calls_total", "tenant" => tenant.to_string(), "method" => route).increment(1);
    metrics::histogram!("sq_request_duration_seconds", "route" => route).record(latency_ms as f64 / 1000.0);
    let outcome = outcome(result);
    if outcome != "ok" {
        metrics::counter!("sq_refusals_total", "status" => outcome).increment(1);
    }
}

/// Storage gauge of one tenant, set after each write.
pub fn storage(tenant: &str, bytes: u64) {
    metrics::gauge!("sq_storage_bytes", "tenant" => tenant.to_string()).set(bytes as f64);
}
