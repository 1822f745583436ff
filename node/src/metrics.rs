//! This node's metrics, through the `metrics` facade and a Prometheus recorder labelled with the
//! node id, so the gateway can gather every node's text into one `/api/v2/metrics`.
//!
//! Counters and histograms are recorded as requests pass; the gauges that describe state (Raft,
//! loaded tenants) are set when a scrape asks for them, in [`render_node`].

use std::collections::HashMap;
use std::sync::Mutex;

use proto::{ApiError, Route, SqResponse};

use crate::service::Service;

/// Installs the recorder once per process, every series labelled `node=<id>`.
pub fn install(node_id: u64) {
    telemetry::install(Some(("node", node_id.to_string())), describe);
}

/// HELP lines for every series this node exports (PRODUCT.md §2 names the first ones).
fn describe() {
    describe_requests();
    describe_registry();
    describe_memory();
    describe_replication();
}

/// The series of requests and tenants served.
fn describe_requests() {
    metrics::describe_gauge!(
        "sq_tenants_active",
        "Tenant copies loaded on this node (used within the idle-unload time): whole, or a backup's with its log alone"
    );
    metrics::describe_histogram!(
        "sq_request_duration_seconds",
        "Time from admission to answer on the owning node, by route"
    );
    metrics::describe_counter!(
        "sq_refusals_total",
        "Requests the owning node refused: 429 rate limit, 507 quota, 503 not owner"
    );
    metrics::describe_counter!(
        "sq_node_requests_total",
        "Requests this node answered over QUIC, by kind: per tenant (sq, replicate, prepare, fetch records, catch up, snapshot, enter, handoff) or per node (lease, gossip, raft, view, ...)"
    );
    // Refusal series exist from the start, at zero, so a dashboard shows "none" rather than "no data".
    for refusal in Outcome::REFUSALS {
        metrics::counter!("sq_refusals_total", "reason" => refusal.as_str()).increment(0);
    }
}

/// The series of the registry and of gossip, as this node sees them.
fn describe_registry() {
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
}

/// The series of the process's memory.
fn describe_memory() {
    metrics::describe_gauge!("sq_store_memory_bytes", "Estimated memory held by loaded tenants");
    metrics::describe_gauge!(
        "sq_node_heap_bytes",
        "Heap bytes the process holds (allocated and not freed), as the allocator counts them; RSS less this is what the allocator keeps after frees"
    );
    metrics::describe_gauge!(
        "sq_node_allocator_bytes",
        "The allocator's own account, by state: allocated (the live heap), active (pages holding it), metadata, resident (active, metadata and free pages not yet returned), mapped, retained (address space kept, not resident)"
    );
}

/// The series of replication: leases, copies, failovers and the bytes shipped.
fn describe_replication() {
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
    svc.calls.render(svc.id, |numbers| svc.store.ids_of(numbers), &mut text);
    storage_gauges(svc, &mut text);
    text
}

/// `sq_api_calls_total{tenant,method}`, the requests this node admitted for each tenant by
/// route since it started. Kept in one map rather than as a recorder series per tenant and
/// route (about 250 bytes each), keyed by the tenant's number in the store
/// (`Store::number`) rather than its id, with its first route and count packed in 8 bytes: a
/// tenant that went idle after using one route keeps a 16-byte place in the map's table and
/// no allocation of its own (docs/BENCHMARKS.md, "Idle tenants with three copies").
#[derive(Default)]
pub struct Calls(Mutex<CallTable>);

#[derive(Default)]
struct CallTable {
    /// Tenant number → its first route and that route's count ([`pack`]).
    first: HashMap<u32, u64>,
    /// Tenant number → the other routes it used, with their counts (rare: a tenant mostly uses
    /// one or two of the 14).
    more: HashMap<u32, Vec<(Route, u64)>>,
}

/// The bits of a packed count below its route.
const COUNT_BITS: u32 = 56;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const _: () = assert!(Route::ALL.len() <= 1 << (64 - COUNT_BITS));

/// A route and its count in one word: the route's place in [`Route::ALL`] above the count, which
/// saturates at 2^56 - 1.
fn pack(route: Route, count: u64) -> u64 {
    (route as u64) << COUNT_BITS | count.min(COUNT_MAX)
}

fn unpack(packed: u64) -> (Route, u64) {
    (Route::ALL[(packed >> COUNT_BITS) as usize], packed & COUNT_MAX)
}

impl Calls {
    fn lock(&self) -> std::sync::MutexGuard<'_, CallTable> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one request by `route` of the tenant numbered `tenant` in the store.
    pub fn count(&self, tenant: u32, route: Route) {
        let mut calls = self.lock();
        let CallTable { first, more } = &mut *calls;
        let packed = first.entry(tenant).or_insert(pack(route, 0));
        let (first_route, n) = unpack(*packed);
        if first_route == route {
            *packed = pack(route, n.saturating_add(1));
            return;
        }
        let more = more.entry(tenant).or_default();
        match more.iter_mut().find(|(r, _)| *r == route) {
            Some((_, n)) => *n = n.saturating_add(1),
            None => {
                more.push((route, 1));
                more.shrink_to_fit();
            }
        }
    }

    /// Drops the counts of the tenant numbered `tenant` (it was purged).
    pub fn forget(&self, tenant: u32) {
        let mut calls = self.lock();
        calls.first.remove(&tenant);
        calls.more.remove(&tenant);
        crate::memory::shrink(&mut calls.first);
    }

    /// Appends the counts as Prometheus text, in tenant and route order; `ids` names the tenant
    /// numbers it is given, in their order.
    fn render(&self, node: u64, ids: impl FnOnce(Vec<u32>) -> Vec<String>, text: &mut String) {
        use std::fmt::Write;
        let counts: Vec<(u32, Route, u64)> = {
            let calls = self.lock();
            calls
                .first
                .iter()
                .map(|(&t, &packed)| {
                    let (route, n) = unpack(packed);
                    (t, route, n)
                })
                .chain(
                    calls
                        .more
                        .iter()
                        .flat_map(|(&t, routes)| routes.iter().map(move |&(r, n)| (t, r, n))),
                )
                .collect()
        };
        if counts.is_empty() {
            return;
        }
        let names = ids(counts.iter().map(|&(t, _, _)| t).collect());
        let mut rows: Vec<(String, Route, u64)> =
            names.into_iter().zip(counts).map(|(name, (_, r, n))| (name, r, n)).collect();
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
    tenant: u32,
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
        let (a, b) = (1, 0);
        let names = |numbers: Vec<u32>| -> Vec<String> {
            numbers.iter().map(|&n| ["b", "a"][n as usize].to_string()).collect()
        };
        let calls = Calls::default();
        for _ in 0..3 {
            calls.count(b, Route::Update);
        }
        calls.count(a, Route::Select);
        calls.count(b, Route::Select);
        calls.count(b, Route::Update);
        calls.count(b, Route::Delete);
        calls.count(b, Route::Select);
        calls.count(b, Route::Delete);
        let mut text = String::new();
        calls.render(7, names, &mut text);
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
        calls.forget(b);
        let mut after = String::new();
        calls.render(7, names, &mut after);
        assert_eq!(after.lines().filter(|l| l.starts_with("sq_api_calls_total")).count(), 1);
        let mut none = String::new();
        Calls::default().render(7, names, &mut none);
        assert!(none.is_empty(), "no family without a sample");
    }

    #[test]
    fn a_packed_count_keeps_its_route_and_saturates() {
        // Goal: every route survives packing beside its count, and a count at the packed
        // maximum stays there rather than spilling into the route's bits.
        for &route in Route::ALL {
            assert_eq!(unpack(pack(route, 12_345)), (route, 12_345));
            assert_eq!(unpack(pack(route, u64::MAX)), (route, COUNT_MAX));
        }
        let calls = Calls::default();
        calls.lock().first.insert(3, pack(Route::Toc, COUNT_MAX));
        calls.count(3, Route::Toc);
        assert_eq!(unpack(calls.lock().first[&3]), (Route::Toc, COUNT_MAX));
    }
}
