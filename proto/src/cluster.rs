//! Messages between gateways, nodes and operator tools: the cluster's wire vocabulary.
//!
//! These are plain data. The node builds [`RegistryView`] from the Raft registry; the gateway
//! keeps the newest one in memory. Keys never appear here, only their SHA-256 hashes.

use serde::{Deserialize, Serialize};

use crate::admin::AdminAnswer;
use crate::error::ApiError;
use crate::request::{SqRequest, SqResponse};

/// One mebibyte; PRODUCT.md's "MB" is 1024 * 1024 bytes.
pub const MIB: u64 = 1024 * 1024;

/// A tenant's plan; it sets the default quota and daily request limit (PRODUCT.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tier {
    Free,
    Pro,
    Team,
}

impl Tier {
    /// Default storage quota in bytes.
    pub fn default_quota_bytes(self) -> u64 {
        match self {
            Tier::Free => 25 * MIB,
            Tier::Pro => 250 * MIB,
            Tier::Team => 1024 * MIB,
        }
    }

    /// Default number of requests allowed per day.
    pub fn default_daily_limit(self) -> u64 {
        match self {
            Tier::Free => 1_000,
            Tier::Pro => 10_000,
            Tier::Team => 100_000,
        }
    }

    /// Lower-case name as used by the admin API ("free", "pro", "team").
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Pro => "pro",
            Tier::Team => "team",
        }
    }

    /// Parses the admin API's lower-case tier name.
    pub fn parse(name: &str) -> Option<Tier> {
        [Tier::Free, Tier::Pro, Tier::Team].into_iter().find(|t| t.as_str() == name)
    }
}

/// Where a node is in its life; ids of `Removed` nodes are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Recorded, catching up as a Raft learner; owns no tenants yet.
    Joining,
    /// A voter that owns tenants under the current ring.
    Active,
    /// Leaving: owns no tenants any more, waiting for removal.
    Draining,
    /// Gone for good; the id stays recorded so it is never reused.
    Removed,
}

impl NodeState {
    /// Lower-case name for status pages ("joining", "active", "draining", "removed").
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Removed => "removed",
        }
    }
}

/// A node's health as one node's gossip sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeHealth {
    Alive,
    Suspect,
    Dead,
}

impl NodeHealth {
    /// Lower-case name for status pages and logs ("alive", "suspect", "dead").
    pub fn as_str(self) -> &'static str {
        match self {
            NodeHealth::Alive => "alive",
            NodeHealth::Suspect => "suspect",
            NodeHealth::Dead => "dead",
        }
    }
}

impl std::fmt::Display for NodeHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a gateway needs to know of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantView {
    pub id: String,
    pub key_hashes: Vec<String>,
    pub enabled: bool,
    /// The owning node in the view's epoch; `None` when no node is active.
    pub owner: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: u64,
    pub addr: String,
    pub state: NodeState,
    /// Health as the answering node's gossip sees it.
    pub health: NodeHealth,
    /// The node's gossip heartbeat counter this verdict is based on: the verdict's version. Of
    /// two verdicts on one node, the one with the higher counter is newer; at equal counters
    /// the worse one is (silence only grows until the counter moves again).
    pub heartbeat: u64,
}

impl NodeView {
    /// Whether this verdict on the node is newer than `other`'s (see [`NodeView::heartbeat`]).
    pub fn health_is_newer_than(&self, other: &NodeView) -> bool {
        let rank = |h: NodeHealth| match h {
            NodeHealth::Alive => 0,
            NodeHealth::Suspect => 1,
            NodeHealth::Dead => 2,
        };
        (self.heartbeat, rank(self.health)) > (other.heartbeat, rank(other.health))
    }
}

/// The registry as gateways see it, at one applied Raft index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RegistryView {
    pub applied_index: u64,
    pub epoch: u64,
    pub admin_key_hash: Option<String>,
    pub tenants: Vec<TenantView>,
    pub nodes: Vec<NodeView>,
    /// The Raft leader the answering node follows, if it knows one, and its term: admin writes
    /// go straight to it.
    pub leader: Option<u64>,
    pub term: u64,
}

/// The registry's changes since an applied index a gateway already holds: the tenants that
/// changed or came (`changed`, as they are at `applied_index`) and those that went (`removed`),
/// with everything else of the view whole (it is small: nodes, the admin key, the leader).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RegistryDelta {
    /// The applied index the changes start from: the one the gateway asked with.
    pub since: u64,
    /// Every field but `tenants` as in [`RegistryView`]; `head.tenants` is empty.
    pub head: RegistryView,
    pub changed: Vec<TenantView>,
    pub removed: Vec<String>,
}

/// A node's answer to a gateway following the registry ([`NodeRequest::ViewSince`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewUpdate {
    /// The whole registry: on first contact, or when the caller is too far behind (the node's
    /// change log no longer reaches its index) or placement changed since (every owner may
    /// have moved).
    Full(RegistryView),
    /// Only what changed since the caller's index.
    Delta(RegistryDelta),
    /// The first part of a whole registry of more than [`VIEW_TENANTS_PER_PART`] tenants, which
    /// would not fit one message (about 90 B a tenant, against 64 MiB): everything but the
    /// tenants as of `applied_index`, and the first tenants in id order. The caller asks the
    /// same node for the rest with [`NodeRequest::ViewPage`], takes the whole as the registry
    /// at this index, and then asks for the changes since it. Pages read later may hold newer
    /// records; the changes since this index replace every one of them.
    FullFirst(RegistryView),
}

/// The most tenants in one message of a whole registry ([`ViewUpdate::FullFirst`],
/// [`NodeResponse::ViewPage`]): about 5 MB.
pub const VIEW_TENANTS_PER_PART: u64 = 50_000;

impl ViewUpdate {
    /// The applied index the answer brings its receiver to.
    pub fn applied_index(&self) -> u64 {
        match self {
            ViewUpdate::Full(v) | ViewUpdate::FullFirst(v) => v.applied_index,
            ViewUpdate::Delta(d) => d.head.applied_index,
        }
    }
}

/// Admin operations, checked against the admin key hash and applied through the registry leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminOp {
    AddTenant {
        tenant_id: String,
        tier: Option<String>,
        quota_mb: Option<u64>,
        admin_email: Option<String>,
        key_hash: String,
    },
    ListTenants,
    GetTenant {
        tenant_id: String,
    },
    TenantStats {
        tenant_id: String,
    },
    PatchTenant {
        tenant_id: String,
        tier: Option<String>,
        quota_mb: Option<u64>,
        enabled: Option<bool>,
        daily_limit: Option<u64>,
    },
    RotateKey {
        tenant_id: String,
        key_hash: String,
    },
    DeleteTenant {
        tenant_id: String,
    },
    /// Destroys an archived tenant's data everywhere and retires its id.
    PurgeTenant {
        tenant_id: String,
    },
    Health,
    ListNodes,
    AddNode {
        id: u64,
        addr: String,
    },
    DrainNode {
        id: u64,
    },
    RemoveNode {
        id: u64,
    },
    /// One page of tenants in id order: at most `limit` of those with an id after `after`, of
    /// the given tier ("free", "pro", "team"), status ("active", "disabled", "archived") and
    /// owning node, when given.
    ListTenantsPage {
        limit: u64,
        after: Option<String>,
        tier: Option<String>,
        status: Option<String>,
        node: Option<u64>,
    },
    /// Sets R, how many nodes hold each tenant (1 to the registry's limit).
    SetReplicas {
        replicas: u64,
    },
}

/// The most tenants one page of the admin listing holds (about 2 MB of JSON).
pub const TENANTS_PAGE_MAX: u64 = 10_000;

/// A request to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRequest {
    /// An SQ request for `tenant`, authenticated at the gateway by `key_hash` and routed under
    /// placement `epoch`. The node checks both again.
    Sq { tenant: String, key_hash: String, epoch: u64, request: SqRequest },
    /// Long-poll for the registry view: answers at once when the node has applied past
    /// `known_index`, otherwise after `wait_ms` with `None`.
    View { known_index: u64, wait_ms: u64 },
    /// An admin operation; `admin_key_hash` is checked against the registry.
    Admin { admin_key_hash: String, op: AdminOp },
    /// A registry command a node forwards to the leader, encoded by the registry. Only nodes may
    /// send it; a node checks the admin key before forwarding an admin change.
    RaftCommand {
        #[serde(with = "serde_bytes")]
        command: Vec<u8>,
    },
    /// Handoff, asked by a tenant's new owner of its old owner: list the tenant's files once
    /// the old owner has applied `epoch` and finished every request it had for the tenant.
    HandoffManifest { tenant: String, epoch: u64 },
    /// Handoff: up to `len` bytes of one listed file from `offset`, whole up to a chunk or else
    /// streamed after a [`NodeResponse::HandoffStreamed`] head.
    HandoffRead { tenant: String, path: String, offset: u64, len: u64 },
    /// A Raft RPC for the registry, encoded by the registry itself.
    Raft(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Local facts about tenants this node owns, for stats and metrics.
    TenantUsage { tenants: Vec<String> },
    /// Prometheus text of this node's metrics.
    Metrics,
    /// Health gossip: the sender's view of every node's heartbeat counter.
    Gossip { from: u64, heartbeats: Vec<(u64, u64)> },
    /// Asked of a node before it joins: which id it runs as (from nodes only).
    Identify,
    /// Long-poll for the registry's changes since `known_index` (the applied index of the
    /// registry the caller holds; 0 for none): answers as `View` does, with a
    /// [`ViewUpdate`] that carries only the tenants changed since.
    ViewSince { known_index: u64, wait_ms: u64 },
    /// The next part of a whole registry after [`ViewUpdate::FullFirst`]: up to `limit` (at
    /// most [`VIEW_TENANTS_PER_PART`]) tenants with ids after `after`, in id order.
    ViewPage { after: String, limit: u64 },
    /// A tenant's primary sends its backups the records they lack, batched per pair of nodes
    /// (docs/REPLICATION.md, "Writes"). Only nodes may send it.
    Replicate { from: u64, appends: Vec<ReplicaAppend> },
    /// A node asks a registry voter to renew its lease (docs/REPLICATION.md, "Node leases"),
    /// saying how long it has been without one (`lapsed_ms`): a node some voters refuse for good,
    /// after a mark down that was never committed, is then marked down and up by the leader.
    /// `mark_epoch` is the epoch of the latest mark down or up of the sender its registry has
    /// applied (0: none): a voter that knows a later mark takes the lapse as told before it.
    Lease { from: u64, lapsed_ms: u64, mark_epoch: u64 },
    /// The registry leader asks a voter to confirm that `node` has not renewed its lease for the
    /// down time; a voter that confirms refuses that node's leases until it is marked up.
    ConfirmDown { node: u64 },
    /// A new primary asks a member of the tenant's replica set to promise `ballot` (refusing
    /// every lower one from then on) and to say where its log stands (docs/REPLICATION.md,
    /// "A change of primary").
    Prepare { tenant: String, ballot: u64 },
    /// A new primary asks a member for its durable records after `after`, to adopt its log.
    FetchRecords { tenant: String, ballot: u64, after: u64 },
    /// A tenant's primary `from`, leading under `epoch`, asks a backup whose log no longer meets
    /// its own to take a snapshot from it (docs/REPLICATION.md, "Catch-up"). Answered at once;
    /// the backup pulls the snapshot in the background, and the primary asks where its log ends
    /// again later.
    CatchUp { from: u64, tenant: String, epoch: u64 },
    /// A replica `from` of the tenant asks for a snapshot of this node's copy: answered with its
    /// listing ([`NodeResponse::Snapshot`]); the files are read with `SnapshotRead`.
    SnapshotTake { from: u64, tenant: String },
    /// Up to `len` bytes of one file of snapshot `id` from `offset`, answered as `HandoffRead`
    /// is (a chunk, or a head and body frames).
    SnapshotRead { id: u64, tenant: String, path: String, offset: u64, len: u64 },
    /// The snapshot `id` is no longer needed.
    SnapshotDone { id: u64, tenant: String },
    /// Node `from`, entering the tenant's replica set in the change recorded at `epoch` (a join
    /// or a drain with R > 1), asks the tenant's primary to bring its copy up and whether it
    /// holds the tenant now: answered with [`NodeResponse::Entered`]. docs/REPLICATION.md,
    /// "Joins and drains".
    Enter { from: u64, tenant: String, epoch: u64 },
}

/// A snapshot of a tenant's copy on one node: the last record its files hold, the node's
/// ballots then (as in [`ReplicaReport`]) and its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotListing {
    pub id: u64,
    pub lsn: u64,
    #[serde(with = "serde_bytes")]
    pub ballots: Vec<u8>,
    pub files: Vec<HandoffFile>,
    /// Taken by the tenant's primary after its prepare round under `ballot`: it holds every
    /// acknowledged write, so a copy rebuilt from it counts.
    pub prepared_ballot: Option<u64>,
}

/// Where a replica's log stands: its ballots (promise and history, as `Ballots::to_wire` in the
/// node writes them) and its last durable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    #[serde(with = "serde_bytes")]
    pub ballots: Vec<u8>,
    pub last_lsn: u64,
}

/// The answer to [`NodeRequest::FetchRecords`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchedRecords {
    /// Framed records `prev_lsn + 1 ..= last_lsn`, all written under `ballot`.
    Records {
        ballot: u64,
        prev_ballot: u64,
        prev_lsn: u64,
        #[serde(with = "serde_bytes")]
        records: Vec<u8>,
        last_lsn: u64,
    },
    /// No durable record after `after`.
    Nothing,
    /// The records after `after` are folded into the phext files.
    Checkpointed,
    Refused(String),
}

/// Records of one tenant's log for a backup: the framed records after `prev`, all written under
/// `ballot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaAppend {
    pub tenant: String,
    /// The ballot the primary leads under, its placement epoch: a backup refuses it below its
    /// promise, and waits for its registry to reach it before it judges who the primary is.
    pub epoch: u64,
    /// The ballot the records were written under (a new primary sends records of earlier ones).
    pub ballot: u64,
    /// The ballot and lsn of the record before the first one sent ((0, 0): none).
    pub prev_ballot: u64,
    pub prev_lsn: u64,
    /// Cut the log after this record first: the backup holds records past it that the
    /// primary's log does not. Only while the backup's log still ends at `truncate_if_end`, the
    /// end it reported: a copy of this message that arrives late cuts nothing.
    pub truncate_after: Option<u64>,
    pub truncate_if_end: u64,
    #[serde(with = "serde_bytes")]
    pub records: Vec<u8>,
    /// The backup, a learner, holds (with these records) everything the primary held when it
    /// prepared: its copy counts from now on.
    pub caught_up: bool,
}

/// A backup's answer for one tenant of a [`NodeRequest::Replicate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaAck {
    /// Every record sent is durable here; the log ends at (`ballot`, `lsn`). A `learner`'s copy
    /// does not count toward a majority yet: its node lost its disk, and no primary has caught
    /// this copy up since.
    Durable { ballot: u64, lsn: u64, learner: bool },
    /// The records do not continue this replica's log, which ends at (`ballot`, `lsn`); its
    /// `ballots` (as in [`ReplicaReport`]) tell the primary what the two logs share.
    NotContinuing {
        ballot: u64,
        lsn: u64,
        #[serde(with = "serde_bytes")]
        ballots: Vec<u8>,
    },
    /// Refused, nothing changed: a lower ballot than promised, not a replica of the sender, or
    /// a store error.
    Refused(String),
    /// The records to cut are already folded into this replica's phext files: it needs a
    /// snapshot.
    NeedsSnapshot,
}

/// How a primary sees one replica of a tenant, for stats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub node: u64,
    /// The last record the replica holds durably, as the primary last heard; `None` until it
    /// answered once since the primary started.
    pub durable_lsn: Option<u64>,
    /// "in-sync", "behind", "needs-snapshot" or "unreachable".
    pub state: String,
}

/// Bytes of one handoff file, carried as one byte string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Chunk(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// One file of a tenant being handed off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffFile {
    /// Path inside the tenant's directory.
    pub path: String,
    pub len: u64,
    /// xxh3-128 of the contents, checked on arrival.
    pub checksum: String,
}

/// Per-tenant facts the owning node keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TenantUsage {
    pub tenant_id: String,
    pub storage_bytes: u64,
    pub api_calls_today: u64,
    pub bytes_out_today: u64,
    pub last_active_ms: Option<u64>,
    /// The last record of the tenant's log on the owner (its primary).
    pub last_lsn: u64,
    /// The tenant's backups as the owner sees them (none with R = 1).
    pub backups: Vec<ReplicaStatus>,
}

/// Where a node's registry stands: the Raft log id of an entry (the term of the leader that wrote
/// it, and its index). Ordered as Raft orders logs, by term and then by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RegistryPosition {
    pub term: u64,
    pub index: u64,
}

impl std::fmt::Display for RegistryPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "term {}, index {}", self.term, self.index)
    }
}

/// How a member's refusal of `Prepare` starts when it made the promise but its copy does not
/// count (it is being rebuilt after its node lost its disk): it is fenced from the old ballot
/// all the same, which is what a new primary needs of every member that may still serve the
/// tenant (docs/REPLICATION.md, "A change of primary").
pub const PROMISED_NOT_COUNTING: &str = "promised, but this copy does not count: ";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeResponse {
    Sq(Result<SqResponse, ApiError>),
    /// The head of a streamed SQ answer (a large document's `get`, `toc`, `query` or
    /// `json-export`): `len` bytes follow on the same stream as body frames of at most the frame
    /// limit each.
    SqStreamed {
        len: u64,
        json: bool,
    },
    View(Option<RegistryView>),
    /// An admin answer, typed (the gateway renders it), and the registry index the answering
    /// node has applied, so the gateway can wait to see the change in its own view.
    Admin {
        result: Result<AdminAnswer, ApiError>,
        applied_index: u64,
    },
    Raft(#[serde(with = "serde_bytes")] Vec<u8>),
    TenantUsage(Vec<TenantUsage>),
    Metrics(String),
    Gossip {
        heartbeats: Vec<(u64, u64)>,
    },
    HandoffManifest(Result<Vec<HandoffFile>, ApiError>),
    HandoffChunk(Result<Chunk, ApiError>),
    /// The head of a streamed handoff read: `len` bytes of the file follow on the same stream as
    /// body frames of at most the frame limit each.
    HandoffStreamed {
        len: u64,
    },
    /// The request could not be decoded or is not served by this kind of peer.
    Refused(String),
    /// The answer to `Identify`: the id in the answering node's config.
    Identity {
        id: u64,
    },
    /// The answer to `ViewSince`; `None` when nothing changed within the wait.
    ViewUpdate(Option<ViewUpdate>),
    /// The answer to `Gossip` from a node that the answering node's applied registry, at
    /// `applied`, records as removed: the sender was removed while it was away and never applied
    /// its own removal. Its heartbeats are not taken.
    Removed {
        applied: RegistryPosition,
    },
    /// The answer to `ViewPage`: the tenants, from the answering node's registry as it is now,
    /// and whether more follow.
    ViewPage {
        tenants: Vec<TenantView>,
        more: bool,
    },
    /// The answer to `Replicate`, one per append, in order.
    Replicated(Vec<ReplicaAck>),
    /// The answer to `Lease`, with the placement epoch the voter has applied: the node holds the
    /// lease only once its own registry has reached that epoch.
    Lease {
        granted: bool,
        epoch: u64,
    },
    /// The answer to `ConfirmDown`.
    ConfirmDown {
        confirmed: bool,
    },
    /// The answer to `Prepare`: the promise made, with where the member's log stands, or why not.
    /// A refusal that starts with [`PROMISED_NOT_COUNTING`] made the promise all the same.
    Promised(Result<ReplicaReport, String>),
    /// The answer to `FetchRecords`.
    Fetched(FetchedRecords),
    /// The answer to `CatchUp`: the backup started (or is already running) its pull, or why not.
    CatchingUp(Result<(), String>),
    /// The answer to `SnapshotTake`.
    Snapshot(Result<SnapshotListing, String>),
    /// The answer to `Enter`: `true` once the entering node's copy holds everything the
    /// primary prepared and the set the change leads to holds it on a majority, so the change
    /// may be committed (`HandoffDone`); `false` while it is being brought up; or why not.
    Entered(Result<bool, String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_defaults_follow_product_table() {
        // Goal: tier defaults match PRODUCT.md §3 (MB = 1024*1024 bytes); names round-trip.
        assert_eq!(Tier::Free.default_quota_bytes(), 25 * 1024 * 1024);
        assert_eq!(Tier::Pro.default_quota_bytes(), 250 * 1024 * 1024);
        assert_eq!(Tier::Team.default_quota_bytes(), 1024 * 1024 * 1024);
        assert_eq!(Tier::Free.default_daily_limit(), 1_000);
        assert_eq!(Tier::Pro.default_daily_limit(), 10_000);
        assert_eq!(Tier::Team.default_daily_limit(), 100_000);
        for t in [Tier::Free, Tier::Pro, Tier::Team] {
            assert_eq!(Tier::parse(t.as_str()), Some(t));
        }
        assert_eq!(Tier::parse("gold"), None);
    }
}
