//! The end-of-run checks of a replicated cluster: every replica of a tenant holds the same log
//! and bytes after the heal, idle tenants exchange no messages, and idle tenants' replication
//! state is forgotten.

use std::time::Duration;

use proto::request::Method;
use proto::ApiError;

use super::{final_check, CONVERGENCE_MS_MAX, EDGE_PHEXT, PROBE_PAUSE_MS, PROBE_PHEXT};
use crate::monitor::{Invariant, Violation};
use crate::rng::Rng;
use crate::workload::PHEXTS;
use crate::world::World;

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
pub(super) async fn replicas_check(world: &World, deadline_ms: u64) -> Result<(), Violation> {
    let Some(state) = world.registry_state() else { return Ok(()) };
    if state.replicas() <= 1 {
        return Ok(());
    }
    replica_changes_done(world, deadline_ms).await?;
    // An archived tenant answers no request, so its primary never prepares it again and its
    // backups stay where the last primary left them (every acknowledged write on a majority):
    // only tenants still served are compared.
    let tenants: Vec<String> =
        state.tenants().filter(|t| !t.archived).map(|t| t.id.to_string()).collect();
    let mut rng = Rng::new(0);
    for tenant in &tenants {
        read_once(world, tenant, &mut rng, deadline_ms).await;
        if !copies_identical(world, tenant, deadline_ms).await? {
            return Ok(());
        }
    }
    world.trace.event("replicas check: every tenant's replicas are identical and count");
    Ok(())
}

/// Waits until no replica set change is pending: a join or drain during the faults ends with
/// every entering copy caught up and the leaving node out of the set (`HandoffDone`), with no
/// operator step.
async fn replica_changes_done(world: &World, deadline_ms: u64) -> Result<(), Violation> {
    loop {
        let pending: Vec<String> = world
            .registry_state()
            .map(|s| s.handoffs().map(|h| format!("{h:?}")).collect())
            .unwrap_or_default();
        if pending.is_empty() {
            return Ok(());
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
}

/// Reads `tenant` through a gateway until a definite answer or the deadline; a refusal (a
/// rotated key) is as good. The read makes a restarted primary prepare the tenant.
async fn read_once(world: &World, tenant: &str, rng: &mut Rng, deadline_ms: u64) {
    loop {
        let key = world.key_for(tenant, rng).unwrap_or_default();
        match world.sq(world.gateway(0), &key, Method::Get, "get", "p=alpha", b"").await {
            Err(ApiError::Unavailable { .. } | ApiError::NotOwner { .. })
                if world.now_ms() < deadline_ms =>
            {
                tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await
            }
            _ => return,
        }
    }
}

/// Waits until every member of `tenant`'s replica set holds the same copy and counts. Ok(false)
/// when the registry is gone (nothing more to compare).
async fn copies_identical(
    world: &World,
    tenant: &str,
    deadline_ms: u64,
) -> Result<bool, Violation> {
    loop {
        let Some(state) = world.registry_state() else { return Ok(false) };
        let set = state.replica_set(tenant);
        let copies: Vec<(u64, Result<Replica, String>)> =
            set.iter().map(|&id| (id, copy_on(world, id, tenant))).collect();
        let first = copies.first().and_then(|(_, c)| c.as_ref().ok()).map(|r| &r.copy);
        let same = first.is_some()
            && copies
                .iter()
                .all(|(_, c)| c.as_ref().is_ok_and(|r| r.counts && Some(&r.copy) == first));
        if same {
            return Ok(true);
        }
        if world.now_ms() > deadline_ms {
            return Err(Violation::new(
                Invariant::ReplicasIdentical,
                format!(
                    "{tenant}'s replicas {set:?} differ {CONVERGENCE_MS_MAX} ms after the \
                     checks: {}",
                    shown(&copies).join("; ")
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(PROBE_PAUSE_MS)).await;
    }
}

/// Each copy as a violation shows it: its log end and its phexts' lengths, or why it could not
/// be read.
fn shown(copies: &[(u64, Result<Replica, String>)]) -> Vec<String> {
    copies
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
        .collect()
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
pub(super) async fn idle_check(world: &World) -> Result<(), Violation> {
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
pub(super) async fn forget_check(world: &World, tenants: &[String]) -> Result<(), Violation> {
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
