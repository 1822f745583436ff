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
mod conn;
pub mod error;
pub mod forward;
pub mod head;
pub mod lograte;
pub mod metering;
pub mod routes;
mod serve;
pub mod view;
pub mod watch;

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
    /// `[http]`: timeouts and caps of client connections; every field has a default.
    #[serde(default)]
    pub http: HttpLimits,
}

/// How long a client connection may take at each step, and how many may be open, so that idle
/// or slow connections from one address never deny service to others (nginx's
/// `client_header_timeout`, `keepalive_timeout` and `limit_conn` are the model).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// Milliseconds from accepting a TCP connection to the end of its TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Milliseconds from the first byte of a request head (for a new connection: from its
    /// accept, or the end of its TLS handshake) to the end of the head.
    pub header_read_timeout_ms: u64,
    /// Milliseconds a connection may stay open with no request in progress and no byte
    /// received, after its last answer.
    pub idle_timeout_ms: u64,
    /// Milliseconds from the end of a request's head to the end of its body; a body still
    /// arriving then is answered 408 and its connection closed.
    pub body_read_timeout_ms: u64,
    /// Connections open at once from one client address (an IPv6 client: its /64); more are
    /// closed as soon as they are accepted.
    pub connections_per_address: usize,
    /// Connections open at once in all; more wait in the kernel's accept queue.
    pub connections_max: usize,
}

/// A TLS handshake is two round trips; 10 s covers a slow mobile link many times over and
/// bounds how long a silent socket holds a connection slot.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Every SQ client sends its request head in one write; 10 s is for the slowest link, not for
/// a trickle (nginx allows 60 s, SQ 0.6.0 closes a silent socket after 32 s).
pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Long enough for a client polling every few tens of seconds to keep its connection (nginx
/// keeps 75 s), short enough that abandoned connections free their slots within a minute.
pub const IDLE_TIMEOUT_MS: u64 = 60_000;
/// A whole body of the largest size (16 MiB) at 2.2 Mbit/s, a slow mobile uplink; a body that
/// trickles in is cut here instead of holding its connection (nginx's `client_body_timeout` is
/// 60 s between two reads; this bounds the whole body).
pub const BODY_READ_TIMEOUT_MS: u64 = 60_000;
/// Many clients can share one address behind NAT, each browser holding 6 connections per
/// origin; 256 serves an office while one address can hold only 1/32 of the default total.
pub const CONNECTIONS_PER_ADDRESS: usize = 256;
/// Half the gateway unit's `LimitNOFILE` (16,384), leaving the rest for the QUIC socket, logs
/// and connections closed but not yet reaped. Lowered at start if the open-file limit is too
/// low for it with [`FILES_RESERVED`] to spare.
pub const CONNECTIONS_MAX: usize = 8192;
/// Descriptors a gateway keeps for all but its client connections: its listener, the QUIC
/// socket, certificate and log files, and connections closing.
pub const FILES_RESERVED: u64 = 1024;

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            tls_handshake_timeout_ms: TLS_HANDSHAKE_TIMEOUT_MS,
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS,
            idle_timeout_ms: IDLE_TIMEOUT_MS,
            body_read_timeout_ms: BODY_READ_TIMEOUT_MS,
            connections_per_address: CONNECTIONS_PER_ADDRESS,
            connections_max: CONNECTIONS_MAX,
        }
    }
}

impl HttpLimits {
    /// Refuses a value that would serve nobody or never time out.
    pub fn check(&self) -> Result<(), GatewayError> {
        let zero = [
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms as usize),
            ("header_read_timeout_ms", self.header_read_timeout_ms as usize),
            ("idle_timeout_ms", self.idle_timeout_ms as usize),
            ("body_read_timeout_ms", self.body_read_timeout_ms as usize),
            ("connections_per_address", self.connections_per_address),
            ("connections_max", self.connections_max),
        ];
        match zero.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(GatewayError::Config(format!("http.{name} must be above 0"))),
            None => Ok(()),
        }
    }
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
pub async fn run(
    mut config: GatewayConfig,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
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
    config.http.check()?;
    config.http.connections_max = fit_connections(config.http.connections_max);
    metering::install();
    let identity = transport::Identity::load(&config.cluster_certs, transport::Role::Gateway)?;
    // A gateway whose nodes are all on loopback (a dev cluster) opens no socket beyond it.
    let node_ips: Vec<std::net::IpAddr> = config.nodes.iter().map(|a| a.ip()).collect();
    let client =
        transport::Client::for_peers(&identity, transport::ClientLimits::default(), &node_ips)?;
    let gw = Arc::new(Gateway {
        views: ViewHandle::default(),
        client: Arc::new(forward::WireNodeClient(Arc::new(client))),
        seeds: config.nodes.clone(),
    });
    if !forward::refresh(gw.client.as_ref(), &gw.views, &gw.seeds).await {
        tracing::warn!("no node answered yet; serving 503 until the registry view arrives");
    }
    let poller = tokio::spawn(watch::follow(
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

/// Raises the process's soft open-file limit to its hard limit, then returns the cap on client
/// connections that fits under it with [`FILES_RESERVED`] to spare: `wanted`, or less, which is
/// logged. Connections past the cap wait in the kernel's accept queue rather than failing their
/// accept with "too many open files".
fn fit_connections(wanted: usize) -> usize {
    let limit = telemetry::files::raise_open_file_limit();
    let cap = telemetry::files::fitted(wanted, limit, FILES_RESERVED);
    if cap < wanted {
        tracing::warn!(
            open_file_limit = limit,
            connections_max = wanted,
            connections_max_used = cap,
            reserved = FILES_RESERVED,
            "the open-file limit is too low for http.connections_max; fewer connections are served at once (raise LimitNOFILE)"
        );
    } else {
        tracing::info!(open_file_limit = limit, connections_max = cap, "open files fit");
    }
    cap
}

/// The axum router: one handler sees every request, so SQ's order of checks holds everywhere.
pub fn router(gw: Arc<Gateway>) -> axum::Router {
    axum::Router::new().fallback(api::handle).with_state(gw)
}

#[cfg(test)]
mod tests;
