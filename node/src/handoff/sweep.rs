//! The old owner's sweep: deletes its copy of a tenant once the handoff is done and the grace
//! period has passed, and every copy of a purged tenant.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{on_store, HandoffError};
use crate::service::Service;

/// How often the old owner looks for copies it may delete.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The longest the sweep goes without listing every local copy while the registry stands
/// still. A copy can land after the listing its epoch caused (a pull that finished late); a
/// copy already listed changes standing only with the registry.
const SWEEP_FULL_INTERVAL: Duration = Duration::from_secs(300);

/// Every [`SWEEP_INTERVAL`]: deletes snapshots no replica read for a while, every copy of purged
/// tenants, and (old owner) copies of tenants this node no longer owns, once no handoff needs
/// them and the grace period has passed since that was first seen. A copy counts as no longer owned only if this node's registry
/// state knows the tenant and is newer than the placement epoch in which the copy arrived here:
/// a state from before that (a restart from an old snapshot, a node cut off from the leader)
/// would otherwise make the live copy look like a leftover.
pub async fn run_sweeper(svc: Arc<Service>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        if let Err(e) = sweep(&svc).await {
            tracing::warn!(error = %e, "sweeping old tenant copies failed");
        }
    }
}

async fn sweep(svc: &Service) -> Result<(), HandoffError> {
    let forgotten = svc.replication.forget_idle();
    if forgotten > 0 {
        tracing::debug!(node = svc.id, forgotten, "forgot the replication state of idle tenants");
    }
    // Read before the state the listing is judged by, so an entry applied after it is seen as
    // a change at the next sweep.
    let applied = svc.registry.status().last_applied_index;
    let now = tokio::time::Instant::now();
    let last = *svc.handoffs.swept.lock().unwrap_or_else(|p| p.into_inner());
    let listing = listing_due(last, applied, now);
    let idle_ms = crate::catchup::SNAPSHOT_IDLE_MS;
    on_store(svc, move |s| s.drop_idle_snapshots(idle_ms, listing)).await?;
    if !listing {
        return Ok(());
    }
    let (held, local) = on_store(svc, |s| Ok((s.held_tenants()?, s.local_tenants()?))).await?;
    let state = svc.registry.state();
    let grace = Duration::from_secs(svc.handoffs.config.grace_s);
    for t in held.iter().filter(|t| state.is_purged(t)) {
        purge(svc, t).await?;
    }
    let mut stale = Vec::new();
    for t in local {
        if handed_off(svc, &state, &t).await? {
            stale.push(t);
        }
    }
    let mut due = Vec::new();
    let waiting;
    {
        let mut retired = svc.handoffs.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|t, _| stale.contains(t));
        for t in &stale {
            let since = *retired.entry(t.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= grace {
                due.push(t.clone());
            }
        }
        for t in &due {
            retired.remove(t);
        }
        // A copy waiting out its grace period is looked at again at the next sweep.
        waiting = !retired.is_empty();
    }
    for tenant in due {
        // Judged again as it is now, while no copy of the tenant is being staged here: a handoff
        // back to this node may have swapped a new copy in since the listing (the simulator's
        // seed 500243 saw a copy deleted just after it arrived).
        let _one_copy = svc.handoffs.staging(&tenant).await;
        if !handed_off(svc, &svc.registry.state(), &tenant).await? {
            continue;
        }
        let t = tenant.clone();
        on_store(svc, move |s| s.remove_tenant(&t)).await?;
        svc.limits.forget(&tenant);
        tracing::info!(
            node = svc.id,
            tenant,
            "deleted the copy of a tenant handed off to another node"
        );
    }
    *svc.handoffs.swept.lock().unwrap_or_else(|p| p.into_inner()) =
        (!waiting).then_some((applied, now));
    Ok(())
}

/// Whether this node's copy of `t` is one it handed off (no longer its own, nor a replica's, and
/// no handoff needs it), by a registry `state` newer than the epoch the copy arrived in.
async fn handed_off(
    svc: &Service,
    state: &raft_registry::RegistryState,
    t: &str,
) -> Result<bool, HandoffError> {
    if state.is_purged(t)
        || state.tenant(t).is_none()
        || state.owner_of(t) == Some(svc.id)
        // A copy this node holds as one of the tenant's replicas (R > 1) is no leftover.
        || state.replica_set(t).contains(&svc.id)
        || state.handoff(t).is_some()
    {
        return Ok(false);
    }
    let id = t.to_string();
    Ok(state.placement_epoch() > on_store(svc, move |s| s.received_epoch(&id)).await?)
}

/// Whether a sweep lists every local copy: unless the last listing (`last`: the registry's
/// applied entry then, and when) left none waiting out its grace period, the registry has
/// applied no entry since, and [`SWEEP_FULL_INTERVAL`] has not passed.
fn listing_due(
    last: Option<(Option<u64>, tokio::time::Instant)>,
    applied: Option<u64>,
    now: tokio::time::Instant,
) -> bool {
    !last.is_some_and(|(index, at)| {
        index == applied && now.saturating_duration_since(at) < SWEEP_FULL_INTERVAL
    })
}

/// Deletes every copy of a purged tenant this node holds at once (a purge is explicit; no grace
/// period), a half-received one too: the purge cancelled its handoff, so no pull will finish it.
/// The tenant's gate is held meanwhile, so a request that passed its checks before the purge
/// was applied finishes first, and a pull's swap (under the same gate) either came before or
/// finds its handoff gone; every later request finds no tenant.
async fn purge(svc: &Service, tenant: &str) -> Result<(), HandoffError> {
    let _closed = svc.handoffs.exclusive(tenant).await;
    let t = tenant.to_string();
    on_store(svc, move |s| s.remove_every_copy(&t)).await?;
    // Else a later persist would write its roll-up back into a new directory.
    svc.limits.forget(tenant);
    // A purged tenant's calls leave `sq_api_calls_total` with it.
    if let Some(number) = svc.store.number_of(tenant) {
        svc.calls.forget(number);
    }
    tracing::info!(node = svc.id, tenant, "deleted the data of a purged tenant");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the sweep lists the local copies the first time, after any registry entry, and
    // after the longest interval, and at no other sweep.
    #[test]
    fn the_sweep_lists_copies_only_when_something_could_have_changed() {
        let at = tokio::time::Instant::now();
        let later = |d: Duration| at + d;
        assert!(listing_due(None, Some(7), at), "never listed");
        let last = Some((Some(7), at));
        assert!(!listing_due(last, Some(7), later(SWEEP_INTERVAL)), "nothing changed");
        assert!(listing_due(last, Some(8), later(SWEEP_INTERVAL)), "an entry was applied");
        assert!(listing_due(Some((None, at)), Some(1), at), "the first entry was applied");
        assert!(listing_due(last, Some(7), later(SWEEP_FULL_INTERVAL)), "the interval passed");
    }
}
