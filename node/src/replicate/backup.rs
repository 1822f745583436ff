//! A member's side: what a backup or a promising member answers a primary (appends, promises,
//! fetches) and a joining node's call to its primary.

use std::time::Duration;

use proto::cluster::{
    FetchedRecords, NodeResponse, ReplicaAck, ReplicaAppend, ReplicaReport, PROMISED_NOT_COUNTING,
};

use crate::service::Service;
use crate::store::{AppendRefusal, LogPosition, Shipment, Store};

/// How long a backup waits for its registry to reach the epoch a primary sent under.
const EPOCH_CATCH_UP_WAIT: Duration = Duration::from_millis(1000);

/// Why a member refuses a request about a tenant from `from` under `ballot`: unless `from` is
/// the tenant's primary and this node a member of its set in this node's registry, once that
/// has reached `ballot` (waited for briefly).
pub(crate) async fn refusal(svc: &Service, from: u64, tenant: &str, ballot: u64) -> Option<String> {
    svc.wait_for_epoch(ballot, EPOCH_CATCH_UP_WAIT).await;
    refusal_now(svc, from, tenant)
}

/// [`refusal`] by this node's registry as it is now, without waiting for it.
fn refusal_now(svc: &Service, from: u64, tenant: &str) -> Option<String> {
    let state = svc.registry.state();
    let set = state.replica_set(tenant);
    if state.tenant(tenant).is_none() {
        Some(format!("no tenant {tenant:?} in this node's registry"))
    } else if state.primary_of(tenant) != Some(from) || !set.contains(&svc.id) {
        // From a node that led the tenant before this one: see that this one has prepared.
        svc.replication.prepare_soon(tenant);
        Some(format!(
            "at placement epoch {}, node {from} is not the primary of {tenant:?} with node {} in \
             its set {set:?}",
            state.placement_epoch(),
            svc.id
        ))
    } else {
        None
    }
}

/// A backup takes a primary's records: each append is checked against this node's registry
/// (the sender is the tenant's primary, this node one of its set) and the store (ballot,
/// continuity), cut first where the primary says so, then made durable.
pub async fn take(svc: &Service, from: u64, appends: Vec<ReplicaAppend>) -> Vec<ReplicaAck> {
    let taken = appends.into_iter().map(|mut a| async move {
        if let Some(why) = refusal(svc, from, &a.tenant, a.epoch).await {
            return ReplicaAck::Refused(why);
        }
        // A copy rebuilt after a lost disk promised nothing that survived: only the placement
        // epoch fences an older primary now. It counts only on the word of a primary that
        // prepared at the epoch this node's registry is at; one whose registry lags (it led
        // under an older epoch and was never told otherwise) may lack writes a newer primary
        // had acknowledged with this copy's lost promise.
        a.caught_up &= a.epoch == svc.registry.state().placement_epoch();
        let store = svc.store.clone();
        crate::blocking::spawn(move || take_one(&store, a))
            .await
            .unwrap_or_else(|e| ReplicaAck::Refused(format!("store task failed: {e}")))
    });
    futures::future::join_all(taken).await
}

fn take_one(store: &Store, a: ReplicaAppend) -> ReplicaAck {
    let t = a.tenant.as_str();
    if let Some(cut) = a.truncate_after {
        // Only a primary this replica may follow cuts its log, and only the log it was told of:
        // a late copy of the message finds another end, cuts nothing, and is refused below as
        // not continuing.
        match store.promise(t, a.epoch) {
            Ok(Ok(state)) if state.last_lsn == a.truncate_if_end => {}
            Ok(Ok(_)) => {
                return ReplicaAck::Refused("the log no longer ends where the cut was asked".into())
            }
            Ok(Err(refused)) => return ReplicaAck::Refused(refused.to_string()),
            Err(e) => return ReplicaAck::Refused(format!("store: {e}")),
        }
        match store.truncate_after(t, cut) {
            Ok(true) => {}
            Ok(false) => return ReplicaAck::NeedsSnapshot,
            Err(e) => return ReplicaAck::Refused(format!("store: {e}")),
        }
    }
    let prev = LogPosition { ballot: a.prev_ballot, lsn: a.prev_lsn };
    match store.append_from_primary(t, a.epoch, a.ballot, prev, &a.records) {
        Ok(Ok(end)) => {
            // Its primary found it holding what it held when it prepared.
            let counted = match a.caught_up {
                true => store.mark_caught_up(t).and_then(|()| store.counts(t)),
                false => store.counts(t),
            };
            match counted {
                Ok(counts) => {
                    ReplicaAck::Durable { ballot: end.ballot, lsn: end.lsn, learner: !counts }
                }
                Err(e) => ReplicaAck::Refused(format!("store: {e}")),
            }
        }
        Ok(Err(AppendRefusal::NotContinuing { have })) => match store.replica_state(t) {
            Ok(state) => ReplicaAck::NotContinuing {
                ballot: have.ballot,
                lsn: have.lsn,
                ballots: state.ballots.to_wire(),
            },
            Err(e) => ReplicaAck::Refused(format!("store: {e}")),
        },
        Ok(Err(AppendRefusal::Ballot(refused))) => ReplicaAck::Refused(refused.to_string()),
        Err(e) => ReplicaAck::Refused(format!("store: {e}")),
    }
}

/// Primary: node `from` enters the tenant's replica set in the change recorded at `epoch`
/// (docs/REPLICATION.md, "Joins and drains"). Prepares the tenant if it has not (a prepare
/// with the set of the change, both the entering and the leaving node in it), brings `from`'s
/// copy up (records, or a snapshot as for any backup), and answers whether the change may be
/// committed ([`super::Replication::entered`]).
pub async fn entering(svc: &Service, from: u64, tenant: String, epoch: u64) -> NodeResponse {
    svc.wait_for_epoch(epoch, EPOCH_CATCH_UP_WAIT).await;
    let state = svc.registry.state();
    match state.replica_change(&tenant) {
        Some(h) if h.to == from && h.epoch == epoch => {}
        _ => {
            return NodeResponse::Entered(Err(format!(
                "no change of {tenant:?}'s replica set brings node {from} in at epoch {epoch}"
            )))
        }
    }
    match svc.replication.prepare_if_primary(&tenant).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return NodeResponse::Entered(Err(format!(
                "node {} is not the primary of {tenant:?}",
                svc.id
            )))
        }
        Err(e) => return NodeResponse::Entered(Err(e.to_string())),
    }
    NodeResponse::Entered(Ok(svc.replication.entered(&tenant, from)))
}

/// A member promises `ballot` to the tenant's new primary `from`, and says where its log stands.
pub async fn promise(svc: &Service, from: u64, tenant: String, ballot: u64) -> NodeResponse {
    // A tenant just added is written to at once, and its new primary's registry may have
    // applied the add before this one's: an add moves no placement epoch, so the member waits
    // for the tenant itself too. Only here: a refused promise fails the write, a refused
    // append is sent again at the link's next round, and an append for a tenant removed
    // meanwhile must not hold up the other tenants' appends in its message.
    svc.wait_for_registry(EPOCH_CATCH_UP_WAIT, |state| {
        state.placement_epoch() >= ballot && state.tenant(&tenant).is_some()
    })
    .await;
    if let Some(why) = refusal_now(svc, from, &tenant) {
        return NodeResponse::Promised(Err(why));
    }
    let (store, owned) = (svc.store.clone(), tenant.clone());
    let promised = crate::blocking::spawn(move || {
        match store.promise(&owned, ballot) {
            Ok(Ok(_)) => {}
            Ok(Err(refused)) => return Err(refused.to_string()),
            Err(e) => return Err(format!("store: {e}")),
        }
        // Promised all the same (older primaries are fenced), but a copy being rebuilt after a
        // lost disk must not help choose the log: it may lack acknowledged writes.
        if !store.counts(&owned).map_err(|e| format!("store: {e}"))? {
            return Err(format!(
                "{PROMISED_NOT_COUNTING}this node's copy is being rebuilt after it lost its disk"
            ));
        }
        let state = store.durable_state(&owned).map_err(|e| format!("store: {e}"))?;
        Ok(ReplicaReport { ballots: state.ballots.to_wire(), last_lsn: state.last_lsn })
    })
    .await
    .unwrap_or_else(|e| Err(format!("store task failed: {e}")));
    if promises_made(&promised) {
        // A read this node runs as the tenant's primary under an older ballot ends in a check
        // that it still leads under it: from now on it does not, so it is not answered.
        svc.replication.step_down(&tenant, ballot);
    }
    NodeResponse::Promised(promised)
}

/// Whether a member's answer to `Prepare` says it made the promise: a report, or a refusal that
/// starts with [`PROMISED_NOT_COUNTING`].
pub(crate) fn promises_made(answer: &Result<ReplicaReport, String>) -> bool {
    match answer {
        Ok(_) => true,
        Err(why) => why.starts_with(PROMISED_NOT_COUNTING),
    }
}

/// A member sends the tenant's new primary `from` its durable records after `after`.
pub async fn fetch(
    svc: &Service,
    from: u64,
    tenant: String,
    ballot: u64,
    after: u64,
) -> NodeResponse {
    if let Some(why) = refusal(svc, from, &tenant, ballot).await {
        return NodeResponse::Fetched(FetchedRecords::Refused(why));
    }
    let store = svc.store.clone();
    let fetched = crate::blocking::spawn(move || {
        let end = store.durable_state(&tenant)?.last_lsn;
        store.shipment(&tenant, after, end)
    })
    .await;
    NodeResponse::Fetched(match fetched {
        Ok(Ok(Shipment::Records { prev, ballot, bytes, last_lsn })) => FetchedRecords::Records {
            ballot,
            prev_ballot: prev.ballot,
            prev_lsn: prev.lsn,
            records: bytes,
            last_lsn,
        },
        Ok(Ok(Shipment::Nothing)) => FetchedRecords::Nothing,
        Ok(Ok(Shipment::Checkpointed)) => FetchedRecords::Checkpointed,
        Ok(Err(e)) => FetchedRecords::Refused(format!("store: {e}")),
        Err(e) => FetchedRecords::Refused(format!("store task failed: {e}")),
    })
}
