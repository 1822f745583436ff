//! Following the registry and every node's gossip: one long-poll per node, all at once.
//!
//! The set of nodes comes from the registry view itself; the configured `nodes` are only seeds
//! (asked until the view names them, and dropped once the registry says they were removed).
//! Each poll names the applied index of the registry the gateway holds, and the answer carries
//! only the tenants changed since ([`proto::cluster::ViewUpdate`]; the whole registry on first
//! contact). Each answer is merged into the view ([`ViewHandle::update`]): the registry part by
//! applied index, the leader by term. So a frozen node cannot hold the view
//! back (the others answer), and a node whose gossip lags cannot undo a newer verdict.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::cluster::{NodeRequest, NodeResponse};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::forward::NodeClient;
use crate::view::{IndexedView, ViewHandle};

/// How long a node holds a view long-poll open when nothing changes.
const POLL_WAIT: Duration = Duration::from_secs(5);
/// Extra time over [`POLL_WAIT`] before a poll counts as failed (a frozen or gone node).
const POLL_SLACK: Duration = Duration::from_secs(2);
/// Pause after a failed poll of one node before asking it again; the other nodes' polls go on.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// How often the set of nodes to follow is re-derived even when the view did not change.
const TARGETS_RECHECK: Duration = Duration::from_secs(1);

/// Who to follow: every node of the view that is not removed, and the seeds the view does not
/// name as removed.
fn targets(view: &IndexedView, seeds: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut addrs: Vec<SocketAddr> = view.node_addrs().into_iter().map(|(_, a)| a).collect();
    let removed = view.removed_addrs();
    for s in seeds {
        if !addrs.contains(s) && !removed.contains(s) {
            addrs.push(*s);
        }
    }
    addrs
}

/// Follows every node until `shutdown`, merging each answer into `views`.
pub async fn follow(
    client: Arc<dyn NodeClient>,
    views: ViewHandle,
    seeds: Vec<SocketAddr>,
    shutdown: CancellationToken,
) {
    // In address order, so a simulated run replays exactly.
    let mut polls: BTreeMap<SocketAddr, JoinHandle<()>> = BTreeMap::new();
    let mut changes = views.subscribe();
    loop {
        let wanted = targets(&views.current(), &seeds);
        polls.retain(|addr, task| {
            let keep = wanted.contains(addr) && !task.is_finished();
            if !keep {
                task.abort();
                tracing::debug!(%addr, "no longer following this node");
            }
            keep
        });
        for addr in wanted {
            polls.entry(addr).or_insert_with(|| {
                tokio::spawn(poll_one(client.clone(), views.clone(), addr, shutdown.clone()))
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = changes.changed() => {}
            _ = tokio::time::sleep(TARGETS_RECHECK) => {}
        }
    }
    for (_, task) in polls {
        task.abort();
    }
}

/// Long-polls one node until `shutdown` (or until [`follow`] drops it).
async fn poll_one(
    client: Arc<dyn NodeClient>,
    views: ViewHandle,
    addr: SocketAddr,
    shutdown: CancellationToken,
) {
    loop {
        // Ask with the index of the registry this gateway holds: the node answers when its
        // registry moves past it (with only what changed since), or when its gossip changed
        // since it last answered us. A node behind it waits until it catches up.
        let known_index = views.current().view.applied_index;
        let request = NodeRequest::ViewSince { known_index, wait_ms: POLL_WAIT.as_millis() as u64 };
        let answer = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = client.call(addr, request, POLL_WAIT + POLL_SLACK) => a,
        };
        let failed = match answer {
            Ok(NodeResponse::ViewUpdate(Some(update))) => {
                match crate::forward::whole(client.as_ref(), addr, update).await {
                    Ok(update) => {
                        views.update(update);
                        false
                    }
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "the rest of the registry failed");
                        true
                    }
                }
            }
            Ok(NodeResponse::ViewUpdate(None)) => false,
            Ok(other) => {
                tracing::warn!(%addr, ?other, "unexpected answer to a view poll");
                true
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, "view poll failed");
                true
            }
        };
        if failed {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY_PAUSE) => {}
            }
        }
    }
}
