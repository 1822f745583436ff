//! The cluster's source of truth: a Raft-replicated registry of tenants, nodes and placement.
//!
//! This crate owns:
//! - the registry state ([`RegistryState`]): tenants with their tier, quota, limits and key
//!   *hashes*, the admin key hash, the nodes and the placement epoch;
//! - the [`Command`]s that change it, applied deterministically (no clock, no randomness);
//! - its durability: an openraft 0.9 log, vote and snapshots on disk, fsynced and crash-safe;
//! - [`Registry`], one node's handle: open, bootstrap, write, linearizable and local reads,
//!   watch, status, one-at-a-time membership changes, and the entry point for Raft RPCs;
//! - [`placement`], the pure function from active nodes to each tenant's owner.
//!
//! **Architecture Invariant:** raft-registry knows nothing of HTTP, QUIC or the tenant store.
//! Raft RPCs leave as opaque bytes through [`RaftTransport`], which the node implements over QUIC
//! and tests implement in memory; incoming bytes go to [`Registry::handle_rpc`]. Keys never
//! enter the crate: the API takes sha256 hashes ([`key_hash`]), so no file holds a key.
//!
//! Wiring it into a node:
//!
//! ```text
//! startup:   reg = Registry::open(data_dir/"registry", node_id, config, Arc::new(QuicRaftTransport)).await?
//!            first node of a new cluster only: reg.bootstrap(my_quic_addr, 3).await?
//!            other nodes: ask the leader (admin API → leader) to reg.join_node(id, addr)
//! incoming:  a Raft frame from a peer → reply = reg.handle_rpc(&bytes).await → send reply back
//! writes:    reg.write(cmd) → on NotLeader { leader_addr, .. } forward to the leader
//! reads:     reg.state() (local), reg.read_linearizable() (leader), reg.subscribe() (watch)
//! shutdown:  reg.shutdown().await
//! ```
//!
//! Map of the crate:
//! - `state`, `command`: the replicated data and its state transitions;
//! - `changes`: the bounded log of which tenants each applied entry changed, so gateways
//!   follow the registry by changes;
//! - `placement`: consistent hashing with virtual nodes over `hashring`;
//! - `disk`, `log_store`, `state_machine`: the openraft storage-v2 implementation; `snapshot`:
//!   the snapshot image, a sequence of records of at most 10,000 tenants each; `format`: the
//!   format the directory holds, checked before anything in it is read;
//! - `network`: the wire format of Raft RPCs and the openraft network over [`RaftTransport`];
//! - `runtime`: tokio for openraft, with the election-timeout generator as a seedable seam;
//!   `elect`: when a node stands for election (a fresh random delay before each);
//! - `registry`, `membership`: the public handle; `batch`: writes grouped one entry per round;
//!   `removal`: whether a node believes a peer that says it was removed while it was away;
//!   `transfer`: a leader hands the registry to another voter (before it is drained);
//! - `config`, `error`: [`RegistryConfig`] and [`RegistryError`].

mod batch;
pub mod changes;
pub mod command;
pub mod config;
pub mod disk;
mod elect;
pub mod error;
pub mod format;
pub mod log_store;
mod membership;
pub mod network;
pub mod placement;
#[cfg(test)]
mod prop_decoders;
pub mod registry;
pub mod removal;
pub mod runtime;
pub mod snapshot;
pub mod state;
pub mod state_machine;
mod transfer;
pub mod types;

pub use batch::WRITES_QUEUED_MAX;
pub use changes::{Since, CHANGED_TENANTS_MAX};
pub use command::{ApplyReply, Command, Rejection, BATCH_COMMANDS_MAX};
pub use config::RegistryConfig;
pub use error::RegistryError;
pub use network::{RaftTransport, SendError, TransportFuture};
pub use placement::{Ring, VNODES_PER_NODE};
pub use registry::{CommandResult, RaftStatus, Registry};
pub use removal::ClaimRefused;
pub use state::{
    key_hash, valid_tenant_id, Handoff, Liveness, NodeRecord, NodeState, RegistryState,
    TenantRecord, Tier, ADMIN_EMAIL_LEN_MAX, NODE_ADDR_LEN_MAX, REPLICAS_MAX, TENANT_IDS_MAX,
};
pub use state_machine::Published;
