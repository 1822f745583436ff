//! Catch-up by snapshot (docs/REPLICATION.md, "Catch-up"): a replica whose log no longer meets
//! the one it is to follow takes that node's copy whole.
//!
//! Two cases need it. A primary finds a backup it cannot send records to (the records it lacks
//! are folded into the primary's phext files, or the records it must cut are folded into its
//! own, or it holds nothing after a wipe): the primary asks it to catch up (`CatchUp`), and the
//! backup takes a snapshot from the primary in the background ([`run`]) while the primary asks
//! where its log ends every [`CATCH_UP_LOOK`]. A new primary whose log differs from the most
//! advanced promise below what that member's log still holds takes a snapshot from it before it
//! serves (`Replication::prepare`).
//!
//! Taking a snapshot ([`take`]): the giver checkpoints and links its files aside
//! (`Store::snapshot_take`, [`give`]); the taker copies them as a handoff copies a tenant (the
//! listing checked first, files paced by the handoff bandwidth limit and checked by length and
//! checksum), then installs them with the giver's ballot history, refused if it promised a
//! higher ballot meanwhile (`Store::snapshot_install`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::cluster::{Chunk, NodeRequest, NodeResponse, SnapshotListing};
use proto::ApiError;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::handoff::{Copier, HandoffError, Progress};
use crate::service::{Service, PEER_CALL_TIMEOUT};

/// How long a snapshot stays on its giver unread before it is deleted.
pub const SNAPSHOT_IDLE_MS: u64 = 60_000;

/// How long a primary waits, after asking a backup to catch up, before it asks again where the
/// backup's log ends.
pub const CATCH_UP_LOOK: Duration = Duration::from_secs(1);

/// The catch-ups this node was asked for as a backup: tenant → (primary, its ballot), each run
/// once at a time.
#[derive(Default)]
pub struct CatchUps {
    asked: Mutex<BTreeMap<String, Asked>>,
    wake: Notify,
    /// This process's rebuild after a lost tenant store, once one started.
    rebuild: Mutex<Option<Rebuild>>,
}

/// A rebuild's progress ([`rebuild`]), on the node's monotonic clock.
#[derive(Debug, Clone, Copy)]
struct Rebuild {
    started_ms: u64,
    /// [`crate::handoff::Handoffs::snapshot_bytes`] when it started.
    bytes_at_start: u64,
    copies_total: u64,
    copies_left: u64,
    /// When no copy was left, and the snapshot bytes count then.
    done: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Asked {
    from: u64,
    ballot: u64,
    running: bool,
}

impl CatchUps {
    fn asked(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Asked>> {
        self.asked.lock().expect("catch-up lock poisoned: a thread panicked while holding it")
    }

    fn rebuild(&self) -> std::sync::MutexGuard<'_, Option<Rebuild>> {
        self.rebuild.lock().expect("rebuild lock poisoned: a thread panicked while holding it")
    }

    /// How far this node's rebuild is, if one ran since it started; `bytes_now` is its
    /// [`crate::handoff::Handoffs::snapshot_bytes`].
    pub fn rebuild_progress(
        &self,
        node: u64,
        now_ms: u64,
        bytes_now: u64,
    ) -> Option<proto::admin::RebuildProgress> {
        let r = (*self.rebuild())?;
        Some(proto::admin::RebuildProgress {
            node,
            copies_total: r.copies_total,
            copies_left: r.copies_left,
            bytes_taken: r.done.map_or(bytes_now, |d| d.1).saturating_sub(r.bytes_at_start),
            elapsed_ms: r.done.map_or(now_ms, |d| d.0).saturating_sub(r.started_ms),
            done: r.done.is_some(),
        })
    }

    /// A rebuild pass found this node holding `held` copies (every one lost with its store),
    /// `left` of them not counting yet. Some may count before the first pass: a primary's
    /// prepare round rebuilds its copy too, as soon as a request comes.
    fn rebuild_pass(&self, now_ms: u64, bytes_now: u64, held: u64, left: u64) {
        let mut rebuild = self.rebuild();
        let r = rebuild.get_or_insert(Rebuild {
            started_ms: now_ms,
            bytes_at_start: bytes_now,
            copies_total: held,
            copies_left: left,
            done: None,
        });
        r.copies_total = r.copies_total.max(held);
        r.copies_left = left;
        if left == 0 {
            r.done.get_or_insert((now_ms, bytes_now));
        }
    }

    /// One more copy of the running rebuild counts (its pass still lists it as left).
    fn rebuilt_one(&self) {
        if let Some(r) = self.rebuild().as_mut() {
            r.copies_left = r.copies_left.saturating_sub(1);
        }
    }

    /// Records a primary's request; one already asked for the tenant takes the newer primary.
    fn ask(&self, tenant: String, from: u64, ballot: u64) {
        let mut asked = self.asked();
        let entry = asked.entry(tenant).or_insert(Asked { from, ballot, running: false });
        if ballot > entry.ballot {
            (entry.from, entry.ballot) = (from, ballot);
        }
        drop(asked);
        self.wake.notify_one();
    }

    /// The requests not yet running, marked running.
    fn start(&self) -> Vec<(String, Asked)> {
        let mut asked = self.asked();
        asked
            .iter_mut()
            .filter(|(_, a)| !a.running)
            .map(|(t, a)| {
                a.running = true;
                (t.clone(), *a)
            })
            .collect()
    }

    fn finish(&self, tenant: &str) {
        self.asked().remove(tenant);
    }
}

/// Backup: a primary asks it to take the tenant's snapshot from it. Answered at once, once the
/// sender is the tenant's primary in this node's registry and this node one of its set.
pub async fn asked(svc: &Service, from: u64, tenant: String, epoch: u64) -> NodeResponse {
    if let Some(why) = crate::replicate::refusal(svc, from, &tenant, epoch).await {
        return NodeResponse::CatchingUp(Err(why));
    }
    svc.catch_ups.ask(tenant, from, epoch);
    NodeResponse::CatchingUp(Ok(()))
}

/// Backup: runs the catch-ups primaries asked for, as many at a time as handoffs pull, until
/// shutdown (then joins them, so the node's ordered stop never races one).
pub async fn run(svc: Arc<Service>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(svc.handoffs.config.parallelism.max(1)));
    let mut running = tokio::task::JoinSet::new();
    loop {
        for (tenant, a) in svc.catch_ups.start() {
            let (svc, permits) = (svc.clone(), permits.clone());
            running.spawn(async move {
                if let Ok(_permit) = permits.acquire().await {
                    let started = svc.mono_ms();
                    match take(&svc.copier(), &svc.registry, svc.id, &tenant, a.from, a.ballot)
                        .await
                    {
                        Ok(lsn) => tracing::info!(
                            node = svc.id,
                            tenant,
                            from = a.from,
                            lsn,
                            ms = svc.mono_ms().saturating_sub(started),
                            "caught up from a snapshot"
                        ),
                        Err(e) => tracing::warn!(node = svc.id, tenant, from = a.from, error = %e, "catching up from a snapshot failed; the primary will ask again"),
                    }
                }
                svc.catch_ups.finish(&tenant);
            });
        }
        while running.try_join_next().is_some() {}
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = svc.catch_ups.wake.notified() => {}
        }
    }
    running.abort_all();
    while running.join_next().await.is_some() {}
}

/// Has the registry move the placement epoch past the one this node's loss was found at
/// (`Store::lost_at_epoch`), retrying until it has, or until shutdown (then false). Until then
/// the node leads no tenant (`Replication::prepare`), its tenants answer 503, and their
/// copies here wait: the epochs it may have led under before the loss are behind it.
async fn move_past_lost_epoch(svc: &Service, shutdown: &CancellationToken) -> bool {
    let Some(lost_at) = svc.store.lost_at_epoch() else { return true };
    if svc.store.lost_epoch_unknown() {
        // Recorded at every start before this runs (`run`); never asked for.
        tracing::error!(
            node = svc.id,
            "this node's rebuilding marker holds no epoch; it leads no tenant until it restarts"
        );
        return false;
    }
    while svc.registry.state().placement_epoch() <= lost_at {
        let command = raft_registry::Command::StoreLost { id: svc.id, epoch: lost_at };
        // A retry is harmless: the registry moves the epoch only if it is still at or below.
        let pause = match crate::admin::commit(svc, command).await {
            Ok(()) => {
                tracing::warn!(
                    node = svc.id,
                    lost_at,
                    "the placement epoch moved past the one this node lost its copies at"
                );
                // Committed: this node's registry applies it shortly.
                Duration::from_millis(100)
            }
            Err(e) => {
                tracing::info!(node = svc.id, lost_at, error = %e, "the placement epoch could not be moved past the one this node lost its copies at; trying again");
                REBUILD_PASS_PAUSE
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    true
}

/// How long a rebuild waits between two passes over the copies it still has to rebuild.
const REBUILD_PASS_PAUSE: Duration = Duration::from_secs(1);

/// A node that lost its tenant store (`Store::rebuilding`) rebuilds every copy it holds, without
/// waiting for each tenant's next write: for each tenant whose set holds it and whose copy does
/// not count yet, it takes a snapshot from the tenant's primary (which prepares first, so the
/// copy counts once installed), or, as the primary, runs its prepare round. As many at a time as
/// handoffs pull, paced by the same bandwidth limit; passes repeat until none is left (a primary
/// down or unprepared is tried again). The gauge `sq_rebuilding_copies` counts what is left.
pub async fn rebuild(svc: Arc<Service>, shutdown: CancellationToken) {
    if !svc.store.rebuilding() {
        return;
    }
    if !move_past_lost_epoch(&svc, &shutdown).await {
        return;
    }
    let started = svc.mono_ms();
    let permits = Arc::new(Semaphore::new(svc.handoffs.config.parallelism.max(1)));
    loop {
        let state = svc.registry.state();
        if state.replicas() <= 1 {
            // One copy of each tenant: there is nothing to rebuild from.
            return;
        }
        let mine: Vec<String> = state
            .tenants()
            .filter(|t| state.replica_set(&t.id).contains(&svc.id))
            .map(|t| t.id.to_string())
            .collect();
        let held = mine.len() as u64;
        let store = svc.store.clone();
        let todo: Vec<String> = crate::blocking::spawn(move || {
            mine.into_iter().filter(|t| !store.counts(t).unwrap_or(false)).collect()
        })
        .await
        .unwrap_or_default();
        crate::metrics::rebuilding(todo.len() as u64);
        let (now, bytes) = (svc.mono_ms(), svc.handoffs.snapshot_bytes());
        svc.catch_ups.rebuild_pass(now, bytes, held, todo.len() as u64);
        if todo.is_empty() {
            tracing::info!(
                node = svc.id,
                ms = svc.mono_ms().saturating_sub(started),
                "every copy this node holds is rebuilt"
            );
            return;
        }
        let mut running = tokio::task::JoinSet::new();
        for tenant in todo {
            let (svc, permits) = (svc.clone(), permits.clone());
            running.spawn(async move {
                let Ok(_permit) = permits.acquire().await else { return };
                if let Err(e) = rebuild_one(&svc, &tenant).await {
                    tracing::debug!(node = svc.id, tenant, error = %e, "rebuilding a copy failed; tried again next pass");
                    return;
                }
                // Health counts the copy as rebuilt once it counts, not at the next pass.
                let (store, t) = (svc.store.clone(), tenant.clone());
                if crate::blocking::spawn(move || store.counts(&t)).await.is_ok_and(|c| c.unwrap_or(false)) {
                    svc.catch_ups.rebuilt_one();
                }
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                running.abort_all();
                while running.join_next().await.is_some() {}
                return;
            }
            _ = async { while running.join_next().await.is_some() {} } => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REBUILD_PASS_PAUSE) => {}
        }
    }
}

/// Rebuilds this node's copy of one tenant: as its primary by a prepare round, else from the
/// primary's snapshot.
async fn rebuild_one(svc: &Service, tenant: &str) -> Result<(), HandoffError> {
    let state = svc.registry.state();
    // Purged since the pass listed it, or no longer held here: nothing to rebuild.
    if state.tenant(tenant).is_none() || !state.replica_set(tenant).contains(&svc.id) {
        return Ok(());
    }
    match state.primary_of(tenant) {
        Some(primary) if primary == svc.id => {
            svc.replication.prepare_if_primary(tenant).await.map_err(HandoffError::Refused)?;
        }
        Some(primary) => {
            let epoch = state.placement_epoch();
            take(&svc.copier(), &svc.registry, svc.id, tenant, primary, epoch).await?;
        }
        None => {}
    }
    Ok(())
}

/// Takes node `from`'s copy of `tenant` as this node's, promising `ballot`: its snapshot's files,
/// then its ballot history up to the snapshot's last record. Returns that record's lsn. The
/// transfer shows in this node's health as an incoming copy.
pub(crate) async fn take(
    c: &Copier<'_>,
    registry: &raft_registry::Registry,
    me: u64,
    tenant: &str,
    from: u64,
    ballot: u64,
) -> Result<u64, HandoffError> {
    let _one_copy = c.handoffs.staging(tenant).await;
    let state = registry.state();
    let addr = state.node(from).ok_or(HandoffError::UnknownNode(from))?.addr.clone();
    let addr: std::net::SocketAddr =
        addr.parse().map_err(|source| HandoffError::Address { addr: addr.clone(), source })?;
    let request = NodeRequest::SnapshotTake { from: me, tenant: tenant.to_string() };
    let bytes = proto::wire::encode(&request)?;
    let answer = c.peers.call(addr, bytes.into(), PEER_CALL_TIMEOUT).await?;
    let listing = match proto::wire::decode(&answer)? {
        NodeResponse::Snapshot(Ok(listing)) => listing,
        NodeResponse::Snapshot(Err(why)) => {
            return Err(HandoffError::Refused(ApiError::unavailable(why)))
        }
        other => return Err(HandoffError::Unexpected(Box::new(other))),
    };
    let theirs = crate::store::Ballots::from_wire(&listing.ballots).map_err(|why| {
        HandoffError::Refused(ApiError::Internal(format!("node {from} sent bad ballots: {why}")))
    })?;
    let bytes_total = crate::handoff::check_manifest(&listing.files)?;
    c.handoffs.progress().insert(
        tenant.to_string(),
        Progress {
            from,
            epoch: ballot,
            files: listing.files.len() as u64,
            bytes_total,
            ..Default::default()
        },
    );
    let copied = copy(c, addr, tenant, &listing).await;
    c.handoffs.progress().remove(tenant);
    // The giver may drop its snapshot now, whatever happened here.
    if let Ok(bytes) =
        proto::wire::encode(&NodeRequest::SnapshotDone { id: listing.id, tenant: tenant.into() })
    {
        let _ = c.peers.call(addr, bytes.into(), PEER_CALL_TIMEOUT).await;
    }
    copied?;
    let (store, t, lsn) = (c.store.clone(), tenant.to_string(), listing.lsn);
    // From the primary, prepared: promise its ballot, and the copy holds every acknowledged
    // write (a copy being rebuilt after a lost disk counts from now on).
    let prepared = listing.prepared_ballot;
    let ballot = prepared.map_or(ballot, |b| b.max(ballot));
    // Only a giver that prepared at the epoch this node's registry is at makes a rebuilt copy
    // count: one whose registry lags may lack writes a newer primary acknowledged.
    let counts = prepared.is_some_and(|b| b == registry.state().placement_epoch());
    let installed = crate::blocking::spawn(move || {
        let installed = store.snapshot_install(&t, lsn, &theirs, ballot)?;
        if installed.is_ok() && counts {
            store.mark_caught_up(&t)?;
        }
        Ok::<_, crate::store::StoreError>(installed)
    })
    .await??;
    installed.map_err(|refused| HandoffError::Refused(ApiError::Conflict(refused.to_string())))?;
    c.handoffs.snapshot_taken(bytes_total);
    Ok(listing.lsn)
}

/// Stages every file of `listing`, checked, dropping what was staged if one fails.
async fn copy(
    c: &Copier<'_>,
    addr: std::net::SocketAddr,
    tenant: &str,
    listing: &SnapshotListing,
) -> Result<(), HandoffError> {
    let (store, t) = (c.store.clone(), tenant.to_string());
    crate::blocking::spawn(move || store.stage_begin(&t)).await??;
    for file in &listing.files {
        let read = |offset, len| NodeRequest::SnapshotRead {
            id: listing.id,
            tenant: tenant.to_string(),
            path: file.path.clone(),
            offset,
            len,
        };
        let staged = match crate::handoff::fetch(c, addr, tenant, file, read).await {
            Ok(()) => {
                let (store, t, f) = (c.store.clone(), tenant.to_string(), file.clone());
                crate::blocking::spawn(move || store.stage_file_finish(&t, &f))
                    .await
                    .map_err(HandoffError::from)
                    .and_then(|r| r.map_err(HandoffError::from))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = staged {
            let (store, t) = (c.store.clone(), tenant.to_string());
            let _ = crate::blocking::spawn(move || store.stage_abort(&t)).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Giver: a snapshot of this node's copy of `tenant` for replica `from`, a member of the
/// tenant's set in this node's registry (as this node is).
pub async fn give(svc: &Service, from: u64, tenant: String) -> NodeResponse {
    let set = svc.registry.state().replica_set(&tenant);
    if !set.contains(&from) || !set.contains(&svc.id) {
        return NodeResponse::Snapshot(Err(format!(
            "nodes {from} and {} are not both in the replica set {set:?} of {tenant:?}",
            svc.id
        )));
    }
    // The primary gives what it holds once it has prepared: every acknowledged write, so a copy
    // rebuilt from it counts at once.
    let prepared_ballot = match svc.replication.prepare_if_primary(&tenant).await {
        Ok(prepared) => prepared,
        Err(e) => {
            return NodeResponse::Snapshot(Err(format!("the primary could not prepare: {e}")))
        }
    };
    let store = svc.store.clone();
    let taken = crate::blocking::spawn(move || store.snapshot_take(&tenant)).await;
    NodeResponse::Snapshot(match taken {
        Ok(Ok(image)) => Ok(SnapshotListing {
            id: image.id,
            lsn: image.lsn,
            ballots: image.ballots.to_wire(),
            files: image.files,
            prepared_ballot,
        }),
        Ok(Err(e)) => Err(format!("store: {e}")),
        Err(e) => Err(format!("store task failed: {e}")),
    })
}

/// Giver: up to `len` bytes of one file of snapshot `id` from `offset`, whole up to a configured
/// chunk, else streamed as a handoff read is (`handoff::read_answer`).
pub async fn read_answer(
    svc: &Service,
    id: u64,
    tenant: String,
    path: String,
    offset: u64,
    len: u64,
) -> (NodeResponse, Option<transport::AnswerBody>) {
    let store = svc.store.clone();
    if len <= svc.handoffs.config.chunk_bytes.max(1) {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let read =
            crate::blocking::spawn(move || store.snapshot_read(id, &tenant, &path, offset, len))
                .await;
        let chunk = match read {
            Ok(r) => r.map(Chunk).map_err(ApiError::from),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        };
        return (NodeResponse::HandoffChunk(chunk), None);
    }
    let opened = crate::blocking::spawn(move || store.snapshot_open(id, &tenant, &path)).await;
    match opened {
        Ok(Ok(reader)) => {
            let len = len.min(reader.file_len().saturating_sub(offset));
            let body = crate::service::file_body(reader, offset, len);
            (NodeResponse::HandoffStreamed { len }, Some(body))
        }
        Ok(Err(e)) => (NodeResponse::HandoffChunk(Err(ApiError::from(e))), None),
        Err(e) => (NodeResponse::HandoffChunk(Err(ApiError::Internal(e.to_string()))), None),
    }
}

/// Giver: the taker is done with snapshot `id`.
pub async fn done(svc: &Service, id: u64, tenant: String) -> NodeResponse {
    let store = svc.store.clone();
    match crate::blocking::spawn(move || store.snapshot_done(id, &tenant)).await {
        Ok(Ok(())) => NodeResponse::CatchingUp(Ok(())),
        Ok(Err(e)) => NodeResponse::CatchingUp(Err(format!("store: {e}"))),
        Err(e) => NodeResponse::CatchingUp(Err(format!("store task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a rebuild's progress starts at its first pass, its total every copy the node holds
    // (one a prepare round rebuilt before that pass included), counts copies down as each is
    // rebuilt, takes the next pass's count as it is, and once no copy is left is done, with its
    // time and bytes fixed from then on (a later catch-up's snapshot is not the rebuild's).
    #[test]
    fn rebuild_progress_counts_copies_down_then_stays_done() {
        let c = CatchUps::default();
        assert_eq!(c.rebuild_progress(3, 0, 0), None, "no rebuild ran");
        // Six held, one already rebuilt by its prepare round before the first pass.
        c.rebuild_pass(1_000, 100, 6, 5);
        c.rebuilt_one();
        c.rebuilt_one();
        let p = c.rebuild_progress(3, 1_500, 700).unwrap();
        assert_eq!((p.node, p.copies_total, p.copies_left), (3, 6, 3));
        assert_eq!((p.bytes_taken, p.elapsed_ms, p.done), (600, 500, false));
        // A pass finds one copy it could not rebuild yet (its primary was down).
        c.rebuild_pass(2_000, 900, 6, 1);
        assert_eq!(c.rebuild_progress(3, 2_000, 900).unwrap().copies_left, 1);
        c.rebuild_pass(3_000, 1_000, 6, 0);
        c.rebuilt_one();
        let done = c.rebuild_progress(3, 9_000, 5_000).unwrap();
        assert_eq!((done.copies_total, done.copies_left, done.done), (6, 0, true));
        assert_eq!(done.elapsed_ms, 2_000, "the time it took, not the time since");
        assert_eq!(done.bytes_taken, 900, "bytes taken until it was done");
    }
}
