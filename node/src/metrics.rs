//! This node's metrics, through the `metrics` facade and a Prometheus recorder labelled with the
//! node id, so the gateway can gather every node's text into one `/api/v2/metrics`.
//!
//! Counters and histograms are recorded as requests pass; the gauges that describe state (Raft,
//! loaded tenants) are set when a scrape asks for them, in [`render_node`].

use std::collections::HashMap;
use std::sync::Mutex;

use proto::{ApiError, Route, SqResponse};

use crate::service::Service;
use crate::store::TenantKey;

/// Installs the recorder once per process, every series labelled `node=<id>`.
pub fn install(node_id: u64) {
    telemetry::install(Some(("node", node_id.to_string())), describe);
}

/// HELP lines for every series this node exports (PRODUCT.md §2 names the first ones).
fn describe() {
    metrics::describe_gauge!(
        "sq_tenants_active",
        "Tenants loaded in memory on this node (used within the idle-unload time)"
    );
    metrics::describe_histogram!(
        "sq_request_duration_seconds",
        "Time from admission to answer on the owning node, by route"
    );
    metrics::describe_counter!(
        "sq_refusals_total",
        "Requests the owning node refused: 429 rate limit, 507 quota, 503 not owner"
    );
    metrics::describe_gauge!(
        "sq_raft_term",
        "Current Raft term of the registry as this node knows it"
    );
    metrics::describe_gauge!(
        "sq_raft_leader",
        "Node id of the registry leader this node knows; 0 when none"
    );
    metrics::describe_gauge!("sq_raft_is_leader", "1 when this node leads the registry");
    metrics::describe_gauge!(
        "sq_raft_commit_index",
        "Last registry log index applied on this node (committed entries only)"
    );
    metrics::describe_gauge!(
        "sq_raft_last_log_index",
        "Last registry log index stored on this node"
    );
    metrics::describe_gauge!(
        "sq_placement_epoch",
        "Placement epoch of the registry as applied on this node"
    );
    metrics::describe_gauge!(
        "sq_gossip_state",
        "Gossip state of each peer as this node sees it: 0 alive, 1 suspect, 2 dead"
    );
    metrics::describe_gauge!("sq_store_memory_bytes", "Estimated memory held by loaded tenants");
    metrics::describe_gauge!(
        "sq_node_heap_bytes",
        "Heap bytes the process holds (allocated and not freed), as the allocator counts them; RSS less this is what the allocator keeps after frees"
    );
    metrics::describe_gauge!(
        "sq_node_allocator_bytes",
        "The allocator's own account, by state: allocated (the live heap), active (pages holding it), metadata, resident (active, metadata and free pages not yet returned), mapped, retained (address space kept, not resident)"
    );
    metrics::describe_gauge!(
        "sq_node_reads_ready",
        "1 while this node may answer reads of the tenants it leads: it holds its node lease, or the cluster keeps one copy and needs none"
    );
    metrics::describe_gauge!(
        "sq_under_replicated_tenants",
        "Tenants with fewer usable copies than R, as this node's registry has it"
    );
    metrics::describe_counter!(
        "sq_replication_timeouts_total",
        "Writes and reads answered 503 because too few backups held the tenant's records in time"
    );
    metrics::describe_counter!(
        "sq_node_requests_total",
        "Requests this node answered over QUIC, by kind: per tenant (sq, replicate, prepare, fetch records, catch up, snapshot, enter, handoff) or per node (lease, gossip, raft, view, ...)"
    );
    metrics::describe_counter!(
        "sq_replication_bytes_total",
        "Bytes of log records this node sent to backups as a primary"
    );
    metrics::describe_counter!(
        "sq_failovers_total",
        "Prepare rounds: tenants this node took up as primary under a new ballot (after a failover, a return or any placement change)"
    );
    metrics::describe_counter!(
        "sq_rereplication_bytes_total",
        "Bytes of snapshots this node took to rebuild its copy of a tenant (catch-up after a wipe, a long absence or a cut below a checkpoint)"
    );
    metrics::counter!("sq_rereplication_bytes_total").increment(0);
    metrics::describe_gauge!(
        "sq_rebuilding_copies",
        "Copies on this node still being rebuilt after it lost its tenant store (0 otherwise)"
    );
    metrics::counter!("sq_failovers_total").increment(0);
    metrics::counter!("sq_replication_timeouts_total").increment(0);
    metrics::counter!("sq_replication_bytes_total").increment(0);
    // Refusal series exist from the start, at zero, so a dashboard shows "none" rather than "no data".
    for refusal in Outcome::REFUSALS {
        metrics::counter!("sq_refusals_total", "reason" => refusal.as_str()).increment(0);
    }
}

/// Sets the state gauges, then renders this node's metrics as Prometheus text.
pub fn render_node(svc: &Service) -> String {
    let status = svc.registry.status();
    metrics::gauge!("sq_raft_term").set(status.term as f64);
    metrics::gauge!("sq_raft_leader").set(status.leader.unwrap_or(0) as f64);
    metrics::gauge!("sq_raft_is_leader").set(if status.is_leader { 1.0 } else { 0.0 });
    metrics::gauge!("sq_raft_commit_index").set(status.last_applied_index.unwrap_or(0) as f64);
    metrics::gauge!("sq_raft_last_log_index").set(status.last_log_index.unwrap_or(0) as f64);
    metrics::gauge!("sq_placement_epoch").set(svc.registry.state().placement_epoch() as f64);
    metrics::gauge!("sq_tenants_active").set(svc.store.loaded_tenants().len() as f64);
    metrics::gauge!("sq_store_memory_bytes").set(svc.store.memory_bytes() as f64);
    let state = svc.registry.state();
    let reads_ready = state.replicas() <= 1 || svc.leases.holds(state.placement_epoch());
    metrics::gauge!("sq_node_reads_ready").set(if reads_ready { 1.0 } else { 0.0 });
    let under = state.under_replicated();
    metrics::gauge!("sq_under_replicated_tenants").set(under as f64);
    for (kind, bytes) in crate::memory::allocator_bytes() {
        if kind == "allocated" {
            metrics::gauge!("sq_node_heap_bytes").set(bytes as f64);
        }
        metrics::gauge!("sq_node_allocator_bytes", "state" => kind).set(bytes as f64);
    }
    let mut text = render();
    svc.calls.render(svc.id, &mut text);
    storage_gauges(svc, &mut text);
    text
}

/// `sq_api_calls_total{tenant,method}`, the requests this node admitted for each tenant by
/// route since it started. Kept in one map rather than as a recorder series per tenant and
/// route (about 250 bytes each): a tenant that went idle after using one route keeps its count
/// here in its entry of the map's table alone, about 70 bytes, with no allocation of its own
/// (docs/BENCHMARKS.md, "Idle tenants with three copies").
#[derive(Default)]
pub struct Calls(Mutex<HashMap<TenantKey, RouteCounts>>);

/// One tenant's counts, by the routes it used: the first in place, the others (rare: a tenant
/// mostly uses one or two of the 14) boxed.
struct RouteCounts {
    first: (Route, u64),
    more: Option<Box<[(Route, u64)]>>,
}

impl RouteCounts {
    fn iter(&self) -> impl Iterator<Item = &(Route, u64)> {
        std::iter::once(&self.first).chain(self.more.iter().flat_map(|more| more.iter()))
    }
}

impl Calls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantKey, RouteCounts>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one request of `tenant` by `route`.
    pub fn count(&self, tenant: &str, route: Route) {
        let mut calls = self.lock();
        let Some(routes) = calls.get_mut(tenant) else {
            calls.insert(TenantKey::new(tenant), RouteCounts { first: (route, 1), more: None });
            return;
        };
        let more = routes.more.as_deref_mut().unwrap_or_default();
        match std::iter::once(&mut routes.first).chain(more).find(|(r, _)| *r == route) {
            Some((_, n)) => *n = n.saturating_add(1),
            None => {
                let mut grown = routes.more.take().map(Vec::from).unwrap_or_default();
                grown.push((route, 1));
                routes.more = Some(grown.into_boxed_slice());
            }
        }
    }

    /// Drops a tenant's counts (it was purged).
    pub fn forget(&self, tenant: &str) {
        let mut calls = self.lock();
        calls.remove(tenant);
        crate::memory::shrink(&mut calls);
    }

    /// Appends the counts as Prometheus text, in tenant and route order.
    fn render(&self, node: u64, text: &mut String) {
        use std::fmt::Write;
        let mut rows: Vec<(String, Route, u64)> = {
            let calls = self.lock();
            calls
                .iter()
                .flat_map(|(t, routes)| {
                    routes.iter().map(move |&(r, n)| (t.as_str().to_string(), r, n))
                })
                .collect()
        };
        if rows.is_empty() {
            return;
        }
        rows.sort_unstable();
        family_header(
            text,
            "sq_api_calls_total",
            "SQ requests admitted for a tenant, by route (method)",
            "counter",
        );
        for (tenant, route, n) in rows {
            let method = route.name();
            let _ = writeln!(
                text,
                "sq_api_calls_total{{method=\"{method}\",node=\"{node}\",tenant=\"{tenant}\"}} {n}"
            );
        }
        text.push('\n');
    }
}

/// `sq_storage_bytes{tenant}` of the tenants this node is primary of, read from the store when
/// scraped rather than kept as a series per tenant: an idle tenant then costs the metrics
/// nothing (docs/BENCHMARKS.md, "Idle tenants with three copies"). Tenant ids need no escaping
/// (`proto::auth::valid_tenant_id`).
fn storage_gauges(svc: &Service, text: &mut String) {
    use std::fmt::Write;
    let state = svc.registry.state();
    let storage = svc.store.known_storage(|t| state.primary_of(t) == Some(svc.id));
    if storage.is_empty() {
        return;
    }
    family_header(
        text,
        "sq_storage_bytes",
        "Canonical bytes of all the tenant's phexts, as its primary holds them",
        "gauge",
    );
    for (tenant, bytes) in storage {
        let _ =
            writeln!(text, "sq_storage_bytes{{node=\"{}\",tenant=\"{tenant}\"}} {bytes}", svc.id);
    }
    text.push('\n');
}

/// The HELP and TYPE lines of a family this node renders itself rather than through the recorder.
fn family_header(text: &mut String, name: &str, help: &str, kind: &str) {
    text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
}

pub fn render() -> String {
    telemetry::render()
}

/// What became of a request on this node. The node names refusals by kind; which HTTP status
/// each becomes is the gateway's business alone (`gateway::error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    QuotaExceeded,
    RateLimited,
    Unavailable,
    Error,
}

impl Outcome {
    pub fn of(result: &Result<SqResponse, ApiError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(ApiError::QuotaExceeded { .. }) => Outcome::QuotaExceeded,
            Err(ApiError::RateLimited { .. }) => Outcome::RateLimited,
            Err(ApiError::Unavailable { .. } | ApiError::NotOwner { .. }) => Outcome::Unavailable,
            Err(_) => Outcome::Error,
        }
    }

    /// The label value in metrics and the meter log.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::QuotaExceeded => "quota_exceeded",
            Outcome::RateLimited => "rate_limited",
            Outcome::Unavailable => "unavailable",
            Outcome::Error => "error",
        }
    }

    /// The refusals whose series exist from the start.
    const REFUSALS: [Outcome; 3] =
        [Outcome::RateLimited, Outcome::QuotaExceeded, Outcome::Unavailable];
}

/// Counts one request this node answers over QUIC, by its kind. An idle tenant adds to no kind
/// (docs/BENCHMARKS.md measures it).
pub fn node_request(kind: &'static str) {
    metrics::counter!("sq_node_requests_total", "kind" => kind).increment(1);
}

/// Meters one request of a tenant: calls by tenant and method, latency by route, refusals.
/// A request refused by the rate limits is not a call (it does not count against the tenant's
/// limits either); it shows only in `sq_refusals_total`.
pub fn request(
    calls: &Calls,
    tenant: &str,
    route: Route,
    result: &Result<SqResponse, ApiError>,
    latency_us: u64,
) {
    let outcome = Outcome::of(result);
    if outcome != Outcome::RateLimited {
        calls.count(tenant, route);
        metrics::histogram!("sq_request_duration_seconds", "route" => route.name())
            .record(latency_us as f64 / 1e6);
    }
    if outcome != Outcome::Ok {
        metrics::counter!("sq_refusals_total", "reason" => outcome.as_str()).increment(1);
    }
}

/// A request that waited [`crate::replicate::REPLICA_ACK_WAIT`] for backups in vain.
pub fn replication_timeout() {
    metrics::counter!("sq_replication_timeouts_total").increment(1);
}

/// Record bytes sent to a backup.
pub fn replication_bytes(bytes: u64) {
    metrics::counter!("sq_replication_bytes_total").increment(bytes);
}

/// A prepare round done: this node serves a tenant under a new ballot.
pub fn prepared() {
    metrics::counter!("sq_failovers_total").increment(1);
}

/// A snapshot of `bytes` taken and installed: this node's copy of a tenant rebuilt.
pub fn snapshot_taken(bytes: u64) {
    metrics::counter!("sq_rereplication_bytes_total").increment(bytes);
}

/// How many copies this node still has to rebuild after it lost its tenant store.
pub fn rebuilding(copies: u64) {
    metrics::gauge!("sq_rebuilding_copies").set(copies as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: every tenant's count by route renders as one Prometheus counter family, in tenant
    // and route order, with routes first used late (a second and a third) counted as well as the first; a purged
    // tenant's counts go.
    #[test]
    fn calls_render_by_tenant_and_route() {
        let calls = Calls::default();
        for _ in 0..3 {
            calls.count("b", Route::Update);
        }
        calls.count("a", Route::Select);
        calls.count("b", Route::Select);
        calls.count("b", Route::Update);
        calls.count("b", Route::Delete);
        calls.count("b", Route::Select);
        calls.count("b", Route::Delete);
        let mut text = String::new();
        calls.render(7, &mut text);
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                r#"sq_api_calls_total{method="select",node="7",tenant="a"} 1"#,
                r#"sq_api_calls_total{method="select",node="7",tenant="b"} 2"#,
                r#"sq_api_calls_total{method="update",node="7",tenant="b"} 4"#,
                r#"sq_api_calls_total{method="delete",node="7",tenant="b"} 2"#,
                "",
            ]
        );
        assert_eq!(text.matches("# TYPE sq_api_calls_total counter").count(), 1);
        calls.forget("b");
        let mut after = String::new();
        calls.render(7, &mut after);
        assert_eq!(after.lines().filter(|l| l.starts_with("sq_api_calls_total")).count(), 1);
        let mut none = String::new();
        Calls::default().render(7, &mut none);
        assert!(none.is_empty(), "no family without a sample");
    }
}
