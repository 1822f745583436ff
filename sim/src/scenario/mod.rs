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
use crate::workload::{all_cells, Client, PHEXTS, PROBE_PHEXT};
use crate::world::{new_key, write_outcome, Stats, World, WRITE_HORIZON_MS};
use crate::{operator, Options};

mod edges;
mod replicas;

use edges::{first_write_check, purge_check, quota_edge_check, revocation_check};
use replicas::{forget_check, idle_check, replicas_check};

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
    let (all_tenants, formed_with) = form(world, plan, rng, options, stop_all).await?;
    checked(world)?;
    chaos(world, plan, rng, options, &all_tenants, formed_with).await?;
    checked(world)?;
    converge_and_check(world, plan, rng).await
}

/// Starts every node and forms the cluster with the plan's tenants and the doomed one; a third
/// of the R = 3 runs form with fewer copies, raised during the faults. Returns every tenant and
/// the R the cluster formed with.
async fn form(
    world: &Arc<World>,
    plan: &Plan,
    rng: &mut Rng,
    options: &Options,
    stop_all: &CancellationToken,
) -> Result<(Vec<String>, u8), Violation> {
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
    Ok((all_tenants, formed_with))
}

/// Clients, operators, the planned change, the revoked client and the faults run until the
/// chaos ends; then the faults heal and every task is awaited.
async fn chaos(
    world: &Arc<World>,
    plan: &Plan,
    rng: &mut Rng,
    options: &Options,
    all_tenants: &[String],
    formed_with: u8,
) -> Result<(), Violation> {
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
        (formed_with + 1..=options.replicas).collect(),
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
    Ok(())
}

/// After the heal: the cluster converges and serves every tenant, then the end-of-run checks.
async fn converge_and_check(
    world: &Arc<World>,
    plan: &Plan,
    rng: &mut Rng,
) -> Result<(), Violation> {
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
    checked(world)?;
    first_write_check(world, rng, world.now_ms() + CONVERGENCE_MS_MAX).await?;
    checked(world)
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

/// Reads `cell` of `tenant` through every gateway, each read checked against the model. False
/// (with the last failure in `last`) when a gateway could not answer.
async fn read_everywhere(
    world: &World,
    tenant: &str,
    key: &str,
    cell: &CellKey,
    last: &mut String,
) -> Result<bool, Violation> {
    let query = format!("p={}&c={}", cell.phext, cell.coord);
    let mut all_read = true;
    for gw in 0..world.gateways.len() {
        let start = world.now_ms();
        match world.sq(world.gateway(gw), key, Method::Get, "select", &query, b"").await {
            Ok(r) => world.model().check_read(
                tenant,
                cell,
                start,
                &String::from_utf8_lossy(&r.body),
                true,
            )?,
            Err(e) => {
                *last = format!("read through gateway {gw}: {e}");
                all_read = false;
            }
        }
    }
    Ok(all_read)
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
            if read_everywhere(world, tenant, &key, &cell, &mut last).await? {
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
