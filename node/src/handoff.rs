//! Tenant handoff between nodes, when a placement change moves a tenant.
//!
//! The registry records a [`raft_registry::Handoff`] for every tenant whose owner changed with
//! the new placement epoch. From the moment a node applies that epoch:
//! - the old owner refuses the tenant (`NotOwner`), and answers the new owner's handoff requests;
//! - the new owner refuses it too (`Unavailable`, retry soon) until it holds the tenant's data.
//!
//! The new owner pulls: it asks the old owner for the tenant's file list, which the old owner
//! gives only after it has applied the epoch and every request it was running for the tenant has
//! finished ([`Gates`]); it copies the files with bounded parallelism and a bandwidth limit,
//! swaps them in, and commits `HandoffDone`. Only then does it serve the tenant. Either side may
//! crash at any point: the handoff stays recorded and is pulled again, and at no moment do two
//! nodes serve the tenant. The old owner deletes its copy only after the handoff is done and a
//! grace period ([`HandoffConfig::grace_s`]) has passed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::cluster::{HandoffFile, NodeRequest, NodeResponse};
use proto::ApiError;
use raft_registry::{Command, Handoff};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::service::{Service, PEER_CALL_TIMEOUT};
use crate::store::StoreError;

/// Shards of the serving gate; a handoff waits only for requests in its tenant's shard.
const GATE_SHARDS: usize = 64;

/// How long the old owner waits to apply the handoff's epoch before telling the new owner to
/// come back.
const EPOCH_WAIT: Duration = Duration::from_secs(5);

/// Pause before pulling a failed handoff again (the old owner may be restarting).
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How often the old owner looks for copies it may delete.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The longest the sweep goes without listing every local copy while the registry stands
/// still. A copy can land after the listing its epoch caused (a pull that finished late); a
/// copy already listed changes standing only with the registry.
const SWEEP_FULL_INTERVAL: Duration = Duration::from_secs(300);

/// Why a pull or a sweep failed. Each failure is logged and the work is tried again later, so
/// nothing here reaches a client; the variants say which side and which step failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The registry names a node address that does not parse.
    #[error("bad address {addr}: {source}")]
    Address { addr: String, source: std::net::AddrParseError },
    /// The registry does not know the old owner.
    #[error("node {0} is unknown")]
    UnknownNode(u64),
    /// A request could not be encoded or an answer decoded.
    #[error(transparent)]
    Wire(#[from] proto::wire::WireError),
    /// The old owner could not be reached, or its answer stopped.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// The old owner refused (the epoch not applied yet, no pending handoff, a read failed).
    #[error("{0}")]
    Refused(ApiError),
    /// The old owner answered something other than what was asked for.
    #[error("old owner answered {0:?}")]
    Unexpected(Box<NodeResponse>),
    /// The old owner's manifest is refused before anything is pulled.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A file came shorter than its manifest or announced stream said.
    #[error("{0} ended early on the old owner")]
    EndedEarly(String),
    /// A streamed file went on past the length its head announced.
    #[error("{0} came longer than announced")]
    LongerThanAnnounced(String),
    /// A piece of a file came longer than the part asked for.
    #[error("{0} came in a piece longer than asked")]
    PieceTooLong(String),
    /// The handoff was cancelled or replaced while its copy was staged; the copy was dropped.
    #[error("handoff of {tenant} in epoch {epoch} is no longer pending here; copy dropped")]
    NoLongerPending { tenant: String, epoch: u64 },
    /// Committing `HandoffDone` through the registry leader failed.
    #[error("{0}")]
    Commit(ApiError),
    /// The local store failed to stage, swap, list or delete a copy.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store's blocking task panicked or was cancelled.
    #[error(transparent)]
    Blocking(#[from] tokio::task::JoinError),
}

/// Why an old owner's manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest names {0:?}, not a tenant file")]
    NotTenantFile(String),
    #[error("manifest names {0:?} twice")]
    ListedTwice(String),
    #[error("manifest lengths add up past 2^64 bytes")]
    TooLong,
}

/// Handoff settings, in `[handoff]` of node.toml.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoffConfig {
    /// Tenants pulled at once by a new owner. Default 16: a pull mostly waits on round trips.
    pub parallelism: usize,
    /// Bytes per second a new owner pulls, over all its handoffs. Default 64 MiB/s.
    pub bandwidth_bytes_per_s: u64,
    /// Bytes of a file an old owner sends whole, in one answer; a longer transfer streams on one
    /// QUIC stream in 1 MiB frames, and a peer that answers whole only is asked a chunk at a
    /// time. Default 4 MiB: well under the transport's frame limit.
    pub chunk_bytes: u64,
    /// Seconds the old owner keeps its copy after the handoff is done. Default 600.
    pub grace_s: u64,
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            parallelism: 16,
            bandwidth_bytes_per_s: 64 << 20,
            chunk_bytes: 4 << 20,
            grace_s: 600,
        }
    }
}

/// Progress of one incoming tenant, for health pages.
pub use proto::admin::HandoffProgress as Progress;

/// Per-node handoff state: serving gates, incoming progress, copies awaiting deletion.
pub struct Handoffs {
    pub config: HandoffConfig,
    gates: Vec<Arc<RwLock<()>>>,
    pub incoming: Mutex<BTreeMap<String, Progress>>,
    /// Signalled when a pull task ends, so the puller looks again: a newer handoff of the same
    /// tenant, seen while the old task was still listed, would otherwise wait for the next
    /// registry change.
    finished: Notify,
    /// When each no-longer-owned local copy was first seen, on the monotonic clock: a calendar
    /// jump must not cut the grace period short.
    retired: Mutex<HashMap<String, tokio::time::Instant>>,
    /// The registry's last applied entry when the sweep last listed every local copy and left
    /// none waiting out its grace period, and when that was. Until the registry applies
    /// another entry (or [`SWEEP_FULL_INTERVAL`] passes), listing them again would find
    /// nothing new, so a node with many idle tenants does not read its tenants directory and
    /// place every tenant every few seconds.
    swept: Mutex<Option<(Option<u64>, tokio::time::Instant)>>,
    bandwidth: Mutex<(u64, f64)>,
    /// Held while a copy of a tenant is staged here (a handoff's pull, a replica's snapshot):
    /// the staging directory is one per tenant, so two copies at once would mix their files.
    staging: Vec<Arc<tokio::sync::Mutex<()>>>,
    /// Bytes of snapshots this node took and installed since it started (a rebuild's progress
    /// is the growth of this count).
    snapshot_bytes: std::sync::atomic::AtomicU64,
}

impl Handoffs {
    pub fn new(config: HandoffConfig) -> Handoffs {
        Handoffs {
            config,
            gates: (0..GATE_SHARDS).map(|_| Arc::new(RwLock::new(()))).collect(),
            incoming: Mutex::new(BTreeMap::new()),
            finished: Notify::new(),
            retired: Mutex::new(HashMap::new()),
            swept: Mutex::new(None),
            bandwidth: Mutex::new((0, 0.0)),
            snapshot_bytes: std::sync::atomic::AtomicU64::new(0),
            staging: (0..GATE_SHARDS).map(|_| Arc::new(tokio::sync::Mutex::new(()))).collect(),
        }
    }

    /// A snapshot of `bytes` was taken and installed here.
    pub(crate) fn snapshot_taken(&self, bytes: u64) {
        self.snapshot_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::snapshot_taken(bytes);
    }

    /// Bytes of snapshots taken and installed here since the node started.
    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until no other copy of `tenant` (or of its shard) is being staged here, and keeps
    /// others out until dropped.
    pub(crate) async fn staging(&self, tenant: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let shard = xxhash_rust::xxh3::xxh3_64(tenant.as_bytes()) as usize % GATE_SHARDS;
        self.staging[shard].clone().lock_owned().await
    }

    fn gate(&self, tenant: &str) -> Arc<RwLock<()>> {
        let shard = xxhash_rust::xxh3::xxh3_64(tenant.as_bytes()) as usize % GATE_SHARDS;
        self.gates[shard].clone()
    }

    /// Held by a request from its ownership check to its answer.
    pub async fn enter(&self, tenant: &str) -> OwnedRwLockReadGuard<()> {
        self.gate(tenant).read_owned().await
    }

    /// Waits until no request that passed its ownership check for `tenant` is still running.
    async fn drain(&self, tenant: &str) {
        drop(self.exclusive(tenant).await);
    }

    /// Keeps every request for `tenant` (and its gate shard) out until dropped.
    async fn exclusive(&self, tenant: &str) -> OwnedRwLockWriteGuard<()> {
        self.gate(tenant).write_owned().await
    }

    pub(crate) fn progress(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Progress>> {
        self.incoming.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits as long as the bandwidth limit asks before `bytes` more may be pulled.
    pub(crate) async fn pace(&self, bytes: u64, now_ms: u64) {
        let rate = self.config.bandwidth_bytes_per_s.max(1) as f64;
        let wait_s = {
            let mut b = self.bandwidth.lock().unwrap_or_else(|p| p.into_inner());
            // `b.1` is the debt in seconds, drained by the time since `b.0`.
            let elapsed = now_ms.saturating_sub(b.0) as f64 / 1000.0;
            b.1 = (b.1 - elapsed).max(0.0) + bytes as f64 / rate;
            b.0 = now_ms;
            b.1
        };
        if wait_s > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(wait_s)).await;
        }
    }
}

/// Old owner: the tenant's file list, once this node has applied `epoch` and no longer runs any
/// request for the tenant.
pub async fn manifest(
    svc: &Service,
    tenant: &str,
    epoch: u64,
) -> Result<Vec<HandoffFile>, ApiError> {
    let mut rx = svc.registry.subscribe();
    let reached = tokio::time::timeout(EPOCH_WAIT, async {
        while rx.borrow_and_update().1.placement_epoch() < epoch {
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let state = svc.registry.state();
    if reached.is_err() || state.placement_epoch() < epoch {
        return Err(ApiError::unavailable(format!("epoch {epoch} not applied yet")));
    }
    if state.owner_of(tenant) == Some(svc.id) {
        return Err(ApiError::Conflict(format!(
            "node {} owns {tenant}; nothing to hand off",
            svc.id
        )));
    }
    // Once the handoff is done this node may delete its copy; an empty list then would hand the
    // new owner an empty tenant. Only a pending handoff of this epoch gets an answer.
    if state.handoff(tenant).is_none_or(|h| h.epoch != epoch || h.from != svc.id) {
        return Err(ApiError::Conflict(format!(
            "no pending handoff of {tenant} from node {} in epoch {epoch}",
            svc.id
        )));
    }
    svc.handoffs.drain(tenant).await;
    svc.limits.persist();
    // The roll-up leaves with the data; if the tenant returns today, its file is the truth.
    svc.limits.forget(tenant);
    let (store, t) = (svc.store.clone(), tenant.to_string());
    crate::blocking::spawn(move || store.handoff_manifest(&t))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

/// Old owner: a chunk of one file of a tenant this node no longer owns, at most one configured
/// chunk ([`HandoffConfig::chunk_bytes`]) whatever the asking node names. For peers that take
/// whole answers only; others get [`read_answer`].
pub async fn read(
    svc: &Service,
    tenant: &str,
    path: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, ApiError> {
    if svc.registry.state().owner_of(tenant) == Some(svc.id) {
        return Err(ApiError::Conflict(format!("node {} owns {tenant}", svc.id)));
    }
    let len = len.min(svc.handoffs.config.chunk_bytes.max(1));
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let (store, t, p) = (svc.store.clone(), tenant.to_string(), path.to_string());
    crate::blocking::spawn(move || store.handoff_read(&t, &p, offset, len))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

/// Old owner: up to `len` bytes of one file from `offset` on one stream. Up to a configured
/// chunk they travel whole ([`NodeResponse::HandoffChunk`]); past it, as a head naming the
/// length that follows ([`NodeResponse::HandoffStreamed`], at most to the file's end) and body
/// frames read from the file in ranges, each only once the transport took the one before, so a
/// file of any size costs a frame or two of memory on both sides.
pub async fn read_answer(
    svc: &Service,
    tenant: &str,
    path: &str,
    offset: u64,
    len: u64,
) -> (NodeResponse, Option<transport::AnswerBody>) {
    if len <= svc.handoffs.config.chunk_bytes.max(1) {
        let chunk = read(svc, tenant, path, offset, len).await.map(proto::cluster::Chunk);
        return (NodeResponse::HandoffChunk(chunk), None);
    }
    if svc.registry.state().owner_of(tenant) == Some(svc.id) {
        let owned = ApiError::Conflict(format!("node {} owns {tenant}", svc.id));
        return (NodeResponse::HandoffChunk(Err(owned)), None);
    }
    let (store, t, p) = (svc.store.clone(), tenant.to_string(), path.to_string());
    let opened = crate::blocking::spawn(move || store.handoff_open(&t, &p))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
        .and_then(|r| r.map_err(ApiError::from));
    match opened {
        Ok(reader) => {
            let len = len.min(reader.file_len().saturating_sub(offset));
            let body = crate::service::file_body(reader, offset, len);
            (NodeResponse::HandoffStreamed { len }, Some(body))
        }
        Err(e) => (NodeResponse::HandoffChunk(Err(e)), None),
    }
}

fn parse_addr(addr: &str) -> Result<std::net::SocketAddr, HandoffError> {
    addr.parse().map_err(|source| HandoffError::Address { addr: addr.to_string(), source })
}

async fn call(
    svc: &Service,
    addr: &str,
    request: NodeRequest,
) -> Result<NodeResponse, HandoffError> {
    let addr = parse_addr(addr)?;
    let bytes = proto::wire::encode(&request)?;
    let answer = svc.peers.call(addr, bytes.into(), PEER_CALL_TIMEOUT).await?;
    Ok(proto::wire::decode(&answer)?)
}

/// Commits a registry command from this node, through the leader if this node is a follower
/// (the one way to do so, [`crate::admin::commit`]).
pub async fn commit(svc: &Service, command: Command) -> Result<(), HandoffError> {
    crate::admin::commit(svc, command).await.map_err(HandoffError::Commit)
}

/// New owner: copies one tenant from its old owner and commits the handoff.
async fn pull(svc: &Service, h: &Handoff) -> Result<(), HandoffError> {
    // A copy received in this handoff's epoch is already here (an earlier attempt swapped it in,
    // then its commit failed or this node restarted): it may hold writes newer than the old
    // owner's copy, so it is kept and only the commit is repeated.
    let t = h.tenant.clone();
    if on_store(svc, move |s| s.received_epoch(&t)).await? >= h.epoch {
        return commit(svc, Command::HandoffDone { tenant: h.tenant.clone(), epoch: h.epoch })
            .await;
    }
    let _one_copy = svc.handoffs.staging(&h.tenant).await;
    let state = svc.registry.state();
    let from = state.node(h.from).ok_or(HandoffError::UnknownNode(h.from))?.addr.clone();
    let files = match call(
        svc,
        &from,
        NodeRequest::HandoffManifest { tenant: h.tenant.clone(), epoch: h.epoch },
    )
    .await?
    {
        NodeResponse::HandoffManifest(r) => r.map_err(HandoffError::Refused)?,
        other => return Err(HandoffError::Unexpected(Box::new(other))),
    };
    let bytes_total = check_manifest(&files)?;
    if let Some(p) = svc.handoffs.progress().get_mut(&h.tenant) {
        p.files = files.len() as u64;
        p.bytes_total = bytes_total;
    }
    let t = h.tenant.clone();
    on_store(svc, move |s| s.stage_begin(&t)).await?;
    let addr = parse_addr(&from)?;
    for file in &files {
        let read = |offset, len| NodeRequest::HandoffRead {
            tenant: h.tenant.clone(),
            path: file.path.clone(),
            offset,
            len,
        };
        fetch(&svc.copier(), addr, &h.tenant, file, read).await?;
        let (t, f) = (h.tenant.clone(), file.clone());
        on_store(svc, move |s| s.stage_file_finish(&t, &f)).await?;
    }
    swap_in(svc, h).await?;
    commit(svc, Command::HandoffDone { tenant: h.tenant.clone(), epoch: h.epoch }).await
}

/// New owner: swaps the staged copy in, if and only if this node's registry still shows `h`
/// pending, with every request for the tenant kept out meanwhile. Once this node has applied
/// `HandoffDone` (committed by an earlier attempt whose answer was lost), it serves the tenant
/// and may hold acknowledged writes newer than the old owner's copy: swapping that copy in would
/// lose them. Requests check the pending handoff under the same gate, so none can slip between
/// this check and the swap.
async fn swap_in(svc: &Service, h: &Handoff) -> Result<(), HandoffError> {
    let (t, epoch) = (h.tenant.clone(), h.epoch);
    on_store(svc, move |s| s.stage_received_epoch(&t, epoch)).await?;
    let _no_requests = svc.handoffs.exclusive(&h.tenant).await;
    let t = h.tenant.clone();
    if svc.registry.state().handoff(&h.tenant) != Some(h) {
        on_store(svc, move |s| s.stage_abort(&t)).await?;
        return Err(HandoffError::NoLongerPending { tenant: h.tenant.clone(), epoch: h.epoch });
    }
    on_store(svc, move |s| s.stage_commit(&t)).await?;
    // The roll-up arrived with the data; one kept from an earlier stay here is stale.
    svc.limits.forget(&h.tenant);
    Ok(())
}

/// Runs `f` on the store where blocking work belongs.
async fn on_store<R: Send + 'static>(
    svc: &Service,
    f: impl FnOnce(&crate::store::Store) -> Result<R, StoreError> + Send + 'static,
) -> Result<R, HandoffError> {
    let store = svc.store.clone();
    Ok(crate::blocking::spawn(move || f(&store)).await??)
}

/// Checks a manifest from an old owner before anything is pulled: every path a file of a
/// tenant's directory, none twice, and a total length that fits a u64. Returns that total.
pub fn check_manifest(files: &[HandoffFile]) -> Result<u64, ManifestError> {
    let mut seen = std::collections::HashSet::with_capacity(files.len());
    let mut total = 0u64;
    for f in files {
        if !crate::store::is_tenant_file_path(&f.path) {
            return Err(ManifestError::NotTenantFile(f.path.clone()));
        }
        if !seen.insert(f.path.as_str()) {
            return Err(ManifestError::ListedTwice(f.path.clone()));
        }
        total = total.checked_add(f.len).ok_or(ManifestError::TooLong)?;
    }
    Ok(total)
}

/// What copying a tenant's files from another node takes: the peers to ask, the store that
/// stages what arrives, and the handoff state whose bandwidth limit paces it and whose progress
/// map shows it (a handoff's pull and a replica's snapshot share both).
pub(crate) struct Copier<'a> {
    pub peers: &'a dyn transport::Caller,
    pub store: &'a Arc<crate::store::Store>,
    pub handoffs: &'a Handoffs,
    pub clock: &'a dyn crate::store::Clock,
}

impl Service {
    pub(crate) fn copier(&self) -> Copier<'_> {
        Copier {
            peers: self.peers.as_ref(),
            store: &self.store,
            handoffs: &self.handoffs,
            clock: self.clock.as_ref(),
        }
    }
}

/// Copies one listed file into the staging directory, asking for all of what is still missing
/// at once: an old owner that streams sends it on one stream, one that answers whole sends a
/// chunk and is asked again for the rest. One frame or chunk is in memory at a time, whatever
/// length the old owner claims, and each is paced by the bandwidth limit before it is staged.
/// `read` makes the request for `len` bytes from `offset`.
pub(crate) async fn fetch(
    c: &Copier<'_>,
    addr: std::net::SocketAddr,
    tenant: &str,
    file: &HandoffFile,
    read: impl Fn(u64, u64) -> NodeRequest,
) -> Result<(), HandoffError> {
    let mut offset = 0u64;
    while offset < file.len {
        let want = file.len - offset;
        let bytes = proto::wire::encode(&read(offset, want))?;
        let (head, mut body) = c.peers.call_answer(addr, bytes.into(), PEER_CALL_TIMEOUT).await?;
        match proto::wire::decode(&head)? {
            NodeResponse::HandoffChunk(r) => {
                let part = r.map_err(HandoffError::Refused)?.0;
                offset += stage_part(c, tenant, file, offset, want, part).await?;
            }
            NodeResponse::HandoffStreamed { len } if len > 0 && len <= want => {
                let end = offset + len;
                while offset < end {
                    let part = body
                        .next(PEER_CALL_TIMEOUT)
                        .await?
                        .ok_or_else(|| HandoffError::EndedEarly(file.path.clone()))?;
                    offset +=
                        stage_part(c, tenant, file, offset, end - offset, part.into()).await?;
                }
                if body.next(PEER_CALL_TIMEOUT).await?.is_some() {
                    return Err(HandoffError::LongerThanAnnounced(file.path.clone()));
                }
            }
            other => return Err(HandoffError::Unexpected(Box::new(other))),
        }
    }
    Ok(())
}

/// Stages one received piece of `file` at `offset`, of at most `want` bytes, once the bandwidth
/// limit allows; returns its length.
async fn stage_part(
    c: &Copier<'_>,
    tenant: &str,
    file: &HandoffFile,
    offset: u64,
    want: u64,
    part: Vec<u8>,
) -> Result<u64, HandoffError> {
    if part.is_empty() {
        return Err(HandoffError::EndedEarly(file.path.clone()));
    }
    let got = part.len() as u64;
    if got > want {
        return Err(HandoffError::PieceTooLong(file.path.clone()));
    }
    c.handoffs.pace(got, c.clock.now_ms()).await;
    let (t, f, store) = (tenant.to_string(), file.clone(), c.store.clone());
    crate::blocking::spawn(move || store.stage_file_part(&t, &f, offset, &part)).await??;
    if let Some(p) = c.handoffs.progress().get_mut(tenant) {
        p.bytes_done += got;
    }
    Ok(got)
}

/// New owner: pulls every handoff addressed to this node, a bounded number at a time. Each pull
/// is a task of its own; at shutdown they see the token, stop between files, and are joined here
/// before this returns, so the node's ordered stop (registry, then store) never races a pull.
pub async fn run_puller(svc: Arc<Service>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(svc.handoffs.config.parallelism.max(1)));
    let mut rx = svc.registry.subscribe();
    let mut pulls = tokio::task::JoinSet::new();
    // With R > 1: the changes of replica sets this node enters, each followed by one task.
    let mut entering = std::collections::BTreeSet::new();
    let mut enters = tokio::task::JoinSet::new();
    loop {
        let state = rx.borrow_and_update().1.clone();
        for h in state.handoffs().filter(|h| h.to == svc.id) {
            if state.replicas() > 1 {
                if entering.insert(h.tenant.clone()) {
                    let (h, permits) = (h.clone(), permits.clone());
                    let task = enter_until_done(svc.clone(), h, permits, shutdown.clone());
                    enters.spawn(task);
                }
                continue;
            }
            let fresh = {
                let mut incoming = svc.handoffs.progress();
                let new = !incoming.contains_key(&h.tenant);
                if new {
                    incoming.insert(
                        h.tenant.clone(),
                        Progress { from: h.from, epoch: h.epoch, ..Default::default() },
                    );
                }
                new
            };
            if fresh {
                pulls.spawn(pull_until_done(
                    svc.clone(),
                    h.clone(),
                    permits.clone(),
                    shutdown.clone(),
                ));
            }
        }
        // Reap finished pulls so the set holds only those still running.
        while pulls.try_join_next().is_some() {}
        while let Some(done) = enters.try_join_next() {
            if let Ok(tenant) = done {
                entering.remove(&tenant);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = rx.changed() => if changed.is_err() { break },
            _ = svc.handoffs.finished.notified() => {}
        }
    }
    while pulls.join_next().await.is_some() {}
    while enters.join_next().await.is_some() {}
}

/// Returns once this node's registry no longer shows `h` pending (its `HandoffDone` applied),
/// or at shutdown.
async fn until_applied(svc: &Service, h: &Handoff, shutdown: &CancellationToken) {
    let mut rx = svc.registry.subscribe();
    while rx.borrow_and_update().1.handoff(&h.tenant) == Some(h) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// How often a node entering a tenant's replica set asks the tenant's primary again.
const ENTER_LOOK: Duration = Duration::from_secs(1);

/// With R > 1, this node enters the tenant's replica set (a join or a drain): it asks the
/// tenant's primary, every [`ENTER_LOOK`], to bring its copy up (the primary ships it the
/// records, or has it take a snapshot, as for any backup) until the primary answers that the
/// change may be committed; then commits `HandoffDone`, which takes the leaving node out of the
/// set. As many tenants ask at once as handoffs pull (`permits`). Returns the tenant once the
/// change is gone from this node's registry, or at shutdown.
async fn enter_until_done(
    svc: Arc<Service>,
    h: Handoff,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
) -> String {
    let started = svc.mono_ms();
    loop {
        let Ok(permit) = permits.acquire().await else { break };
        let state = svc.registry.state();
        if shutdown.is_cancelled() || state.handoff(&h.tenant).is_none_or(|p| *p != h) {
            break;
        }
        let asked = match state.primary_of(&h.tenant) {
            Some(primary) if primary != svc.id => {
                let request =
                    NodeRequest::Enter { from: svc.id, tenant: h.tenant.clone(), epoch: h.epoch };
                match state.node(primary).map(|n| n.addr.clone()) {
                    Some(addr) => call(&svc, &addr, request).await.map(|r| (primary, r)),
                    None => Err(HandoffError::UnknownNode(primary)),
                }
            }
            _ => Err(HandoffError::Refused(ApiError::unavailable("the tenant has no primary"))),
        };
        match asked {
            Ok((_, NodeResponse::Entered(Ok(true)))) => {
                let done = Command::HandoffDone { tenant: h.tenant.clone(), epoch: h.epoch };
                match commit(&svc, done).await {
                    Ok(()) => {
                        tracing::info!(
                            node = svc.id,
                            tenant = h.tenant,
                            leaving = h.from,
                            epoch = h.epoch,
                            ms = svc.mono_ms().saturating_sub(started),
                            "entered the tenant's replica set"
                        );
                        metrics::counter!("sq_handoffs_total").increment(1);
                        drop(permit);
                        // Until this node applies it: asking again before would be refused.
                        until_applied(&svc, &h, &shutdown).await;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(node = svc.id, tenant = h.tenant, error = %e, "committing a replica set change failed; asked again")
                    }
                }
            }
            Ok((_, NodeResponse::Entered(Ok(false)))) => {}
            Ok((primary, other)) => {
                tracing::debug!(node = svc.id, tenant = h.tenant, primary, answer = ?other, "the tenant's primary is not bringing this copy up yet")
            }
            Err(e) => {
                tracing::debug!(node = svc.id, tenant = h.tenant, error = %e, "asking the tenant's primary to bring this copy up failed")
            }
        }
        drop(permit);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(ENTER_LOOK) => {}
        }
    }
    h.tenant
}

async fn pull_until_done(
    svc: Arc<Service>,
    h: Handoff,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    loop {
        let Ok(_permit) = permits.acquire().await else { return };
        if shutdown.is_cancelled()
            || svc.registry.state().handoff(&h.tenant).is_none_or(|p| *p != h)
        {
            break;
        }
        let started = svc.mono_ms();
        match pull(&svc, &h).await {
            Ok(()) => {
                let ms = svc.mono_ms().saturating_sub(started);
                tracing::info!(
                    node = svc.id,
                    tenant = h.tenant,
                    from = h.from,
                    epoch = h.epoch,
                    ms,
                    "handoff done"
                );
                metrics::counter!("sq_handoffs_total").increment(1);
                // Stay listed until this node applies `HandoffDone`: the puller would otherwise
                // see the handoff still pending and pull the tenant again. The permit goes to
                // the next pull meanwhile.
                drop(_permit);
                until_applied(&svc, &h, &shutdown).await;
                break;
            }
            Err(e) => {
                tracing::warn!(node = svc.id, tenant = h.tenant, from = h.from, epoch = h.epoch, error = %e, "handoff failed; will retry");
                if let Some(p) = svc.handoffs.progress().get_mut(&h.tenant) {
                    p.attempts += 1;
                    p.bytes_done = 0;
                    p.last_error = Some(e.to_string());
                }
            }
        }
        drop(_permit);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RETRY_PAUSE) => {}
        }
    }
    svc.handoffs.progress().remove(&h.tenant);
    svc.handoffs.finished.notify_one();
}

/// Every [`SWEEP_INTERVAL`]: deletes snapshots no replica read for a while, every copy of purged
/// tenants, and (old owner) copies of tenants this node no longer owns, once no handoff needs
/// them and the grace period has passed since that was first seen. A copy counts as no longer owned only if this node's registry
/// state knows the tenant and is newer than the placement epoch in which the copy arrived here:
/// a state from before that (a restart from an old snapshot, a node cut off from the leader)
/// would otherwise make the live copy look like a leftover.
pub async fn run_sweeper(svc: Arc<Service>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        if let Err(e) = sweep(&svc).await {
            tracing::warn!(error = %e, "sweeping old tenant copies failed");
        }
    }
}

async fn sweep(svc: &Service) -> Result<(), HandoffError> {
    let forgotten = svc.replication.forget_idle();
    if forgotten > 0 {
        tracing::debug!(node = svc.id, forgotten, "forgot the replication state of idle tenants");
    }
    // Read before the state the listing is judged by, so an entry applied after it is seen as
    // a change at the next sweep.
    let applied = svc.registry.status().last_applied_index;
    let now = tokio::time::Instant::now();
    let last = *svc.handoffs.swept.lock().unwrap_or_else(|p| p.into_inner());
    let listing = listing_due(last, applied, now);
    let idle_ms = crate::catchup::SNAPSHOT_IDLE_MS;
    on_store(svc, move |s| s.drop_idle_snapshots(idle_ms, listing)).await?;
    if !listing {
        return Ok(());
    }
    let (held, local) = on_store(svc, |s| Ok((s.held_tenants()?, s.local_tenants()?))).await?;
    let state = svc.registry.state();
    let grace = Duration::from_secs(svc.handoffs.config.grace_s);
    for t in held.iter().filter(|t| state.is_purged(t)) {
        purge(svc, t).await?;
    }
    let mut stale = Vec::new();
    for t in local {
        if handed_off(svc, &state, &t).await? {
            stale.push(t);
        }
    }
    let mut due = Vec::new();
    let waiting;
    {
        let mut retired = svc.handoffs.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|t, _| stale.contains(t));
        for t in &stale {
            let since = *retired.entry(t.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= grace {
                due.push(t.clone());
            }
        }
        for t in &due {
            retired.remove(t);
        }
        // A copy waiting out its grace period is looked at again at the next sweep.
        waiting = !retired.is_empty();
    }
    for tenant in due {
        // Judged again as it is now, while no copy of the tenant is being staged here: a handoff
        // back to this node may have swapped a new copy in since the listing (the simulator's
        // seed 500243 saw a copy deleted just after it arrived).
        let _one_copy = svc.handoffs.staging(&tenant).await;
        if !handed_off(svc, &svc.registry.state(), &tenant).await? {
            continue;
        }
        let t = tenant.clone();
        on_store(svc, move |s| s.remove_tenant(&t)).await?;
        svc.limits.forget(&tenant);
        tracing::info!(
            node = svc.id,
            tenant,
            "deleted the copy of a tenant handed off to another node"
        );
    }
    *svc.handoffs.swept.lock().unwrap_or_else(|p| p.into_inner()) =
        (!waiting).then_some((applied, now));
    Ok(())
}

/// Whether this node's copy of `t` is one it handed off (no longer its own, nor a replica's, and
/// no handoff needs it), by a registry `state` newer than the epoch the copy arrived in.
async fn handed_off(
    svc: &Service,
    state: &raft_registry::RegistryState,
    t: &str,
) -> Result<bool, HandoffError> {
    if state.is_purged(t)
        || state.tenant(t).is_none()
        || state.owner_of(t) == Some(svc.id)
        // A copy this node holds as one of the tenant's replicas (R > 1) is no leftover.
        || state.replica_set(t).contains(&svc.id)
        || state.handoff(t).is_some()
    {
        return Ok(false);
    }
    let id = t.to_string();
    Ok(state.placement_epoch() > on_store(svc, move |s| s.received_epoch(&id)).await?)
}

/// Whether a sweep lists every local copy: unless the last listing (`last`: the registry's
/// applied entry then, and when) left none waiting out its grace period, the registry has
/// applied no entry since, and [`SWEEP_FULL_INTERVAL`] has not passed.
fn listing_due(
    last: Option<(Option<u64>, tokio::time::Instant)>,
    applied: Option<u64>,
    now: tokio::time::Instant,
) -> bool {
    !last.is_some_and(|(index, at)| {
        index == applied && now.saturating_duration_since(at) < SWEEP_FULL_INTERVAL
    })
}

/// Deletes every copy of a purged tenant this node holds at once (a purge is explicit; no grace
/// period), a half-received one too: the purge cancelled its handoff, so no pull will finish it.
/// The tenant's gate is held meanwhile, so a request that passed its checks before the purge
/// was applied finishes first, and a pull's swap (under the same gate) either came before or
/// finds its handoff gone; every later request finds no tenant.
async fn purge(svc: &Service, tenant: &str) -> Result<(), HandoffError> {
    let _closed = svc.handoffs.exclusive(tenant).await;
    let t = tenant.to_string();
    on_store(svc, move |s| s.remove_every_copy(&t)).await?;
    // Else a later persist would write its roll-up back into a new directory.
    svc.limits.forget(tenant);
    // A purged tenant's calls leave `sq_api_calls_total` with it.
    if let Some(number) = svc.store.number_of(tenant) {
        svc.calls.forget(number);
    }
    tracing::info!(node = svc.id, tenant, "deleted the data of a purged tenant");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the sweep lists the local copies the first time, after any registry entry, and
    // after the longest interval, and at no other sweep.
    #[test]
    fn the_sweep_lists_copies_only_when_something_could_have_changed() {
        let at = tokio::time::Instant::now();
        let later = |d: Duration| at + d;
        assert!(listing_due(None, Some(7), at), "never listed");
        let last = Some((Some(7), at));
        assert!(!listing_due(last, Some(7), later(SWEEP_INTERVAL)), "nothing changed");
        assert!(listing_due(last, Some(8), later(SWEEP_INTERVAL)), "an entry was applied");
        assert!(listing_due(Some((None, at)), Some(1), at), "the first entry was applied");
        assert!(listing_due(last, Some(7), later(SWEEP_FULL_INTERVAL)), "the interval passed");
    }
}
