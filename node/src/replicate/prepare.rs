//! A change of primary: the prepare round a node runs before it leads a tenant under a new
//! ballot, and the adoption of the most advanced log among the promises (docs/REPLICATION.md,
//! "A change of primary").

use futures::stream::{FuturesUnordered, StreamExt};
use proto::cluster::{FetchedRecords, NodeRequest, NodeResponse};
use proto::ApiError;

use super::{blocking, locked, Replication};
use crate::store::{LogPosition, Shared};

impl Replication {
    /// Before this node serves the tenant as its primary under `ballot` (the placement epoch),
    /// once per ballot (docs/REPLICATION.md, "A change of primary"): promises `ballot` itself
    /// and gathers the promises of `needed` of the other members (`others`), which from then on
    /// refuse every older primary; adopts the most advanced log among them (ballot of the last
    /// record, then lsn; never a commit point), cutting any records of its own that log does not
    /// hold and fetching the records it lacks; then writes under `ballot`. A write acknowledged
    /// under an earlier ballot is on a majority of the set, so on one of the promises.
    ///
    /// Returns the ballot this node leads the tenant under (`ballot` or a later one), which the
    /// request's [`Self::commit`] names.
    pub async fn prepare(
        &self,
        tenant: &str,
        ballot: u64,
        others: &[u64],
        needed: usize,
    ) -> Result<u64, ApiError> {
        self.used(tenant);
        let led = |me: &Self| locked(&me.led).get(tenant).copied().filter(|&led| led >= ballot);
        if let Some(led) = led(self) {
            return Ok(led);
        }
        let gate = locked(&self.preparing).entry(tenant.to_string()).or_default().clone();
        let _one_at_a_time = gate.lock().await;
        if let Some(led) = led(self) {
            return Ok(led);
        }
        // A node that lost its disk may have led under this ballot before, with records it no
        // longer has and another replica may hold: leading under it again could give one
        // (ballot, lsn) two records (simulator seed 4043 of `--replicas 3`).
        if let Some(lost_at) = self.store.lost_at_epoch().filter(|&lost_at| ballot <= lost_at) {
            return Err(ApiError::unavailable(format!(
                "this node lost its copies at placement epoch {lost_at} and leads no tenant \
                 again until the epoch moves past it (it is at {ballot})"
            )));
        }
        for link in locked(&self.links).values() {
            link.forget(tenant);
        }
        let (needed, mine) = self.promise_own(tenant, ballot, others.len(), needed).await?;
        let promised = self.promises(tenant, ballot, others, needed).await?;
        tracing::debug!(
            node = self.id,
            tenant,
            ballot,
            mine = ?mine.ballots.position(mine.last_lsn),
            mine_history = ?mine.ballots,
            promised = ?promised.iter().map(|(n, b, l)| (*n, b.position(*l))).collect::<Vec<_>>(),
            "prepare: promises gathered"
        );
        let best = promised.into_iter().max_by_key(|(_, b, last)| b.position(*last));
        if let Some((from, theirs, their_end)) = best {
            if theirs.position(their_end) > mine.ballots.position(mine.last_lsn) {
                self.adopt(tenant, ballot, &mine, from, &theirs, their_end).await?;
            }
        }
        let end = self.lead(tenant, ballot).await?;
        locked(&self.prepared_end).insert(tenant.to_string(), end);
        locked(&self.led).insert(tenant.to_string(), ballot);
        // Every member is brought to this log's end (its barrier, and what it adopted), in the
        // background: a tenant that takes no write after a failover still ends up on all its
        // replicas, and only then goes quiet.
        for &node in others {
            self.link(node).want(tenant, end);
        }
        crate::metrics::prepared();
        Ok(ballot)
    }

    /// Promises `ballot` on this node's own copy and returns it, with how many of the
    /// `others` other members must promise too: `needed`, or one more when this node's copy is
    /// being rebuilt after a lost disk and does not count.
    async fn promise_own(
        &self,
        tenant: &str,
        ballot: u64,
        others: usize,
        needed: usize,
    ) -> Result<(usize, crate::store::ReplicaState), ApiError> {
        // A copy being rebuilt after a lost disk does not count: another member promises in
        // its place.
        let (store, owned) = (self.store.clone(), tenant.to_string());
        let counts = blocking(move || store.counts(&owned)).await?;
        let needed = if counts { needed } else { needed + 1 };
        if others < needed {
            return Err(ApiError::unavailable(format!(
                "this node's copy of the tenant is being rebuilt and the tenant has {others} \
                 other replicas, too few to lead it"
            )));
        }
        let (store, owned) = (self.store.clone(), tenant.to_string());
        let mine = blocking(move || match store.promise(&owned, ballot)? {
            Ok(_) => store.durable_state(&owned).map(Ok),
            Err(refused) => Ok(Err(refused)),
        })
        .await?
        .map_err(|refused| {
            ApiError::unavailable(format!("this node cannot lead the tenant: {refused}"))
        })?;
        Ok((needed, mine))
    }

    /// Asks `others` to promise `ballot`, and returns at least `needed` promises, each with the
    /// member's ballot history and where its log ends; 503 if fewer promise. It also waits for
    /// the promise of every other member its registry does not mark down, though that member's
    /// copy may not count: one of them may have led the tenant until now (a primary that came
    /// back, or a join or drain, moves the tenant from a node that is up), and may still answer
    /// reads under its lease until it has promised (the simulator's seed 13778 of
    /// `--replicas 3`: a read served by the interim primary missed a write the returning one
    /// had acknowledged). A node marked down holds no lease (docs/REPLICATION.md, "Node
    /// leases").
    async fn promises(
        &self,
        tenant: &str,
        ballot: u64,
        others: &[u64],
        needed: usize,
    ) -> Result<Vec<(u64, crate::store::Ballots, u64)>, ApiError> {
        let state = self.registry.state();
        let mut unfenced: Vec<u64> =
            others.iter().copied().filter(|&n| !state.is_down(n)).collect();
        drop(state);
        let mut asks: FuturesUnordered<_> = others
            .iter()
            .map(|&node| async move {
                let request = NodeRequest::Prepare { tenant: tenant.to_string(), ballot };
                let answer = match self.call(node, request).await {
                    Ok(NodeResponse::Promised(answer)) => answer,
                    _ => Err("no answer".to_string()),
                };
                let fenced = super::backup::promises_made(&answer);
                let counted = match answer {
                    Ok(report) => crate::store::Ballots::from_wire(&report.ballots)
                        .ok()
                        .map(|ballots| (node, ballots, report.last_lsn)),
                    Err(why) => {
                        tracing::info!(tenant, node, reason = %why, "a member did not promise");
                        None
                    }
                };
                (node, fenced, counted)
            })
            .collect();
        let mut promised = Vec::new();
        while promised.len() < needed || !unfenced.is_empty() {
            match asks.next().await {
                Some((node, fenced, counted)) => {
                    if fenced {
                        unfenced.retain(|&n| n != node);
                    }
                    promised.extend(counted);
                }
                None => break,
            }
        }
        drop(asks);
        if promised.len() < needed {
            return Err(ApiError::unavailable(format!(
                "{} of the tenant's other {} replicas promised its new primary and {needed} must",
                promised.len(),
                others.len()
            )));
        }
        if !unfenced.is_empty() {
            return Err(ApiError::unavailable(format!(
                "members {unfenced:?} of the tenant, not marked down, did not promise its new \
                 primary: one may still serve it"
            )));
        }
        Ok(promised)
    }

    /// Makes this node the tenant's primary under `ballot` in its store: it leads under it,
    /// writes the ballot's barrier and counts its copy. Returns where its log then ends.
    async fn lead(&self, tenant: &str, ballot: u64) -> Result<u64, ApiError> {
        let (store, owned) = (self.store.clone(), tenant.to_string());
        blocking(move || {
            if let Err(refused) = store.lead(&owned, ballot)? {
                return Ok(Err(refused));
            }
            // Records of earlier ballots are shown only once a record of this one is on a
            // majority: a read waits for the barrier too (Raft's no-op of a new term).
            store.barrier(&owned, ballot)?;
            // It holds the most advanced log of a majority that counts: its copy counts too.
            store.mark_caught_up(&owned)?;
            Ok(Ok(store.replica_state(&owned)?.last_lsn))
        })
        .await?
        .map_err(|refused| {
            ApiError::unavailable(format!("this node cannot lead the tenant: {refused}"))
        })
    }

    /// Makes this node's log of the tenant that of member `from` (ending at `their_end`): cuts
    /// what it holds past the last record they share, then fetches the rest from `from`. When
    /// the logs differ below what either still holds as records (a checkpoint folded them), it
    /// takes `from`'s snapshot instead (`crate::catchup`), once.
    async fn adopt(
        &self,
        tenant: &str,
        ballot: u64,
        mine: &crate::store::ReplicaState,
        from: u64,
        theirs: &crate::store::Ballots,
        their_end: u64,
    ) -> Result<(), ApiError> {
        let mut snapshot_taken = false;
        let mut snapshot = || {
            let first = !std::mem::replace(&mut snapshot_taken, true);
            async move {
                if !first {
                    return Err(ApiError::unavailable(format!(
                        "node {from}'s log still differs from this node's after a snapshot"
                    )));
                }
                let taken = crate::catchup::take(
                    &self.copier(),
                    &self.registry,
                    self.id,
                    tenant,
                    from,
                    ballot,
                )
                .await;
                taken.map_err(|e| {
                    ApiError::unavailable(format!("taking node {from}'s snapshot: {e}"))
                })
            }
        };
        let mut end =
            match crate::store::common_prefix(&mine.ballots, mine.last_lsn, theirs, their_end) {
                Shared::Through(shared) if mine.last_lsn <= shared => shared,
                Shared::Through(shared) => {
                    let (store, owned) = (self.store.clone(), tenant.to_string());
                    if blocking(move || store.truncate_after(&owned, shared)).await? {
                        tracing::warn!(
                            tenant,
                            cut_after = shared,
                            dropped = mine.last_lsn - shared,
                            "a new primary cut records no majority held"
                        );
                        shared
                    } else {
                        snapshot().await?
                    }
                }
                Shared::Unknown => snapshot().await?,
            };
        while end < their_end {
            let Some((written, prev, records)) = self.fetch(from, tenant, ballot, end).await?
            else {
                end = snapshot().await?;
                continue;
            };
            let (store, owned) = (self.store.clone(), tenant.to_string());
            let taken = blocking(move || {
                store.append_from_primary(&owned, ballot, written, prev, &records)
            })
            .await?
            .map_err(|refused| {
                ApiError::unavailable(format!("records from node {from} refused: {refused}"))
            })?;
            end = taken.lsn;
        }
        Ok(())
    }

    /// Fetches member `from`'s records of the tenant after `after`: the ballot they were
    /// written under, the position they follow, and their bytes; `None` when `from` checkpointed
    /// them (this node then needs its snapshot).
    async fn fetch(
        &self,
        from: u64,
        tenant: &str,
        ballot: u64,
        after: u64,
    ) -> Result<Option<(u64, LogPosition, Vec<u8>)>, ApiError> {
        let request = NodeRequest::FetchRecords { tenant: tenant.to_string(), ballot, after };
        match self.call(from, request).await {
            Ok(NodeResponse::Fetched(FetchedRecords::Records {
                ballot: written,
                prev_ballot,
                prev_lsn,
                records,
                ..
            })) => Ok(Some((written, LogPosition { ballot: prev_ballot, lsn: prev_lsn }, records))),
            Ok(NodeResponse::Fetched(FetchedRecords::Checkpointed)) => Ok(None),
            Ok(NodeResponse::Fetched(other)) => {
                Err(ApiError::unavailable(format!("node {from} sent no records: {other:?}")))
            }
            Ok(_) => Err(ApiError::unavailable(format!("node {from} answered a fetch oddly"))),
            Err(e) => Err(ApiError::unavailable(format!("fetching from node {from}: {e}"))),
        }
    }
}
