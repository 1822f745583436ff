//! Black-box: daily request limits and metering on a real cluster; stats and metrics must count
//! exactly what the test sent.

mod common;
mod ops_common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{http, DevCluster};
use ops_common::{admin, metric, metrics, node_log_lines, stats, wait_for, SecondGateway};

/// The daily limit PATCHed onto the free tenant: small, so the test is quick.
const DAILY_LIMIT: u64 = 40;

/// Requests past the limit sent one by one through the first gateway, after the racing senders
/// each met their 429.
const REFUSED: u64 = 3;

/// Threads sending through each of the two gateways at once.
const SENDERS_PER_GATEWAY: u64 = 2;

/// How long the owner may take to apply the admin changes the test made.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The route of the `i`th request: a mix, so counts by route are checked too.
fn route(i: u64) -> &'static str {
    ["update", "select", "update", "toc"][i as usize % 4]
}

fn send(base: &str, key: &str, route: &str, i: u64) -> reqwest::blocking::Response {
    let query = match route {
        "update" => format!("p=doc&c=1.1.1/1.1.1/1.1.{}&s=scroll-{i}", i + 1),
        "select" => "p=doc&c=1.1.1/1.1.1/1.1.1".to_string(),
        _ => "p=doc".to_string(),
    };
    http().get(format!("{base}/{route}?{query}")).bearer_auth(key).send().unwrap()
}

// Goal: a free tenant whose daily limit is PATCHed to DAILY_LIMIT gets exactly that many
// answers, even with four senders racing through two gateways, then 429 with Retry-After (the
// seconds until the UTC day turns); a pro tenant keeps working; stats (api_calls_today,
// bytes_out_today, last_active) and /api/v2/metrics (sq_api_calls_total by method,
// sq_refusals_total, latency histograms, gateway responses) agree with the requests the test
// sent; the Raft, gossip and tenant gauges are there.
#[test]
fn daily_limit_and_metering_agree() {
    let cluster = DevCluster::start(3);
    let base = cluster.url();
    cluster.add_tenant("free-t", serde_json::json!({}));
    let (status, patched) = admin(
        &cluster,
        "PATCH",
        "/admin/tenants/free-t",
        Some(serde_json::json!({"daily_limit": DAILY_LIMIT})),
    );
    assert_eq!((status, patched["daily_limit"].as_u64()), (200, Some(DAILY_LIMIT)), "{patched}");
    assert_eq!(patched["tier"], "free");
    // The owner applies the rotation after the PATCH (one Raft log), so once the new key is
    // accepted there, the new limit is in force. Refused keys (401) are not counted.
    let (_, rotated) = admin(&cluster, "POST", "/admin/tenants/free-t/rotate-key", None);
    let key = rotated["api_key"].as_str().unwrap().to_string();

    let (first, _) = wait_for(APPLY_TIMEOUT, "the owner accepts the rotated key", || {
        let r = send(&base, &key, route(0), 0);
        (r.status().as_u16() != 401).then_some(r)
    });
    assert_eq!(first.status().as_u16(), 200);
    let mut sent = Sent::default();
    sent.ok(route(0), first.bytes().unwrap().len() as u64);

    // The rest of the day's requests race in through two gateways at once; the owner must let
    // exactly DAILY_LIMIT through in all. The second gateway starts with a soft open-file limit
    // of 256 under a hard one of 4,096 (or this process's hard limit, if lower): it raises the
    // soft limit, and fits its connection cap (8,192 by default) under it with
    // gateway::FILES_RESERVED (1,024) to spare.
    let mut ours = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given, which lives across the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) }, 0);
    let hard = ours.rlim_max.min(4096);
    let second = SecondGateway::start_limited(&cluster, &key, "", Some((256.min(hard), hard)));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", second.pid())).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert_eq!(
        open_files.split_whitespace().skip(3).take(2).collect::<Vec<_>>(),
        [hard.to_string(), hard.to_string()],
        "{open_files}"
    );
    let cap = if hard > 2 * 1024 { hard - 1024 } else { hard / 2 };
    let second_log = std::fs::read_to_string(cluster.dir.join("gateway-2.log")).unwrap();
    assert!(
        second_log.contains(&format!("connections_max_used={cap}"))
            && second_log.contains("raise LimitNOFILE"),
        "the second gateway's log: {second_log}"
    );
    let sent = Arc::new(Mutex::new(sent));
    let next = Arc::new(AtomicU64::new(1));
    let mut senders = Vec::new();
    for gateway in [base.clone(), second.url.clone()] {
        for _ in 0..SENDERS_PER_GATEWAY {
            let (gateway, key, sent, next) =
                (gateway.clone(), key.clone(), sent.clone(), next.clone());
            senders
                .push(std::thread::spawn(move || send_until_refused(&gateway, &key, &sent, &next)));
        }
    }
    for s in senders {
        s.join().unwrap();
    }
    let sent = Arc::try_unwrap(sent).ok().unwrap().into_inner().unwrap();
    assert_eq!(
        sent.total(),
        DAILY_LIMIT,
        "answered requests under a daily limit of {DAILY_LIMIT}: {:?}",
        sent.by_route
    );
    for i in 0..REFUSED {
        assert_429(&send(&base, &key, "select", DAILY_LIMIT + i));
    }
    drop(second);

    let pro_key = cluster.add_tenant("pro-t", serde_json::json!({"tier": "pro"}));
    let pro_requests = DAILY_LIMIT + REFUSED + 5;
    for i in 0..pro_requests {
        // The pro tenant may need a moment to be known by its owner; its first answer is awaited.
        let status = if i == 0 {
            wait_for(APPLY_TIMEOUT, "the owner knows pro-t", || {
                Some(send(&base, &pro_key, "update", i).status().as_u16()).filter(|s| *s != 401)
            })
            .0
        } else {
            send(&base, &pro_key, "update", i).status().as_u16()
        };
        assert_eq!(status, 200, "pro request {}", i + 1);
    }

    check_stats(&cluster, sent.bytes_out);
    check_metrics(&cluster, &sent.by_route, pro_requests);
}

/// What the free tenant was answered.
#[derive(Default)]
struct Sent {
    by_route: BTreeMap<&'static str, u64>,
    bytes_out: u64,
}

impl Sent {
    fn ok(&mut self, route: &'static str, bytes: u64) {
        *self.by_route.entry(route).or_default() += 1;
        self.bytes_out += bytes;
    }

    fn total(&self) -> u64 {
        self.by_route.values().sum()
    }
}

/// Sends the mix through `gateway` until it answers 429.
fn send_until_refused(gateway: &str, key: &str, sent: &Mutex<Sent>, next: &AtomicU64) {
    loop {
        let i = next.fetch_add(1, Ordering::SeqCst);
        assert!(
            i < 10 * DAILY_LIMIT,
            "no 429 after {i} requests under a daily limit of {DAILY_LIMIT}"
        );
        let r = send(gateway, key, route(i), i);
        if r.status().as_u16() == 429 {
            return assert_429(&r);
        }
        assert_eq!(r.status().as_u16(), 200, "request {i} through {gateway}");
        sent.lock().unwrap().ok(route(i), r.bytes().unwrap().len() as u64);
    }
}

/// A daily-limit refusal: 429 with Retry-After, the seconds until the UTC day turns.
fn assert_429(r: &reqwest::blocking::Response) {
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let to_midnight_s = 86_400 - now_s % 86_400;
    assert!(
        retry.abs_diff(to_midnight_s) <= 5,
        "Retry-After {retry} s, but the UTC day turns in {to_midnight_s} s"
    );
}

fn check_stats(cluster: &DevCluster, bytes_out: u64) {
    let s = stats(cluster, "free-t");
    eprintln!("stats: {s}");
    assert_eq!(s["api_calls_today"].as_u64(), Some(DAILY_LIMIT), "{s}");
    assert_eq!(s["bytes_out_today"].as_u64(), Some(bytes_out), "{s}");
    assert_eq!(s["tier"], "free");
    assert_eq!(s["quota_mb"], 25);
    let last_active = s["last_active"].as_str().unwrap();
    assert!(
        last_active.len() == 20 && last_active.ends_with('Z') && last_active.as_bytes()[10] == b'T',
        "{last_active}"
    );
    assert!((1..=3).contains(&s["node"].as_u64().unwrap()));
    for field in [
        "tenant_id",
        "tier",
        "storage_used_mb",
        "quota_mb",
        "api_calls_today",
        "bytes_out_today",
        "last_active",
        "node",
    ] {
        assert!(s.get(field).is_some(), "stats lack {field}: {s}");
    }
}

fn check_metrics(cluster: &DevCluster, sent: &BTreeMap<&'static str, u64>, pro_requests: u64) {
    let text = metrics(cluster);
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert_eq!(text.matches(&format!("{line}\n")).count(), 1, "{line} is repeated");
    }
    let calls = |tenant: &str, method: Option<&str>| {
        let mut labels = vec![("tenant", tenant)];
        labels.extend(method.map(|m| ("method", m)));
        metric(&text, "sq_api_calls_total", &labels).0 as u64
    };
    assert_eq!(calls("free-t", None), DAILY_LIMIT, "sq_api_calls_total of free-t");
    for (method, n) in sent {
        assert_eq!(calls("free-t", Some(method)), *n, "sq_api_calls_total{{method={method}}}");
    }
    assert_eq!(calls("pro-t", Some("update")), pro_requests);
    let refused_at_nodes = 2 * SENDERS_PER_GATEWAY + REFUSED;
    assert_eq!(
        metric(&text, "sq_refusals_total", &[("reason", "rate_limited")]).0 as u64,
        refused_at_nodes
    );
    // This gateway's own count: its senders' 429s and the sequential ones.
    assert_eq!(
        metric(&text, "sq_gateway_responses_total", &[("status", "429")]).0 as u64,
        SENDERS_PER_GATEWAY + REFUSED
    );
    // And the demo tenant's reads by which `sq-cloud dev` saw the cluster serve before it said
    // it was ready.
    let admitted = DAILY_LIMIT + pro_requests + calls("demo", None);
    assert_eq!(
        metric(&text, "sq_request_duration_seconds_count", &[]).0 as u64,
        admitted,
        "node latency samples"
    );
    assert_eq!(
        metric(&text, "sq_request_duration_seconds_bucket", &[("le", "+Inf")]).0 as u64,
        admitted
    );
    assert!(
        metric(&text, "sq_gateway_request_seconds_bucket", &[("route", "update")]).1 > 0,
        "gateway histogram by route"
    );
    let storage = metric(&text, "sq_storage_bytes", &[("tenant", "free-t")]).0 as u64;
    assert_eq!(storage, stats(cluster, "free-t")["storage_used_bytes"].as_u64().unwrap());
    assert!(metric(&text, "sq_tenants_active", &[]).0 >= 2.0, "both tenants are loaded");
    // Every node runs on the process allocator (node::memory), which counts its live heap (a
    // node that ran on another would count nearly nothing), with the one arena it is told of.
    for node in ["1", "2", "3"] {
        let heap = metric(&text, "sq_node_heap_bytes", &[("node", node)]).0;
        assert!(heap > 1e6, "node {node} counts a live heap of {heap} bytes");
        let resident =
            metric(&text, "sq_node_allocator_bytes", &[("node", node), ("state", "resident")]).0;
        assert!(resident >= heap, "node {node}: {resident} bytes resident, {heap} allocated");
    }
    let started = node_log_lines(&cluster.dir, "node listening");
    assert!(started >= 3, "{started} node starts logged");
    assert_eq!(node_log_lines(&cluster.dir, "arenas=Some(1)"), started, "one arena per node");
    // A small size class in slabs of one page (node::memory::ALLOCATOR_OPTIONS); jemalloc's own
    // choice for 160 B is five.
    assert_eq!(node_log_lines(&cluster.dir, "slab_pages_160=Some(1)"), started, "one-page slabs");
    let leaders: Vec<(f64, usize)> =
        ["1", "2", "3"].iter().map(|n| metric(&text, "sq_raft_leader", &[("node", n)])).collect();
    assert!(
        leaders[0].0 > 0.0 && leaders.iter().all(|l| *l == leaders[0] && l.1 == 1),
        "the nodes agree on one leader: {leaders:?}"
    );
    assert_eq!(metric(&text, "sq_raft_is_leader", &[]).0, 1.0);
    assert!(metric(&text, "sq_raft_term", &[("node", "1")]).0 >= 1.0);
    assert!(metric(&text, "sq_raft_commit_index", &[("node", "1")]).0 > 0.0);
    assert_eq!(metric(&text, "sq_gossip_state", &[]), (0.0, 9), "3 nodes × 3 peers, all alive");
    assert_eq!(metric(&text, "sq_node_up", &[]), (3.0, 3));
}
