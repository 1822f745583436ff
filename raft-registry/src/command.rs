//! Commands that change the registry, and their deterministic application.
//!
//! `apply` is a pure function of (state, command): no clock, no randomness, no I/O. Every value
//! that depends on time (`created_at_ms`) travels inside the command, chosen by the proposer. A
//! command is either applied whole or rejected with a typed [`Rejection`] and no change.

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::state::{
    is_valid_key_hash, valid_tenant_id, Handoff, Liveness, NodeRecord, NodeState, RegistryState,
    TenantRecord, Tier, ACTIVE_NODES_MAX, ADMIN_EMAIL_LEN_MAX, KEY_HASHES_PER_TENANT_MAX,
    NODE_ADDR_LEN_MAX, REPLICAS_MAX, TENANT_IDS_MAX,
};

/// Every change to the registry. Serialised into the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds a tenant exactly as given (build it with [`TenantRecord::new`] for tier defaults).
    /// Its id must be free and every key hash valid and unused.
    AddTenant(TenantRecord),
    /// Changes the given fields. A new `tier` resets quota and daily limit to its defaults unless
    /// the same command overrides them.
    UpdateTenant {
        id: String,
        tier: Option<Tier>,
        quota_bytes: Option<u64>,
        daily_limit: Option<u64>,
        enabled: Option<bool>,
    },
    /// Replaces every key hash of the tenant with `new_hash`: old keys stop working.
    RotateKey {
        id: String,
        new_hash: String,
    },
    DisableTenant {
        id: String,
    },
    /// Disables the tenant and marks its data archived; nothing is destroyed.
    ArchiveTenant {
        id: String,
    },
    SetAdminKeyHash {
        hash: String,
    },
    /// Records a new node as `Joining`. Refused if the id was ever used.
    NodeJoin {
        id: u64,
        addr: String,
    },
    /// `Joining`/`Draining` → `Active`; bumps the placement epoch.
    NodeActivate {
        id: u64,
    },
    /// `Active` → `Draining`; bumps the placement epoch (its tenants move away).
    NodeDrain {
        id: u64,
    },
    /// `Joining`/`Draining` → `Removed`. An `Active` node must be drained first, and no handoff
    /// may still involve it.
    NodeRemove {
        id: u64,
    },
    /// The new owner holds the tenant's data: it may serve it from now on.
    HandoffDone {
        tenant: String,
        epoch: u64,
    },
    /// Destroys an archived tenant: its record and keys go, a pending handoff of it is cancelled
    /// (a purge never waits on a move whose source may be down for good), every node deletes any
    /// copy it holds, and the id is retired. Purging an id already purged changes nothing and
    /// succeeds.
    PurgeTenant {
        id: String,
    },
    /// Several commands in one log entry, applied in order, each accepted or rejected on its
    /// own (one refusal does not undo the others). Concurrent writes are grouped this way, so
    /// a burst of them costs one Raft round ([`crate::registry::Registry::write`]). At most
    /// [`BATCH_COMMANDS_MAX`], none of them a batch.
    Batch(Vec<Command>),
    /// Sets R as [`Command::ChangeReplicas`] does, except that with tenants it is never raised
    /// from 1 ([`Rejection::ReplicasRaisedFromOne`]). Kept so that entries logged by builds
    /// that proposed it apply as they did: a node replaying its log after its snapshot must
    /// reach the state the others reached. Nothing proposes it now.
    SetReplicas {
        replicas: u8,
    },
    /// A majority of voters confirmed that node `id` has not renewed its lease for the down
    /// time, and refuse it a lease until it is marked up: it is down. Bumps the placement epoch.
    /// Only an active node that is not down may be marked down. Kept so that entries logged by
    /// builds that proposed it apply as they did; nodes propose [`Command::MarkDownAfter`].
    MarkDown {
        id: u64,
    },
    /// A node marked down renews its lease again. Bumps the placement epoch. Kept as
    /// [`Command::MarkDown`] is; nodes propose [`Command::MarkUpAfter`].
    MarkUp {
        id: u64,
    },
    /// Sets R, the number of nodes that hold each tenant (docs/REPLICATION.md): 1 to
    /// [`REPLICAS_MAX`]. A cluster of fewer active nodes keeps as many copies as it has nodes.
    /// With tenants, R moves by one at a time, from 1 too.
    ChangeReplicas {
        replicas: u8,
    },
    /// Node `id` found its tenant store lost (a wiped or replaced disk) when its registry was at
    /// placement epoch `epoch`. Moves the epoch past `epoch`, unless it has moved since: the
    /// node may have led tenants under ballots up to `epoch` and no longer knows what it wrote
    /// under them, so it leads again only under a later one (docs/REPLICATION.md, "A wiped
    /// disk"). Only an active or draining node.
    StoreLost {
        id: u64,
        epoch: u64,
    },
    /// [`Command::MarkDown`], decided while the node's latest mark had placement epoch
    /// `last_mark` (0: never marked), and applied only if it still has
    /// ([`Rejection::StaleMark`]). A leader decides a mark on its view of the node; if the
    /// command is committed after a later mark (the leader was paused or deposed during its
    /// confirmation round, and a new leader marked the node meanwhile), that view is gone and
    /// the command with it. Without this, a node just marked up was marked down again by a
    /// deposed leader's late round, and its tenants moved away and back.
    MarkDownAfter {
        id: u64,
        last_mark: u64,
    },
    /// [`Command::MarkUp`], under the same condition as [`Command::MarkDownAfter`].
    MarkUpAfter {
        id: u64,
        last_mark: u64,
    },
}

/// The most commands one [`Command::Batch`] carries. A command is well under 512 bytes (an id of
/// 63, a key hash of 64, an e-mail of 254), so a batch stays under 32 KiB and an AppendEntries
/// RPC of [`crate::config::APPEND_ENTRIES_MAX`] of them under 10 MiB, inside the RPC limit.
pub const BATCH_COMMANDS_MAX: usize = 64;

/// Why the state machine refused a command. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("tenant id must match [a-z0-9][a-z0-9-]{{0,62}}")]
    InvalidTenantId,
    #[error("key hashes must be 1 to {KEY_HASHES_PER_TENANT_MAX} distinct sha256 hex digests")]
    InvalidKeyHash,
    #[error("node address is empty or longer than {NODE_ADDR_LEN_MAX} bytes")]
    InvalidNodeAddr,
    #[error("admin e-mail is longer than {ADMIN_EMAIL_LEN_MAX} bytes")]
    InvalidEmail,
    #[error("tenant already exists")]
    TenantExists,
    #[error("no such tenant")]
    NoSuchTenant,
    #[error("tenant id was purged; purged ids are never reused")]
    TenantIdPurged,
    #[error("only an archived tenant can be purged; delete (archive) it first")]
    TenantNotArchived,
    #[error("tenant is archived")]
    TenantArchived,
    #[error("key hash already belongs to another tenant")]
    KeyHashInUse,
    #[error("node id {0} was already used; ids are never reused")]
    NodeIdUsed(u64),
    #[error("no such node {0}")]
    NoSuchNode(u64),
    #[error("node {id} cannot go from {from:?} to {to:?}")]
    InvalidNodeTransition { id: u64, from: NodeState, to: NodeState },
    #[error("node {0} is the last active node")]
    LastActiveNode(u64),
    #[error("{0} tenant handoffs are still in progress; placement changes one at a time")]
    HandoffsPending(usize),
    #[error("no pending handoff of that tenant in that epoch")]
    NoSuchHandoff,
    #[error("node {0} still owns tenants; drain it first")]
    NodeOwnsTenants(u64),
    #[error("{ACTIVE_NODES_MAX} nodes are active already, the most a cluster may have")]
    TooManyActiveNodes,
    #[error("the registry holds {TENANT_IDS_MAX} tenant ids (live and purged), the most it may")]
    TooManyTenants,
    #[error("a batch holds 1 to {BATCH_COMMANDS_MAX} commands, none of them a batch")]
    InvalidBatch,
    #[error("the replication factor must be 1 to {REPLICAS_MAX}")]
    InvalidReplicas,
    /// Only for [`Command::SetReplicas`], which older builds proposed.
    #[error("a cluster with R = 1 and tenants ({0} of them) is not raised by this older command")]
    ReplicasRaisedFromOne(usize),
    #[error(
        "with R = {replicas}, a node can be drained only while more than R nodes are active \
         ({active} are): each replica set it leaves must take another node in its place"
    )]
    TooFewNodesForReplicas { replicas: u8, active: usize },
    #[error("node {0} is already marked down")]
    AlreadyDown(u64),
    #[error("node {0} is not marked down")]
    NotDown(u64),
    #[error(
        "with tenants, R changes by one at a time (from {from} to {to} asked): every replica set \
         gains or loses one node per change, and a change waits for the one before it"
    )]
    ReplicasChangedByMoreThanOne { from: u8, to: u8 },
    #[error("node {0} is neither active nor draining, so it holds no tenant's copy")]
    NotAMember(u64),
    #[error(
        "node {id} was marked down or up again (epoch {now}) since this mark was decided \
         (epoch {decided})"
    )]
    StaleMark { id: u64, decided: u64, now: u64 },
}

/// What the state machine answers for every applied log entry (the Raft `R` type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReply {
    /// The command's outcome; for a [`Command::Batch`], `Ok` when the batch itself was well
    /// formed, each command's own outcome being in `batch`.
    pub outcome: Result<(), Rejection>,
    /// The placement epoch after this entry.
    pub placement_epoch: u64,
    /// The outcome of each command of a batch, in order; empty for any other command.
    pub batch: Vec<Result<(), Rejection>>,
}

/// Applies `cmd` to `state`, or rejects it leaving `state` untouched.
pub fn apply(state: &mut RegistryState, cmd: Command) -> Result<(), Rejection> {
    match cmd {
        Command::AddTenant(new) => add_tenant(state, new),
        Command::UpdateTenant { id, tier, quota_bytes, daily_limit, enabled } => {
            update_tenant(state, &id, |t| set_limits(t, tier, quota_bytes, daily_limit, enabled))
        }
        Command::RotateKey { id, new_hash } => rotate_key(state, &id, new_hash),
        Command::DisableTenant { id } => update_tenant(state, &id, |t| {
            t.enabled = false;
            Ok(())
        }),
        Command::ArchiveTenant { id } => update_tenant(state, &id, |t| {
            t.enabled = false;
            t.archived = true;
            Ok(())
        }),
        Command::SetAdminKeyHash { hash } => {
            if !is_valid_key_hash(&hash) {
                return Err(Rejection::InvalidKeyHash);
            }
            state.admin_key_hash = Some(hash);
            Ok(())
        }
        Command::NodeJoin { id, addr } => node_join(state, id, addr),
        Command::NodeActivate { id } => node_transition(state, id, NodeState::Active),
        Command::NodeDrain { id } => node_transition(state, id, NodeState::Draining),
        Command::NodeRemove { id } => node_transition(state, id, NodeState::Removed),
        Command::HandoffDone { tenant, epoch } => handoff_done(state, &tenant, epoch),
        Command::PurgeTenant { id } => purge_tenant(state, &id),
        // The state machine applies a batch's commands one by one (state_machine::apply_one).
        Command::Batch(_) => Err(Rejection::InvalidBatch),
        Command::SetReplicas { replicas } => set_replicas(state, replicas, false),
        Command::ChangeReplicas { replicas } => set_replicas(state, replicas, true),
        Command::MarkDown { id } => mark_down(state, id),
        Command::MarkUp { id } => mark_up(state, id),
        Command::StoreLost { id, epoch } => store_lost(state, id, epoch),
        Command::MarkDownAfter { id, last_mark } => {
            mark_unchanged(state, id, last_mark)?;
            mark_down(state, id)
        }
        Command::MarkUpAfter { id, last_mark } => {
            mark_unchanged(state, id, last_mark)?;
            mark_up(state, id)
        }
    }
}

/// A tenant's tier (and with it its default limits), quota, daily limit and enabled flag, as an
/// `UpdateTenant` sets them; an archived tenant is never enabled again.
fn set_limits(
    t: &mut TenantRecord,
    tier: Option<Tier>,
    quota_bytes: Option<u64>,
    daily_limit: Option<u64>,
    enabled: Option<bool>,
) -> Result<(), Rejection> {
    if enabled == Some(true) && t.archived {
        return Err(Rejection::TenantArchived);
    }
    if let Some(tier) = tier {
        t.tier = tier;
        t.quota_bytes = tier.default_quota_bytes();
        t.daily_limit = tier.default_daily_limit();
    }
    t.quota_bytes = quota_bytes.unwrap_or(t.quota_bytes);
    t.daily_limit = daily_limit.unwrap_or(t.daily_limit);
    t.enabled = enabled.unwrap_or(t.enabled);
    Ok(())
}

/// The tenant's handoff recorded at `epoch` is done.
fn handoff_done(state: &mut RegistryState, tenant: &str, epoch: u64) -> Result<(), Rejection> {
    match state.handoffs.get(tenant) {
        Some(h) if h.epoch == epoch => {
            // With R > 1 the leaving node leaves the set now; if the tenant's primary changes
            // with it (the entering node heads the set, or the leaving one led it), the new
            // primary needs a ballot of its own: the epoch moves.
            let primary_before = state.primary_of(tenant);
            state.handoffs.remove(tenant);
            if state.replicas() > 1 && state.primary_of(tenant) != primary_before {
                state.placement_epoch += 1;
            }
            Ok(())
        }
        _ => Err(Rejection::NoSuchHandoff),
    }
}

/// An active node is marked down: a new placement epoch, in which its tenants have other
/// primaries.
fn mark_down(state: &mut RegistryState, id: u64) -> Result<(), Rejection> {
    let node = state.nodes.get(&id).ok_or(Rejection::NoSuchNode(id))?;
    if node.state != NodeState::Active {
        let from = node.state;
        return Err(Rejection::InvalidNodeTransition { id, from, to: NodeState::Active });
    }
    if state.is_down(id) {
        return Err(Rejection::AlreadyDown(id));
    }
    state.placement_epoch += 1;
    state.liveness.insert(id, Liveness { down: true, epoch: state.placement_epoch });
    Ok(())
}

/// Whether `id`'s latest mark is still the one of epoch `last_mark` (0: never marked).
fn mark_unchanged(state: &RegistryState, id: u64, last_mark: u64) -> Result<(), Rejection> {
    let now = state.mark_epoch(id);
    if now != last_mark {
        return Err(Rejection::StaleMark { id, decided: last_mark, now });
    }
    Ok(())
}

/// A node marked down is up again: a new placement epoch.
fn mark_up(state: &mut RegistryState, id: u64) -> Result<(), Rejection> {
    if !state.is_down(id) {
        return Err(Rejection::NotDown(id));
    }
    state.placement_epoch += 1;
    state.liveness.insert(id, Liveness { down: false, epoch: state.placement_epoch });
    Ok(())
}

/// A member lost its tenant store at placement epoch `epoch`: the epoch moves past it, unless
/// it already has (a retry moves nothing).
fn store_lost(state: &mut RegistryState, id: u64, epoch: u64) -> Result<(), Rejection> {
    let node = state.nodes.get(&id).ok_or(Rejection::NoSuchNode(id))?;
    if !matches!(node.state, NodeState::Active | NodeState::Draining) {
        return Err(Rejection::NotAMember(id));
    }
    if state.placement_epoch <= epoch {
        state.placement_epoch += 1;
    }
    Ok(())
}

/// Whether `commands` may form one [`Command::Batch`].
pub fn valid_batch(commands: &[Command]) -> bool {
    (1..=BATCH_COMMANDS_MAX).contains(&commands.len())
        && !commands.iter().any(|c| matches!(c, Command::Batch(_)))
}

/// Sets R. With tenants, R moves by one at a time, and a raise is a placement change like a join
/// that grows sets below R: each set gains the next node on the ring, recorded as a change with
/// `from` = `to`, and the entering copy is caught up before it counts alone
/// (docs/REPLICATION.md, "Changing R"). A lowered R drops the last node of each set, under a new
/// epoch; a majority of the smaller set still meets every write acknowledged before, which
/// lowered by two or more at once it need not. A raise from 1 only if `from_one` (it is for
/// [`Command::ChangeReplicas`], not for the older [`Command::SetReplicas`]).
fn set_replicas(state: &mut RegistryState, replicas: u8, from_one: bool) -> Result<(), Rejection> {
    if !(1..=REPLICAS_MAX).contains(&replicas) {
        return Err(Rejection::InvalidReplicas);
    }
    if replicas == state.replicas {
        return Ok(());
    }
    // A pending handoff moves one copy (R = 1) or changes one set by a node (R > 1): either is
    // planned for the R it was recorded under.
    if !state.handoffs.is_empty() {
        return Err(Rejection::HandoffsPending(state.handoffs.len()));
    }
    if state.tenants.is_empty() {
        state.replicas = replicas;
        return Ok(());
    }
    if replicas.abs_diff(state.replicas) > 1 {
        return Err(Rejection::ReplicasChangedByMoreThanOne { from: state.replicas, to: replicas });
    }
    if replicas < state.replicas {
        // Each set loses its last node: a new configuration (the sweep deletes the copies that
        // left once the epoch is past the one they arrived in).
        let shrinks = state.ring.node_ids().len() > usize::from(replicas);
        state.replicas = replicas;
        if shrinks {
            state.placement_epoch += 1;
        }
        return Ok(());
    }
    if state.replicas == 1 && !from_one {
        return Err(Rejection::ReplicasRaisedFromOne(state.tenants.len()));
    }
    let (before, r_before) = (state.ring.clone(), state.replicas());
    state.replicas = replicas;
    if state.ring.node_ids().len() > r_before {
        // Some set grows: a new configuration, so a new ballot for every tenant, as at a join.
        state.placement_epoch += 1;
        record_handoffs(state, &before, r_before);
    }
    Ok(())
}

fn purge_tenant(state: &mut RegistryState, id: &str) -> Result<(), Rejection> {
    if state.purged.contains(id) {
        return Ok(());
    }
    let record = state.tenants.get(id).ok_or(Rejection::NoSuchTenant)?;
    if !record.archived {
        return Err(Rejection::TenantNotArchived);
    }
    // The data goes everywhere, so there is nothing left to move.
    state.handoffs.remove(id);
    for hash in &record.key_hashes {
        state.by_key_hash.remove(hash.as_str());
    }
    state.tenants.remove(id);
    state.purged.insert(id.to_string());
    Ok(())
}

/// Records a handoff for every tenant whose owner (R = 1) or replica set (R > 1) differs
/// between sets of `r_before` nodes on the `before` ring and sets of R on today's. A tenant with
/// no owner before (no active node) has no data anywhere and needs none. With R > 1, `to` is the
/// node entering the set and `from` the node leaving it (a join, or a drain of more than R active
/// nodes, changes a set by one node in for at most one out; a raise of R by one on the same ring
/// adds one node); a set that gains a node loses none, and is recorded with `from` = `to`.
fn record_handoffs(state: &mut RegistryState, before: &crate::Ring, r_before: usize) {
    let epoch = state.placement_epoch;
    let r = state.replicas();
    let moves: Vec<Handoff> = state
        .tenants
        .keys()
        .filter_map(|id| {
            let tenant = id.to_string();
            if r > 1 {
                let (old, new) = (before.replicas(id, r_before), state.ring.replicas(id, r));
                if old.is_empty() {
                    return None;
                }
                let to = new.iter().copied().find(|n| !old.contains(n))?;
                let from = old.iter().copied().find(|n| !new.contains(n)).unwrap_or(to);
                return Some(Handoff { tenant, from, to, epoch });
            }
            let (from, to) = (before.owner(id)?, state.ring.owner(id)?);
            (from != to).then_some(Handoff { tenant, from, to, epoch })
        })
        .collect();
    for h in moves {
        state.handoffs.insert(h.tenant.clone(), h);
    }
}

fn add_tenant(state: &mut RegistryState, record: TenantRecord) -> Result<(), Rejection> {
    if !valid_tenant_id(&record.id) {
        return Err(Rejection::InvalidTenantId);
    }
    let hashes = &record.key_hashes;
    let distinct = hashes.iter().collect::<std::collections::BTreeSet<_>>().len() == hashes.len();
    let valid = hashes.iter().all(|h| is_valid_key_hash(h));
    if hashes.is_empty() || hashes.len() > KEY_HASHES_PER_TENANT_MAX || !distinct || !valid {
        return Err(Rejection::InvalidKeyHash);
    }
    if record.admin_email.as_ref().is_some_and(|e| e.len() > ADMIN_EMAIL_LEN_MAX) {
        return Err(Rejection::InvalidEmail);
    }
    if state.tenants.contains_key(record.id.as_str()) {
        return Err(Rejection::TenantExists);
    }
    if state.purged.contains(&record.id) {
        return Err(Rejection::TenantIdPurged);
    }
    if hashes.iter().any(|h| state.by_key_hash.contains_key(h.as_str())) {
        return Err(Rejection::KeyHashInUse);
    }
    if state.tenants.len() + state.purged.len() >= TENANT_IDS_MAX {
        return Err(Rejection::TooManyTenants);
    }
    state.insert_tenant(record);
    Ok(())
}

/// Runs `change` on a copy of the tenant and stores it only if `change` accepts.
fn update_tenant(
    state: &mut RegistryState,
    id: &str,
    change: impl FnOnce(&mut TenantRecord) -> Result<(), Rejection>,
) -> Result<(), Rejection> {
    let mut record = state.tenants.get(id).map(|r| (**r).clone()).ok_or(Rejection::NoSuchTenant)?;
    change(&mut record)?;
    state.tenants.insert(Arc::from(id), Arc::new(record));
    Ok(())
}

fn rotate_key(state: &mut RegistryState, id: &str, new_hash: String) -> Result<(), Rejection> {
    if !is_valid_key_hash(&new_hash) {
        return Err(Rejection::InvalidKeyHash);
    }
    let mut record = state.tenants.get(id).map(|r| (**r).clone()).ok_or(Rejection::NoSuchTenant)?;
    if record.archived {
        return Err(Rejection::TenantArchived);
    }
    if state.by_key_hash.get(new_hash.as_str()).is_some_and(|owner| &**owner != id) {
        return Err(Rejection::KeyHashInUse);
    }
    for old in record.key_hashes.drain(..) {
        state.by_key_hash.remove(old.as_str());
    }
    record.key_hashes.push(new_hash);
    state.insert_tenant(record);
    Ok(())
}

fn node_join(state: &mut RegistryState, id: u64, addr: String) -> Result<(), Rejection> {
    if addr.is_empty() || addr.len() > NODE_ADDR_LEN_MAX {
        return Err(Rejection::InvalidNodeAddr);
    }
    if state.nodes.contains_key(&id) {
        return Err(Rejection::NodeIdUsed(id));
    }
    state.nodes.insert(id, NodeRecord { id, addr, state: NodeState::Joining });
    Ok(())
}

/// Moves node `id` to `to`, bumping the placement epoch when the active set changes.
fn node_transition(state: &mut RegistryState, id: u64, to: NodeState) -> Result<(), Rejection> {
    let mut node = state.nodes.get(&id).cloned().ok_or(Rejection::NoSuchNode(id))?;
    let from = node.state;
    let allowed = match to {
        NodeState::Active => matches!(from, NodeState::Joining | NodeState::Draining),
        NodeState::Draining => from == NodeState::Active,
        NodeState::Removed => from != NodeState::Removed,
        NodeState::Joining => false,
    };
    if !allowed {
        return Err(Rejection::InvalidNodeTransition { id, from, to });
    }
    let active_before = state.nodes.values().filter(|n| n.state == NodeState::Active).count();
    if from == NodeState::Active && active_before == 1 {
        return Err(Rejection::LastActiveNode(id));
    }
    if to == NodeState::Active && active_before >= ACTIVE_NODES_MAX {
        return Err(Rejection::TooManyActiveNodes);
    }
    let moves_tenants = from == NodeState::Active || to == NodeState::Active;
    // With R > 1 every set a drain touches must gain a node for the one it loses; a join may
    // grow sets below R.
    let r = state.replicas();
    let too_few = to == NodeState::Draining && active_before <= r;
    if moves_tenants && r > 1 && too_few {
        return Err(Rejection::TooFewNodesForReplicas {
            replicas: state.replicas,
            active: active_before,
        });
    }
    if moves_tenants && !state.handoffs.is_empty() {
        return Err(Rejection::HandoffsPending(state.handoffs.len()));
    }
    if to == NodeState::Removed && from == NodeState::Active {
        return Err(Rejection::NodeOwnsTenants(id));
    }
    if to == NodeState::Removed && state.handoffs.values().any(|h| h.from == id || h.to == id) {
        return Err(Rejection::HandoffsPending(state.handoffs.len()));
    }
    node.state = to;
    state.nodes.insert(id, node);
    if to == NodeState::Removed {
        state.liveness.remove(&id);
    }
    if moves_tenants {
        let before = state.ring.clone();
        state.placement_epoch += 1;
        state.rebuild_ring();
        let r = state.replicas();
        record_handoffs(state, &before, r);
    }
    Ok(())
}

#[cfg(test)]
#[path = "command_tests.rs"]
mod tests;
