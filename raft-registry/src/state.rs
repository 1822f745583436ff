//! The registry's replicated state: tenants (key hashes only), the admin key hash, nodes and the
//! placement epoch. Plain Rust types; the state machine owns the only mutable copy and publishes
//! immutable `Arc<RegistryState>` snapshots to readers.
//!
//! Maps are persistent (`imbl`), so publishing a new snapshot after every apply costs O(1) rather
//! than a deep copy of every tenant.

use std::collections::BTreeMap;
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};
use serde::{Deserialize, Serialize};

use crate::placement::Ring;

pub use proto::auth::{is_valid_key_hash, key_hash, valid_tenant_id};
pub use proto::cluster::{NodeState, Tier, MIB};

/// Most key hashes one tenant may hold. A tenant has one key (rotation replaces it); the bound
/// only stops a malformed command from bloating the registry.
pub const KEY_HASHES_PER_TENANT_MAX: usize = 8;

/// Longest node address accepted ("host:port"); bounds what a join request can make us store.
pub const NODE_ADDR_LEN_MAX: usize = 255;

/// Longest admin e-mail address kept (RFC 5321 path limit).
pub const ADMIN_EMAIL_LEN_MAX: usize = 254;

/// The most nodes active at once. Each active node costs the placement ring
/// [`crate::VNODES_PER_NODE`] virtual nodes, about 180 KiB, so this bounds the ring that a
/// snapshot or the log can make a node build (about 46 MiB at the limit); it is far beyond any
/// mesh this service runs on.
pub const ACTIVE_NODES_MAX: usize = 256;

/// Most tenant ids a registry holds, live and purged together (4,000,000): an add past it is
/// refused, so every state the registry reaches has a snapshot it can write and a follower can
/// read (`crate::snapshot`, which refuses an image claiming more). Four times the 1,000,000
/// tenants measured (docs/BENCHMARKS.md: per million, a 120 MiB snapshot and 650 MiB of state
/// machine); a node's memory, not the snapshot format, is what binds first.
pub const TENANT_IDS_MAX: usize = 4_000_000;

/// The largest replication factor (R) a cluster may set: a write waits for a majority of R
/// copies, so 5 already survives two lost nodes.
pub const REPLICAS_MAX: u8 = 5;

/// A tenant as the registry knows it. Keys appear only as hex sha256 hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: String,
    pub tier: Tier,
    pub quota_bytes: u64,
    /// Requests per day: the tier default unless an admin overrode it.
    pub daily_limit: u64,
    /// Hex sha256 of each key that currently authenticates this tenant.
    pub key_hashes: Vec<String>,
    pub enabled: bool,
    /// Disabled and data archived; the id stays taken until an explicit purge.
    pub archived: bool,
    /// Chosen by the proposer of `AddTenant`, never read from a clock while applying.
    pub created_at_ms: u64,
    pub admin_email: Option<String>,
}

impl TenantRecord {
    /// A new, enabled tenant with its tier's default quota and daily limit and one key hash.
    pub fn new(id: String, tier: Tier, key_hash: String, created_at_ms: u64) -> TenantRecord {
        TenantRecord {
            id,
            tier,
            quota_bytes: tier.default_quota_bytes(),
            daily_limit: tier.default_daily_limit(),
            key_hashes: vec![key_hash],
            enabled: true,
            archived: false,
            created_at_ms,
            admin_email: None,
        }
    }
}

/// A cluster node as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    /// QUIC socket address ("host:port") other nodes and gateways dial.
    pub addr: String,
    pub state: NodeState,
}

/// A node's last mark down or up (`Command::MarkDownAfter`, `Command::MarkUpAfter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Liveness {
    pub down: bool,
    /// The placement epoch the mark made.
    pub epoch: u64,
}

/// A tenant whose owner changed with the placement epoch and whose data has not yet reached
/// the new owner. Until [`crate::Command::HandoffDone`] the new owner does not serve it and the
/// old owner refuses it, so no epoch ever has two serving owners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    pub tenant: String,
    pub from: u64,
    pub to: u64,
    /// The placement epoch that moved the tenant.
    pub epoch: u64,
}

/// The replicated registry. Cheap to clone; mutated only by [`crate::command`].
#[derive(Debug, Clone)]
pub struct RegistryState {
    /// Keys and records are shared (`Arc`): publishing the state after a commit shares the
    /// maps' nodes, and the next change copies the nodes on its path, 64 entries each; shared
    /// entries make that copy a count increment per entry, not an allocation per string.
    pub(crate) tenants: OrdMap<Arc<str>, Arc<TenantRecord>>,
    /// key hash → tenant id, for every hash of every tenant (archived ones too, so a key hash is
    /// never handed to two tenants).
    pub(crate) by_key_hash: OrdMap<Arc<str>, Arc<str>>,
    pub(crate) admin_key_hash: Option<String>,
    pub(crate) nodes: OrdMap<u64, NodeRecord>,
    pub(crate) placement_epoch: u64,
    /// Handoffs not yet done, by tenant id.
    pub(crate) handoffs: OrdMap<String, Handoff>,
    /// Ids of purged tenants: their records are gone, their data is deleted wherever a node
    /// still holds it, and the ids are never reused (a copy left on a node that was down during
    /// the purge can never be taken for a new tenant's data).
    pub(crate) purged: OrdSet<String>,
    /// R: how many nodes hold each tenant ([`Self::replica_set`]), 1 to [`REPLICAS_MAX`].
    pub(crate) replicas: u8,
    /// Nodes ever marked down (`Command::MarkDownAfter`), with whether they are down now and the
    /// placement epoch of their last mark down or up.
    pub(crate) liveness: OrdMap<u64, Liveness>,
    /// Built from the active nodes whenever they change; shared between snapshots.
    pub(crate) ring: Arc<Ring>,
}

impl Default for RegistryState {
    fn default() -> Self {
        RegistryState {
            tenants: OrdMap::new(),
            by_key_hash: OrdMap::new(),
            admin_key_hash: None,
            nodes: OrdMap::new(),
            placement_epoch: 0,
            handoffs: OrdMap::new(),
            purged: OrdSet::new(),
            replicas: 1,
            liveness: OrdMap::new(),
            ring: Arc::new(Ring::new(&[])),
        }
    }
}

impl PartialEq for RegistryState {
    // The ring and the key index are derived from the other fields.
    fn eq(&self, other: &Self) -> bool {
        self.tenants == other.tenants
            && self.admin_key_hash == other.admin_key_hash
            && self.nodes == other.nodes
            && self.placement_epoch == other.placement_epoch
            && self.handoffs == other.handoffs
            && self.purged == other.purged
            && self.replicas == other.replicas
            && self.liveness == other.liveness
    }
}

impl RegistryState {
    pub fn tenant(&self, id: &str) -> Option<&TenantRecord> {
        self.tenants.get(id).map(|t| &**t)
    }

    /// True if the tenant `id` was purged: no record, data to be deleted, id retired.
    pub fn is_purged(&self, id: &str) -> bool {
        self.purged.contains(id)
    }

    /// Ids of purged tenants, ordered.
    pub fn purged(&self) -> impl Iterator<Item = &String> + '_ {
        self.purged.iter()
    }

    /// All tenants, ordered by id.
    pub fn tenants(&self) -> impl Iterator<Item = &TenantRecord> + '_ {
        self.tenants.values().map(|t| &**t)
    }

    /// Tenants with an id after `after` (all of them when `None`), ordered by id. Starting
    /// costs O(log tenants), so a listing pages through any number in pieces.
    pub fn tenants_after<'a>(
        &'a self,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = &'a TenantRecord> + 'a {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.tenants.range::<_, str>((start, Bound::Unbounded)).map(|(_, t)| &**t)
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// The tenant a key hash belongs to, whatever its enabled/archived flags (callers check them).
    pub fn tenant_by_key_hash(&self, key_hash: &str) -> Option<&TenantRecord> {
        let id = self.by_key_hash.get(key_hash)?;
        self.tenant(id)
    }

    pub fn admin_key_hash(&self) -> Option<&str> {
        self.admin_key_hash.as_deref()
    }

    pub fn node(&self, id: u64) -> Option<&NodeRecord> {
        self.nodes.get(&id)
    }

    /// Every node ever recorded (Removed ones included), ordered by id.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> + '_ {
        self.nodes.values()
    }

    pub fn placement_epoch(&self) -> u64 {
        self.placement_epoch
    }

    /// Ids of the nodes in state `Active`, ascending.
    pub fn active_nodes(&self) -> Vec<u64> {
        self.nodes.values().filter(|n| n.state == NodeState::Active).map(|n| n.id).collect()
    }

    /// The placement ring over [`Self::active_nodes`].
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The pending handoff of a tenant, if its data is still on the way to its new owner.
    pub fn handoff(&self, tenant_id: &str) -> Option<&Handoff> {
        self.handoffs.get(tenant_id)
    }

    /// Every pending handoff, ordered by tenant id.
    pub fn handoffs(&self) -> impl Iterator<Item = &Handoff> + '_ {
        self.handoffs.values()
    }

    /// R, the replication factor: how many nodes hold each tenant.
    pub fn replicas(&self) -> usize {
        usize::from(self.replicas)
    }

    /// The nodes that hold `tenant_id` in this placement epoch, its owner (the primary) first:
    /// the first R distinct active nodes on the ring (fewer when fewer are active). With R > 1,
    /// while a join or drain changes the set (a pending [`Handoff`]), the node leaving it stays
    /// in it, last, until the node entering it holds the tenant (`Command::HandoffDone`): R + 1
    /// members, of which any majority meets a majority of the set before and of the set after
    /// (docs/REPLICATION.md, "Joins and drains").
    pub fn replica_set(&self, tenant_id: &str) -> Vec<u64> {
        let mut set = self.settled_set(tenant_id);
        if let Some(h) = self.replica_change(tenant_id) {
            if !set.contains(&h.from) {
                set.push(h.from);
            }
        }
        set
    }

    /// The replica set `tenant_id` has once any change of it is done: the first R distinct
    /// active nodes on the ring, the owner first.
    pub fn settled_set(&self, tenant_id: &str) -> Vec<u64> {
        self.ring.replicas(tenant_id, self.replicas())
    }

    /// With R > 1, the pending change of `tenant_id`'s replica set: `to` enters it, `from`
    /// leaves it once `to` holds the tenant (`from` = `to` when a set below R grows). `None` with R = 1 (a handoff then moves the only
    /// copy: `Self::handoff`).
    pub fn replica_change(&self, tenant_id: &str) -> Option<&Handoff> {
        if self.replicas() <= 1 {
            return None;
        }
        self.handoffs.get(tenant_id)
    }

    /// The node that serves `tenant_id`: the first node of its replica set that is not marked
    /// down (its owner while that is up), never a node still entering the set (it holds nothing
    /// yet); `None` when every other node of the set is down.
    pub fn primary_of(&self, tenant_id: &str) -> Option<u64> {
        self.primary_in(tenant_id, &self.replica_set(tenant_id))
    }

    /// [`Self::primary_of`], given the tenant's [`Self::replica_set`] already computed.
    pub fn primary_in(&self, tenant_id: &str, set: &[u64]) -> Option<u64> {
        let entering = self.replica_change(tenant_id).map(|h| h.to);
        set.iter().copied().find(|&n| !self.is_down(n) && Some(n) != entering)
    }

    /// How many tenants hold fewer usable copies than R: their replica set is smaller than R
    /// (fewer active nodes than R), holds a node marked down, or is growing and its entering
    /// node does not hold the tenant yet (R raised, or a set below R growing back by a join).
    /// 0 with R = 1. O(tenants) only while a node is down, O(pending changes) otherwise.
    pub fn under_replicated(&self) -> usize {
        let r = self.replicas();
        if r <= 1 {
            return 0;
        }
        if self.ring.node_ids().len() < r {
            return self.tenants.len();
        }
        if !self.liveness.values().any(|l| l.down) {
            return self.handoffs.values().filter(|h| h.from == h.to).count();
        }
        let growing = |id: &str| self.handoffs.get(id).is_some_and(|h| h.from == h.to);
        self.tenants
            .keys()
            .filter(|id| growing(id) || self.replica_set(id).iter().any(|&n| self.is_down(n)))
            .count()
    }

    /// Whether the registry marked `node` down: it stopped renewing its lease with the voters
    /// (`Command::MarkDownAfter`), and has not come back since (`Command::MarkUpAfter`).
    pub fn is_down(&self, node: u64) -> bool {
        self.liveness.get(&node).is_some_and(|l| l.down)
    }

    /// The last mark down or up of `node`, if it was ever marked down.
    pub fn liveness(&self, node: u64) -> Option<Liveness> {
        self.liveness.get(&node).copied()
    }

    /// The placement epoch of `node`'s last mark down or up; 0 if it was never marked.
    pub fn mark_epoch(&self, node: u64) -> u64 {
        self.liveness(node).map_or(0, |l| l.epoch)
    }

    /// Every node ever marked down, with its last mark, by id.
    pub fn liveness_marks(&self) -> impl Iterator<Item = (u64, Liveness)> + '_ {
        self.liveness.iter().map(|(id, l)| (*id, *l))
    }

    /// The node that owns `tenant_id` in this placement epoch; `None` with no active node.
    pub fn owner_of(&self, tenant_id: &str) -> Option<u64> {
        self.ring.owner(tenant_id)
    }

    /// Number of tenants each active node owns (every active node appears, possibly with 0).
    /// O(tenants × log(ring points)): for health pages, not per request.
    pub fn owner_counts(&self) -> BTreeMap<u64, usize> {
        let mut counts: BTreeMap<u64, usize> =
            self.ring.node_ids().iter().map(|&id| (id, 0)).collect();
        for id in self.tenants.keys() {
            if let Some(owner) = self.ring.owner(id) {
                *counts.entry(owner).or_default() += 1;
            }
        }
        counts
    }

    /// Rebuilds the ring after the active set changed. Callers bump the epoch.
    pub(crate) fn rebuild_ring(&mut self) {
        self.ring = Arc::new(Ring::new(&self.active_nodes()));
    }

    /// Rebuilds a state from its serialised parts (snapshot load), recomputing derived fields.
    pub(crate) fn from_parts(
        tenants: Vec<TenantRecord>,
        admin_key_hash: Option<String>,
        nodes: Vec<NodeRecord>,
        placement_epoch: u64,
        handoffs: Vec<Handoff>,
        purged: Vec<String>,
    ) -> RegistryState {
        let mut state = RegistryState { admin_key_hash, placement_epoch, ..Default::default() };
        for h in handoffs {
            state.load_handoff(h);
        }
        for node in nodes {
            state.nodes.insert(node.id, node);
        }
        for tenant in tenants {
            state.load_tenant(tenant);
        }
        for id in purged {
            state.load_purged(id);
        }
        state.rebuild_ring();
        state
    }

    /// Adds a tenant read from a snapshot image, with its key hashes; no rule is checked (the
    /// image was made of a state that kept them).
    pub(crate) fn load_tenant(&mut self, tenant: TenantRecord) {
        self.insert_tenant(tenant);
    }

    /// Stores `tenant` (new or changed) and indexes its key hashes; callers remove hashes it no
    /// longer holds.
    pub(crate) fn insert_tenant(&mut self, tenant: TenantRecord) {
        let id: Arc<str> = Arc::from(tenant.id.as_str());
        for hash in &tenant.key_hashes {
            self.by_key_hash.insert(Arc::from(hash.as_str()), id.clone());
        }
        self.tenants.insert(id, Arc::new(tenant));
    }

    /// Adds a handoff read from a snapshot image.
    pub(crate) fn load_handoff(&mut self, handoff: Handoff) {
        self.handoffs.insert(handoff.tenant.clone(), handoff);
    }

    /// Adds a purged tenant id read from a snapshot image.
    pub(crate) fn load_purged(&mut self, id: String) {
        self.purged.insert(id);
    }
}
