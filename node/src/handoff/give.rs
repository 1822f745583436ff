//! The old owner's side of a handoff: the tenant's file list, once every request it was running
//! for the tenant has finished, and the files' bytes.

use std::time::Duration;

use proto::cluster::{HandoffFile, NodeResponse};
use proto::ApiError;

use crate::service::Service;

/// How long the old owner waits to apply the handoff's epoch before telling the new owner to
/// come back.
const EPOCH_WAIT: Duration = Duration::from_secs(5);

/// Old owner: the tenant's file list, once this node has applied `epoch` and no longer runs any
/// request for the tenant.
pub async fn manifest(
    svc: &Service,
    tenant: &str,
    epoch: u64,
) -> Result<Vec<HandoffFile>, ApiError> {
    let mut rx = svc.registry.subscribe();
    let reached = tokio::time::timeout(EPOCH_WAIT, async {
        while rx.borrow_and_update().1.placement_epoch() < epoch {
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let state = svc.registry.state();
    if reached.is_err() || state.placement_epoch() < epoch {
        return Err(ApiError::unavailable(format!("epoch {epoch} not applied yet")));
    }
    if state.owner_of(tenant) == Some(svc.id) {
        return Err(ApiError::Conflict(format!(
            "node {} owns {tenant}; nothing to hand off",
            svc.id
        )));
    }
    // Once the handoff is done this node may delete its copy; an empty list then would hand the
    // new owner an empty tenant. Only a pending handoff of this epoch gets an answer.
    if state.handoff(tenant).is_none_or(|h| h.epoch != epoch || h.from != svc.id) {
        return Err(ApiError::Conflict(format!(
            "no pending handoff of {tenant} from node {} in epoch {epoch}",
            svc.id
        )));
    }
    svc.handoffs.drain(tenant).await;
    svc.limits.persist();
    // The roll-up leaves with the data; if the tenant returns today, its file is the truth.
    svc.limits.forget(tenant);
    let (store, t) = (svc.store.clone(), tenant.to_string());
    crate::blocking::spawn(move || store.handoff_manifest(&t))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

/// Old owner: a chunk of one file of a tenant this node no longer owns, at most one configured
/// chunk ([`HandoffConfig::chunk_bytes`]) whatever the asking node names. For peers that take
/// whole answers only; others get [`read_answer`].
pub async fn read(
    svc: &Service,
    tenant: &str,
    path: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, ApiError> {
    if svc.registry.state().owner_of(tenant) == Some(svc.id) {
        return Err(ApiError::Conflict(format!("node {} owns {tenant}", svc.id)));
    }
    let len = len.min(svc.handoffs.config.chunk_bytes.max(1));
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let (store, t, p) = (svc.store.clone(), tenant.to_string(), path.to_string());
    crate::blocking::spawn(move || store.handoff_read(&t, &p, offset, len))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

/// Old owner: up to `len` bytes of one file from `offset` on one stream. Up to a configured
/// chunk they travel whole ([`NodeResponse::HandoffChunk`]); past it, as a head naming the
/// length that follows ([`NodeResponse::HandoffStreamed`], at most to the file's end) and body
/// frames read from the file in ranges, each only once the transport took the one before, so a
/// file of any size costs a frame or two of memory on both sides.
pub async fn read_answer(
    svc: &Service,
    tenant: &str,
    path: &str,
    offset: u64,
    len: u64,
) -> (NodeResponse, Option<transport::AnswerBody>) {
    if len <= svc.handoffs.config.chunk_bytes.max(1) {
        let chunk = read(svc, tenant, path, offset, len).await.map(proto::cluster::Chunk);
        return (NodeResponse::HandoffChunk(chunk), None);
    }
    if svc.registry.state().owner_of(tenant) == Some(svc.id) {
        let owned = ApiError::Conflict(format!("node {} owns {tenant}", svc.id));
        return (NodeResponse::HandoffChunk(Err(owned)), None);
    }
    let (store, t, p) = (svc.store.clone(), tenant.to_string(), path.to_string());
    let opened = crate::blocking::spawn(move || store.handoff_open(&t, &p))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
        .and_then(|r| r.map_err(ApiError::from));
    match opened {
        Ok(reader) => {
            let len = len.min(reader.file_len().saturating_sub(offset));
            let body = crate::service::file_body(reader, offset, len);
            (NodeResponse::HandoffStreamed { len }, Some(body))
        }
        Err(e) => (NodeResponse::HandoffChunk(Err(e)), None),
    }
}
