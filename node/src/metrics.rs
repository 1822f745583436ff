//! This node's metrics, through the `metrics` facade and a Prometheus recorder labelled with the
//! node id, so the gateway can concatenate every node's text into one `/api/v2/metrics`.

use std::sync::OnceLock;
use std::time::Duration;

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

pub fn request(route: &'static str, result: &Result<SqResponse, ApiError>, elapsed: Duration) {
    metrics::histogram!("sq_node_request_seconds", "route" => route).record(elapsed.as_secs_f64());
    metrics::counter!("sq_node_requests_total", "route" => route, "outcome" => outcome(result)).increment(1);
}
