//! The openraft type configuration and short aliases for its generic types.

use std::io::Cursor;

use crate::command::{ApplyReply, Command};

openraft::declare_raft_types!(
    /// Raft types of the registry: log entries carry [`Command`]s, applying one yields an
    /// [`ApplyReply`], and a node is known by its QUIC address (`BasicNode::addr`).
    pub TypeConfig:
        D = Command,
        R = ApplyReply,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::runtime::RegistryRuntime,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Raft = openraft::Raft<TypeConfig>;
