//! The gateway's HTTP surface against a fake node: order of checks, CORS, statuses, and the
//! "not owner" retry. No network: the node seam is an in-memory [`NodeClient`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use proto::cluster::{
    NodeHealth, NodeRequest, NodeResponse, NodeState, NodeView, RegistryView, TenantView,
    ViewUpdate,
};
use proto::{ApiError, SqResponse};
use tower::ServiceExt;

use crate::forward::{BoxFuture, CallError, NodeClient};
use crate::view::{key_hash, ViewHandle};
use crate::{router, Gateway};

const KEY: &str = "pmb-v1-0123456789abcdef0123456789abcdef";
const ADMIN: &str = "sqa-admin";

/// Answers `select` with the tenant and route; says "not owner" the first `not_owner` times.
struct FakeNode {
    calls: AtomicUsize,
    not_owner: usize,
}

impl NodeClient for FakeNode {
    fn call(
        &self,
        _addr: SocketAddr,
        request: NodeRequest,
        _t: Duration,
    ) -> BoxFuture<'_, Result<NodeResponse, CallError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(match request {
                NodeRequest::Sq { .. } if n < self.not_owner => {
                    NodeResponse::Sq(Err(ApiError::NotOwner { epoch: 2 }))
                }
                NodeRequest::Sq { tenant, request, .. } => {
                    NodeResponse::Sq(Ok(SqResponse::text(format!("{tenant}:{}", request.route()))))
                }
                NodeRequest::ViewSince { .. } => {
                    NodeResponse::ViewUpdate(Some(ViewUpdate::Full(view())))
                }
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

fn gateway(not_owner: usize) -> (Arc<Gateway>, Arc<FakeNode>) {
    let node = Arc::new(FakeNode { calls: AtomicUsize::new(0), not_owner });
    let views = ViewHandle::default();
    views.replace(view());
    let gw = Arc::new(Gateway {
        views,
        client: node.clone(),
        seeds: vec!["127.0.0.1:9".parse().unwrap()],
    });
    (gw, node)
}

async fn send(
    gw: &Arc<Gateway>,
    method: &str,
    uri: &str,
    auth: Option<&str>,
) -> (StatusCode, String, Option<String>) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let response = router(gw.clone()).oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let cors = response
        .headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), cors)
}

// Goal: SQ's order of checks — OPTIONS, method, key, name, route — with CORS on every answer.
#[tokio::test]
async fn order_of_checks() {
    let (gw, _) = gateway(0);
    let bearer = format!("Bearer {KEY}");
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("OPTIONS", "/api/v2/select?p=x", None, 204, ""),
        ("PUT", "/api/v2/update?p=x", Some(&bearer), 400, "Bad Request"),
        ("PUT", "/api/v2/update?p=x", None, 400, "Bad Request"),
        ("GET", "/api/v2/version", None, 401, "Unauthorized"),
        ("GET", "/api/v2/nosuch?p=../x", None, 401, "Unauthorized"),
        (
            "GET",
            "/api/v2/select?p=x&c=1.1.1/1.1.1/1.1.1",
            Some("Bearer pmb-v1-00000000000000000000000000000000"),
            401,
            "Unauthorized",
        ),
        ("GET", "/api/v2/nosuch?p=../x", Some(&bearer), 403, "Forbidden: invalid phext path"),
        ("GET", "/api/v2/nosuch?p=x", Some(&bearer), 404, "Not Found"),
        ("POST", "/api/v2/select?p=x&c=1.1.1/1.1.1/1.1.1", Some(&bearer), 404, "Not Found"),
        ("GET", "/elsewhere", Some(&bearer), 404, "Not Found"),
        ("GET", "/api/v2/version", Some(KEY), 200, proto::request::SQ_API_VERSION),
        ("GET", "/api/v2/select?p=x&c=1.1.1/1.1.1/1.1.1", Some(&bearer), 200, "acme:select"),
        (
            "GET",
            "/api/v2/select?p=x&c=1.1.1/1.1.1/1.1.1",
            Some(&format!("bEaReR {KEY}")),
            200,
            "acme:select",
        ),
        ("GET", "/api/v2/admin/tenants", Some(&bearer), 403, "Forbidden: admin key required"),
        ("GET", "/api/v2/admin/tenants", None, 401, "Unauthorized"),
    ];
    for (method, uri, auth, status, body) in cases {
        let (s, b, cors) = send(&gw, method, uri, *auth).await;
        assert_eq!((s.as_u16(), b.as_str()), (*status, *body), "{method} {uri} {auth:?}");
        assert_eq!(cors.as_deref(), Some("*"), "{method} {uri}");
    }
}

// Goal: "not owner" makes the gateway refresh its view and retry exactly once.
#[tokio::test]
async fn not_owner_retries_once() {
    let (gw, node) = gateway(1);
    let (s, b, _) = send(&gw, "GET", "/api/v2/toc?p=x", Some(KEY)).await;
    assert_eq!((s.as_u16(), b.as_str()), (200, "acme:toc"));
    // One refused call, one view fetch, one retried call.
    assert_eq!(node.calls.load(Ordering::SeqCst), 3);

    let (gw, _) = gateway(usize::MAX);
    let (s, _, _) = send(&gw, "GET", "/api/v2/toc?p=x", Some(KEY)).await;
    assert_eq!(s.as_u16(), 503);
}

// Goal: a tenant whose owner gossip marks dead is answered 503 with Retry-After, without a call.
#[tokio::test]
async fn dead_owner_fails_fast() {
    let (gw, node) = gateway(0);
    let mut v = view();
    v.nodes[0].health = NodeHealth::Dead;
    gw.views.replace(v);
    let response = router(gw.clone())
        .oneshot(
            Request::builder()
                .uri("/api/v2/toc?p=x")
                .header("x-sq-api-key", KEY)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(node.calls.load(Ordering::SeqCst), 0);
}

/// A gateway serving plain HTTP on a free loopback port with short timeouts; returns its address
/// and the token that stops it.
async fn serving(
    limits: crate::HttpLimits,
) -> (SocketAddr, tokio_util::sync::CancellationToken, tokio::task::JoinHandle<()>) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = crate::GatewayConfig {
        listen: addr,
        cluster_certs: "unused".into(),
        nodes: vec![],
        tls: None,
        worker_threads: 0,
        http: limits,
    };
    let (gw, _) = gateway(0);
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        crate::serve::serve(gw, &config, token).await.unwrap();
    });
    // Serving once a connection is accepted.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the gateway did not listen");
        tokio::task::yield_now().await;
    }
    (addr, stop, task)
}

/// Reads until the peer closes; returns what it sent.
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    out
}

// Goal: the idle timeout, not the shorter header-read timeout, closes a keep-alive connection
// after its answer; a trickled head is closed by the header-read timeout although bytes keep
// arriving.
#[tokio::test]
async fn idle_and_header_timeouts_are_distinct() {
    use tokio::io::AsyncWriteExt;
    let limits = crate::HttpLimits {
        header_read_timeout_ms: 300,
        idle_timeout_ms: 1200,
        ..crate::HttpLimits::default()
    };
    let (addr, stop, task) = serving(limits).await;

    let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("OPTIONS /api/v2/select HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    kept.write_all(request.as_bytes()).await.unwrap();
    let answered = std::time::Instant::now();
    let answer = read_to_close(&mut kept).await;
    let open_for = answered.elapsed();
    assert!(answer.starts_with(b"HTTP/1.1 204"), "{}", String::from_utf8_lossy(&answer));
    assert!(
        open_for >= Duration::from_millis(1000),
        "closed after {open_for:?}, before the idle timeout"
    );
    assert!(open_for < Duration::from_secs(5), "still open after {open_for:?}");

    let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    trickle.write_all(b"GET /api/v2/select?p=").await.unwrap();
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let cut = loop {
        ticker.tick().await;
        if trickle.write_all(b"a").await.is_err() || started.elapsed() > Duration::from_secs(5) {
            break started.elapsed();
        }
    };
    assert!(cut >= Duration::from_millis(300), "cut after {cut:?}");
    assert!(cut < Duration::from_secs(5), "a trickled head was never cut");
    stop.cancel();
    task.await.unwrap();
}

/// A node holding `count` tenants (`t000000`, ...) that answers a first view with the first part
/// of them ([`ViewUpdate::FullFirst`]) and pages after it; `t000001` is removed after the first
/// part (a page read later is newer than the part's index).
struct LargeRegistry {
    tenants: std::sync::Mutex<Vec<TenantView>>,
    pages: AtomicUsize,
}

impl LargeRegistry {
    fn new(count: usize) -> LargeRegistry {
        let tenants = (0..count)
            .map(|i| TenantView {
                id: format!("t{i:06}"),
                key_hashes: vec![key_hash(&format!("pmb-v1-key-{i}"))],
                enabled: true,
                owner: Some(1),
            })
            .collect();
        LargeRegistry { tenants: std::sync::Mutex::new(tenants), pages: AtomicUsize::new(0) }
    }
}

impl NodeClient for LargeRegistry {
    fn call(
        &self,
        _addr: SocketAddr,
        request: NodeRequest,
        _t: Duration,
    ) -> BoxFuture<'_, Result<NodeResponse, CallError>> {
        Box::pin(async move {
            let per_part = proto::cluster::VIEW_TENANTS_PER_PART as usize;
            let mut tenants = self.tenants.lock().expect("test mutex");
            Ok(match request {
                NodeRequest::ViewSince { known_index: 0, .. } => {
                    let first = RegistryView { tenants: tenants[..per_part].to_vec(), ..view() };
                    tenants.retain(|t| t.id != "t000001");
                    NodeResponse::ViewUpdate(Some(ViewUpdate::FullFirst(first)))
                }
                NodeRequest::ViewPage { after, limit } => {
                    self.pages.fetch_add(1, Ordering::SeqCst);
                    let rest: Vec<TenantView> =
                        tenants.iter().filter(|t| t.id > after).cloned().collect();
                    let take = rest.len().min(limit as usize);
                    NodeResponse::ViewPage {
                        more: take < rest.len(),
                        tenants: rest[..take].to_vec(),
                    }
                }
                other => NodeResponse::Refused(format!("{other:?}")),
            })
        })
    }
}

// Goal: a registry too large for one message arrives as a first part and pages, and the
// gateway takes the whole at the first part's index: every tenant of every page is known by its
// key, none twice, and the part's own records stand as they were at its index (a change after
// it comes with the changes since that index, which the gateway asks for next).
#[tokio::test]
async fn a_registry_in_parts_is_taken_whole() {
    let per_part = proto::cluster::VIEW_TENANTS_PER_PART as usize;
    let count = 2 * per_part + 7;
    let node = LargeRegistry::new(count);
    let views = ViewHandle::default();
    let seed: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    assert!(crate::forward::refresh(&node, &views, &[seed]).await, "the node answered");
    let current = views.current();
    assert_eq!(node.pages.load(Ordering::SeqCst), 2, "two pages after the first part");
    assert_eq!(current.view.applied_index, view().applied_index, "the first part's index");
    assert_eq!(current.tenant_count(), count, "every tenant once");
    for i in [0, 1, per_part - 1, per_part, count - 1] {
        let hash = key_hash(&format!("pmb-v1-key-{i}"));
        let found = current.tenant_by_key_hash(&hash).map(|t| t.id.to_string());
        assert_eq!(found, Some(format!("t{i:06}")), "tenant {i}");
    }
}

/// Node 1 (at 127.0.0.1:9) never answers a public request: each call waits its whole timeout
/// and fails, as a frozen node's would. Node 2 (at 127.0.0.1:10) answers with its name.
struct FrozenFirst {
    to_second: AtomicUsize,
}

impl NodeClient for FrozenFirst {
    fn call(
        &self,
        addr: SocketAddr,
        request: NodeRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<NodeResponse, CallError>> {
        Box::pin(async move {
            let NodeRequest::Sq { request, .. } = request else {
                return Ok(NodeResponse::Refused("public requests only".into()));
            };
            if addr.port() == 9 {
                tokio::time::sleep(timeout).await;
                return Err(CallError::Unreachable("timed out".into()));
            }
            self.to_second.fetch_add(1, Ordering::SeqCst);
            Ok(NodeResponse::Sq(Ok(SqResponse::text(format!("node2:{}", request.route())))))
        })
    }
}

/// The test view with node 2 beside node 1, the tenant owned by `owner`, at `applied_index`.
fn two_nodes(owner: u64, applied_index: u64) -> RegistryView {
    let mut v = view();
    v.applied_index = applied_index;
    v.tenants[0].owner = Some(owner);
    let second = NodeView { id: 2, addr: "127.0.0.1:10".into(), ..v.nodes[0].clone() };
    v.nodes.push(second);
    v
}

// Goal: a read in flight to an owner that stopped answering is sent to the new owner as soon
// as the view names one, and answered, well before the forward timeout; a write in flight is
// never sent again (the old owner may have committed it): it waits for the timeout and is
// answered 503 saying its outcome is unknown, and the new owner never sees it. Time is
// paused, so the order is exact.
#[tokio::test(start_paused = true)]
async fn a_read_waiting_on_a_replaced_owner_goes_to_the_new_one() {
    let bearer = format!("Bearer {KEY}");
    for (uri, status, body_start, sent_to_second) in [
        ("/api/v2/select?p=x&c=1.1.1/1.1.1/1.1.1", 200, "node2:select", 1),
        (
            "/api/v2/update?p=x&c=1.1.1/1.1.1/1.1.1&s=v",
            503,
            "Service Unavailable: the tenant's node did not answer; the write's outcome is unknown",
            0,
        ),
    ] {
        let node = Arc::new(FrozenFirst { to_second: AtomicUsize::new(0) });
        let views = ViewHandle::default();
        views.replace(two_nodes(1, 7));
        let client = node.clone();
        let gw = Arc::new(Gateway { views, client, seeds: vec!["127.0.0.1:9".parse().unwrap()] });
        let failover = Duration::from_millis(400);
        let moved = gw.views.clone();
        tokio::spawn(async move {
            tokio::time::sleep(failover).await;
            moved.replace(two_nodes(2, 8));
        });
        let started = tokio::time::Instant::now();
        let (got, body, _) = send(&gw, "GET", uri, Some(&bearer)).await;
        let took = started.elapsed();
        assert_eq!((got.as_u16(), body.starts_with(body_start)), (status, true), "{uri}: {body}");
        assert_eq!(node.to_second.load(Ordering::SeqCst), sent_to_second, "{uri}");
        if status == 200 {
            assert_eq!(took, failover, "{uri}: answered when the view moved");
        } else {
            assert!(took >= crate::forward::FORWARD_TIMEOUT, "{uri}: {took:?}");
        }
    }
}
