//! Starting and stopping a node. The shutdown order lives in one function, [`run`].

use std::sync::Arc;
use std::time::Duration;

use proto::cluster::{NodeRequest, NodeResponse};
use raft_registry::{Registry, RegistryConfig};
use tokio_util::sync::CancellationToken;

use crate::clock::{SystemWallClock, WallClock};
use crate::config::NodeConfig;
use crate::limits::Limits;
use crate::gossip::{GossipConfig, Health};
use crate::service::Service;
use crate::store::{RealVfs, Store, StoreConfig, SystemClock};

/// How long one Raft RPC may take over QUIC before the registry treats the peer as unreachable.
const RAFT_RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// How often idle tenants are looked for and unloaded.
const UNLOAD_TICK: Duration = Duration::from_secs(5);

/// Raft RPCs over the cluster transport.
struct WireRaft(Arc<dyn transport::Caller>);

impl raft_registry::RaftTransport for WireRaft {
    fn send(&self, _target: u64, addr: &str, payload: Vec<u8>) -> raft_registry::TransportFuture<'_> {
        let addr = addr.to_string();
        Box::pin(async move {
            let addr = addr.parse().map_err(|e| format!("bad peer address {addr}: {e}"))?;
            let bytes = proto::wire::encode(&NodeRequest::Raft(payload)).map_err(|e| e.to_string())?;
            let answer = self.0.call(addr, bytes.into(), RAFT_RPC_TIMEOUT).await.map_err(|e| e.to_string())?;
            match proto::wire::decode(&answer).map_err(|e| e.to_string())? {
                NodeResponse::Raft(reply) => Ok(reply),
                other => Err(format!("peer answered {other:?} to a Raft RPC")),
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
    Config(String),
}

/// Runs a node until `shutdown` is cancelled, then stops its parts in order: stop taking
/// requests, stop the registry, then flush the store.
pub async fn run(config: NodeConfig, shutdown: CancellationToken) -> Result<(), NodeError> {
    crate::metrics::install(config.id);
    let identity = transport::Identity::load(&config.cluster_certs, transport::Role::Node(config.id))?;
    let client: Arc<dyn transport::Caller> = Arc::new(transport::Client::new(&identity, transport::ClientLimits::default())?);
    let clock = Arc::new(SystemClock::new());
    let wall: Arc<dyn WallClock> = Arc::new(SystemWallClock);
    let store_config = StoreConfig {
        data_dir: config.data_dir.join("store"),
        memory_budget_bytes: config.memory_budget_mb.saturating_mul(1024 * 1024),
        idle_unload_after: Duration::from_secs(config.idle_unload_s),
        ..StoreConfig::default()
    };
    let vfs: Arc<dyn crate::store::Vfs> = Arc::new(RealVfs);
    let store = Arc::new(Store::open(store_config, vfs.clone(), clock.clone())?);
    let limits = Arc::new(Limits::new(wall.clone(), vfs, config.data_dir.join("store").join("tenants")));
    let registry = Arc::new(
        Registry::open(&config.data_dir.join("registry"), config.id, RegistryConfig::default(), Arc::new(WireRaft(client.clone())))
            .await?,
    );
    let health = Arc::new(Health::new(config.id, GossipConfig::default(), clock));
    let handoffs = Arc::new(crate::handoff::Handoffs::new(config.handoff));
    let service = Arc::new(Service::new(config.id, store.clone(), registry.clone(), client.clone(), health.clone(), limits.clone(), wall, handoffs));
    let server = transport::Server::bind(config.listen, &identity, transport::ServerLimits::default())?;
    tracing::info!(id = config.id, addr = %config.advertise(), "node listening");
    let server_task = tokio::spawn(server.run(service.clone(), shutdown.clone()));
    if config.bootstrap {
        bootstrap(&registry, &config).await?;
    }
    let gossip = tokio::spawn(crate::gossip::run(health, registry.clone(), client, shutdown.clone()));
    let unloader = tokio::spawn(unload_idle(store.clone(), shutdown.clone()));
    let persister = tokio::spawn(persist_usage(limits.clone(), shutdown.clone()));
    let puller = tokio::spawn(crate::handoff::run_puller(service.clone(), shutdown.clone()));
    let sweeper = tokio::spawn(crate::handoff::run_sweeper(service.clone(), shutdown.clone()));
    let tenants_file = config.tenants_file.clone().map(|path| tokio::spawn(crate::tenants_file::watch(path, service.clone(), shutdown.clone())));
    shutdown.cancelled().await;
    tracing::info!("stopping: no new requests");
    let _ = server_task.await;
    let _ = gossip.await;
    let _ = unloader.await;
    let _ = persister.await;
    let _ = puller.await;
    let _ = sweeper.await;
    limits.persist();
    if let Some(t) = tenants_file {
        let _ = t.await;
    }
    tracing::info!("stopping: registry");
    if let Err(e) = registry.shutdown().await {
        tracing::warn!(error = %e, "registry did not stop cleanly");
    }
    tracing::info!("stopping: flushing tenant store");
    tokio::task::spawn_blocking(move || store.flush_all()).await.map_err(|e| NodeError::Config(e.to_string()))??;
    tracing::info!("stopped");
    Ok(())
}

/// Starts a one-node cluster if the registry is empty, and records the admin key's hash.
async fn bootstrap(registry: &Registry, config: &NodeConfig) -> Result<(), NodeError> {
    registry.bootstrap(config.advertise().to_string()).await?;
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
        let s = store.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || s.unload_idle()).await {
            tracing::warn!(error = %e, "idle unload task failed");
        }
    }
}

/// Writes changed usage roll-ups to disk every [`crate::limits::PERSIST_INTERVAL`].
async fn persist_usage(limits: Arc<Limits>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(crate::limits::PERSIST_INTERVAL) => {}
        }
        let l = limits.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || l.persist()).await {
            tracing::warn!(error = %e, "usage persist task failed");
        }
    }
}
