//! The stateless edge of sq-cloud.
//!
//! The gateway owns HTTP: it serves SQ's `/api/v2` and the admin API (axum over rustls, or plain
//! HTTP on loopback for `sq-cloud dev`), maps keys to tenants through an in-memory copy of the
//! registry ([`view`]), and forwards each request over QUIC to the tenant's owning node
//! ([`forward`]). Errors become HTTP statuses in exactly one function, [`error::status_of`].
//!
//! It must not know: the storage engine, Raft, or the disk. It writes no file and keeps no key in
//! clear text: keys are hashed on arrival and only hashes are compared.

pub mod admin;
pub mod api;
pub mod error;
pub mod forward;
pub mod metering;
pub mod routes;
mod serve;
pub mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::forward::NodeClient;
use crate::view::ViewHandle;

/// `gateway.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address for HTTP(S) clients, e.g. `0.0.0.0:443`.
    pub listen: SocketAddr,
    /// Directory with the cluster CA (`ca.pem`) and this gateway's QUIC client identity
    /// (`gateway.pem`, `gateway.key`), as `sq-cloud certs` writes them.
    pub cluster_certs: PathBuf,
    /// QUIC addresses of nodes to learn the registry from; any one that answers is enough.
    pub nodes: Vec<SocketAddr>,
    /// HTTPS certificate and key (PEM). Required unless `listen` is a loopback address.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Threads of the async runtime: 0 (the default) for one per core.
    #[serde(default)]
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Shared state of one gateway process.
pub struct Gateway {
    pub views: ViewHandle,
    pub client: Arc<dyn NodeClient>,
    pub seeds: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("transport: {0}")]
    Transport(#[from] transport::TransportError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the gateway until `shutdown` is cancelled.
pub async fn run(config: GatewayConfig, shutdown: CancellationToken) -> Result<(), GatewayError> {
    if config.tls.is_none() && !config.listen.ip().is_loopback() {
        return Err(GatewayError::Config(format!(
            "{} is not a loopback address: set [tls] cert and key to serve HTTPS",
            config.listen
        )));
    }
    if config.nodes.is_empty() {
        return Err(GatewayError::Config("nodes: list at least one node address".into()));
    }
    if let Some(tls) = &config.tls {
        // Load the certificate before anything says the gateway is listening.
        serve::tls_config(tls)?;
    }
    metering::install();
    let identity = transport::Identity::load(&config.cluster_certs, transport::Role::Gateway)?;
    let client = transport::Client::new(&identity, transport::ClientLimits::default())?;
    let gw = Arc::new(Gateway {
        views: ViewHandle::default(),
        client: Arc::new(forward::WireNodeClient(Arc::new(client))),
        seeds: config.nodes.clone(),
    });
    if !forward::refresh(gw.client.as_ref(), &gw.views, &gw.seeds).await {
        tracing::warn!("no node answered yet; serving 503 until the registry view arrives");
    }
    let poller = tokio::spawn(forward::poll_views(
        gw.client.clone(),
        gw.views.clone(),
        gw.seeds.clone(),
        shutdown.clone(),
    ));
    let result = serve::serve(gw, &config, shutdown.clone()).await;
    shutdown.cancel();
    let _ = poller.await;
    result
}

/// The axum router: one handler sees every request, so SQ's order of checks holds everywhere.
pub fn router(gw: Arc<Gateway>) -> axum::Router {
    axum::Router::new().fallback(api::handle).with_state(gw)
}

#[cfg(test)]
mod tests;
