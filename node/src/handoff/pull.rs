//! The new owner's side of a handoff: the puller that copies a tenant's files with bounded
//! parallelism and a bandwidth limit, swaps them in and commits `HandoffDone`, and the copier it
//! shares with the snapshots of `crate::catchup`.

use std::sync::Arc;
use std::time::Duration;

use proto::cluster::{HandoffFile, NodeRequest, NodeResponse};
use proto::ApiError;
use raft_registry::{Command, Handoff};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{call, check_manifest, commit, on_store, parse_addr, HandoffError, Handoffs, Progress};
use crate::service::{Service, PEER_CALL_TIMEOUT};

/// Pause before pulling a failed handoff again (the old owner may be restarting).
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// New owner: copies one tenant from its old owner and commits the handoff.
async fn pull(svc: &Service, h: &Handoff) -> Result<(), HandoffError> {
    // A copy received in this handoff's epoch is already here (an earlier attempt swapped it in,
    // then its commit failed or this node restarted): it may hold writes newer than the old
    // owner's copy, so it is kept and only the commit is repeated.
    let t = h.tenant.clone();
    if on_store(svc, move |s| s.received_epoch(&t)).await? >= h.epoch {
        return commit(svc, Command::HandoffDone { tenant: h.tenant.clone(), epoch: h.epoch })
            .await;
    }
    let _one_copy = svc.handoffs.staging(&h.tenant).await;
    let state = svc.registry.state();
    let from = state.node(h.from).ok_or(HandoffError::UnknownNode(h.from))?.addr.clone();
    let files = match call(
        svc,
        &from,
        NodeRequest::HandoffManifest { tenant: h.tenant.clone(), epoch: h.epoch },
    )
    .await?
    {
        NodeResponse::HandoffManifest(r) => r.map_err(HandoffError::Refused)?,
        other => return Err(HandoffError::Unexpected(Box::new(other))),
    };
    let bytes_total = check_manifest(&files)?;
    if let Some(p) = svc.handoffs.progress().get_mut(&h.tenant) {
        p.files = files.len() as u64;
        p.bytes_total = bytes_total;
    }
    let t = h.tenant.clone();
    on_store(svc, move |s| s.stage_begin(&t)).await?;
    let addr = parse_addr(&from)?;
    for file in &files {
        let read = |offset, len| NodeRequest::HandoffRead {
            tenant: h.tenant.clone(),
            path: file.path.clone(),
            offset,
            len,
        };
        fetch(&svc.copier(), addr, &h.tenant, file, read).await?;
        let (t, f) = (h.tenant.clone(), file.clone());
        on_store(svc, move |s| s.stage_file_finish(&t, &f)).await?;
    }
    swap_in(svc, h).await?;
    commit(svc, Command::HandoffDone { tenant: h.tenant.clone(), epoch: h.epoch }).await
}

/// New owner: swaps the staged copy in, if and only if this node's registry still shows `h`
/// pending, with every request for the tenant kept out meanwhile. Once this node has applied
/// `HandoffDone` (committed by an earlier attempt whose answer was lost), it serves the tenant
/// and may hold acknowledged writes newer than the old owner's copy: swapping that copy in would
/// lose them. Requests check the pending handoff under the same gate, so none can slip between
/// this check and the swap.
async fn swap_in(svc: &Service, h: &Handoff) -> Result<(), HandoffError> {
    let (t, epoch) = (h.tenant.clone(), h.epoch);
    on_store(svc, move |s| s.stage_received_epoch(&t, epoch)).await?;
    let _no_requests = svc.handoffs.exclusive(&h.tenant).await;
    let t = h.tenant.clone();
    if svc.registry.state().handoff(&h.tenant) != Some(h) {
        on_store(svc, move |s| s.stage_abort(&t)).await?;
        return Err(HandoffError::NoLongerPending { tenant: h.tenant.clone(), epoch: h.epoch });
    }
    on_store(svc, move |s| s.stage_commit(&t)).await?;
    // The roll-up arrived with the data; one kept from an earlier stay here is stale.
    svc.limits.forget(&h.tenant);
    Ok(())
}

/// What copying a tenant's files from another node takes: the peers to ask, the store that
/// stages what arrives, and the handoff state whose bandwidth limit paces it and whose progress
/// map shows it (a handoff's pull and a replica's snapshot share both).
pub(crate) struct Copier<'a> {
    pub peers: &'a dyn transport::Caller,
    pub store: &'a Arc<crate::store::Store>,
    pub handoffs: &'a Handoffs,
    pub clock: &'a dyn crate::store::Clock,
}

impl Service {
    pub(crate) fn copier(&self) -> Copier<'_> {
        Copier {
            peers: self.peers.as_ref(),
            store: &self.store,
            handoffs: &self.handoffs,
            clock: self.clock.as_ref(),
        }
    }
}

/// Copies one listed file into the staging directory, asking for all of what is still missing
/// at once: an old owner that streams sends it on one stream, one that answers whole sends a
/// chunk and is asked again for the rest. One frame or chunk is in memory at a time, whatever
/// length the old owner claims, and each is paced by the bandwidth limit before it is staged.
/// `read` makes the request for `len` bytes from `offset`.
pub(crate) async fn fetch(
    c: &Copier<'_>,
    addr: std::net::SocketAddr,
    tenant: &str,
    file: &HandoffFile,
    read: impl Fn(u64, u64) -> NodeRequest,
) -> Result<(), HandoffError> {
    let mut offset = 0u64;
    while offset < file.len {
        let want = file.len - offset;
        let bytes = proto::wire::encode(&read(offset, want))?;
        let (head, mut body) = c.peers.call_answer(addr, bytes.into(), PEER_CALL_TIMEOUT).await?;
        match proto::wire::decode(&head)? {
            NodeResponse::HandoffChunk(r) => {
                let part = r.map_err(HandoffError::Refused)?.0;
                offset += stage_part(c, tenant, file, offset, want, part).await?;
            }
            NodeResponse::HandoffStreamed { len } if len > 0 && len <= want => {
                let end = offset + len;
                while offset < end {
                    let part = body
                        .next(PEER_CALL_TIMEOUT)
                        .await?
                        .ok_or_else(|| HandoffError::EndedEarly(file.path.clone()))?;
                    offset +=
                        stage_part(c, tenant, file, offset, end - offset, part.into()).await?;
                }
                if body.next(PEER_CALL_TIMEOUT).await?.is_some() {
                    return Err(HandoffError::LongerThanAnnounced(file.path.clone()));
                }
            }
            other => return Err(HandoffError::Unexpected(Box::new(other))),
        }
    }
    Ok(())
}

/// Stages one received piece of `file` at `offset`, of at most `want` bytes, once the bandwidth
/// limit allows; returns its length.
async fn stage_part(
    c: &Copier<'_>,
    tenant: &str,
    file: &HandoffFile,
    offset: u64,
    want: u64,
    part: Vec<u8>,
) -> Result<u64, HandoffError> {
    if part.is_empty() {
        return Err(HandoffError::EndedEarly(file.path.clone()));
    }
    let got = part.len() as u64;
    if got > want {
        return Err(HandoffError::PieceTooLong(file.path.clone()));
    }
    c.handoffs.pace(got, c.clock.now_ms()).await;
    let (t, f, store) = (tenant.to_string(), file.clone(), c.store.clone());
    crate::blocking::spawn(move || store.stage_file_part(&t, &f, offset, &part)).await??;
    if let Some(p) = c.handoffs.progress().get_mut(tenant) {
        p.bytes_done += got;
    }
    Ok(got)
}

/// New owner: pulls every handoff addressed to this node, a bounded number at a time. Each pull
/// is a task of its own; at shutdown they see the token, stop between files, and are joined here
/// before this returns, so the node's ordered stop (registry, then store) never races a pull.
pub async fn run_puller(svc: Arc<Service>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(svc.handoffs.config.parallelism.max(1)));
    let mut rx = svc.registry.subscribe();
    let mut pulls = tokio::task::JoinSet::new();
    // With R > 1: the changes of replica sets this node enters, each followed by one task.
    let mut entering = std::collections::BTreeSet::new();
    let mut enters = tokio::task::JoinSet::new();
    loop {
        let state = rx.borrow_and_update().1.clone();
        for h in state.handoffs().filter(|h| h.to == svc.id) {
            if state.replicas() > 1 {
                if entering.insert(h.tenant.clone()) {
                    let (h, permits) = (h.clone(), permits.clone());
                    let task = enter_until_done(svc.clone(), h, permits, shutdown.clone());
                    enters.spawn(task);
                }
                continue;
            }
            let fresh = {
                let mut incoming = svc.handoffs.progress();
                let new = !incoming.contains_key(&h.tenant);
                if new {
                    incoming.insert(
                        h.tenant.clone(),
                        Progress { from: h.from, epoch: h.epoch, ..Default::default() },
                    );
                }
                new
            };
            if fresh {
                pulls.spawn(pull_until_done(
                    svc.clone(),
                    h.clone(),
                    permits.clone(),
                    shutdown.clone(),
                ));
            }
        }
        // Reap finished pulls so the set holds only those still running.
        while pulls.try_join_next().is_some() {}
        while let Some(done) = enters.try_join_next() {
            if let Ok(tenant) = done {
                entering.remove(&tenant);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = rx.changed() => if changed.is_err() { break },
            _ = svc.handoffs.finished.notified() => {}
        }
    }
    while pulls.join_next().await.is_some() {}
    while enters.join_next().await.is_some() {}
}

/// Returns once this node's registry no longer shows `h` pending (its `HandoffDone` applied),
/// or at shutdown.
async fn until_applied(svc: &Service, h: &Handoff, shutdown: &CancellationToken) {
    let mut rx = svc.registry.subscribe();
    while rx.borrow_and_update().1.handoff(&h.tenant) == Some(h) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

/// How often a node entering a tenant's replica set asks the tenant's primary again.
const ENTER_LOOK: Duration = Duration::from_secs(1);

/// With R > 1, this node enters the tenant's replica set (a join or a drain): it asks the
/// tenant's primary, every [`ENTER_LOOK`], to bring its copy up (the primary ships it the
/// records, or has it take a snapshot, as for any backup) until the primary answers that the
/// change may be committed; then commits `HandoffDone`, which takes the leaving node out of the
/// set. As many tenants ask at once as handoffs pull (`permits`). Returns the tenant once the
/// change is gone from this node's registry, or at shutdown.
async fn enter_until_done(
    svc: Arc<Service>,
    h: Handoff,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
) -> String {
    let started = svc.mono_ms();
    loop {
        let Ok(permit) = permits.acquire().await else { break };
        let state = svc.registry.state();
        if shutdown.is_cancelled() || state.handoff(&h.tenant).is_none_or(|p| *p != h) {
            break;
        }
        let asked = match state.primary_of(&h.tenant) {
            Some(primary) if primary != svc.id => {
                let request =
                    NodeRequest::Enter { from: svc.id, tenant: h.tenant.clone(), epoch: h.epoch };
                match state.node(primary).map(|n| n.addr.clone()) {
                    Some(addr) => call(&svc, &addr, request).await.map(|r| (primary, r)),
                    None => Err(HandoffError::UnknownNode(primary)),
                }
            }
            _ => Err(HandoffError::Refused(ApiError::unavailable("the tenant has no primary"))),
        };
        match asked {
            Ok((_, NodeResponse::Entered(Ok(true)))) => {
                let done = Command::HandoffDone { tenant: h.tenant.clone(), epoch: h.epoch };
                match commit(&svc, done).await {
                    Ok(()) => {
                        tracing::info!(
                            node = svc.id,
                            tenant = h.tenant,
                            leaving = h.from,
                            epoch = h.epoch,
                            ms = svc.mono_ms().saturating_sub(started),
                            "entered the tenant's replica set"
                        );
                        metrics::counter!("sq_handoffs_total").increment(1);
                        drop(permit);
                        // Until this node applies it: asking again before would be refused.
                        until_applied(&svc, &h, &shutdown).await;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(node = svc.id, tenant = h.tenant, error = %e, "committing a replica set change failed; asked again")
                    }
                }
            }
            Ok((_, NodeResponse::Entered(Ok(false)))) => {}
            Ok((primary, other)) => {
                tracing::debug!(node = svc.id, tenant = h.tenant, primary, answer = ?other, "the tenant's primary is not bringing this copy up yet")
            }
            Err(e) => {
                tracing::debug!(node = svc.id, tenant = h.tenant, error = %e, "asking the tenant's primary to bring this copy up failed")
            }
        }
        drop(permit);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(ENTER_LOOK) => {}
        }
    }
    h.tenant
}

async fn pull_until_done(
    svc: Arc<Service>,
    h: Handoff,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    loop {
        let Ok(_permit) = permits.acquire().await else { return };
        if shutdown.is_cancelled()
            || svc.registry.state().handoff(&h.tenant).is_none_or(|p| *p != h)
        {
            break;
        }
        let started = svc.mono_ms();
        match pull(&svc, &h).await {
            Ok(()) => {
                let ms = svc.mono_ms().saturating_sub(started);
                tracing::info!(
                    node = svc.id,
                    tenant = h.tenant,
                    from = h.from,
                    epoch = h.epoch,
                    ms,
                    "handoff done"
                );
                metrics::counter!("sq_handoffs_total").increment(1);
                // Stay listed until this node applies `HandoffDone`: the puller would otherwise
                // see the handoff still pending and pull the tenant again. The permit goes to
                // the next pull meanwhile.
                drop(_permit);
                until_applied(&svc, &h, &shutdown).await;
                break;
            }
            Err(e) => {
                tracing::warn!(node = svc.id, tenant = h.tenant, from = h.from, epoch = h.epoch, error = %e, "handoff failed; will retry");
                if let Some(p) = svc.handoffs.progress().get_mut(&h.tenant) {
                    p.attempts += 1;
                    p.bytes_done = 0;
                    p.last_error = Some(e.to_string());
                }
            }
        }
        drop(_permit);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RETRY_PAUSE) => {}
        }
    }
    svc.handoffs.progress().remove(&h.tenant);
    svc.handoffs.finished.notify_one();
}
