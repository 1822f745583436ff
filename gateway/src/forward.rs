//! Forwarding to nodes over QUIC, and keeping the registry view fresh.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::cluster::{NodeRequest, NodeResponse, ViewUpdate, VIEW_TENANTS_PER_PART};
use proto::wire;

use crate::view::ViewHandle;

/// How long a node may take at each step of a forwarded request before the client gets 503: to
/// open the stream, to take each MiB of the request, and to send each frame of its answer once
/// it has the request (plus `transport::ANSWER_WAIT_PER_MIB` for each MiB the request carries),
/// then between frames of a streamed answer. A node still working on an answer (loading,
/// sizing or writing out a large document before its head) sends a progress frame every
/// 500 ms (`transport::ServerLimits::progress_interval`), so its answer may take as long as
/// that work does (up to `transport::ANSWER_HEAD_WAIT_MAX`) while a hung node is still told
/// within this. Well under the 2 s within which a dead node's tenants must be told, so a hang
/// never reaches the client; per step, so a large write or read is never cut for its size
/// while the node keeps up.
pub const FORWARD_TIMEOUT: Duration = Duration::from_millis(1500);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("node unreachable: {0}")]
    Unreachable(String),
    #[error("bad answer from node: {0}")]
    Protocol(String),
}

/// The seam to the nodes: QUIC in production, memory in the simulator.
pub trait NodeClient: Send + Sync + 'static {
    fn call(
        &self,
        addr: SocketAddr,
        request: NodeRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<NodeResponse, CallError>>;

    /// Like [`NodeClient::call`], for an answer that may stream a body after its head
    /// ([`NodeResponse::SqStreamed`]). The default streams nothing.
    fn call_answer(
        &self,
        addr: SocketAddr,
        request: NodeRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(NodeResponse, transport::BodyReader), CallError>> {
        Box::pin(async move {
            Ok((self.call(addr, request, timeout).await?, transport::BodyReader::empty()))
        })
    }
}

/// A transport failure as the gateway sees it: only a peer that may come back is "unreachable"
/// (503, retry); anything else (a refused or oversized frame, another version) fails the same
/// way every time.
fn call_error(e: transport::TransportError) -> CallError {
    if e.is_unavailable() {
        CallError::Unreachable(e.to_string())
    } else {
        CallError::Protocol(e.to_string())
    }
}

/// [`NodeClient`] over the cluster transport (QUIC in production, the simulator's network in sim).
pub struct WireNodeClient(pub Arc<dyn transport::Caller>);

impl NodeClient for WireNodeClient {
    fn call(
        &self,
        addr: SocketAddr,
        request: NodeRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<NodeResponse, CallError>> {
        Box::pin(async move {
            let bytes = wire::encode(&request).map_err(|e| CallError::Protocol(e.to_string()))?;
            let answer = self.0.call(addr, bytes.into(), timeout).await.map_err(call_error)?;
            wire::decode(&answer).map_err(|e| CallError::Protocol(e.to_string()))
        })
    }

    fn call_answer(
        &self,
        addr: SocketAddr,
        request: NodeRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(NodeResponse, transport::BodyReader), CallError>> {
        Box::pin(async move {
            let bytes = wire::encode(&request).map_err(|e| CallError::Protocol(e.to_string()))?;
            let (head, body) =
                self.0.call_answer(addr, bytes.into(), timeout).await.map_err(call_error)?;
            let head = wire::decode(&head).map_err(|e| CallError::Protocol(e.to_string()))?;
            Ok((head, body))
        })
    }
}

/// Asks one node, at once, for what changed in the registry since `known_index` (0: the whole
/// registry). `None` when the node has nothing newer. Used on start and after a "not owner"
/// answer.
pub async fn fetch_update(
    client: &dyn NodeClient,
    addr: SocketAddr,
    known_index: u64,
) -> Result<Option<ViewUpdate>, CallError> {
    let request = NodeRequest::ViewSince { known_index, wait_ms: 0 };
    match client.call(addr, request, FORWARD_TIMEOUT).await? {
        NodeResponse::ViewUpdate(Some(update)) => Ok(Some(whole(client, addr, update).await?)),
        NodeResponse::ViewUpdate(None) => Ok(None),
        other => Err(CallError::Protocol(format!("unexpected answer to view: {other:?}"))),
    }
}

/// `update` made whole: the first part of a large registry ([`ViewUpdate::FullFirst`]) with
/// the rest asked of the same node page by page, as the registry at the first part's index;
/// any other update as it is.
pub async fn whole(
    client: &dyn NodeClient,
    addr: SocketAddr,
    update: ViewUpdate,
) -> Result<ViewUpdate, CallError> {
    let ViewUpdate::FullFirst(mut view) = update else { return Ok(update) };
    while let Some(after) = view.tenants.last().map(|t| t.id.clone()) {
        let request = NodeRequest::ViewPage { after, limit: VIEW_TENANTS_PER_PART };
        match client.call(addr, request, FORWARD_TIMEOUT).await? {
            NodeResponse::ViewPage { tenants, more } => {
                view.tenants.extend(tenants);
                if !more {
                    break;
                }
            }
            other => {
                return Err(CallError::Protocol(format!(
                    "unexpected answer to view page: {other:?}"
                )))
            }
        }
    }
    tracing::info!(%addr, tenants = view.tenants.len(), index = view.applied_index, "took the whole registry in parts");
    Ok(ViewUpdate::Full(view))
}

/// Brings the view up to what the first node that answers has. Returns whether one did.
pub async fn refresh(client: &dyn NodeClient, views: &ViewHandle, seeds: &[SocketAddr]) -> bool {
    for addr in candidates(views, seeds) {
        let known_index = views.current().view.applied_index;
        if let Ok(update) = fetch_update(client, addr, known_index).await {
            if let Some(update) = update {
                views.update(update);
            }
            return true;
        }
    }
    false
}

fn candidates(views: &ViewHandle, seeds: &[SocketAddr]) -> Vec<SocketAddr> {
    let current = views.current();
    let mut addrs: Vec<SocketAddr> = current
        .node_addrs()
        .into_iter()
        .filter(|(id, _)| !current.is_dead(*id))
        .map(|(_, a)| a)
        .collect();
    let removed = current.removed_addrs();
    for s in seeds {
        if !addrs.contains(s) && !removed.contains(s) {
            addrs.push(*s);
        }
    }
    addrs
}
