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
use sha2::{Digest, Sha256};

use crate::placement::Ring;

/// One mebibyte; PRODUCT.md's "MB" is 1024 * 1024 bytes.
pub const MIB: u64 = 1024 * 1024;

/// Longest tenant id: `[a-z0-9][a-z0-9-]{0,62}` (PRODUCT.md §2), so it fits a DNS label.
pub const TENANT_ID_LEN_MAX: usize = 63;

/// Length of a hex sha256 digest, the only form in which a key enters the registry.
pub const KEY_HASH_HEX_LEN: usize = 64;

/// Most key hashes one tenant may hold. A tenant has one key (rotation replaces it); the bound
/// only stops a malformed command from bloating the registry.
pub const KEY_HASHES_PER_TENANT_MAX: usize = 8;

/// Longest node address accepted ("host:port"); bounds what a join request can make us store.
pub const NODE_ADDR_LEN_MAX: usize = 255;

/// Longest admin e-mail address kept (RFC 5321 path limit).
pub const ADMIN_EMAIL_LEN_MAX: usize = 254;

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
        match name {
            "free" => Some(Tier::Free),
            "pro" => Some(Tier::Pro),
            "team" => Some(Tier::Team),
            _ => None,
        }
    }
}

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

/// A cluster node as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    /// QUIC socket address ("host:port") other nodes and gateways dial.
    pub addr: String,
    pub state: NodeState,
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
    pub(crate) tenants: OrdMap<String, TenantRecord>,
    /// key hash → tenant id, for every hash of every tenant (archived ones too, so a key hash is
    /// never handed to two tenants).
    pub(crate) by_key_hash: OrdMap<String, String>,
    pub(crate) admin_key_hash: Option<String>,
    pub(crate) nodes: OrdMap<u64, NodeRecord>,
    pub(crate) placement_epoch: u64,
    /// Handoffs not yet done, by tenant id.
    pub(crate) handoffs: OrdMap<String, Handoff>,
    /// Ids of purged tenants: their records are gone, their data is deleted wherever a node
    /// still holds it, and the ids are never reused (a copy left on a node that was down during
    /// the purge can never be taken for a new tenant's data).
    pub(crate) purged: OrdSet<String>,
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
    }
}

impl RegistryState {
    pub fn tenant(&self, id: &str) -> Option<&TenantRecord> {
        self.tenants.get(id)
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
        self.tenants.values()
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    /// The tenant a key hash belongs to, whatever its enabled/archived flags (callers check them).
    pub fn tenant_by_key_hash(&self, key_hash: &str) -> Option<&TenantRecord> {
        let id = self.by_key_hash.get(key_hash)?;
        self.tenants.get(id)
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
        let mut state = RegistryState {
            admin_key_hash,
            placement_epoch,
            purged: purged.into_iter().collect(),
            ..Default::default()
        };
        for h in handoffs {
            state.handoffs.insert(h.tenant.clone(), h);
        }
        for node in nodes {
            state.nodes.insert(node.id, node);
        }
        for tenant in tenants {
            for hash in &tenant.key_hashes {
                state.by_key_hash.insert(hash.clone(), tenant.id.clone());
            }
            state.tenants.insert(tenant.id.clone(), tenant);
        }
        state.rebuild_ring();
        state
    }
}

/// Hex sha256 of a key: the only form in which a tenant or admin key reaches the registry.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// True when `id` matches `[a-z0-9][a-z0-9-]{0,62}`.
pub fn is_valid_tenant_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    let Some(first) = bytes.first() else {
        return false;
    };
    let lower_alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    bytes.len() <= TENANT_ID_LEN_MAX
        && lower_alnum(first)
        && bytes[1..].iter().all(|b| lower_alnum(b) || *b == b'-')
}

/// True when `hash` looks like [`key_hash`]'s output: 64 lower-case hex digits.
pub fn is_valid_key_hash(hash: &str) -> bool {
    hash.len() == KEY_HASH_HEX_LEN
        && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_id_grammar() {
        // Goal: the id grammar accepts exactly [a-z0-9][a-z0-9-]{0,62}.
        let long_ok = format!("a{}", "-".repeat(62));
        let too_long = format!("a{}", "b".repeat(63));
        for ok in ["a", "0", "acme", "a-b-c", "9lives", long_ok.as_str()] {
            assert!(is_valid_tenant_id(ok), "{ok:?} should be valid");
        }
        for bad in ["", "-a", "A", "acme_1", "a.b", "a/b", "ä", too_long.as_str(), "a b"] {
            assert!(!is_valid_tenant_id(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn key_hash_is_sha256_hex() {
        // Goal: key_hash is lower-case hex sha256 and passes the hash validator.
        let h = key_hash("abc");
        assert_eq!(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(is_valid_key_hash(&h));
        assert!(!is_valid_key_hash("pmb-v1-0123"));
        assert!(!is_valid_key_hash(&h.to_uppercase()));
    }

    #[test]
    fn tier_defaults_follow_product_table() {
        // Goal: tier defaults match PRODUCT.md §3 (MB = 1024*1024 bytes).
        assert_eq!(Tier::Free.default_quota_bytes(), 25 * 1024 * 1024);
        assert_eq!(Tier::Pro.default_quota_bytes(), 250 * 1024 * 1024);
        assert_eq!(Tier::Team.default_quota_bytes(), 1024 * 1024 * 1024);
        assert_eq!(Tier::Free.default_daily_limit(), 1_000);
        assert_eq!(Tier::Pro.default_daily_limit(), 10_000);
        assert_eq!(Tier::Team.default_daily_limit(), 100_000);
        for t in [Tier::Free, Tier::Pro, Tier::Team] {
            assert_eq!(Tier::parse(t.as_str()), Some(t));
        }
    }
}
