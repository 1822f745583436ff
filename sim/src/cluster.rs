//! The simulated machines: each node process opened on its simulated disk, clocks and network
//! port through `node::NodeParts`, exactly as `node::run` opens it on real ones; crashed and
//! restarted by the fault schedule; watched by the monitor.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use node::handoff::HandoffConfig;
use node::{NodeConfig, NodeParts, Seams};
use raft_registry::RegistryConfig;
use tokio_util::sync::CancellationToken;

use crate::adapters::{RegistryDisk, StoreDisk};
use crate::clock::{Clocks, Mono, Wall};
use crate::disk::SimDisk;
use crate::monitor::{Invariant, Monitor, Violation};
use crate::net::{Endpoint, Net};
use crate::rng::Rng;
use crate::trace::Trace;

/// QUIC port every simulated node listens on.
const NODE_PORT: u16 = 7100;
/// Where each machine keeps its node's data.
pub const DATA_DIR: &str = "/data";
/// How often the monitor samples every node's Raft role and term.
const LEADER_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// Memory budget of each node's store, in MiB: small, so tenants are evicted and reloaded.
const STORE_MEMORY_MB: u64 = 4;
/// The most tenants each node's store keeps loaded: fewer than a run has (5 to 7), so loads at
/// the cap unload others first, in the middle of replication and handoffs.
const STORE_LOADED_TENANTS_MAX: usize = 3;
/// Idle time after which a tenant is unloaded, in seconds: short, so unloading happens.
const STORE_IDLE_UNLOAD_S: u64 = 8;
/// How long the supervisor waits before starting a node that exited (systemd's `RestartSec`).
const RESTART_DELAY: Duration = Duration::from_secs(2);
/// How long an old owner keeps a handed-off copy, in seconds: short, so copies get deleted.
const HANDOFF_GRACE_S: u64 = 15;

pub fn node_addr(id: u64) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)), NODE_PORT)
}

pub fn gateway_addr(id: u64) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, id as u8)), 0)
}

/// The registry's configuration in simulation: production timing, but snapshots and log purges
/// every few dozen entries so that runs exercise them.
pub fn registry_config() -> RegistryConfig {
    RegistryConfig {
        snapshot_logs_since_last: 40,
        logs_to_keep_after_snapshot: 16,
        ..RegistryConfig::default()
    }
}

/// A running node process.
pub struct Running {
    pub parts: Arc<NodeParts>,
    shutdown: CancellationToken,
}

/// One machine: its disk and clocks outlive its processes.
pub struct Host {
    pub id: u64,
    pub disk: Arc<SimDisk>,
    pub clocks: Arc<Clocks>,
    pub incarnation: u64,
    pub running: Option<Running>,
    /// Why the last start failed, if it did.
    pub last_start_error: Option<String>,
}

pub struct Cluster {
    pub trace: Arc<Trace>,
    pub monitor: Arc<Monitor>,
    pub net: Arc<Net>,
    admin_key_hash: String,
    machines: Mutex<BTreeMap<u64, Host>>,
}

impl Cluster {
    pub fn new(
        trace: Arc<Trace>,
        monitor: Arc<Monitor>,
        net: Arc<Net>,
        admin_key_hash: String,
        ids: &[u64],
        rng: &mut Rng,
    ) -> Arc<Cluster> {
        let mut machines = BTreeMap::new();
        for &id in ids {
            let disk = SimDisk::new(rng.fork());
            // The machine's data directory exists before any process runs, as a mount does.
            let _ = disk.provision_dir(std::path::Path::new(DATA_DIR));
            // Some runs start a few seconds before a UTC midnight, so days turn during the run.
            let ms_into_day = if rng.chance(300) {
                86_400_000 - rng.range(5_000, 60_000)
            } else {
                rng.below(80_000_000)
            };
            machines.insert(
                id,
                Host {
                    id,
                    disk,
                    clocks: Clocks::new(ms_into_day),
                    incarnation: 0,
                    running: None,
                    last_start_error: None,
                },
            );
        }
        Arc::new(Cluster { trace, monitor, net, admin_key_hash, machines: Mutex::new(machines) })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Host>> {
        self.machines.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn ids(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    pub fn is_up(&self, id: u64) -> bool {
        self.lock().get(&id).is_some_and(|m| m.running.is_some())
    }

    pub fn parts(&self, id: u64) -> Option<Arc<NodeParts>> {
        self.lock().get(&id).and_then(|m| m.running.as_ref().map(|r| r.parts.clone()))
    }

    /// Why machine `id`'s process last failed to start, if it did.
    pub fn start_error(&self, id: u64) -> Option<String> {
        self.lock().get(&id).and_then(|m| m.last_start_error.clone())
    }

    pub fn disk(&self, id: u64) -> Option<Arc<SimDisk>> {
        self.lock().get(&id).map(|m| m.disk.clone())
    }

    pub fn clocks(&self, id: u64) -> Option<Arc<Clocks>> {
        self.lock().get(&id).map(|m| m.clocks.clone())
    }

    fn config(&self, id: u64) -> NodeConfig {
        NodeConfig {
            id,
            data_dir: PathBuf::from(DATA_DIR),
            listen: node_addr(id),
            advertise: None,
            cluster_certs: PathBuf::from("/nonexistent/sim-has-no-certificates"),
            bootstrap: id == 1,
            admin_key_hash: Some(self.admin_key_hash.clone()),
            // The cluster forms with R = 1; the operator sets the run's R before any tenant.
            replicas: 1,
            memory_budget_mb: STORE_MEMORY_MB,
            idle_unload_s: STORE_IDLE_UNLOAD_S,
            loaded_tenants_max: STORE_LOADED_TENANTS_MAX,
            tenants_file: None,
            handoff: HandoffConfig { grace_s: HANDOFF_GRACE_S, ..HandoffConfig::default() },
            gossip: Default::default(),
            // The simulator runs every node on its own single thread; the setting is unused.
            worker_threads: 0,
        }
    }

    /// Starts a process on machine `id` from whatever its disk holds, as `node::run` does:
    /// open, listen, bootstrap (node 1), then the background workers.
    pub fn start(
        self: &Arc<Self>,
        id: u64,
    ) -> Pin<Box<dyn Future<Output = Result<(), Violation>> + Send>> {
        // Boxed: a node's supervisor starts it again, so the future refers to itself.
        Box::pin(self.clone().start_process(id))
    }

    async fn start_process(self: Arc<Self>, id: u64) -> Result<(), Violation> {
        let (disk, clocks, incarnation) = {
            let mut machines = self.lock();
            let m = machines
                .get_mut(&id)
                .ok_or_else(|| Violation::new(Invariant::Liveness, format!("no machine {id}")))?;
            if m.running.is_some() {
                return Ok(());
            }
            m.incarnation += 1;
            (m.disk.clone(), m.clocks.clone(), m.incarnation)
        };
        disk.restart();
        let config = self.config(id);
        let seams = Seams {
            peers: Arc::new(self.net.port(Endpoint::Node(id), incarnation, node_addr(id))),
            vfs: Arc::new(StoreDisk(disk.process())),
            registry_fs: Arc::new(RegistryDisk(disk.process())),
            clock: Arc::new(Mono::new(clocks.clone())),
            wall: Arc::new(Wall(clocks)),
        };
        self.trace.event(format!("n{id} starts (incarnation {incarnation})"));
        let parts = match NodeParts::open(&config, registry_config(), seams).await {
            Ok(parts) => Arc::new(parts),
            Err(e) => {
                // `node::run` exits with the error; its supervisor tries again.
                self.trace.event(format!("n{id} cannot start: {e}"));
                if let Some(m) = self.lock().get_mut(&id) {
                    m.last_start_error = Some(e.to_string());
                }
                let cluster = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RESTART_DELAY).await;
                    cluster.start(id).await
                });
                return Ok(());
            }
        };
        let shutdown = CancellationToken::new();
        self.net.attach(id, incarnation, node_addr(id), parts.service.clone());
        if let Some(m) = self.lock().get_mut(&id) {
            m.running = Some(Running { parts: parts.clone(), shutdown: shutdown.clone() });
            m.last_start_error = None;
        }
        tokio::spawn(watch_applied(self.clone(), id, parts.clone(), shutdown.clone()));
        tokio::spawn(supervise(self.clone(), id, parts.clone(), shutdown.clone()));
        if config.bootstrap {
            if let Err(e) = parts.bootstrap(&config).await {
                // `node::run` exits on this; the process is then restarted by its supervisor.
                self.trace.event(format!("n{id} bootstrap failed: {e}"));
            }
        }
        // Workers stop with the token; the handles are not needed to stop them.
        drop(parts.spawn_workers(&shutdown));
        Ok(())
    }

    /// Kills machine `id`'s process at once: no flush, no goodbye. On a power loss its disk
    /// keeps only what the crash leaves; otherwise everything the process wrote.
    pub fn crash(&self, id: u64, power_lost: bool) {
        let running = {
            let mut machines = self.lock();
            let Some(m) = machines.get_mut(&id) else { return };
            let Some(running) = m.running.take() else { return };
            self.net.detach(id, node_addr(id));
            m.disk.crash(power_lost);
            running
        };
        self.trace.event(format!(
            "n{id} {}",
            if power_lost { "loses power" } else { "process is killed" }
        ));
        running.shutdown.cancel();
        // The dead process's tasks end on their own: the registry is stopped, its disk and
        // network refuse everything.
        let registry = running.parts.registry.clone();
        tokio::spawn(async move {
            let _ = registry.shutdown().await;
        });
    }

    /// Ends the run: every process stops, and the network forgets them.
    pub fn stop_all(&self) {
        for id in self.ids() {
            if let Some(running) = self.lock().get_mut(&id).and_then(|m| m.running.take()) {
                running.shutdown.cancel();
            }
            self.net.detach(id, node_addr(id));
        }
    }

    /// Samples every node's Raft role until `stop`: two leaders of one term break Raft.
    pub async fn watch_leaders(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let statuses: Vec<(u64, u64, raft_registry::RaftStatus)> = self
                .lock()
                .values()
                .filter_map(|m| {
                    m.running.as_ref().map(|r| (m.id, m.incarnation, r.parts.registry.status()))
                })
                .collect();
            let running: Vec<(u64, u64)> =
                statuses.iter().map(|(id, inc, _)| (*id, *inc)).collect();
            let leading: Vec<(u64, u64)> = statuses
                .iter()
                .filter(|(_, _, s)| s.is_leader)
                .map(|(id, _, s)| (*id, s.term))
                .collect();
            self.monitor.leaders(&running, &leading);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(LEADER_SAMPLE_INTERVAL) => {}
            }
        }
    }
}

/// Plays systemd (`Restart=on-failure`): a node whose registry failed for good exits, as
/// `node::run` does, and is started again [`RESTART_DELAY`] later.
async fn supervise(cluster: Arc<Cluster>, id: u64, parts: Arc<NodeParts>, stop: CancellationToken) {
    let why = tokio::select! {
        _ = stop.cancelled() => return,
        why = parts.registry.failed() => why,
        // As `node::run` does: a removed node takes no further part and is not started again.
        how = parts.learn_removal(id) => {
            cluster.trace.event(format!("n{id} stops for good: it was removed ({how:?})"));
            cluster.crash(id, false);
            return;
        }
    };
    cluster.trace.event(format!("n{id} exits: its registry stopped: {why}"));
    cluster.crash(id, false);
    tokio::time::sleep(RESTART_DELAY).await;
    if let Err(v) = cluster.start(id).await {
        cluster.monitor.report(v);
    }
}

/// Feeds every registry state a node process applies to the monitor, until the process dies.
async fn watch_applied(
    cluster: Arc<Cluster>,
    id: u64,
    parts: Arc<NodeParts>,
    stop: CancellationToken,
) {
    let mut rx = parts.registry.subscribe();
    loop {
        let (index, state) = rx.borrow_and_update().clone();
        if stop.is_cancelled() {
            return;
        }
        cluster.monitor.applied(id, index, state, cluster.trace.now_ms());
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}
