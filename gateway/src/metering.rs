//! Request metering at the edge, and `/api/v2/metrics` gathered from every node.
//!
//! The gateway's own series (`sq_gateway_*`: latency by route, responses by route and status,
//! which covers the 429, 503 and 507 it answered) come first in the text; each node's series
//! follow under its `node` label. Families are merged so every metric has one HELP and TYPE.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use proto::cluster::{NodeRequest, NodeResponse};

use crate::forward::FORWARD_TIMEOUT;
use crate::Gateway;

/// Installs the Prometheus recorder for this process, once.
pub fn install() {
    telemetry::install(None, || {
        metrics::describe_histogram!(
            "sq_gateway_request_seconds",
            "Time from request to answer at this gateway, by route"
        );
        metrics::describe_counter!(
            "sq_gateway_responses_total",
            "Answers of this gateway by route and HTTP status"
        );
        metrics::describe_counter!(
            "sq_gateway_connections_closed_total",
            "Client connections this gateway closed by a timeout or the cap per address, by reason"
        );
    });
}

/// The route label of a path: the SQ route, `admin`, `metrics` or `other` (bounded label values).
fn route_label(path: &str) -> &'static str {
    match path.strip_prefix("/api/v2/") {
        Some(r) if r.starts_with("admin") => "admin",
        Some("metrics") => "metrics",
        Some(r) => proto::Route::parse(r).map_or("other", proto::Route::name),
        None => "other",
    }
}

pub fn record(method: &Method, path: &str, status: StatusCode, elapsed: Duration) {
    let route = route_label(path);
    metrics::histogram!("sq_gateway_request_seconds", "route" => route)
        .record(elapsed.as_secs_f64());
    metrics::counter!("sq_gateway_responses_total", "route" => route, "status" => status.as_u16().to_string()).increment(1);
    if status == StatusCode::UNAUTHORIZED {
        // Anyone can send these: at info, one line per interval with the count.
        if let Some(count) = UNAUTHENTICATED.note() {
            tracing::info!(target: "sq_gateway::access", %method, route, status = 401, count, "unauthenticated requests since the last such line");
        }
    }
    tracing::debug!(target: "sq_gateway::access", %method, route, status = status.as_u16(), latency_us = elapsed.as_micros() as u64);
}

static UNAUTHENTICATED: crate::lograte::Tally = crate::lograte::Tally::new();

/// This gateway's metrics, then each node's under its own `node` label, asked of all nodes at
/// once (a dead node costs one [`FORWARD_TIMEOUT`], not one per node), and `sq_node_up`.
pub async fn cluster_metrics(gw: &Arc<Gateway>) -> String {
    let mut parts = vec![telemetry::render()];
    let view = gw.views.current();
    let asks = view.node_addrs().into_iter().map(|(id, addr)| async move {
        // Gossip already says a dead node will not answer: no scrape waits for it.
        if gw.views.current().is_dead(id) {
            return (id, None);
        }
        match gw.client.call(addr, NodeRequest::Metrics, FORWARD_TIMEOUT).await {
            Ok(NodeResponse::Metrics(text)) => (id, Some(text)),
            _ => (id, None),
        }
    });
    let mut up = String::from(
        "# HELP sq_node_up 1 when the node answered this scrape\n# TYPE sq_node_up gauge\n",
    );
    for (id, text) in futures::future::join_all(asks).await {
        up.push_str(&format!("sq_node_up{{node=\"{id}\"}} {}\n", u8::from(text.is_some())));
        parts.extend(text);
    }
    parts.push(up);
    merge_exposition(&parts)
}

#[derive(Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Metric families by name, in the order first seen.
#[derive(Default)]
struct Families {
    order: Vec<String>,
    by_name: HashMap<String, Family>,
}

impl Families {
    fn get(&mut self, name: &str) -> &mut Family {
        if !self.by_name.contains_key(name) {
            self.order.push(name.to_string());
        }
        self.by_name.entry(name.to_string()).or_default()
    }
}

/// Several processes' Prometheus text as one: each metric family once, with the first HELP and
/// TYPE seen for it, then every process's samples in order. (Text that repeats a family's TYPE
/// line is refused by Prometheus.)
pub fn merge_exposition(parts: &[String]) -> String {
    let mut families = Families::default();
    for text in parts {
        let mut current = String::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                current = rest.split(' ').next().unwrap_or_default().to_string();
                families.get(&current).help.get_or_insert_with(|| line.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap_or_default().to_string();
                families.get(&current).kind.get_or_insert_with(|| line.to_string());
            } else if !line.starts_with('#') {
                let sample = line.split(['{', ' ']).next().unwrap_or_default();
                // _bucket, _sum and _count samples belong to the family whose TYPE preceded them.
                let name = if !current.is_empty() && sample.starts_with(current.as_str()) {
                    current.as_str()
                } else {
                    sample
                };
                families.get(name).samples.push(line.to_string());
            }
        }
    }
    let mut out = String::new();
    for name in families.order {
        let Some(f) = families.by_name.remove(&name) else { continue };
        for line in f.help.iter().chain(&f.kind).chain(&f.samples) {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::merge_exposition;

    // Goal: the same family from two nodes comes out once, with one HELP and TYPE and every
    // sample, histogram parts staying with their family.
    #[test]
    fn families_merge() {
        let a = "# HELP x_total Xs\n# TYPE x_total counter\nx_total{node=\"1\"} 3\n\n# TYPE h histogram\nh_bucket{node=\"1\",le=\"1\"} 1\nh_sum{node=\"1\"} 0.5\nh_count{node=\"1\"} 1\n";
        let b = "# HELP x_total Xs\n# TYPE x_total counter\nx_total{node=\"2\"} 4\n\n# TYPE y gauge\ny 1\n";
        let merged = merge_exposition(&[a.to_string(), b.to_string()]);
        assert_eq!(merged.matches("# TYPE x_total counter").count(), 1, "{merged}");
        assert_eq!(merged.matches("# HELP x_total").count(), 1, "{merged}");
        let x = merged.find("x_total{node=\"1\"} 3").unwrap();
        let x2 = merged.find("x_total{node=\"2\"} 4").unwrap();
        let h = merged.find("# TYPE h histogram").unwrap();
        assert!(x < x2 && x2 < h, "samples of a family stay together:\n{merged}");
        assert!(merged.find("h_count{node=\"1\"} 1").unwrap() > h);
        assert!(merged.contains("# TYPE y gauge\ny 1\n"), "{merged}");
    }
}
