//! The checks of admin edges during a run: a revoked key is refused everywhere in time, a
//! tenant at its quota's edge is refused and then served again, and a purged tenant is gone.

use std::time::Duration;

use proto::request::Method;
use proto::{ApiError, Coordinate};

use super::{
    active_nodes, every_gateway, member_nodes, probe, EDGE_PHEXT, PROBE_PAUSE_MS, PROBE_PHEXT,
    REVOCATION_MS,
};
use crate::model::{tag, CellKey};
use crate::monitor::{Invariant, Violation};
use crate::net::Endpoint;
use crate::operator;
use crate::rng::Rng;
use crate::workload::PHEXTS;
use crate::world::{write_outcome, World, WRITE_HORIZON_MS};

/// Sends `key`'s request through every gateway until each gives a definite answer, and
/// requires `expect` of it: data breaks [`Invariant::Auth`]. Unavailable answers (a node
/// catching up) are tried again until the deadline.
async fn expect_refused(
    world: &World,
    tenant: &str,
    key: &str,
    why: &str,
    expect: fn(&ApiError) -> bool,
    deadline_ms: u64,
) -> Result<(), Violation> {
    for (name, gw) in every_gateway(world) {
        loop {
            let result = world.sq(&gw, key, Method::Get, "get", "p=alpha", b"").await;
            world.stats().revoked_requests += 1;
            match result {
                Err(e) if expect(&e) => {
                    world.stats().revoked_refused += 1;
                    break;
                }
                Ok(r) => {
                    return Err(Violation::new(
                        Invariant::Auth,
                        format!("{tenant}'s {why} key got data ({} bytes) through {name}, more than {REVOCATION_MS} ms after the change was acknowledged", r.body.len()),
                    ));
                }
                Err(e) if world.now_ms() > deadline_ms => {
                    return Err(Violation::new(
                        Invariant::Auth,
                        format!("{tenant}'s {why} key through {name} answered {e}, not a refusal"),
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await,
            }
        }
    }
    Ok(())
}

/// With every fault healed: a rotated-away key, and a disabled tenant's key, stop working
/// within [`REVOCATION_MS`] through every gateway, the lagging one included; the tenant is
/// served again once enabled.
pub(super) async fn revocation_check(
    world: &World,
    rng: &mut Rng,
    tenants: &[String],
    deadline_ms: u64,
) -> Result<(), Violation> {
    let rotated = &tenants[0];
    let old = world.keys().get(rotated).map(|k| k.current.clone()).unwrap_or_default();
    operator::rotate_until_done(world, rng, rotated, deadline_ms).await?;
    tokio::time::sleep(Duration::from_millis(REVOCATION_MS)).await;
    let unauthorized: fn(&ApiError) -> bool = |e| matches!(e, ApiError::Unauthorized);
    expect_refused(world, rotated, &old, "rotated-away", unauthorized, deadline_ms).await?;
    let disabled = &tenants[1 % tenants.len()];
    world.freeze_stale_view();
    operator::set_enabled_until_done(world, rng, disabled, false, deadline_ms).await?;
    tokio::time::sleep(Duration::from_millis(REVOCATION_MS)).await;
    let key = world.keys().get(disabled).map(|k| k.current.clone()).unwrap_or_default();
    // A gateway that knows the tenant is disabled answers 403; one whose view lags forwards,
    // and the owner's own re-check refuses the key (401). Either is a refusal; data is not.
    let refused: fn(&ApiError) -> bool =
        |e| matches!(e, ApiError::Forbidden(_) | ApiError::Unauthorized);
    expect_refused(world, disabled, &key, "disabled tenant's", refused, deadline_ms).await?;
    operator::set_enabled_until_done(world, rng, disabled, true, deadline_ms).await?;
    world.trace.event(format!(
        "revocation check: {rotated}'s old key and {disabled}'s key refused everywhere"
    ));
    probe(world, rng, disabled, deadline_ms).await
}

/// With every fault healed: the quota is lowered (2 MiB, then 1 MiB), and writes that leave the
/// tenant one byte under it and exactly at it are acknowledged, one byte over it refused with
/// 507, the node's account naming the lowered quota.
pub(super) async fn quota_edge_check(
    world: &World,
    rng: &mut Rng,
    tenant: &str,
    deadline_ms: u64,
) -> Result<(), Violation> {
    let (high, low) = (operator::QUOTAS_MB[1], operator::QUOTAS_MB[0]);
    operator::set_quota_until_done(world, rng, tenant, high, deadline_ms).await?;
    operator::set_quota_until_done(world, rng, tenant, low, deadline_ms).await?;
    let quota = low * proto::cluster::MIB;
    // The owner applies the change within a heartbeat or two.
    tokio::time::sleep(Duration::from_millis(REVOCATION_MS)).await;
    let key = world.keys().get(tenant).map(|k| k.current.clone()).unwrap_or_default();
    // Room first: the tenant's cells emptied (a delete never needs quota).
    let cells: Vec<CellKey> = world.model().cells(tenant).cloned().collect();
    for cell in cells {
        if cell.phext != EDGE_PHEXT {
            emptied(
                tenant,
                edge_write(world, tenant, &key, &cell, String::new(), deadline_ms).await?,
            )?;
        }
    }
    let used = bytes_held(world, tenant, &key, deadline_ms).await?;
    // The edge phext holds one scroll at the origin: its canonical length is the scroll's.
    let cell = CellKey { phext: EDGE_PHEXT.to_string(), coord: Coordinate::ORIGIN };
    let room = quota.saturating_sub(used);
    let tag_len = tag(tenant, "edge.0000000").len() as u64;
    if room < tag_len + 2 {
        return Err(Violation::new(
            Invariant::Quota,
            format!("quota edge check: {tenant} holds {used} bytes of its {quota} with only its probe scroll left"),
        ));
    }
    for (n, (len, fits)) in
        [(room - 1, true), (room, true), (room + 1, false)].into_iter().enumerate()
    {
        let head = tag(tenant, &format!("edge.{n:07}"));
        let value = format!("{head}{}", "e".repeat((len - head.len() as u64) as usize));
        let result = edge_write(world, tenant, &key, &cell, value, deadline_ms).await?;
        world.stats().boundary_writes += 1;
        edge_answer(tenant, &result, used + len, fits, quota)?;
    }
    // Room again for what comes after.
    emptied(tenant, edge_write(world, tenant, &key, &cell, String::new(), deadline_ms).await?)?;
    world.trace.event(format!(
        "quota edge check: {tenant} at {quota} bytes exactly, and refused one more"
    ));
    Ok(())
}

/// The bytes `tenant` holds in the phexts the run writes, read through a gateway.
async fn bytes_held(
    world: &World,
    tenant: &str,
    key: &str,
    deadline_ms: u64,
) -> Result<u64, Violation> {
    let mut used = 0u64;
    for phext in PHEXTS.iter().copied().chain([PROBE_PHEXT]) {
        let body = loop {
            match world
                .sq(world.gateway(0), key, Method::Get, "get", &format!("p={phext}"), b"")
                .await
            {
                Ok(r) => break r.body,
                Err(e) if world.now_ms() > deadline_ms => {
                    return Err(Violation::new(
                        Invariant::Liveness,
                        format!("quota edge check: reading {tenant}/{phext} failed: {e}"),
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await,
            }
        };
        used += body.len() as u64;
    }
    Ok(used)
}

/// The answer to a write that leaves `tenant` holding `leaves` bytes under `quota`: acknowledged
/// if it `fits`, else refused with 507 naming the quota and one byte short.
fn edge_answer(
    tenant: &str,
    result: &Result<proto::SqResponse, ApiError>,
    leaves: u64,
    fits: bool,
    quota: u64,
) -> Result<(), Violation> {
    match (result, fits) {
        (Ok(_), true) => Ok(()),
        (Err(ApiError::QuotaExceeded { needed_bytes: 1, free_bytes: 0, quota_bytes }), false)
            if *quota_bytes == quota =>
        {
            Ok(())
        }
        (Ok(_), false) => Err(Violation::new(
            Invariant::Quota,
            format!("{tenant}'s write leaving it {leaves} bytes was acknowledged; its quota was lowered to {quota} bytes"),
        )),
        (other, _) => Err(Violation::new(
            Invariant::WrongfulRefusal,
            format!("{tenant}'s write leaving it {leaves} bytes, under a quota of {quota} bytes, answered {:?}", other.as_ref().map(|_| "ok")),
        )),
    }
}

/// A delete of the quota-edge check must be acknowledged: a delete never needs quota.
fn emptied(tenant: &str, result: Result<proto::SqResponse, ApiError>) -> Result<(), Violation> {
    result.map(|_| ()).map_err(|e| {
        Violation::new(
            Invariant::WrongfulRefusal,
            format!("quota edge check: a delete of {tenant}'s was refused: {e}"),
        )
    })
}

/// One update (or, for an empty value, a delete) of the quota-edge check, recorded in the
/// model; tried again while no node answers.
async fn edge_write(
    world: &World,
    tenant: &str,
    key: &str,
    cell: &CellKey,
    value: String,
    deadline_ms: u64,
) -> Result<Result<proto::SqResponse, ApiError>, Violation> {
    let query = format!("p={}&c={}", cell.phext, cell.coord);
    loop {
        let now = world.now_ms();
        let id =
            world.model().begin_write(tenant, cell, value.clone(), now, now + WRITE_HORIZON_MS);
        let result = if value.is_empty() {
            world.sq(world.gateway(0), key, Method::Get, "delete", &query, b"").await
        } else {
            world.sq(world.gateway(0), key, Method::Post, "update", &query, value.as_bytes()).await
        };
        let outcome = write_outcome(&result);
        world.model().end_write(id, outcome, world.now_ms());
        match &result {
            Err(ApiError::Unavailable { .. }) if world.now_ms() <= deadline_ms => {
                tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await
            }
            Err(ApiError::Unavailable { .. } | ApiError::Internal(_)) => {
                return Err(Violation::new(
                    Invariant::Liveness,
                    format!("quota edge check: {tenant}'s write answered {result:?}"),
                ))
            }
            _ => return Ok(result),
        }
    }
}

/// After the final check (so everything before it runs as it always did): purge one tenant
/// while its owner is down, bring the owner back, and require that every member node deletes
/// the tenant's data, that its key stops working through every gateway, that its id cannot be
/// added again, and that another tenant is still served.
pub(super) async fn purge_check(
    world: &World,
    rng: &mut Rng,
    tenants: &[String],
    deadline_ms: u64,
) -> Result<(), Violation> {
    let (doomed, other) = (&tenants[tenants.len() - 1], &tenants[0]);
    let key = world.key_for(doomed, rng).unwrap_or_default();
    // The owner goes down only where the other voters still make a quorum (three or more
    // active nodes); otherwise the purge runs with every node up.
    let owner = world.gateways[0].views.current().tenant(doomed).and_then(|t| t.owner);
    let owner = owner.filter(|_| active_nodes(world) >= 3);
    if let Some(owner) = owner {
        world.cluster.crash(owner, rng.chance(500));
    }
    world
        .trace
        .event(format!("purge check: {doomed} is purged while its owner is down: {owner:?}"));
    operator::purge(world, rng, doomed, deadline_ms).await?;
    if let Some(owner) = owner {
        world.cluster.start(owner).await?;
    }
    let dir = std::path::Path::new(crate::cluster::DATA_DIR).join("store/tenants").join(doomed);
    loop {
        let members = member_nodes(world);
        let holding: Vec<u64> = members
            .iter()
            .copied()
            .filter(|id| {
                world.cluster.disk(*id).is_some_and(|d| d.process().exists(&dir).unwrap_or(true))
            })
            .collect();
        let refused = (0..world.gateways.len())
            .all(|gw| world.gateways[gw].views.current().tenant(doomed).is_none());
        if holding.is_empty() && refused {
            break;
        }
        if world.now_ms() > deadline_ms {
            return Err(Violation::new(
                Invariant::Liveness,
                format!("purged tenant {doomed}: data still on nodes {holding:?}; still in a gateway's view: {}", !refused),
            ));
        }
        tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await;
    }
    for gw in 0..world.gateways.len() {
        match world.sq(world.gateway(gw), &key, Method::Get, "get", "p=a", b"").await {
            Err(ApiError::Unauthorized) => {}
            other => {
                let shown = other
                    .map(|r| String::from_utf8_lossy(&r.body).chars().take(60).collect::<String>());
                return Err(Violation::new(
                    Invariant::Isolation,
                    format!("purged tenant {doomed}'s key through gateway {gw}: {shown:?}"),
                ));
            }
        }
    }
    match operator::add_again(world, rng, doomed, deadline_ms).await {
        Err(ApiError::Conflict(reason)) if reason.contains("purged") => {}
        other => {
            return Err(Violation::new(
                Invariant::Isolation,
                format!("adding purged id {doomed} again answered {other:?}, not a refusal"),
            ));
        }
    }
    world.trace.event(format!("purge check: {doomed} purged everywhere; {other} still served"));
    probe(world, rng, other, deadline_ms).await
}

/// The tenant [`first_write_check`] adds; no plan names a tenant so.
const LATE_TENANT: &str = "added-late";

/// How long [`first_write_check`] holds one node's registry back from the add: well within the
/// second a node waits for its registry to learn a tenant it is asked about, and well under the
/// registry's election timeout, so the cut elects no one.
const REGISTRY_LAG_MS: u64 = 300;

/// Last, with every fault healed: a tenant added now answers its first write, sent through a
/// gateway the moment its view holds the tenant, while one node other than the registry's
/// leader hears nothing from the leader for [`REGISTRY_LAG_MS`], so its registry applies the
/// add late. No node may refuse the write for that: the lagging node, asked as
/// the primary or (with R > 1) as a member asked to promise, waits for its registry. A refusal
/// breaks [`Invariant::Liveness`].
pub(super) async fn first_write_check(
    world: &World,
    rng: &mut Rng,
    deadline_ms: u64,
) -> Result<(), Violation> {
    let cut = lagging_member(world);
    if let Some((from, to)) = cut {
        world.cluster.net.set_cut(from, to, true);
    }
    world.trace.event(format!("first write check: {LATE_TENANT} is added; cut {cut:?}"));
    let key = crate::world::new_key(rng);
    let hash = proto::auth::key_hash(&key);
    let op = proto::cluster::AdminOp::AddTenant {
        tenant_id: LATE_TENANT.to_string(),
        tier: None,
        quota_mb: None,
        admin_email: None,
        key_hash: hash.clone(),
    };
    // The cut is mended REGISTRY_LAG_MS after it was made, however long the add takes.
    let mend = async {
        tokio::time::sleep(Duration::from_millis(REGISTRY_LAG_MS)).await;
        if let Some((from, to)) = cut {
            world.cluster.net.set_cut(from, to, false);
        }
    };
    let write = async {
        add_and_wait(world, &op, &hash, deadline_ms).await?;
        let sent_ms = world.now_ms();
        let gw = world.gateway(0);
        let query = "p=a&c=1.1.1/1.1.1/1.1.1";
        let result = world.sq(gw, &key, Method::Post, "update", query, b"first").await;
        let shown: String = match &result {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string().chars().take(100).collect(),
        };
        let took = world.now_ms() - sent_ms;
        world.trace.event(format!("first write check: answered {shown} in {took} ms"));
        result.map(|_| ()).map_err(|e| {
            Violation::new(
                Invariant::Liveness,
                format!(
                    "first write check: {LATE_TENANT}'s first write, sent as soon as gateway g0 \
                     knew it, was refused: {e}"
                ),
            )
        })
    };
    let (written, ()) = tokio::join!(write, mend);
    written
}

/// The link to cut for [`first_write_check`]: from the registry's leader to a node the new
/// tenant's first write will ask (its primary with R = 1; with R > 1 a member other than the
/// primary, asked to promise), neither of them the leader, so that only the registry's
/// messages to it are held back. `None` where no such node is, or where the others would not
/// make a quorum without it (fewer than three active nodes, as in the purge check).
fn lagging_member(world: &World) -> Option<(Endpoint, Endpoint)> {
    let state = world.registry_state()?;
    let leads = |id: u64| world.cluster.parts(id).is_some_and(|p| p.registry.status().is_leader);
    let leader =
        world.cluster.ids().into_iter().find(|id| world.cluster.is_up(*id) && leads(*id))?;
    let set = state.settled_set(LATE_TENANT);
    let primary = state.primary_in(LATE_TENANT, &set)?;
    let lagging = if state.replicas() <= 1 {
        Some(primary)
    } else if primary == leader {
        None
    } else {
        set.iter().copied().find(|&n| n != primary && n != leader && !state.is_down(n))
    };
    let lagging = lagging.filter(|&n| n != leader && active_nodes(world) >= 3)?;
    Some((Endpoint::Node(leader), Endpoint::Node(lagging)))
}

/// Adds a tenant with key hash `hash` (retrying until the deadline), then waits until gateway
/// g0's view holds it.
async fn add_and_wait(
    world: &World,
    op: &proto::cluster::AdminOp,
    hash: &str,
    deadline_ms: u64,
) -> Result<(), Violation> {
    loop {
        match operator::admin(world, 0, op.clone()).await {
            Ok(_) => break,
            Err(e) if world.now_ms() > deadline_ms => {
                return Err(Violation::new(
                    Invariant::Liveness,
                    format!("first write check: {LATE_TENANT} was never added: {e}"),
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await,
        }
    }
    while world.gateway(0).views.current().tenant_by_key_hash(hash).is_none() {
        if world.now_ms() > deadline_ms {
            return Err(Violation::new(
                Invariant::Liveness,
                format!("first write check: {LATE_TENANT} never reached gateway g0's view"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}
