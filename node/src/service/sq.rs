//! An SQ request on this node: the key checked again, the request run on the store, and, for a
//! replicated tenant, the prepare, lease and commit checks around it.

use std::time::Duration;

use proto::streamed::OrderedRead;
use proto::{ApiError, SqRequest, SqResponse};

use super::body::answer_body;
use super::Service;
use crate::blocking::Step;
use crate::store::{Begun, Opened};

/// How long a request waits for this node's registry to learn a tenant or key that the gateway's
/// view already has: several Raft heartbeats (250 ms), well under the gateway's forward timeout.
const CATCH_UP_WAIT: Duration = Duration::from_millis(1000);

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

/// What a request of a replicated tenant waits for: `needed` of its `backups` to hold its
/// records, written under `ballot`.
struct Replicated<'a> {
    backups: &'a [u64],
    needed: usize,
    ballot: u64,
}

/// What an SQ request ends in: a whole answer, or a streamed one's length and body.
pub(super) enum Answered {
    Whole(SqResponse),
    Stream { len: u64, json: bool, body: transport::AnswerBody },
}

impl Service {
    /// Runs an SQ request for a tenant this node owns, after checking the key hash again.
    pub(super) async fn sq(
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
    pub(super) async fn sq_answer(
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
        let (record, set) = self.serves(&state, tenant, key_hash)?;
        // A majority of the replica set, this node counting as one, holds every write before it
        // is answered (crate::replicate).
        let (backups, needed) = crate::replicate::backups(&set, self.id);
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
            self.count(tenant, route, &refused, (0, 0), 0);
            return refused.map(Answered::Whole);
        }
        let bytes_in = request_bytes(&request);
        let replicated = Replicated { backups: &backups, needed, ballot: state.placement_epoch() };
        let result = match request {
            request if stream && OrderedRead::of(&request).is_some() => {
                self.streamed_read(tenant, request, &replicated).await
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
        self.count(tenant, route, &metered, (bytes_in, bytes_out), latency_us);
        result
    }

    /// The tenant's record and replica set, once the key is one of its keys, the tenant is
    /// enabled and this node is its primary: the owner, or the next node of the set while the
    /// owner is down.
    fn serves<'s>(
        &self,
        state: &'s raft_registry::RegistryState,
        tenant: &str,
        key_hash: &str,
    ) -> Result<(&'s raft_registry::TenantRecord, Vec<u64>), ApiError> {
        let record = state.tenant(tenant).ok_or(ApiError::Unauthorized)?;
        if !record.key_hashes.iter().any(|h| h == key_hash) {
            return Err(ApiError::Unauthorized);
        }
        if !record.enabled || record.archived {
            return Err(ApiError::Forbidden("tenant is disabled".into()));
        }
        let set = state.replica_set(tenant);
        if state.primary_in(tenant, &set) != Some(self.id) {
            return Err(ApiError::NotOwner { epoch: state.placement_epoch() });
        }
        if state.replicas() <= 1 && state.handoff(tenant).is_some() {
            return Err(ApiError::unavailable("the tenant is moving to this node"));
        }
        Ok((record, set))
    }

    /// Counts a request in `sq_api_calls_total` and its latency, and logs its metering line.
    fn count(
        &self,
        tenant: &str,
        route: proto::route::Route,
        outcome: &Result<SqResponse, ApiError>,
        (bytes_in, bytes_out): (u64, u64),
        latency_us: u64,
    ) {
        crate::metrics::request(&self.calls, self.store.number(tenant), route, outcome, latency_us);
        let outcome = crate::metrics::Outcome::of(outcome).as_str();
        tracing::debug!(target: "sq_node::meter", tenant, route = route.name(), outcome, bytes_in, bytes_out, latency_us);
    }

    /// A read answered as a stream when it is large: for a replicated tenant, under the ballot
    /// this node leads it at, and only once this node still held its lease after the read and
    /// every record the read could see is on a majority.
    async fn streamed_read(
        &self,
        tenant: &str,
        request: SqRequest,
        replicated: &Replicated<'_>,
    ) -> Result<Answered, ApiError> {
        let led = match replicated.needed {
            0 => 0,
            _ => self.prepared(tenant, replicated).await?,
        };
        let answer = self.open_read(tenant, request).await?;
        if replicated.needed > 0 {
            self.leased(replicated)?;
            self.committed_seen(tenant, led, replicated).await?;
        }
        Ok(answer)
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
}
