//! What every actor of a run shares: the cluster, the gateways, the expected state, the tenants'
//! keys, and the way requests are sent through a gateway and their answers classified.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use gateway::Gateway;
use proto::request::Method;
use proto::{ApiError, SqResponse};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::model::{Model, Outcome};
use crate::monitor::Monitor;
use crate::rng::Rng;
use crate::trace::Trace;

/// How long a client waits for one request before giving up on its answer: the gateway's
/// forward timeout, a view refresh and the retry it allows, with room to spare.
pub const CLIENT_OP_TIMEOUT: Duration = Duration::from_secs(6);

/// How long an admin operation may take: a join waits for a learner to catch up.
pub const ADMIN_OP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long after its issue a request whose answer never came can still take effect: the
/// client's timeout, the longest delay of its last copy, and the time a node may hold a request
/// before running it (behind a handoff's drain, on a slow disk).
pub const WRITE_HORIZON_MS: u64 =
    CLIENT_OP_TIMEOUT.as_millis() as u64 + 2 * crate::net::DELAY_MS_MAX + 5_000;

/// A tenant's keys as the clients know them.
#[derive(Debug, Clone, Default)]
pub struct TenantKeys {
    /// The key of the last acknowledged rotation (or creation).
    pub current: String,
    /// Keys of rotations whose answer was lost: one of them may be the real key now.
    pub maybe: Vec<String>,
}

/// Counts for the run's summary and its census.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub reads_ok: u64,
    pub writes_acked: u64,
    pub writes_refused: u64,
    pub writes_unknown: u64,
    pub reads_failed: u64,
    pub admin_ok: u64,
    pub admin_failed: u64,
    pub faults: u64,
    /// Faults by kind: partitions (both ways or one way), process crashes, frozen processes, full
    /// or slow disks.
    pub partitions: u64,
    pub crashes: u64,
    /// Node processes frozen (stopped, then resumed with everything sent meanwhile late).
    pub freezes: u64,
    pub disk_faults: u64,
    /// Nodes whose tenant store was lost with the machine (with R >= 3 only, one per run).
    pub disk_losses: u64,
    /// Registry entries that changed a node's membership state while the faults ran.
    pub membership_changes: u64,
    /// Handoffs that finished while the faults ran.
    pub handoffs_done: u64,
    /// Requests sent with a revoked key, or a disabled, archived or purged tenant's key, and
    /// how many of them were refused (401 or 403).
    pub revoked_requests: u64,
    pub revoked_refused: u64,
    /// Writes aimed at the quota's edge: one byte under, exactly on it, one byte over.
    pub boundary_writes: u64,
    /// Refusals checked against the model: 507s and 429s.
    pub quota_refusals: u64,
    pub rate_refusals: u64,
}

/// A key that should no longer get data: its tenant's key was rotated away from it (or its
/// tenant was archived or purged) in an acknowledged admin operation.
#[derive(Debug, Clone)]
pub struct Revoked {
    pub tenant: String,
    pub key: String,
    pub why: &'static str,
}

pub struct World {
    pub trace: Arc<Trace>,
    pub monitor: Arc<Monitor>,
    pub cluster: Arc<Cluster>,
    pub gateways: Vec<Arc<Gateway>>,
    pub admin_key_hash: String,
    model: Mutex<Model>,
    keys: Mutex<BTreeMap<String, TenantKeys>>,
    stats: Mutex<Stats>,
    /// A gateway whose view lags: a copy of gateway 0's view frozen just before a key or a
    /// tenant is revoked. Through it, revoked keys reach the nodes, which must refuse them.
    stale: Mutex<Option<Arc<Gateway>>>,
    stale_client: Arc<dyn gateway::forward::NodeClient>,
    revoked: Mutex<Vec<Revoked>>,
    /// Tenants an acknowledged operation disabled (and none re-enabled since).
    disabled: Mutex<std::collections::BTreeSet<String>>,
    /// The quota each tenant was last given in an acknowledged operation, in bytes.
    quota_now: Mutex<BTreeMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh tenant key, drawn from the run's generator.
pub fn new_key(rng: &mut Rng) -> String {
    format!("pmb-v1-{:016x}{:016x}", rng.next_u64(), rng.next_u64())
}

impl World {
    pub fn new(
        trace: Arc<Trace>,
        monitor: Arc<Monitor>,
        cluster: Arc<Cluster>,
        gateways: Vec<Arc<Gateway>>,
        stale_client: Arc<dyn gateway::forward::NodeClient>,
        admin_key_hash: String,
    ) -> World {
        World {
            trace,
            monitor,
            cluster,
            gateways,
            admin_key_hash,
            model: Mutex::new(Model::default()),
            keys: Mutex::new(BTreeMap::new()),
            stats: Mutex::new(Stats::default()),
            stale: Mutex::new(None),
            stale_client,
            revoked: Mutex::new(Vec::new()),
            disabled: Mutex::new(Default::default()),
            quota_now: Mutex::new(BTreeMap::new()),
        }
    }

    /// Freezes a copy of gateway 0's view in the lagging gateway.
    pub fn freeze_stale_view(&self) {
        let first = &self.gateways[0];
        let gw = Arc::new(Gateway {
            views: gateway::view::ViewHandle::default(),
            client: self.stale_client.clone(),
            seeds: first.seeds.clone(),
        });
        gw.views.replace(first.views.current().view.clone());
        *lock(&self.stale) = Some(gw);
    }

    /// The lagging gateway, once a view was frozen in it.
    pub fn stale_gateway(&self) -> Option<Arc<Gateway>> {
        lock(&self.stale).clone()
    }

    pub fn revoke(&self, tenant: &str, key: String, why: &'static str) {
        self.trace.event(format!("{tenant}: a key is {why}"));
        lock(&self.revoked).push(Revoked { tenant: tenant.to_string(), key, why });
    }

    pub fn revoked(&self) -> Vec<Revoked> {
        lock(&self.revoked).clone()
    }

    pub fn set_disabled(&self, tenant: &str, disabled: bool) {
        let mut set = lock(&self.disabled);
        if disabled {
            set.insert(tenant.to_string());
        } else {
            set.remove(tenant);
        }
    }

    pub fn disabled(&self) -> Vec<String> {
        lock(&self.disabled).iter().cloned().collect()
    }

    pub fn set_quota_now(&self, tenant: &str, quota_bytes: u64) {
        lock(&self.quota_now).insert(tenant.to_string(), quota_bytes);
    }

    pub fn quota_now(&self, tenant: &str) -> Option<u64> {
        lock(&self.quota_now).get(tenant).copied()
    }

    pub fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.model)
    }

    pub fn keys(&self) -> MutexGuard<'_, BTreeMap<String, TenantKeys>> {
        lock(&self.keys)
    }

    pub fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    pub fn now_ms(&self) -> u64 {
        self.trace.now_ms()
    }

    /// The key a client uses now: the current one, or sometimes one a lost rotation may have set.
    pub fn key_for(&self, tenant: &str, rng: &mut Rng) -> Option<String> {
        let keys = self.keys();
        let k = keys.get(tenant)?;
        if !k.maybe.is_empty() && rng.chance(500) {
            return Some(rng.pick(&k.maybe).clone());
        }
        Some(k.current.clone())
    }

    /// The freshest registry state among the running nodes (a removed node's stops moving).
    pub fn registry_state(&self) -> Option<Arc<raft_registry::RegistryState>> {
        let parts = self.cluster.ids().into_iter().filter_map(|id| self.cluster.parts(id));
        parts
            .map(|p| p.registry.subscribe().borrow().clone())
            .max_by_key(|(applied, _)| *applied)
            .map(|(_, state)| state)
    }

    /// Gateway `gw` of the run's gateways, wrapping.
    pub fn gateway(&self, gw: usize) -> &Arc<Gateway> {
        &self.gateways[gw % self.gateways.len()]
    }

    /// Sends one SQ request with `key` through `gw` (one of [`World::gateway`], or the lagging
    /// one), within the client's timeout (a timeout answers `Unavailable`).
    pub async fn sq(
        &self,
        gw: &Arc<Gateway>,
        key: &str,
        method: Method,
        route: &str,
        query: &str,
        body: &[u8],
    ) -> Result<SqResponse, ApiError> {
        let caller = gateway::api::authenticate(gw, key)?;
        self.model().sent(&caller.tenant, body.len() as u64);
        let call = gateway::api::serve(gw, &caller, method, route, query, body);
        match tokio::time::timeout(CLIENT_OP_TIMEOUT, call).await {
            Ok(answer) => answer,
            Err(_) => Err(ApiError::unavailable("simulated client gave up waiting")),
        }
    }
}

/// What an SQ error says about whether the write took effect. Refusals that come before the
/// store runs (key, ownership, limits, quota, bad input) are definite; the rest may hide a write
/// that happened (a lost answer, a disk error after the log append).
pub fn write_outcome(result: &Result<SqResponse, ApiError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Acked,
        Err(
            ApiError::BadRequest(_)
            | ApiError::Unauthorized
            | ApiError::BadPhextName
            | ApiError::Forbidden(_)
            | ApiError::NotFound
            | ApiError::Missing(_)
            | ApiError::PayloadTooLarge { .. }
            | ApiError::AnswerTooLarge { .. }
            | ApiError::RateLimited { .. }
            | ApiError::QuotaExceeded { .. }
            | ApiError::NotOwner { .. }
            | ApiError::Conflict(_)
            | ApiError::RequestTimeout { .. },
        ) => Outcome::NotApplied,
        Err(ApiError::Unavailable { .. } | ApiError::Internal(_)) => Outcome::Unknown,
    }
}

/// Sleeps for `pause` unless `stop` comes first. False once `stop` is cancelled: both may be
/// ready at once and `select!` picks either, so the token is looked at again after the sleep.
pub async fn pause_unless_stopped(stop: &CancellationToken, pause: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => return false,
        _ = tokio::time::sleep(pause) => {}
    }
    !stop.is_cancelled()
}
