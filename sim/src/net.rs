//! The simulated network: every request between processes, through `transport::Caller`.
//!
//! Each process sends through its own [`Port`], which knows who is sending. A request is lost,
//! or delivered after a delay (so messages overtake each other), sometimes twice; the target's
//! `transport::Handler` runs as a task of its own, as a QUIC stream would; the answer travels
//! back the same way. Links can be cut one way or both. A node that is down refuses at once (as
//! an unreachable port does); a cut link or a lost message leaves the caller to its timeout. A
//! crashed process's ports go silent: nothing it sends after its crash arrives.
//!
//! Duplicates are only made of requests a real sender could repeat: never an SQ write (QUIC
//! delivers a stream once, and an insert is not idempotent).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use proto::cluster::{NodeRequest, NodeResponse};
use tokio::time::Instant;
use transport::{CallFuture, Caller, Handler, Peer, Role, TransportError};

use crate::monitor::Monitor;
use crate::rng::Rng;
use crate::trace::Trace;

/// The longest a message can be delayed, in milliseconds. Bounds how late a request whose
/// answer was lost can still take effect (see [`crate::model`]).
pub const DELAY_MS_MAX: u64 = 1_500;
/// The usual delay of a message, in milliseconds: a fast LAN with some jitter.
const DELAY_MS_USUAL: (u64, u64) = (1, 12);

/// A process on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Endpoint {
    Node(u64),
    Gateway(u64),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Node(id) => write!(f, "n{id}"),
            Endpoint::Gateway(id) => write!(f, "g{id}"),
        }
    }
}

/// Network weather, changed by the fault schedule.
#[derive(Debug, Clone, Copy, Default)]
pub struct Weather {
    pub loss_permille: u64,
    pub duplicate_permille: u64,
    /// Chance of a long delay, up to [`DELAY_MS_MAX`].
    pub spike_permille: u64,
}

struct Target {
    node: u64,
    incarnation: u64,
    service: Arc<node::Service>,
}

struct Inner {
    rng: Rng,
    targets: BTreeMap<SocketAddr, Target>,
    /// Node → its running incarnation; absent while it is down.
    incarnations: BTreeMap<u64, u64>,
    /// Directed links that drop everything.
    cut: BTreeSet<(Endpoint, Endpoint)>,
    /// Frozen node processes (a SIGSTOP) and when each resumes: nothing reaches or leaves one
    /// until then, and what was sent meanwhile is delivered late, not lost.
    frozen: BTreeMap<u64, Instant>,
    weather: Weather,
    next_message: u64,
    /// Messages live processes sent so far, by kind (the trace's label).
    sent: BTreeMap<&'static str, u64>,
}

pub struct Net {
    trace: Arc<Trace>,
    monitor: Arc<Monitor>,
    inner: Mutex<Inner>,
    /// Woken when every frozen process resumes at once ([`Net::heal`]).
    thawed: tokio::sync::Notify,
}

/// What happens to one request.
enum Fate {
    /// The sender is a dead process: nothing leaves it.
    Silent,
    /// No such node up: refused after the delay.
    Refused(u64),
    Lost,
    Delivered {
        delay_ms: u64,
        duplicate_delay_ms: Option<u64>,
    },
}

/// What the simulator needs to know of a request.
struct Kind {
    label: &'static str,
    /// The tenant and key hash, for an SQ request.
    tenant: Option<(String, String)>,
    may_duplicate: bool,
}

/// Bytes at the start of an encoded message that tell its kind: the wire version, then the
/// variant (and, for an answer, `Ok` or `Err`). Learnt by encoding samples, so that only SQ
/// requests are decoded whole (a `Raft` or handoff payload is decoded byte by byte by serde).
struct Prefixes {
    requests: Vec<(Vec<u8>, &'static str)>,
    sq_ok: Vec<u8>,
}

const REQUEST_PREFIX_BYTES: usize = 2;
const ANSWER_PREFIX_BYTES: usize = 3;

fn prefixes() -> &'static Prefixes {
    static PREFIXES: std::sync::OnceLock<Prefixes> = std::sync::OnceLock::new();
    PREFIXES.get_or_init(|| {
        let head = |bytes: Vec<u8>, n: usize| bytes.into_iter().take(n).collect::<Vec<u8>>();
        let sample = |r: NodeRequest| {
            head(proto::wire::encode(&r).unwrap_or_default(), REQUEST_PREFIX_BYTES)
        };
        let requests = vec![
            (
                sample(NodeRequest::Sq {
                    tenant: String::new(),
                    key_hash: String::new(),
                    epoch: 0,
                    request: proto::SqRequest::Version,
                }),
                "sq",
            ),
            (sample(NodeRequest::View { known_index: 0, wait_ms: 0 }), "view"),
            (sample(NodeRequest::ViewSince { known_index: 0, wait_ms: 0 }), "view"),
            (
                sample(NodeRequest::Admin {
                    admin_key_hash: String::new(),
                    op: proto::cluster::AdminOp::Health,
                }),
                "admin",
            ),
            (sample(NodeRequest::RaftCommand { command: Vec::new() }), "raft-command"),
            (
                sample(NodeRequest::HandoffManifest { tenant: String::new(), epoch: 0 }),
                "handoff-manifest",
            ),
            (
                sample(NodeRequest::HandoffRead {
                    tenant: String::new(),
                    path: String::new(),
                    offset: 0,
                    len: 0,
                }),
                "handoff-read",
            ),
            (sample(NodeRequest::Raft(Vec::new())), "raft"),
            (sample(NodeRequest::TenantUsage { tenants: Vec::new() }), "usage"),
            (sample(NodeRequest::Metrics), "metrics"),
            (sample(NodeRequest::Gossip { from: 0, heartbeats: Vec::new() }), "gossip"),
            (sample(NodeRequest::ViewPage { after: String::new(), limit: 0 }), "view-page"),
            (sample(NodeRequest::Replicate { from: 0, appends: Vec::new() }), "replicate"),
            (sample(NodeRequest::Lease { from: 0, lapsed_ms: 0, mark_epoch: 0 }), "lease"),
            (sample(NodeRequest::ConfirmDown { node: 0 }), "confirm-down"),
            (sample(NodeRequest::Prepare { tenant: String::new(), ballot: 0 }), "prepare"),
            (
                sample(NodeRequest::FetchRecords { tenant: String::new(), ballot: 0, after: 0 }),
                "fetch-records",
            ),
            (sample(NodeRequest::CatchUp { from: 0, tenant: String::new(), epoch: 0 }), "catch-up"),
            (sample(NodeRequest::SnapshotTake { from: 0, tenant: String::new() }), "snapshot-take"),
            (
                sample(NodeRequest::SnapshotRead {
                    id: 0,
                    tenant: String::new(),
                    path: String::new(),
                    offset: 0,
                    len: 0,
                }),
                "snapshot-read",
            ),
            (sample(NodeRequest::SnapshotDone { id: 0, tenant: String::new() }), "snapshot-done"),
            (sample(NodeRequest::Enter { from: 0, tenant: String::new(), epoch: 0 }), "enter"),
        ];
        let ok = NodeResponse::Sq(Ok(proto::SqResponse::text("")));
        Prefixes {
            requests,
            sq_ok: head(proto::wire::encode(&ok).unwrap_or_default(), ANSWER_PREFIX_BYTES),
        }
    })
}

fn kind_of(request: &[u8]) -> Kind {
    let head = &request[..request.len().min(REQUEST_PREFIX_BYTES)];
    let label = prefixes()
        .requests
        .iter()
        .find(|(p, _)| p.as_slice() == head)
        .map_or("undecodable", |(_, l)| *l);
    if label != "sq" {
        return Kind { label, tenant: None, may_duplicate: true };
    }
    match proto::wire::decode::<NodeRequest>(request) {
        Ok(NodeRequest::Sq { tenant, key_hash, request, .. }) => {
            Kind { label, tenant: Some((tenant, key_hash)), may_duplicate: !request.is_write() }
        }
        _ => Kind { label: "undecodable", tenant: None, may_duplicate: false },
    }
}

/// True for an encoded `NodeResponse::Sq(Ok(_))`.
fn is_sq_ok(answer: &[u8]) -> bool {
    answer.starts_with(&prefixes().sq_ok)
}

impl Net {
    pub fn new(rng: Rng, trace: Arc<Trace>, monitor: Arc<Monitor>) -> Arc<Net> {
        let inner = Inner {
            rng,
            targets: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            cut: BTreeSet::new(),
            frozen: BTreeMap::new(),
            weather: Weather::default(),
            next_message: 0,
            sent: BTreeMap::new(),
        };
        Arc::new(Net {
            trace,
            monitor,
            inner: Mutex::new(inner),
            thawed: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many messages of each kind live processes sent so far (a dead process's tasks that
    /// still run send nothing).
    pub fn sent_by_kind(&self) -> BTreeMap<&'static str, u64> {
        self.lock().sent.clone()
    }

    /// A port for `from` (incarnation `incarnation` of it) at `addr`.
    pub fn port(self: &Arc<Self>, from: Endpoint, incarnation: u64, addr: SocketAddr) -> Port {
        Port { net: self.clone(), from, incarnation, addr }
    }

    /// Node `id` is up as `incarnation`, answering at `addr` through `service`.
    pub fn attach(&self, id: u64, incarnation: u64, addr: SocketAddr, service: Arc<node::Service>) {
        let mut inner = self.lock();
        inner.targets.insert(addr, Target { node: id, incarnation, service });
        inner.incarnations.insert(id, incarnation);
    }

    /// Node `id` is down: it answers nothing, and nothing its old ports send arrives.
    pub fn detach(&self, id: u64, addr: SocketAddr) {
        let mut inner = self.lock();
        inner.targets.remove(&addr);
        inner.incarnations.remove(&id);
    }

    pub fn set_weather(&self, weather: Weather) {
        self.lock().weather = weather;
    }

    /// Cuts (or mends) the directed link `from → to`.
    pub fn set_cut(&self, from: Endpoint, to: Endpoint, cut: bool) {
        let mut inner = self.lock();
        if cut {
            inner.cut.insert((from, to));
        } else {
            inner.cut.remove(&(from, to));
        }
    }

    /// Mends every link, calms the weather, and resumes every frozen process at once: what it
    /// held goes now, not when its freeze would have ended (the checks after the heal must not
    /// race requests a frozen node still holds).
    pub fn heal(&self) {
        let mut inner = self.lock();
        inner.cut.clear();
        inner.frozen.clear();
        inner.weather = Weather::default();
        drop(inner);
        self.thawed.notify_waiters();
    }

    /// Freezes node `id`'s process until `until`: what it sends and what is sent to it waits
    /// for then (the process is stopped, its sockets' buffers hold the bytes), as do the answers
    /// of requests it was handling.
    pub fn freeze(&self, id: u64, until: Instant) {
        self.lock().frozen.insert(id, until);
    }

    /// Waits until `who` is not frozen.
    async fn wait_thaw(&self, who: Endpoint) {
        let Endpoint::Node(id) = who else { return };
        loop {
            let thawed = self.thawed.notified();
            tokio::pin!(thawed);
            thawed.as_mut().enable();
            let until = self.lock().frozen.get(&id).copied();
            match until {
                Some(until) if until > Instant::now() => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = thawed => {}
                    }
                }
                _ => return,
            }
        }
    }

    fn alive(inner: &Inner, who: Endpoint, incarnation: u64) -> bool {
        match who {
            Endpoint::Node(id) => inner.incarnations.get(&id) == Some(&incarnation),
            Endpoint::Gateway(_) => true,
        }
    }

    fn delay(inner: &mut Inner) -> u64 {
        let spike = inner.weather.spike_permille;
        if inner.rng.chance(spike) {
            inner.rng.range(DELAY_MS_USUAL.1, DELAY_MS_MAX)
        } else {
            inner.rng.range(DELAY_MS_USUAL.0, DELAY_MS_USUAL.1)
        }
    }

    fn plan(&self, from: Endpoint, incarnation: u64, to: SocketAddr, kind: &Kind) -> (u64, Fate) {
        let mut inner = self.lock();
        let id = inner.next_message;
        inner.next_message += 1;
        if !Net::alive(&inner, from, incarnation) {
            return (id, Fate::Silent);
        }
        *inner.sent.entry(kind.label).or_default() += 1;
        let Some(target) = inner.targets.get(&to).map(|t| Endpoint::Node(t.node)) else {
            let delay = Net::delay(&mut inner);
            return (id, Fate::Refused(delay));
        };
        let weather = inner.weather;
        let lost = inner.cut.contains(&(from, target)) || inner.rng.chance(weather.loss_permille);
        if lost {
            return (id, Fate::Lost);
        }
        let delay_ms = Net::delay(&mut inner);
        let duplicate = kind.may_duplicate && inner.rng.chance(weather.duplicate_permille);
        let duplicate_delay_ms = duplicate.then(|| Net::delay(&mut inner));
        (id, Fate::Delivered { delay_ms, duplicate_delay_ms })
    }

    /// The node listening at `to`, if any.
    fn node_at(&self, to: SocketAddr) -> Option<u64> {
        self.lock().targets.get(&to).map(|t| t.node)
    }

    /// The target at `to` if it is up and the link from `from` is whole, at delivery time.
    fn reachable(
        &self,
        from: Endpoint,
        incarnation: u64,
        to: SocketAddr,
    ) -> Option<(u64, u64, Arc<node::Service>)> {
        let inner = self.lock();
        let t = inner.targets.get(&to)?;
        let whole = !inner.cut.contains(&(from, Endpoint::Node(t.node)));
        (whole && Net::alive(&inner, from, incarnation))
            .then(|| (t.node, t.incarnation, t.service.clone()))
    }

    /// The delay of an answer from `node` to `to`, or `None` if it is lost.
    fn plan_answer(&self, node: u64, to: Endpoint) -> Option<u64> {
        let mut inner = self.lock();
        let loss = inner.weather.loss_permille;
        let lost = inner.cut.contains(&(Endpoint::Node(node), to)) || inner.rng.chance(loss);
        (!lost).then(|| Net::delay(&mut inner))
    }

    fn is_current(&self, node: u64, incarnation: u64) -> bool {
        Net::alive(&self.lock(), Endpoint::Node(node), incarnation)
    }

    async fn exchange(
        self: Arc<Self>,
        port: PortId,
        to: SocketAddr,
        request: Bytes,
    ) -> Result<Bytes, TransportError> {
        let kind = kind_of(&request);
        // A frozen process sends nothing until it resumes.
        self.wait_thaw(port.from).await;
        let (id, fate) = self.plan(port.from, port.incarnation, to, &kind);
        let what = |fate: &str| format!("msg {id} {} -> {to} {} {fate}", port.from, kind.label);
        match fate {
            Fate::Silent => {
                self.trace.detail(what("from a dead process"));
                std::future::pending().await
            }
            Fate::Refused(delay_ms) => {
                self.trace.detail(what("refused: nothing listens"));
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                Err(TransportError::Connect {
                    addr: to,
                    reason: "simulated: no node listens there".into(),
                })
            }
            Fate::Lost => {
                self.trace.detail(what("lost"));
                std::future::pending().await
            }
            Fate::Delivered { delay_ms, duplicate_delay_ms } => {
                self.trace.detail(what(&format!(
                    "in {delay_ms} ms{}",
                    duplicate_delay_ms.map_or(String::new(), |d| format!(", again in {d} ms"))
                )));
                let (tx, rx) = tokio::sync::oneshot::channel();
                let tenant = kind.tenant;
                if let Some(d) = duplicate_delay_ms {
                    tokio::spawn(self.clone().deliver(
                        id,
                        port,
                        to,
                        request.clone(),
                        d,
                        tenant.clone(),
                        None,
                    ));
                }
                tokio::spawn(self.deliver(id, port, to, request, delay_ms, tenant, Some(tx)));
                match rx.await {
                    Ok(answer) => Ok(answer),
                    // The answer was lost: the caller hears nothing until its timeout.
                    Err(_) => std::future::pending().await,
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        self: Arc<Self>,
        id: u64,
        port: PortId,
        to: SocketAddr,
        request: Bytes,
        delay_ms: u64,
        tenant: Option<(String, String)>,
        reply: Option<tokio::sync::oneshot::Sender<Bytes>>,
    ) {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if let Some(node) = self.node_at(to) {
            // Held in the frozen process's socket until it resumes.
            self.wait_thaw(Endpoint::Node(node)).await;
        }
        let Some((node, incarnation, service)) = self.reachable(port.from, port.incarnation, to)
        else {
            self.trace.detail(format!("msg {id} dropped on arrival"));
            return;
        };
        let role = match port.from {
            Endpoint::Node(n) => Role::Node(n),
            Endpoint::Gateway(_) => Role::Gateway,
        };
        let since_ms = self.trace.now_ms();
        let at_delivery = service.registry.state();
        let answer = service.handle(Peer { role, addr: port.addr }, request).await;
        if !self.is_current(node, incarnation) {
            return;
        }
        if let Some((tenant, key_hash)) = tenant {
            if is_sq_ok(&answer) {
                let now = service.registry.state();
                self.trace.detail(format!(
                    "msg {id} {tenant} served by n{node} at epoch {} (primary {:?}, down {:?})",
                    now.placement_epoch(),
                    now.primary_of(&tenant),
                    now.liveness_marks()
                        .filter(|(_, l)| l.down)
                        .map(|(n, _)| n)
                        .collect::<Vec<_>>()
                ));
                self.monitor.served_by(
                    node,
                    &tenant,
                    &key_hash,
                    since_ms,
                    &at_delivery,
                    &service.registry.state(),
                );
            }
        }
        let Some(reply) = reply else { return };
        // A process frozen while it handled the request answers once it resumes.
        self.wait_thaw(Endpoint::Node(node)).await;
        let Some(back_ms) = self.plan_answer(node, port.from) else {
            self.trace.detail(format!("msg {id} answer lost"));
            return;
        };
        tokio::time::sleep(Duration::from_millis(back_ms)).await;
        let arrives = {
            let inner = self.lock();
            Net::alive(&inner, port.from, port.incarnation)
                && !inner.cut.contains(&(Endpoint::Node(node), port.from))
        };
        if arrives {
            let _ = reply.send(answer);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PortId {
    from: Endpoint,
    incarnation: u64,
    addr: SocketAddr,
}

/// One process's way onto the network: its `transport::Caller`.
pub struct Port {
    net: Arc<Net>,
    from: Endpoint,
    incarnation: u64,
    addr: SocketAddr,
}

impl Caller for Port {
    fn call(&self, addr: SocketAddr, request: Bytes, timeout: Duration) -> CallFuture<'_> {
        let port = PortId { from: self.from, incarnation: self.incarnation, addr: self.addr };
        let exchange = self.net.clone().exchange(port, addr, request);
        Box::pin(async move {
            tokio::time::timeout(timeout, exchange)
                .await
                .unwrap_or(Err(TransportError::Timeout { what: "simulated call" }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: messages are told apart by their first bytes exactly as a full decode would.
    #[test]
    fn prefixes_classify_messages() {
        let write = NodeRequest::Sq {
            tenant: "t1".into(),
            key_hash: "h".into(),
            epoch: 3,
            request: proto::SqRequest::Delete {
                p: proto::PhextName::parse("p").unwrap(),
                c: proto::Coordinate::ORIGIN,
            },
        };
        let kind = kind_of(&proto::wire::encode(&write).unwrap());
        assert_eq!(
            (kind.label, kind.tenant.as_ref().map(|(t, _)| t.as_str()), kind.may_duplicate),
            ("sq", Some("t1"), false)
        );
        assert_eq!(
            kind_of(&proto::wire::encode(&NodeRequest::Raft(vec![7; 300])).unwrap()).label,
            "raft"
        );
        let ok = NodeResponse::Sq(Ok(proto::SqResponse::text(vec![b'x'; 1000])));
        let refused = NodeResponse::Sq(Err(proto::ApiError::Unauthorized));
        assert!(is_sq_ok(&proto::wire::encode(&ok).unwrap()));
        assert!(!is_sq_ok(&proto::wire::encode(&refused).unwrap()));
        assert!(!is_sq_ok(&proto::wire::encode(&NodeResponse::Metrics(String::new())).unwrap()));
    }
}
