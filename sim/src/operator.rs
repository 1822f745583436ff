//! The operator: admin operations through the gateways' admin path (`gateway::admin::apply_op`),
//! as `sq-cloud admin` sends them. It forms the cluster, creates the tenants, and during the run
//! changes quotas, disables and re-enables tenants, rotates keys, and adds, drains and removes
//! nodes, from two operators at once; after the run's final check, it purges a tenant.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use proto::cluster::{AdminOp, MIB};
use proto::ApiError;
use raft_registry::NodeState;
use tokio_util::sync::CancellationToken;

use crate::cluster::node_addr;
use crate::monitor::{Invariant, Violation};
use crate::rng::Rng;
use crate::world::{new_key, TenantKeys, World, ADMIN_OP_TIMEOUT};

/// Quotas the operator gives tenants, in MiB.
pub const QUOTAS_MB: [u64; 2] = [1, 2];
/// Pause between one operator's operations, in milliseconds.
const ADMIN_PAUSE_MS: (u64, u64) = (500, 4_000);
/// Pause between attempts of an operation that must succeed, in milliseconds.
const RETRY_PAUSE_MS: u64 = 400;

/// Sends one admin operation through gateway `gw`.
pub async fn admin(world: &World, gw: usize, op: AdminOp) -> Result<String, ApiError> {
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

/// Forms the cluster (node 1 bootstraps; `members` join) and creates `tenants`.
pub async fn form(
    world: &World,
    rng: &mut Rng,
    members: &[u64],
    tenants: &[String],
    deadline_ms: u64,
) -> Result<(), Violation> {
    for &id in members.iter().filter(|id| **id != 1) {
        let op = AdminOp::AddNode { id, addr: node_addr(id).to_string() };
        until_done(world, rng, op, deadline_ms, |_| false).await?;
    }
    for (i, tenant) in tenants.iter().enumerate() {
        let key = new_key(rng);
        let quota_mb = QUOTAS_MB[0];
        world.model().add_tenant(tenant, quota_mb * MIB);
        let tier = if i == 0 { "free" } else { "team" };
        let op = AdminOp::AddTenant {
            tenant_id: tenant.clone(),
            tier: Some(tier.into()),
            quota_mb: Some(quota_mb),
            admin_email: None,
            key_hash: proto::auth::key_hash(&key),
        };
        until_done(world, rng, op, deadline_ms, |e| matches!(e, ApiError::Conflict(_))).await?;
        world.keys().insert(tenant.clone(), TenantKeys { current: key, maybe: Vec::new() });
    }
    Ok(())
}

/// Rotates a tenant's key; the clients learn the new key once the rotation is acknowledged.
async fn rotate(world: &World, rng: &mut Rng, gw: usize, tenant: &str) -> Result<(), ApiError> {
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
        Ok(_) => *k = TenantKeys { current: key, maybe: Vec::new() },
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
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        if stop.is_cancelled() {
            return;
        }
        let gw = rng.below(world.gateways.len() as u64) as usize;
        let tenant = rng.pick(&tenants).clone();
        match rng.weighted(&[30, 15, 20, 25, 10]) {
            0 => {
                let quota_mb = *rng.pick(&QUOTAS_MB);
                world.model().allow_quota(&tenant, quota_mb * MIB);
                let op = AdminOp::PatchTenant {
                    tenant_id: tenant,
                    tier: None,
                    quota_mb: Some(quota_mb),
                    enabled: None,
                    daily_limit: None,
                };
                let _ = admin(&world, gw, op).await;
            }
            1 => {
                let enable = disabled.remove(&tenant);
                if !enable {
                    disabled.insert(tenant.clone());
                }
                let op = AdminOp::PatchTenant {
                    tenant_id: tenant,
                    tier: None,
                    quota_mb: None,
                    enabled: Some(enable),
                    daily_limit: None,
                };
                let _ = admin(&world, gw, op).await;
            }
            2 => {
                let _ = rotate(&world, &mut rng, gw, &tenant).await;
            }
            3 => membership(&world, &mut rng, gw).await,
            _ => {
                let _ = admin(&world, gw, AdminOp::Health).await;
            }
        }
    }
}

/// One step towards a different set of active nodes: join a spare, drain an active node, or
/// remove a drained one, as the registry (as node 1's process sees it, if up) allows.
async fn membership(world: &World, rng: &mut Rng, gw: usize) {
    let Some(state) = world
        .cluster
        .ids()
        .into_iter()
        .find_map(|id| world.cluster.parts(id))
        .map(|p| p.registry.state())
    else {
        return;
    };
    let ids = world.cluster.ids();
    let of = |s: NodeState| -> Vec<u64> {
        ids.iter().copied().filter(|id| state.node(*id).map(|n| n.state) == Some(s)).collect()
    };
    let spares: Vec<u64> = ids.iter().copied().filter(|id| state.node(*id).is_none()).collect();
    let (active, draining) = (of(NodeState::Active), of(NodeState::Draining));
    let op = match rng.below(3) {
        0 if !spares.is_empty() => {
            let id = *rng.pick(&spares);
            AdminOp::AddNode { id, addr: node_addr(id).to_string() }
        }
        1 if active.len() >= 3 => AdminOp::DrainNode { id: *rng.pick(&active) },
        2 if !draining.is_empty() => AdminOp::RemoveNode { id: *rng.pick(&draining) },
        _ => return,
    };
    let _ = admin(world, gw, op).await;
}

/// After the faults heal: every tenant enabled, and a key every client knows for sure.
pub async fn settle(
    world: &World,
    rng: &mut Rng,
    tenants: &[String],
    deadline_ms: u64,
) -> Result<(), Violation> {
    for tenant in tenants {
        let op = AdminOp::PatchTenant {
            tenant_id: tenant.clone(),
            tier: None,
            quota_mb: None,
            enabled: Some(true),
            daily_limit: None,
        };
        until_done(world, rng, op, deadline_ms, |_| false).await?;
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
