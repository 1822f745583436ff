//! One run: the cluster forms, clients work while faults and admin operations come, the faults
//! heal, and the cluster must then converge and serve every tenant its acknowledged data.

use std::sync::Arc;
use std::time::Duration;

use gateway::forward::WireNodeClient;
use gateway::view::ViewHandle;
use gateway::Gateway;
use proto::request::Method;
use proto::{ApiError, Coordinate, Doc};
use tokio_util::sync::CancellationToken;

use crate::cluster::{gateway_addr, node_addr, Cluster};
use crate::model::{tag, CellKey, Outcome};
use crate::monitor::{Invariant, Monitor, Violation};
use crate::net::{Endpoint, Net};
use crate::rng::Rng;
use crate::trace::Trace;
use crate::workload::{all_cells, Client, PHEXTS};
use crate::world::{new_key, write_outcome, Stats, World, WRITE_HORIZON_MS};
use crate::{operator, Options};

/// Nodes that form the cluster at the start; more are started as spares for joins.
const FIRST_MEMBERS: [u64; 3] = [1, 2, 3];
/// How long the cluster may take to form and create its tenants, in simulated milliseconds.
const FORMATION_MS_MAX: u64 = 120_000;
/// How long after the faults heal the cluster may take to serve every tenant again.
const CONVERGENCE_MS_MAX: u64 = 90_000;
/// Pause between liveness probes of one tenant, in milliseconds.
const PROBE_PAUSE_MS: u64 = 250;
/// How often the run looks for a violation, in milliseconds.
const VIOLATION_POLL_MS: u64 = 100;
/// The phext liveness probes write.
const PROBE_PHEXT: &str = "probe";

/// The tenant archived and then purged while the faults go on (never checked for data after).
const DOOMED_TENANT: &str = "tx";
/// Of the runs with R = 3, the share (permille) that form with a lower R and raise it to 3
/// during the faults, so that a raise of R over tenants meets every fault.
const RAISE_R_PERMILLE: u64 = 333;
/// Of those, the share (permille) that form with R = 1 (one copy, no ballots, no leases) and
/// raise it twice; the others form with R = 2.
const RAISE_FROM_ONE_PERMILLE: u64 = 500;
/// How long the product gives a revoked key to stop working everywhere (PRODUCT §2).
const REVOCATION_MS: u64 = 1_000;
/// The phext the quota-edge check writes.
const EDGE_PHEXT: &str = "edge";

/// The shape of one run, drawn from its seed.
struct Plan {
    spares: u64,
    gateways: u64,
    tenants: Vec<String>,
    writers_per_tenant: Vec<u64>,
}

fn plan(rng: &mut Rng) -> Plan {
    let tenants: Vec<String> = (0..rng.range(5, 8)).map(|i| format!("t{i}")).collect();
    let writers_per_tenant = tenants.iter().map(|_| rng.range(1, 2)).collect();
    Plan { spares: rng.range(1, 2), gateways: rng.range(1, 2), tenants, writers_per_tenant }
}

/// Runs the scenario of one seed; the first violation ends it. Returns the run's counts and its
/// violation, if any.
pub async fn run(seed: u64, options: &Options, trace: Arc<Trace>) -> (Stats, Option<Violation>) {
    let mut rng = Rng::new(seed);
    let plan = plan(&mut rng);
    let monitor = Arc::new(Monitor::new(trace.clone()));
    let net = Net::new(rng.fork(), trace.clone(), monitor.clone());
    let admin_key = new_key(&mut rng);
    let ids: Vec<u64> = (1..=FIRST_MEMBERS.len() as u64 + plan.spares).collect();
    let cluster = Cluster::new(
        trace.clone(),
        monitor.clone(),
        net.clone(),
        proto::auth::key_hash(&admin_key),
        &ids,
        &mut rng,
    );
    trace.event(format!(
        "seed {seed}: nodes {ids:?} ({} first members), {} gateways, tenants {:?}",
        FIRST_MEMBERS.len(),
        plan.gateways,
        plan.tenants
    ));
    let stop_all = CancellationToken::new();
    let gateways = start_gateways(&net, &ids, plan.gateways, &stop_all);
    let stale_port = net.port(Endpoint::Gateway(plan.gateways), 0, gateway_addr(plan.gateways));
    let world = Arc::new(World::new(
        trace.clone(),
        monitor.clone(),
        cluster.clone(),
        gateways,
        Arc::new(WireNodeClient(Arc::new(stale_port))),
        proto::auth::key_hash(&admin_key),
    ));
    let result = phases(&world, &plan, &mut rng, options, &stop_all).await;
    stop_all.cancel();
    // Node processes and the network hold each other (a service sends through its port; the
    // network holds every service): stop them all, so the run's memory goes with it.
    world.cluster.stop_all();
    let violation = result.err().or_else(|| world.monitor.violation());
    let mut stats = world.stats().clone();
    stats.handoffs_done = world.monitor.handoffs_done();
    stats.membership_changes = world.monitor.membership_changes();
    (stats, violation)
}

fn start_gateways(
    net: &Arc<Net>,
    ids: &[u64],
    count: u64,
    stop: &CancellationToken,
) -> Vec<Arc<Gateway>> {
    (0..count)
        .map(|g| {
            let port = net.port(Endpoint::Gateway(g), 0, gateway_addr(g));
            let gw = Arc::new(Gateway {
                views: ViewHandle::default(),
                client: Arc::new(WireNodeClient(Arc::new(port))),
                seeds: ids.iter().map(|id| node_addr(*id)).collect(),
            });
            tokio::spawn(gateway::watch::follow(
                gw.client.clone(),
                gw.views.clone(),
                gw.seeds.clone(),
                stop.clone(),
            ));
            gw
        })
        .collect()
}

/// Fails with the monitor's violation, if one was found.
fn checked(world: &World) -> Result<(), Violation> {
    world.monitor.violation().map_or(Ok(()), Err)
}

async fn phases(
    world: &Arc<World>,
    plan: &Plan,
    rng: &mut Rng,
    options: &Options,
    stop_all: &CancellationToken,
) -> Result<(), Violation> {
    for id in world.cluster.ids() {
        let cluster = world.cluster.clone();
        let monitor = world.monitor.clone();
        tokio::spawn(async move {
            if let Err(v) = cluster.start(id).await {
                monitor.report(v);
            }
        });
    }
    tokio::spawn(world.cluster.clone().watch_leaders(stop_all.clone()));
    let formed_by = world.now_ms() + FORMATION_MS_MAX;
    let mut all_tenants = plan.tenants.clone();
    all_tenants.push(DOOMED_TENANT.to_string());
    let replicas = options.replicas;
    let raise = replicas == 3 && rng.chance(RAISE_R_PERMILLE);
    let formed_with = match raise {
        true if rng.chance(RAISE_FROM_ONE_PERMILLE) => 1,
        true => replicas - 1,
        false => replicas,
    };
    operator::form(world, rng, &FIRST_MEMBERS, formed_with, &all_tenants, formed_by)
        .await
        .map_err(|v| {
            Violation::new(Invariant::Liveness, format!("the cluster did not form: {}", v.detail))
        })?;
    checked(world)?;
    world.trace.event("formed: clients, operators and faults start");
    world.monitor.start_handoff_window(world.now_ms());
    let chaos = CancellationToken::new();
    let mut clients = Vec::new();
    for (t, tenant) in all_tenants.iter().enumerate() {
        let writers = plan.writers_per_tenant.get(t).copied().unwrap_or(1);
        for w in 0..writers {
            let own: Vec<CellKey> = all_cells()
                .into_iter()
                .enumerate()
                .filter(|(i, _)| *i as u64 % writers == w)
                .map(|(_, c)| c)
                .collect();
            let client = Client::new(clients.len() as u64, tenant.clone(), own, rng.fork());
            clients.push(tokio::spawn(client.run(world.clone(), chaos.clone())));
        }
    }
    let operators: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(operator::run(
                world.clone(),
                rng.fork(),
                plan.tenants.clone(),
                chaos.clone(),
            ))
        })
        .collect();
    let planned = tokio::spawn(operator::planned(
        world.clone(),
        rng.fork(),
        DOOMED_TENANT.to_string(),
        (formed_with + 1..=replicas).collect(),
        chaos.clone(),
    ));
    let revoked =
        tokio::spawn(crate::workload::revoked_client(world.clone(), rng.fork(), chaos.clone()));
    let faults = options.faults.then(|| {
        let replicas = options.replicas;
        tokio::spawn(crate::faults::run(world.clone(), rng.fork(), chaos.clone(), replicas))
    });
    let chaos_end = world.now_ms() + options.chaos.as_millis() as u64;
    while world.now_ms() < chaos_end {
        tokio::time::sleep(Duration::from_millis(VIOLATION_POLL_MS)).await;
        checked(world)?;
    }
    chaos.cancel();
    world.monitor.end_handoff_window(world.now_ms());
    let _ = planned.await;
    let _ = revoked.await;
    if let Some(faults) = faults {
        let _ = faults.await;
    }
    crate::faults::heal(world).await;
    for task in clients.into_iter().chain(operators) {
        let _ = task.await;
    }
    checked(world)?;
    let healed_at = world.now_ms();
    let deadline = healed_at + CONVERGENCE_MS_MAX;
    operator::settle(world, rng, &plan.tenants, deadline).await?;
    for tenant in &plan.tenants {
        probe(world, rng, tenant, deadline).await?;
    }
    world.trace.event(format!(
        "converged: every tenant served {} ms after the heal",
        world.now_ms() - healed_at
    ));
    checked(world)?;
    final_check(world, &plan.tenants, world.now_ms() + CONVERGENCE_MS_MAX).await?;
    checked(world)?;
    revocation_check(world, rng, &plan.tenants, world.now_ms() + CONVERGENCE_MS_MAX).await?;
    checked(world)?;
    quota_edge_check(world, rng, &plan.tenants[0], world.now_ms() + CONVERGENCE_MS_MAX).await?;
    checked(world)?;
    purge_check(world, rng, &plan.tenants, world.now_ms() + CONVERGENCE_MS_MAX).await?;
    checked(world)?;
    replicas_check(world, world.now_ms() + CONVERGENCE_MS_MAX).await?;
    idle_check(world).await?;
    checked(world)?;
    forget_check(world, &plan.tenants).await?;
    checked(world)
}

/// What one replica of a tenant holds: where its log ends, and each phext the run writes.
#[derive(Debug, PartialEq, Eq)]
struct Copy {
    end: node::store::LogPosition,
    phexts: Vec<(&'static str, Vec<u8>)>,
}

/// A copy, and whether it counts toward a majority (false while its node rebuilds it).
struct Replica {
    copy: Copy,
    counts: bool,
}

/// Node `id`'s copy of `tenant`, read from its store directly (no request, no lease).
fn copy_on(world: &World, id: u64, tenant: &str) -> Result<Replica, String> {
    let parts = world.cluster.parts(id).ok_or_else(|| format!("n{id} is down"))?;
    let state = parts.store.replica_state(tenant).map_err(|e| format!("n{id}: {e}"))?;
    let counts = parts.store.counts(tenant).map_err(|e| format!("n{id}: {e}"))?;
    let mut phexts = Vec::new();
    for phext in PHEXTS.iter().copied().chain([PROBE_PHEXT, EDGE_PHEXT]) {
        let p = proto::PhextName::parse(phext).map_err(|e| e.to_string())?;
        let got = parts.store.execute(tenant, u64::MAX, &proto::SqRequest::Get { p });
        phexts.push((phext, got.map_err(|e| format!("n{id}: {e}"))?.body.to_vec()));
    }
    Ok(Replica { copy: Copy { end: state.position(), phexts }, counts })
}

/// After the heal and the checks: every replica of each tenant in the registry comes to hold the
/// same log end and the same bytes, and to count (a lost copy is rebuilt), once the tenant is
/// read and without another write ([`Invariant::ReplicasIdentical`]). The read is there because
/// a primary that restarted since the tenant's last request learns which backups lag only when
/// it prepares, at the tenant's first request (idle tenants cost no message). A primary that
/// changes after the read (a node the checks stopped is marked up again) is told by the one that
/// served it (`Replication::hand_over`), with no second read. With one copy of each tenant there
/// is nothing to compare.
async fn replicas_check(world: &World, deadline_ms: u64) -> Result<(), Violation> {
    let Some(state) = world.registry_state() else { return Ok(()) };
    if state.replicas() <= 1 {
        return Ok(());
    }
    // A join or drain during the faults ends with every entering copy caught up and the leaving
    // node out of the set (`HandoffDone`), with no operator step.
    loop {
        let pending: Vec<String> = world
            .registry_state()
            .map(|s| s.handoffs().map(|h| format!("{h:?}")).collect())
            .unwrap_or_default();
        if pending.is_empty() {
            break;
        }
        if world.now_ms() > deadline_ms {
            return Err(Violation::new(
                Invariant::ReplicasIdentical,
                format!(
                    "replica set changes still pending {CONVERGENCE_MS_MAX} ms after the \
                     checks: {}",
                    pending.join("; ")
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await;
    }
    // An archived tenant answers no request, so its primary never prepares it again and its
    // backups stay where the last primary left them (every acknowledged write on a majority):
    // only tenants still served are compared.
    let tenants: Vec<String> =
        state.tenants().filter(|t| !t.archived).map(|t| t.id.to_string()).collect();
    let mut rng = Rng::new(0);
    for tenant in &tenants {
        // A definite answer, or the deadline; a refusal (a rotated key) is as good.
        loop {
            let key = world.key_for(tenant, &mut rng).unwrap_or_default();
            match world.sq(world.gateway(0), &key, Method::Get, "get", "p=alpha", b"").await {
                Err(ApiError::Unavailable { .. } | ApiError::NotOwner { .. })
                    if world.now_ms() < deadline_ms =>
                {
                    tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await
                }
                _ => break,
            }
        }
        loop {
            let Some(state) = world.registry_state() else { return Ok(()) };
            let set = state.replica_set(tenant);
            let copies: Vec<(u64, Result<Replica, String>)> =
                set.iter().map(|&id| (id, copy_on(world, id, tenant))).collect();
            let first = copies.first().and_then(|(_, c)| c.as_ref().ok()).map(|r| &r.copy);
            let same = first.is_some()
                && copies
                    .iter()
                    .all(|(_, c)| c.as_ref().is_ok_and(|r| r.counts && Some(&r.copy) == first));
            if same {
                break;
            }
            if world.now_ms() > deadline_ms {
                let shown: Vec<String> = copies
                    .iter()
                    .map(|(id, c)| match c {
                        Ok(Replica { copy, counts }) => format!(
                            "n{id} ends at {:?} with {:?}{}",
                            copy.end,
                            copy.phexts.iter().map(|(p, b)| (*p, b.len())).collect::<Vec<_>>(),
                            if *counts { "" } else { ", not counted yet" }
                        ),
                        Err(e) => format!("n{id}: {e}"),
                    })
                    .collect();
                return Err(Violation::new(
                    Invariant::ReplicasIdentical,
                    format!(
                        "{tenant}'s replicas {set:?} differ {CONVERGENCE_MS_MAX} ms after the \
                         checks: {}",
                        shown.join("; ")
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await;
        }
    }
    world.trace.event("replicas check: every tenant's replicas are identical and count");
    Ok(())
}

/// The kinds of message that belong to one tenant (its requests, its replication, its
/// catch-up and handoffs); leases, gossip, Raft and metering are per node.
const TENANT_MESSAGES: [&str; 11] = [
    "sq",
    "replicate",
    "prepare",
    "fetch-records",
    "catch-up",
    "snapshot-take",
    "snapshot-read",
    "snapshot-done",
    "handoff-manifest",
    "handoff-read",
    "enter",
];

/// How long the work of the last requests may take to finish (records shipped to the last
/// backup) before the idle window opens.
const IDLE_SETTLE_MS: u64 = 2_000;

/// How long the cluster is watched with no request at all.
const IDLE_WINDOW_MS: u64 = 5_000;

/// With no client and no operator left, and every replica identical: after [`IDLE_SETTLE_MS`],
/// no tenant message is sent for [`IDLE_WINDOW_MS`] ([`Invariant::IdleQuiet`]). Idle tenants
/// cost nothing: liveness is per node.
async fn idle_check(world: &World) -> Result<(), Violation> {
    let tenant_messages =
        |sent: &std::collections::BTreeMap<&'static str, u64>| -> Vec<(&'static str, u64)> {
            TENANT_MESSAGES.iter().map(|k| (*k, sent.get(k).copied().unwrap_or(0))).collect()
        };
    tokio::time::sleep(Duration::from_millis(IDLE_SETTLE_MS)).await;
    let before = tenant_messages(&world.cluster.net.sent_by_kind());
    tokio::time::sleep(Duration::from_millis(IDLE_WINDOW_MS)).await;
    let after = tenant_messages(&world.cluster.net.sent_by_kind());
    let sent: Vec<String> = before
        .iter()
        .zip(&after)
        .filter(|((_, b), (_, a))| a > b)
        .map(|((kind, b), (_, a))| format!("{} {kind}", a - b))
        .collect();
    if !sent.is_empty() {
        return Err(Violation::new(
            Invariant::IdleQuiet,
            format!("{} ms with no request, and still sent: {}", IDLE_WINDOW_MS, sent.join(", ")),
        ));
    }
    world.trace.event(format!("idle check: no tenant message in {IDLE_WINDOW_MS} ms"));
    Ok(())
}

/// How long the forget check waits past [`node::replicate::LED_IDLE_FORGET_MS`]: two passes of
/// the nodes' sweeper (every 5 s).
const FORGET_SWEEPS_MS: u64 = 11_000;

/// With R > 1, after the idle check: once no tenant has had a request for
/// [`node::replicate::LED_IDLE_FORGET_MS`] and the sweepers ran, no node keeps replication state
/// for any tenant (an idle replica costs the store's slot only: [`Invariant::IdleForgotten`]);
/// then every tenant still served reads back as the model says, its primary preparing it anew.
async fn forget_check(world: &World, tenants: &[String]) -> Result<(), Violation> {
    let Some(state) = world.registry_state() else { return Ok(()) };
    if state.replicas() <= 1 {
        return Ok(());
    }
    let wait = node::replicate::LED_IDLE_FORGET_MS + FORGET_SWEEPS_MS;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    for id in world.cluster.ids() {
        let Some(parts) = world.cluster.parts(id) else { continue };
        let kept = parts.service.replication.led_count();
        if kept > 0 {
            return Err(Violation::new(
                Invariant::IdleForgotten,
                format!(
                    "n{id} still keeps replication state for {kept} tenants idle for {wait} ms"
                ),
            ));
        }
    }
    let Some(state) = world.registry_state() else { return Ok(()) };
    let served: Vec<String> = tenants
        .iter()
        .filter(|t| state.tenant(t).is_some_and(|r| !r.archived && r.enabled))
        .cloned()
        .collect();
    final_check(world, &served, world.now_ms() + CONVERGENCE_MS_MAX).await?;
    world.trace.event(format!(
        "forget check: no replication state kept after {wait} ms idle; {} tenants served again",
        served.len()
    ));
    Ok(())
}

/// Every gateway, and the lagging one (whose frozen view still holds what was revoked, so the
/// owning node must refuse it itself).
fn every_gateway(world: &World) -> Vec<(String, Arc<Gateway>)> {
    let mut all: Vec<(String, Arc<Gateway>)> =
        world.gateways.iter().enumerate().map(|(g, gw)| (format!("g{g}"), gw.clone())).collect();
    if let Some(stale) = world.stale_gateway() {
        all.push(("the lagging gateway".into(), stale));
    }
    all
}

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
async fn revocation_check(
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
async fn quota_edge_check(
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
    let mut used = 0u64;
    for phext in PHEXTS.iter().copied().chain([PROBE_PHEXT]) {
        let body = loop {
            match world
                .sq(world.gateway(0), &key, Method::Get, "get", &format!("p={phext}"), b"")
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
        let leaves = used + len;
        match (&result, fits) {
            (Ok(_), true) => {}
            (Err(ApiError::QuotaExceeded { needed_bytes: 1, free_bytes: 0, quota_bytes }), false)
                if *quota_bytes == quota => {}
            (Ok(_), false) => {
                return Err(Violation::new(
                    Invariant::Quota,
                    format!("{tenant}'s write leaving it {leaves} bytes was acknowledged; its quota was lowered to {quota} bytes"),
                ))
            }
            (other, _) => {
                return Err(Violation::new(
                    Invariant::WrongfulRefusal,
                    format!("{tenant}'s write leaving it {leaves} bytes, under a quota of {quota} bytes, answered {:?}", other.as_ref().map(|_| "ok")),
                ))
            }
        }
    }
    // Room again for what comes after.
    emptied(tenant, edge_write(world, tenant, &key, &cell, String::new(), deadline_ms).await?)?;
    world.trace.event(format!(
        "quota edge check: {tenant} at {quota} bytes exactly, and refused one more"
    ));
    Ok(())
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
async fn purge_check(
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

/// Active nodes, in the freshest registry state.
fn active_nodes(world: &World) -> usize {
    world.registry_state().map_or(0, |state| {
        state.nodes().filter(|n| n.state == raft_registry::NodeState::Active).count()
    })
}

/// Nodes the freshest registry state counts as members (joining, active or draining). A removed
/// node no longer hears the registry: wiping its disk is the operator's job.
fn member_nodes(world: &World) -> Vec<u64> {
    let Some(state) = world.registry_state() else { return Vec::new() };
    world
        .cluster
        .ids()
        .into_iter()
        .filter(|id| state.node(*id).is_some_and(|n| n.state != raft_registry::NodeState::Removed))
        .collect()
}

/// Liveness: a write to `tenant` is acknowledged and read back through every gateway.
async fn probe(
    world: &World,
    rng: &mut Rng,
    tenant: &str,
    deadline_ms: u64,
) -> Result<(), Violation> {
    let cell = CellKey { phext: PROBE_PHEXT.to_string(), coord: Coordinate::ORIGIN };
    let query = format!("p={}&c={}", cell.phext, cell.coord);
    let mut last = String::from("no attempt");
    let mut attempt = 0;
    while world.now_ms() <= deadline_ms {
        attempt += 1;
        let key = world.key_for(tenant, rng).unwrap_or_default();
        let value = tag(tenant, &format!("probe.{attempt}"));
        let now = world.now_ms();
        let id =
            world.model().begin_write(tenant, &cell, value.clone(), now, now + WRITE_HORIZON_MS);
        let result = world
            .sq(
                world.gateway(rng.below(world.gateways.len() as u64) as usize),
                &key,
                Method::Post,
                "update",
                &query,
                value.as_bytes(),
            )
            .await;
        let outcome = write_outcome(&result);
        world.model().end_write(id, outcome, world.now_ms());
        // A full quota is an answer from the owner's store: the tenant is served; read it back.
        let quota_full = matches!(result, Err(ApiError::QuotaExceeded { .. }));
        if outcome == Outcome::Acked || quota_full {
            let mut all_read = true;
            for gw in 0..world.gateways.len() {
                let start = world.now_ms();
                match world.sq(world.gateway(gw), &key, Method::Get, "select", &query, b"").await {
                    Ok(r) => world.model().check_read(
                        tenant,
                        &cell,
                        start,
                        &String::from_utf8_lossy(&r.body),
                        true,
                    )?,
                    Err(e) => {
                        last = format!("read through gateway {gw}: {e}");
                        all_read = false;
                    }
                }
            }
            if all_read {
                return Ok(());
            }
        } else if let Err(e) = result {
            last = e.to_string();
            // An admin operation sent before the heal may land after the settling: put it right.
            match e {
                ApiError::Forbidden(_) => operator::enable(world, rng, tenant).await,
                ApiError::Unauthorized => {
                    operator::rotate_until_done(world, rng, tenant, deadline_ms).await?
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await;
    }
    Err(Violation::new(
        Invariant::Liveness,
        format!(
            "tenant {tenant} not served {CONVERGENCE_MS_MAX} ms after the heal: {last}; {}",
            registry_status(world)
        ),
    ))
}

/// Each node's view of the registry, for a liveness report.
fn registry_status(world: &World) -> String {
    let mut out = Vec::new();
    for id in world.cluster.ids() {
        match world.cluster.parts(id) {
            Some(p) => {
                let s = p.registry.status();
                let state = p.registry.state();
                out.push(format!(
                    "n{id}: term {} leader {:?} applied {:?} epoch {} handoffs {}",
                    s.term,
                    s.leader,
                    s.last_applied_index,
                    state.placement_epoch(),
                    state.handoffs().count()
                ));
            }
            None => out.push(format!(
                "n{id}: down ({})",
                world.cluster.start_error(id).unwrap_or_default()
            )),
        }
    }
    for (g, gw) in world.gateways.iter().enumerate() {
        let v = gw.views.current();
        out.push(format!("g{g} view: applied {} epoch {}", v.view.applied_index, v.view.epoch));
    }
    out.join("; ")
}

/// After convergence: every phext of every tenant holds exactly its acknowledged writes.
async fn final_check(world: &World, tenants: &[String], deadline_ms: u64) -> Result<(), Violation> {
    let mut rng = Rng::new(0);
    for tenant in tenants {
        for phext in PHEXTS.iter().copied().chain([PROBE_PHEXT]) {
            // A membership change or admin operation sent before the heal may still land: wait
            // it out, and undo a late disable or key rotation.
            let (start, body) = loop {
                let start = world.now_ms();
                let key = world.key_for(tenant, &mut rng).unwrap_or_default();
                match world
                    .sq(world.gateway(0), &key, Method::Get, "get", &format!("p={phext}"), b"")
                    .await
                {
                    Ok(r) => break (start, r.body),
                    Err(e) if world.now_ms() > deadline_ms => {
                        return Err(Violation::new(
                            Invariant::Liveness,
                            format!("final read of {tenant}/{phext} failed: {e}"),
                        ));
                    }
                    Err(ApiError::Forbidden(_)) => operator::enable(world, &mut rng, tenant).await,
                    Err(ApiError::Unauthorized) => {
                        operator::rotate_until_done(world, &mut rng, tenant, deadline_ms).await?
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await,
                }
            };
            let doc = Doc::parse(&body).map_err(|e| {
                Violation::new(
                    Invariant::LostWrite,
                    format!("{tenant}/{phext} is not a phext: {e}"),
                )
            })?;
            world.model().check_doc(tenant, phext, start, &doc, true)?;
        }
        world.model().check_quota(tenant)?;
    }
    Ok(())
}
