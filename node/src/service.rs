//! The node's QUIC service: every message another process sends a node arrives here.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::cluster::{
    NodeRequest, NodeResponse, RegistryDelta, RegistryView, TenantUsage, ViewUpdate,
    VIEW_TENANTS_PER_PART,
};
use proto::{ApiError, SqRequest, SqResponse};
use raft_registry::{Registry, Since};
use transport::{Handler, HandlerFuture, Peer, Role};

use crate::blocking::Step;
use crate::clock::WallClock;
use crate::handoff::Handoffs;
use crate::limits::Limits;
use crate::store::{Begun, FileAnswer, Opened, Store, VfsReader};
use proto::streamed::OrderedRead;

/// The longest a gateway's view long-poll is held open, whatever it asks for.
const VIEW_WAIT_MAX: Duration = Duration::from_secs(30);

/// How long a request waits for this node's registry to learn a tenant or key that the gateway's
/// view already has: several Raft heartbeats (250 ms), well under the gateway's forward timeout.
const CATCH_UP_WAIT: Duration = Duration::from_millis(1000);

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
        let from_node = matches!(peer.role, Role::Node(_));
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
            NodeRequest::RaftCommand { command } if from_node => {
                let (result, applied_index) = crate::admin::commit_forwarded(self, &command).await;
                NodeResponse::Admin { result, applied_index }
            }
            NodeRequest::HandoffManifest { tenant, epoch } if from_node => {
                NodeResponse::HandoffManifest(crate::handoff::manifest(self, &tenant, epoch).await)
            }
            NodeRequest::HandoffRead { tenant, path, offset, len } if from_node => {
                NodeResponse::HandoffChunk(
                    crate::handoff::read(self, &tenant, &path, offset, len)
                        .await
                        .map(proto::cluster::Chunk),
                )
            }
            NodeRequest::Raft(bytes) if from_node => {
                NodeResponse::Raft(self.registry.handle_rpc(&bytes).await)
            }
            NodeRequest::Gossip { from, heartbeats } if from_node => {
                // A removed node that gossips was away when it was removed: it is told, and its
                // heartbeats are not taken (crate::gossip, raft_registry::removal).
                let sender = match peer.role {
                    Role::Node(id) => id,
                    _ => from,
                };
                match self.registry.removed_at(sender) {
                    Some(applied) => NodeResponse::Removed { applied },
                    None => {
                        NodeResponse::Gossip { heartbeats: self.health.merge(from, &heartbeats) }
                    }
                }
            }
            NodeRequest::TenantUsage { tenants } => {
                NodeResponse::TenantUsage(self.usage(tenants).await)
            }
            NodeRequest::Metrics => NodeResponse::Metrics(crate::metrics::render_node(self)),
            NodeRequest::Identify if from_node => NodeResponse::Identity { id: self.id },
            NodeRequest::Replicate { from, appends } if from_node => {
                // A node replicates as itself only.
                let from = match peer.role {
                    Role::Node(id) => id,
                    _ => from,
                };
                NodeResponse::Replicated(crate::replicate::take(self, from, appends).await)
            }
            NodeRequest::Lease { from, lapsed_ms, mark_epoch } if from_node => {
                let from = match peer.role {
                    Role::Node(id) => id,
                    _ => from,
                };
                self.leases.note_lapse(from, lapsed_ms, mark_epoch);
                let state = self.registry.state();
                NodeResponse::Lease {
                    granted: self.leases.grant(from, &state),
                    epoch: state.placement_epoch(),
                }
            }
            NodeRequest::ConfirmDown { node } if from_node => NodeResponse::ConfirmDown {
                confirmed: self.leases.confirm_down(node, &self.registry.state()),
            },
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
            NodeRequest::SnapshotRead { id, tenant, path, offset, len } if from_node => {
                // Whole, at most one configured chunk: for peers that take whole answers only.
                let len = len.min(self.handoffs.config.chunk_bytes.max(1));
                crate::catchup::read_answer(self, id, tenant, path, offset, len).await.0
            }
            NodeRequest::SnapshotDone { id, tenant } if from_node => {
                crate::catchup::done(self, id, tenant).await
            }
            NodeRequest::Enter { from, tenant, epoch } => match peer.role {
                Role::Node(id) if id == from => {
                    crate::replicate::entering(self, from, tenant, epoch).await
                }
                _ => NodeResponse::Refused("only a node entering a replica set may ask".into()),
            },
            other => {
                NodeResponse::Refused(format!("{:?} may not send {}", peer.role, kind(&other)))
            }
        }
    }

    /// Runs an SQ request for a tenant this node owns, after checking the key hash again.
    async fn sq(
        &self,
        tenant: &str,
        key_hash: &str,
        _epoch: u64,
        request: SqRequest,
    ) -> Result<SqResponse, ApiError> {
        match self.sq_answer(tenant, key_hash, request, false).await? {
            Answered::Whole(r) => Ok(r),
            Answered::Stream { .. } => {
                Err(ApiError::Internal("a streamed answer was not asked for".into()))
            }
        }
    }

    /// [`Service::sq`]; with `stream`, a `get`, `toc`, `query` or `json-export` whose answer is
    /// larger than [`proto::ops::ANSWER_BYTES_MAX`] is answered as a stream: its length, and a
    /// body made from the document's file as it is read in ranges ([`answer_body`]).
    async fn sq_answer(
        &self,
        tenant: &str,
        key_hash: &str,
        request: SqRequest,
        stream: bool,
    ) -> Result<Answered, ApiError> {
        self.wait_to_know(tenant, key_hash).await;
        // Held until the answer, so a handoff of this tenant waits for this request to finish.
        let _gate = self.handoffs.enter(tenant).await;
        let state = self.registry.state();
        let record = state.tenant(tenant).ok_or(ApiError::Unauthorized)?;
        if !record.key_hashes.iter().any(|h| h == key_hash) {
            return Err(ApiError::Unauthorized);
        }
        if !record.enabled || record.archived {
            return Err(ApiError::Forbidden("tenant is disabled".into()));
        }
        // The primary serves: the owner, or the next node of the set while the owner is down.
        if state.primary_of(tenant) != Some(self.id) {
            return Err(ApiError::NotOwner { epoch: state.placement_epoch() });
        }
        if state.replicas() <= 1 && state.handoff(tenant).is_some() {
            return Err(ApiError::unavailable("the tenant is moving to this node"));
        }
        // A majority of the replica set, this node counting as one, holds every write before it
        // is answered (crate::replicate).
        let (backups, needed) = self.backups(&state, tenant);
        self.store.keep_tails(needed > 0);
        // A replicated tenant is read only under this node's lease: no other node can be its
        // primary meanwhile (crate::lease). Checked again once a read has run, and once a write
        // that changed nothing (and so answers from what it read, fenced by no backup) has
        // (`execute_replicated`). A write that logs a record needs no lease: the backups'
        // ballot check fences a deposed primary. A read waits a moment for a lease being won.
        if needed > 0
            && !request.is_write()
            && !self.leases.held_within(state.placement_epoch()).await
        {
            return Err(ApiError::unavailable("this node holds no lease to serve reads"));
        }
        let route = request.route();
        let started_us = self.clock.now_us();
        if let Err(e) = self.limits.admit(tenant, record.daily_limit) {
            let refused = Err(e);
            crate::metrics::request(&self.calls, self.store.number(tenant), route, &refused, 0);
            let outcome = crate::metrics::Outcome::of(&refused).as_str();
            tracing::debug!(target: "sq_node::meter", tenant, route = route.name(), outcome, bytes_in = 0u64, bytes_out = 0u64, latency_us = 0u64);
            return refused.map(Answered::Whole);
        }
        let bytes_in = request_bytes(&request);
        let replicated = Replicated { backups: &backups, needed, ballot: state.placement_epoch() };
        let result = match request {
            request if stream && OrderedRead::of(&request).is_some() => {
                let led = match replicated.needed {
                    0 => Ok(0),
                    _ => self.prepared(tenant, &replicated).await,
                };
                match led {
                    Ok(led) => match self.open_read(tenant, request).await {
                        Ok(answer) if replicated.needed > 0 => match self.leased(&replicated) {
                            Ok(()) => {
                                self.committed_seen(tenant, led, &replicated).await.map(|()| answer)
                            }
                            Err(e) => Err(e),
                        },
                        Ok(answer) => Ok(answer),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            request => self
                .execute_replicated(tenant, record.quota_bytes, request, &replicated)
                .await
                .map(Answered::Whole),
        };
        let bytes_out = match &result {
            Ok(Answered::Whole(r)) => r.body.len() as u64,
            Ok(Answered::Stream { len, .. }) => *len,
            Err(_) => 0,
        };
        self.limits.record(tenant, route.name(), bytes_in, bytes_out);
        let latency_us = self.clock.now_us().saturating_sub(started_us);
        let metered = match &result {
            Ok(_) => Ok(SqResponse::text(Vec::new())),
            Err(e) => Err(e.clone()),
        };
        crate::metrics::request(
            &self.calls,
            self.store.number(tenant),
            route,
            &metered,
            latency_us,
        );
        let outcome = crate::metrics::Outcome::of(&metered).as_str();
        tracing::debug!(target: "sq_node::meter", tenant, route = route.name(), outcome, bytes_in, bytes_out, latency_us);
        result
    }

    /// [`Self::execute`], answered once a majority of the replica set holds what it wrote or
    /// saw.
    async fn execute_replicated(
        &self,
        tenant: &str,
        quota: u64,
        request: SqRequest,
        replicated: &Replicated<'_>,
    ) -> Result<SqResponse, ApiError> {
        if replicated.needed == 0 {
            return self.execute(tenant, quota, request, None).await.0;
        }
        let led = self.prepared(tenant, replicated).await?;
        match self.execute(tenant, quota, request, Some(led)).await {
            (Ok(answer), Some(lsn)) => {
                let (backups, needed) = (replicated.backups, replicated.needed);
                self.replication.commit(tenant, lsn, led, backups, needed).await?;
                Ok(answer)
            }
            (Ok(answer), None) => {
                self.leased(replicated)?;
                self.committed_seen(tenant, led, replicated).await.map(|()| answer)
            }
            // A refusal read from this node's state (a full quota) is a read too: a deposed
            // primary's state may hold records no majority took.
            (Err(e), _) => {
                self.leased(replicated)?;
                Err(e)
            }
        }
    }

    /// A read's answer stands only if this node still held its lease, at the epoch the request
    /// was routed under, once it had read: no other primary can have written meanwhile.
    fn leased(&self, replicated: &Replicated<'_>) -> Result<(), ApiError> {
        if self.leases.holds(replicated.ballot) {
            Ok(())
        } else {
            Err(ApiError::unavailable("this node's lease lapsed while it read; ask again"))
        }
    }

    /// The ballot this node leads a replicated tenant under, after a prepare round if it has not
    /// led it under the request's ballot yet.
    async fn prepared(&self, tenant: &str, replicated: &Replicated<'_>) -> Result<u64, ApiError> {
        self.replication
            .prepare(tenant, replicated.ballot, replicated.backups, replicated.needed)
            .await
    }

    /// Waits until every record the tenant logged so far is on a majority of its replica set:
    /// a read answers nothing that a lost node could take back.
    async fn committed_seen(
        &self,
        tenant: &str,
        led: u64,
        replicated: &Replicated<'_>,
    ) -> Result<(), ApiError> {
        if replicated.needed == 0 {
            return Ok(());
        }
        let lsn = match self.store.durable_lsn_if_loaded(tenant) {
            Some(lsn) => lsn,
            // Unloaded since it read (eviction or a load at the cap can come between): its
            // log's end, once durable, is at or past every record the read saw, which may be
            // on no majority yet (the simulator's seed 2683 of `--replicas 3` showed a write
            // this way that a later primary did not have).
            None => {
                let (store, owned) = (self.store.clone(), tenant.to_string());
                crate::blocking::spawn(move || store.durable_state(&owned))
                    .await
                    .map_err(|e| ApiError::unavailable(format!("store task failed: {e}")))??
                    .last_lsn
            }
        };
        let (backups, needed) = (replicated.backups, replicated.needed);
        self.replication.commit(tenant, lsn, led, backups, needed).await
    }

    /// Runs a request on the store: a select inline when it can, the rest on the blocking pool.
    /// With its answer, the record a write that logged one waited for.
    async fn execute(
        &self,
        tenant: &str,
        quota: u64,
        request: SqRequest,
        led: Option<u64>,
    ) -> (Result<SqResponse, ApiError>, Option<u64>) {
        match self.store.execute_now(tenant, &request) {
            // A select of a loaded tenant: a map lookup, answered here without a thread hop.
            Some(answered) => (answered.map_err(ApiError::from), None),
            None => {
                let (store, owned) = (self.store.clone(), tenant.to_string());
                // A write in two steps: logged, then durable (the simulator lets time pass
                // between them, as a disk does).
                crate::blocking::spawn_steps(move || {
                    match store.execute_begin_led(&owned, quota, &request, led) {
                        Begun::Done(result) => Step::Done((result.map_err(ApiError::from), None)),
                        Begun::Logged(logged) => Step::Then(Box::new(move || {
                            // A write that changed nothing answers from what it read: no record
                            // of its own to replicate, and a read's checks (`execute_replicated`).
                            let lsn = logged.changed().then(|| logged.lsn());
                            let result = store.execute_finish(logged);
                            (result.map_err(ApiError::from), lsn)
                        })),
                    }
                })
                .await
                .unwrap_or_else(|e| {
                    (Err(ApiError::Internal(format!("store task failed: {e}"))), None)
                })
            }
        }
    }

    /// A read that streams when its answer is larger than [`proto::ops::ANSWER_BYTES_MAX`].
    async fn open_read(&self, tenant: &str, request: SqRequest) -> Result<Answered, ApiError> {
        let (store, owned) = (self.store.clone(), tenant.to_string());
        let opened = crate::blocking::spawn(move || {
            store.open_read(&owned, &request, proto::ops::ANSWER_BYTES_MAX)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?;
        match opened.map_err(ApiError::from)? {
            Opened::Whole(r) => Ok(Answered::Whole(r)),
            Opened::Stream { len, json, file } => {
                Ok(Answered::Stream { len, json, body: answer_body(len, file) })
            }
        }
    }

    /// Waits, at most [`CATCH_UP_WAIT`], until this node's registry knows `key_hash` for `tenant`.
    /// The gateway forwards only keys its view knows, so an unknown one here means this node is
    /// behind: a follower applies an entry up to a heartbeat after its leader answered the admin
    /// call that added the tenant or key. Returns at once in the usual case.
    async fn wait_to_know(&self, tenant: &str, key_hash: &str) {
        let mut rx = self.registry.subscribe();
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        loop {
            let knows = rx
                .borrow_and_update()
                .1
                .tenant(tenant)
                .is_some_and(|t| t.key_hashes.iter().any(|h| h == key_hash));
            if knows || !matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(())))
            {
                return;
            }
        }
    }

    /// Long-poll: true as soon as the registry has applied past `known_index`, or as soon as
    /// gossip changed a node's health since `poller` was last sent a view (health is no Raft
    /// entry, so it does not move the index); false when `wait_ms` passed without either.
    async fn view_wait(
        &self,
        poller: std::net::SocketAddr,
        known_index: u64,
        wait_ms: u64,
    ) -> bool {
        let mut rx = self.registry.subscribe();
        let mut health = self.health.generations();
        let wait = Duration::from_millis(wait_ms).min(VIEW_WAIT_MAX);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let applied = rx.borrow_and_update().0;
            let generation = *health.borrow_and_update();
            if applied > known_index
                || known_index == 0
                || self.view_peers.behind(poller, generation)
            {
                self.view_peers.sent(poller, generation);
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                () = self.stopping.cancelled() => return false,
                changed = rx.changed() => if changed.is_err() { return false },
                changed = health.changed() => if changed.is_err() { return false },
            }
        }
    }

    /// What a gateway holding the registry at `known_index` takes to be current: only the
    /// tenants changed since, or the whole view on first contact (`known_index` 0), after a
    /// placement change, or when this node's change log does not reach back to `known_index`.
    /// A node behind `known_index` answers its head alone (nodes, health, leader), which the
    /// gateway merges as an older view.
    pub fn view_update(&self, known_index: u64) -> ViewUpdate {
        if known_index == 0 {
            return self.whole_view();
        }
        let (applied, state) = self.registry.subscribe().borrow().clone();
        let status = self.registry.status();
        let head =
            crate::admin::registry_head(applied, &state, &self.health, status.leader, status.term);
        let mut delta = RegistryDelta { since: known_index, head, ..Default::default() };
        if applied <= known_index {
            return ViewUpdate::Delta(delta);
        }
        let Since::Tenants(ids) = self.registry.changes_since(known_index, applied) else {
            return self.whole_view();
        };
        for id in ids {
            match state.tenant(&id) {
                Some(t) => delta.changed.push(crate::admin::tenant_view(&state, t)),
                None => delta.removed.push(id),
            }
        }
        ViewUpdate::Delta(delta)
    }

    /// The whole registry for a gateway: in one message up to
    /// [`VIEW_TENANTS_PER_PART`] tenants, else its first part ([`ViewUpdate::FullFirst`]; the
    /// gateway asks for the rest by [`Service::view_page`]).
    fn whole_view(&self) -> ViewUpdate {
        let (applied, state) = self.registry.subscribe().borrow().clone();
        if state.tenant_count() as u64 <= VIEW_TENANTS_PER_PART {
            return ViewUpdate::Full(self.build_view());
        }
        let status = self.registry.status();
        let mut first =
            crate::admin::registry_head(applied, &state, &self.health, status.leader, status.term);
        first.tenants = state
            .tenants()
            .take(VIEW_TENANTS_PER_PART as usize)
            .map(|t| crate::admin::tenant_view(&state, t))
            .collect();
        ViewUpdate::FullFirst(first)
    }

    /// Up to `limit` tenants after `after`, in id order, as the registry is now
    /// ([`NodeRequest::ViewPage`]).
    fn view_page(&self, after: &str, limit: u64) -> NodeResponse {
        let state = self.registry.state();
        let limit = limit.clamp(1, VIEW_TENANTS_PER_PART) as usize;
        let mut rest = state.tenants_after(Some(after));
        let tenants =
            rest.by_ref().take(limit).map(|t| crate::admin::tenant_view(&state, t)).collect();
        NodeResponse::ViewPage { tenants, more: rest.next().is_some() }
    }

    /// The registry as gateways see it, rebuilt only when the applied index moved.
    pub fn build_view(&self) -> RegistryView {
        let (applied, state) = self.registry.subscribe().borrow().clone();
        let status = self.registry.status();
        let mut cache = self.view_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = cache.as_ref().filter(|v| {
            v.applied_index == applied
                && (v.leader, v.term) == (status.leader, status.term)
                && !self.health.changed_since_view()
        }) {
            return (**v).clone();
        }
        let view =
            crate::admin::registry_view(applied, &state, &self.health, status.leader, status.term);
        *cache = Some(Arc::new(view.clone()));
        view
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

    /// The other members of the tenant's replica set, and how many of them must hold a write
    /// beside this node ([`crate::replicate::backups`]).
    pub fn backups(&self, state: &raft_registry::RegistryState, tenant: &str) -> (Vec<u64>, usize) {
        crate::replicate::backups(state, tenant, self.id)
    }

    /// Waits, at most `wait`, until this node's registry has applied placement epoch `epoch`.
    pub async fn wait_for_epoch(&self, epoch: u64, wait: Duration) {
        let mut rx = self.registry.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        while rx.borrow_and_update().1.placement_epoch() < epoch {
            if !matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(()))) {
                return;
            }
        }
    }
}

/// The text a request carries, for metering.
fn request_bytes(r: &SqRequest) -> u64 {
    match r {
        SqRequest::Insert { text, .. }
        | SqRequest::Update { text, .. }
        | SqRequest::Where { text, .. } => text.len() as u64,
        SqRequest::Delta { manifest, .. } => {
            manifest.iter().map(|(_, h)| h.len() as u64 + 20).sum()
        }
        _ => 0,
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

/// What a request of a replicated tenant waits for: `needed` of its `backups` to hold its
/// records, written under `ballot`.
struct Replicated<'a> {
    backups: &'a [u64],
    needed: usize,
    ballot: u64,
}

/// What an SQ request ends in: a whole answer, or a streamed one's length and body.
enum Answered {
    Whole(SqResponse),
    Stream { len: u64, json: bool, body: transport::AnswerBody },
}

/// The largest body frame of a streamed answer: 1 MiB, far under the frame limit, so the frames
/// in flight cost a few MiB whatever the document's size.
pub const STREAM_CHUNK_BYTES: u64 = 1 << 20;

/// The body of a streamed read: the answer of `file`, made on the blocking pool a piece of about
/// [`STREAM_CHUNK_BYTES`] at a time, each only once the transport took the one before. A file
/// that cannot be read ends the body early (logged); the gateway sees fewer bytes than the `len`
/// announced and cuts its answer, so a client never takes a short body for a whole one.
fn answer_body(len: u64, file: Box<FileAnswer>) -> transport::AnswerBody {
    transport::body_unfold((file, 0u64), move |(mut file, sent)| async move {
        let made = crate::blocking::spawn(move || {
            let piece = file.next_piece(STREAM_CHUNK_BYTES as usize);
            (file, piece)
        })
        .await;
        match made {
            Ok((file, Ok(Some(piece)))) => {
                let sent = sent + piece.len() as u64;
                Some((Bytes::from(piece), (file, sent)))
            }
            Ok((_, Ok(None))) => {
                if sent != len {
                    tracing::warn!(sent, len, "streamed answer came out another length");
                }
                None
            }
            Ok((_, Err(e))) => {
                tracing::warn!(sent, len, error = %e, "making a streamed answer failed");
                None
            }
            Err(e) => {
                tracing::warn!(sent, len, error = %e, "streaming task failed");
                None
            }
        }
    })
}

/// `len` bytes of a file from `offset`, read from `reader` a chunk at a time on the blocking
/// pool, each only once the transport took the one before. A read that fails or comes short
/// ends the body early (logged); the receiver sees fewer bytes than announced.
pub(crate) fn file_body(
    reader: Box<dyn VfsReader>,
    offset: u64,
    len: u64,
) -> transport::AnswerBody {
    let end = offset.saturating_add(len);
    transport::body_unfold((reader, offset), move |(reader, offset)| async move {
        if offset >= end {
            return None;
        }
        let want = STREAM_CHUNK_BYTES.min(end - offset) as usize;
        let read = crate::blocking::spawn(move || {
            let piece = reader.read_at(offset, want);
            (reader, piece)
        })
        .await;
        match read {
            Ok((reader, Ok(piece))) if !piece.is_empty() => {
                let next = offset + piece.len() as u64;
                Some((Bytes::from(piece), (reader, next)))
            }
            Ok((_, Ok(_))) => {
                tracing::warn!(offset, end, "streamed file ended early");
                None
            }
            Ok((_, Err(e))) => {
                tracing::warn!(offset, end, error = %e, "reading a streamed file failed");
                None
            }
            Err(e) => {
                tracing::warn!(offset, end, error = %e, "streaming task failed");
                None
            }
        }
    })
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
