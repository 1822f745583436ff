//! node owns a cluster node: the tenant store, the executor, the QUIC service; it knows nothing of
//! axum or HTTP status.
//!
//! - [`store`]: each tenant's phexts on this node's disk, behind a write-ahead log with group
//!   commit, and the executor that runs a `proto::SqRequest` against them.

mod admin;
pub mod clock;
pub mod config;
pub mod gossip;
pub mod handoff;
pub mod limits;
mod metrics;
mod run;
mod service;
mod stats;
pub mod store;
pub mod tenants_file;

pub use config::NodeConfig;
pub use run::{run, NodeError};
