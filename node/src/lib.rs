//! node owns a cluster node: the tenant store, the executor, the QUIC service; it knows nothing of
//! axum or HTTP status.
//!
//! - [`store`]: each tenant's phexts on this node's disk, behind a write-ahead log with group
//!   commit, and the executor that runs a `proto::SqRequest` against them.

pub mod store;
