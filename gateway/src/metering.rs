//! Request metering at the edge, and `/api/v2/metrics` gathered from every node.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use proto::cluster::{NodeRequest, NodeResponse};

use crate::forward::FORWARD_TIMEOUT;
use crate::Gateway;

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder for this process, once.
pub fn install() {
    RECORDER.get_or_init(|| match PrometheusBuilder::new().install_recorder() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    });
}

/// The route label of a path: the SQ route, `admin`, or `other` (bounded label values).
fn route_label(path: &str) -> &'static str {
    const ROUTES: [&str; 10] = ["version", "select", "insert", "update", "delete", "toc", "get", "checksum", "delta", "query"];
    match path.strip_prefix("/api/v2/") {
        Some(r) if r.starts_with("admin") => "admin",
        Some("metrics") => "metrics",
        Some(r) => ROUTES.iter().find(|x| **x == r).copied().unwrap_or("other"),
        None => "other",
    }
}

pub fn record(method: &Method, path: &str, status: StatusCode, elapsed: Duration) {
    let route = route_label(path);
    metrics::histogram!("sq_gateway_request_seconds", "route" => route).record(elapsed.as_secs_f64());
    metrics::counter!("sq_gateway_responses_total", "route" => route, "status" => status.as_u16().to_string()).increment(1);
    tracing::info!(target: "sq_gateway::access", %method, route, status = status.as_u16(), latency_us = elapsed.as_micros() as u64);
}

/// This gateway's metrics, then each node's under its own `node` label.
pub async fn cluster_metrics(gw: &Arc<Gateway>) -> String {
    let mut out = RECORDER.get().and_then(|h| h.as_ref()).map(|h| h.render()).unwrap_or_default();
    let view = gw.views.current();
    for (id, addr) in view.node_addrs() {
        match gw.client.call(addr, NodeRequest::Metrics, FORWARD_TIMEOUT).await {
            Ok(NodeResponse::Metrics(text)) => out.push_str(&text),
            _ => out.push_str(&format!("# node {id} did not answer\nsq_node_up{{node=\"{id}\"}} 0\n")),
        }
    }
    out
}
