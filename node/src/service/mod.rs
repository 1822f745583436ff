//! The node's QUIC service: every message another process sends a node arrives here.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::cluster::{NodeRequest, NodeResponse, RegistryView, TenantUsage};
use proto::streamed::OrderedRead;
use raft_registry::Registry;
use transport::{Handler, HandlerFuture, Peer, Role};

use crate::clock::WallClock;
use crate::handoff::Handoffs;
use crate::limits::Limits;
use crate::store::Store;

mod body;
mod sq;
mod view;

pub(crate) use body::file_body;
use sq::Answered;

/// How long a request may take when this node forwards it to a peer (leader or owner).
pub const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Service {
    pub id: u64,
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub peers: Arc<dyn transport::Caller>,
    /// The view last built for gateways, by applied index: rebuilt only when the registry moves.
    view_cache: Mutex<Option<Arc<RegistryView>>>,
    pub health: Arc<crate::gossip::Health>,
    pub limits: Arc<Limits>,
    pub wall: Arc<dyn WallClock>,
    /// Monotonic time: request latencies and handoff pacing.
    pub clock: Arc<dyn crate::store::Clock>,
    pub handoffs: Arc<Handoffs>,
    /// The gossip generation each gateway was last sent in a view.
    view_peers: crate::gossip::ViewPeers,
    /// This node's links to the backups of the tenants it is primary of.
    pub replication: Arc<crate::replicate::Replication>,
    /// This node's lease, and what it heard from others as a registry voter.
    pub leases: Arc<crate::lease::Leases>,
    /// The snapshots primaries asked this node to take as their backup.
    pub catch_ups: Arc<crate::catchup::CatchUps>,
    /// Requests admitted per tenant and route (`sq_api_calls_total`).
    pub(crate) calls: crate::metrics::Calls,
    /// Cancelled when the node starts to stop: long-polls answer at once rather than hold the
    /// transport's drain of in-flight requests for their whole wait ([`Self::stopping`]).
    stopping: tokio_util::sync::CancellationToken,
}

impl Service {
    // Each argument is one of the node's long-lived parts, built once by `run`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        store: Arc<Store>,
        registry: Arc<Registry>,
        peers: Arc<dyn transport::Caller>,
        health: Arc<crate::gossip::Health>,
        limits: Arc<Limits>,
        wall: Arc<dyn WallClock>,
        clock: Arc<dyn crate::store::Clock>,
        handoffs: Arc<Handoffs>,
    ) -> Service {
        let replication = crate::replicate::Replication::new(
            id,
            store.clone(),
            peers.clone(),
            registry.clone(),
            handoffs.clone(),
            clock.clone(),
        );
        let leases = Arc::new(crate::lease::Leases::new(clock.clone()));
        Service {
            id,
            store,
            registry,
            peers,
            replication,
            leases,
            catch_ups: Default::default(),
            calls: Default::default(),
            view_cache: Mutex::new(None),
            health,
            limits,
            wall,
            clock,
            handoffs,
            view_peers: Default::default(),
            stopping: Default::default(),
        }
    }

    /// The node is stopping: a gateway's view long-poll held open answers now (nothing new),
    /// so the transport's drain of in-flight requests waits only for real work. A frozen then
    /// thawed node's stop once spent its 5-s drain on such a poll, then 5 s more closing its
    /// connections, and `sq-cloud dev` killed it before its store was flushed.
    pub fn stopping(&self) {
        self.stopping.cancel();
    }

    /// Wall-clock milliseconds since the Unix epoch, for records stamped with a date. Never for
    /// durations: the wall clock steps both ways.
    pub fn wall_ms(&self) -> u64 {
        self.wall.unix_ms()
    }

    /// Monotonic milliseconds, for durations and pacing. Only differences mean anything.
    pub fn mono_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    async fn dispatch(&self, peer: Peer, request: NodeRequest) -> NodeResponse {
        crate::metrics::node_request(kind(&request));
        match request {
            NodeRequest::Sq { tenant, key_hash, epoch, request } => {
                NodeResponse::Sq(self.sq(&tenant, &key_hash, epoch, request).await)
            }
            NodeRequest::View { known_index, wait_ms } => NodeResponse::View(
                self.view_wait(peer.addr, known_index, wait_ms).await.then(|| self.build_view()),
            ),
            NodeRequest::ViewSince { known_index, wait_ms } => NodeResponse::ViewUpdate(
                self.view_wait(peer.addr, known_index, wait_ms)
                    .await
                    .then(|| self.view_update(known_index)),
            ),
            NodeRequest::ViewPage { after, limit } => self.view_page(&after, limit),
            NodeRequest::Admin { admin_key_hash, op } => {
                let (result, applied_index) =
                    crate::admin::execute(self, &admin_key_hash, op).await;
                NodeResponse::Admin { result, applied_index }
            }
            NodeRequest::TenantUsage { tenants } => {
                NodeResponse::TenantUsage(self.usage(tenants).await)
            }
            NodeRequest::Metrics => NodeResponse::Metrics(crate::metrics::render_node(self)),
            NodeRequest::Prepare { tenant, ballot } => match peer.role {
                Role::Node(from) => crate::replicate::promise(self, from, tenant, ballot).await,
                _ => NodeResponse::Refused("only nodes may prepare".into()),
            },
            NodeRequest::FetchRecords { tenant, ballot, after } => match peer.role {
                Role::Node(from) => {
                    crate::replicate::fetch(self, from, tenant, ballot, after).await
                }
                _ => NodeResponse::Refused("only nodes may fetch records".into()),
            },
            NodeRequest::CatchUp { from, tenant, epoch } => match peer.role {
                Role::Node(id) if id == from => {
                    crate::catchup::asked(self, from, tenant, epoch).await
                }
                _ => NodeResponse::Refused("only a tenant's primary may ask for a catch-up".into()),
            },
            NodeRequest::SnapshotTake { from, tenant } => match peer.role {
                Role::Node(id) if id == from => crate::catchup::give(self, from, tenant).await,
                _ => NodeResponse::Refused("only a tenant's replica may take a snapshot".into()),
            },
            NodeRequest::Enter { from, tenant, epoch } => match peer.role {
                Role::Node(id) if id == from => {
                    crate::replicate::entering(self, from, tenant, epoch).await
                }
                _ => NodeResponse::Refused("only a node entering a replica set may ask".into()),
            },
            request => match peer.role {
                Role::Node(sender) => self.dispatch_peer(sender, request).await,
                _ => NodeResponse::Refused(format!(
                    "{:?} may not send {}",
                    peer.role,
                    kind(&request)
                )),
            },
        }
    }

    /// The requests only another node may send: Raft, gossip, leases, replication's appends,
    /// handoffs and snapshots' reads. `sender` is the node its certificate names; it speaks as
    /// itself only, whatever id the request carries.
    async fn dispatch_peer(&self, sender: u64, request: NodeRequest) -> NodeResponse {
        match request {
            NodeRequest::RaftCommand { command } => {
                let (result, applied_index) = crate::admin::commit_forwarded(self, &command).await;
                NodeResponse::Admin { result, applied_index }
            }
            NodeRequest::HandoffManifest { tenant, epoch } => {
                NodeResponse::HandoffManifest(crate::handoff::manifest(self, &tenant, epoch).await)
            }
            NodeRequest::HandoffRead { tenant, path, offset, len } => NodeResponse::HandoffChunk(
                crate::handoff::read(self, &tenant, &path, offset, len)
                    .await
                    .map(proto::cluster::Chunk),
            ),
            NodeRequest::Raft(bytes) => NodeResponse::Raft(self.registry.handle_rpc(&bytes).await),
            NodeRequest::Gossip { from, heartbeats } => {
                // A removed node that gossips was away when it was removed: it is told, and its
                // heartbeats are not taken (crate::gossip, raft_registry::removal).
                match self.registry.removed_at(sender) {
                    Some(applied) => NodeResponse::Removed { applied },
                    None => {
                        NodeResponse::Gossip { heartbeats: self.health.merge(from, &heartbeats) }
                    }
                }
            }
            NodeRequest::Identify => NodeResponse::Identity { id: self.id },
            NodeRequest::Replicate { appends, .. } => {
                NodeResponse::Replicated(crate::replicate::take(self, sender, appends).await)
            }
            NodeRequest::Lease { lapsed_ms, mark_epoch, .. } => {
                self.leases.note_lapse(sender, lapsed_ms, mark_epoch);
                let state = self.registry.state();
                NodeResponse::Lease {
                    granted: self.leases.grant(sender, &state),
                    epoch: state.placement_epoch(),
                }
            }
            NodeRequest::ConfirmDown { node } => NodeResponse::ConfirmDown {
                confirmed: self.leases.confirm_down(node, &self.registry.state()),
            },
            NodeRequest::SnapshotRead { id, tenant, path, offset, len } => {
                // Whole, at most one configured chunk: for peers that take whole answers only.
                let len = len.min(self.handoffs.config.chunk_bytes.max(1));
                crate::catchup::read_answer(self, id, tenant, path, offset, len).await.0
            }
            NodeRequest::SnapshotDone { id, tenant } => {
                crate::catchup::done(self, id, tenant).await
            }
            other => NodeResponse::Refused(format!(
                "{:?} may not send {}",
                Role::Node(sender),
                kind(&other)
            )),
        }
    }

    pub async fn usage(&self, tenants: Vec<String>) -> Vec<TenantUsage> {
        let (store, limits) = (self.store.clone(), self.limits.clone());
        let state = self.registry.state();
        let (replication, me) = (self.replication.clone(), self.id);
        crate::blocking::spawn(move || {
            tenants
                .into_iter()
                .map(|t| {
                    let rollup = limits.rollup(&t);
                    let last_lsn = store.replica_state(&t).map_or(0, |r| r.last_lsn);
                    // This node answers as the tenant's primary: the others are its backups
                    // (not the set's tail: while the set's first node is down, the second leads).
                    let others: Vec<u64> =
                        state.replica_set(&t).into_iter().filter(|&n| n != me).collect();
                    let backups = replication.statuses(&t, &others, last_lsn);
                    TenantUsage {
                        storage_bytes: store.storage_bytes(&t).unwrap_or(0),
                        api_calls_today: rollup.total_calls(),
                        bytes_out_today: rollup.bytes_out,
                        last_active_ms: rollup.last_active_ms,
                        tenant_id: t,
                        last_lsn,
                        backups,
                    }
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Waits, at most `wait`, until this node's registry has applied placement epoch `epoch`.
    pub async fn wait_for_epoch(&self, epoch: u64, wait: Duration) {
        self.wait_for_registry(wait, |state| state.placement_epoch() >= epoch).await
    }

    /// Waits, at most `wait`, until `ready` holds of this node's registry.
    pub async fn wait_for_registry(
        &self,
        wait: Duration,
        ready: impl Fn(&raft_registry::RegistryState) -> bool,
    ) {
        let mut rx = self.registry.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        while !ready(&rx.borrow_and_update().1) {
            if !matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(()))) {
                return;
            }
        }
    }
}

fn kind(r: &NodeRequest) -> &'static str {
    match r {
        NodeRequest::Sq { .. } => "sq",
        NodeRequest::View { .. } => "view",
        NodeRequest::ViewSince { .. } => "view since",
        NodeRequest::ViewPage { .. } => "view page",
        NodeRequest::Admin { .. } => "admin",
        NodeRequest::RaftCommand { .. } => "raft command",
        NodeRequest::HandoffManifest { .. } | NodeRequest::HandoffRead { .. } => "handoff",
        NodeRequest::Raft(_) => "raft",
        NodeRequest::TenantUsage { .. } => "usage",
        NodeRequest::Metrics => "metrics",
        NodeRequest::Gossip { .. } => "gossip",
        NodeRequest::Identify => "identify",
        NodeRequest::Replicate { .. } => "replicate",
        NodeRequest::Lease { .. } => "lease",
        NodeRequest::ConfirmDown { .. } => "confirm down",
        NodeRequest::Prepare { .. } => "prepare",
        NodeRequest::FetchRecords { .. } => "fetch records",
        NodeRequest::CatchUp { .. } => "catch up",
        NodeRequest::SnapshotTake { .. }
        | NodeRequest::SnapshotRead { .. }
        | NodeRequest::SnapshotDone { .. } => "snapshot",
        NodeRequest::Enter { .. } => "enter",
    }
}

impl Handler for Service {
    fn handle_answer(&self, peer: Peer, request: Bytes) -> transport::AnswerFuture<'_> {
        Box::pin(async move {
            let (response, body) = match proto::wire::decode::<NodeRequest>(&request) {
                Ok(NodeRequest::Sq { tenant, key_hash, request: sq, .. })
                    if OrderedRead::of(&sq).is_some() =>
                {
                    match self.sq_answer(&tenant, &key_hash, sq, true).await {
                        Ok(Answered::Stream { len, json, body }) => {
                            (NodeResponse::SqStreamed { len, json }, Some(body))
                        }
                        Ok(Answered::Whole(r)) => (NodeResponse::Sq(Ok(r)), None),
                        Err(e) => (NodeResponse::Sq(Err(e)), None),
                    }
                }
                Ok(NodeRequest::HandoffRead { tenant, path, offset, len })
                    if matches!(peer.role, Role::Node(_)) =>
                {
                    crate::handoff::read_answer(self, &tenant, &path, offset, len).await
                }
                Ok(NodeRequest::SnapshotRead { id, tenant, path, offset, len })
                    if matches!(peer.role, Role::Node(_)) =>
                {
                    crate::catchup::read_answer(self, id, tenant, path, offset, len).await
                }
                Ok(r) => (self.dispatch(peer, r).await, None),
                Err(e) => (NodeResponse::Refused(e.to_string()), None),
            };
            transport::Answer { head: encode_response(&response), body }
        })
    }

    fn handle(&self, peer: Peer, request: Bytes) -> HandlerFuture<'_> {
        Box::pin(async move {
            let response = match proto::wire::decode::<NodeRequest>(&request) {
                Ok(r) => self.dispatch(peer, r).await,
                Err(e) => NodeResponse::Refused(e.to_string()),
            };
            encode_response(&response)
        })
    }
}

/// Encoding our own enum into memory fails only past the size limit; say so instead.
fn encode_response(response: &NodeResponse) -> Bytes {
    let bytes = proto::wire::encode(response)
        .or_else(|e| proto::wire::encode(&NodeResponse::Refused(e.to_string())))
        .unwrap_or_default();
    Bytes::from(bytes)
}
