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
//!
//! The parts: the old owner's side in `give`, the new owner's in `pull`, the deletion of
//! handed-off and purged copies in `sweep`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::cluster::{HandoffFile, NodeRequest, NodeResponse};
use proto::ApiError;
use raft_registry::Command;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::service::{Service, PEER_CALL_TIMEOUT};
use crate::store::StoreError;

mod give;
mod pull;
mod sweep;

pub use give::{manifest, read, read_answer};
pub use pull::run_puller;
pub(crate) use pull::{fetch, Copier};
pub use sweep::run_sweeper;

/// Shards of the serving gate; a handoff waits only for requests in its tenant's shard.
const GATE_SHARDS: usize = 64;

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
