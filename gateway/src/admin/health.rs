//! What a health read gathers beyond its first answer: every node reports only its own rebuild
//! after a lost tenant store, so the gateway collects them from the other nodes' answers of the
//! same round, waiting only for the nodes the first answer's gossip holds alive.

use std::net::SocketAddr;

use proto::admin::{AdminAnswer, HealthReport, RebuildProgress};
use proto::cluster::{NodeHealth, NodeResponse};

/// Adds a node's own rebuild, from its answer to `Health`, to `rebuilds`.
pub(super) fn own_rebuilds(
    answer: &Result<NodeResponse, crate::forward::CallError>,
    rebuilds: &mut Vec<RebuildProgress>,
) {
    if let Ok(NodeResponse::Admin { result: Ok(AdminAnswer::Health(theirs)), .. }) = answer {
        rebuilds.extend(theirs.rebuilds.iter().filter(|r| r.node == theirs.node).cloned());
    }
}

/// Takes the answers of `asks` still to come, gathering their rebuild progress, until every
/// node of `awaited` answered or a forward's time passed.
pub(super) async fn heard_from<F>(
    asks: &mut futures::stream::FuturesUnordered<F>,
    mut awaited: Vec<SocketAddr>,
    rebuilds: &mut Vec<RebuildProgress>,
) where
    F: std::future::Future<Output = (SocketAddr, Result<NodeResponse, crate::forward::CallError>)>,
{
    let others = tokio::time::sleep(crate::forward::FORWARD_TIMEOUT);
    tokio::pin!(others);
    while !awaited.is_empty() {
        tokio::select! {
            n = futures::StreamExt::next(asks) => match n {
                Some((addr, answer)) => {
                    awaited.retain(|a| *a != addr);
                    own_rebuilds(&answer, rebuilds);
                }
                None => break,
            },
            _ = &mut others => break,
        }
    }
}

/// Whether the node at `addr` is alive in `report`'s gossip; true for an address the report
/// does not list (a seed), which is then waited for as before.
pub(super) fn alive_in(report: &HealthReport, addr: SocketAddr) -> bool {
    report
        .nodes
        .iter()
        .find(|n| n.addr.parse::<SocketAddr>() == Ok(addr))
        .is_none_or(|n| n.health == NodeHealth::Alive)
}
