//! The operator: admin operations through the gateways' admin path (`gateway::admin::apply_op`),
//! as `sq-cloud admin` sends them. It forms the cluster, creates the tenants, and during the run
//! changes quotas, disables and re-enables tenants, rotates keys, and adds, drains and removes
//! nodes, from two operators at once; after the run's final check, it purges a tenant.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use proto::admin::AdminAnswer;
use proto::cluster::{AdminOp, MIB};
use proto::ApiError;
use raft_registry::{NodeState, Tier};
use tokio_util::sync::CancellationToken;

use crate::cluster::node_addr;
use crate::monitor::{Invariant, Violation};
use crate::rng::Rng;
use crate::world::{new_key, pause_unless_stopped, TenantKeys, World, ADMIN_OP_TIMEOUT};

/// Quotas the operator gives tenants, in MiB.
pub const QUOTAS_MB: [u64; 2] = [1, 2];
/// Pause between one operator's operations, in milliseconds.
const ADMIN_PAUSE_MS: (u64, u64) = (500, 4_000);
/// Pause between attempts of an operation that must succeed, in milliseconds.
const RETRY_PAUSE_MS: u64 = 400;

/// Sends one admin operation through gateway `gw`.
pub async fn admin(world: &World, gw: usize, op: AdminOp) -> Result<AdminAnswer, ApiError> {
    let label = format!("{op:?}");
    let gateway = &world.gateways[gw % world.gateways.len()];
    let call = gateway::admin::apply_op(gateway, world.admin_key_hash.clone(), op);
    let result = match tokio::time::timeout(ADMIN_OP_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::unavailable("simulated operator gave up waiting")),
    };
    let shown: String = match &result {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string().chars().take(100).collect(),
    };
    world
        .trace
        .event(format!("admin g{gw} {}: {shown}", label.chars().take(80).collect::<String>()));
    let mut stats = world.stats();
    if result.is_ok() {
        stats.admin_ok += 1;
    } else {
        stats.admin_failed += 1;
    }
    result
}

/// Repeats `op` until it succeeds (a `Conflict` that says it is already done counts), or the
/// deadline passes.
async fn until_done(
    world: &World,
    rng: &mut Rng,
    op: AdminOp,
    deadline_ms: u64,
    done: impl Fn(&ApiError) -> bool,
) -> Result<(), Violation> {
    loop {
        let gw = rng.below(world.gateways.len() as u64) as usize;
        match admin(world, gw, op.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if done(&e) => return Ok(()),
            Err(e) if world.now_ms() > deadline_ms => {
                return Err(Violation::new(
                    Invariant::Liveness,
                    format!("admin operation {op:?} never succeeded: {e}"),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await,
        }
    }
}

/// Forms the cluster (node 1 bootstraps; `members` join), sets R, and creates `tenants`.
pub async fn form(
    world: &World,
    rng: &mut Rng,
    members: &[u64],
    replicas: u8,
    tenants: &[String],
    deadline_ms: u64,
) -> Result<(), Violation> {
    for &id in members.iter().filter(|id| **id != 1) {
        let op = AdminOp::AddNode { id, addr: node_addr(id).to_string() };
        until_done(world, rng, op, deadline_ms, |_| false).await?;
    }
    if replicas > 1 {
        let op = AdminOp::SetReplicas { replicas: u64::from(replicas) };
        until_done(world, rng, op, deadline_ms, |_| false).await?;
    }
    for (i, tenant) in tenants.iter().enumerate() {
        let key = new_key(rng);
        let quota_mb = QUOTAS_MB[0];
        world.model().add_tenant(tenant, quota_mb * MIB);
        let tier = if i == 0 { "free" } else { "team" };
        let limit = if i == 0 { Tier::Free } else { Tier::Team }.default_daily_limit();
        world.model().allow_daily_limit(tenant, limit);
        let op = AdminOp::AddTenant {
            tenant_id: tenant.clone(),
            tier: Some(tier.into()),
            quota_mb: Some(quota_mb),
            admin_email: None,
            key_hash: proto::auth::key_hash(&key),
        };
        until_done(world, rng, op, deadline_ms, |e| matches!(e, ApiError::Conflict(_))).await?;
        world.keys().insert(tenant.clone(), TenantKeys { current: key, maybe: Vec::new() });
        world.set_quota_now(tenant, quota_mb * MIB);
    }
    Ok(())
}

/// Rotates a tenant's key; the clients learn the new key once the rotation is acknowledged,
/// and the old one is revoked. The lagging gateway keeps a view from before.
async fn rotate(world: &World, rng: &mut Rng, gw: usize, tenant: &str) -> Result<(), ApiError> {
    world.freeze_stale_view();
    let key = new_key(rng);
    if let Some(k) = world.keys().get_mut(tenant) {
        k.maybe.push(key.clone());
    }
    let result = admin(
        world,
        gw,
        AdminOp::RotateKey { tenant_id: tenant.to_string(), key_hash: proto::auth::key_hash(&key) },
    )
    .await;
    let mut keys = world.keys();
    let Some(k) = keys.get_mut(tenant) else { return result.map(|_| ()) };
    match &result {
        Ok(_) => {
            let old = std::mem::replace(k, TenantKeys { current: key, maybe: Vec::new() });
            drop(keys);
            world.revoke(tenant, old.current, "rotated away");
            return Ok(());
        }
        Err(ApiError::Unavailable { .. } | ApiError::Internal(_)) => {}
        Err(_) => k.maybe.retain(|m| *m != key),
    }
    result.map(|_| ())
}

/// Random admin operations until `stop`, concurrently with the clients and the faults.
pub async fn run(world: Arc<World>, mut rng: Rng, tenants: Vec<String>, stop: CancellationToken) {
    let mut disabled: BTreeSet<String> = BTreeSet::new();
    while !stop.is_cancelled() {
        let pause = Duration::from_millis(rng.range(ADMIN_PAUSE_MS.0, ADMIN_PAUSE_MS.1));
        if !pause_unless_stopped(&stop, pause).await {
            return;
        }
        let gw = rng.below(world.gateways.len() as u64) as usize;
        let tenant = rng.pick(&tenants).clone();
        match rng.weighted(&[30, 15, 20, 25, 10, 4]) {
            0 => {
                let quota_mb = *rng.pick(&QUOTAS_MB);
                let _ = set_quota(&world, gw, &tenant, quota_mb).await;
            }
            1 => {
                let enable = disabled.remove(&tenant);
                if !enable {
                    disabled.insert(tenant.clone());
                    world.freeze_stale_view();
                }
                let op = AdminOp::PatchTenant {
                    tenant_id: tenant.clone(),
                    tier: None,
                    quota_mb: None,
                    enabled: Some(enable),
                    daily_limit: None,
                };
                if admin(&world, gw, op).await.is_ok() {
                    world.set_disabled(&tenant, !enable);
                }
            }
            2 => {
                let _ = rotate(&world, &mut rng, gw, &tenant).await;
            }
            3 => membership(&world, &mut rng, gw).await,
            4 => {
                let _ = admin(&world, gw, AdminOp::Health).await;
            }
            _ => {
                // A low daily limit, so that 429s come and are checked; or a high one again.
                let limit = if rng.chance(500) { rng.range(40, 300) } else { DAILY_LIMIT_HIGH };
                let _ = set_daily_limit(&world, gw, &tenant, limit).await;
            }
        }
    }
}

/// Gives `tenant` a quota of `quota_mb`.
pub async fn set_quota(
    world: &World,
    gw: usize,
    tenant: &str,
    quota_mb: u64,
) -> Result<(), ApiError> {
    world.model().allow_quota(tenant, quota_mb * MIB);
    let op = AdminOp::PatchTenant {
        tenant_id: tenant.to_string(),
        tier: None,
        quota_mb: Some(quota_mb),
        enabled: None,
        daily_limit: None,
    };
    admin(world, gw, op).await?;
    world.set_quota_now(tenant, quota_mb * MIB);
    Ok(())
}

/// Gives `tenant` a daily limit of `limit` requests.
async fn set_daily_limit(
    world: &World,
    gw: usize,
    tenant: &str,
    limit: u64,
) -> Result<(), ApiError> {
    world.model().allow_daily_limit(tenant, limit);
    let op = AdminOp::PatchTenant {
        tenant_id: tenant.to_string(),
        tier: None,
        quota_mb: None,
        enabled: None,
        daily_limit: Some(limit),
    };
    admin(world, gw, op).await.map(|_| ())
}

/// The daily limit every tenant gets back after the faults: more than a run sends.
const DAILY_LIMIT_HIGH: u64 = 1_000_000;

/// One step towards a different set of active nodes: join a spare, drain an active node, or
/// remove a drained one, as the registry (as node 1's process sees it, if up) allows.
async fn membership(world: &World, rng: &mut Rng, gw: usize) {
    let which = rng.below(3);
    if let Some(op) = membership_op(world, rng, which) {
        let _ = admin(world, gw, op).await;
    }
}

/// A membership change the registry allows now: `which` 0 joins a spare, 1 drains an active
/// node (of three or more, and more than R), 2 removes a drained one.
fn membership_op(world: &World, rng: &mut Rng, which: u64) -> Option<AdminOp> {
    let state = world
        .cluster
        .ids()
        .into_iter()
        .find_map(|id| world.cluster.parts(id))
        .map(|p| p.registry.state())?;
    let ids = world.cluster.ids();
    let of = |s: NodeState| -> Vec<u64> {
        ids.iter().copied().filter(|id| state.node(*id).map(|n| n.state) == Some(s)).collect()
    };
    let spares: Vec<u64> = ids.iter().copied().filter(|id| state.node(*id).is_none()).collect();
    let (active, draining) = (of(NodeState::Active), of(NodeState::Draining));
    match which {
        0 if !spares.is_empty() => {
            let id = *rng.pick(&spares);
            Some(AdminOp::AddNode { id, addr: node_addr(id).to_string() })
        }
        1 if active.len() >= 3 && active.len() > state.replicas() => {
            // The node owning the most tenants (ties by the draw), so that tenants move.
            let owned =
                |id: u64| state.tenants().filter(|t| state.owner_of(&t.id) == Some(id)).count();
            let most = active.iter().map(|id| owned(*id)).max().unwrap_or(0);
            let busiest: Vec<u64> =
                active.iter().copied().filter(|id| owned(*id) == most).collect();
            Some(AdminOp::DrainNode { id: *rng.pick(&busiest) })
        }
        2 if !draining.is_empty() => Some(AdminOp::RemoveNode { id: *rng.pick(&draining) }),
        _ => None,
    }
}

/// When the planned membership change comes, in milliseconds after the faults start.
const PLANNED_CHANGE_MS: (u64, u64) = (1_000, 6_000);
/// When the extra tenant is archived, and how long after that it is purged, in milliseconds.
const ARCHIVE_AT_MS: (u64, u64) = (8_000, 20_000);
const PURGE_AFTER_MS: (u64, u64) = (2_000, 6_000);

/// What every run does while the faults go on, at a time its seed picks: R raised to each of
/// `raises` in turn (every tenant's set gains a node each time); one membership change (a spare
/// joins, or an active node is drained), so that tenants move during the faults; and the extra
/// tenant `doomed` archived, then purged, while a client still holds its key.
pub async fn planned(
    world: Arc<World>,
    mut rng: Rng,
    doomed: String,
    raises: Vec<u8>,
    stop: CancellationToken,
) {
    let started = world.now_ms();
    let wait_until = |ms: u64| {
        let stop = stop.clone();
        let at = started + ms;
        let now = world.now_ms();
        async move {
            tokio::select! {
                _ = stop.cancelled() => false,
                _ = tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))) => true,
            }
        }
    };
    if !wait_until(rng.range(PLANNED_CHANGE_MS.0, PLANNED_CHANGE_MS.1)).await {
        return;
    }
    for replicas in raises {
        // Refused while the sets' changes of the raise before are pending: tried again.
        let op = AdminOp::SetReplicas { replicas: u64::from(replicas) };
        world.trace.event(format!("planned change of R: {op:?}"));
        if !until_stopped(&world, &mut rng, op, &stop).await {
            return;
        }
    }
    // A join, or else a drain; and a drain after a join that moved no tenant (with a few
    // tenants, a new node may own none of them), so that some tenant moves.
    let first = if rng.chance(700) { 0 } else { 1 };
    for which in [first, 1] {
        let Some(op) = membership_op(&world, &mut rng, which) else { continue };
        world.trace.event(format!("planned membership change: {op:?}"));
        if !until_stopped(&world, &mut rng, op, &stop).await {
            return;
        }
        let moving = world.registry_state().is_some_and(|s| s.handoffs().next().is_some());
        if moving || which == 1 {
            break;
        }
    }
    let archive_at = rng.range(ARCHIVE_AT_MS.0, ARCHIVE_AT_MS.1).max(world.now_ms() - started);
    if !wait_until(archive_at).await {
        return;
    }
    let key = world.keys().get(&doomed).map(|k| k.current.clone()).unwrap_or_default();
    world.freeze_stale_view();
    let archive = AdminOp::DeleteTenant { tenant_id: doomed.clone() };
    if !until_stopped(&world, &mut rng, archive, &stop).await {
        return;
    }
    world.revoke(&doomed, key.clone(), "archived");
    let purge_at = world.now_ms() - started + rng.range(PURGE_AFTER_MS.0, PURGE_AFTER_MS.1);
    if !wait_until(purge_at).await {
        return;
    }
    let purge = AdminOp::PurgeTenant { tenant_id: doomed.clone() };
    if until_stopped(&world, &mut rng, purge, &stop).await {
        world.revoke(&doomed, key, "purged");
    }
}

/// Repeats `op` until it is acknowledged or `stop`; returns whether it was.
async fn until_stopped(
    world: &World,
    rng: &mut Rng,
    op: AdminOp,
    stop: &CancellationToken,
) -> bool {
    while !stop.is_cancelled() {
        let gw = rng.below(world.gateways.len() as u64) as usize;
        let attempt = admin(world, gw, op.clone());
        let done = tokio::select! {
            _ = stop.cancelled() => return false,
            result = attempt => result.is_ok(),
        };
        if done {
            return true;
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)) => {}
        }
    }
    false
}

/// After the faults heal: every tenant enabled, and a key every client knows for sure.
pub async fn settle(
    world: &World,
    rng: &mut Rng,
    tenants: &[String],
    deadline_ms: u64,
) -> Result<(), Violation> {
    for tenant in tenants {
        world.model().allow_daily_limit(tenant, DAILY_LIMIT_HIGH);
        let op = AdminOp::PatchTenant {
            tenant_id: tenant.clone(),
            tier: None,
            quota_mb: None,
            enabled: Some(true),
            daily_limit: Some(DAILY_LIMIT_HIGH),
        };
        until_done(world, rng, op, deadline_ms, |_| false).await?;
        world.set_disabled(tenant, false);
        rotate_until_done(world, rng, tenant, deadline_ms).await?;
    }
    Ok(())
}

/// Archives `tenant`, then purges it, each retried until acknowledged (both are idempotent, so
/// a repeat after a lost answer is harmless).
pub async fn purge(
    world: &World,
    rng: &mut Rng,
    tenant: &str,
    deadline_ms: u64,
) -> Result<(), Violation> {
    until_done(
        world,
        rng,
        AdminOp::DeleteTenant { tenant_id: tenant.to_string() },
        deadline_ms,
        |_| false,
    )
    .await?;
    until_done(
        world,
        rng,
        AdminOp::PurgeTenant { tenant_id: tenant.to_string() },
        deadline_ms,
        |_| false,
    )
    .await
}

/// Tries to add `tenant` again, retrying while no node can answer; returns the first definite
/// answer (an acknowledged add is `Ok`).
pub async fn add_again(
    world: &World,
    rng: &mut Rng,
    tenant: &str,
    deadline_ms: u64,
) -> Result<(), ApiError> {
    loop {
        let gw = rng.below(world.gateways.len() as u64) as usize;
        let key = new_key(rng);
        let op = AdminOp::AddTenant {
            tenant_id: tenant.to_string(),
            tier: None,
            quota_mb: None,
            admin_email: None,
            key_hash: proto::auth::key_hash(&key),
        };
        match admin(world, gw, op).await {
            Err(ApiError::Unavailable { .. }) if world.now_ms() <= deadline_ms => {
                tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await
            }
            other => return other.map(|_| ()),
        }
    }
}

/// Sets `enabled` on `tenant` until acknowledged.
pub async fn set_enabled_until_done(
    world: &World,
    rng: &mut Rng,
    tenant: &str,
    enabled: bool,
    deadline_ms: u64,
) -> Result<(), Violation> {
    let op = AdminOp::PatchTenant {
        tenant_id: tenant.to_string(),
        tier: None,
        quota_mb: None,
        enabled: Some(enabled),
        daily_limit: None,
    };
    until_done(world, rng, op, deadline_ms, |_| false).await?;
    world.set_disabled(tenant, !enabled);
    Ok(())
}

/// Gives `tenant` a quota of `quota_mb` until acknowledged.
pub async fn set_quota_until_done(
    world: &World,
    rng: &mut Rng,
    tenant: &str,
    quota_mb: u64,
    deadline_ms: u64,
) -> Result<(), Violation> {
    loop {
        let gw = rng.below(world.gateways.len() as u64) as usize;
        match set_quota(world, gw, tenant, quota_mb).await {
            Ok(()) => return Ok(()),
            Err(e) if world.now_ms() > deadline_ms => {
                return Err(Violation::new(
                    Invariant::Liveness,
                    format!("giving {tenant} a quota of {quota_mb} MiB never succeeded: {e}"),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await,
        }
    }
}

/// Enables `tenant` once (its answer is not needed: the caller tries the tenant again).
pub async fn enable(world: &World, rng: &mut Rng, tenant: &str) {
    let gw = rng.below(world.gateways.len() as u64) as usize;
    let op = AdminOp::PatchTenant {
        tenant_id: tenant.to_string(),
        tier: None,
        quota_mb: None,
        enabled: Some(true),
        daily_limit: None,
    };
    let _ = admin(world, gw, op).await;
}

/// Rotates `tenant`'s key until a rotation is acknowledged, so the clients know the key.
pub async fn rotate_until_done(
    world: &World,
    rng: &mut Rng,
    tenant: &str,
    deadline_ms: u64,
) -> Result<(), Violation> {
    loop {
        let gw = rng.below(world.gateways.len() as u64) as usize;
        match rotate(world, rng, gw, tenant).await {
            Ok(()) => return Ok(()),
            Err(e) if world.now_ms() > deadline_ms => {
                return Err(Violation::new(
                    Invariant::Liveness,
                    format!("rotating the key of {tenant} never succeeded: {e}"),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await,
        }
    }
}
