//! Starting and stopping a node. The shutdown order lives in one function, [`run`].

use std::sync::Arc;
use std::time::Duration;

use proto::cluster::{NodeRequest, NodeResponse, NodeState};
use raft_registry::{Registry, RegistryConfig};
use tokio_util::sync::CancellationToken;

use crate::clock::{SystemWallClock, WallClock};
use crate::config::NodeConfig;
use crate::gossip::Health;
use crate::limits::Limits;
use crate::service::Service;
use crate::store::{RealVfs, Store, StoreConfig, SystemClock};

/// How long one Raft RPC may take over QUIC before the registry treats the peer as unreachable.
const RAFT_RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// How often idle tenants are looked for and unloaded.
const UNLOAD_TICK: Duration = Duration::from_secs(5);

/// Raft RPCs over the cluster transport.
struct WireRaft(Arc<dyn transport::Caller>);

/// Why a Raft RPC did not reach its peer or come back.
#[derive(Debug, thiserror::Error)]
enum RaftSendError {
    #[error("bad peer address {addr:?}: {source}")]
    Address { addr: String, source: std::net::AddrParseError },
    #[error("{0}")]
    Wire(#[from] proto::wire::WireError),
    #[error("{0}")]
    Transport(#[from] transport::TransportError),
    #[error("peer answered {0} to a Raft RPC")]
    Unexpected(String),
}

impl raft_registry::RaftTransport for WireRaft {
    fn send(
        &self,
        _target: u64,
        addr: &str,
        payload: Vec<u8>,
    ) -> raft_registry::TransportFuture<'_> {
        let addr = addr.to_string();
        Box::pin(async move {
            let peer = addr.parse().map_err(|source| RaftSendError::Address { addr, source })?;
            let bytes =
                proto::wire::encode(&NodeRequest::Raft(payload)).map_err(RaftSendError::from)?;
            let answer = self
                .0
                .call(peer, bytes.into(), RAFT_RPC_TIMEOUT)
                .await
                .map_err(RaftSendError::from)?;
            match proto::wire::decode(&answer).map_err(RaftSendError::from)? {
                NodeResponse::Raft(reply) => Ok(reply),
                other => Err(RaftSendError::Unexpected(format!("{other:?}")).into()),
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("transport: {0}")]
    Transport(#[from] transport::TransportError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("registry: {0}")]
    Registry(#[from] raft_registry::RegistryError),
    #[error("configuration: {0}")]
    Gossip(#[from] crate::gossip::GossipConfigError),
    #[error("configuration: listen = \"{addr}\": cannot listen there: {source}")]
    Listen { addr: std::net::SocketAddr, source: transport::TransportError },
    /// Work on the blocking pool panicked or was cancelled (the store's final flush).
    #[error("blocking task: {0}")]
    Blocking(#[from] tokio::task::JoinError),
    #[error(
        "node {0} was removed from the cluster; it stops for good (archive its data directory)"
    )]
    Removed(u64),
}

/// The exit status of a node that stopped because it was removed from the cluster. The systemd
/// unit names it in `RestartPreventExitStatus=`, so a removed node is not started again.
pub const EXIT_REMOVED: i32 = 10;

/// How often a removed node that leads the registry looks whether it may stop.
const REMOVED_LEADER_LOOK: Duration = Duration::from_millis(200);

/// Waits until this node's applied registry records it as removed, and it does not lead the
/// registry while a removed node is still in the Raft membership. A leader that applied its own
/// removal stays (it holds no tenant) until its `finish_removals` task has taken the removed
/// nodes out of the membership, or it no longer leads (taking itself out steps it down; another
/// leader then finishes the rest): stopping first would leave
/// those nodes counted as voters, and two of them can leave no majority (the simulator's seed
/// 520570: voters 1, 2, 3 and 5, nodes 2 and 5 removed and stopped, 1 and 3 electing each
/// other's terms for ever).
async fn removed(registry: &Registry, id: u64) {
    let mut rx = registry.subscribe();
    loop {
        let gone = rx.borrow_and_update().1.node(id).is_some_and(|n| n.state == NodeState::Removed);
        let finishing =
            gone && registry.status().is_leader && !registry.removals_unfinished().is_empty();
        if gone && !finishing {
            return;
        }
        // Leadership and the membership move without a new registry state: a leader still
        // finishing looks again after a while.
        let closed = if finishing {
            matches!(tokio::time::timeout(REMOVED_LEADER_LOOK, rx.changed()).await, Ok(Err(_)))
        } else {
            rx.changed().await.is_err()
        };
        if closed {
            return std::future::pending().await;
        }
    }
}

/// How a node learnt that it was removed from the cluster.
#[derive(Debug)]
pub enum Removal {
    /// It applied its own removal.
    Applied,
    /// It was removed while it was away, and a peer told it (crate::gossip).
    Told(crate::gossip::RemovedBy),
}

/// Where a node's logic meets the outside world: in production QUIC, the disk and the system
/// clocks ([`run`] builds them); in the simulator, its network, disk and clocks.
pub struct Seams {
    /// Requests to other nodes.
    pub peers: Arc<dyn transport::Caller>,
    /// The tenant store's disk.
    pub vfs: Arc<dyn crate::store::Vfs>,
    /// The registry's disk.
    pub registry_fs: Arc<dyn raft_registry::disk::Fs>,
    /// Monotonic time: every duration (idleness, gossip silence, latency, handoff pacing).
    pub clock: Arc<dyn crate::store::Clock>,
    /// Calendar time: daily limits, records stamped for operators.
    pub wall: Arc<dyn WallClock>,
}

/// A node's parts, opened on its seams: the service every request reaches, and what it holds.
pub struct NodeParts {
    pub service: Arc<Service>,
    pub registry: Arc<Registry>,
    pub store: Arc<Store>,
    pub limits: Arc<Limits>,
    pub health: Arc<Health>,
    peers: Arc<dyn transport::Caller>,
}

/// The background tasks of a node, stopped by its shutdown token.
pub struct Workers(Vec<tokio::task::JoinHandle<()>>);

impl NodeParts {
    /// Waits until node `id` (this one) learns it was removed: from its own registry, or from a
    /// peer it believes. A removed node then stops for good ([`run`]; the simulator's nodes too).
    pub async fn learn_removal(&self, id: u64) -> Removal {
        tokio::select! {
            _ = removed(&self.registry, id) => Removal::Applied,
            by = self.health.told_removed() => Removal::Told(by),
        }
    }

    /// Opens the store, the usage limits and the registry under `config.data_dir` and builds the
    /// service over them. Nothing runs in the background yet.
    pub async fn open(
        config: &NodeConfig,
        registry_config: RegistryConfig,
        seams: Seams,
    ) -> Result<NodeParts, NodeError> {
        let store_config = StoreConfig {
            data_dir: config.data_dir.join("store"),
            memory_budget_bytes: config.memory_budget_mb.saturating_mul(proto::cluster::MIB),
            idle_unload_after: Duration::from_secs(config.idle_unload_s),
            loaded_tenants_max: config.loaded_tenants_max,
            ..StoreConfig::default()
        };
        let opening_ms = seams.clock.now_ms();
        let store = Arc::new(Store::open(store_config, seams.vfs.clone(), seams.clock.clone())?);
        let store_ms = seams.clock.now_ms();
        let limits = Arc::new(Limits::new(
            seams.wall.clone(),
            seams.vfs,
            config.data_dir.join("store").join("tenants"),
        ));
        let transport = Arc::new(WireRaft(seams.peers.clone()));
        let registry = Arc::new(
            Registry::open_on(
                seams.registry_fs,
                &config.data_dir.join("registry"),
                config.id,
                registry_config,
                transport,
            )
            .await?,
        );
        settle_store(&store, &registry, config.id)?;
        // A start's time goes here (docs/BENCHMARKS.md, the stop and start at 100,000 tenants).
        tracing::info!(
            store_ms = store_ms - opening_ms,
            registry_ms = seams.clock.now_ms() - store_ms,
            applied_index = registry.subscribe().borrow().0,
            tenants = registry.state().tenant_count(),
            "store and registry opened"
        );
        config.gossip.check()?;
        let health = Arc::new(Health::new(config.id, config.gossip, seams.clock.clone()));
        let handoffs = Arc::new(crate::handoff::Handoffs::new(config.handoff));
        let service = Arc::new(Service::new(
            config.id,
            store.clone(),
            registry.clone(),
            seams.peers.clone(),
            health.clone(),
            limits.clone(),
            seams.wall,
            seams.clock,
            handoffs,
        ));
        Ok(NodeParts { service, registry, store, limits, health, peers: seams.peers })
    }

    /// Starts a one-node cluster if the registry is empty, and records the admin key's hash.
    /// Only for the node configured with `bootstrap`; idempotent.
    pub async fn bootstrap(&self, config: &NodeConfig) -> Result<(), NodeError> {
        bootstrap(&self.registry, config).await
    }

    /// Starts gossip, idle unloading, usage persistence, tenant handoff, node leases and
    /// replicas' catch-up.
    pub fn spawn_workers(&self, shutdown: &CancellationToken) -> Workers {
        Workers(vec![
            tokio::spawn(crate::gossip::run(
                self.health.clone(),
                self.registry.clone(),
                self.peers.clone(),
                shutdown.clone(),
            )),
            tokio::spawn(unload_idle(self.store.clone(), shutdown.clone())),
            tokio::spawn(persist_usage(
                self.limits.clone(),
                self.store.config().idle_unload_after,
                shutdown.clone(),
            )),
            tokio::spawn(crate::handoff::run_puller(self.service.clone(), shutdown.clone())),
            tokio::spawn(crate::handoff::run_sweeper(self.service.clone(), shutdown.clone())),
            tokio::spawn(crate::lease::run(self.service.clone(), shutdown.clone())),
            tokio::spawn(crate::catchup::run(self.service.clone(), shutdown.clone())),
            tokio::spawn(crate::catchup::rebuild(self.service.clone(), shutdown.clone())),
            tokio::spawn(finish_removals(self.registry.clone(), shutdown.clone())),
        ])
    }

    /// After `shutdown` was cancelled: waits for the workers, persists usage, closes the registry
    /// (a snapshot of what it applied, then Raft stopped), then flushes the store, in that order.
    pub async fn stop(self, workers: Workers) -> Result<(), NodeError> {
        for worker in workers.0 {
            let _ = worker.await;
        }
        self.limits.persist();
        tracing::info!("stopping: registry");
        if let Err(e) = self.registry.close().await {
            tracing::warn!(error = %e, "registry did not stop cleanly");
        }
        tracing::info!("stopping: flushing tenant store");
        let store = self.store;
        crate::blocking::spawn(move || store.flush_all()).await??;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Decides, at a start, what this node's tenant store holds: copies it lost and must rebuild
/// from the other replicas, a new store with nothing to rebuild, or the copies it had.
fn settle_store(store: &Store, registry: &Registry, id: u64) -> Result<(), NodeError> {
    // A member of the ring whose tenants directory is new lost its copies (a wiped or
    // replaced disk): they are rebuilt as learners' (docs/REPLICATION.md, "A wiped disk").
    // So did a draining node: with R > 1 it stays in the sets it leaves until their new
    // nodes hold the tenants, and an empty copy of its must not help choose a log (the
    // simulator found a write lost so, seed 1380 of `--replicas 3`). Either way the
    // decision is made durable before anything else is written there, so a start that
    // stops before it (the registry failing to open, say) decides again.
    let was_member = registry.state().node(id).is_some_and(|n| {
        matches!(n.state, raft_registry::NodeState::Active | raft_registry::NodeState::Draining)
    });
    if store.opened_fresh() && was_member {
        // The registry holds at least every epoch this node led under before (it applied
        // each before leading under it, and applied entries are re-applied at open).
        store.start_rebuilding(registry.state().placement_epoch())?;
        tracing::warn!(
            node = id,
            "this node's tenant store is new though the registry has it as a member: its \
             copies were lost, and are rebuilt from the other replicas"
        );
    } else if store.lost_epoch_unknown() {
        store.start_rebuilding(registry.state().placement_epoch())?;
    } else if store.opened_fresh() {
        store.settle_new()?;
    }
    Ok(())
}

/// Runs a node until `shutdown` is cancelled, then stops its parts in order: stop taking
/// requests, stop the workers, stop the registry, then flush the store.
pub async fn run(mut config: NodeConfig, shutdown: CancellationToken) -> Result<(), NodeError> {
    // Also cancelled when the registry fails, to stop this node's parts in order before exiting.
    let shutdown = shutdown.child_token();
    crate::metrics::install(config.id);
    config.loaded_tenants_max = crate::files::fit_loaded_tenants(config.loaded_tenants_max);
    let identity =
        transport::Identity::load(&config.cluster_certs, transport::Role::Node(config.id))?;
    let parts =
        NodeParts::open(&config, RegistryConfig::default(), real_seams(&config, &identity)?)
            .await?;
    let server =
        transport::Server::bind(config.listen, &identity, transport::ServerLimits::default())
            .map_err(|source| NodeError::Listen { addr: config.listen, source })?;
    let arenas = crate::memory::arenas();
    let slab_pages_160 = crate::memory::slab_pages(160);
    tracing::info!(id = config.id, addr = %config.advertise(), ?arenas, ?slab_pages_160, "node listening");
    let server_task = tokio::spawn(server.run(parts.service.clone(), shutdown.clone()));
    if config.bootstrap {
        parts.bootstrap(&config).await?;
    }
    let workers = parts.spawn_workers(&shutdown);
    let tenants_file = config.tenants_file.clone().map(|path| {
        tokio::spawn(crate::tenants_file::watch(path, parts.service.clone(), shutdown.clone()))
    });
    let mut was_removed = false;
    let registry_failure = tokio::select! {
        _ = shutdown.cancelled() => None,
        why = parts.registry.failed() => Some(why),
        how = parts.learn_removal(config.id) => {
            match how {
                Removal::Applied => tracing::error!(id = config.id, "this node was removed from the cluster: it takes no further part (no elections, no requests) and stops for good"),
                Removal::Told(by) => tracing::error!(id = config.id, told_by = by.peer, registry = %by.applied, "this node was removed from the cluster while it was away (a peer whose registry is newer than this node's log says so): it takes no further part (no elections, no requests) and stops for good"),
            }
            was_removed = true;
            shutdown.cancel();
            None
        }
    };
    if let Some(why) = &registry_failure {
        // A node whose registry stopped would serve a placement that no longer moves; exit and let
        // the supervisor start it again from its disk.
        tracing::error!(error = %why, "registry stopped for good; stopping the node");
        shutdown.cancel();
    }
    tracing::info!("stopping: no new requests");
    parts.service.stopping();
    let _ = server_task.await;
    if let Some(t) = tenants_file {
        let _ = t.await;
    }
    parts.stop(workers).await?;
    if was_removed {
        return Err(NodeError::Removed(config.id));
    }
    match registry_failure {
        Some(why) => Err(NodeError::Registry(raft_registry::RegistryError::Raft(why))),
        None => Ok(()),
    }
}

/// The seams of a node in production: QUIC to its peers, the real disk and clocks.
fn real_seams(config: &NodeConfig, identity: &transport::Identity) -> Result<Seams, NodeError> {
    // Peers are learned from the registry later; a node that listens on loopback is part of a
    // loopback cluster, so its client socket stays on loopback too.
    let own_ips = [config.listen.ip(), config.advertise().ip()];
    let client: Arc<dyn transport::Caller> = Arc::new(transport::Client::for_peers(
        identity,
        transport::ClientLimits::default(),
        &own_ips,
    )?);
    Ok(Seams {
        peers: client,
        vfs: Arc::new(RealVfs),
        registry_fs: raft_registry::disk::std_fs(),
        clock: Arc::new(SystemClock::new()),
        wall: Arc::new(SystemWallClock),
    })
}

/// Starts a one-node cluster if the registry is empty, and records the admin key's hash.
async fn bootstrap(registry: &Registry, config: &NodeConfig) -> Result<(), NodeError> {
    registry.bootstrap(config.advertise().to_string(), config.replicas).await?;
    if let Some(hash) = &config.admin_key_hash {
        if registry.state().admin_key_hash().is_none() {
            registry.write(raft_registry::Command::SetAdminKeyHash { hash: hash.clone() }).await?;
        }
    }
    Ok(())
}

async fn unload_idle(store: Arc<Store>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(UNLOAD_TICK) => {}
        }
        // Nothing loaded, nothing to unload: idle tenants cost this pass nothing. The free
        // pages the last work left go back now rather than whenever allocating resumes.
        if store.loaded_count() == 0 {
            crate::memory::release_free_pages_over(crate::memory::FREE_PAGES_KEPT_IDLE_BYTES);
            continue;
        }
        let s = store.clone();
        let unloaded = crate::blocking::spawn(move || {
            let unloaded = s.unload_idle();
            if unloaded > 0 {
                crate::memory::release_free_memory();
            }
            unloaded
        });
        if let Err(e) = unloaded.await {
            tracing::warn!(error = %e, "idle unload task failed");
        }
    }
}

/// How often the registry leader looks for a removal whose membership change did not complete.
const FINISH_REMOVALS_EVERY: Duration = Duration::from_secs(1);

/// On the registry leader: finishes removals that were recorded but left the node in the Raft
/// membership (`Registry::finish_removals`), so a removed node, which stops for good, does not
/// count towards majorities it can never join.
async fn finish_removals(registry: Arc<Registry>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(FINISH_REMOVALS_EVERY) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            finished = registry.finish_removals() => if let Err(e) = finished {
                tracing::warn!(error = %e, "finishing a removal failed; tried again");
            }
        }
    }
}

/// Writes changed usage roll-ups to disk every [`crate::limits::PERSIST_INTERVAL`], then drops
/// from memory those of tenants idle for `idle`.
async fn persist_usage(limits: Arc<Limits>, idle: Duration, shutdown: CancellationToken) {
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(crate::limits::PERSIST_INTERVAL) => {}
        }
        let l = limits.clone();
        let persisted = crate::blocking::spawn(move || {
            l.persist();
            if l.forget_idle(idle_ms) > 0 {
                crate::memory::release_free_memory();
            }
        });
        if let Err(e) = persisted.await {
            tracing::warn!(error = %e, "usage persist task failed");
        }
    }
}
