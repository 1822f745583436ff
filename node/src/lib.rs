//! node owns a cluster node: the tenant store, the executor, the QUIC service; it knows nothing of
//! axum or HTTP status.
//!
//! - [`store`]: each tenant's phexts on this node's disk, behind a write-ahead log with group
//!   commit, and the executor that runs a `proto::SqRequest` against them.
//! - [`NodeParts`] and [`Seams`]: a node opened on its network, disks and clocks, which [`run`]
//!   gives QUIC and the real disk, and the simulator (`sim/`) gives its own; [`blocking`] is how
//!   store work leaves the async service (a thread pool, or inline on the simulator's thread).
//! - [`replicate`]: a tenant's writes copied from its primary to its backups before they are
//!   answered; [`lease`]: the node leases that let a primary answer reads, and how a silent node
//!   is marked down.

mod admin;
pub mod blocking;
pub mod catchup;
pub mod clock;
pub mod config;
pub mod files;
pub mod gossip;
pub mod handoff;
pub mod lease;
pub mod limits;
pub mod memory;
mod metrics;
pub mod replicate;
mod run;
mod service;
mod stats;
pub mod store;
pub mod tenants_file;

pub use config::NodeConfig;
pub use run::{run, NodeError, NodeParts, Removal, Seams, Workers, EXIT_REMOVED};
pub use service::Service;
